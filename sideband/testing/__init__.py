"""``sideband.testing``: an in-process OpenAI Realtime SIP/WebRTC simulator for tests, demos and benchmarks.

::

    from sideband.testing import Simulator, Script, wait_for_greeting, caller_says, model_calls, model_says

    async with Simulator() as sim:
        call = sim.create_call(Script([wait_for_greeting(), caller_says("Hi"), model_says("Hello!")]))
        result = await sim.webhook_sender("http://127.0.0.1:8080/webhooks/openai").deliver(
            sim.incoming_event(call))
        await call.wait_done()

Point the code under test at ``sim.base_url`` (REST) with ``sim.api_key``; verify webhooks with
``sim.webhook_secret``. The pytest plugin (``sideband.testing.pytest_plugin``, registered automatically)
provides a ``simulator`` fixture.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import Harness, run_app
    from .script import (
        Script,
        Step,
        caller_hangs_up,
        caller_presses,
        caller_says,
        model_answers,
        model_calls,
        model_fails,
        model_says,
        model_says_first,
        pause,
        wait_for_greeting,
    )
    from .sender import DeliveryResult, WebhookSender
    from .simulator import (
        DEFAULT_API_KEY,
        DEFAULT_WEBHOOK_SECRET,
        InjectedCall,
        RequestRecord,
        ResponseRecord,
        ScriptError,
        SimCall,
        Simulator,
    )
    from .vowel import VowelSimulator

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_WEBHOOK_SECRET",
    "DeliveryResult",
    "Harness",
    "InjectedCall",
    "RequestRecord",
    "ResponseRecord",
    "Script",
    "ScriptError",
    "SimCall",
    "Simulator",
    "Step",
    "VowelSimulator",
    "WebhookSender",
    "caller_hangs_up",
    "caller_presses",
    "caller_says",
    "model_answers",
    "model_calls",
    "model_fails",
    "model_says",
    "model_says_first",
    "pause",
    "run_app",
    "wait_for_greeting",
]

_HOMES = {
    **dict.fromkeys(("Harness", "run_app"), ".harness"),
    **dict.fromkeys(("DeliveryResult", "WebhookSender"), ".sender"),
    **dict.fromkeys(
        (
            *("Script", "Step", "caller_hangs_up", "caller_presses", "caller_says", "model_calls"),
            *("model_answers", "model_fails", "model_says", "model_says_first", "pause"),
            "wait_for_greeting",
        ),
        ".script",
    ),
    **dict.fromkeys(
        (
            *("DEFAULT_API_KEY", "DEFAULT_WEBHOOK_SECRET", "InjectedCall", "RequestRecord"),
            *("ResponseRecord", "ScriptError", "SimCall", "Simulator"),
        ),
        ".simulator",
    ),
    "VowelSimulator": ".vowel",
}


_SUBMODULES = frozenset({"harness", "pytest_plugin", "script", "sender", "simulator", "vowel"})

if not TYPE_CHECKING:  # (type checkers read the imports above, and so still catch a misspelt name)

    def __getattr__(name: str) -> Any:
        """Each name is imported on first use (PEP 562): loading the pytest plugin, which lives in this
        package, imports no simulator into a test run that uses none."""
        home = _HOMES.get(name)
        if home is not None:
            return getattr(importlib.import_module(home, __name__), name)
        if name in _SUBMODULES:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
