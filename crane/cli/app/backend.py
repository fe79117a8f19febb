"""The work behind the page, done with the command line's own helpers (the one module of the app importing them).

``predict`` settles its model, reads images, decides and writes its ``--out`` files, and
``calibrate --normal`` picks thresholds, with the functions imported here; the app calls the
same ones, so its scores, files and thresholds are those of the commands on the same images.

* :func:`check_flags` and :meth:`Engine.open`: the model of a checkpoint (with the settings it
  records, as ``predict``) or of an exported graph (``--model``, as ``predict --backend``; no
  torch), and the thresholds loaded at start; one-line user errors before any model work.
* :meth:`Engine.score`: uploaded files -> :class:`Batch` (scores, maps, the images kept for
  redrawing; unreadable files listed with their reason); :func:`panel` redraws one at any
  thresholds without the model; :meth:`Engine.write_results` writes ``predict``'s files.
* :meth:`Engine.calibrate` and :meth:`Engine.save`: ``calibrate --normal``'s thresholds (on the
  exported graph when the app runs one) and their ``thresholds.json``; with ``reference_memory``
  (torch only) ``calibrate --normal --reference_memory``'s: a reference memory built from the normal
  images, thresholds by leave-one-out, saved as ``reference.pt`` beside ``thresholds.json`` (the
  functions of :mod:`crane.inspection.calibration` and :mod:`crane.inspection.reference_use` that
  ``calibrate`` runs). :meth:`Engine.score` takes such a memory for one page session's Inspect tab.
* :meth:`Engine.predict_file`: the ``predict`` API endpoint's answer for one file, with the memory and
  thresholds loaded at start (never a page session's).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np

from crane import __version__, settings
from crane.checkpoints import CheckpointInfo
from crane.cli.common import add_model_flags as add_checkpoint_model_flags
from crane.cli.common import add_bit_depth_flag, checkpoint_of
from crane.cli.predict import TorchPredictor, load_input, resolve_thresholds, score_inputs, threshold_notes
from crane.cli.serving import open_predictor, thresholds_note
from crane.cli.setup import describe_model, flag_errors, settle_model
from crane.data.folders import InputFile, collect_inputs, folder_samples
from crane.data.image import InputNotes
from crane.errors import CraneError, one_line
from crane.inspection.calibration import (CalibrationScores, Picked, build_memory, memory_references,
                                          pick_false_alarm, run_leave_one_out, run_samples)
from crane.inspection.reference_use import (ReferenceChoice, check_memory_output, choose_reference,
                                            save_calibrated_memory, thresholds_entry)
from crane.inspection.outputs import OutputFolder, PredictOutputs, decision
from crane.inspection.thresholds import (Thresholds, check_output, default_path, model_record, parse_override,
                                         save_thresholds)
from crane.inspection.visualize import render_panel

__all__ = ["Batch", "Calibration", "CraneError", "Engine", "Scored", "add_model_flags", "check_flags", "one_line",
           "panel", "user_errors"]

BACKENDS = ("onnxruntime", "openvino")
MEMORY_OPTION = "a reference memory (few-shot)"
"""How the app's one-line errors name its few-shot option (``calibrate``'s: ``--reference_memory``)."""


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``predict``'s model flags (checkpoint, weights, settings, device, precision, batch size), plus
    ``--model``/``--backend`` for an exported graph and ``--thresholds``/``--threshold``."""
    add_checkpoint_model_flags(parser)
    add_bit_depth_flag(parser)
    g = parser.add_argument_group("exported model (instead of --checkpoint: no torch; settings from its metadata)")
    g.add_argument("--model", metavar="PATH", help="graph written by `python -m crane export` (.onnx, or OpenVINO "
                                                   ".xml)")
    g.add_argument("--backend", choices=BACKENDS, help="runtime of --model (default: openvino for .xml, else "
                                                       "onnxruntime)")
    t = parser.add_argument_group("thresholds")
    t.add_argument("--thresholds", type=Path, metavar="FILE",
                   help="thresholds.json to read at start and to save calibrations to (default: the one beside "
                        "--checkpoint, or beside --model, whose own wins over the thresholds in its metadata)")
    t.add_argument("--threshold", metavar="IMG[,PIX]", help="override the image threshold, and the pixel one after a "
                                                            "comma (',PIX' for pixel only)")


