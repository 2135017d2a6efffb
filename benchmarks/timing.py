"""The benchmarks' one timer: warm-up, repeats, median and spread, and callables measured side by
side in one process.

- ``Stopwatch``: wall seconds of a block (``with Stopwatch() as sw: ...; sw.seconds``) or since
  it was made (``sw.seconds`` while running), with an optional device sync at both ends.
- ``measure(fn, warmup=, repeats=, reps=)``: one callable; each of ``repeats`` samples times
  ``reps`` calls in a row and keeps seconds per call.
- ``interleaved(fns, rounds=, reps=)`` and ``paired(a, b, ...)``: several callables side by
  side: every round times each in turn, so that a machine's drift (other work, clocks,
  caches) falls on all of them alike; one sample per callable per round.
- ``reps_for(fns, sample_s)``: how many calls in a row fill about ``sample_s`` seconds (short
  calls are too noisy one at a time); ``warm_up(fns)``: untimed calls.

A ``Timing`` keeps the samples (seconds per call) and gives their median, minimum and spread.
``sync`` is a function called before and after each sample (``torch.cuda.synchronize``,
``torch.npu.synchronize``): a device's work is asynchronous to the host's clock. ``sampler``
replaces the host timer for one sample (e.g. Triton's ``do_bench``, which times with device
events).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Sync = Callable[[], Any] | None
Sampler = Callable[[Callable[[], object]], float]  # fn -> seconds per call


@dataclass(frozen=True)
class Timing:
    """Samples of one callable, each in seconds per call."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(self.samples))  # any sequence of seconds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the samples are, relative to the median."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    @property
    def ms(self) -> float:
        """The median in milliseconds."""
        return self.median * 1e3

    @property
    def us(self) -> float:
        """The median in microseconds."""
        return self.median * 1e6

    def __str__(self) -> str:
        return f"{self.ms:.3f} ms (median of {len(self.samples)}, spread {self.spread:.0%})"


class Stopwatch:
    """Wall seconds from creation (or ``start()``) to ``stop()`` or the end of its ``with`` block
    (or to now, while running)."""

    def __init__(self, sync: Sync = None) -> None:
        self.sync = sync
        self.start()

    def start(self) -> Stopwatch:
        if self.sync is not None:
            self.sync()
        self._stop: float | None = None
        self._start = time.perf_counter()
        return self

    def stop(self) -> float:
        if self.sync is not None:
            self.sync()
        self._stop = time.perf_counter()
        return self.seconds

    @property
    def seconds(self) -> float:
        end = time.perf_counter() if self._stop is None else self._stop
        return end - self._start

    def __enter__(self) -> Stopwatch:
        return self  # running since it was made: ``with Stopwatch() as sw:`` times the block

    def __exit__(self, *exc: object) -> None:
        self.stop()


def warm_up(fns: Sequence[Callable[[], object]], times: int = 1) -> None:
    """Call each fn ``times`` times, untimed (compiles, caches, lazy loading)."""
    for fn in fns:
        for _ in range(times):
            fn()


def time_once(fn: Callable[[], object], reps: int = 1, sync: Sync = None) -> float:
    """Seconds per call of ``fn`` called ``reps`` times in a row."""
    with Stopwatch(sync) as sw:
        for _ in range(reps):
            fn()
    return sw.seconds / reps


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    reps: int = 1,
    sync: Sync = None,
    sampler: Sampler | None = None,
) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` samples of ``reps`` calls each."""
    (timing,) = interleaved(
        [fn], rounds=repeats, warmup=warmup, reps=reps, sync=sync, sampler=sampler
    )
    return timing


def interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    reps: int = 1,
    sync: Sync = None,
    sampler: Sampler | None = None,
) -> list[Timing]:
    """Side by side in one process: ``warmup`` untimed calls of each, then ``rounds`` rounds, each
    timing every fn in turn (``reps`` calls in a row, or one ``sampler`` call)."""
    warm_up(fns, warmup)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            samples[i].append(sampler(fn) if sampler else time_once(fn, reps, sync))
    return [Timing(tuple(s)) for s in samples]


def paired(
    a: Callable[[], object], b: Callable[[], object], **options: Any
) -> tuple[Timing, Timing]:
    """Two callables side by side (``interleaved``'s options)."""
    ta, tb = interleaved([a, b], **options)
    return ta, tb


def reps_for(
    fns: Sequence[Callable[[], object]],
    sample_s: float,
    *,
    max_reps: int | None = None,
    sync: Sync = None,
) -> int:
    """Calls in a row that fill about ``sample_s`` seconds, from one timed call of each fn (its
    mean): at least 1, at most ``max_reps``."""
    one = max(statistics.fmean(time_once(fn, 1, sync) for fn in fns), 1e-6)
    reps = max(1, int(sample_s / one))
    return reps if max_reps is None else min(max_reps, reps)
