"""One attention forward step of xyserve's vLLM backend (``CUSTOM``) against vLLM's own CPU
backend (``CPU_ATTN``) on vLLM's attention-backend batch specs (issue 24's first target).

    .venv-vllm/bin/python benchmarks/attention_specs.py [--quick] [--specs a,b] \
        [--dtypes fp32,bf16] [--threads N] [--head-size D] [--json PATH]

Shapes: Llama-3-8B attention at TP=4 (8 query heads, 2 KV heads, head size 128), KV blocks of
128. Specs: the decoder rows of the ``BATCH_SPECS`` table of vLLM's
``tests/v1/attention/test_attention_backends.py`` (per row: KV length, new query tokens; the
rest of a row is cached context).

Per spec and dtype, both backends come from vLLM's registry (``AttentionBackendEnum``, with the
general plugins loaded, so ``CUSTOM`` is xyserve's) and get the same Q/K/V:

- each backend's metadata builder builds the step once from one ``CommonAttentionMetadata``
  (random block table, as vLLM's tests do), as vLLM builds it once per step for all layers;
- each writes the rows' K/V into its own cache, in its own layout, through its own write path
  (CPU_ATTN: ``do_kv_cache_update``, i.e. ``cpu_attn_reshape_and_cache``; xyserve:
  ``SlotWrites``), outside the timing: the context first, then the step's new tokens;
- the timed call is the impl's ``forward`` of the step (xyserve gets ``key=value=None``, so it
  does not write again), side by side in one process, alternating, median
  (``benchmarks/timing.py``). One call is one layer's forward: xyserve's first call of a step
  picks its provider and plan, later calls (layers) reuse them, so warm-up pays it;
- each output is compared with a float64 attention of the same Q/K/V (causal, GQA);
- each builder's ``build`` of the step is timed too, alternating, apart from the forward
  (xyserve's plan is made by the step's first forward, not by ``build``).

``--threads N`` sets ``torch.set_num_threads`` (CPU_ATTN's OpenMP kernels follow it); on a
machine shared with other work, fewer threads than cores keeps OpenMP barriers from waiting
on a descheduled thread.

The ratio is CPU_ATTN's time over xyserve's (> 1: xyserve faster); geomean per dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from timing import interleaved, reps_for

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 8, 2, 128, 128  # HEAD_SIZE: the default of --head-size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (seq_lens, query_lens): the decoder rows of vLLM's BATCH_SPECS (tests/v1/attention/
# test_attention_backends.py); the encoder-only rows are left out (no causal cache). Three more
# of our own: a sliding window over mixed_medium, prefills with no cached context, and the
# verify rows of speculative decoding (1 + 3 drafts per request).
SPECS: dict[str, tuple[list[int], list[int]]] = {
    "small_decode": ([32, 40], [1, 1]),
    "small_prefill": ([32, 40], [8, 8]),
    "mixed_small": ([32, 40, 48, 56], [1, 1, 5, 5]),
    "medium_decode": ([128, 256, 512, 1024, 128, 256, 512, 1024], [1] * 8),
    "medium_prefill": ([256, 512, 1024, 2048], [16] * 4),
    "mixed_medium": ([512, 1024, 2048, 512, 1024, 2048], [1, 1, 1, 7, 7, 7]),
    "large_decode": ([2048] * 32, [1] * 32),
    "large_prefill": ([4096] * 8, [32] * 8),
    "mixed_large": ([1024, 2048, 4096, 1024, 2048, 4096], [1, 1, 1, 32, 32, 32]),
    "single_decode": ([1024], [1]),
    "single_prefill": ([1024], [64]),
    "window_medium": ([512, 1024, 2048, 512, 1024, 2048], [1, 1, 1, 7, 7, 7]),
    "prefill_no_context": ([128, 256, 512], [128, 256, 512]),
    "verify_medium": ([256, 512, 1024, 2048] * 4, [4] * 16),
}
BEYOND_TARGET = ("verify_medium",)
"""Specs added after issue 24 set its geomean target over the others."""
WINDOWS = {"window_medium": 256}
"""Specs run with a sliding window (a query at p sees the keys after p - window)."""
BANDWIDTH_SPEC = "large_decode"
"""The spec whose K/V read rate is compared with a plain copy of the same bytes."""
QUICK_SPECS = ["small_decode", "mixed_small", "single_prefill"]


@dataclass
class Row:
    spec: str
    dtype: str
    tokens: int
    kv_tokens: int
    xyserve_ms: float
    cpu_attn_ms: float
    ratio: float  # CPU_ATTN time / xyserve time
    xyserve_err: float
    cpu_attn_err: float
    xyserve_spread: float
    cpu_attn_spread: float
    xyserve_build_ms: float  # the metadata builder's build of the step (once per step)
    cpu_attn_build_ms: float
    cpu_attn_isa: str
    kv_bytes: int = 0  # K/V bytes the step must read (every row's keys and values)
    copy_ms: float = 0.0  # a plain copy of kv_bytes (BANDWIDTH_SPEC only)


def _config(dtype: torch.dtype) -> Any:
    """The little of a ``VllmConfig`` the two builders read (a real one needs a model)."""
    return SimpleNamespace(
        model_config=SimpleNamespace(
            dtype=dtype, get_num_attention_heads=lambda parallel_config=None: HEADS
        ),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=BLOCK),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        compilation_config=SimpleNamespace(static_forward_context={}),
        speculative_config=None,
    )


def _layer() -> Any:
    """The attributes of an ``Attention`` layer the impls read (unit KV scales)."""
    return SimpleNamespace(
        _q_scale_float=1.0, _k_scale_float=1.0, _v_scale_float=1.0, _prob_scale_float=1.0
    )


@dataclass
class Step:
    """One step's inputs: Q of the new tokens, K/V of every row's tokens, vLLM's metadata."""

    query: torch.Tensor  # [tokens, H, D]
    keys: list[torch.Tensor]  # per row [seq_len, Hkv, D]
    values: list[torch.Tensor]
    common: Any  # CommonAttentionMetadata
    context_slots: torch.Tensor  # slots of the rows' cached tokens
    context_key: torch.Tensor  # [context tokens, Hkv, D]
    context_value: torch.Tensor
    new_key: torch.Tensor  # [tokens, Hkv, D]
    new_value: torch.Tensor
    num_blocks: int
    window: int | None

    @property
    def head_size(self) -> int:
        return self.query.shape[-1]


