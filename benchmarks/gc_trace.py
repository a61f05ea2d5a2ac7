"""Run ``sideband.cli`` (``python benchmarks/gc_trace.py serve …``) with the collector's pauses recorded.

The same code path as ``python -m sideband.cli``, plus a ``gc.callbacks`` hook that times every collection;
at exit it writes ``{"collections": {gen: count}, "total_ms", "max_ms": {gen: ms}, "over_10ms": [[gen, ms,
t]]}`` to the file named by ``BENCH_GC_TRACE`` (``t`` is ``time.monotonic()`` at the start of the pause).
Used by ``run.py --gc-trace``.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import time
from typing import Any

_started: list[float] = [0.0]
_counts = {0: 0, 1: 0, 2: 0}
_max = {0: 0.0, 1: 0.0, 2: 0.0}
_total = [0.0]
_long: list[tuple[int, float, float]] = []


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.monotonic()
        return
    took = (time.monotonic() - _started[0]) * 1000
    generation = int(info.get("generation", 0))
    _counts[generation] += 1
    _total[0] += took
    _max[generation] = max(_max[generation], took)
    if took > 10:
        _long.append((generation, round(took, 1), round(_started[0], 3)))


def _report() -> None:
    path = os.environ.get("BENCH_GC_TRACE")
    if not path:
        return
    with open(path, "w") as f:
        json.dump(
            {
                "collections": _counts,
                "total_ms": round(_total[0], 1),
                "max_ms": {g: round(v, 1) for g, v in _max.items()},
                "over_10ms": _long,
            },
            f,
        )


if __name__ == "__main__":
    gc.callbacks.append(_callback)
    atexit.register(_report)
    sys.argv = ["sideband", *sys.argv[1:]]
    runpy.run_module("sideband.cli", run_name="__main__", alter_sys=True)
