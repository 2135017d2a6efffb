"""What horizontal fusion of sibling GEMMs buys on this machine's ATen provider.

For q/k/v and gate/up shapes of the tiny Llama (K=512) and of a 2048-wide model, decode
(M = 1, 2, 4, 8) and prefill (M = 512): the sibling GEMMs one by one (F.linear each) against one
F.linear on weights already in one buffer (what xyserve.gemm_fused runs), side by side in one
process. Several layers' worth of weights, so that decode reads them from memory, not cache.

    .venv/bin/python benchmarks/fusion.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timing import measure

SHAPES = [
    ("tiny q/k/v", 512, (512, 256, 256), 8),
    ("tiny gate/up", 512, (1408, 1408), 8),
    ("2k q/k/v", 2048, (2048, 512, 512), 2),
    ("2k gate/up", 2048, (5632, 5632), 2),
]


def median_us(fn, repeats: int = 30) -> float:
    return measure(fn, warmup=3, repeats=repeats).us


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per layer")
    print(f"{'shapes':<14} {'M':>5} {'separate':>10} {'fused':>10} {'fused/separate':>15}")
    with torch.no_grad():
        for name, k, ns, layers in SHAPES:
            separate = [[torch.randn(n, k) for n in ns] for _ in range(layers)]
            fused = [torch.cat(ws) for ws in separate]
            for m in (1, 2, 4, 8, 512):
                x = torch.randn(m, k)
                a = median_us(lambda x=x, s=separate: [F.linear(x, w) for ws in s for w in ws])
                b = median_us(lambda x=x, f=fused, n=ns: [F.linear(x, w).split(n, -1) for w in f])
                print(f"{name:<14} {m:>5} {a / layers:>10.1f} {b / layers:>10.1f} {b / a:>15.2f}")


if __name__ == "__main__":
    main()