def user_errors() -> tuple[type, ...]:
    """Errors caused by the input, reported as one line (as the command line does)."""
    return (CraneError,)


def check_flags(args: argparse.Namespace) -> list[str]:
    """One message per unusable flag, before any model work (``predict``'s checks); fills the defaults
    ``predict`` fills (checkpoint path, or the model options of an exported graph)."""
    if args.model:
        args.backend = args.backend or ("openvino" if Path(args.model).suffix.lower() == ".xml" else "onnxruntime")
        errors = [] if args.batch_size >= 1 else [f"--batch_size must be at least 1, got {args.batch_size}"]
        if args.threshold:  # device and the rest are the runtime's to judge (torch-free: no torch device checks)
            try:
                errors += [f"--threshold values must be in [0, 1], got {args.threshold}"
                           for v in parse_override(args.threshold) if v is not None and not 0.0 <= v <= 1.0][:1]
            except ValueError as e:
                errors.append(str(e))
        return errors
    if args.backend:
        return ["--backend is for an exported --model"]
    checkpoint_of(args)
    return flag_errors(args)


@dataclass
class Scored:
    """One scored image. ``path``: the file as the user named it; ``name``: its output name (``predict``'s);
    ``rgb``: ``H x W x 3`` uint8 (EXIF orientation applied); ``anomaly_map``: ``S x S`` float32, smoothed."""

    path: Path
    name: str
    rgb: np.ndarray
    score: float
    anomaly_map: np.ndarray


@dataclass
class Batch:
    """The images of one upload: ``scored`` in upload order, ``skipped`` ``(path, reason)`` of unreadable ones;
    ``scored_with``: which memory scored them, in words (:meth:`Engine.scored_with`)."""

    scored: list[Scored]
    skipped: list[tuple[Path, str]]
    scored_with: str = "zero-shot"


@dataclass
class Calibration:
    """A calibration: what ``calibrate`` reports (``picked``: table, summary, notes), the ``thresholds.json``
    content to save, and the unreadable files ``(path, reason)``. ``memory``: the reference memory built from
    its normal images (:class:`crane.models.memory.ReferenceMemory`; ``None``: calibrated with the memory loaded
    at start, or zero-shot), its ``left_out`` images scored by leave-one-out; :meth:`Engine.save` writes it
    beside the thresholds and names it there."""

    picked: Picked
    thresholds: Thresholds
    skipped: list[tuple[Path, str]]
    notes: list[str]
    memory: Any = None
    left_out: int = 0


def panel(item: Scored, image_threshold: Optional[float], pixel_threshold: Optional[float]) -> np.ndarray:
    """The panel ``predict`` writes for ``item`` at these thresholds: ``H' x W' x 3`` uint8."""
    result = decision(item.score, image_threshold)
    return render_panel(item.rgb, item.anomaly_map, pixel_threshold, score=item.score,
                        caption=item.name + (f" | {result}" if result else ""))


def _relative(path: Path, folder: Path) -> Path:
    try:
        return Path(path).relative_to(folder)
    except ValueError:
        return Path(path)


def _reason(reason: str, folder: Path) -> str:
    """A read error without the app's working folder in it (paths as the user named the files)."""
    return reason.replace(f"{folder}{os.sep}", "")


