"""``sideband dial``: talk to a vowel engine from the terminal (or a script) through a trusted-server
session with the app's tools; and the trusted-server leg of ``sideband demo``."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from sideband.app import Sideband
from sideband.settings import Settings, load_settings
from sideband.vowel.session import REQUIRED_SETTINGS, EngineError, EngineSession, Reply

if TYPE_CHECKING:
    from sideband.testing.vowel import Rule

__all__ = ["REQUIRED_SETTINGS", "run_dial", "run_vowel_demo"]


class _Printer:
    def __init__(self, out: TextIO, *, indent: str = "", clock: bool = False) -> None:
        self.out = out
        self.indent = indent
        self.clock = clock
        self.t0 = time.monotonic()

    def line(self, tag: str, text: str) -> None:
        stamp = f"{time.monotonic() - self.t0:6.2f}s  " if self.clock else ""
        self.out.write(f"{self.indent}{stamp}{tag}: {text}\n")
        self.out.flush()

    def reply(self, reply: Reply) -> None:
        for tool in reply.tools:
            self.line("tool", f"{tool.name} → {tool.outcome} {tool.duration * 1000:.1f} ms")
        for text in reply.lines or ("(no text)",):
            self.line("agent", text)
        if reply.status != "completed":  # (cut short, and nothing followed it)
            self.line("reply", str(reply.status))


class InputFailed(Exception):
    """The turns' input (``stdin``) could not be read; ``str(err)`` says why, on one line."""


async def _lines(stdin: TextIO) -> asyncio.Queue[str | InputFailed | None]:
    """Lines from ``stdin`` on a daemon thread (a blocked read never holds up the exit); ``None`` at EOF,
    an :class:`InputFailed` when a read fails. Its bytes are decoded line by line with the stream's
    encoding, what it cannot decode replaced (``U+FFFD``): an odd byte never ends the input."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | InputFailed | None] = asyncio.Queue()

    def read() -> None:
        end: InputFailed | None = None
        try:
            binary = getattr(stdin, "buffer", None)
            if binary is None:  # (a text stream with no bytes beneath: its lines as they come)
                for text in stdin:
                    loop.call_soon_threadsafe(queue.put_nowait, text.rstrip("\r\n"))
            else:
                encoding = getattr(stdin, "encoding", None) or "utf-8"
                for raw in binary:
                    text = raw.decode(encoding, "replace").rstrip("\r\n")
                    loop.call_soon_threadsafe(queue.put_nowait, text)
        except RuntimeError:  # the loop is gone
            return
        except (OSError, ValueError) as exc:
            end = InputFailed(" ".join(str(exc).split()) or type(exc).__name__)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(queue.put_nowait, end)

    threading.Thread(target=read, name="sideband-dial-stdin", daemon=True).start()
    return queue


async def _next_line(queue: asyncio.Queue[str | InputFailed | None], session: EngineSession) -> str | None:
    getter = asyncio.ensure_future(queue.get())
    ended = asyncio.ensure_future(session.wait_closed())
    try:
        await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (getter, ended):
            task.cancel()
        await asyncio.gather(getter, ended, return_exceptions=True)
    if getter.done() and not getter.cancelled():
        line = getter.result()
        if isinstance(line, InputFailed):
            raise line
        return line
    raise EngineError(session.end_reason or "closed", session.end_message or "the session ended")


async def _turn(session: EngineSession, text: str, printer: _Printer, refused: list[EngineError]) -> bool:
    """One user turn, its reply printed, or the engine's refusal of its text (``refused: …``, added to
    ``refused``: the session carries on). ``True`` once the session ended with the reply."""
    try:
        reply = await session.say(text)
    except EngineError as exc:
        if exc.reason != "turn_refused":
            raise
        refused.append(exc)
        printer.line(
            "refused", ": ".join(part for part in (exc.code, exc.engine_message) if part) or str(exc)
        )
        return False
    printer.reply(reply)
    return reply.ended is not None


async def converse(
    session: EngineSession,
    says: Sequence[str] | None,
    printer: _Printer,
    *,
    stdin: TextIO | None = None,
    echo: bool = True,
) -> list[EngineError]:
    """Send each of ``says`` (or each line of ``stdin``) as a user turn and print the replies; a turn the
    engine refuses is printed as ``refused: …`` and the next follows. Returns those refusals
    (``turn_refused``). Raises :class:`InputFailed` when ``stdin`` cannot be read."""
    refused: list[EngineError] = []
    if says:
        for text in says:
            printer.line("you", text)
            if await _turn(session, text, printer, refused):
                break
        return refused
    source: TextIO | None = stdin or sys.stdin
    if source is None:  # (the process was started with its stdin closed)
        raise InputFailed("it is closed")
    try:
        interactive = source.isatty()
    except (OSError, ValueError) as exc:  # (a stream closed)
        raise InputFailed(" ".join(str(exc).split()) or type(exc).__name__) from None
    queue = await _lines(source)
    while True:
        if interactive:
            printer.out.write("> ")
            printer.out.flush()
        line = await _next_line(queue, session)
        if line is None:
            return refused
        if not line.strip():
            continue
        if echo and not interactive:
            printer.line("you", line)
        if await _turn(session, line, printer, refused):
            return refused


async def run_dial(
    settings: Settings,
    app: Sideband,
    says: Sequence[str] | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Open a trusted-server session, hold the conversation, close. 0 on success; 1 (with one
    ``sideband: …`` line on ``err``) when the session could not start or ended badly, ``stdin`` could
    not be read (the session is closed first), or the engine refused a turn's text (the turns after it
    were sent all the same)."""
    out = out or sys.stdout
    err = err or sys.stderr
    printer = _Printer(out)
    session = EngineSession.open(settings, app)
    unread: InputFailed | None = None
    refused: list[EngineError] = []
    try:
        async with session:
            printer.line(
                "session",
                f"{session.call_id} (engine {session.engine_session_id}, service {session.service_id}, "
                f"tools: {', '.join(session.tools.names()) or 'none'})",
            )
            try:
                refused = await converse(session, says, printer, stdin=stdin)
            except InputFailed as exc:
                unread = exc
    except EngineError as exc:
        err.write(f"sideband: {exc}\n")
        return 1
    printer.line("end", session.end_reason or "closed")
    if unread is not None:
        err.write(f"sideband: could not read the standard input: {unread}\n")
        return 1
    if session.failed:
        err.write(f"sideband: {session.end_message}\n")
        return 1
    if refused:
        count = f" ({len(refused)} turns refused)" if len(refused) > 1 else ""
        err.write(f"sideband: {refused[-1]}{count}\n")
        return 1
    return 0


