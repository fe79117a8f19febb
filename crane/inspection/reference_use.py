"""Which reference memory an inspection run scores with (few-shot, ``docs/method.md``, "Few-shot").

``python -m crane calibrate --normal DIR --reference_memory`` keeps the memory of its normal images as
``reference.pt`` beside ``thresholds.json`` (:func:`memory_path`) and records it there under ``"reference"``
(:func:`thresholds_entry`)::

    "reference": {"path": "reference.pt",        # relative to the thresholds file's folder
                  "identity": "xxh3-128:...",     # crane.files.file_identity of that file
                  "references": K, "coreset_ratio": r, "few_shot_weight": w,
                  "scoring": "leave-one-out", "leave_one_out_images": n}

The rule of ``predict`` and the app (:func:`choose_reference`): scores change only when the user can see why.
Without ``--reference`` a run scores with the memory its ``thresholds.json`` names, and only with that one
(one line says so first); a named memory that is missing or changed since is refused in one line. With
``--reference PATH`` (a ``reference.pt``, or folders of normal images to build one from), thresholds
calibrated with another memory, or zero-shot, do not fit the scores: refused in one line unless
``--threshold`` replaces both thresholds, or ``--force`` (then a warning). Everything here runs before any
model work; nothing imports torch at module level.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from crane import settings
from crane.errors import CraneError
from crane.files import file_identity

FILENAME = "reference.pt"
SCORING = "leave-one-out"
"""How ``calibrate --reference_memory`` scores its normal images (each without its own patches)."""


class ReferenceUseError(CraneError):
    """The reference memory a run would use is missing, changed, or does not fit its thresholds (one line)."""


def memory_path(thresholds_path: os.PathLike) -> Path:
    """Where ``calibrate --reference_memory`` keeps the memory of a thresholds file: ``reference.pt`` beside it."""
    return Path(thresholds_path).expanduser().parent / FILENAME


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(folder).resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def thresholds_entry(memory_file: os.PathLike, thresholds_path: os.PathLike, spec: Any,
                     leave_one_out_images: int) -> dict[str, Any]:
    """The ``"reference"`` entry of a ``thresholds.json`` calibrated with the memory saved at ``memory_file``
    (``spec``: its :class:`crane.models.memory.MemorySpec`), ``leave_one_out_images`` of the calibration images
    being references scored without their own patches."""
    memory_file = Path(memory_file)
    return {"path": _relative(memory_file, Path(thresholds_path).expanduser().parent),
            "identity": file_identity(memory_file), "references": len(spec.digests),
            "coreset_ratio": float(spec.coreset_ratio), "few_shot_weight": float(spec.weight),
            "scoring": SCORING, "leave_one_out_images": int(leave_one_out_images)}


def named_memory(thresholds: Any) -> Optional[Path]:
    """The memory a :class:`crane.inspection.thresholds.Thresholds` read from a file names (``None``: it names
    none: zero-shot thresholds), checked: it exists and is the file it was calibrated with (by
    :func:`crane.files.file_identity`). Raises :class:`ReferenceUseError` in one line otherwise."""
    entry = thresholds.meta.get("reference") if thresholds.meta else None
    if entry is None or thresholds.source is None:
        return None
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        raise ReferenceUseError(f"{thresholds.source}: its \"reference\" entry names no memory file; calibrate again "
                                "with `python -m crane calibrate --normal DIR --reference_memory`")
    path = Path(entry["path"]).expanduser()
    path = path if path.is_absolute() else Path(thresholds.source).expanduser().parent / path
    again = "calibrate again with `python -m crane calibrate --normal DIR --target_fpr RATE --reference_memory`"
    if not path.is_file():
        raise ReferenceUseError(f"{thresholds.source} was calibrated with the reference memory {path}, which is "
                                f"missing: put it back, or {again}")
    if file_identity(path) != entry.get("identity"):
        raise ReferenceUseError(f"{thresholds.source} was calibrated with the reference memory {path}, which has "
                                f"changed since (file identity {str(entry.get('identity'))[:24]}, now "
                                f"{str(file_identity(path))[:24]}): its thresholds do not fit its scores; {again}")
    return path


def peek_memory(path: os.PathLike) -> dict[str, Any]:
    """The ``spec`` of a ``reference.pt`` (``sets``, ``weight``, ``coreset_ratio``, ``digests``, ...), read
    without a model (memory-mapped: the banks are not read; :func:`crane.reference.read_reference_file`).
    :class:`ReferenceUseError` in one line when it is missing or not a reference memory; whether it fits a
    model is :func:`crane.reference.load_reference`'s check."""
    from crane.reference import ReferenceMemoryError, read_reference_file

    try:
        return read_reference_file(path, mmap=True)["spec"]
    except ReferenceMemoryError as e:
        raise ReferenceUseError(str(e)) from None