class Engine:
    """The one model of a running app, its thresholds at start and a lock: one model call at a time.

    Build it with :meth:`open`. ``model_calls`` counts the forward passes (batches) run so far.
    """

    def __init__(self, args: argparse.Namespace, predictor: Any, info: Optional[CheckpointInfo],
                 thresholds: Thresholds, notes: list[str]) -> None:
        self.args, self.predictor, self.info = args, predictor, info
        self.thresholds, self.notes = thresholds, notes
        self.reference: Optional[ReferenceChoice] = None  # the memory the thresholds at start name
        self.model_calls = 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, args: argparse.Namespace) -> "Engine":
        """Settle the model as ``predict`` does (after :func:`check_flags`), read the thresholds and load
        the model. Raises one of :func:`user_errors` (one line) before the model loads where it can."""
        if args.model:
            predictor = open_predictor(args)
            thresholds = resolve_thresholds(args, predictor.thresholds())
            notes = [thresholds_note(thresholds, predictor, args.force)]
            return cls(args, predictor, None, thresholds, notes + threshold_notes(thresholds, args, None))
        state, info, notes = settle_model(args)
        thresholds = resolve_thresholds(args)
        reference, reference_notes = choose_reference(None, thresholds, True)  # the memory the thresholds name
        notes += threshold_notes(thresholds, args, info) + reference_notes
        if reference is not None:
            notes.insert(0, reference.line())
        engine = cls(args, TorchPredictor(args, state, info, reference), info, thresholds, notes)
        engine.reference = reference
        return engine

    # ----------------------------------------------------------------------------- the model

    @property
    def exported(self) -> bool:
        return self.info is None

    @property
    def image_size(self) -> int:
        return int(self.predictor.image_size)

    @property
    def random_weights(self) -> bool:
        """Whether the CLIP weights are random (``--clip_weights synthetic``): the numbers mean nothing."""
        return str(self.args.clip_weights) == "synthetic"

    def describe(self) -> str:
        """One line naming the model."""
        if self.exported:
            model = self.predictor.model
            return (f"exported graph {Path(model.path).name} ({self.args.backend}, {model.info.precision}, S "
                    f"{self.image_size}, layers {' '.join(map(str, self.args.features_list))}, D-Attn "
                    f"{self.args.dino_model})")
        return f"{Path(self.args.checkpoint).name}: {describe_model(self.args, self.info)}"

    @property
    def thresholds_path(self) -> Path:
        """Where calibrations are saved: ``--thresholds``, else ``thresholds.json`` beside the model."""
        return Path(self.args.thresholds or default_path(self.args.model or self.args.checkpoint)).expanduser()

    def _use(self, memory: Any) -> Any:
        """With the lock held: score with ``memory`` (a memory built in a page session), else the memory loaded at
        start (``None``: zero-shot); set on every model call, as the one model serves every session and the API.
        Returns the detector (``None`` for an exported graph, whose memory is inside it)."""
        if self.exported:
            return None
        detector = self.predictor.detector
        detector.reference = memory if memory is not None else self.predictor.memory
        return detector

    def _predict(self, batch: list, memory: Any = None) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self.model_calls += 1
            self._use(memory)
            return self.predictor.predict(batch)

    def scored_with(self, memory: Any = None) -> str:
        """Which memory scores with ``memory`` given (one built in Calibrate) or not, in words."""
        if memory is not None:
            return (f"the reference memory of {memory.references} normal images built in Calibrate (few-shot; the API "
                    "keeps the memory loaded at start)")
        if self.reference is not None:
            return f"the reference memory {self.reference.file.name} named by {self.reference.named_by} (few-shot)"
        return "zero-shot" if not self.exported else "the exported graph"

    # ------------------------------------------------------------------------------ inspect

    def score(self, files: Sequence[Path], folder: Path, memory: Any = None) -> Batch:
        """Score ``files`` (inside ``folder``, named as the user named them) as ``predict`` does: in batches of
        ``--batch_size``, each image turned as its EXIF orientation says; unreadable ones are listed. ``memory``:
        a reference memory built in Calibrate (:attr:`Calibration.memory`), else the one loaded at start."""
        from tqdm import tqdm

        items = collect_inputs([str(f) for f in files]).files if files else []
        scored: list[Scored] = []
        skipped: list[tuple[Path, str]] = []
        size = self.args.batch_size
        with tqdm(total=len(items), desc="predict", unit="img", file=sys.stderr) as bar:
            for unreadable, done in score_inputs(items, self.predictor, size, self.args.bit_depth,
                                                 predict=lambda batch: self._predict(batch, memory)):
                skipped += [(_relative(item.path, folder), _reason(reason, folder)) for item, reason in unreadable]
                scored += [Scored(_relative(item.path, folder), item.name, rgb, score, amap)
                           for item, rgb, score, amap in done]
                bar.update(len(unreadable) + len(done))
        return Batch(scored, skipped, self.scored_with(memory))

    @staticmethod
    def write_results(batch: Batch, image_threshold: Optional[float], pixel_threshold: Optional[float],
                      out: Path) -> Path:
        """Write the files ``predict --out OUT --save_maps --save_masks`` writes for ``batch`` at these thresholds
        (masks only with a pixel threshold) into the new folder ``out``; return the zip of them."""
        folder = OutputFolder(out)
        folder.check()
        folder.clean()
        options = SimpleNamespace(no_panels=False, save_maps=True, save_masks=pixel_threshold is not None)
        outputs = PredictOutputs(folder, options, image_threshold, pixel_threshold)
        try:
            for item in batch.scored:
                outputs.write(item.path, item.name, item.rgb, item.score, item.anomaly_map)
        finally:
            outputs.close(batch.skipped)
        return Path(shutil.make_archive(str(out), "zip", out))

    # ---------------------------------------------------------------------------- calibrate

    def calibrate(self, folder: Path, target_fpr: float, reference_memory: bool = False,
                  coreset_ratio: float = settings.DEFAULT_CORESET_RATIO,
                  few_shot_weight: float = settings.DEFAULT_FEW_SHOT_WEIGHT) -> Calibration:
        """``calibrate --normal FOLDER --target_fpr RATE`` on this model (the exported graph when the app runs
        one): the same images (those under ``good/`` folders when there are any), the same arithmetic.

        ``reference_memory`` (torch only): ``calibrate --normal FOLDER --target_fpr RATE --reference_memory
        --coreset_ratio R --few_shot_weight W``: a memory built from these images (at least 2), each scored
        against it without its own patches (leave-one-out); :attr:`Calibration.memory` holds it. Without it, the
        memory loaded at start (if any) scores, its reference images among these by leave-one-out."""
        if not 0.0 < target_fpr < 1.0:
            raise CraneError(f"the false-alarm rate must be in (0, 1), such as 0.01, got {target_fpr}")
        if reference_memory and self.exported:
            raise CraneError("an exported graph scores with the reference memory exported into it (`python -m crane "
                             "export --reference ...`); to build one from normal images here, start the app with "
                             "--checkpoint")
        if reference_memory:
            problems = settings.problems({"coreset_ratio": coreset_ratio, "few_shot_weight": few_shot_weight},
                                         "calibrate")
            if problems:
                raise CraneError(problems[0])
        found = folder_samples(folder)
        samples = [s for s in found if not s.anomaly]
        notes = [] if len(samples) == len(found) else [
            f"note: using the {len(samples)} images under good/ folders, not the {len(found) - len(samples)} in "
            "other folders"]
        references = memory_references([s.path for s in samples], MEMORY_OPTION, "the uploaded normal images") \
            if reference_memory else []
        scores = CalibrationScores.for_run(target_fpr, len(samples), self.image_size)
        inputs = InputNotes()
        memory, left_out = None, 0
        with self._lock:
            if self.exported:
                skipped = self._run_samples(samples, scores)
            elif reference_memory:  # calibrate --reference_memory's own steps
                detector = self._use(None)
                try:
                    memory = build_memory(detector, references, coreset_ratio, few_shot_weight, self.args.bit_depth,
                                          MEMORY_OPTION)
                    skipped, left_out = run_leave_one_out(detector, samples, self.args.batch_size, scores,
                                                          self.args.bit_depth, inputs)
                finally:
                    self._use(None)
            else:  # with the memory loaded at start: its reference images among these by leave-one-out
                loo: set[int] = set()
                skipped = run_samples(self._use(None), samples, self.args.batch_size, scores, self.args.bit_depth,
                                      inputs, loo)
                left_out = len(loo)
        skipped = [(_relative(path, folder), _reason(reason, folder)) for path, reason in skipped]
        _, labels = scores.arrays()
        if (~labels).sum() == 0:
            raise CraneError(f"too few readable images left to calibrate on ({len(skipped)} unreadable)")
        picked = pick_false_alarm(scores, target_fpr)
        calibration: dict[str, Any] = {"normal_files": [str(s.path.relative_to(folder)) for s in samples],
                                       **picked.record, "bit_depth": self.args.bit_depth}
        if skipped:
            calibration["skipped"] = [[str(path), reason] for path, reason in skipped]
        meta = {**picked.criteria, "calibration": calibration, "model": self._model_record(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "crane_version": __version__}
        if memory is None and self.reference is not None:  # calibrated with the memory loaded at start
            meta["reference"] = thresholds_entry(self.reference.file, self.thresholds_path,
                                                 self.predictor.memory.spec, left_out)
            if meta["reference"]["identity"] != self.thresholds.meta["reference"].get("identity"):
                raise CraneError(f"the reference memory loaded at start, {self.reference.file}, has changed since "
                                 "(replaced by a saved calibration?): restart the app to calibrate with the memory "
                                 "on disk, or build one here (few-shot option)")
        thresholds = Thresholds(picked.image, picked.pixel, meta)
        notes += [f"note: {line}" for line in inputs.lines()] + picked.notes
        return Calibration(picked, thresholds, skipped, notes, memory, left_out)

    def _run_samples(self, samples: list, into: CalibrationScores) -> list[tuple[Path, str]]:
        """:func:`crane.inspection.calibration.run_samples` for the exported graph (its maps are smoothed in the graph)."""
        from tqdm import tqdm

        skipped: list[tuple[Path, str]] = []
        size = self.args.batch_size
        with tqdm(total=len(samples), desc="calibrate", unit="img", file=sys.stderr) as bar:
            for start in range(0, len(samples), size):
                batch = []
                for sample in samples[start:start + size]:
                    rgb, x = load_input(InputFile(sample.path, ""), self.predictor, self.args.bit_depth)
                    if rgb is None:
                        skipped.append((sample.path, x))
                        bar.update(1)
                    else:
                        batch.append(x)
                if not batch:
                    continue
                self.model_calls += 1
                scores, maps = self.predictor.predict(batch)
                normal = np.zeros(len(batch), bool)
                into.add(scores, normal, maps, np.zeros(maps.shape, bool), normal)
                bar.update(len(batch))
        return skipped

    def _model_record(self) -> dict[str, Any]:
        """The ``"model"`` entry of ``thresholds.json`` (``calibrate``'s; for a graph, its checkpoint and options)."""
        if not self.exported:
            return model_record(self.args, self.info)
        info = self.predictor.model.info
        return {"checkpoint": info.checkpoint, "checkpoint_sha256": info.checkpoint_sha256, **info.model,
                "precision": info.precision, "exported_model": str(self.args.model), "backend": self.args.backend}

    def save(self, calibration: Calibration, output: Optional[Path] = None) -> list[Path]:
        """Write the thresholds of ``calibration`` to ``output`` (default :attr:`thresholds_path`), atomically;
        with a memory built from its images (:attr:`Calibration.memory`), also ``reference.pt`` beside it, named
        in the thresholds' ``"reference"`` entry: the files ``calibrate --reference_memory`` writes, under its
        rules (an existing file is replaced only when it is a thresholds file / a reference memory). Returns the
        paths written, the thresholds file first."""
        output = Path(output or self.thresholds_path).expanduser()
        elsewhere = "start the app with --thresholds FILE in another folder"
        lines = [check_output(output, False, "the thresholds file", elsewhere, None)]
        memory_file = None
        if calibration.memory is not None:
            memory_file, note = check_memory_output(output, False, elsewhere, None)
            lines.append(note)
        thresholds = calibration.thresholds
        if memory_file is not None:
            entry = save_calibrated_memory(calibration.memory, memory_file, output, {
                "checkpoint": str(self.args.checkpoint), "checkpoint_sha256": self.info.sha256,
                "model": self._model_record(), "written_by": "python -m crane app (Calibrate, few-shot)"},
                calibration.left_out)
            thresholds = Thresholds(thresholds.image, thresholds.pixel, {**thresholds.meta, "reference": entry})
        for line in filter(None, lines):
            print(line, file=sys.stderr)
        return [save_thresholds(thresholds, output)] + ([memory_file] if memory_file is not None else [])

    # ----------------------------------------------------------------------------------- API

    def predict_file(self, path: Path, image_threshold: Optional[float] = None) -> dict[str, Any]:
        """``{"score", "decision", "map_shape"}`` of one image file: the decision at ``image_threshold``, else at
        the image threshold loaded at start (``None`` without one)."""
        path = Path(path)
        rgb, x = load_input(InputFile(path, path.stem), self.predictor, self.args.bit_depth)
        if rgb is None:
            raise CraneError(_reason(x, path.parent))
        scores, maps = self._predict([x])  # the memory loaded at start
        score = float(scores.tolist()[0])
        threshold = self.thresholds.image if image_threshold is None else float(image_threshold)
        return {"score": score, "decision": decision(score, threshold) or None, "map_shape": list(maps[0].shape)}
