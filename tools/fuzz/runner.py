"""Running a case and judging it (the oracle: compiled against eager, then against float64), and
a run of many cases summed up in a ``FuzzSummary``."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from xy_inductor.backend import compile_graph, fallback_reason
from xy_inductor.config import XyConfig
from xy_inductor.lowering import lower_graph

from .case import TOLERANCE, Case, CaseResult
from .grammar import make_case

# -- running a case ----------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' repeat_kv, as the generated programs call it."""
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, length, d).reshape(b, h * n, length, d)


def _callable(case: Case) -> Callable:
    namespace = {"torch": torch, "F": F, "math": math, "repeat_kv": repeat_kv}
    filename = f"<xyserve-fuzz {case.seed}:{case.index}>"
    exec(compile(case.source, filename, "exec"), namespace)  # our own grammar's source
    fn = namespace["forward"]
    if not case.params:
        return fn
    module_cls = type("FuzzModule", (nn.Module,), {"forward": fn})
    module = module_cls()
    for name, value in case.params.items():
        module.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
    return module.eval()


def _flat(out: object) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(
    case: Case, got: list[torch.Tensor], want: list[torch.Tensor]
) -> tuple[str, str, float]:
    if len(got) != len(want):
        return "wrong", f"{len(got)} outputs, eager {len(want)}", math.inf
    worst, known = 0.0, False
    for a, e in zip(got, want, strict=True):
        if a.shape != e.shape or a.dtype != e.dtype:
            return (
                "wrong",
                f"output {tuple(a.shape)} {a.dtype}, eager {tuple(e.shape)} {e.dtype}",
                math.inf,
            )
        a64, e64 = a.double(), e.double()
        a_bad, e_bad = ~torch.isfinite(a64), ~torch.isfinite(e64)
        if (a_bad & ~e_bad).any():
            return "wrong", "NaN/inf where eager is finite", math.inf
        nan_only_eager = e_bad & ~a_bad
        if nan_only_eager.any():
            # The known difference: eager's plain softmax over a row masked everywhere with
            # -inf is NaN, the op gives 0 there.
            if not (torch.isnan(e64[nan_only_eager]).all() and (a64[nan_only_eager] == 0).all()):
                return "wrong", "finite where eager is inf, or not 0 where eager is NaN", math.inf
            known = True
        both = ~a_bad & ~e_bad
        if ((a_bad & e_bad) & (a64.nan_to_num(1.0) != e64.nan_to_num(1.0))).any():
            return "wrong", "a different inf than eager's", math.inf
        diff = (a64[both] - e64[both]).norm()
        ref = e64[both].norm().clamp_min(1e-30)
        err = float(diff / ref) if both.any() else 0.0
        worst = max(worst, err)
    if worst > TOLERANCE[case.dtype]:
        return "wrong", f"relative error {worst:.2e} > {TOLERANCE[case.dtype]:.0e}", worst
    return ("known" if known else "ok"), "", worst


