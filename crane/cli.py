"""Command line: ``python -m crane {predict,calibrate,export,init-checkpoint}`` (also installed as ``crane``).

* ``predict INPUT... --checkpoint FILE --out DIR``: score image files, folders
  (searched recursively) and globs; write ``DIR/scores.csv`` and one panel per image.
* ``calibrate --dataset NAME --datasets_root_dir ROOT --checkpoint FILE``: pick the
  image and pixel thresholds on a labelled dataset and save ``thresholds.json``
  beside the checkpoint, where ``predict`` finds it.
* ``export --checkpoint FILE --out PATH``: the model as one ONNX / OpenVINO graph
  (:mod:`crane.export`); ``predict --backend onnxruntime|openvino --model PATH`` runs it.
* ``init-checkpoint OUT``: write a randomly initialised prompt-learner checkpoint
  (for pipeline demos only).

Exit status: 0 success, 1 an error (one line on stderr), 2 bad arguments,
3 ``predict`` skipped unreadable files (the others were processed).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from crane import __version__
from crane.cli_args import PROMPT_FLAGS, add_model_flags, add_weight_flags, default_datasets_root
from crane.export import command as export_command
from crane.thresholds import (IMAGE_CRITERIA, Thresholds, confusion, default_path, load_thresholds, max_f1_threshold,
                              parse_override, save_thresholds, youden_threshold)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EXIT_ERROR, EXIT_SKIPPED = 1, 3
# Model options recorded in thresholds.json and compared when predict uses the file.
MODEL_OPTIONS = ("clip_weights", "dino_model", "features_list", "soft_mean", "image_size", "sigma", "attn_type",
                 "both_eattn_dattn", "use_scorebase_pooling", "dattn_batch_mean")


class CliError(Exception):
    """A user-facing error reported as one line."""


# ------------------------------------------------------------------------------ arguments


# Defaults of the model flags: the published Crane+ evaluation settings (as test.py).
MODEL_DEFAULTS = argparse.Namespace(features_list=[24], dino_model="dinov2", soft_mean=False, image_size=518,
                                    sigma=4.0, attn_type="qq+kk+vv", both_eattn_dattn=True,
                                    use_scorebase_pooling=True, dattn_batch_mean=False)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model flags of ``test.py`` (the prompt-learner ones come from the checkpoint)."""
    g = parser.add_argument_group("model (as test.py)")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="prompt-learner checkpoint file (default: checkpoints/MODEL_NAME/epoch_EPOCH.pth)")
    g.add_argument("--model_name", default="trained_on_mvtec_cranep",
                   help="checkpoint folder under checkpoints/ (default: trained_on_mvtec_cranep)")
    g.add_argument("--epoch", type=int, default=5, help="checkpoint epoch (default: 5)")
    add_weight_flags(g, "openai", defaults_in_help=True)
    add_model_flags(g, MODEL_DEFAULTS, skip=PROMPT_FLAGS, defaults_in_help=True)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when available) (default: auto)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="(default: fp32)")
    g.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crane", description="Crane zero-shot anomaly detection.",
                                     epilog="Exit status: 0 ok, 1 error, 2 bad arguments, 3 unreadable inputs skipped.")
    parser.add_argument("--version", action="version", version=f"crane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="score images and draw anomaly panels",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score images, folders (recursive) and globs; write DIR/scores.csv (path, score, "
                                   "decision) and DIR/panels/<name>.png (original | heat map | overlay).",
                       epilog="Thresholds: thresholds.json beside the checkpoint (from `python -m crane calibrate`) "
                              "gives `decision` (anomalous when score >= image threshold) and the outlined region "
                              "(map >= pixel threshold). --thresholds FILE reads another file; --threshold overrides "
                              "it: IMG, IMG,PIX or ,PIX.\nWithout thresholds `decision` is empty and nothing is "
                              "outlined.\nExit status: 0 ok, 1 error, 3 some files were unreadable and skipped.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=f"image file, folder (searched recursively for {' '.join(IMAGE_SUFFIXES)}, any case) or "
                        "quoted glob such as 'photos/**/*.jpg'")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created)")
    p.add_argument("--thresholds", type=Path, metavar="FILE",
                   help="thresholds.json to use (default: the one beside --checkpoint, when present)")
    p.add_argument("--threshold", metavar="IMG[,PIX]",
                   help="override the image threshold, and the pixel one after a comma (',PIX' for pixel only)")
    p.add_argument("--save_maps", action="store_true", help="also write DIR/maps/<name>.npy (S x S float32 map)")
    p.add_argument("--save_masks", action="store_true",
                   help="also write DIR/masks/<name>.png (0/255 at the image's size; needs a pixel threshold)")
    p.add_argument("--no_panels", action="store_true", help="skip the panels (scores only)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), default="torch",
                   help="torch: build the model from --checkpoint and the model flags; onnxruntime / openvino: run "
                        "the graph --model written by `python -m crane export` (settings, size and thresholds from "
                        "its metadata) (default: torch)")
    p.add_argument("--model", metavar="PATH", help="exported graph (.onnx, or OpenVINO .xml) for --backend")
    _add_model_flags(p)

    c = sub.add_parser("calibrate", help="pick thresholds on a labelled dataset, save thresholds.json",
                       description="Run the model on the test split of ROOT/NAME (meta.json) and pick the image "
                                   "threshold (max F1, or Youden's J) and the pixel threshold (max F1 over the pixels "
                                   "of normal images and of anomalous images with masks). Saves thresholds.json "
                                   "beside the checkpoint unless --output is given.")
    c.add_argument("--dataset", required=True, metavar="NAME", help="dataset folder name under --datasets_root_dir")
    c.add_argument("--datasets_root_dir", type=Path, metavar="ROOT",
                   help="folder holding one folder per dataset (default: $CRANE_DATASETS, else ./datasets/data)")
    c.add_argument("--classes", nargs="+", metavar="CLASS", help="calibrate on these classes only (default: all)")
    c.add_argument("--image_criterion", choices=IMAGE_CRITERIA, default="f1",
                   help="f1: max F1; youden: max TPR - FPR (default: f1)")
    c.add_argument("--output", type=Path, metavar="FILE", help="where to write (default: thresholds.json beside "
                                                                "--checkpoint)")
    c.add_argument("--workers", type=int, default=0, help="data loading processes (default: 0)")
    _add_model_flags(c)

    export_command.add_parser(sub)

    i = sub.add_parser("init-checkpoint", help="write a randomly initialised prompt-learner checkpoint (demos)",
                       description="Write an untrained prompt-learner checkpoint. Its predictions are meaningless: "
                                   "it exists so the pipeline can run without the official checkpoints.")
    i.add_argument("out", type=Path, metavar="OUT", help="checkpoint file to write")
    i.add_argument("--clip_weights", default="synthetic", metavar="W",
                   help="CLIP whose token embedding builds the prompt buffers (default: synthetic)")
    i.add_argument("--seed", type=int, default=0, help="(default: 0)")
    return parser


