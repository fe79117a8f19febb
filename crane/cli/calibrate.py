"""``python -m crane calibrate``: run the model on calibration images (normal images at a false-alarm
rate, labelled folders, or a ``meta.json`` dataset) and save the image and pixel thresholds as
``thresholds.json`` (beside the checkpoint unless ``--output``), where ``predict`` finds them."""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, Mapping

from crane import __version__, settings
from crane.checkpoints import CheckpointInfo
from crane.cli import common
from crane.cli.common import EXIT_SKIPPED, add_bit_depth_flag, add_model_flags
from crane.errors import CraneError
from crane.cli.args import add_bool_flag, add_reference_flags
from crane.inspection.calibration import memory_references
from crane.inspection.reference_use import check_memory_output, save_calibrated_memory
from crane.inspection.thresholds import IMAGE_CRITERIA, Thresholds, check_output, default_path, model_record, \
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
    add_bool_flag(c, "--overwrite", False, "replace an --output file that is not a thresholds file, or a "
                                           "reference.pt beside it that is not a reference memory (never a "
                                           "shipped official checkpoint)", True)
    r = c.add_argument_group("few-shot (docs/method.md, Few-shot)")
    add_bool_flag(r, "--reference_memory", False,
                  "also keep the --normal images as a reference memory, reference.pt beside the thresholds file "
                  "(predict then scores with it, as thresholds.json names it); the thresholds are calibrated by "
                  "leave-one-out: each normal image is scored against the memory without its own patches. Needs at "
                  "least 2 normal images", True)
    add_reference_flags(r, True)
    c.add_argument("--num_workers", "--workers", dest="num_workers", type=int, default=0,
                   help="with --dataset: data loading processes (default: 0)")
    add_bit_depth_flag(c)
    add_model_flags(c)



def _calibration_images(args: argparse.Namespace):
    """The calibration images: ``(CraneDataset or None, folder samples, their labels, what to record
    about them, the --normal images for --reference_memory)``; checks the choice of images and criterion
    (:class:`CraneError`)."""
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
    if args.reference_memory and args.dataset is not None:
        raise CraneError("--reference_memory keeps --normal images as the memory; a --dataset's calibration images "
                         "are its test split (several classes, defects among them): pass the normal images of one "
                         "class with --normal DIR (for few-shot evaluation on a dataset: test.py --few_shot K)")
    typed = [f"--{s.name} {getattr(args, s.name)}" for s in settings.REFERENCE_SETTINGS
             if getattr(args, s.name) != s.default]
    if typed and not args.reference_memory:
        raise CraneError(f"{', '.join(typed)}: sets how --reference_memory builds the memory; pass --reference_memory "
                         "too, or leave it out")
    if args.reference_memory and not args.normal:
        raise CraneError("--reference_memory keeps the --normal images as the memory: pass --normal DIR "
                         "--target_fpr RATE (with --labelled DIR too if you have defect images)")
    if args.dataset is not None:
        from crane.data.dataset import CraneDataset

        dataset = CraneDataset(args.datasets_root_dir / args.dataset, "test", image_size=args.image_size,
                               classes=args.classes)
        labels = [bool(s["anomaly"]) for s in dataset.samples]
        record = {"dataset": args.dataset, "datasets_root_dir": str(args.datasets_root_dir), "split": "test",
                  "classes": dataset.classes}
        return dataset, [], labels, record, []
    samples = []
    for folder in args.normal or []:
        found = folder_samples(folder)
        normal = [s for s in found if not s.anomaly]
        if len(normal) < len(found):
            print(f"note: --normal {folder}: using the {len(normal)} images under its good/ folders, not the "
                  f"{len(found) - len(normal)} in other folders (pass it to --labelled to count them as defects)",
                  file=sys.stderr)
        samples += normal
    references = memory_references([s.path for s in samples], "--reference_memory",
                                   f"--normal {' '.join(map(str, args.normal))}") if args.reference_memory else []
    for folder in args.labelled or []:
        samples += folder_samples(folder, labelled=True)
    samples = list({s.path.resolve(): s for s in samples}.values())
    record = {"normal_folders": [str(f) for f in args.normal or []],
              "labelled_folders": [str(f) for f in args.labelled or []]}
    return None, samples, [bool(s.anomaly) for s in samples], record, references


