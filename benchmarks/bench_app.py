"""The app under test for the benchmarks: one trivial tool, no greeting, no idle limit in sight.

Served by ``sideband serve benchmarks.bench_app:app`` (the benchmark runner starts it in a subprocess).
"""

from __future__ import annotations

from sideband import Sideband

app = Sideband(
    instructions="You are the benchmark desk. Call echo when asked.",
    greeting=None,  # no response.create at attach: the answer path ends with session.update
    max_idle_duration=24 * 3600,
    name="bench",
)


@app.tool
async def echo(n: int) -> dict[str, int]:
    """Echo a number back."""
    return {"n": n}
