"""Collect ``metrics.json`` files into the layout of Table 1 (Crane and Crane+, 14 datasets).

    python scripts/make_table.py RESULTS [--paper] [--out PREFIX]

Reads ``RESULTS/{crane,cranep}/DATASET/metrics.json`` (what ``bash test.sh``
writes) and, beside each, few-shot results ``RESULTS/{crane,cranep}_fewshot_K/DATASET/summary.json``
(``test.py --few_shot K --save_path RESULTS/crane_fewshot_K/DATASET``: the mean over its seeds, with
the sample standard deviation when there are several), and writes ``PREFIX.md`` and ``PREFIX.csv`` (default ``RESULTS/table1``):
one row per dataset, the industrial and medical averages, and for each method
the class-mean image AUROC / AP / F1-max and pixel AUROC / AUPRO / F1-max in %.
Undefined values (image metrics of all-anomalous sets, pixel metrics of
image-only sets) are shown as ``-``; an average is over the datasets where the
value is defined. ``--paper`` adds the published numbers (docs/method.md §8):
in parentheses in the Markdown table, as ``paper_*`` columns in the CSV.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

from crane.engine.results import METRICS, fixed, mean_defined, write_csv, write_text
from crane.settings import random_weights

METHODS = {"crane": "Crane", "cranep": "Crane+"}
INDUSTRIAL = {"mvtec": "MVTec AD", "visa": "VisA", "mpdd": "MPDD", "btad": "BTAD", "sdd": "SDD", "dagm": "DAGM",
              "dtd": "DTD-Synthetic"}
MEDICAL = {"headct": "HeadCT", "brainmri": "BrainMRI", "br35h": "Br35H", "isic": "ISIC",
           "cvc-colondb": "CVC-ColonDB", "cvc-clinicdb": "CVC-ClinicDB", "tn3k": "TN3K"}
SHORT = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1": "I-F1", "pixel_auroc": "P-AUROC",
         "pixel_aupro": "P-AUPRO", "pixel_f1": "P-F1"}
_ = None
# Published class means (%), in METRICS order: image AUROC, AP, F1-max / pixel AUROC, AUPRO, F1-max.
PAPER = {
    "mvtec": {"crane": (93.8, 97.5, 93.8, 91.3, 84.6, 41.3), "cranep": (93.9, 97.6, 93.6, 91.2, 88.1, 43.8)},
    "visa": {"crane": (85.3, 87.9, 82.6, 95.1, 87.5, 30.9), "cranep": (83.6, 86.7, 81.2, 95.3, 90.6, 30.2)},
    "mpdd": {"crane": (81.4, 84.8, 81.6, 97.0, 89.3, 38.2), "cranep": (81.0, 84.1, 83.0, 97.6, 93.2, 42.0)},
    "btad": {"crane": (94.4, 95.9, 91.7, 96.6, 81.3, 56.9), "cranep": (96.3, 97.0, 93.7, 96.7, 86.8, 61.1)},
    "sdd": {"crane": (97.8, 94.3, 91.6, 97.9, 95.9, 60.2), "cranep": (97.8, 94.5, 89.7, 99.2, 97.4, 62.4)},
    "dagm": {"crane": (99.2, 97.4, 95.8, 96.3, 91.2, 67.2), "cranep": (98.9, 96.1, 94.7, 96.2, 93.8, 66.8)},
    "dtd": {"crane": (96.3, 98.5, 95.3, 98.3, 93.3, 68.8), "cranep": (95.8, 98.2, 94.6, 98.8, 96.0, 71.8)},
    "headct": {"crane": (95.3, 95.7, 91.1, _, _, _), "cranep": (94.6, 95.4, 89.7, _, _, _)},
    "brainmri": {"crane": (95.4, 96.1, 93.9, _, _, _), "cranep": (96.3, 97.4, 93.5, _, _, _)},
    "br35h": {"crane": (96.3, 96.8, 91.7, _, _, _), "cranep": (96.4, 97.2, 91.0, _, _, _)},
    "isic": {"crane": (_, _, _, 88.1, 75.3, 69.8), "cranep": (_, _, _, 90.6, 83.2, 73.4)},
    "cvc-colondb": {"crane": (_, _, _, 82.5, 73.0, 36.0), "cranep": (_, _, _, 86.0, 78.6, 40.2)},
    "cvc-clinicdb": {"crane": (_, _, _, 84.0, 69.3, 42.5), "cranep": (_, _, _, 88.3, 74.5, 47.9)},
    "tn3k": {"crane": (_, _, _, 79.4, 48.8, 44.7), "cranep": (_, _, _, 80.4, 51.7, 45.5)},
}

Values = dict[str, dict[str, Optional[float]]]  # method -> metric -> % (None: undefined or missing)
FEW_SHOT = re.compile(r"^(crane|cranep)_fewshot_(\d+)$")
"""Folders of few-shot results: ``crane_fewshot_4`` holds Crane's 4-shot results."""


