"""Tree verify rows in ``xyserve.attention_varlen``: random draft trees through every provider
path against a float64 reference that walks each query's ancestors (``helpers.visible``)."""

from __future__ import annotations

import contextlib
import math
import random

import pytest
import torch
from helpers import cpu_kernels_built, packed_reference, varlen_cpu_path

import xy_inductor
from xy_inductor.kernels import aten
from xy_inductor.kernels.aten.plan_executor import run_plan
from xy_inductor.kernels.attention_plan import AttentionMenu, plan_attention
from xy_inductor.kernels.tree_masks import (
    parse_tree_mask,
    tree_mask_from_parents,
    tree_mask_from_paths,
)
from xy_inductor.runtime import providers
from xy_inductor.runtime.serving import VarlenStep

varlen = torch.ops.xyserve.attention_varlen.default

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def random_tree(rng: random.Random) -> list[int]:
    """Parents of a random draft tree (depth 1–5, up to 4 children per node, at most 64
    tokens): token 0 is the root (the last verified token). Laid out level by level as vLLM's
    ``speculative_token_tree`` lays out drafts, or depth first (any order with parents first
    is a valid row)."""
    depth, branching = rng.randint(1, 5), rng.randint(1, 4)
    parents, level = [-1], [0]
    for _ in range(depth):
        below = []
        for node in level:
            for _ in range(rng.randint(1, branching)):
                if len(parents) < 64:
                    parents.append(node)
                    below.append(len(parents) - 1)
        level = below
    if rng.random() < 0.5:  # depth first
        children: dict[int, list[int]] = {}
        for i, p in enumerate(parents[1:], start=1):
            children.setdefault(p, []).append(i)
        order, stack = [], [0]
        while stack:
            node = stack.pop()
            order.append(node)
            stack += reversed(children.get(node, []))
        new = {old: i for i, old in enumerate(order)}
        parents = [-1 if parents[old] == -1 else new[parents[old]] for old in order]
    return parents


