"""Building and loading the CPU provider's native kernels (``attention.cpp``).

The library is compiled with ``torch.utils.cpp_extension`` (its own per-source check and build
lock, so processes starting together build it once) for one *vector tier* of the machine it
runs on, with explicit flags per tier: ``-march=native`` would make the same flag string mean
different code on different hosts sharing a cache directory. The tier is in the library's name
and directory. ``at::vec`` uses 512-bit vectors only when ``CPU_CAPABILITY_AVX512`` is defined,
and ``at::parallel_for`` is parallel only when the extension is built with OpenMP, hence the
defines and ``-fopenmp``.

``why_unavailable()`` is cheap and never builds; ``library()`` builds on first use and remembers
a failure, which every later call reports as the provider's reason to decline.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

__all__ = [
    "SOURCE",
    "TIERS",
    "BuildError",
    "host_tier",
    "library",
    "loaded_tier",
    "status",
    "tier",
    "why_not_loaded",
    "why_unavailable",
]

log = logging.getLogger("xy_inductor")

SOURCE = Path(__file__).with_name("attention.cpp")

# Flags per tier, as Inductor's CPU vector ISAs spell them (torch/_inductor/cpu_vec_isa.py).
_TIER_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": (
        "-mavx512f",
        "-mavx512dq",
        "-mavx512vl",
        "-mavx512bw",
        "-mfma",
        "-DCPU_CAPABILITY_AVX512",
    ),
    "avx2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"),
}
# AVX-512 with the BF16 extension (vdpbf16ps): bfloat16 dot products without widening.
_TIER_FLAGS["avx512_bf16"] = (*_TIER_FLAGS["avx512"], "-mavx512bf16", "-DXYSERVE_AVX512_BF16")


class BuildError(RuntimeError):
    """The native kernels could not be built or loaded; the message says why."""


TIERS = ("avx2", "avx512", "avx512_bf16")
"""Vector tiers, each needing the one before it."""


def host_tier() -> str | None:
    """The best tier this CPU runs, or None (no tier built)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    if capability == "AVX2":
        return "avx2"
    return None


def tier() -> str | None:
    """The tier built and run: ``XYSERVE_CPU_ATTN_TIER`` when set (a lower tier than the CPU's,
    to run the kernels another CPU would), else ``host_tier()``; None when neither is usable."""
    host = host_tier()
    wanted = os.environ.get("XYSERVE_CPU_ATTN_TIER")
    if not wanted or host is None:
        return host
    if wanted in TIERS and TIERS.index(wanted) <= TIERS.index(host):
        return wanted
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def why_unavailable() -> str | None:
    """Why the native kernels cannot serve this process, without building; None when they
    may (the build itself can still fail: ``library()`` then raises ``BuildError``)."""
    if os.environ.get("XYSERVE_CPU_ATTN", "1") == "0":
        return "disabled by XYSERVE_CPU_ATTN=0"
    if host_tier() is None:
        return (
            f"no AVX2 or AVX-512 on this {platform.machine()} CPU (ATen's CPU capability is "
            f"{torch.backends.cpu.get_cpu_capability()})"
        )
    if tier() is None:
        return (
            f"XYSERVE_CPU_ATTN_TIER={os.environ['XYSERVE_CPU_ATTN_TIER']}: expected one of "
            f"{', '.join(TIERS)} up to this CPU's {host_tier()}"
        )
    if _compiler() is None:
        return "no C++ compiler (set CXX, or install g++)"
    if shutil.which("ninja") is None and not _ninja_module():
        return "ninja is not installed (torch.utils.cpp_extension builds with it)"
    return None


def _ninja_module() -> bool:
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False
    return True


def _cache_dir() -> Path:
    root = os.environ.get("XYSERVE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "xy_inductor"


@dataclass(frozen=True)
class _Loaded:
    module: ModuleType
    tier: str


def library() -> ModuleType:
    """The loaded native module, built once per machine, tier and torch; raises
    ``BuildError`` (every time, with the first failure's reason) when it cannot be."""
    loaded = _load()
    if isinstance(loaded, BuildError):
        raise loaded
    return loaded.module


def why_not_loaded() -> str | None:
    """None when the library is loaded (building or loading it now if this process has not
    yet), else why it cannot be: ``why_unavailable()``'s reason or the build's failure."""
    loaded = _load()
    return str(loaded) if isinstance(loaded, BuildError) else None


def loaded_tier() -> str | None:
    """The tier of the loaded library (``avx512`` where ``avx512_bf16`` failed to build), or
    None when none is loaded (yet)."""
    if _load.cache_info().currsize == 0:
        return None
    loaded = _load()
    return None if isinstance(loaded, BuildError) else loaded.tier


@functools.cache
def _load() -> _Loaded | BuildError:
    """One attempt per process; a failure is returned, so it is remembered too. A compiler
    that cannot build ``avx512_bf16`` (``-mavx512bf16`` needs GCC 10 or Clang 9) falls back to
    ``avx512``, unless ``XYSERVE_CPU_ATTN_TIER`` asked for that tier."""
    reason = why_unavailable()
    if reason is not None:
        return BuildError(reason)
    vector_tier = tier()
    assert vector_tier is not None
    candidates = [vector_tier]
    if vector_tier == "avx512_bf16" and not os.environ.get("XYSERVE_CPU_ATTN_TIER"):
        candidates.append("avx512")
    failures = []
    for candidate in candidates:
        try:
            return _Loaded(_build(candidate), candidate)
        except (OSError, RuntimeError, ImportError) as e:
            failures.append(f"{candidate}: {e}")
            log.warning("xyserve: CPU attention kernels (%s) not built: %s", candidate, e)
    return BuildError(f"building or loading {SOURCE.name} failed: {'; '.join(failures)}")


def _build(vector_tier: str) -> ModuleType:
    flags = ["-O3", "-fopenmp", *_TIER_FLAGS[vector_tier]]
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                torch.__version__,
                str(torch.version.git_version),
                # each installation its own build: ninja would rebuild one shared between two
                # venvs (their include paths differ) every time the other one ran
                str(Path(torch.__file__).parent),
                str(_compiler()),
                sys.platform,
                " ".join(flags),
            )
        )
    ).hexdigest()[:16]
    name = f"xyserve_cpu_attn_{vector_tier}"
    directory = _cache_dir() / f"cpu-attn-{vector_tier}-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{name}*.so")):
        log.warning("xyserve: compiling its CPU attention kernels, once per machine and torch")
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=True,
    )


def status() -> str:
    """One line for ``xyserve providers``: loaded (and the tier), not built yet, or why not."""
    reason = why_unavailable()
    if reason is not None:
        return f"no: {reason}"
    if _load.cache_info().currsize == 0:
        return "not loaded yet (the first CPU attention_varlen call builds or loads them)"
    loaded = _load()
    if isinstance(loaded, BuildError):
        return f"no: {loaded}"
    return f"loaded ({loaded.tier} vectors)"