def _output(args: argparse.Namespace) -> Path:
    """Where the thresholds go, checked (:func:`crane.inspection.thresholds.check_output`): writable; an existing
    file is replaced only when calibrate wrote it (a thresholds file, said in one line) or with ``--overwrite``,
    and an official checkpoint never."""
    output = Path(args.output or default_path(args.checkpoint)).expanduser()
    note = check_output(output, args.overwrite, "--output", "pass --output FILE and give predict --thresholds FILE")
    if note:
        print(note, file=sys.stderr)
    return output


def _memory_output(args: argparse.Namespace, output: Path) -> Path:
    """Where ``--reference_memory`` keeps the memory (``reference.pt`` beside the thresholds), checked as
    :func:`_output` checks the thresholds file (:func:`crane.inspection.reference_use.check_memory_output`)."""
    path, note = check_memory_output(output, args.overwrite, "pass --output FILE in another folder")
    if note:
        print(note, file=sys.stderr)
    return path


def run(args: argparse.Namespace, state: Mapping[str, Any], info: CheckpointInfo) -> int:
    """``python -m crane calibrate`` on a settled run."""
    from tabulate import tabulate

    from crane.data.image import InputNotes
    from crane.inspection.calibration import (CalibrationScores, build_memory, pick_false_alarm, pick_labelled,
                                              run_dataset, run_leave_one_out, run_samples)

    dataset, samples, labels, source, references = _calibration_images(args)
    anomalous, total = sum(labels), len(labels)
    where = args.dataset or " ".join(str(f) for f in (args.normal or []) + (args.labelled or []))
    if args.target_fpr is None and anomalous in (0, total):
        raise CraneError(f"{where}: labelled calibration needs normal and defect images, found {anomalous} defect "
                       f"images of {total}; with normal images only, pass --target_fpr RATE")
    if args.target_fpr is not None and anomalous == total:
        raise CraneError(f"{where}: no normal images to set a false-alarm rate on ({total} defect images)")
    output = _output(args)
    memory_file = _memory_output(args, output) if args.reference_memory else None
    detector = common.load_detector(args, state, info)
    detector.set_reference(None)  # zero-shot unless --reference_memory
    if memory_file is not None:
        build_memory(detector, references, args.coreset_ratio, args.few_shot_weight, args.bit_depth)
    scores = CalibrationScores.for_run(args.target_fpr, total - anomalous, detector.config.image_size)
    skipped: list[tuple[Path, str]] = []
    notes = InputNotes()
    left_out = 0
    if dataset is not None:
        run_dataset(detector, dataset, args.batch_size, args.num_workers, scores)
    elif memory_file is not None:
        skipped, left_out = run_leave_one_out(detector, samples, args.batch_size, scores, args.bit_depth, notes)
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
    meta = {**picked.criteria, "calibration": calibration, "model": model_record(args, info),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "crane_version": __version__}
    if memory_file is not None:
        meta["reference"] = save_calibrated_memory(detector.reference, memory_file, output, {
            "checkpoint": str(args.checkpoint), "checkpoint_sha256": info.sha256, "model": model_record(args, info),
            "written_by": "python -m crane calibrate --reference_memory"}, left_out)
    save_thresholds(Thresholds(picked.image, picked.pixel, meta), output)
    for line in notes.lines():
        print(f"note: {line}", file=sys.stderr)
    for note in picked.notes:
        print(note, file=sys.stderr)
    print(tabulate(picked.rows, headers=picked.headers))
    for line in picked.summary:
        print(line)
    if memory_file is not None:
        print(f"wrote {memory_file} (reference memory of {detector.reference.references} normal images, coreset "
              f"{args.coreset_ratio:g}); the thresholds were calibrated by leave-one-out (each normal image scored "
              "against the memory without its own patches)")
    print(f"wrote {output}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) (listed in {output}):", file=sys.stderr)
        for path, _ in skipped:
            print(f"  {path}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


