"""The differential fuzzer (xy_inductor/fuzz.py): a seeded run, and every case it ever found
wrong kept as a fixed-seed regression test."""

from __future__ import annotations

import pytest
import torch

from xy_inductor.fuzz import make_case, run_case, run_fuzz

# (seed, case) of every case the fuzzer ever found wrong or crashing, with what it was. Each
# failed before its fix and must stay "ok" (or the known NaN difference).
FOUND = [
    # 3-D q/k/v with a mask over keys only ([Lk]): lowered, then SDPA inside the op raised
    # IndexError at run time (the mask now reaches the op as [1, Lk]).
    (0, 7),
    (0, 17),
    # bfloat16 q, scores cast to float32 and filled with finfo(float32).min over [B, H] views
    # of merged heads: the fill reached the op's bfloat16 mask as -inf, so a row masked
    # everywhere gave 0 instead of eager's uniform weights (error 0.2).
    (1, 593),
]


@pytest.mark.parametrize(("seed", "index"), FOUND, ids=[f"{s}-{i}" for s, i in FOUND])
def test_cases_the_fuzzer_found_stay_fixed(seed, index):
    result = run_case(make_case(seed, index))
    assert result.status in ("ok", "known"), (result.status, result.detail, result.case.source)


def test_cases_are_reproducible():
    a, b = make_case(3, 41), make_case(3, 41)
    assert a.source == b.source and a.dtype == b.dtype and a.dynamic == b.dynamic
    assert all(torch.equal(x, y) for x, y in zip(a.inputs.values(), b.inputs.values(), strict=True))
    assert make_case(3, 42).source != a.source or make_case(4, 41).source != a.source


def test_seeded_run_finds_nothing_wrong():
    summary = run_fuzz(200, seed=0)
    assert summary.cases == 200
    assert summary.wrong == 0, str(summary)
    assert summary.status["invalid"] == 0, str(summary)  # the grammar draws only valid programs
    # The run must exercise both sides: most sites lowered, and refusals with their reasons.
    lowered, total = sum(summary.lowered.values()), sum(summary.sites.values())
    assert total >= 150 and lowered / total > 0.6, str(summary)
    assert summary.lowered["attention"] > 0 and summary.lowered["linear"] > 0
    assert any("alpha" in reason for reason in summary.left_alone), str(summary)
    assert summary.failed_sites == 0, str(summary)
