"""Helpers shared by the benchmark scripts: /proc sampling, percentiles, limits, ports, machine facts."""

from __future__ import annotations

import math
import os
import platform
import resource
import socket
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads, dead ones included) from ``/proc/<pid>/stat``, in s.

    Resolution is one clock tick (``1/CLK_TCK``, usually 10 ms): measure windows of a second of CPU or more.
    """
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from ``/proc/<pid>/stat`` (see :func:`cpu_times`)."""
    user, system = cpu_times(pid)
    return user + system


def schedstat(pid: int) -> tuple[float, int]:
    """(time on CPU in s, ns resolution; times put on a CPU) of the process's live threads, from
    ``/proc/<pid>/task/*/schedstat``. The second figure counts every time a thread was scheduled in: for an
    event loop, its wake-ups (plus the rare preemption)."""
    total = slices = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan"), 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
            total += int(fields[0])
            slices += int(fields[2])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9, slices


def cpu_seconds_precise(pid: int) -> float:
    """Time on CPU of the process's live threads, in ns resolution (``/proc/<pid>/task/*/schedstat``)."""
    return schedstat(pid)[0]


def rss_bytes(pid: int) -> int:
    """Resident set size (``VmRSS``) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class CpuWindow:
    """CPU used by one process between :meth:`start` and :meth:`stop` (ticks and ns-precise)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._a = (0.0, 0.0, 0.0, 0)
        self.seconds = 0.0
        self.user = 0.0
        self.system = 0.0
        self.precise = 0.0
        self.slices = 0
        """Times the process's threads were put on a CPU (its wake-ups, see :func:`schedstat`)."""

    def start(self) -> None:
        self._a = (*cpu_times(self.pid), *schedstat(self.pid))

    def stop(self) -> None:
        user, system = cpu_times(self.pid)
        self.user, self.system = user - self._a[0], system - self._a[1]
        self.seconds = self.user + self.system
        precise, slices = schedstat(self.pid)
        self.precise, self.slices = precise - self._a[2], slices - self._a[3]


class MachineCpu:
    """Busy CPU of the whole machine (all cores, from ``/proc/stat``) between :meth:`start` and :meth:`stop`,
    in seconds: subtract the processes you know to see what *other* load shared the machine."""

    def __init__(self) -> None:
        self._a = 0.0
        self.seconds = 0.0

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        idle = values[3] + values[4]  # idle + iowait
        return (sum(values) - idle) / CLK_TCK

    def start(self) -> None:
        self._a = self._busy()

    def stop(self) -> None:
        self.seconds = self._busy() - self._a


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def code_version(root: str) -> str:
    """The commit the measured code is at (``+dirty`` when ``sideband/`` has uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sideband"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
                    break
    except OSError:
        pass
    versions = {}
    for package in ("aiohttp", "websockets", "uvloop", "orjson", "standardwebhooks", "pydantic", "structlog"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "-"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "packages": versions,
    }