def is_memory_file(path: os.PathLike) -> bool:
    """Whether ``path`` is a reference memory file (so ``calibrate`` may replace it)."""
    try:
        peek_memory(path)
    except ReferenceUseError:
        return False
    return True


def check_memory_output(thresholds_path: os.PathLike, overwrite: bool, elsewhere: str,
                        overwrite_flag: Optional[str] = "--overwrite") -> tuple[Path, Optional[str]]:
    """Where a calibration that builds a memory keeps it (:func:`memory_path`), checked by the thresholds file's
    rule (:func:`crane.inspection.thresholds.check_replaceable`): an existing reference memory is replaced (the
    returned note says so), another file only with ``overwrite``. Returns ``(path, note or None)``; raises
    :class:`ReferenceUseError` in one line."""
    from crane.inspection.thresholds import check_replaceable

    path = memory_path(thresholds_path)
    note = check_replaceable(path, overwrite, "the reference memory", ("a reference memory", "the reference memory"),
                             is_memory_file, elsewhere, overwrite_flag, ReferenceUseError)
    return path, note


def save_calibrated_memory(memory: Any, memory_file: os.PathLike, thresholds_path: os.PathLike,
                           provenance: Mapping[str, Any], leave_one_out_images: int) -> dict[str, Any]:
    """Write the memory a calibration built (``memory``: its :class:`crane.models.memory.ReferenceMemory`) to
    ``memory_file`` (checked with :func:`check_memory_output`), recording ``provenance`` (checkpoint, its
    SHA-256, model record, what wrote it) and the thresholds file it belongs to; return the thresholds file's
    ``"reference"`` entry (:func:`thresholds_entry`)."""
    from crane.reference import save_reference

    save_reference(memory, memory_file, provenance={**provenance, "thresholds": str(thresholds_path)})
    return thresholds_entry(memory_file, thresholds_path, memory.spec, leave_one_out_images)


@dataclass
class ReferenceChoice:
    """The memory a run scores with: a ``reference.pt`` (``file``) or one built from ``images`` (paths of
    normal images, from ``folders``). ``origin``: ``"thresholds"`` (named by the thresholds file ``named_by``)
    or ``"--reference"``; ``spec``: the file's memory spec (``None`` for images)."""

    origin: str
    file: Optional[Path] = None
    images: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    named_by: Optional[str] = None
    spec: Optional[Mapping[str, Any]] = None

    def line(self, coreset_ratio: float = settings.DEFAULT_CORESET_RATIO, few_shot_weight: float = settings.DEFAULT_FEW_SHOT_WEIGHT) -> str:
        """The one line a run prints first: which memory scores, how big, and why it is used (``coreset_ratio``,
        ``few_shot_weight``: those a memory is built from images with)."""
        if self.file is not None:
            what = (f"reference memory {self.file} ({len(self.spec['digests'])} images, coreset "
                    f"{self.spec['coreset_ratio']:g}, few-shot weight {self.spec['weight']:g})")
        else:
            what = (f"a reference memory built from the {len(self.images)} images in "
                    f"{' '.join(map(str, self.folders))} (coreset {coreset_ratio:g}, few-shot weight "
                    f"{few_shot_weight:g})")
        why = f"named by {self.named_by}" if self.origin == "thresholds" else "given by --reference"
        if self.origin != "thresholds" and self.named_by is not None:
            why += f", the one {self.named_by} names"
        return f"few-shot: scoring against {what}, {why}"

    def record(self, memory: Any = None) -> dict[str, Any]:
        """What a run's output records of the memory it used (``memory``: the loaded or built
        :class:`crane.models.memory.ReferenceMemory`, when there is one)."""
        out: dict[str, Any] = {"origin": self.origin, "named_by": self.named_by}
        if self.file is not None:
            out.update(file=str(self.file.resolve()), identity=file_identity(self.file))
        else:
            out.update(folders=[str(f) for f in self.folders], images=[str(p) for p in self.images])
        if memory is not None:
            out.update(references=memory.references, coreset_ratio=memory.spec.coreset_ratio,
                       few_shot_weight=memory.spec.weight)
        return out


def reference_images(paths: Sequence[os.PathLike]) -> tuple[list[Path], list[str]]:
    """The normal images of ``--reference`` folders or files, read as ``calibrate --normal`` reads them (only
    those under ``good/`` folders when a folder has any), and notes. :class:`CraneError` in one line when a
    folder is missing or holds no images."""
    from crane.data.folders import InputError, folder_samples

    images: list[Path] = []
    notes = []
    for folder in paths:
        try:
            found = folder_samples(Path(folder))
        except InputError as e:
            raise ReferenceUseError(f"--reference {folder}: {e}; a reference memory needs normal images") from None
        normal = [s.path for s in found if not s.anomaly]
        if len(normal) < len(found):
            notes.append(f"note: --reference {folder}: using the {len(normal)} images under its good/ folders, not "
                         f"the {len(found) - len(normal)} in other folders")
        images += normal
    return list(dict.fromkeys(p.resolve() for p in images)), notes


