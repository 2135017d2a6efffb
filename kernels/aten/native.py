"""ATen's C++ fast path for ``xyserve.gemm`` and ``xyserve.attention`` (``native.cpp``): calls
from Inductor's generated code without a crossing back into Python.

Inductor's code calls the ops through PyTorch's dispatcher; with Python kernels each call
enters Python again (its cost: ``benchmarks/op_overhead.py``). ``load()`` compiles
``native.cpp`` once per machine with ``torch.utils.cpp_extension`` (cached by source, torch
version and compiler, in ``XYSERVE_CACHE_DIR`` or ``~/.cache/xy_inductor``), and loads it,
which registers its kernels for the ops' CPU and AutogradCPU keys. They run, in C++, the calls
ATen's provider would have run as one ``F.linear`` or one SDPA call, and count them in
``stats()``; every other call goes to the Python implementation, registered as
``xyserve::_gemm_python`` and
``xyserve::_attention_python``, unchanged.

The C++ kernels know the provider rules of one configuration only: ATen serving every CPU call
of these two ops. So ``load()`` refuses (returning why) when another provider of the process
serves either op, and
``use_providers`` blocks (``note_override``) send every call to Python while they are open.
The runtime loads them (``runtime.ops.load_native``) when the backend compiles a graph.
Inductor's code calls the ops, and so do graphs run as traced for these two ops on CPU tensors
once the kernels are loaded (``compiled_graph.call_directly``); other ops, and every op where the
kernels do not load, are called as the Python implementations directly. Set
``XYSERVE_NATIVE=0`` to never load them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils import cpp_extension

from xy_inductor.kernels.aten.menus import PLANNED_MIN_SCORES
from xy_inductor.kernels.contract import Provider

__all__ = ["OP_NAMES", "calls", "load", "loaded", "note_override", "ops", "reset_calls", "status"]

log = logging.getLogger("xy_inductor")

SOURCE = Path(__file__).with_name("native.cpp")

OP_NAMES = ("gemm", "attention")
"""The xyserve ops with C++ CPU kernels."""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_refused: str | None = None
_open_overrides = 0
# Python twins of the ops, the C++ kernels' way back to the Python implementation.
_twins: torch.library.Library | None = None


def ops() -> tuple:
    """The op overloads with C++ CPU kernels (``torch.ops.xyserve.gemm.default``…)."""
    return tuple(getattr(torch.ops.xyserve, name).default for name in OP_NAMES)


def loaded() -> bool:
    """Whether the C++ kernels serve the ops' CPU calls in this process."""
    return _lib is not None


def status() -> str | None:
    """None when the C++ kernels are loaded, else why not."""
    if _lib is not None:
        return None
    return _refused or "not loaded yet (the backend loads them when it compiles a graph)"


def load(
    providers: Sequence[Provider], python_impls: Mapping[str, Callable[..., torch.Tensor]]
) -> str | None:
    """Build (once per machine) and load the C++ kernels; None when they are loaded, else why
    not (logged once; the ops keep their Python kernels, which are correct, only slower).

    ``providers``: the process's default provider list (the kernels load only when it is ATen
    alone); ``python_impls``: op name to its Python implementation, which the C++ kernels call
    for every call they do not serve themselves."""
    global _lib, _refused
    with _lock:
        if _lib is not None:
            return None
        if _refused is not None:
            return _refused
        reason = _why_not(providers)
        if reason is None:
            try:
                # The kernels hand every call they do not serve to these twins: they exist
                # before the library registers the kernels (its loading does).
                _define_twins(python_impls)
                path = _build()
                lib = ctypes.CDLL(str(path))
                lib.xyserve_native_calls.restype = ctypes.c_int64
                lib.xyserve_native_calls.argtypes = [ctypes.c_int64]
                lib.xyserve_native_add_overrides.argtypes = [ctypes.c_int64]
                lib.xyserve_native_set_planned_min_scores.argtypes = [ctypes.c_int64]
                lib.xyserve_native_set_planned_min_scores(PLANNED_MIN_SCORES)
                lib.xyserve_native_add_overrides(_open_overrides - 1)  # releases its hold
                _lib = lib
                log.info("xyserve: C++ CPU kernels loaded from %s", path)
                return None
            except (OSError, RuntimeError, subprocess.SubprocessError, ImportError) as e:
                reason = f"building or loading {SOURCE.name} failed: {e}"
                log.warning("xyserve: C++ CPU kernels not loaded (ops run slower): %s", reason)
        else:
            log.info("xyserve: C++ CPU kernels not loaded: %s", reason)
        _refused = reason
        return reason