def make_step(
    seq_lens: list[int],
    query_lens: list[int],
    dtype: torch.dtype,
    seed: int,
    window: int | None,
    head_size: int = HEAD_SIZE,
) -> Step:
    from vllm.v1.attention.backend import CommonAttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    rows = len(seq_lens)
    blocks_per_row = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = sum(blocks_per_row) + 1  # block 0 never used, as in vLLM (its null block)
    width = max(blocks_per_row)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32)
    table = torch.zeros(rows, width, dtype=torch.int32)
    keys, values, ctx_slots, new_slots = [], [], [], []
    parts: dict[str, list[torch.Tensor]] = {"ck": [], "cv": [], "nk": [], "nv": []}
    start = 0
    for i, (s, q) in enumerate(zip(seq_lens, query_lens, strict=True)):
        table[i, : blocks_per_row[i]] = perm[start : start + blocks_per_row[i]]
        start += blocks_per_row[i]
        keys.append(torch.randn(s, KV_HEADS, head_size, generator=gen).to(dtype))
        values.append(torch.randn(s, KV_HEADS, head_size, generator=gen).to(dtype))
        pos = torch.arange(s)
        slots = table[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
        ctx_slots.append(slots[: s - q])
        new_slots.append(slots[s - q :])
        parts["ck"].append(keys[-1][: s - q])
        parts["cv"].append(values[-1][: s - q])
        parts["nk"].append(keys[-1][s - q :])
        parts["nv"].append(values[-1][s - q :])
    q_lens = torch.tensor(query_lens, dtype=torch.int32)
    qsl = torch.zeros(rows + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    tokens = int(qsl[-1])
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.clone(),
        seq_lens=seq,
        num_reqs=rows,
        num_actual_tokens=tokens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=table,
        slot_mapping=torch.cat(new_slots),
        causal=True,
        seq_lens_cpu_upper_bound=seq.clone(),
    )
    return Step(
        query=torch.randn(tokens, HEADS, head_size, generator=gen).to(dtype),
        keys=keys,
        values=values,
        common=common,
        context_slots=torch.cat(ctx_slots),
        context_key=torch.cat(parts["ck"]),
        context_value=torch.cat(parts["cv"]),
        new_key=torch.cat(parts["nk"]),
        new_value=torch.cat(parts["nv"]),
        num_blocks=num_blocks,
        window=window,
    )


def reference(step: Step) -> torch.Tensor:
    """float64 causal GQA attention of each row's new queries over its keys."""
    out = []
    qsl = step.common.query_start_loc_cpu.tolist()
    group = HEADS // KV_HEADS
    for i, (k, v) in enumerate(zip(step.keys, step.values, strict=True)):
        q = step.query[qsl[i] : qsl[i + 1]].double().transpose(0, 1)  # [H, q, D]
        k64 = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, s, D]
        v64 = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        n_q, s = q.shape[1], k.shape[0]
        scores = q @ k64.transpose(1, 2) * step.head_size**-0.5
        qpos = torch.arange(s - n_q, s)[:, None]
        visible = torch.arange(s)[None, :] <= qpos
        if step.window is not None:
            visible &= torch.arange(s)[None, :] > qpos - step.window
        scores = scores.masked_fill(~visible, float("-inf"))
        out.append((scores.softmax(-1) @ v64).transpose(0, 1))
    return torch.cat(out)


