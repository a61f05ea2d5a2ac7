"""A minimal app: copy this file, then `sideband serve examples.app:app`."""

from sideband import CallContext, Sideband

app = Sideband(instructions="You are a helpful receptionist. Keep answers short.", voice="marin")


@app.tool
async def opening_hours(day: str, ctx: CallContext) -> str:
    """Opening hours for a day of the week.

    Args:
        day: Day of the week, e.g. "monday".
    """
    return "closed" if day.lower() in ("saturday", "sunday") else "9am to 5pm"
