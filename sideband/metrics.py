"""Latency histograms and tool-round counts for ``GET /metrics`` (Prometheus text format).

Counters of the answer path live where their events happen (plain :class:`collections.Counter` s); this
module holds what needs more than a count: :class:`Histogram` (durations in cumulative buckets) and
:class:`ToolStats` (each tool round of the process's calls, per tool and outcome), and the label values
known before anything happens (:data:`END_REASONS`, :data:`EVENT_OUTCOMES`, :data:`TOOL_OUTCOMES`,
:data:`REFUSALS`…). A counter starts with those at 0: a series that first appears at 1 has no increase
in Prometheus (``rate()``, ``increase()``), so the first failure after each start would not show.
"""

from __future__ import annotations

import typing
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from typing import Literal, TypeVar

__all__ = [
    "APP_END_REASON",
    "BROWSER_REFUSALS",
    "BUCKETS",
    "END_REASONS",
    "EVENT_OUTCOMES",
    "REFUSALS",
    "TOOL_OUTCOMES",
    "UNKNOWN_TOOL",
    "UNKNOWN_TOOL_OUTCOMES",
    "EndReason",
    "Histogram",
    "ToolStats",
    "end_reason",
    "label",
    "zeros",
]

BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Bucket bounds in seconds (Prometheus' defaults): a tool's default timeout is the last one."""

_K = TypeVar("_K")

UNKNOWN_TOOL = "(unknown)"
"""The ``tool`` label of a call naming no tool of the call's: the model's made-up names are not labels
(each would start a series of its own)."""


EndReason = Literal[
    "remote_closed",
    "call_not_found",
    "session_expired",
    "end_call_tool",
    "hangup",
    "transferred",
    "transfer_failed",
    "hangup_failed",
    "idle_timeout",
    "max_duration",
    "connect_failed",
    "reattach_failed",
    "shutdown",
    "internal_error",
]
"""The reasons sideband ends a call with (README: end reasons). A call summary's ``reason`` may also be
an app's own (``ctx.hangup(reason)``) or, on a trusted-server session, the engine's: any string."""

END_REASONS: tuple[str, ...] = typing.get_args(EndReason)
"""The end reasons of ``sideband_calls_ended_total{reason}`` (README: end reasons)."""

APP_END_REASON = "app"
"""The ``reason`` label of a call that ended with a reason of the app's own, given to
``ctx.hangup(reason)`` (any text, perhaps the caller's or the model's: as labels, a series each). The
reason itself is in the call's summary and its ``call.ended`` line."""

_END_LABELS = frozenset(END_REASONS)


def end_reason(reason: str) -> str:
    """The ``reason`` label a call that ended with ``reason`` counts under: itself when it is one of
    :data:`END_REASONS`, else :data:`APP_END_REASON`."""
    return reason if reason in _END_LABELS else APP_END_REASON


EVENT_OUTCOMES: tuple[str, ...] = (
    "accepted",
    "rejected",
    "referred",
    "call_gone",
    "busy",
    "blocked",
    "route_failed",
    "config_invalid",
    "answer_failed",
    "webhook_duplicate",
    "webhook_in_progress",
    "webhook_ignored",
    "hung_up",
)
"""The outcomes of ``sideband_events_total{outcome}``: what became of each webhook event."""

TOOL_OUTCOMES: tuple[str, ...] = (
    "ok",
    "error",
    "timeout",
    "cancelled",
    "invalid_arguments",
    "unknown_tool",
    "loop_breaker",
    "stopped",
)
"""The outcomes of a tool round (``ToolRecord.outcome``), ``sideband_tool_calls_total{outcome}``."""

UNKNOWN_TOOL_OUTCOMES: tuple[str, ...] = ("unknown_tool", "loop_breaker", "stopped")
"""The outcomes a round naming no tool of the call's may have (:data:`UNKNOWN_TOOL`): it never runs."""

REFUSALS: tuple[tuple[str, int], ...] = (
    ("webhook.rejected", 400),
    ("webhook.rejected", 401),
    ("webhook.rejected", 408),
    ("webhook.rejected", 413),
    ("webhook.rejected", 415),
    ("webhook.draining", 503),
    ("store.unavailable", 503),
)
"""The ``(event, status)`` of ``sideband_requests_refused_total`` any instance may count (webhooks, and
a claim store that failed under any request)."""

BROWSER_REFUSALS: tuple[tuple[str, int], ...] = (
    ("rtc.rejected", 400),
    ("rtc.rejected", 408),
    ("rtc.rejected", 413),
    ("rtc.rejected", 415),
    ("rtc.unauthorized", 401),
    ("rtc.unauthorized", 403),
    ("rtc.authorize_failed", 503),
    ("rtc.draining", 503),
    ("rtc.busy", 503),
    ("rtc.handoff_refused", 400),
    ("rtc.handoff_refused", 403),
    ("rtc.handoff_refused", 409),
)
"""The refusals of WebRTC requests where the app opened the WebRTC doors (without them, each is
``("rtc.closed", 404)``)."""


def zeros(keys: Iterable[_K]) -> Counter[_K]:
    """A counter holding each of ``keys`` at 0: their series are on ``/metrics`` from the start."""
    return Counter(dict.fromkeys(keys, 0))


def label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_NOT_RUN = frozenset({"invalid_arguments", "unknown_tool", "loop_breaker", "stopped"})


class _Series:
    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last one is +Inf's
        self.total = 0.0


class Histogram:
    """Observed durations (seconds) per label value, rendered as a Prometheus histogram: cumulative
    ``_bucket`` counts (``le`` inclusive), ``_sum`` and ``_count``. Observing costs one bisection.

    ``keys``: the label values whose series show from the start, at 0 (``""`` for a histogram without a
    label): a series that first appears with its first value has no increase in Prometheus, so that
    value would not show in ``rate()`` or ``histogram_quantile()``."""

    __slots__ = ("_bounds", "_series")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS, *, keys: Iterable[str] = ()) -> None:
        self._bounds = bounds
        self._series: dict[str, _Series] = {key: _Series(len(bounds) + 1) for key in keys}

    def observe(self, seconds: float, key: str = "") -> None:
        """Count one duration under the label value ``key``."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(len(self._bounds) + 1)
        series.counts[bisect_left(self._bounds, seconds)] += 1
        series.total += seconds

    def count(self, key: str = "") -> int:
        """How many durations were observed under ``key``."""
        series = self._series.get(key)
        return 0 if series is None else sum(series.counts)

    def lines(self, name: str, label_name: str | None = None) -> list[str]:
        """The exposition of the histogram ``name``; with ``label_name``, one series per label value."""
        out = [f"# TYPE {name} histogram"]
        bounds = [*(f"{b:g}" for b in self._bounds), "+Inf"]
        for key, series in sorted(self._series.items()):
            own = f'{label_name}="{label(key)}"' if label_name is not None else ""
            sep = "," if own else ""
            cumulative = 0
            for bound, count in zip(bounds, series.counts, strict=True):
                cumulative += count
                out.append(f'{name}_bucket{{{own}{sep}le="{bound}"}} {cumulative}')
            braces = f"{{{own}}}" if own else ""
            out.append(f"{name}_sum{braces} {series.total:.6f}")
            out.append(f"{name}_count{braces} {cumulative}")
        return out


class ToolStats:
    """The tool rounds of a process's calls: how each ended, per tool (``outcomes``), and how long the
    ones that ran took (``seconds``: outcomes ``ok``, ``error``, ``timeout`` and ``cancelled``; a call
    refused before its function ran, as ``invalid_arguments``, ``unknown_tool``, ``loop_breaker`` or
    ``stopped``, is counted but not timed)."""

    __slots__ = ("outcomes", "seconds")

    def __init__(self, tools: Iterable[str] = ()) -> None:
        """``tools``: the names a call's tools may have (the app's), whose counts start at 0 for each
        outcome, as :data:`UNKNOWN_TOOL`'s do for :data:`UNKNOWN_TOOL_OUTCOMES`."""
        tools = tuple(tools)
        known = [(tool, outcome) for tool in tools for outcome in TOOL_OUTCOMES]
        self.outcomes: Counter[tuple[str, str]] = zeros(
            [*known, *((UNKNOWN_TOOL, outcome) for outcome in UNKNOWN_TOOL_OUTCOMES)]
        )
        self.seconds = Histogram(keys=tools)

    def record(self, tool: str, outcome: str, duration: float) -> None:
        """Count one tool round (``tool``: a name of the call's tools, or :data:`UNKNOWN_TOOL`)."""
        self.outcomes[tool, outcome] += 1
        if outcome not in _NOT_RUN:
            self.seconds.observe(duration, tool)

    def lines(self) -> list[str]:
        """``sideband_tool_calls_total{tool,outcome}`` and the ``sideband_tool_seconds{tool}`` histogram."""
        out = ["# TYPE sideband_tool_calls_total counter"]
        out += [
            f'sideband_tool_calls_total{{tool="{label(tool)}",outcome="{outcome}"}} {count}'
            for (tool, outcome), count in sorted(self.outcomes.items())
        ]
        return out + self.seconds.lines("sideband_tool_seconds", "tool")