# ------------------------------------------------------------------------------- model


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that change scores, as recorded in ``thresholds.json``."""
    options = {k: getattr(args, k) for k in MODEL_OPTIONS}
    options["features_list"] = list(options["features_list"])
    return options


def build_detector(args: argparse.Namespace):
    """A :class:`crane.Detector` from the model flags."""
    from crane.detector import Detector, build_model
    from crane.models.crane import CraneConfig

    model = build_model(args.clip_weights, args.checkpoint, args.dino_weights, CraneConfig.from_options(args))
    return Detector(model, _device(args.device), args.precision, args.batch_size)


class _TorchPredictor:
    """``predict``'s torch backend: :meth:`Detector.predict_tensor`, then the scipy smoothing (as test.py).
    ``crane.deploy.serving.DeployPredictor`` is the same interface for exported graphs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from crane.data.image import ImageReadError, load_rgb

        print(f"loading the model ({args.checkpoint}, CLIP {args.clip_weights}, D-Attn {args.dino_model}) ...",
              file=sys.stderr)
        self.detector = build_detector(args)
        self.image_size = self.detector.config.image_size
        self.load_rgb, self.read_error = load_rgb, ImageReadError

    def preprocess(self, rgb: np.ndarray):
        from crane.data.image import preprocess

        return preprocess(rgb, self.image_size)

    def predict(self, batch: list) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images -> (scores ``B``, smoothed maps ``B x S x S``)."""
        import torch

        from crane.models.head import smooth_maps

        scores, raw = self.detector.predict_tensor(torch.stack(batch))
        return scores.numpy(), smooth_maps(raw.numpy(), self.detector.config.sigma)


# ------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class InputFile:
    """An image to score: ``path`` as found from the user's input, ``name`` its output name (no suffix)."""

    path: Path
    name: str