def methods_in(root: Path) -> dict[str, str]:
    """``{folder: column label}``: Crane and Crane+, each followed by its few-shot folders under ``root`` (by K)."""
    found = {}
    for method, label in METHODS.items():
        found[method] = label
        shots = sorted((int(m.group(2)), p.name) for p in root.glob(f"{method}_fewshot_*")
                       if p.is_dir() and (m := FEW_SHOT.match(p.name)) and m.group(1) == method)
        found.update((name, f"{label} {k}-shot") for k, name in shots)
    return found


def _few_shot_result(path: Path) -> dict:
    """A ``summary.json`` as a ``metrics.json``: the seeds' mean per metric (and ``std``, ``runs``)."""
    summary = json.loads(path.read_text(encoding="utf-8"))
    return {"mean": {m: v["mean"] for m, v in summary["mean"].items()},
            "std": {m: v["std"] for m, v in summary["mean"].items()},
            "runs": {m: v["runs"] for m, v in summary["mean"].items()}, "args": summary.get("args", {})}


def read_results(root: Path, methods: dict[str, str]) -> tuple[dict[str, Values], list[str], set[str], set[str],
                                                                dict[str, Values]]:
    """``{dataset: {method: {metric: %}}}`` of the datasets found, the missing result files (zero-shot methods
    only), the AUPRO definitions they used, the random-weights flags any of them ran with, and the spread over
    seeds of the few-shot methods ``{dataset: {method: {metric: % std}}}`` (only where several seeds ran)."""
    table: dict[str, Values] = {}
    spreads: dict[str, Values] = {}
    missing, aupro, random = [], set(), set()
    for ds in (*INDUSTRIAL, *MEDICAL):
        for method in methods:
            few_shot = method not in METHODS
            path = root / method / ds / ("summary.json" if few_shot else "metrics.json")
            if not path.is_file():
                if not few_shot:
                    missing.append(str(path))
                continue
            result = _few_shot_result(path) if few_shot else json.loads(path.read_text(encoding="utf-8"))
            aupro.add(result.get("args", {}).get("aupro_method", "crane"))
            random.update(random_weights(result.get("args", {})))
            table.setdefault(ds, {})[method] = {m: None if result["mean"][m] is None else 100.0 * result["mean"][m]
                                                for m in METRICS}
            if few_shot:
                spreads.setdefault(ds, {})[method] = {m: 100.0 * result["std"][m] for m in METRICS
                                                      if result["runs"][m] > 1}
    return table, missing, aupro, random, spreads


def paper_values(ds: str) -> Values:
    return {method: dict(zip(METRICS, PAPER[ds][method])) for method in METHODS}


def average(rows: list[Values], methods: dict[str, str]) -> Values:
    """Per method and metric, the mean over the rows where it is defined."""
    return {method: {m: mean_defined(row.get(method, {}).get(m) for row in rows) for m in METRICS}
            for method in methods}


Row = tuple[str, Values, Values, Values]  # label, ours, paper, spread over seeds (few-shot)


def build_rows(table: dict[str, Values], methods: dict[str, str],
               spreads: Optional[dict[str, Values]] = None) -> list[Row]:
    """``(label, ours, paper, spread)`` for each dataset row and the two average rows (averages have no spread)."""
    rows = []
    spreads = spreads or {}
    for group, label in ((INDUSTRIAL, "Industrial average"), (MEDICAL, "Medical average")):
        present = [ds for ds in group if ds in table]
        for ds in present:
            rows.append((group[ds], table[ds], paper_values(ds), spreads.get(ds, {})))
        if present:
            rows.append((label, average([table[ds] for ds in present], methods),
                         average([paper_values(ds) for ds in present], METHODS), {}))
    return rows


def _cell(ours: Optional[float], paper: Optional[float], with_paper: bool, std: Optional[float] = None) -> str:
    text = "-" if ours is None else fixed(ours)
    if ours is not None and std is not None:
        text += f" ± {fixed(std)}"
    if with_paper and paper is not None:
        text += f" ({paper:.1f})"
    return text


