"""The testing kit an app's own tests use: ``run_app``, its ``Harness``, and the README's examples of it."""

from __future__ import annotations

import pytest

from sideband import Accept, IncomingCall, Refer, Reject
from sideband.testing import Script, caller_hangs_up

from .conftest import Stack


async def test_ended_says_a_call_was_rejected_at_ring_time_and_with_what(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Reject:
        return Reject(status_code=486)

    call = await stack.call(Script([caller_hangs_up()]))
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    message = str(failed.value)
    assert f"call {call.call_id} never ran on the server" in message
    assert "rejected at ring time with SIP 486 (reject body {'status_code': 486})" in message
    assert "route failure status" not in message  # a deliberate reject


async def test_ended_points_at_the_routing_hook_when_the_call_was_rejected_with_the_failure_status(
    stack: Stack,
) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        raise RuntimeError("the routing database is down")

    call = await stack.call(Script())
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    message = str(failed.value)
    assert "rejected at ring time with SIP 480" in message
    assert "480 is the route failure status: did the routing hook raise" in message


async def test_ended_says_a_call_was_transferred_at_ring_time_and_where(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Refer:
        return Refer("tel:+14155550123")

    call = await stack.call(Script())
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    assert "transferred at ring time to tel:+14155550123" in str(failed.value)