def tree_case(rng: random.Random, dtype: torch.dtype, trees: int, d_choices=(64, 128)):
    """A step of ``trees`` tree verify rows (each after 0–700 cached keys) mixed with plain
    rows (decode, prefill, chunk), a GQA group, a window sometimes, a shuffled paged cache
    poisoned with NaN outside the rows' keys."""
    hkv, group = rng.choice([1, 2]), rng.choice([1, 2, 4, 8])
    d, bs = rng.choice(d_choices), rng.choice([16, 32, 64, 128])
    window = rng.choice([None, None, None, 5, 40, 300])
    rows: list[tuple[int, int, list[int] | None]] = []
    for _ in range(trees):
        parents = random_tree(rng)
        rows.append((len(parents), len(parents) + rng.randint(0, 700), parents))
    for _ in range(rng.randint(0, 3)):
        q = rng.choice([1, rng.randint(2, 90)])
        rows.append((q, q + rng.choice([0, rng.randint(1, 400)]), None))
    rng.shuffle(rows)
    q_lens = [q for q, _, _ in rows]
    kv_lens = [kv for _, kv, _ in rows]
    parents = [p for _, _, p in rows]
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    blocks_of = [math.ceil(kv / bs) for kv in kv_lens]
    n_blocks = sum(blocks_of) + 2
    order = torch.randperm(n_blocks, generator=gen).tolist()
    table = torch.zeros((len(rows), max(blocks_of)), dtype=torch.int32)
    k_cache = torch.full((n_blocks, bs, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full((n_blocks, bs, hkv, d), float("nan"), dtype=dtype)
    ks, vs = [], []
    for r, kv in enumerate(kv_lens):
        ks.append(torch.randn(kv, hkv, d, generator=gen).to(dtype))
        vs.append(torch.randn(kv, hkv, d, generator=gen).to(dtype))
        for j in range(blocks_of[r]):
            b = table[r, j] = order.pop()
            n = min(bs, kv - j * bs)
            k_cache[b, :n] = ks[r][j * bs : j * bs + n]
            v_cache[b, :n] = vs[r][j * bs : j * bs + n]
    q = torch.randn(sum(q_lens), hkv * group, d, generator=gen).to(dtype)
    mask = []
    for n, p in zip(q_lens, parents, strict=True):
        mask += [-1] * n if p is None else tree_mask_from_parents(p)
    want = packed_reference(q, ks, vs, q_lens, kv_lens, True, window, d**-0.5, parents)
    return q, k_cache, v_cache, q_lens, kv_lens, table, window, torch.tensor(mask), want


def _run(q, k, v, q_lens, kv_lens, table, window, mask):
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return varlen(q, k, v, cu, torch.tensor(kv_lens), table, True, window, None, mask)


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


PROVIDER_PATHS = {
    "default": (None, varlen_cpu_path()),
    "aten": ([aten.PROVIDER], "aten/rows"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", sorted(PROVIDER_PATHS))
def test_random_trees_match_float64(route, dtype):
    """At least 500 random trees per provider path and dtype, 0 wrong."""
    only, path = PROVIDER_PATHS[route]
    rng = random.Random(f"trees-{route}-{dtype}")
    trees = 0
    with providers.use_providers(only) if only else contextlib.nullcontext():
        while trees < 500:
            count = rng.randint(3, 8)
            q, k, v, q_lens, kv_lens, table, window, mask, want = tree_case(rng, dtype, count)
            xy_inductor.reset_stats()
            got = _run(q, k, v, q_lens, kv_lens, table, window, mask)
            assert torch.isfinite(got).all()
            err = _error(got, want)
            assert err < TOLERANCE[dtype], (q_lens, kv_lens, window, err)
            assert xy_inductor.stats().paths["attention_varlen"] == {path: 1}
            tree = parse_tree_mask(mask, q_lens, "test")
            trees += 0 if tree is None else sum(t is not None for t in tree)  # chains are plain


@pytest.mark.parametrize("kv_chunk", [16, 64])
def test_the_generic_executor_runs_trees_and_the_plan_skips_hidden_chunks(kv_chunk):
    """``run_plan`` (the ATen path off the CPU) on plans with small key chunks, where whole
    chunks of a tree row are hidden from a tile: the planner skips them, the results hold."""
    rng = random.Random(f"plan-trees-{kv_chunk}")
    skipped_by_tree = 0
    for _ in range(25):
        q, k, v, q_lens, kv_lens, table, window, mask, want = tree_case(
            rng, torch.float32, rng.randint(1, 4)
        )
        tree = parse_tree_mask(mask, q_lens, "test")
        hkv = k.shape[2]
        menu = AttentionMenu(q_tiles=(1, 4, 16), kv_chunk=kv_chunk, workers=2)
        plan = plan_attention(
            q_lens, kv_lens, causal=True, window=window, kv_heads=hkv, menu=menu, tree=tree
        )
        causal_plan = plan_attention(
            q_lens, kv_lens, causal=True, window=window, kv_heads=hkv, menu=menu
        )
        assert plan.tiles <= causal_plan.tiles
        skipped_by_tree += causal_plan.tiles - plan.tiles
        got = run_plan(
            plan, q, k, v, kv_lens, scale=q.shape[2] ** -0.5, block_table=table,
            block_size=k.shape[1],
        )  # fmt: skip
        assert _error(got, want) < 1e-6
    # Chunks start at a row's first query, so a tree (at most 64 tokens) is one chunk of 64,
    # which every tile sees (each query sees itself); chunks of 16 split trees.
    assert (skipped_by_tree > 0) == (kv_chunk < 64)


def test_a_plan_without_tree_rows_is_the_causal_plan():
    menu = AttentionMenu(q_tiles=(1, 16), kv_chunk=64, workers=2)
    plain = plan_attention([5, 1], [40, 90], causal=True, menu=menu)
    same = plan_attention([5, 1], [40, 90], causal=True, menu=menu, tree=(None, None))
    assert same is plain
    chain = parse_tree_mask([-1] * 5 + [1], [5, 1], "test")  # every row plain: no tree
    assert chain is None


def test_tree_masks_from_parents_and_paths():
    # root, two children of the root, a child of the first: vLLM-style paths
    assert tree_mask_from_paths([(0,), (1,), (0, 0)]) == [0b1, 0b11, 0b101, 0b1011]
    assert tree_mask_from_parents([-1, 0, 0, 1]) == [0b1, 0b11, 0b101, 0b1011]
    chain = tree_mask_from_parents(list(range(-1, 63)))  # 64 tokens in a line: bit 63 is the sign
    assert chain[-1] == -1 and parse_tree_mask(chain, [64], "test") is None
    with pytest.raises(ValueError, match="comes before its parent"):
        tree_mask_from_paths([(0, 0), (0,)])
    with pytest.raises(ValueError, match="parent 2"):
        tree_mask_from_parents([-1, 2, 0])


def test_paths_give_the_mask_of_vllms_tree_attention_bias():
    """vLLM's former ``TREE_ATTN`` backend (``vllm/v1/attention/backends/tree_attn.py``,
    ``_prepare_tree_attn_bias``) let token i (0: the root, then one token per path of
    ``speculative_token_tree`` sorted by depth) attend to token j when j is the root, i itself,
    or a node whose path is a prefix of i's. The same rule, written independently here, on
    random sorted trees."""
    rng = random.Random("paths")
    for _ in range(200):
        parents = random_tree(rng)
        paths: list[tuple[int, ...]] = [()]
        for p in parents[1:]:
            siblings = sum(1 for q in paths[1:] if q[:-1] == paths[p])
            paths.append((*paths[p], siblings))
        choices = sorted(paths[1:], key=lambda t: (len(t), t))  # vLLM's order
        tokens = [(), *choices]
        want = [
            sum(1 << j for j, other in enumerate(tokens) if mine[: len(other)] == other)
            for mine in tokens
        ]
        got = [m & ((1 << 64) - 1) for m in tree_mask_from_paths(choices)]
        assert got == want


@pytest.mark.parametrize(
    ("mask", "q_lens", "match"),
    [
        ([0b10, 0b11], [2], r"tree_mask\[0\].*must see itself"),
        ([0b1, 0b111], [2], r"tree_mask\[1\].*no later token"),
        ([0b1], [2], "1 entries; expected one per query token"),
        ([1] + [-1] * 64, [65], "more than a tree row's 64"),
    ],
)
def test_bad_tree_masks_are_errors_naming_the_token(mask, q_lens, match):
    with pytest.raises(ValueError, match=match):
        parse_tree_mask(mask, q_lens, "xyserve.attention_varlen")


def test_the_op_refuses_a_tree_without_causality_and_masks_of_the_wrong_dtype():
    q = torch.randn(3, 2, 16)
    k = v = torch.randn(2, 16, 1, 16)
    cu, kv, table = torch.tensor([0, 3]), torch.tensor([5]), torch.tensor([[0]])
    with pytest.raises(ValueError, match="tree_mask needs causal=True"):
        varlen(q, k, v, cu, kv, table, False, None, None, torch.tensor([1, 3, 5]))
    with pytest.raises(ValueError, match="1-D int64"):
        varlen(q, k, v, cu, kv, table, True, None, None, torch.tensor([1, 3, 5], dtype=torch.int32))


def test_a_serving_step_with_tree_rows_counts_them_and_matches_float64():
    rng = random.Random("step-trees-2")
    q, k, v, q_lens, kv_lens, table, window, mask, want = tree_case(rng, torch.float32, 3)
    step = VarlenStep(q_lens, kv_lens, table, tree_mask=mask)
    got = [step.run(q, k, v, window=window) for _ in range(2)]  # two layers, one decision
    for out in got:
        assert _error(out, want) < 2e-6
    stats = xy_inductor.stats()
    trees = sum(t is not None for t in parse_tree_mask(mask, q_lens, "test"))
    assert trees >= 1 and stats.varlen_rows["tree"] == trees
    assert stats.varlen_step_kinds["tree"] == 1
    assert stats.varlen_step_checks == 1
    assert stats.paths["attention_varlen"] == {varlen_cpu_path(): 2}


def test_a_tree_row_differs_from_the_chain_it_would_be_without_its_mask():
    """The mask is not ignored: the same row read as a chain (plain causal) gives another
    result for every query below a branch."""
    parents = [-1, 0, 0, 1, 2]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 64, generator=gen)
    k = torch.randn(1, 32, 2, 64, generator=gen)
    v = torch.randn(1, 32, 2, 64, generator=gen)
    cu, kv, table = torch.tensor([0, 5]), torch.tensor([20]), torch.tensor([[0]])
    tree = torch.tensor(tree_mask_from_parents(parents))
    as_tree = varlen(q, k, v, cu, kv, table, True, None, None, tree)
    as_chain = varlen(q, k, v, cu, kv, table, True, None, None)
    torch.testing.assert_close(as_tree[:2], as_chain[:2])  # root and its first child: a chain
    assert (as_tree[2:] - as_chain[2:]).abs().amax() > 1e-3


@pytest.mark.skipif(not cpu_kernels_built(), reason="the CPU kernels do not build here")
def test_the_cpu_kernel_and_aten_agree_on_one_tree_step_bitwise_over_threads():
    rng = random.Random("threads")
    q, k, v, q_lens, kv_lens, table, window, mask, _ = tree_case(rng, torch.float32, 6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(q, k, v, q_lens, kv_lens, table, window, mask)
        torch.set_num_threads(2)
        two = _run(q, k, v, q_lens, kv_lens, table, window, mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_provider_runs_random_trees(dtype):
    """The Triton kernel (the interpreter without CUDA) through its provider, the Triton
    provider first for ``attention_varlen`` only."""
    triton_provider = pytest.importorskip("xy_inductor.kernels.triton")
    only_varlen = providers.Provider(
        name="triton",
        unavailable=lambda: None,
        kernels={"attention_varlen": triton_provider.PROVIDER.kernels["attention_varlen"]},
    )
    rng = random.Random(f"triton-trees-{dtype}")
    trees = 0
    with providers.use_providers([only_varlen, aten.PROVIDER]):
        while trees < TRITON_TREES:
            q, k, v, q_lens, kv_lens, table, window, mask, want = tree_case(rng, dtype, 2)
            xy_inductor.reset_stats()
            got = _run(q, k, v, q_lens, kv_lens, table, window, mask)
            assert _error(got, want) < {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
            assert xy_inductor.stats().paths["attention_varlen"] == {"triton/plan": 1}
            tree = parse_tree_mask(mask, q_lens, "test")
            trees += 0 if tree is None else sum(t is not None for t in tree)


# The interpreter runs about three trees a second.
TRITON_TREES = 48
