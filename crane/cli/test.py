"""Evaluate a Crane / Crane+ checkpoint on one dataset (the original ``test.py`` flags, plus a few).

    python test.py --dataset visa --model_name trained_on_mvtec_crane --epoch 5 \\
        --features_list 6 12 18 24 --soft_mean True --dino_model none --devices 0

Writes ``metrics.json``, ``metrics.md``, ``predictions.csv`` (and with
``--save_maps`` the maps, with ``--visualize`` the panels) to ``--save_path``
(default ``results/MODEL_NAME/test_on_DATASET``). An interrupted run, started
again with the same flags, skips the classes it finished. Several GPUs:
``--devices 0 1 2 3`` or ``torchrun --nproc_per_node=4 test.py ...``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from crane import settings
from crane.cli.args import (HelpFormatter, add_bool_flag, add_data_flags, add_precision_flags, add_reference_flags,
                            add_setting_flags, explicit_flags)
from crane.data.image import PREPROCESSING
from crane.device import DEVICE_HELP
from crane.engine.evaluate import EvalOptions, evaluate
from crane.errors import guarded
from crane.logs import setup_logging
from crane.settings import AUPRO_METHODS


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``test.py``."""
    p = argparse.ArgumentParser("test.py", description="Evaluate Crane / Crane+ zero-shot anomaly detection.",
                                formatter_class=HelpFormatter)

    d = EvalOptions()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help="dataset key: the folder DATASETS_ROOT_DIR/DATASET with meta.json")
    add_data_flags(g, d)
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the k_shot / portion selection")
    g = p.add_argument_group("few-shot (docs/method.md, Few-shot; default: zero-shot, as published)")
    g.add_argument("--few_shot", type=int, default=d.few_shot, metavar="K",
                   help="score each class against a reference memory of K normal images drawn from its train split "
                        "(results in SAVE_PATH/seed_S/ per seed, and summary.json / summary.md over the seeds)")
    g.add_argument("--few_shot_seeds", type=int, nargs="+", default=None, metavar="S",
                   help="seeds of the reference draws, one run each (default: the one value of --seed)")
    add_reference_flags(g)
    g = p.add_argument_group("weights")
    g.add_argument("--model_name", default=d.model_name, help="checkpoints/MODEL_NAME/epoch_N.pth and results/MODEL_NAME/")
    g.add_argument("--epoch", type=int, default=d.epoch, help="checkpoint epoch")
    g.add_argument("--checkpoint", default=None, help="prompt-learner checkpoint file (overrides --model_name/--epoch)")
    add_setting_flags(g, "test", roles=("weights",))
    g = p.add_argument_group("model (settings the checkpoint records are taken from it unless given)")
    add_setting_flags(g, "test", suppressed=settings.CHECKPOINT_KEYS,
                      roles=tuple(r for r in ("vfm", "model", "map", "prompt")))
    add_bool_flag(g, "--force", d.force, "run with model flags that contradict the checkpoint's settings")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=d.device, help=DEVICE_HELP)
    g.add_argument("--devices", type=int, nargs="+", default=d.devices,
                   help="GPU indices, one process each, as the published flag (with --device cpu: that many CPU "
                        "processes; default: the --device GPU, one process)")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="images per forward pass and process")
    g.add_argument("--num_workers", type=int, default=None, help="data-loading workers per process (default: auto)")
    add_precision_flags(g, d.precision, d.compile)
    g.add_argument("--aupro_method", choices=AUPRO_METHODS, default=d.aupro_method,
                   help="crane: published 200-threshold AUPRO; mvtec: MVTec AD official")
    add_bool_flag(g, "--metrics_as_published", d.metrics_as_published,
                  "as the published test.py: pixel metrics over every image (an anomalous image without a mask "
                  "counts as normal pixels) and undefined metrics reported as 0 and averaged; default: those "
                  "images are left out of pixel metrics and undefined metrics are null, left out of the mean")
    g.add_argument("--preprocessing", choices=PREPROCESSING, default=d.preprocessing,
                   help="crane: images become 8-bit RGB (16-bit scaled, alpha dropped) before the resize; published: "
                        "resized in their own mode, then converted (identical for 8-bit RGB and grayscale)")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default=None, help="results folder (default: results/MODEL_NAME/test_on_DATASET, "
                                                     "with --few_shot K: results/MODEL_NAME/test_on_DATASET_fewshot_K)")
    add_bool_flag(g, "--save_maps", d.save_maps, "save each smoothed map as maps/<img_path>.npy (float32)")
    add_bool_flag(g, "--visualize", d.visualize, "save a panel per image to visualization/CLASS/")
    g.add_argument("--why", default=None, help="a note on the purpose of the run, kept in metrics.json")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="write the seconds spent per pipeline stage (decode, model, smoothing, gather, files, "
                        "metrics) and images per second to FILE (JSON)")
    g = p.add_argument_group("published flags without effect here (accepted so published command lines run)")
    g.add_argument("--type", default=d.type, help="the published loader's mode; evaluation is always 'test'")
    g.add_argument("--aug_rate", type=float, default=d.aug_rate, help="training augmentation; never applied at test")
    return p


NO_EFFECT = {
    "--type": "--type has no effect in test.py: evaluation always reads the test split",
    "--aug_rate": "--aug_rate has no effect in test.py: augmentation is for training (as in the published test.py)",
}


def notes(argv: Sequence[str], args: argparse.Namespace) -> list[str]:
    """One line per flag given that does not do what a user of the published test.py may expect."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    out = [f"note: {text}" for flag, text in NO_EFFECT.items() if flag in given]
    if args.few_shot == 0:
        out += [f"note: {flag} has no effect without --few_shot K" for flag in ("--coreset_ratio", "--few_shot_weight")
                if flag in given]
    if args.k_shot > 0 or args.portion < 1:
        out.append("note: --k_shot/--portion evaluate a subset of each class; the published test.py ignores them "
                   "and evaluates every image")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the evaluation; return the exit code (2 for unusable input)."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for line in notes(argv, args):
        print(line, file=sys.stderr)

    def work() -> int:
        evaluate(EvalOptions(**vars(args), explicit=explicit_flags(args)))
        return 0

    return guarded("test.py", work, "interrupted; run the same command again to resume (finished classes are kept)")