def _walk(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files and folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def collect_inputs(inputs: Sequence[str], exclude: Optional[Path] = None) -> list[InputFile]:
    """Expand files, folders and globs into a list of images, in the given order without duplicates.

    Files named explicitly are kept whatever their suffix; folders and globs keep
    image suffixes only. Files inside ``exclude`` (the output folder) are left out.
    Output names are the paths relative to the deepest folder common to all images,
    without the suffix (``sub/part.jpg`` -> ``sub/part``), or with it where two images
    would share a name (``part.jpg``, ``part.png``).
    Raises ``CliError`` for an input that is neither a file, a folder nor a matching glob.
    """
    import glob

    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += _walk(path)
        elif path.is_file():
            paths.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            for match in map(Path, matches):
                if match.is_dir():
                    paths += _walk(match)
                elif match.is_file() and match.name.lower().endswith(IMAGE_SUFFIXES):
                    paths.append(match)
            if not matches:
                raise CliError(f"no file matches {item!r}")
        else:
            raise CliError(f"no such file or folder: {item}")
    excluded = exclude.resolve() if exclude is not None else None
    unique: dict[Path, Path] = {}
    for path in paths:
        resolved = path.resolve()
        if excluded is not None and resolved.is_relative_to(excluded):
            continue
        unique.setdefault(resolved, path)
    if not unique:
        return []
    common = Path(os.path.commonpath([r.parent for r in unique]))
    relative = [resolved.relative_to(common) for resolved in unique]
    names = [rel.with_suffix("").as_posix() for rel in relative]
    counts = Counter(names)
    return [InputFile(path, name if counts[name] == 1 else rel.as_posix())
            for path, rel, name in zip(unique.values(), relative, names)]


# --------------------------------------------------------------------------- thresholds


def resolve_thresholds(args: argparse.Namespace, embedded: Optional[Thresholds] = None) -> Thresholds:
    """Thresholds from ``--thresholds``, else ``embedded`` (an exported model's) or beside the checkpoint,
    then ``--threshold`` overrides."""
    path = args.thresholds or (None if embedded is not None else default_path(args.checkpoint))
    if args.thresholds is not None or (path is not None and path.is_file()):
        thresholds = load_thresholds(path)
    else:
        thresholds = embedded or Thresholds()
    if args.threshold:
        image, pixel = parse_override(args.threshold)
        thresholds.image = thresholds.image if image is None else image
        thresholds.pixel = thresholds.pixel if pixel is None else pixel
    return thresholds


def _threshold_notes(thresholds: Thresholds, args: argparse.Namespace) -> list[str]:
    """One-line notes on missing thresholds or a calibration made with other model options."""
    notes = []
    calibrate = (f"python -m crane calibrate --dataset NAME --datasets_root_dir ROOT --checkpoint {args.checkpoint} "
                 "[same model flags]")
    if thresholds.image is None and thresholds.pixel is None:
        where = f"{thresholds.source} has none" if thresholds.source else f"{default_path(args.checkpoint)} not found"
        notes.append(f"note: no thresholds ({where}), so "
                     f"`decision` is left empty and the panels outline nothing; calibrate on labelled images with "
                     f"`{calibrate}`, or pass --threshold IMG[,PIX]")
    elif thresholds.image is None:
        notes.append(f"note: no image threshold in {thresholds.source}, so `decision` is left empty; "
                     "pass --threshold IMG")
    elif thresholds.pixel is None:
        notes.append("note: no pixel threshold, so the panels outline nothing; calibrate on images with masks, "
                     "or pass --threshold IMG,PIX")
    calibrated = thresholds.meta.get("model", {})
    current = model_options(args)
    differ = [f"{k}={calibrated[k]!r} (now {current[k]!r})" for k in current
              if k in calibrated and calibrated[k] != current[k]]
    if differ:
        notes.append(f"warning: {thresholds.source} was calibrated with other model options: {', '.join(differ)}; "
                     "scores are not comparable, recalibrate or use the same flags")
    return notes


# ------------------------------------------------------------------------------ predict


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _resize_to(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """The ``S x S`` map resized (bilinear) back to the original ``height x width``."""
    import cv2

    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)


def _decision(score: float, threshold: Optional[float]) -> str:
    if threshold is None:
        return ""
    return "anomalous" if score >= threshold else "normal"


class _Outputs:
    """Writers for one predict run: the CSV rows (streamed to a temp file) and per-image files."""

    def __init__(self, out: Path, args: argparse.Namespace, thresholds: Thresholds) -> None:
        self.out, self.args, self.thresholds = out, args, thresholds
        out.mkdir(parents=True, exist_ok=True)
        self.csv_path = out / "scores.csv"
        self._tmp = out / f".scores.csv.{os.getpid()}.tmp"
        self._file = open(self._tmp, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file, lineterminator="\n")
        self._csv.writerow(["path", "score", "decision"])
        self.rows = 0
        self.anomalous = 0

    def write(self, item: InputFile, image: np.ndarray, score: float, anomaly_map: np.ndarray) -> None:
        from crane.visualize import save_panel, write_png

        decision = _decision(score, self.thresholds.image)
        self._csv.writerow([item.path.as_posix(), repr(float(score)), decision])
        self.rows += 1
        self.anomalous += decision == "anomalous"
        if not self.args.no_panels:
            caption = item.name + (f" | {decision}" if decision else "")
            save_panel(self.out / "panels" / f"{item.name}.png", image, anomaly_map, self.thresholds.pixel,
                       score=score, caption=caption)
        if self.args.save_maps:
            _atomic_npy(self.out / "maps" / f"{item.name}.npy", anomaly_map.astype(np.float32))
        if self.args.save_masks:
            full = _resize_to(anomaly_map, *image.shape[:2])
            write_png(self.out / "masks" / f"{item.name}.png", (full >= self.thresholds.pixel).astype(np.uint8) * 255)

    def close(self, skipped: list[tuple[InputFile, str]]) -> None:
        """Publish ``scores.csv`` and ``skipped.csv`` (the latter only when files were skipped)."""
        self._file.close()
        os.replace(self._tmp, self.csv_path)
        skipped_path = self.out / "skipped.csv"
        if not skipped:
            skipped_path.unlink(missing_ok=True)
            return
        tmp = self.out / f".skipped.csv.{os.getpid()}.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", "error"])
            writer.writerows([item.path.as_posix(), reason] for item, reason in skipped)
        os.replace(tmp, skipped_path)


