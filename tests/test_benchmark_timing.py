"""The benchmarks' timer (benchmarks/timing.py): what it calls, in which order, what it keeps."""

from __future__ import annotations

import pytest

from benchmarks.timing import (
    Stopwatch,
    Timing,
    interleaved,
    measure,
    paired,
    reps_for,
    time_once,
    warm_up,
)


def test_timing_keeps_the_samples_and_gives_median_min_and_spread():
    t = Timing([0.003, 0.001, 0.002])
    assert t.samples == (0.003, 0.001, 0.002)
    assert (t.median, t.min, t.max) == (0.002, 0.001, 0.003)
    assert t.spread == pytest.approx(1.0)
    assert t.ms == pytest.approx(2.0) and t.us == pytest.approx(2000.0)
    assert "2.000 ms" in str(t)


def test_interleaved_warms_up_then_times_every_fn_in_turn_each_round():
    log = []
    fns = [lambda: log.append("a"), lambda: log.append("b")]
    timings = interleaved(fns, rounds=3, warmup=2, reps=2)
    assert log == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3
    assert [len(t.samples) for t in timings] == [3, 3]
    assert all(s >= 0 for t in timings for s in t.samples)


def test_a_sampler_replaces_the_host_clock():
    seen = []

    def sampler(fn):
        seen.append(fn)
        return 0.5

    a, b = paired(lambda: 1, lambda: 2, rounds=2, warmup=0, sampler=sampler)
    assert len(seen) == 4 and seen[0] is not seen[1] and seen[0] is seen[2]
    assert a.samples == b.samples == (0.5, 0.5)


def test_measure_and_warm_up_count_their_calls():
    calls = []
    t = measure(lambda: calls.append(1), warmup=3, repeats=4, reps=5)
    assert len(calls) == 3 + 4 * 5 and len(t.samples) == 4
    warm_up([lambda: calls.append(2)], times=2)
    assert calls[-2:] == [2, 2]


def test_stopwatch_syncs_at_both_ends_and_reads_while_running():
    syncs = []
    with Stopwatch(sync=lambda: syncs.append(1)) as sw:
        running = sw.seconds
    assert len(syncs) == 2 and sw.seconds >= running >= 0
    assert time_once(lambda: None, reps=10) >= 0


def test_reps_fill_the_sample_and_respect_the_cap():
    assert reps_for([lambda: None], 10.0, max_reps=7) == 7
    assert reps_for([lambda: None], 0.0) == 1