def run_case(case: Case) -> CaseResult:
    """Compile ``case`` with xyserve, run it and eager, compare."""
    config = XyConfig(fuse_siblings=case.fuse_siblings)
    reports = []

    def xyserve_fuzz(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        # What was lowered and why not, from a copy; the graph itself goes through the backend.
        side = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        reports.append(
            lower_graph(
                side, config.lowering_options(), skip_reason=fallback_reason(example_inputs)
            )
        )
        return compile_graph(gm, example_inputs, config)

    args = [t.clone() if isinstance(t, torch.Tensor) else t for t in case.inputs.values()]
    torch._dynamo.reset()
    try:
        fn = _callable(case)
        with torch.no_grad():
            expected = _flat(fn(*args))
    except Exception as e:  # a program the grammar should not have drawn
        return CaseResult(case, (), "invalid", f"eager: {type(e).__name__}: {e}")
    try:
        compiled = torch.compile(fn, backend=xyserve_fuzz, dynamic=case.dynamic)
        with torch.no_grad():
            got = _flat(compiled(*args))
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CaseResult(case, _sites(reports), "crashed", f"{type(e).__name__}: {text}")
    finally:
        torch._dynamo.reset()
    status, detail, err = _compare(case, got, expected)
    if status == "wrong" and math.isfinite(err):
        # Eager in half precision may itself be far from the exact answer: compare with the
        # same program in float64 before calling the compiled result wrong.
        wide = copy.deepcopy(fn).double() if isinstance(fn, nn.Module) else fn
        with torch.no_grad():
            exact = _flat(wide(*[_widen(t) for t in case.inputs.values()]))
        exact = [
            t.to(e.dtype) if t.is_floating_point() else t
            for t, e in zip(exact, expected, strict=True)
        ]
        status64, _, err64 = _compare(case, got, exact)
        _, _, eager64 = _compare(case, expected, exact)
        # As close to the exact answer as eager is, give or take the tolerance.
        if status64 in ("ok", "known") or err64 <= eager64 + TOLERANCE[case.dtype]:
            return CaseResult(
                case,
                _sites(reports),
                "closer",
                f"{detail}; from float64: {err64:.1e}, eager's {eager64:.1e}",
                err,
            )
    return CaseResult(case, _sites(reports), status, detail, err)


def _widen(t: object) -> object:
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _sites(reports: list) -> tuple[tuple[str, bool, str | None, bool], ...]:
    return tuple((s.kind, s.lowered, s.reason, s.failed) for r in reports for s in r.sites)


# -- a run ---------------------------------------------------------------------------------------


def reason_class(reason: str) -> str:
    """A reason with its node names and sizes taken out, so that like reasons count together."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\([^()]*\d[^()]*\)", "(…)", reason)
    reason = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", reason)
    return reason


@dataclasses.dataclass
class FuzzSummary:
    seed: int
    cases: int = 0
    sites: Counter = dataclasses.field(default_factory=Counter)  # kind -> n
    lowered: Counter = dataclasses.field(default_factory=Counter)  # kind -> n
    left_alone: Counter = dataclasses.field(default_factory=Counter)  # reason class -> n
    failed_sites: int = 0
    status: Counter = dataclasses.field(default_factory=Counter)
    by_kind: Counter = dataclasses.field(default_factory=Counter)
    bad: list[CaseResult] = dataclasses.field(default_factory=list)  # wrong, crashed, invalid
    seconds: float = 0.0

    def add(self, result: CaseResult) -> None:
        self.cases += 1
        self.status[result.status] += 1
        self.by_kind[result.case.kind] += 1
        for kind, lowered, reason, failed in result.sites:
            self.sites[kind] += 1
            if lowered:
                self.lowered[kind] += 1
            else:
                self.left_alone[reason_class(reason or "")] += 1
            self.failed_sites += failed
        if result.status in ("wrong", "crashed", "invalid"):
            self.bad.append(result)

    @property
    def wrong(self) -> int:
        return self.status["wrong"] + self.status["crashed"]

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items()))
        sites = ", ".join(
            f"{k} {self.lowered[k]}/{n} lowered" for k, n in sorted(self.sites.items())
        )
        lines = [
            f"xyserve fuzz: seed {self.seed}, {self.cases} cases ({kinds}) in {self.seconds:.0f} s",
            f"  sites: {sites}; {self.failed_sites} failed while lowering (contained)",
            f"  cases: {self.status['ok']} ok, {self.status['closer']} ok against float64 only "
            "(half-precision eager itself that far from it), "
            f"{self.status['known']} known difference (eager NaN on rows masked everywhere with "
            f"-inf, op 0), {self.status['invalid']} invalid programs",
            f"  WRONG: {self.status['wrong']} wrong answers, {self.status['crashed']} crashed "
            "compiles",
            f"  left alone, by reason ({sum(self.left_alone.values())} sites):",
        ]
        for reason, n in self.left_alone.most_common():
            lines.append(f"    {n:>6}  {reason}")
        for result in self.bad[:20]:
            c = result.case
            lines.append(
                f"  {result.status.upper()} case --seed {c.seed} --case {c.index}: {result.detail}"
            )
        return "\n".join(lines)


def run_fuzz(cases: int, seed: int = 0, *, start: int = 0, progress: bool = False) -> FuzzSummary:
    """Run cases ``start`` … ``start + cases - 1`` of the run seeded ``seed``."""
    summary = FuzzSummary(seed)
    began = time.perf_counter()
    logger = logging.getLogger("xy_inductor")
    level = logger.level
    logger.setLevel(logging.ERROR)  # contained failures are counted, not printed per case
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index in range(start, start + cases):
                summary.add(run_case(make_case(seed, index)))
                if progress and (index - start + 1) % 500 == 0:
                    print(
                        f"  {index - start + 1} cases, {summary.wrong} wrong, "
                        f"{time.perf_counter() - began:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        logger.setLevel(level)
    summary.seconds = time.perf_counter() - began
    return summary
