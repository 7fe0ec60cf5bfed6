"""What a person sees on the console: one line per stage, progress with time left, metric lines.

Stage and metric lines go to stdout. Progress goes to stderr: a tqdm bar on a terminal; elsewhere
(CI logs, pipes, pytest) a plain line at most every ``PLAIN_EVERY_S`` seconds and one at the end,
so a log holds a few readable lines instead of carriage-return noise. Whether Ray's own chatter is
shown is one switch, ``set_verbose`` (``--verbose`` in every pipeline); it travels to Ray's worker
processes as ``CTAL_VERBOSE`` (they inherit the environment of the ``ray.init`` that started them),
and ``ctal.distributed.console`` applies it to Ray. No Ray import here.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

from .redact import redact

VERBOSE_ENV = "CTAL_VERBOSE"
PLAIN_EVERY_S = 30.0

T = TypeVar("T")


def set_verbose(on: bool) -> None:
    """Show (True) or hide (False, the default) Ray's internal logs; call before Ray starts."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def stage(name: str, what: str) -> None:
    """The one line that says what a stage does: ``[pretrain] 2 workers, 40 steps of ...``."""
    print(redact(f"[{name}] {what}"), flush=True)  # it names URIs: never their credentials


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``n`` of ``total`` units done, with the time left; a context manager.

    ``initial``: units already done before this process started (a resumed run). The time left
    comes from the rate since the first update, so start-up time does not skew it. ``write(line)`` prints a line (a metric, a note) without breaking the bar.
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._initial, self._t0 = initial, time.monotonic()
        self._last_plain, self._printed_n = self._t0, initial
        self._first: Optional[tuple[float, int]] = None  # (time, count) of the first update
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                             dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self.set(self.n + n)

    def set(self, n: int) -> None:
        """Move to ``n`` units done (never backwards)."""
        if n <= self.n:
            return
        if self._first is None:  # start-up (a process pool, a Ray worker group) is not the rate
            self._first = time.monotonic(), n
        if self._bar is not None:
            self._bar.update(n - self.n)
        self.n = n
        if self._bar is None and time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._plain()

    def write(self, line: str) -> None:
        line = redact(line)
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def line(self) -> str:
        """``[desc] 20/40 steps (50%), 0:12 elapsed, ~0:12 left`` (what the plain mode prints)."""
        elapsed = time.monotonic() - self._t0
        text = f"[{self.desc}] {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {_clock(elapsed)} elapsed"
        if self.total and self._first and self._first[1] < self.n < self.total:
            t_first, n_first = self._first
            rate = (time.monotonic() - t_first) / (self.n - n_first)
            text += f", ~{_clock(rate * (self.total - self.n))} left"
        return text

    def _plain(self) -> None:
        self._last_plain, self._printed_n = time.monotonic(), self.n
        print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.n > self._printed_n:  # the last count, unless a line just said it
            self._plain()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items: Iterable[T], total: Optional[int], desc: str, unit: str = "it") -> Iterator[T]:
    """``items``, counted on a ``Progress`` as they come."""
    with Progress(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()


def error_line(prog: str, error: BaseException) -> str:
    """A recipe's one error line (``p.exit(2, error_line(p.prog, e))``), credentials redacted: an
    error may quote a URI as it was given."""
    return redact(f"{prog}: error: {error}\n")


SHARE_HELP = "checkpoints without absolute paths or the host name, to hand on (= share=true; docs/tracking.md)"
VERBOSE_HELP = "also show Ray's own logs (worker output, progress bars, Tune's tables)"
