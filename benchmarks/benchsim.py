"""The OpenAI Realtime simulator (``sideband.testing``) with the timestamps and hooks the benchmarks need.

Added by subclassing, without touching ``sideband/testing``:

- every accept POST is timestamped (``BenchCall.t_accept``, ``time.monotonic_ns()`` when the simulator's
  accept handler starts), and a call the simulator does not know yet is created on the fly with
  ``lazy_script`` (so a separate sender process can invent call ids);
- the first ``session.update`` on a call is timestamped (``t_update``);
- ``inject_tool_call`` makes the model call a function *now* on a live call (the same event sequence as a
  scripted ``model_calls``: ``response.created``, ``output_item.added``, ``conversation.item.added``,
  argument deltas, ``function_call_arguments.done``, ``conversation.item.done``, ``output_item.done``,
  ``response.done``), timestamping when ``function_call_arguments.done`` went out (``args_done``) and when the
  ``function_call_output`` came back (``outputs_at``);
- ``compress=True`` serves the sideband with permessage-deflate (the stock simulator refuses it, so
  ``SIDEBAND_WS_COMPRESSION=true`` would otherwise negotiate nothing).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import WSMsgType, web

from sideband.testing import Script, SimCall, Simulator
from sideband.testing.script import FunctionCallSpec
from sideband.testing.simulator import _CLOSE_TIMEOUT, _Attachment


class BenchCall(SimCall):
    """A simulated call that timestamps what the benchmarks measure (``time.monotonic_ns()``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.t_accept: int | None = None
        self.t_update: int | None = None
        self.args_done: dict[str, int] = {}
        self.outputs_at: dict[str, int] = {}

    async def _on_session_update(self, event: Mapping[str, Any], event_id: str | None) -> None:
        if self.t_update is None:
            self.t_update = time.monotonic_ns()
        await super()._on_session_update(event, event_id)

    async def _send(self, event_type: str, /, **fields: Any) -> None:
        if event_type == "response.function_call_arguments.done":
            self.args_done[fields["call_id"]] = time.monotonic_ns()
        await super()._send(event_type, **fields)

    async def _on_item_create(self, event: Mapping[str, Any], event_id: str | None) -> None:
        item = event.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            call_id = item.get("call_id")
            if isinstance(call_id, str) and call_id not in self.outputs_at:
                self.outputs_at[call_id] = time.monotonic_ns()
        await super()._on_item_create(event, event_id)

    def session_updates(self) -> int:
        """How many ``session.update`` events the controller sent on this call."""
        return sum(1 for e in self.received if e.get("type") == "session.update")


class BenchSimulator(Simulator):
    """:class:`Simulator` plus accept/session/tool timestamps, lazy calls and optional compression."""

    def __init__(self, *, compress: bool = False, lazy_script: Script | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compress = compress
        self.lazy_script = lazy_script

    def new_call(self, script: Script | None = None, call_id: str | None = None) -> BenchCall:
        """Register a ringing SIP call (like ``create_call``) as a :class:`BenchCall`."""
        call_id = call_id or "rtc_" + uuid.uuid4().hex
        headers = [
            {"name": "From", "value": "sip:+14255550100@sip.example.com"},
            {"name": "To", "value": "sip:+18005551212@sip.example.com"},
            {"name": "Call-ID", "value": str(uuid.uuid4())},
        ]
        call = BenchCall(
            self,
            call_id,
            script or Script(),
            kind="sip",
            from_number="+14255550100",
            to_number="+18005551212",
            sip_headers=headers,
            media_security="srtp",
        )
        self.calls[call_id] = call
        return call

    def prune(self) -> None:
        """Forget ended calls and the request log (keeps memory flat across benchmark phases)."""
        for call_id in [cid for cid, call in self.calls.items() if call.ended]:
            del self.calls[call_id]
        self.requests.clear()

    async def _handle_accept(self, request: web.Request, call_id: str) -> web.StreamResponse:
        now = time.monotonic_ns()
        call = self.calls.get(call_id)
        if call is None and self.lazy_script is not None:
            call = self.new_call(self.lazy_script, call_id)
        if isinstance(call, BenchCall) and call.t_accept is None:
            call.t_accept = now
        return await super()._handle_accept(request, call_id)

    async def inject_tool_call(self, call: BenchCall, name: str, arguments: str, call_id: str) -> bool:
        """The model calls ``name(arguments)`` on ``call`` now, in a response of its own (after any
        response in progress). Returns False if the call has ended."""
        async with call._response_lock:
            if call.ended:
                return False
            await call._emit_response(
                text=None,
                calls=(FunctionCallSpec(name, arguments, call_id),),
                status="completed",
                create=None,
                trigger="spontaneous",
                source="script",
            )
        return True

    async def end_call(self, call: SimCall) -> None:
        """The caller hangs up (clean close of the sideband)."""
        await call._end("caller_hangup", "clean")

    async def _handle_sideband(self, request: web.Request) -> web.StreamResponse:
        if not self.compress:
            return await super()._handle_sideband(request)
        # Same as Simulator._handle_sideband, but the WebSocket accepts permessage-deflate.
        call_id = request.query.get("call_id")
        call = self.calls.get(call_id) if call_id else None
        if call is None or call.status != "accepted" or "OpenAI-Beta" in request.headers:
            return await super()._handle_sideband(request)
        ws = web.WebSocketResponse(timeout=_CLOSE_TIMEOUT, compress=True, max_msg_size=16 * 1024 * 1024)
        call.sideband_connects += 1
        try:
            await ws.prepare(request)
        except BaseException:
            call.sideband_connects -= 1
            raise
        attachment = _Attachment(ws, request.transport)
        call._attach(attachment)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    await call._on_text(message.data)
                elif message.type == WSMsgType.BINARY:
                    call.bad_frames.append(message.data)
        finally:
            call._detach(attachment)
        return ws


def error_count(call: SimCall) -> int:
    """``error`` events the simulator sent on a call (should stay 0 in a clean run)."""
    return len(call.sent_of_type("error"))


def error_codes(calls: list[SimCall]) -> dict[str, int]:
    """Count of ``error`` events by code over ``calls``."""
    codes: dict[str, int] = {}
    for call in calls:
        for event in call.sent_of_type("error"):
            code = str(event.get("error", {}).get("code"))
            codes[code] = codes.get(code, 0) + 1
    return codes


__all__ = ["BenchCall", "BenchSimulator", "error_codes", "error_count"]
