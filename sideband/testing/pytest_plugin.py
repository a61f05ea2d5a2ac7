"""Pytest fixtures for testing against the simulator (registered as the ``sideband`` pytest11 plugin).

``simulator``: a started :class:`~sideband.testing.Simulator`, closed after the test. It needs an asyncio
pytest plugin (pytest-asyncio, e.g. via pytest-aiohttp); without one the fixture is not defined, so loading
this plugin never breaks an unrelated test suite. pytest loads it in every run of a project where sideband
is installed, so loading it imports nothing heavy (no app, server, HTTP client or simulator: ``sideband``
imports its names on first use): each fixture imports what it starts.

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


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``vowel_early_create`` marker (see the ``vowel`` fixture)."""
    config.addinivalue_line(
        "markers",
        "vowel_early_create: the test means a client to send the vowel engine a response.create before "
        "every output of its tool calls is in (the vowel fixture lets it)",
    )


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is absent: no async fixtures
    pass
else:

    @pytest_asyncio.fixture
    async def simulator() -> AsyncIterator[Simulator]:
        """A started :class:`Simulator` on a free loopback port; closed afterwards, failing the test if the
        simulator itself hit an internal error (on a call or outside any)."""
        from .harness import _internal_errors
        from .simulator import Simulator

        async with Simulator() as sim:
            yield sim
        broken = _internal_errors(sim)
        if broken is not None:
            pytest.fail(broken)

    @pytest_asyncio.fixture
    async def vowel(request: pytest.FixtureRequest) -> AsyncIterator[VowelSimulator]:
        """A started :class:`~sideband.testing.vowel.VowelSimulator` (vowel core + engine on loopback);
        closed afterwards, failing the test if the simulator itself hit an internal error, or if a client
        sent one of its engine sessions a ``response.create`` before every output of the calls the engine
        announced was in (the engine answers it at once, its model seeing those calls unanswered), unless
        the test is marked ``@pytest.mark.vowel_early_create``."""
        from .vowel import EARLY_CREATE, VowelSimulator

        async with VowelSimulator() as sim:
            yield sim
        if sim.internal_errors:
            pytest.fail("the vowel simulator hit internal errors:\n" + "\n".join(sim.internal_errors))
        early = [note for s in sim.sessions for note in s.notes if note.startswith(EARLY_CREATE)]
        if early and request.node.get_closest_marker("vowel_early_create") is None:
            pytest.fail(
                "a client sent the vowel engine a response.create before every output of its tool calls "
                "was in (mark the test vowel_early_create if it means to):\n" + "\n".join(early)
            )
