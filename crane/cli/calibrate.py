"""``python -m crane calibrate``: run the model on calibration images (normal images at a false-alarm
rate, labelled folders, or a ``meta.json`` dataset) and save the image and pixel thresholds as
``thresholds.json`` (beside the checkpoint unless ``--output``), where ``predict`` finds them."""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, Mapping

from crane import __version__
from crane.checkpoints import CheckpointInfo
from crane.cli import common
from crane.cli.common import EXIT_SKIPPED, add_bit_depth_flag, add_model_flags
from crane.errors import CraneError
from crane.checkpoints import official_at, replace_problem
from crane.cli.args import add_bool_flag
from crane.files import output_problem
from crane.inspection.thresholds import IMAGE_CRITERIA, Thresholds, default_path, load_thresholds, model_record, \
    save_thresholds


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``calibrate`` subcommand."""
    c = sub.add_parser("calibrate", help="pick thresholds (normal images at a false-alarm rate, or labelled images), "
                                         "save thresholds.json",
                       description="Run the model on calibration images and pick the image and pixel thresholds. "
                                   "--target_fpr RATE: thresholds that flag RATE of the normal images and of their "
                                   "pixels, with the false-alarm rate to expect on new normal images and its "
                                   "uncertainty; else the image threshold of max F1 (or Youden's J) and the pixel "
                                   "threshold of max F1 on labelled images. Saves thresholds.json beside the "
                                   "checkpoint unless --output is given.")
    src = c.add_argument_group("calibration images (--normal and --labelled may be combined; --dataset alone)")
    src.add_argument("--normal", nargs="+", type=Path, metavar="PATH",
                     help="folders of normal images (only those under good/ folders when a folder has any; masks "
                          "left out), or image files; needs --target_fpr")
    src.add_argument("--labelled", nargs="+", type=Path, metavar="DIR",
                     help="folders with good/ (normal) and defect-type folders (masks, optional, named NAME_mask.* "
                          "in masks/ or ground_truth/)")
    src.add_argument("--dataset", metavar="NAME", help="dataset folder with a meta.json under --datasets_root_dir "
                                                       "(its test split, read as test.py reads it)")
    src.add_argument("--datasets_root_dir", type=Path, metavar="ROOT",
                     help="folder holding one folder per dataset (default: $CRANE_DATASETS, else ./datasets/data)")
    src.add_argument("--classes", nargs="+", metavar="CLASS", help="with --dataset: these classes only "
                                                                   "(default: all)")
    c.add_argument("--target_fpr", type=float, metavar="RATE",
                   help="false-alarm rate to allow on normal images, such as 0.01")
    c.add_argument("--image_criterion", choices=IMAGE_CRITERIA, default=None,
                   help="without --target_fpr: f1 (max F1) or youden (max TPR - FPR) (default: f1)")
    c.add_argument("--output", type=Path, metavar="FILE", help="where to write (default: thresholds.json beside "
                                                                "--checkpoint); an earlier thresholds file there is "
                                                                "replaced, any other file only with --overwrite")
    add_bool_flag(c, "--overwrite", False, "replace an --output file that is not a thresholds file (never a "
                                           "shipped official checkpoint)", True)
    c.add_argument("--num_workers", "--workers", dest="num_workers", type=int, default=0,
                   help="with --dataset: data loading processes (default: 0)")
    add_bit_depth_flag(c)
    add_model_flags(c)



def _calibration_images(args: argparse.Namespace):
    """The calibration images: ``(CraneDataset or None, folder samples, their labels, what to record
    about them)``; checks the choice of images and criterion (:class:`CraneError`)."""
    from crane.data.folders import folder_samples

    if args.dataset is not None and (args.normal or args.labelled):
        raise CraneError("pass either --dataset (a meta.json dataset) or --normal/--labelled folders, not both")
    if args.dataset is None and not (args.normal or args.labelled):
        raise CraneError("calibrate needs images: --normal DIR --target_fpr RATE (normal images only), --labelled DIR "
                       "(good/ and defect folders) or --dataset NAME (a meta.json dataset)")
    if args.target_fpr is not None and args.image_criterion is not None:
        raise CraneError("--target_fpr and --image_criterion both choose the image threshold: pass one of them")
    if args.normal and args.target_fpr is None:
        raise CraneError("--normal images alone set thresholds at a false-alarm rate: pass --target_fpr RATE "
                       "(such as 0.01)")
    if args.dataset is not None:
        from crane.data.dataset import CraneDataset

        dataset = CraneDataset(args.datasets_root_dir / args.dataset, "test", image_size=args.image_size,
                               classes=args.classes)
        labels = [bool(s["anomaly"]) for s in dataset.samples]
        record = {"dataset": args.dataset, "datasets_root_dir": str(args.datasets_root_dir), "split": "test",
                  "classes": dataset.classes}
        return dataset, [], labels, record
    samples = []
    for folder in args.normal or []:
        found = folder_samples(folder)
        normal = [s for s in found if not s.anomaly]
        if len(normal) < len(found):
            print(f"note: --normal {folder}: using the {len(normal)} images under its good/ folders, not the "
                  f"{len(found) - len(normal)} in other folders (pass it to --labelled to count them as defects)",
                  file=sys.stderr)
        samples += normal
    for folder in args.labelled or []:
        samples += folder_samples(folder, labelled=True)
    samples = list({s.path.resolve(): s for s in samples}.values())
    record = {"normal_folders": [str(f) for f in args.normal or []],
              "labelled_folders": [str(f) for f in args.labelled or []]}
    return None, samples, [bool(s.anomaly) for s in samples], record


def _output(args: argparse.Namespace) -> Path:
    """Where the thresholds go, checked: writable; an existing file is replaced only when calibrate wrote it
    (a thresholds file, said in one line) or with ``--overwrite``, and an official checkpoint never."""
    output = Path(args.output or default_path(args.checkpoint)).expanduser()
    problem = output_problem(output, flag="--output")
    if problem:
        raise CraneError(f"cannot write {output} ({problem}); pass --output FILE and give predict --thresholds FILE")
    official = official_at(output)
    if official is None and output.is_file() and not args.overwrite:
        try:
            load_thresholds(output)
        except (OSError, ValueError):
            raise CraneError(f"--output {output} exists and is not a thresholds file; choose another file, or pass "
                             "--overwrite to replace it") from None
        print(f"note: replacing the thresholds in {output} (written by an earlier calibrate)", file=sys.stderr)
    problem = replace_problem(output, True, "--output") if official is not None else None
    if problem:
        raise CraneError(problem)
    return output


def run(args: argparse.Namespace, state: Mapping[str, Any], info: CheckpointInfo) -> int:
    """``python -m crane calibrate`` on a settled run."""
    from tabulate import tabulate

    from crane.data.image import InputNotes
    from crane.inspection.calibration import CalibrationScores, pick_false_alarm, pick_labelled, run_dataset, run_samples

    dataset, samples, labels, source = _calibration_images(args)
    anomalous, total = sum(labels), len(labels)
    where = args.dataset or " ".join(str(f) for f in (args.normal or []) + (args.labelled or []))
    if args.target_fpr is None and anomalous in (0, total):
        raise CraneError(f"{where}: labelled calibration needs normal and defect images, found {anomalous} defect "
                       f"images of {total}; with normal images only, pass --target_fpr RATE")
    if args.target_fpr is not None and anomalous == total:
        raise CraneError(f"{where}: no normal images to set a false-alarm rate on ({total} defect images)")
    output = _output(args)
    detector = common.load_detector(args, state, info)
    scores = CalibrationScores.for_run(args.target_fpr, total - anomalous, detector.config.image_size)
    skipped: list[tuple[Path, str]] = []
    notes = InputNotes()
    if dataset is not None:
        run_dataset(detector, dataset, args.batch_size, args.num_workers, scores)
    else:
        skipped = run_samples(detector, samples, args.batch_size, scores, args.bit_depth, notes)
    _, kept = scores.arrays()
    if (~kept).sum() == 0 or (args.target_fpr is None and kept.sum() == 0):
        raise CraneError(f"{where}: too few readable images left to calibrate on ({len(skipped)} unreadable)")
    picked = pick_labelled(scores, args.image_criterion or "f1") if args.target_fpr is None else \
        pick_false_alarm(scores, args.target_fpr)
    calibration = {**source, **picked.record, **({"bit_depth": args.bit_depth} if dataset is None else {})}
    if skipped:
        calibration["skipped"] = [[str(path), reason] for path, reason in skipped]
    thresholds = Thresholds(picked.image, picked.pixel, {
        **picked.criteria, "calibration": calibration, "model": model_record(args, info),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "crane_version": __version__})
    save_thresholds(thresholds, output)
    for line in notes.lines():
        print(f"note: {line}", file=sys.stderr)
    for note in picked.notes:
        print(note, file=sys.stderr)
    print(tabulate(picked.rows, headers=picked.headers))
    for line in picked.summary:
        print(line)
    print(f"wrote {output}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) (listed in {output}):", file=sys.stderr)
        for path, _ in skipped:
            print(f"  {path}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