def markdown(rows: list[Row], with_paper: bool, aupro: set[str], missing: list[str],
             random: set[str] = frozenset(), methods: Optional[dict[str, str]] = None) -> str:
    from tabulate import tabulate

    methods = methods or METHODS
    headers = ["Dataset"] + [f"{methods[method]} {SHORT[m]}" for method in methods for m in METRICS]
    body = [[label] + [_cell(ours.get(method, {}).get(m), paper.get(method, {}).get(m), with_paper,
                             spread.get(method, {}).get(m))
                       for method in methods for m in METRICS] for label, ours, paper, spread in rows]
    notes = [f"AUPRO: {', '.join(sorted(aupro)) or 'crane'} definition"
             + (" (published 200-threshold)" if aupro <= {"crane"} else "")
             + ("; the paper's numbers in parentheses" if with_paper else "")]
    if any(method not in METHODS for method in methods):
        notes.append("K-shot columns: test.py --few_shot K, the mean over its seeds (± the sample standard "
                     "deviation where several ran); the paper reports zero-shot only")
    if missing:  # "RESULTS/METHOD/DATASET/metrics.json" -> "METHOD: DATASET, ..."
        by_method: dict[str, list[str]] = {}
        for path in missing:
            parts = Path(path).parts
            by_method.setdefault(parts[-3], []).append(parts[-2])
        notes.append(f"{len(missing)} result file(s) missing, left out of the table and the averages ("
                     + "; ".join(f"{METHODS.get(m, m)}: {' '.join(ds)}" for m, ds in by_method.items()) + ")")
    banner = (f"> RANDOM WEIGHTS ({', '.join(sorted(random))}): these numbers are meaningless; the runs only "
              "exercised the pipeline\n\n") if random else ""
    title = "zero-shot" if all(method in METHODS for method in methods) else "zero-shot and few-shot"
    return banner + f"# Table 1: {title} anomaly detection (class means, %)\n\n" + tabulate(
        body, headers=headers, tablefmt="github", disable_numparse=True) + "\n\n" + "\n".join(
        f"- {n}" for n in notes) + "\n"


def csv_rows(rows: list[Row], with_paper: bool, methods: Optional[dict[str, str]] = None
             ) -> tuple[list[str], list[dict]]:
    methods = methods or METHODS
    columns = ["dataset"] + [f"{method}_{m}" for method in methods for m in METRICS]
    columns += [f"{method}_{m}_std" for method in methods if method not in METHODS for m in METRICS]
    if with_paper:
        columns += [f"paper_{method}_{m}" for method in METHODS for m in METRICS]
    out = []
    for label, ours, paper, spread in rows:
        row = {"dataset": label}
        for method in methods:
            for m in METRICS:
                value = ours.get(method, {}).get(m)
                row[f"{method}_{m}"] = "" if value is None else f"{value:.4f}"
                if method not in METHODS:
                    std = spread.get(method, {}).get(m)
                    row[f"{method}_{m}_std"] = "" if std is None else f"{std:.4f}"
                if with_paper and method in METHODS:
                    row[f"paper_{method}_{m}"] = "" if paper[method][m] is None else f"{paper[method][m]:.1f}"
        out.append(row)
    return columns, out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="folder holding {crane,cranep}/DATASET/metrics.json")
    parser.add_argument("--paper", action="store_true", help="show the paper's numbers beside ours")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default RESULTS/table1)")
    parser.add_argument("--allow_random", "--allow-random", action="store_true",
                        help="with --paper: put results of random weights (--clip_weights synthetic) beside the "
                             "paper's numbers anyway")
    args = parser.parse_args(argv)
    methods = methods_in(args.results)
    table, missing, aupro, random, spreads = read_results(args.results, methods)
    if not table:
        print(f"make_table.py: no metrics.json under {args.results}/{{crane,cranep}}/DATASET/; run "
              "'bash test.sh DEVICE' first", file=sys.stderr)
        return 2
    if random and args.paper and not args.allow_random:
        print(f"make_table.py: the results under {args.results} were made with random weights "
              f"({', '.join(sorted(random))}); they are not put beside the paper's numbers (pass --allow_random to "
              "do it anyway)", file=sys.stderr)
        return 2
    rows = build_rows(table, methods, spreads)
    prefix = str(args.out or args.results / "table1")
    text = markdown(rows, args.paper, aupro, missing, random, methods)
    write_text(Path(prefix + ".md"), text)
    write_csv(Path(prefix + ".csv"), *csv_rows(rows, args.paper, methods))
    print(text)
    print(f"written: {prefix}.md, {prefix}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
