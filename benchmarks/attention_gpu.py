"""The Triton meta-attention kernel against ``F.scaled_dot_product_attention`` (flash) on a GPU.

    .venv/bin/python benchmarks/attention_gpu.py              # CUDA, bf16
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/attention_gpu.py --dry-run   # CPU, tiny shapes

Three workloads (bf16, D=128, 32 query heads, 8 KV heads), each timed side by side with CUDA
events (``triton.testing.do_bench``, median):

- mixed batch: prefill rows, decode rows and a chunked prefill in one call over a paged KV cache
  (block 16). SDPA cannot take such a batch in one call; its column is one flash call per
  sequence (is_causal for prefill, none for decode; the chunked row as SDPA with an explicit
  bottom-right mask), summed;
- uniform prefill: 8 sequences of 1024, causal; SDPA as one dense call;
- decode: 64 sequences, KV 2048 each; SDPA as one dense call over a contiguous cache.

xyserve's column is ``torch.ops.xyserve.attention_varlen`` with the Triton provider: host planning
included (decode plans come from the plan cache). ``--dry-run`` runs the same code on tiny shapes
under the interpreter to check it end to end; its times mean nothing.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from timing import Stopwatch, time_once

import xy_inductor  # noqa: F401  (registers torch.ops.xyserve.*)
from xy_inductor.kernels import aten
from xy_inductor.kernels import triton as triton_provider
from xy_inductor.runtime import providers

varlen = torch.ops.xyserve.attention_varlen.default


def paged(keys: list[torch.Tensor], values: list[torch.Tensor], block: int, device: str):
    """Sequences' keys and values [L, Hkv, D] laid into shuffled paged caches, one block table."""
    hkv, d = keys[0].shape[1:]
    counts = [math.ceil(k.shape[0] / block) for k in keys]
    order = torch.randperm(sum(counts), generator=torch.Generator().manual_seed(1)).tolist()
    k_cache = torch.zeros(sum(counts), block, hkv, d, dtype=keys[0].dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    table = torch.zeros(len(keys), max(counts), dtype=torch.int32, device=device)
    for r, (k, v) in enumerate(zip(keys, values, strict=True)):
        for j in range(counts[r]):
            b = order.pop()
            table[r, j] = b
            rows = slice(j * block, (j + 1) * block)
            k_cache[b, : k[rows].shape[0]] = k[rows]
            v_cache[b, : v[rows].shape[0]] = v[rows]
    return k_cache, v_cache, table


def timed(fn, dry: bool) -> float:
    if dry:
        return time_once(fn) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def workload(name, q_lens, kv_lens, args, dry) -> tuple[str, float, float, float]:
    hq, hkv, d, dtype, device, block = args
    gen = torch.Generator().manual_seed(0)
    qs = [torch.randn(n, hq, d, generator=gen).to(dtype).to(device) for n in q_lens]
    ks = [torch.randn(n, hkv, d, generator=gen).to(dtype).to(device) for n in kv_lens]
    vs = [torch.randn(n, hkv, d, generator=gen).to(dtype).to(device) for n in kv_lens]
    k_cache, v_cache, table = paged(ks, vs, block, device)
    q = torch.cat(qs)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    kv = torch.tensor(kv_lens, dtype=torch.int32)
    cu, kv = cu.to(device), kv.to(device)

    def ours():
        return varlen(q, k_cache, v_cache, cu, kv, table)

    def sdpa_rows():
        outs = []
        for r, (n, m) in enumerate(zip(q_lens, kv_lens, strict=True)):
            qr, kr, vr = (t.transpose(0, 1)[None] for t in (qs[r], ks[r], vs[r]))
            if n == m:
                outs.append(
                    F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)
                )
            elif n == 1:
                outs.append(F.scaled_dot_product_attention(qr, kr, vr, enable_gqa=True))
            else:  # chunked prefill: queries are the last n of m keys
                pos = torch.arange(m, device=device)
                mask = pos[None, :] <= (m - n + torch.arange(n, device=device))[:, None]
                outs.append(
                    F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, enable_gqa=True)
                )
        return outs

    with providers.use_providers([triton_provider.PROVIDER, aten.PROVIDER]):
        got = ours()
        want = torch.cat([o[0].transpose(0, 1) for o in sdpa_rows()])
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        t_ours = timed(ours, dry)
    t_sdpa = timed(sdpa_rows, dry)
    return name, t_sdpa, t_ours, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU interpreter")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --dry-run under TRITON_INTERPRET=1)")
    device = "cpu" if dry else "cuda"
    shape = (
        (8, 2, 64, torch.float32, device, 16) if dry else (32, 8, 128, torch.bfloat16, device, 16)
    )
    scale = 16 if dry else 1
    mixed_q = [512 // scale] * 4 + [1] * 60 + [256 // scale]
    mixed_kv = [512 // scale] * 4 + [2048 // scale] * 60 + [1024 // scale]
    cases = [
        ("mixed: 4 prefill + 60 decode + chunked", mixed_q, mixed_kv),
        ("uniform prefill 8 x 1024", [1024 // scale] * 8, [1024 // scale] * 8),
        ("decode 64 x KV 2048", [1] * 64, [2048 // scale] * 64),
    ]  # fmt: skip
    if dry:
        cases = [(n, q[:3], k[:3]) for n, q, k in cases]
    clock = Stopwatch()
    print(f"{'workload':<42} {'SDPA ms':>9} {'xyserve ms':>11} {'speed-up':>9}  rel err")
    rows = [workload(n, q, k, shape, dry) for n, q, k in cases]
    for name, t_sdpa, t_ours, err in rows:
        print(f"{name:<42} {t_sdpa:>9.3f} {t_ours:>11.3f} {t_sdpa / t_ours:>8.2f}x  {err:.1e}")
    device_name = "CPU interpreter (dry run)" if dry else torch.cuda.get_device_name()
    geomean = statistics.geometric_mean([r[1] / r[2] for r in rows])
    print(
        f"{shape[3]}, D={shape[2]}, {shape[0]} q heads / {shape[1]} kv heads, {device_name}, "
        f"torch {torch.__version__}; geomean {geomean:.2f}x; "
        f"{clock.seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
