"""Virtual time for tests: a clock that moves only when a test moves it."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from ..config import duration_seconds

if TYPE_CHECKING:
    from .env import SagaEnv

# 2026-01-01T00:00:00Z: a fixed start, so that timelines are the same on every run.
EPOCH = 1_767_225_600.0


def parse_duration(value: float | int | str | timedelta) -> float:
    """Seconds in `value`: a number of seconds, a timedelta, or text such as
    "90s", "1h", "1d", "2h30m", "250ms" (config's duration grammar, with a unit)."""
    if isinstance(value, bool):
        raise TypeError("a duration is a number of seconds, a timedelta or text like '1h'")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text_seconds = duration_seconds(value, unit_needed=True)
        if text_seconds is None:
            raise ValueError(
                f"not a duration: {value!r} (use e.g. '90s', '1h', '2h30m', '1d', '250ms')"
            )
        seconds = text_seconds
    else:
        raise TypeError(f"not a duration: {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds


class VirtualClock:
    """The time every decision of a test environment sees; it never moves by itself.

    `advance("1h")` moves it and, through its environment, fires what falls due on
    the way (retry backoffs, expired leases, redispatches, saga deadlines).
    """

    def __init__(self, start: float = EPOCH):
        self._now = float(start)
        self.start = float(start)
        self.env: SagaEnv | None = None

    def __call__(self) -> float:
        return self._now

    def now(self) -> float:
        return self._now

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock started."""
        return self._now - self.start

    def move_to(self, moment: float) -> None:
        """Set the time without firing anything (it never goes backwards)."""
        self._now = max(self._now, float(moment))

    def advance(self, duration: float | int | str | timedelta, *, run: bool = True) -> None:
        """Move time forward by `duration`, firing what falls due on the way.

        With `run` (default), the messages that fire are also delivered and run, as
        busy workers would; with `run=False` they wait for `step()` or `run_until_done()`.
        """
        seconds = parse_duration(duration)
        if self.env is None:
            self._now += seconds
            return
        self.env.advance(seconds, run=run)

    def __repr__(self) -> str:
        return f"<VirtualClock +{self.elapsed:g}s>"
