"""Progress of long jobs: a tqdm bar that stays on a terminal, plain timed log lines anywhere else.

Under a scheduler, in CI or piped to a file, a bar writes nothing useful; ``progress`` then returns a ``LogLines``
reporter with the same interface (``update``, ``set_postfix``, ``close``, iteration) that prints one line per
``interval`` seconds, plus one at the start and one at the end: done/total, percent, the postfix values (loss,
learning rate, images/s), elapsed time and ETA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm.auto import tqdm

# Seconds between plain log lines: a 6-minute run logs about a dozen lines, a day-long one a few per hour.
LOG_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A bar on a terminal; ``LogLines`` when stderr is not one; nothing at all with ``disable=True`` (ranks but 0)."""
    if kw.get("disable"):
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, **kw)
    return LogLines(iterable, total=total, desc=desc, unit=unit, initial=kw.get("initial", 0))


def note(bar, message: str) -> None:
    """One line of the run's log beside ``bar`` (above a terminal's bar; nothing when the bar is disabled)."""
    if isinstance(bar, LogLines):
        print(message, file=bar.stream or sys.stdout, flush=True)
    elif not bar.disable:
        bar.write(message)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``5m12s`` or ``42s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LogLines:
    """Plain progress lines on ``stream`` (default stdout) every ``interval`` seconds, at the start and the end."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        interval: float = LOG_INTERVAL_S,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.interval, self.stream, self.clock = interval, stream, clock
        self.postfix: dict[str, str] = {}
        self.started = self.last = clock()
        self.rate_from = (self.started, initial)  # (time, count) the ETA's rate is measured from
        self.closed = False
        self._emit()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._emit()

    def rate_from_here(self) -> None:
        """Measure the rate of later lines' ETA from now: the steps so far were slow for a reason that will not
        recur (a compiled step's first call compiles it), and averaging them in would inflate the ETA for long."""
        self.rate_from = (self.clock(), self.n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit()

    def line(self) -> str:
        """The current progress line."""
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{self.desc}: {done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        elapsed = self.clock() - self.started
        parts.append(f"elapsed {format_duration(elapsed)}")
        since, counted = self.rate_from
        advanced = self.n - counted
        if self.total and 0 < advanced and self.n < self.total:
            parts.append(f"ETA {format_duration((self.clock() - since) / advanced * (self.total - self.n))}")
        return "  ".join(parts)

    def _emit(self) -> None:
        # stdout, with the run's other log lines: stderr stays for the one-line error of a failed run.
        stream = self.stream or sys.stdout
        print(self.line(), file=stream, flush=True)
