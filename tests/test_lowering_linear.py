"""The linear lowering (LinearToGemm): F.linear and the other spellings of a linear layer
(hand-written matmuls with a bias, GPT-2's Conv1D, a [K, N] weight) to xyserve.gemm, with op
counts, numerics and the look-alikes it must leave alone. The other passes and the pipeline:
``test_lowering.py``."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOLERANCE, capture, count_calls, randn, rel_error, run

from xy_inductor.lowering import LinearToGemm
from xy_inductor.lowering.linear_to_gemm import LINEAR

GEMM = torch.ops.xyserve.gemm.default
SIZES = (1, 7, 37, 129)


# -- F.linear -> xyserve.gemm -----------------------------------------------------------------


class TwoLinears(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.up = nn.Linear(k, n)
        self.down = nn.Linear(n, k, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", SIZES)
def test_linear_pass_counts_and_numerics(dtype, m):
    model = TwoLinears(37, 129).to(dtype).eval()
    x = randn(2, m, 37, dtype=dtype)
    gm, inputs = capture(model, x)
    with torch.no_grad():
        expected = model(x)
        reference = copy.deepcopy(model).double()(x.double())
    assert (count_calls(gm, LINEAR), count_calls(gm, GEMM)) == (2, 0)
    p = LinearToGemm()
    sites = p(gm)
    assert p.matched == 2 and [s.name for s in sites] == ["up", "down"]
    assert (count_calls(gm, LINEAR), count_calls(gm, GEMM)) == (0, 2)
    out = run(gm, inputs)
    assert rel_error(out, expected) < TOLERANCE[dtype]
    assert rel_error(out, reference) < TOLERANCE[dtype]


def matmul_linear(x, w, b):
    # x @ w.T + b computes what F.linear does but is not an F.linear call: not this pass's site.
    return x @ w.t() + b


def test_linear_pass_ignores_matmul_lookalike():
    args = (randn(3, 8), randn(4, 8, seed=1), randn(4, seed=2))
    gm, _ = capture(matmul_linear, *args)
    before = gm.code
    p = LinearToGemm()
    assert p(gm) == [] and p.matched == 0 and gm.code == before


def test_linear_pass_leaves_vector_weight_with_a_reason():
    gm, _ = capture(lambda x, w: F.linear(x, w), randn(3, 8), randn(8, seed=1))
    sites = LinearToGemm()(gm)
    assert len(sites) == 1 and not sites[0].lowered
    assert "weight is 1-D" in sites[0].reason
    assert count_calls(gm, LINEAR) == 1


# -- linear layers in other spellings --------------------------------------------------------


class LinearSpellings(nn.Module):
    """Every linear spelling the pass knows, and one it must not take."""

    def __init__(self, k: int = 37, n: int = 129) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.w = nn.Parameter(torch.randn(n, k) / k**0.5)  # [N, K]
        self.b = nn.Parameter(torch.randn(n))
        self.w_kn = nn.Parameter(torch.randn(k, n) / k**0.5)  # [K, N]
        self.conv1d = Conv1D(n, k)  # GPT-2: addmm(b, x.view(-1, K), w[K, N])

    def forward(self, x):
        return (
            x @ self.w.T + self.b,  # hand-written linear with bias
            self.b + torch.matmul(x, self.w.t()),  # bias first
            x @ self.w.transpose(0, 1),  # no bias
            self.conv1d(x),
            torch.matmul(x, self.w_kn),  # a [K, N] weight parameter
            x @ x.transpose(-1, -2),  # two activations: attention-like, not linear
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", SIZES)
def test_linear_spellings_counts_and_numerics(dtype, m):
    torch.manual_seed(0)
    model = LinearSpellings().to(dtype).eval()
    x = randn(2, m, 37, dtype=dtype)
    gm, inputs = capture(model, x)
    with torch.no_grad():
        expected = gm(*[int(i) if isinstance(i, torch.SymInt) else i for i in inputs])
        reference = copy.deepcopy(model).double()(x.double())
    matmuls = sum(n.target in (torch.matmul, operator.matmul, torch.addmm) for n in gm.graph.nodes)
    assert (matmuls, count_calls(gm, GEMM)) == (6, 0)
    p = LinearToGemm()
    sites = p(gm)
    assert p.matched == 5 and all(s.lowered for s in sites) and len(sites) == 5
    assert count_calls(gm, GEMM) == 5
    assert (
        sum(n.target in (torch.matmul, operator.matmul, torch.addmm) for n in gm.graph.nodes) == 1
    )
    assert not any(n.target is operator.add for n in gm.graph.nodes), "biases folded into the gemm"
    with torch.no_grad():
        outputs = gm(*[int(i) if isinstance(i, torch.SymInt) else i for i in inputs])
    for out, want, ref in zip(outputs, expected, reference, strict=True):
        assert rel_error(out, want) < TOLERANCE[dtype]
        assert rel_error(out, ref) < TOLERANCE[dtype]


def test_add_that_is_not_a_bias_is_not_folded():
    class NotBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 16))

        def forward(self, x, residual):
            return x @ self.w.t() + residual  # a [.., N] tensor, not a bias

    gm, inputs = capture(NotBias(), randn(3, 16), randn(3, 8, seed=1), dynamic=False)
    expected = run(gm, inputs)
    sites = LinearToGemm()(gm)
    assert [s.lowered for s in sites] == [True]
    assert any(n.target is operator.add for n in gm.graph.nodes)  # the residual add stays
    assert rel_error(run(gm, inputs), expected) < TOLERANCE[torch.float32]
