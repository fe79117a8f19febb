"""The versions ``scripts/gpu_check.sh`` runs with, checked against what crane needs, and the GPUs seen.

    python scripts/gpu_versions.py [--device cuda]

Prints one line of versions (python, torch and its CUDA, timm, numpy, open_clip_torch) and one line
per GPU. Exits 2 with one line on stderr, before any model work, when one of these packages is
missing, fails to import, or is older than crane needs: crane's own floors (:data:`MINIMUM`) and
what the installed open_clip_torch itself requires of them (3.3: ``timm>=1.0.17``); with
``--device cuda`` also when torch sees no GPU.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import os
import platform
import sys
from typing import Callable, Optional

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

MINIMUM = {"torch": "2.11", "timm": "1.0.15", "numpy": "2.0", "open_clip_torch": "3.0"}
"""crane's own floors. torch 2.11: the oldest torch crane has run under (the lent GPU machine's image;
``GPU_CHECK_DEVICE=cpu`` passes with it; pyproject.toml pins 2.14.1 to reproduce). timm 1.0.15 and
open_clip_torch 3.0: as pyproject.toml declares. numpy 2.0: crane has only been run under numpy 2."""
IMPORTS = {"torch": "torch", "timm": "timm", "numpy": "numpy", "open_clip_torch": "open_clip"}
"""Distribution name -> module imported to check that it loads (open_clip also needs ftfy, ...)."""
CARRY_HINT = "prepare .whl/ with `bash scripts/gpu_wheels.sh` and name \".whl\" in the device call's carry"


def installed(name: str) -> Optional[str]:
    """The installed version of distribution ``name``, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def needs(version_of: Callable[[str], Optional[str]] = installed,
          requires_of: Callable[[str], Optional[list[str]]] = metadata.requires) -> dict[str, list[tuple[str, str]]]:
    """Package -> [(specifier, who needs it)]: crane's :data:`MINIMUM` and every unconditional requirement
    the installed open_clip_torch declares on one of those packages."""
    out: dict[str, list[tuple[str, str]]] = {name: [(f">={floor}", "crane")] for name, floor in MINIMUM.items()}
    clip = version_of("open_clip_torch")
    if clip is None:
        return out
    keys = {canonicalize_name(name): name for name in out}
    for line in requires_of("open_clip_torch") or []:
        req = Requirement(line)
        name = keys.get(canonicalize_name(req.name))
        if name and req.marker is None and req.specifier:
            out[name].append((str(req.specifier), f"open_clip_torch {clip}"))
    return out


def version_problem(versions: dict[str, Optional[str]], wanted: dict[str, list[tuple[str, str]]]) -> Optional[str]:
    """The first package that is missing or does not meet a need in ``wanted`` (:func:`needs`), as one line;
    None when all are met. ``versions``: package -> installed version (None: not installed)."""
    for name, specs in wanted.items():
        have = versions.get(name)
        if have is None:
            return f"{name} is not installed for {sys.executable}: {CARRY_HINT}"
        for spec, who in specs:
            if not SpecifierSet(spec).contains(Version(have), prereleases=True):
                fix = ("the machine's own torch is used (too large to carry)" if name == "torch" else
                       f"a wheel that does can travel in .whl: `bash scripts/gpu_wheels.sh {name}==VERSION`")
                return f"{name} {have} is older than {who} needs ({name}{spec}); {fix}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser("gpu_versions.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: also require a visible GPU")
    args = p.parse_args(argv)
    versions = {name: installed(name) for name in MINIMUM}
    print(f"python {platform.python_version()}, "
          + ", ".join(f"{name} {have or 'MISSING'}" for name, have in versions.items()) + f", {os.cpu_count()} CPUs",
          flush=True)
    problem = version_problem(versions, needs())
    for name, module in IMPORTS.items():
        if problem:
            break
        try:
            importlib.import_module(module)
        except ImportError as e:  # e.g. open_clip without ftfy
            problem = f"import {module} failed ({e}): {CARRY_HINT}"
    if problem:
        print(f"gpu_check.sh: {problem}; nothing was run", file=sys.stderr)
        return 2
    import torch

    print(f"torch CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check.sh: no CUDA GPU visible to {sys.executable} (torch.cuda.is_available() is False); "
              "nothing was run", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