def _load(item: InputFile, predictor):
    """``(rgb, preprocessed)`` of one file, or ``(None, reason)`` when it cannot be read."""
    try:
        rgb = predictor.load_rgb(item.path)
        return rgb, predictor.preprocess(rgb)
    except predictor.read_error as e:
        return None, str(e)
    except Exception as e:  # any decoder failure (e.g. Pillow's decompression-bomb guard) skips this file only
        return None, f"cannot read image {item.path}: {type(e).__name__}: {e}"


def cmd_predict(args: argparse.Namespace) -> int:
    items = collect_inputs(args.inputs, exclude=args.out)
    if not items:
        raise CliError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {' '.join(args.inputs)}")
    if args.backend == "torch" and args.model:
        raise CliError("--model is for --backend onnxruntime|openvino; the torch backend builds the model from "
                       "--checkpoint")
    deployed = None
    if args.backend != "torch":
        from crane.deploy.serving import open_predictor

        deployed = open_predictor(args, {"clip_weights": "openai", **vars(MODEL_DEFAULTS)}, CliError)
    thresholds = resolve_thresholds(args, None if deployed is None else deployed.thresholds())
    if args.save_masks and thresholds.pixel is None:
        raise CliError("--save_masks needs a pixel threshold: run `python -m crane calibrate` on labelled images "
                       "with masks, or pass --threshold IMG,PIX")
    for note in _threshold_notes(thresholds, args):
        print(note, file=sys.stderr)

    from tqdm import tqdm

    predictor = deployed or _TorchPredictor(args)
    outputs = _Outputs(args.out, args, thresholds)
    skipped: list[tuple[InputFile, str]] = []
    try:
        with tqdm(total=len(items), desc="predict", unit="img", file=sys.stderr) as bar:
            for start in range(0, len(items), args.batch_size):
                batch = []
                for item in items[start:start + args.batch_size]:
                    rgb, x = _load(item, predictor)
                    if rgb is None:
                        skipped.append((item, x))
                        bar.write(f"skipped: {x}", file=sys.stderr)
                        bar.update(1)
                    else:
                        batch.append((item, rgb, x))
                if not batch:
                    continue
                scores, maps = predictor.predict([x for _, _, x in batch])
                for (item, rgb, _), score, amap in zip(batch, scores.tolist(), maps):
                    outputs.write(item, rgb, score, amap)
                    bar.update(1)
    except BaseException:
        outputs.close(skipped)
        print(f"stopped: {outputs.csv_path} holds the {outputs.rows} images done before the error", file=sys.stderr)
        raise
    outputs.close(skipped)
    _predict_summary(args, outputs, thresholds, skipped)
    return EXIT_SKIPPED if skipped else 0


