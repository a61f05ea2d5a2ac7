"""Pytest fixtures for testing against the simulator (registered as the ``sideband`` pytest11 plugin).

``simulator``: a started :class:`~sideband.testing.Simulator`, closed after the test. It needs an asyncio
pytest plugin (pytest-asyncio, e.g. via pytest-aiohttp); without one the fixture is not defined, so loading
this plugin never breaks an unrelated test suite. The simulators are imported by the fixtures that start
them, not when the plugin is loaded.

The fixtures run on pytest-asyncio's default fixture loop (``asyncio_default_fixture_loop_scope``): a test
using one must run on that same loop (its loop scope the same), or the simulator, whose loop is not running
while the test is, answers nothing (the OpenAI simulator then refuses to be used, with a
:class:`RuntimeError` saying so).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .simulator import Simulator
    from .vowel import VowelSimulator

__all__ = ["simulator"]

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is absent: no async fixtures
    pass
else:

    @pytest_asyncio.fixture
    async def simulator() -> AsyncIterator[Simulator]:
        """A started :class:`Simulator` on a free loopback port; closed afterwards, failing the test if the
        simulator itself hit an internal error (on a call or outside any)."""
        from .simulator import Simulator

        async with Simulator() as sim:
            yield sim
        broken = {cid: call.internal_errors for cid, call in sim.calls.items() if call.internal_errors}
        if sim.internal_errors:
            broken["outside any call"] = sim.internal_errors
        if broken:
            pytest.fail(f"the simulator hit internal errors: {broken}")

    @pytest_asyncio.fixture
    async def vowel() -> AsyncIterator[VowelSimulator]:
        """A started :class:`~sideband.testing.vowel.VowelSimulator` (vowel core + engine on loopback);
        closed afterwards, failing the test if the simulator itself hit an internal error."""
        from .vowel import VowelSimulator

        async with VowelSimulator() as sim:
            yield sim
        if sim.internal_errors:
            pytest.fail("the vowel simulator hit internal errors:\n" + "\n".join(sim.internal_errors))
