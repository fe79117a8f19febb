"""The ``--out`` folder of ``python -m crane predict``: what it writes, and the files of an earlier run.

A run writes ``scores.csv``, ``skipped.csv`` (only when files were skipped), ``reference.json``
(only when it scored with a reference memory: which one, and why), ``panels/``, ``maps/`` and ``masks/``, and lists every file it wrote in :data:`MANIFEST` (one line per
file: relative path, size, modification time; appended as each file is written, so even a
killed run leaves an accurate list). A new run into the same folder first removes the files
the earlier run listed, if they are still as it wrote them (same size and modification time),
plus its leftover temporary files, so ``scores.csv`` and the panels always describe the same
run. Files it cannot attribute to an earlier run (a ``scores.csv`` or a panel that is in no
list, or was changed since) are never deleted: the run is refused before any model work.
Other files in the folder are left alone.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

import numpy as np

from crane.errors import CraneError
from crane.files import TEMP_NAME, AtomicFile, atomic_write, write_json

MANIFEST = ".crane_predict_files.tsv"
RESULT_FILES = ("scores.csv", "skipped.csv", "reference.json")
RESULT_FOLDERS = ("panels", "maps", "masks")


class OutputFolderError(CraneError):
    """The ``--out`` folder holds results predict cannot attribute to an earlier run (one-line message)."""


def _stat(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class OutputFolder:
    """The ``--out`` folder: :meth:`check` before the model loads, :meth:`clean` before the first result,
    :meth:`record` after each file written."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest = self.root / MANIFEST
        self._ours: list[Path] = []
        self._log = None

    def _listed(self) -> dict[Path, tuple[int, int]]:
        listed: dict[Path, tuple[int, int]] = {}
        try:
            lines = self.manifest.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return listed
        for line in lines:
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                rel = Path(parts[0])
                if not rel.is_absolute() and ".." not in rel.parts:
                    listed[self.root / rel] = (int(parts[1]), int(parts[2]))
        return listed

    def _result_files(self) -> list[Path]:
        found = [self.root / name for name in RESULT_FILES if (self.root / name).is_file()]
        found += [p for p in self.root.iterdir() if p.is_file() and TEMP_NAME.match(p.name)
                  and p.name.split(".")[1] in ("scores", "skipped", "reference")]
        for folder in RESULT_FOLDERS:
            if (self.root / folder).is_dir():
                found += sorted(p for p in (self.root / folder).rglob("*") if p.is_file() or p.is_symlink())
        return found

    def check(self) -> None:
        """Find the earlier run's files; raise :class:`OutputFolderError` if any result file is not one of them."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputFolderError(f"--out {self.root} is a file, not a folder")
        if not self.root.is_dir():
            return
        listed = self._listed()
        ours, foreign = [], []
        for path in self._result_files():
            if TEMP_NAME.match(path.name) or (path in listed and not path.is_symlink() and _stat(path) == listed[path]):
                ours.append(path)
            else:
                foreign.append(path)
        if foreign:
            shown = ", ".join(str(p.relative_to(self.root)) for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            what = ("that the earlier predict run did not write, or that changed since" if self.manifest.is_file()
                    else f"of unknown origin (no {MANIFEST}, the list predict keeps of the files it writes)")
            raise OutputFolderError(f"--out {self.root} holds result files {what}: {shown}{more}; choose a new "
                                    "--out folder, or move them away")
        self._ours = ours

    def clean(self) -> int:
        """Delete the earlier run's files (found by :meth:`check`) and start a new list; return how many."""
        for path in self._ours:
            path.unlink(missing_ok=True)
        for folder in RESULT_FOLDERS:
            base = self.root / folder
            if base.is_dir():  # remove the sub-folders left empty, deepest first
                for sub in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    if not any(sub.iterdir()):
                        sub.rmdir()
                if not any(base.iterdir()):
                    base.rmdir()
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.manifest, "w", encoding="utf-8")
        removed, self._ours = len(self._ours), []
        return removed

    def record(self, path: Path) -> None:
        """Add a file just written (inside the folder) to the list."""
        size, mtime = _stat(path) or (0, 0)
        self._log.write(f"{path.relative_to(self.root).as_posix()}\t{size}\t{mtime}\n")
        self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _resize_to(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """The ``S x S`` map resized (bilinear) back to the original ``height x width``."""
    import cv2

    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)


def decision(score: float, threshold: Optional[float]) -> str:
    """``anomalous`` (score >= threshold), ``normal``, or empty without a threshold."""
    if threshold is None:
        return ""
    return "anomalous" if score >= threshold else "normal"


class PredictOutputs:
    """Writers for one predict run: the CSV rows (streamed to a temp file, published by :meth:`close`)
    and the per-image files, each recorded in the folder's list.

    ``options``: ``no_panels``, ``save_maps``, ``save_masks`` (bools); ``image_threshold`` and
    ``pixel_threshold`` may be ``None``. ``reference``: what the run records of the reference memory it
    scores with (:meth:`crane.inspection.reference_use.ReferenceChoice.record`), written at once to
    ``reference.json``; ``None``: zero-shot, no such file.
    """

    def __init__(self, folder: OutputFolder, options: Any, image_threshold: Optional[float],
                 pixel_threshold: Optional[float], reference: Optional[dict[str, Any]] = None) -> None:
        self.folder, self.out, self.options = folder, folder.root, options
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold
        self.csv_path = self.out / "scores.csv"
        self._file = AtomicFile(self.csv_path, "w", newline="")
        self._csv = csv.writer(self._file.file, lineterminator="\n")
        self._csv.writerow(["path", "score", "decision"])
        self.rows = 0
        self.anomalous = 0
        if reference is not None:
            path = write_json(self.out / "reference.json", {"reference": reference})
            self.folder.record(path)

    def write(self, path: Path, name: str, image: np.ndarray, score: float, anomaly_map: np.ndarray) -> None:
        """One scored image: its CSV row, panel, map and mask (as the options ask)."""
        from crane.inspection.visualize import save_panel, write_png

        result = decision(score, self.image_threshold)
        self._csv.writerow([path.as_posix(), repr(float(score)), result])
        self.rows += 1
        self.anomalous += result == "anomalous"
        if not self.options.no_panels:
            target = self.out / "panels" / f"{name}.png"
            save_panel(target, image, anomaly_map, self.pixel_threshold, score=score,
                       caption=name + (f" | {result}" if result else ""))
            self.folder.record(target)
        if self.options.save_maps:
            target = self.out / "maps" / f"{name}.npy"
            with atomic_write(target, "wb") as f:
                np.save(f, anomaly_map.astype(np.float32))
            self.folder.record(target)
        if self.options.save_masks:
            target = self.out / "masks" / f"{name}.png"
            full = _resize_to(anomaly_map, *image.shape[:2])
            write_png(target, (full >= self.pixel_threshold).astype(np.uint8) * 255)
            self.folder.record(target)

    def close(self, skipped: list[tuple[Path, str]]) -> None:
        """Publish ``scores.csv`` and ``skipped.csv`` (the latter only when files were skipped)."""
        self._file.commit()
        self.folder.record(self.csv_path)
        if skipped:
            skipped_path = self.out / "skipped.csv"
            with atomic_write(skipped_path, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["path", "error"])
                writer.writerows([path.as_posix(), reason] for path, reason in skipped)
            self.folder.record(skipped_path)
        self.folder.close()
