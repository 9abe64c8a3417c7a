"""A job's progress as the customer shows it: a bar, the percentage, a rate and an ETA.

The DVM sends ``processing`` feedback with a percentage (NIP-90's ``progress`` tag) and a
message; it sends at most one every few seconds, so the rate is measured over the whole run
so far (first percentage to the last), not between two updates: steadier, and an ETA that does
not jump. A job whose percentage has not moved yet has no rate and no ETA ("--").

    meter = ProgressMeter()
    line = meter.line(feedback.progress, feedback.message)   # [#######-------------]  35% 2.1 %/s ETA 0:31 epoch 3/10 ...
    line = meter.done("done")                                # [####################] 100% ... in 0:47
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

WIDTH = 20
_PERCENT_PREFIX = re.compile(r"^\d+(?:\.\d+)?% ")   # the worker starts its message with the percentage


def bar(percent: float, width: int = WIDTH) -> str:
    filled = int(max(0.0, min(100.0, percent)) / 100 * width)
    return f"[{'#' * filled}{'-' * (width - filled)}]"


def duration(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressMeter:
    """One job's progress: call `line` with each percentage it reports, `done` when its result
    arrives (the bar then shows 100 % whatever the last report said)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.first: tuple[float, float] | None = None   # (time, percent) of the first report
        self.last: tuple[float, float] | None = None

    def rate(self) -> float | None:
        """Percent per second since the first report; None until the percentage has moved."""
        if self.first is None or self.last is None:
            return None
        (t0, p0), (t1, p1) = self.first, self.last
        if t1 <= t0 or p1 <= p0:
            return None
        return (p1 - p0) / (t1 - t0)

    def eta(self) -> float | None:
        rate = self.rate()
        if rate is None or self.last is None:
            return None
        return (100.0 - self.last[1]) / rate

    def line(self, percent: float, message: str = "") -> str:
        now = self.clock()
        percent = max(0.0, min(100.0, float(percent)))
        if self.first is None:
            self.first = (now, percent)
        self.last = (now, max(percent, self.last[1]) if self.last else percent)
        rate, eta = self.rate(), self.eta()
        if rate is None:
            speed = "-- %/s"
        elif rate >= 1:
            speed = f"{rate:.1f} %/s"
        else:
            speed = f"{rate * 60:.1f} %/min"
        text = f"{bar(percent)} {percent:3.0f}% {speed} ETA {duration(eta) if eta is not None else '--'}"
        return f"{text} {_PERCENT_PREFIX.sub('', message, count=1)}".rstrip()

    def done(self, message: str = "done") -> str:
        """The last line: a full bar and how long the job took since this meter started."""
        return f"{bar(100)} 100% {message} in {duration(self.clock() - self.started)}".rstrip()


__all__ = ["ProgressMeter", "bar", "duration"]