class Runner:
    """One backend from vLLM's registry: builder, impl, cache, and a forward to time."""

    def __init__(self, name: str, step: Step, dtype: torch.dtype) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        self.name = name
        self.step = step
        backend = AttentionBackendEnum[name].get_class()
        spec = FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=step.head_size, dtype=dtype
        )
        config = _config(dtype)
        self.builder = backend.get_builder_cls()(spec, ["layer.0"], config, torch.device("cpu"))
        with set_current_vllm_config(config):  # CPU_ATTN's impl reads the model's dtype
            self.impl: Any = backend.get_impl_cls()(
                num_heads=HEADS,
                head_size=step.head_size,
                scale=step.head_size**-0.5,
                num_kv_heads=KV_HEADS,
                alibi_slopes=None,
                sliding_window=step.window,
                kv_cache_dtype="auto",
            )
        self.layer = _layer()
        self.layer.isa = getattr(self.builder, "isa", None)  # CPU_ATTN's layers carry its ISA
        self.metadata = self.build()
        self.output = torch.empty(step.query.shape, dtype=dtype)
        n, s = step.num_blocks, (KV_HEADS, 2 * step.head_size)
        # Both backends prefer LBHNC: a block is [Hkv, block_size, D + Dv] (CPU_ATTN packs
        # each (block, head) its own way inside; xyserve stores K then V per slot).
        self.kv_cache = torch.zeros(n, s[0], BLOCK, s[1], dtype=dtype)
        self.write(step.context_key, step.context_value, step.context_slots)  # earlier steps
        self.write(step.new_key, step.new_value, step.common.slot_mapping)  # this step

    def build(self) -> Any:
        return self.builder.build(common_prefix_len=0, common_attn_metadata=self.step.common)

    def write(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        if key.shape[0] == 0:
            return
        if self.name == "CPU_ATTN":
            self.impl.do_kv_cache_update(self.layer, key, value, self.kv_cache, slots)
        else:
            from xy_inductor.runtime.serving import SlotWrites

            paged = self.kv_cache.transpose(1, 2)
            SlotWrites(slots, BLOCK).write(
                paged[..., : self.step.head_size], paged[..., self.step.head_size :], key, value
            )

    def forward(self) -> torch.Tensor:
        q = self.step.query
        if self.name == "CPU_ATTN":  # forward does not write the cache (do_kv_cache_update did)
            k, v = self.step.new_key, self.step.new_value
        else:  # forward writes the cache when given K/V: it was written above, not timed
            k = v = None
        return self.impl.forward(self.layer, q, k, v, self.kv_cache, self.metadata, self.output)


def run_spec(
    name: str,
    dtype_name: str,
    rounds: int,
    sample_s: float,
    seed: int,
    head_size: int = HEAD_SIZE,
) -> Row:
    seq_lens, query_lens = SPECS[name]
    dtype = DTYPES[dtype_name]
    step = make_step(seq_lens, query_lens, dtype, seed, WINDOWS.get(name), head_size)
    ref = reference(step)
    xy, cpu = Runner("CUSTOM", step, dtype), Runner("CPU_ATTN", step, dtype)
    errs = []
    for runner in (xy, cpu):
        out = runner.forward().double()
        errs.append((out - ref).abs().max().item())
    fns = [xy.forward, cpu.forward]
    reps = reps_for(fns, sample_s, max_reps=1000)
    t_xy, t_cpu = interleaved(fns, rounds=rounds, warmup=2, reps=reps)
    builds = [xy.build, cpu.build]
    b_xy, b_cpu = interleaved(builds, rounds=rounds, reps=reps_for(builds, sample_s / 4))
    kv_bytes = sum(seq_lens) * KV_HEADS * 2 * head_size * step.query.element_size()
    copy_ms = 0.0
    if name == BANDWIDTH_SPEC:
        # The same bytes, copied once (read + write), in this process, between the forwards.
        src = torch.ones(kv_bytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        fns3 = [xy.forward, lambda: dst.copy_(src), cpu.forward]
        _, t_copy, _ = interleaved(fns3, rounds=rounds, warmup=1, reps=reps_for(fns3, sample_s))
        copy_ms = t_copy.ms
    return Row(
        spec=name,
        dtype=dtype_name,
        tokens=sum(query_lens),
        kv_tokens=sum(seq_lens),
        xyserve_ms=t_xy.ms,
        cpu_attn_ms=t_cpu.ms,
        ratio=t_cpu.median / t_xy.median,
        xyserve_err=errs[0],
        cpu_attn_err=errs[1],
        xyserve_spread=t_xy.spread,
        cpu_attn_spread=t_cpu.spread,
        xyserve_build_ms=b_xy.ms,
        cpu_attn_build_ms=b_cpu.ms,
        cpu_attn_isa=str(cpu.layer.isa),
        kv_bytes=kv_bytes,
        copy_ms=copy_ms,
    )


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def table(rows: list[Row]) -> str:
    head = (
        f"{'spec':<15} {'dtype':<5} {'tokens':>6} {'kv':>6} {'xyserve ms':>11} "
        f"{'CPU_ATTN ms':>11} {'ratio':>6} {'xy err':>8} {'cpu err':>8} "
        f"{'build xy/cpu ms':>15} {'isa':>4}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.spec:<15} {r.dtype:<5} {r.tokens:>6} {r.kv_tokens:>6} {r.xyserve_ms:>11.3f} "
            f"{r.cpu_attn_ms:>11.3f} {r.ratio:>5.2f}x {r.xyserve_err:>8.1e} {r.cpu_attn_err:>8.1e} "
            f"{r.xyserve_build_ms:>7.3f}/{r.cpu_attn_build_ms:<7.3f} {r.cpu_attn_isa:>4}"
        )
    for r in rows:
        if r.copy_ms:
            gbs = [r.kv_bytes / ms / 1e6 for ms in (r.xyserve_ms, r.cpu_attn_ms, r.copy_ms)]
            lines.append(
                f"{r.spec} {r.dtype}: K/V read at {gbs[0]:.1f} GB/s by xyserve, {gbs[1]:.1f} by "
                f"CPU_ATTN; a copy of the same {r.kv_bytes / 2**20:.0f} MiB: {gbs[2]:.1f} GB/s "
                f"(xyserve at {gbs[0] / gbs[2]:.0%} of it)"
            )
    for d in dict.fromkeys(r.dtype for r in rows):
        g = geomean([r.ratio for r in rows if r.dtype == d])
        lines.append(f"geomean {d}: xyserve at {g:.2f}x CPU_ATTN's speed (CPU_ATTN/xyserve)")
        target = [r.ratio for r in rows if r.dtype == d and r.spec not in BEYOND_TARGET]
        if len(target) < len([r for r in rows if r.dtype == d]) and target:
            lines.append(
                f"  without {', '.join(BEYOND_TARGET)} (issue 24's set): {geomean(target):.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs", help=f"comma-separated subset of: {', '.join(SPECS)}")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_SPECS)}; few rounds")
    p.add_argument("--rounds", type=int, help="timed rounds per spec (default 7, quick 3)")
    p.add_argument("--sample-s", type=float, help="seconds per sample (default 0.1, quick 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (both backends' OpenMP)")
    p.add_argument(
        "--head-size",
        type=int,
        default=HEAD_SIZE,
        help=f"D (default {HEAD_SIZE}; 64: small models)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    specs = args.specs.split(",") if args.specs else QUICK_SPECS if args.quick else list(SPECS)
    dtypes = args.dtypes.split(",")
    unknown = [s for s in specs if s not in SPECS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown spec or dtype: {', '.join(unknown)}")
    rounds = args.rounds or (3 if args.quick else 7)
    sample_s = args.sample_s or (0.02 if args.quick else 0.1)

    if args.threads:
        torch.set_num_threads(args.threads)
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # registers xyserve's backend as CUSTOM
    print(
        f"Hq={HEADS} Hkv={KV_HEADS} D={args.head_size} block={BLOCK}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {rounds} rounds, ~{sample_s}s samples",
        flush=True,
    )
    rows = []
    for d in dtypes:
        for s in specs:
            rows.append(run_spec(s, d, rounds, sample_s, args.seed, args.head_size))
            r = rows[-1]
            print(f"  {s} {d}: {r.xyserve_ms:.3f} vs {r.cpu_attn_ms:.3f} ms", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
