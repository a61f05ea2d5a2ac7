"""Which event loop a simulator serves on: it answers nothing while another one runs the test."""

from __future__ import annotations

import asyncio

_OTHER_LOOP = (
    "the simulator runs on another event loop than this test: the one it was started on is not running "
    "now, so the simulator would answer nothing (every request to it timing out). Give the fixture and the "
    'test the same loop scope: e.g. a test marked @pytest.mark.asyncio(loop_scope="module") needs '
    'asyncio_default_fixture_loop_scope = "module" in the pytest config (or a simulator fixture of its own, '
    '@pytest_asyncio.fixture(loop_scope="module")), and asyncio_default_fixture_loop_scope = "session" '
    'needs asyncio_default_test_loop_scope = "session"'
)
"""Why the simulator refuses to be used from another event loop than the one it was started on."""


def check_loop(started: asyncio.AbstractEventLoop | None) -> None:
    """Raise :class:`RuntimeError` when the running event loop is not ``started``, the one a simulator was
    started on (``None``: not started): that one is not running meanwhile (as under pytest-asyncio, when a
    fixture and the test that uses it run on loops of different scopes), so the simulator would answer
    nothing, and every request to it would time out."""
    if started is None:
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:  # (no loop running here: nothing waits on the simulator from this code)
        return
    if running is not started:
        raise RuntimeError(_OTHER_LOOP)
