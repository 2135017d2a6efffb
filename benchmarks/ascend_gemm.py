"""xyserve.gemm on an Ascend NPU against F.linear, with weights as they are and as FRACTAL_NZ.

    python benchmarks/ascend_gemm.py              # on an NPU with torch_npu, bf16
    python benchmarks/ascend_gemm.py --dry-run    # a few shapes on the CPU stand-in

Per (Llama-2-7B / Qwen2.5-7B linear shape, M), side by side in one process, median of rounds:
``xyserve.gemm`` through the Ascend provider (aclnn's matmul on the weight as it is), plain
``F.linear`` on the same weight (what the op costs on top), and ``F.linear`` on the weight cast
to FRACTAL_NZ (the ``ascend_nz_weights`` option; aclnn's WeightNz kernels, vllm-ascend's
choice). On a machine without an NPU it refuses; ``--dry-run`` checks the script on CPU
tensors through ``tests/torch_npu_standin.py``, and its times mean nothing.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from ascend_attention import _load_torch_npu, median_ms
from gemm import MS, SHAPES
from timing import Stopwatch

FRACTAL_NZ = 29


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="a few shapes, CPU stand-in")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    npu = _load_torch_npu(args.dry_run)
    from xy_inductor.kernels import ascend, aten
    from xy_inductor.runtime import providers

    device, dtype = ("cpu", torch.float16) if args.dry_run else ("npu", torch.bfloat16)
    shapes = SHAPES[:1] if args.dry_run else SHAPES
    ms = [1, 17] if args.dry_run else MS
    reps = 1 if args.dry_run else 20
    gen = torch.Generator().manual_seed(0)
    clock = Stopwatch()
    head = f"{'model':<11} {'layer':<8} {'K->N':>12} {'M':>5}"
    print(f"{head} {'xy ms':>8} {'ND ms':>8} {'NZ ms':>8}")
    ratios = []
    with providers.use_providers([ascend.PROVIDER, aten.PROVIDER]):
        for model, layer, k, n in shapes:
            w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
            w_nz = npu.npu_format_cast(w, FRACTAL_NZ)
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(dtype).to(device)
                ours, nd, nz = median_ms(
                    [
                        lambda x=x, w=w: torch.ops.xyserve.gemm(x, w, None),
                        lambda x=x, w=w: F.linear(x, w),
                        lambda x=x, w=w_nz: F.linear(x, w),
                    ],
                    args.rounds,
                    device,
                    reps,
                )
                ratios.append(nd / ours)
                print(
                    f"{model:<11} {layer:<8} {f'{k}->{n}':>12} {m:>5} {ours:>8.3f} {nd:>8.3f} "
                    f"{nz:>8.3f}"
                )
    where = "CPU stand-in (dry run: times mean nothing)" if args.dry_run else "NPU"
    print(
        f"{dtype}, {where}, torch {torch.__version__}; geomean F.linear / xyserve "
        f"{statistics.geometric_mean(ratios):.3f}; median of {args.rounds} rounds; "
        f"{clock.seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
