"""Progress for long work: a tqdm bar on a terminal, periodic plain lines in logs.

tqdm redraws its bar with carriage returns; written to a file or a CI log that becomes one
unreadable line of frames. When the stream is not a terminal, ``progress`` reports instead
one plain line every 10% of the total or every 30 seconds, whichever comes first (never two
within a second), and a last line with the elapsed time when the work ends. Every long loop in
weightsmith (merge, fine-tune, evaluation, testbed stages) reports through this one helper.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

LINE_EVERY_FRACTION = 0.10
LINE_EVERY_SECONDS = 30.0
LINE_AT_MOST_EVERY_SECONDS = 1.0  # work that ends within a second gets its final line only


class Progress(Protocol):
    """The part of tqdm's interface weightsmith uses."""

    def update(self, n: float = 1) -> Any: ...

    def set_postfix(self, refresh: bool = ..., **values: Any) -> Any: ...

    def close(self) -> Any: ...


class NoProgress:
    """Progress switched off (``--quiet``, or a caller that reports on its own)."""

    def update(self, n: float = 1) -> None:
        return None

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        return None

    def close(self) -> None:
        return None


def _number(value: float) -> str:
    return f"{int(value)}" if float(value).is_integer() else f"{value:.1f}"


def _amount(value: float, unit: str) -> str:
    """Big counts with an SI prefix: 1.2 GB, not 1234567890 B."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            return f"{value:.0f} {prefix}{unit}" if prefix == "" else f"{value:.1f} {prefix}{unit}"
        value /= 1000
    return f"{value:.1f} T{unit}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s"


class LineProgress:
    """Plain-line progress for logs: ``desc: 40% (480/1200 steps), 1 min 05 s, ~1 min 38 s left``."""

    def __init__(
        self,
        total: float,
        desc: str,
        unit: str,
        stream: TextIO,
        unit_scale: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.unit_scale = unit_scale
        self.clock = clock
        self.done = 0.0
        self.postfix = ""
        self.started = self.last_line_at = clock()
        self.last_fraction = 0.0
        self.closed = False
        self._lock = threading.Lock()  # the merge executor reports from worker threads

    def update(self, n: float = 1) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            fraction = self.done / self.total if self.total else 0.0
            next_step = (int(self.last_fraction / LINE_EVERY_FRACTION + 1e-9) + 1) * LINE_EVERY_FRACTION
            if fraction >= 1.0 or now - self.last_line_at < LINE_AT_MOST_EVERY_SECONDS:
                return  # close() prints the final line, with the total time
            if fraction + 1e-9 >= next_step or now - self.last_line_at >= LINE_EVERY_SECONDS:
                self._line(now, fraction)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            now = self.clock()
            fraction = self.done / self.total if self.total else 1.0
            self._line(now, fraction, final=True)

    def _line(self, now: float, fraction: float, final: bool = False) -> None:
        elapsed = now - self.started
        if self.unit_scale:
            counts = f"{_amount(self.done, self.unit)} of {_amount(self.total, self.unit)}"
        else:  # 20 of 200 steps
            counts = f"{_number(self.done)} of {_number(self.total)} {self.unit}s"
        text = f"{self.desc}: {fraction:.0%} ({counts}), {_duration(elapsed)}"
        if final:
            text += " in all"
        elif 0 < fraction < 1:
            text += f", ~{_duration(elapsed / fraction * (1 - fraction))} left"
        if self.postfix:
            text += f"; {self.postfix}"
        print(text, file=self.stream, flush=True)
        self.last_line_at = now
        self.last_fraction = fraction


def progress(
    total: float,
    desc: str,
    unit: str = "it",
    *,
    enabled: bool = True,
    unit_scale: bool = False,
    leave: bool = True,
    stream: TextIO | None = None,
) -> Progress:
    """A progress reporter for ``total`` units of work, written to ``stream`` (stderr).

    A terminal gets a tqdm bar (``leave``: keep it on screen when done); anything else (a
    file, a pipe, a CI log) gets ``LineProgress``. ``enabled=False`` gives a reporter that
    reports nothing, so callers need no ``if`` around each update.
    """
    out = stream if stream is not None else sys.stderr
    if not enabled:
        return NoProgress()
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit_scale,
            unit_divisor=1000,
            smoothing=0.1,
            leave=leave,
            file=out,
        )
    return LineProgress(total, desc, unit, out, unit_scale=unit_scale)