def _why_not(providers: Sequence[Provider]) -> str | None:
    if os.environ.get("XYSERVE_NATIVE", "1") == "0":
        return "disabled by XYSERVE_NATIVE=0"
    # The C++ kernels serve, without asking the providers, gemm calls and dense attention calls
    # under PLANNED_MIN_SCORES scores. Exact only where every other provider of the process
    # serves no gemm and declines those attention calls (Provider.defers_small_attention).
    serving = [
        p.name
        for p in providers
        if "gemm" in p.kernels or ("attention" in p.kernels and not p.defers_small_attention)
    ]
    if serving != ["aten"]:
        names = ", ".join(serving)
        return f"providers other than ATen serve gemm or attention in this process ({names})"
    if _compiler() is None:
        return "no C++ compiler (set CXX, or install g++)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _cache_dir() -> Path:
    root = os.environ.get("XYSERVE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "xy_inductor"


def _build() -> Path:
    """Build the shared library with ``torch.utils.cpp_extension`` (unless this source is built
    for this torch already: its own check, under its own lock, so processes starting together
    build it once) and load it into the process; its path."""
    compiler = _compiler()
    assert compiler is not None
    key = hashlib.sha256(
        b"\0".join(
            [
                torch.__version__.encode(),
                str(torch.version.git_version).encode(),
                compiler.encode(),
                sys.platform.encode(),
            ]
        )
    ).hexdigest()[:16]
    directory = _cache_dir() / f"native-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    name = "xyserve_native"
    target = directory / f"{name}.so"
    if not target.exists():
        # Seen once per machine: it explains a first compile some seconds longer than the next.
        log.warning("xyserve: compiling its C++ CPU kernels, once per machine and torch version")
    path = cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=str(directory),
        is_python_module=False,
    )
    return Path(path)


def _define_twins(python_impls: Mapping[str, Callable[..., torch.Tensor]]) -> None:
    global _twins
    if _twins is not None:
        return
    lib = torch.library.Library("xyserve", "FRAGMENT")
    for name in OP_NAMES:
        impl = python_impls[name]
        schema = str(getattr(torch.ops.xyserve, name).default._schema)
        lib.define(f"_{name}_python" + schema[schema.index("(") :])
        lib.impl(f"_{name}_python", impl, "CPU")
    _twins = lib


def note_override(delta: int) -> None:
    """``use_providers`` opened (+1) or closed (-1) a block: while any is open in the process,
    the C++ kernels send every call to the Python path, which honours the block's list."""
    global _open_overrides
    with _lock:
        _open_overrides += delta
        if _lib is not None:
            _lib.xyserve_native_add_overrides(delta)


def calls() -> dict[tuple[str, str, str], int]:
    """Calls the C++ kernels ran, keyed as ``stats()`` counts calls: (op, provider, path);
    only those with calls."""
    if _lib is None:
        return {}
    counts = {
        ("gemm", "aten", "linear"): _lib.xyserve_native_calls(0),
        ("attention", "aten", "sdpa"): _lib.xyserve_native_calls(1),
    }
    return {key: n for key, n in counts.items() if n}


def reset_calls() -> None:
    if _lib is not None:
        _lib.xyserve_native_reset_calls()
