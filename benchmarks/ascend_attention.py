"""Meta-attention on an Ascend NPU: xyserve's Ascend provider against FIA called per stage.

    python benchmarks/ascend_attention.py              # on an NPU with torch_npu (bf16, D=128)
    python benchmarks/ascend_attention.py --dry-run    # tiny shapes on the CPU stand-in

XY-Serve's baselines on Ascend are the vendor's fused attention operators (FIA, and PFA/IFA
behind it). Per workload, side by side in one process, median of rounds:

- ``xyserve``: ``torch.ops.xyserve.attention_varlen`` through the Ascend provider: one
  ``npu_fused_infer_attention_score`` call in TND over the whole mixed batch (paged cache,
  block 128), the way vllm-ascend serves a step;
- ``FIA direct``: that same FIA call without the op (what the op's checks and planning cost);
- ``FIA per stage``: prefill-like rows (more than one query) in one FIA call and decode rows
  in another, the split serving stacks made before mixed batches ran as one.

Workloads: a mixed batch (4 prefills, 60 decodes, a chunked prefill), prefix-cached prefill,
speculative verify (5 queries per row), decode only. On a machine without an NPU it refuses;
``--dry-run`` runs the same code on CPU tensors through ``tests/torch_npu_standin.py`` to check
the script, and its times mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from timing import Stopwatch, interleaved

H_Q, H_KV, D, BLOCK = 32, 8, 128, 128


def _load_torch_npu(dry: bool):
    if dry:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import torch_npu_standin

        sys.modules["torch_npu"] = torch_npu_standin
        os.environ["XYSERVE_ASCEND_ON_CPU"] = "1"
        return torch_npu_standin
    try:
        import torch_npu
    except Exception as e:  # no CANN: anything can be raised
        raise SystemExit(f"needs torch_npu and an Ascend NPU ({type(e).__name__}: {e})") from e
    if not torch.npu.is_available():
        raise SystemExit("needs an Ascend NPU: torch.npu.is_available() is False")
    return torch_npu


def median_ms(fns, rounds: int, device: str, reps: int) -> list[float]:
    """Median ms per call of each fn, interleaved, ``reps`` calls a sample, after one warm-up
    call each; on the NPU the device is synchronised around each sample."""
    sync = torch.npu.synchronize if device == "npu" else None
    return [t.ms for t in interleaved(fns, rounds=rounds, warmup=1, reps=reps, sync=sync)]


def paged(kv_lens, device, dtype, gen):
    """A shuffled paged cache [blocks, BLOCK, H_KV, D] and its block table."""
    per_row = [-(-n // BLOCK) for n in kv_lens]
    blocks = sum(per_row)
    k = torch.randn(blocks, BLOCK, H_KV, D, generator=gen).to(dtype).to(device)
    v = torch.randn(blocks, BLOCK, H_KV, D, generator=gen).to(dtype).to(device)
    order = torch.randperm(blocks, generator=gen)
    table = torch.zeros(len(kv_lens), max(per_row), dtype=torch.int32)
    used = 0
    for r, n in enumerate(per_row):
        table[r, :n] = order[used : used + n].int()
        used += n
    return k, v, table.to(device)


def workload(name, q_lens, kv_lens, npu, device, dtype, rounds, reps):
    from xy_inductor.kernels import ascend, aten
    from xy_inductor.runtime import providers

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(q_lens), H_Q, D, generator=gen).to(dtype).to(device)
    k, v, table = paged(kv_lens, device, dtype, gen)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    kv = torch.tensor(kv_lens, dtype=torch.int32)
    cu, kv = cu.to(device), kv.to(device)
    mask = ascend.compressed_mask(q.device)
    nb = k.shape[0]

    def fia(rows: list[int]):
        lens_q = [q_lens[r] for r in rows]
        start = [sum(q_lens[:r]) for r in rows]
        qs = torch.cat([q[s : s + n] for s, n in zip(start, lens_q, strict=True)])
        return npu.npu_fused_infer_attention_score(
            qs, k.view(nb, BLOCK, -1), v.view(nb, BLOCK, -1), atten_mask=mask,
            actual_seq_lengths=torch.tensor(lens_q).cumsum(0).tolist(),
            actual_seq_lengths_kv=[kv_lens[r] for r in rows], block_table=table[rows],
            block_size=BLOCK, num_heads=H_Q, num_key_value_heads=H_KV, scale=D**-0.5,
            input_layout="TND", sparse_mode=3,
        )[0]  # fmt: skip

    everyone = list(range(len(q_lens)))
    prefill = [r for r in everyone if q_lens[r] > 1]
    decode = [r for r in everyone if q_lens[r] == 1]

    def per_stage():
        return [fia(rows) for rows in (prefill, decode) if rows]

    with providers.use_providers([ascend.PROVIDER, aten.PROVIDER]):

        def ours():
            return torch.ops.xyserve.attention_varlen(q, k, v, cu, kv, table)

        got = ours()
        err = (got.float() - fia(everyone).float()).abs().max().item()
        t_ours, t_direct, t_stage = median_ms(
            [ours, lambda: fia(everyone), per_stage], rounds, device, reps
        )
    return name, t_ours, t_direct, t_stage, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU stand-in")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    npu = _load_torch_npu(args.dry_run)
    device, dtype = ("cpu", torch.float16) if args.dry_run else ("npu", torch.bfloat16)
    scale = 16 if args.dry_run else 1
    cases = [
        ("mixed: 4 prefill + 60 decode + chunked",
         [512 // scale] * 4 + [1] * 60 + [256 // scale],
         [512 // scale] * 4 + [2048 // scale] * 60 + [1024 // scale]),
        ("prefix-cached prefill 8 x (256 new of 2048)", [256 // scale] * 8, [2048 // scale] * 8),
        ("verify 32 x 5 over 1024", [5] * 32, [1024 // scale] * 32),
        ("decode 64 x KV 2048", [1] * 64, [2048 // scale] * 64),
    ]  # fmt: skip
    if args.dry_run:
        cases = [(n, q[:3], k[:3]) for n, q, k in cases]
    clock = Stopwatch()
    reps = 1 if args.dry_run else 20
    rows = [workload(*c, npu, device, dtype, args.rounds, reps) for c in cases]
    print(f"{'workload':<46} {'xyserve ms':>10} {'FIA ms':>8} {'per stage':>10}  max diff")
    for name, ours, direct, stage, err in rows:
        print(f"{name:<46} {ours:>10.3f} {direct:>8.3f} {stage:>10.3f}  {err:.1e}")
    where = "CPU stand-in (dry run: times mean nothing)" if args.dry_run else "NPU"
    print(
        f"{dtype}, D={D}, {H_Q} q heads / {H_KV} kv heads, block {BLOCK}, {where}, torch "
        f"{torch.__version__}; median of {args.rounds} rounds; "
        f"{clock.seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
