"""Pytest fixtures for testing against the simulator (registered as the ``sideband`` pytest11 plugin).

``simulator``: a started :class:`~sideband.testing.Simulator`, closed after the test. It needs an asyncio
pytest plugin (pytest-asyncio, e.g. via pytest-aiohttp); without one the fixture is not defined, so loading
this plugin never breaks an unrelated test suite.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .simulator import Simulator

__all__ = ["simulator"]

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is absent: no async fixtures
    pass
else:

    @pytest_asyncio.fixture
    async def simulator() -> AsyncIterator[Simulator]:
        """A started :class:`Simulator` on a free loopback port, closed (and checked clean) afterwards."""
        async with Simulator() as sim:
            yield sim
