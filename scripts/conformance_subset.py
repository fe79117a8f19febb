"""Copy the compact subset of the public conformance data that ships in ``tests/conformance/``.

    python scripts/conformance_subset.py [FULL] [OUT]

``FULL`` is the full conformance set (default ``../shared/conformance`` beside the checkout), ``OUT``
the subset folder (default ``tests/conformance``). Files are copied byte for byte; ``cases.json``
keeps only the cases in :data:`CASES` (the same JSON otherwise). ``tests/test_conformance_subset.py``
checks, where the full set is present, that the shipped files still equal it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("crane_mvtec_e5", "cranep_mvtec_e1_soft")
"""A Crane case with a training step (``crane_mvtec_e5``) and a Crane+ case (``cranep_mvtec_e1_soft``)."""
COPIED = ("README.md", "synth.py", "metrics_expected.json", "checkpoints", "pipeline",
          *(f"cases/{name}" for name in CASES))
"""Everything but ``cases.json`` (filtered) and this folder's own README (``README.md`` here is
renamed ``README-full-set.md``, the full set's description)."""
LIMIT_BYTES = 20_000_000


def subset_cases(full: Path) -> dict:
    """``cases.json`` of ``full`` with only :data:`CASES`, in their order there."""
    data = json.loads((full / "cases.json").read_text(encoding="utf-8"))
    data["cases"] = [c for c in data["cases"] if c["name"] in CASES]
    return data


def target_name(relative: str) -> str:
    """Where a file of the full set goes in the subset (its README is kept under another name)."""
    return "README-full-set.md" if relative == "README.md" else relative


def copy_subset(full: Path, out: Path) -> int:
    """Copy the subset from ``full`` into ``out`` (its README.md is left alone); return its size in bytes."""
    for relative in COPIED:
        source, target = full / relative, out / target_name(relative)
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, copy_function=shutil.copyfile)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    (out / "cases.json").write_text(json.dumps(subset_cases(full), indent=1) + "\n", encoding="utf-8")
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("full", nargs="?", type=Path, default=REPO.parent / "shared" / "conformance")
    parser.add_argument("out", nargs="?", type=Path, default=REPO / "tests" / "conformance")
    args = parser.parse_args(argv)
    if not (args.full / "cases.json").is_file():
        print(f"error: no conformance set at {args.full} (cases.json not found)", file=sys.stderr)
        return 2
    size = copy_subset(args.full, args.out)
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    if size > LIMIT_BYTES:
        print(f"error: the subset is {size / 1e6:.1f} MB, over {LIMIT_BYTES / 1e6:.0f} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
