"""Result files (metrics, predictions, tables), written atomically through :mod:`crane.files`: a reader
never sees a half-written file."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from crane import files
from crane.files import write_text

METRICS = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_aupro", "pixel_f1")
PREDICTION_COLUMNS = ("img_path", "cls_name", "specie_name", "anomaly", "score")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (non-finite floats are not allowed: use ``None``)."""
    files.write_json(path, obj, allow_nan=False)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Save one array as ``.npy`` atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    files.write_bytes(path, buffer.getvalue())


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write dict rows under ``columns`` as CSV atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_json(path: Path) -> Optional[Any]:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def defined(value: Optional[float]) -> Optional[float]:
    """``value`` as a float, or ``None`` when it is ``None`` or nan (an undefined metric)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def mean_defined(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the defined (non-``None``) values; ``None`` when there are none."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def fixed(value: float, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals; a value that rounds to zero prints as ``0.0``, never ``-0.0``."""
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def percent(value: Optional[float], digits: int = 1) -> str:
    """A metric fraction as a percentage (:func:`fixed`), ``-`` when undefined."""
    return "-" if value is None else fixed(100.0 * value, digits)


def metrics_table(per_class: Mapping[str, Mapping[str, Optional[float]]], mean: Mapping[str, Optional[float]],
                  label: str = "class") -> str:
    """Markdown table (tabulate ``github``): one row per class plus a ``mean`` row, values in %.

    Undefined values are shown as ``-``.
    """
    from tabulate import tabulate

    def row(name: str, values: Mapping[str, Optional[float]]) -> list:
        return [name] + [percent(values.get(m)) for m in METRICS]

    rows = [row(name, values) for name, values in per_class.items()] + [row("mean", mean)]
    return tabulate(rows, headers=[label, *METRICS], tablefmt="github", disable_numparse=True,
                    colalign=("left",) + ("right",) * len(METRICS))
