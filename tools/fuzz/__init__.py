"""A differential fuzzer for the lowering: random attention and linear subgraphs, each compiled
with xyserve and compared with eager. Run from the repository root:

    python -m tools.fuzz --cases 10000 --seed 0      # make fuzz N=10000 SEED=0
    python -m tools.fuzz --seed 0 --case 1234         # one case: its program and result
    python -m tools.fuzz --load tests/fuzz_cases/1-593.pt  # a saved case

Each case is a small Python function drawn from a grammar of the spellings real models and
PyTorch's own rewrites use (``grammar.py``, ``spellings.py``), in random orders and with random
sizes (1 and odd ones included), dtypes (float32, bfloat16, float16), dynamic or static shapes,
and keyword or positional arguments. Its source is compiled with ``exec`` under a name of its
own, so every case is a fresh Dynamo trace. The compiled function runs through the xyserve
backend (``compile_graph``, exactly what ``torch.compile(backend="xyserve")`` runs); a copy of
each graph is lowered on the side to learn what was lowered and why the rest was not
(``runner.py``).

A case is *wrong* when its compiled output differs from eager's by more than the dtype's
tolerance (norm-relative: float32 1e-5, bfloat16/float16 1e-2) and is also further from the
same program run in float64 than eager is, by more than that tolerance (half-precision eager can
itself be further than 1e-2 from the exact answer, e.g. scores rounded to float16 before a
softmax; such cases are counted apart), or has NaN or inf where eager has none, or fails where
eager runs. One difference is known and counted apart: where eager's
plain softmax gives NaN on a row whose every key is masked with -inf, the op gives 0
(``lowering/manual_attention.py``). Wrong must be 0; each wrong case ever found is kept as a
fixed-seed regression test in ``tests/test_fuzz.py``.

Cost: one Dynamo trace per case on tiny tensors, ``torch._dynamo.reset()`` after each so
that neither caches nor recompile limits carry over; about 0.1 s a static case and 0.3 s a
dynamic one on a 2-core machine.

A test tool, not part of the installed package: ``case.py`` (a case, saved and loaded),
``grammar.py`` and ``spellings.py`` (drawing one), ``runner.py`` (running and judging it, a
run's summary), ``cli.py`` (the command line).
"""

from __future__ import annotations

from .case import Case, CaseResult, load_case, save_case
from .grammar import make_case
from .runner import FuzzSummary, run_case, run_fuzz

__all__ = [
    "Case",
    "CaseResult",
    "FuzzSummary",
    "load_case",
    "make_case",
    "run_case",
    "run_fuzz",
    "save_case",
]