def _predict_summary(args: argparse.Namespace, outputs: _Outputs, thresholds: Thresholds,
                     skipped: list[tuple[InputFile, str]]) -> None:
    wrote = [f"{outputs.csv_path} ({outputs.rows} images)"]
    if not args.no_panels:
        wrote.append(f"panels in {args.out / 'panels'}/")
    wrote += [f"{folder} in {args.out / folder}/" for folder in ("maps", "masks") if getattr(args, f"save_{folder}")]
    print("wrote " + ", ".join(wrote))
    if thresholds.image is not None:
        overridden = args.threshold and parse_override(args.threshold)[0] is not None
        origin = "--threshold" if overridden else thresholds.source
        print(f"{outputs.anomalous} of {outputs.rows} images anomalous (score >= {thresholds.image:.6g}, from {origin})")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s), listed in {args.out / 'skipped.csv'}:", file=sys.stderr)
        for item, _ in skipped:
            print(f"  {item.path}", file=sys.stderr)


# ---------------------------------------------------------------------------- calibrate


def _run_dataset(detector, dataset, batch_size: int, workers: int):
    """Scores, labels, and the maps and masks of the images with pixel ground truth.

    Returns ``(scores N, labels N, maps M x S x S float32, masks M x S x S bool)``, where the M
    images are the normal ones and the anomalous ones with a mask. The maps stay in memory
    (``5 * M * S * S`` bytes: about 1.4 GB for 1000 images at 518).
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from crane.models.head import smooth_maps

    scores, labels, maps, masks = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    for batch in tqdm(loader, desc="calibrate", unit="batch", file=sys.stderr):
        s, raw = detector.predict_tensor(batch["img"])
        smoothed = smooth_maps(raw.numpy(), detector.config.sigma)
        label = batch["anomaly"].numpy().astype(bool)
        known = batch["has_mask"].numpy() | ~label
        scores.append(s.numpy())
        labels.append(label)
        maps.append(smoothed[known])
        masks.append(batch["img_mask"].numpy()[known] > 0.5)
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(maps), np.concatenate(masks)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from crane.data.dataset import CraneDataset

    dataset = CraneDataset(args.datasets_root_dir / args.dataset, "test", image_size=args.image_size,
                           classes=args.classes)
    anomalous = sum(s["anomaly"] for s in dataset.samples)
    if anomalous in (0, len(dataset)):
        raise CliError(f"{args.dataset}: calibration needs normal and anomalous test images, found "
                       f"{anomalous} anomalous of {len(dataset)}")
    output = Path(args.output or default_path(args.checkpoint)).expanduser()
    folder = next(p for p in (output.parent, *output.parent.parents) if p.exists())
    if not os.access(folder, os.W_OK):
        raise CliError(f"cannot write {output} (no write permission in {folder}); pass --output FILE and give "
                       "predict --thresholds FILE")
    detector = build_detector(args)
    scores, labels, maps, masks = _run_dataset(detector, dataset, args.batch_size, args.workers)
    pick = max_f1_threshold if args.image_criterion == "f1" else youden_threshold
    image_threshold, image_value = pick(labels, scores)
    image_stats = confusion(labels, scores, image_threshold)
    rows = [["image", f"{image_threshold:.6g}", "max F1" if args.image_criterion == "f1" else "max Youden J",
             f"{image_value:.4f}", f"{image_stats['precision']:.4f}", f"{image_stats['recall']:.4f}",
             f"{image_stats['fpr']:.4f}", f"{labels.size} images ({int(labels.sum())} anomalous)"]]
    pixel_threshold = None
    calibration: dict[str, Any] = {
        "dataset": args.dataset, "datasets_root_dir": str(args.datasets_root_dir), "split": "test",
        "classes": dataset.classes, "images": int(labels.size), "anomalous": int(labels.sum()),
        "normal": int((~labels).sum()), "image_f1": image_stats["f1"],
        "image_precision": image_stats["precision"], "image_recall": image_stats["recall"],
        "image_fpr": image_stats["fpr"], "pixel_images": int(len(masks)),
    }
    if masks.any():
        pixel_threshold, pixel_f1 = max_f1_threshold(masks, maps)
        pixel_stats = confusion(masks, maps, pixel_threshold)
        calibration.update(pixel_f1=pixel_f1, pixel_precision=pixel_stats["precision"],
                           pixel_recall=pixel_stats["recall"], pixel_fpr=pixel_stats["fpr"])
        rows.append(["pixel", f"{pixel_threshold:.6g}", "max F1", f"{pixel_f1:.4f}",
                     f"{pixel_stats['precision']:.4f}", f"{pixel_stats['recall']:.4f}", f"{pixel_stats['fpr']:.4f}",
                     f"{len(masks)} images, {masks.size} pixels"])
    else:
        print(f"note: {args.dataset} has no anomalous images with masks: no pixel threshold", file=sys.stderr)
    thresholds = Thresholds(image_threshold, pixel_threshold, {
        "image_criterion": args.image_criterion, "pixel_criterion": "f1", "calibration": calibration,
        "model": {"checkpoint": str(args.checkpoint), **model_options(args)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "crane_version": __version__})
    save_thresholds(thresholds, output)
    print(tabulate(rows, headers=["threshold", "value", "criterion", "criterion value", "precision", "recall", "FPR",
                                  "calibrated on"]))
    print(f"wrote {output}")
    return 0


# ----------------------------------------------------------------------- init-checkpoint


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    import open_clip
    import torch

    from crane.models.clip_loader import load_clip
    from crane.models.prompts import PromptLearner, save_prompt_checkpoint

    weights = args.clip_weights
    if weights == "synthetic":
        from crane.models.synthetic import synthetic_clip_state_dict

        weights = synthetic_clip_state_dict()
    clip = load_clip(weights)
    torch.manual_seed(args.seed)
    learner = PromptLearner(clip.token_embedding, open_clip.get_tokenizer("ViT-L-14-336"))
    save_prompt_checkpoint(learner, args.out)
    print(f"wrote {args.out} (random prompts: predictions made with it are meaningless)")
    return 0


# ---------------------------------------------------------------------------------- main


COMMANDS = {"predict": cmd_predict, "calibrate": cmd_calibrate, "export": export_command.run,
            "init-checkpoint": cmd_init_checkpoint}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m crane`` / ``crane``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch_size must be at least 1", file=sys.stderr)
        return 2
    exported = getattr(args, "backend", "torch") != "torch"  # an exported graph carries its checkpoint
    if args.command in ("predict", "calibrate") and args.checkpoint is None and not exported:
        args.checkpoint = str(Path("checkpoints") / args.model_name / f"epoch_{args.epoch}.pth")
    if args.command == "calibrate" and args.datasets_root_dir is None:
        args.datasets_root_dir = Path(default_datasets_root())
    try:
        return COMMANDS[args.command](args)
    except (CliError, OSError, ValueError, RuntimeError) as e:
        message = str(e).strip() or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
