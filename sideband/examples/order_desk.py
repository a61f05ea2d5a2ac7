"""The order desk of Example Corp: look up an order, transfer to a human, end the call; never promise a
refund."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from pydantic import Field

from sideband import Accept, CallContext, IncomingCall, Reject, Sideband
from sideband.tools import ToolError

ORDERS: dict[str, dict[str, Any]] = {
    "1042": {"status": "shipped", "carrier": "UPS", "eta": "Thursday"},
    "2077": {"status": "processing", "eta": "next week"},
    "3001": {"status": "delivered", "delivered_on": "Monday"},
}

app = Sideband(
    instructions=(
        "You are the order desk of Example Corp. Be brief and friendly. Use lookup_order for order "
        "questions, transfer_call when the caller asks for a person, end_call when they are done."
    ),
    voice="marin",
    greeting="Greet the caller as the Example Corp order desk and ask for their order number.",
    transfer_targets={"human": "tel:+14155550123", "billing": "sip:billing@example.com"},
    idle_prompts=1,  # a silent caller is asked whether they are still there before the goodbye
)
app.enable_transfer()
app.enable_end_call()


@app.tool(timeout=5)
async def lookup_order(
    order_id: Annotated[str, Field(description="The order number the caller gave, digits only")],
    ctx: CallContext,
) -> dict[str, Any]:
    """Look up an order by its number and return its status."""
    await asyncio.sleep(0)  # a real app awaits its database here
    order = ORDERS.get(order_id.strip())
    if order is None:
        raise ToolError(f"No order {order_id}. Ask the caller to repeat the number.")
    ctx.state.setdefault("orders_checked", []).append(order_id)
    return {"order_id": order_id, **order}


_REFUND_PROMISE = re.compile(
    r"""
    \b(?:I|we)(?:['’]ll|\s+(?:will|can|do))?(?:\s+(?:personally|absolutely|definitely))?
    \s+(?:promise|guarantee)\w*\b                     # I promise, we'll guarantee, I can promise...
    (?:(?!\b(?:not|no|never|cannot)\b|n['’]t)[^.!?])*  # ...then, in the same sentence, no negation...
    \brefund                                          # ...before "refund"
    """,
    re.IGNORECASE | re.VERBOSE,
)
"""An affirmative promise of a refund, in one sentence. Not "I can't promise a refund", "I cannot
guarantee a refund" (what the rule asks the model to say), nor a promise of something else ("Your order is
guaranteed to arrive Thursday. For refunds, ...")."""


@app.guardrail
def no_refund_promises(ctx: CallContext, text: str) -> str | None:
    """Refunds are decided by the billing team: a reply that promises one is stopped."""
    if _REFUND_PROMISE.search(text):
        return "never promise a refund: offer to transfer the caller to billing"
    return None


@app.on_incoming
async def route(call: IncomingCall) -> Accept | Reject:
    """Refuse withheld numbers; everyone else reaches the order desk."""
    if call.caller_withheld:
        return Reject(status_code=433)
    return Accept()