# -------------------------------------------------------------------------------------------- demo
def _order_desk_rules() -> list[Rule]:
    from sideband.testing.vowel import when

    return [
        when(
            "1042",
            calls=[("lookup_order", {"order_id": "1042"})],
            preamble="Let me check that for you.",
            reply="Order 1042 shipped with UPS and arrives Thursday.",
        ),
        when(
            "9999",
            calls=[("lookup_order", {"order_id": "9999"})],
            reply="I can't find order 9999. Could you check the number?",
        ),
        when("that's all", calls=[("end_call", {})], reply="Thanks for contacting Example Corp. Goodbye!"),
    ]


async def run_vowel_demo(app: Sideband | None = None, out: TextIO | None = None) -> int:
    """The trusted-server leg of ``sideband demo``: a simulated vowel core + engine on loopback, one
    session driven from code with the app's tools, then a key without the scope being refused."""
    from sideband.testing.vowel import VowelSimulator

    out = out or sys.stdout
    if app is None:
        from sideband.examples.order_desk import app as order_desk

        app, rules = order_desk, _order_desk_rules()
        says = ["Hi, where is my order 1042?", "And order 9999?", "No, that's all. Thanks!"]
    else:
        rules, says = [], ["Hello there."]
    failures = 0
    async with VowelSimulator(default_reply="Hello! How can I help?") as sim:
        sim.script(rules)
        settings = load_settings(sim.settings_values(), environ={})
        out.write(f"\ntrusted-server session: vowel core {sim.core_url}, engine {sim.engine_url}\n")
        printer = _Printer(out, indent="  ", clock=True)
        session = EngineSession.open(settings, app, app_hooks=False)  # the demo prints replies itself
        try:
            async with session:
                printer.line("session", f"{session.call_id} (engine {session.engine_session_id})")
                failures += len(await converse(session, says, printer))
        except EngineError as exc:
            failures += 1
            printer.line("error", str(exc))
        if session.failed:
            failures += 1
        summary = session.summary
        printer.line(
            "end",
            f"{session.end_reason} after {summary.duration if summary else 0:.2f} s, "
            f"{len(summary.tools) if summary else 0} tool call(s)",
        )
        out.write("\ntrusted-server session with a browser key (no mint_trusted_session scope)\n")
        refused = load_settings(sim.settings_values(api_key=sim.browser_key), environ={})
        try:
            async with EngineSession.open(refused, app, app_hooks=False):
                failures += 1
                printer.line("error", "the core minted a trusted-server token for a browser key")
        except EngineError as exc:
            printer.line("refused", str(exc))
    return 1 if failures else 0