def reference_flag_problems(given: Optional[Sequence[os.PathLike]], values: Any) -> list[str]:
    """Problems of ``--reference`` (before any model work): paths that do not exist, a ``reference.pt`` mixed
    with other paths, ``--coreset_ratio`` / ``--few_shot_weight`` away from their defaults with nothing to build
    (they build a memory from images; a ``reference.pt`` holds its own). ``values``: the parsed flags."""
    problems = [f"--reference {p}: no such file or folder" for p in given or [] if not Path(p).expanduser().exists()]
    files = [p for p in given or [] if str(p).endswith(".pt")]
    if files and len(given) > 1:
        problems.append("--reference takes one reference.pt, or folders and files of normal images, not both")
    builds = bool(given) and not files
    for s in settings.REFERENCE_SETTINGS:
        value = getattr(values, s.name, s.default)
        if value != s.default and not builds:
            what = f"{files[0]} holds a built memory with its own" if files else "no memory is built here"
            problems.append(f"--{s.name} {value}: it sets how a memory is built from images (--reference DIR); "
                            f"{what}")
    return problems


def choose_reference(given: Optional[Sequence[os.PathLike]], thresholds: Any, thresholds_used: bool,
                     force: bool = False) -> tuple[Optional[ReferenceChoice], list[str]]:
    """The memory a run scores with, and warning/note lines (module docstring's rule), before any model work.

    Args:
        given: ``--reference`` paths (``None``/empty: not given): one ``reference.pt``, or folders/files of
            normal images.
        thresholds: the run's :class:`crane.inspection.thresholds.Thresholds` (``source`` ``None``: no file).
        thresholds_used: whether a value of the thresholds file decides anything (``--threshold`` may replace
            both).
        force: a mismatch between ``--reference`` and the thresholds becomes a warning.
    Raises:
        ReferenceUseError: a named memory missing or changed, or ``--reference`` not fitting the thresholds.
    """
    named = named_memory(thresholds)
    notes: list[str] = []
    if not given:
        if named is None:
            return None, notes
        return ReferenceChoice("thresholds", file=named, named_by=thresholds.source, spec=peek_memory(named)), notes
    given = [Path(p).expanduser() for p in given]
    if str(given[0]).endswith(".pt"):
        choice = ReferenceChoice("--reference", file=given[0], spec=peek_memory(given[0]))
        same = named is not None and file_identity(given[0]) == file_identity(named)
    else:
        images, notes = reference_images(given)
        choice = ReferenceChoice("--reference", images=images, folders=given)
        same = False
    if same:
        choice.named_by = thresholds.source
        return choice, notes
    has_values = thresholds.image is not None or thresholds.pixel is not None
    if thresholds.source is not None and thresholds_used and has_values:
        calibrated = (f"with the reference memory {named}" if named is not None else
                      "zero-shot (without a reference memory)")
        message = (f"{thresholds.source} was calibrated {calibrated}, so its thresholds do not fit the scores of "
                   f"--reference {' '.join(map(str, given))}")
        if not force:
            hint = (f"leave --reference out to use {named}, " if named is not None else "")
            raise ReferenceUseError(f"{message}; {hint}calibrate with this memory (`python -m crane calibrate "
                                    "--normal DIR --target_fpr RATE --reference_memory`), pass --threshold IMG,PIX, "
                                    "or --force")
        notes.append(f"warning: {message} (--force: using them anyway; decisions may be wrong)")
    return choice, notes


def deployed_problem(thresholds: Any, graph_memory: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Why an exported graph cannot use ``thresholds`` (one line; ``None``: it can): the thresholds were
    calibrated with a reference memory that the graph does not hold. ``graph_memory``: what the graph's
    metadata records of the memory it holds (``None``: none; compared by its ``"identity"``)."""
    entry = thresholds.meta.get("reference") if thresholds.meta else None
    if not isinstance(entry, Mapping):
        return None
    if graph_memory is not None and graph_memory.get("identity") == entry.get("identity"):
        return None
    held = "holds no reference memory" if graph_memory is None else "holds another reference memory"
    return (f"{thresholds.source} was calibrated with the reference memory {entry.get('path')}, but the exported "
            f"graph {held}: export it with the memory (`python -m crane export --reference ...`), or use "
            "--backend torch")
