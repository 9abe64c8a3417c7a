"""Helpers the benchmark scripts share: percentiles, timing, CPU accounting."""

from __future__ import annotations

import os
import sys
import time

try:
    import psutil
except ImportError:  # CPU figures are optional
    psutil = None


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def reply_to(event: dict) -> str | None:
    for t in event["tags"]:
        if len(t) >= 2 and t[0] == "e":
            return t[1]
    return None


class CpuMeter:
    """CPU seconds used by this process (worker, customer, wallets), the relay and the mint."""

    def __init__(self, **pids: int):
        self.procs = ({"bench": psutil.Process(), **{n: psutil.Process(p) for n, p in pids.items()}}
                      if psutil is not None else {})
        self.wall = 0.0
        self.start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            t = proc.cpu_times()
            out[name] = t.user + t.system
        return out

    def begin(self) -> None:
        self.wall = time.perf_counter()
        self.start = self._now()

    def end(self) -> dict | None:
        if not self.procs:
            return None
        wall = time.perf_counter() - self.wall
        now = self._now()
        out = {"wall_s": round(wall, 3)}
        for name in self.procs:
            used = now[name] - self.start[name]
            out[f"{name}_cpu_s"] = round(used, 3)
            out[f"{name}_cpu_share"] = round(used / wall, 3) if wall > 0 else None
        return out
