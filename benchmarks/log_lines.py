"""What one JSON log line costs: ``./dev python benchmarks/log_lines.py``.

Renders and writes a typical line (``tool.finished`` with a call's bound ``call_id``) 50,000 times to
``/dev/null`` through sideband's logging setup, then through the same setup with structlog's default JSON
renderer (the standard library's encoder), and prints the CPU per line of each.
"""

from __future__ import annotations

import os
import time

import structlog

from sideband.logs import configure_logging

LINES = 50_000


def per_line() -> float:
    log = structlog.get_logger(component="sideband.call").bind(call_id="rtc_0123456789abcdef")
    start = time.process_time()
    for _ in range(LINES):
        log.info("tool.finished", tool="lookup_order", tool_call_id="call_x1", outcome="ok", duration_ms=1.23)
    return (time.process_time() - start) / LINES * 1e6


def main() -> None:
    with open(os.devnull, "w") as sink:
        configure_logging("json", "info", sink)
        ours = per_line()
        processors = structlog.get_config()["processors"]
        processors[-1] = structlog.processors.JSONRenderer()  # the library's default renderer
        structlog.configure(processors=processors)
        default = per_line()
    print(f"one JSON line: {ours:.1f} µs of CPU (structlog's default JSON renderer: {default:.1f} µs)")


if __name__ == "__main__":
    main()
