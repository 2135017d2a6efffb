"""Helpers shared by the tests: graph capture, node counts, relative errors, seeded inputs, a
function compiled against eager, and the float64 reference of attention over packed rows with
its KV caches (dense and paged)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx

import xy_inductor
from xy_inductor.kernels.cpu import build


class GraphCapture:
    """A backend that keeps the Dynamo graphs it is given and runs them unchanged."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.example_inputs: list[list] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs.append(gm)
        self.example_inputs.append(example_inputs)
        return gm.forward


def capture(
    fn: Callable, *args: object, dynamic: bool | None = True, **kwargs: object
) -> tuple[torch.fx.GraphModule, list]:
    """The single Dynamo graph of ``fn(*args, **kwargs)`` and the real inputs it is called with
    (module parameters included)."""
    backend = GraphCapture()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args, **kwargs)
    assert len(backend.graphs) == 1
    return backend.graphs[0], backend.example_inputs[0]


def run(gm: torch.fx.GraphModule, inputs: list) -> torch.Tensor:
    """The graph's (single) output."""
    # Dynamo hands size placeholders to the backend as SymInts; running needs their values.
    inputs = [int(x) if isinstance(x, torch.SymInt) else x for x in inputs]
    with torch.no_grad():
        out = gm(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def count_calls(gm: torch.fx.GraphModule, target: object) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# Per dtype: bound on the relative error against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Assert ``rel_error(out, ref)`` is within ``dtype``'s TOLERANCE."""
    err = rel_error(out, ref)
    assert err < TOLERANCE[dtype], err


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Seeded standard normal values of ``shape`` in ``dtype`` (drawn in float32)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(b=2, h=4, lq=5, lk=6, d=8, hkv=None, dtype=torch.float32):
    """Seeded q [b, h, lq, d], k and v [b, hkv, lk, d] (hkv defaults to h)."""
    hkv = hkv or h
    return (
        randn(b, h, lq, d, dtype=dtype, seed=1),
        randn(b, hkv, lk, d, dtype=dtype, seed=2),
        randn(b, hkv, lk, d, dtype=dtype, seed=3),
    )


def compiled_vs_eager(fn: Callable, *args: object, dynamic: bool = False) -> tuple:
    """(compiled output, eager output, stats) for ``fn`` through the xyserve backend."""
    with torch.no_grad():
        expected = fn(*args)
        out = torch.compile(fn, backend="xyserve", dynamic=dynamic)(*args)
    return out, expected, xy_inductor.stats()


# -- attention over packed rows: a float64 reference and the caches it reads --------------------


def visible(
    q_len: int, kv_len: int, causal: bool, window: int | None, parents: list[int] | None = None
) -> torch.Tensor:
    """[q_len, kv_len] bool: which keys each query of a row may see. ``parents``: a tree
    verify row, each query token's parent among the row's queries (-1: none); a query then sees
    the keys before the row's queries, itself and its ancestors, found by walking up."""
    qpos = torch.arange(q_len)[:, None] + kv_len - q_len
    kpos = torch.arange(kv_len)[None, :]
    ok = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        ok &= kpos <= qpos
    if window is not None:
        ok &= kpos > qpos - window
    if parents is not None:
        offset = kv_len - q_len
        own = torch.zeros(q_len, kv_len, dtype=torch.bool)
        own[:, :offset] = True
        for i in range(q_len):
            j = i
            while j != -1:
                own[i, offset + j] = True
                j = parents[j]
        ok &= own
    return ok


def packed_reference(q, ks, vs, q_lens, kv_lens, causal, window, scale, parents=None):
    """Plain float64 attention row by row: q packed [Tq, Hq, D], ks[r] [kv_len, Hkv, D].
    ``parents[r]``: row r's tree (``visible``), or None."""
    outs, start = [], 0
    for r, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        qr = q[start : start + ql].double().transpose(0, 1)
        g = q.shape[1] // ks[r].shape[1]
        kr = ks[r].double().transpose(0, 1).repeat_interleave(g, 0)
        vr = vs[r].double().transpose(0, 1).repeat_interleave(g, 0)
        tree = None if parents is None else parents[r]
        s = (qr @ kr.transpose(-1, -2) * scale).masked_fill(
            ~visible(ql, kl, causal, window, tree), float("-inf")
        )
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(m), 0, m))
        denom = p.sum(-1, keepdim=True)
        outs.append(((p @ vr) / torch.where(denom > 0, denom, 1)).transpose(0, 1))
        start += ql
    return torch.cat(outs)


def kv_layouts(ks, vs, kv_lens, block_size, hkv, d, gen):
    """The same keys as a dense [B, Hkv, L, D] cache and as a shuffled paged cache."""
    rows, longest = len(kv_lens), max(kv_lens)
    dense_k = torch.randn(rows, hkv, longest, d, generator=gen)  # garbage past each length
    dense_v = torch.randn(rows, hkv, longest, d, generator=gen)
    blocks = sum(math.ceil(kv / block_size) for kv in kv_lens) + 2
    paged_k = torch.randn(blocks, block_size, hkv, d, generator=gen)
    paged_v = torch.randn(blocks, block_size, hkv, d, generator=gen)
    order = torch.randperm(blocks, generator=gen).tolist()
    table = torch.zeros(rows, math.ceil(longest / block_size), dtype=torch.int64)
    for r, kv in enumerate(kv_lens):
        dense_k[r, :, :kv] = ks[r].transpose(0, 1)
        dense_v[r, :, :kv] = vs[r].transpose(0, 1)
        for j in range(math.ceil(kv / block_size)):
            b = table[r, j] = order.pop()
            n = min(block_size, kv - j * block_size)
            paged_k[b, :n] = ks[r][j * block_size : j * block_size + n]
            paged_v[b, :n] = vs[r][j * block_size : j * block_size + n]
    return (dense_k, dense_v), (paged_k, paged_v, table)


def cpu_kernels_built() -> bool:
    """Whether the CPU provider's native kernels load here (built on first use)."""
    return build.why_not_loaded() is None


def varlen_cpu_path() -> str:
    """The ``stats().paths`` entry of ``attention_varlen`` on CPU tensors with the default
    providers: the CPU provider's kernel where it builds here, else ATen's rows."""
    return "cpu/paged" if cpu_kernels_built() else "aten/rows"


def dense_rows_path() -> str:
    """The ``stats().paths`` entry of a CPU ``attention`` call whose mask is rows of padding
    (above the planning threshold, head size a multiple of 16), with the default providers."""
    return "cpu/dense" if cpu_kernels_built() else "aten/rows"


def cpu_or_aten() -> str:
    """The provider of CPU ``attention_packed`` calls (head size a multiple of 16) with the
    default providers."""
    return "cpu" if cpu_kernels_built() else "aten"
