"""The xyserve console script, end to end on a short workload."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SCRIPT = str(pathlib.Path(sys.executable).with_name("xyserve"))


def test_demo_runs_and_reports_identical_tokens():
    # The demo exits 1 if tokens differ from eager or the second pass recompiles.
    out = subprocess.run(
        [SCRIPT, "demo", "--calls", "3", "--rounds", "1", "--prefill-rounds", "1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("xyserve")]
    # Prefills run packed (one graph), decode steps another: two graphs with either cache.
    assert [(r[1], r[2], r[3], r[-1]) for r in rows] == [
        ("dynamic", "2", "0", "yes"),
        ("static", "2", "0", "yes"),
    ]
    assert "TTFT ms" in out.stdout.splitlines()[1]
    # The padded-prefill columns (TTFT ms, x eager) are filled on the first cache's row only.
    assert len(rows[0]) == len(rows[1]) + 2 and float(rows[0][-3]) > 0


def test_explain_prints_every_site_lowered():
    out = subprocess.run(
        [SCRIPT, "explain", "--layers", "1"], capture_output=True, text=True, check=True
    )
    assert "attention       1        1" in out.stdout
    assert "linear          8        8" in out.stdout
    assert "lm_head" in out.stdout


def test_bad_arguments_are_rejected():
    out = subprocess.run([SCRIPT, "demo", "--rounds", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "--rounds must be at least 1" in out.stderr


def test_plan_prints_the_buckets_and_rejects_bad_sizes():
    out = subprocess.run(
        [SCRIPT, "plan", "4096", "4096", "--max-tokens", "512"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "N=4096 K=4096 bfloat16, M 1..512" in out.stdout
    assert "m16n64k128" in out.stdout
    bad = subprocess.run([SCRIPT, "plan", "0", "4096"], capture_output=True, text=True)
    assert bad.returncode == 2 and "n must be a positive int" in bad.stderr


def test_providers_lists_what_runs_here_and_why_not_the_rest():
    out = subprocess.run([SCRIPT, "providers"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["ascend", "triton", "cpu", "aten"]
    assert "unavailable: torch_npu is not installed" in lines[0]
    assert lines[3].split() == ["aten", "available"]
    if "unavailable" in lines[1]:
        assert "no CUDA device" in lines[1] or "not installed" in lines[1]
    assert lines[-2].startswith("xyserve ops try, in order:") and lines[-2].endswith("aten")
    assert lines[-1].startswith("C++ CPU kernels (gemm, attention): no: not loaded yet")


def test_providers_build_loads_the_cpp_kernels():
    out = subprocess.run(
        [SCRIPT, "providers", "--build"], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[-1] == "C++ CPU kernels (gemm, attention): loaded"
