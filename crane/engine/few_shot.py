"""The few-shot research protocol of ``test.py --few_shot K`` (``docs/method.md``, "Few-shot").

For each class, ``K`` normal images are drawn from the dataset's ``train`` split and form the reference
memory that class's test images are scored with. The draw depends only on the seed, the class and the
``train`` listing of ``meta.json`` (it is made once, before any model work, and carried to every
process), so any number of processes scores with the same references. Each seed of
``--few_shot_seeds`` is one run in its own folder (``seed_S/``, a complete ``test.py`` result); the
summary over the seeds (``summary.json``, ``summary.md``) gives each metric's mean and spread, as
few-shot papers report them.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from crane.data.meta import read_meta
from crane.engine import results
from crane.engine.results import METRICS
from crane.errors import CraneError

SUMMARY = "summary.json"


class FewShotError(CraneError):
    """The dataset cannot give the references ``--few_shot`` asks for (one-line message)."""


def normal_training_images(root: Path) -> dict[str, list[str]]:
    """``{class: [img_path, ...]}``: the normal images of each class in the ``train`` split of ``root/meta.json``,
    in listing order (paths relative to ``root``)."""
    listing = read_meta(root)["train"]
    return {c: [s["img_path"] for s in samples if int(s.get("anomaly", 0)) == 0] for c, samples in listing.items()}


def draw_references(root: Path, classes: Sequence[str], k: int, seed: int) -> dict[str, list[str]]:
    """``{class: K img_paths}``: ``k`` normal training images of each class of ``classes``, drawn without
    replacement by a generator seeded with ``(seed, CRC-32 of the class name)`` and kept in listing order, so a
    class draws the same images whatever other classes are evaluated.

    Raises :class:`FewShotError` naming every class with fewer than ``k`` normal training images (several
    medical sets have none: their images are all in the ``test`` split).
    """
    normal = normal_training_images(root)
    short = [(c, len(normal.get(c, []))) for c in classes if len(normal.get(c, [])) < k]
    if short:
        listed = ", ".join(f"{c!r} has {n}" for c, n in short)
        raise FewShotError(f"--few_shot {k} takes {k} normal images per class from the train split of "
                           f"{root / 'meta.json'}, but {listed}; use a smaller --few_shot, or evaluate zero-shot "
                           "(sets whose images are all in the test split have no references)")
    out = {}
    for c in classes:
        rng = np.random.default_rng([seed, zlib.crc32(c.encode("utf-8"))])
        chosen = sorted(rng.choice(len(normal[c]), size=k, replace=False).tolist())
        out[c] = [normal[c][i] for i in chosen]
    return out


def seed_folder(base: Path, seed: int) -> Path:
    """The results folder of one seed's run."""
    return base / f"seed_{seed}"


def spread(values: Sequence[Optional[float]]) -> dict[str, Optional[float]]:
    """``{"mean", "std", "min", "max", "runs"}`` of the defined values (``std``: sample standard deviation,
    ``ddof=1``; 0 for a single run); ``None`` entries where no value is defined."""
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "runs": 0}
    return {"mean": float(kept.mean()), "std": float(kept.std(ddof=1)) if kept.size > 1 else 0.0,
            "min": float(kept.min()), "max": float(kept.max()), "runs": int(kept.size)}


def summarize_seeds(base: Path, seeds: Sequence[int], k: int) -> str:
    """Write ``base/summary.json`` and ``base/summary.md`` from each seed's ``metrics.json``: per metric (class
    mean, and per class) the mean and spread over the seeds, with the references each seed drew. Returns the
    Markdown table (mean ± std in %)."""
    runs = {s: results.read_json(seed_folder(base, s) / "metrics.json") for s in seeds}
    missing = [str(seed_folder(base, s) / "metrics.json") for s, r in runs.items() if r is None]
    if missing:
        raise FewShotError(f"missing seed results: {', '.join(missing)}")
    classes = list(runs[seeds[0]]["classes"])
    summary = {
        "few_shot": k, "seeds": list(seeds),
        "mean": {m: spread([runs[s]["mean"][m] for s in seeds]) for m in METRICS},
        "classes": {c: {m: spread([runs[s]["classes"][c][m] for s in seeds]) for m in METRICS} for c in classes},
        "runs": {str(s): str(seed_folder(base, s)) for s in seeds},
        "references": {str(s): runs[s].get("references") for s in seeds},
        "args": {key: value for key, value in runs[seeds[0]]["args"].items() if key != "few_shot_seed"},
    }
    results.write_json(base / SUMMARY, summary)
    table = summary_table(summary)
    results.write_text(base / "summary.md", f"# {summary['args'].get('dataset', '')}: {k}-shot, seeds "
                                            f"{' '.join(map(str, seeds))} (mean ± sample std over the seeds)\n\n"
                                            f"{table}\n")
    return table


def _cell(value: Mapping[str, Any]) -> str:
    if value["mean"] is None:
        return "-"
    text = results.percent(value["mean"])
    return f"{text} ± {results.fixed(100.0 * value['std'])}" if value["runs"] > 1 else text


def summary_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of a :func:`summarize_seeds` summary: a row per class and the mean row, ``mean ± std`` in %."""
    from tabulate import tabulate

    rows = [[c, *(_cell(v[m]) for m in METRICS)] for c, v in summary["classes"].items()]
    rows.append(["mean", *(_cell(summary["mean"][m]) for m in METRICS)])
    return tabulate(rows, headers=["class", *METRICS], tablefmt="github", disable_numparse=True,
                    colalign=("left",) + ("right",) * len(METRICS))
