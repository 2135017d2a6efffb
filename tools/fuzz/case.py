"""What a fuzz case is: a generated program with its inputs, its result, a case saved to a file
(the regression tests in ``tests/fuzz_cases``), and the Builder that writes a program's source."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence

import torch

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated program and its inputs."""

    seed: int
    index: int
    kind: str  # attention | sdpa | linear | block
    source: str
    dtype: torch.dtype
    dynamic: bool
    inputs: dict[str, object]  # name -> value, in the function's argument order
    params: dict[str, torch.Tensor]  # module parameters (linear and block cases)
    fuse_siblings: bool = False


@dataclasses.dataclass(frozen=True)
class CaseResult:
    case: Case
    sites: tuple[tuple[str, bool, str | None, bool], ...]  # (kind, lowered, reason, failed)
    status: str  # ok | closer | known | wrong | crashed | invalid
    detail: str = ""
    error: float = 0.0


def save_case(case: Case, path: str) -> None:
    """Write ``case`` (program and tensors) to ``path``: a regression test that no later change
    of the grammar can turn into another program."""
    torch.save(dataclasses.asdict(case), path)


def load_case(path: str) -> Case:
    """A case written by ``save_case``."""
    return Case(**torch.load(path, weights_only=True))


# -- writing a case's source ---------------------------------------------------------------------
# A case is drawn by a Builder, which writes Python source line by line (grammar.py and
# spellings.py say what it writes).


class Builder:
    def __init__(self, rng: random.Random, dtype: torch.dtype, dynamic: bool) -> None:
        self.rng = rng
        self.dtype = dtype
        self.dynamic = dynamic
        self.lines: list[str] = []
        self.names = Counter()

    def pick(self, *options: object) -> object:
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def new(self, base: str) -> str:
        self.names[base] += 1
        return f"{base}{self.names[base]}"

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)


def random_tensor(
    g: torch.Generator, shape: Sequence[int], dtype: torch.dtype, scale=1.0
) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)
