"""Train Crane / Crane+ prompts on an auxiliary dataset; follows the published ``train.py``.

    python train.py --dataset mvtec --model_name crane --features_list 6 12 18 24 --dino_model none
    python train.py --dataset visa --model_name cranep --features_list 24 --dino_model dinov2

Every flag of the published script is accepted, with its default. On one process the
same data, flags and ``--seed`` give the published run's checkpoints (same initial
prompts, data order, ``--k_shot``/``--portion`` picks and ``--aug_rate`` mosaics).

Writes ``SAVE_PATH/trained_on_{datasets}_{MODEL_NAME}/epoch_{k}.pth`` (official format,
plus the settings it was trained with; loadable by the published code and by
``test.py --model_name trained_on_..._{MODEL_NAME}``), with ``args.json``, ``log.csv``,
``train.log`` and ``last.pt`` (for ``--resume``). An existing run is continued only with
``--resume`` and replaced only with ``--overwrite``; shipped official checkpoints never.
Each image is encoded once and every epoch runs from those features. Several GPUs:
``--devices 0 1 2 3`` or ``torchrun --nproc_per_node=4 train.py ...`` (``--batch_size`` is
per process; the data order is then sharded, not the published one).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from crane import settings
from crane.cli.args import (HelpFormatter, add_bool_flag, add_data_flags, add_precision_flags, add_setting_flags,
                            fill_settings)
from crane.engine.train import FEATURE_CACHES, INTERPOLATIONS, TrainOptions, train
from crane.errors import guarded
from crane.logs import setup_logging
from crane.settings import random_weights_banner


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``train.py``."""
    p = argparse.ArgumentParser("train.py", description="Train the Crane / Crane+ prompt learner.",
                                formatter_class=HelpFormatter)

    d = TrainOptions()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", nargs="+", default=list(d.dataset),
                   help="auxiliary dataset key(s): folders DATASETS_ROOT_DIR/DATASET with meta.json (their test split)")
    add_data_flags(g, d, k_shot_help="train on k_shot // 2 normal and as many anomalous images per class, drawn as "
                                     "published (0: all)",
                   portion_help="train on int(n * portion) of each class's normal and of its anomalous images "
                                "(ignored with --k_shot)")
    g.add_argument("--aug_rate", type=float, default=d.aug_rate,
                   help="probability of replacing a sample of hazelnut, pill, zipper, bottle, screw, metal_nut or "
                        "cable by a 2x2 mosaic of its class, as published")
    g.add_argument("--train_data_path", nargs="+", default=None,
                   help="published flag without effect: the data is DATASETS_ROOT_DIR/DATASET")
    g.add_argument("--type", default=d.type,
                   help="published flag: --k_shot, --portion and --aug_rate apply only with 'train'")
    g = p.add_argument_group("weights")
    add_setting_flags(g, "train", roles=("weights",))
    g.add_argument("--init_checkpoint", default=None,
                   help="start from this prompt-learner checkpoint (official format) instead of the seeded init")
    g = p.add_argument_group("model")
    add_setting_flags(g, "train", roles=("vfm", "model", "map", "prompt"), suppressed=settings.tower_scaled())
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default=d.interpolation,
                   help="upsampling of the training maps")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epoch", type=int, default=d.epoch, help="epochs")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate, help="Adam learning rate")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="images per step and process")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the initial prompts, the data order and the --k_shot/--portion picks")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=d.device,
                   help="cpu, cuda, cuda:N, N (GPU N, as the published flag) or auto (a GPU when there is one)")
    g.add_argument("--devices", type=int, nargs="+", default=None,
                   help="GPU indices, one process each (with --device cpu: that many CPU processes; default: the "
                        "--device GPU, one process)")
    g.add_argument("--feature_cache", choices=FEATURE_CACHES, default=d.feature_cache,
                   help="keep the frozen image features in memory, on disk under SAVE_PATH/.feature_cache, or "
                        "recompute them every epoch (off: the published cost)")
    g.add_argument("--num_workers", type=int, default=None, help="data-loading workers per process (default: 0 on CPU, up to 4 per GPU)")
    add_precision_flags(g, d.precision, d.compile)
    g = p.add_argument_group("output")
    g.add_argument("--model_name", default=d.model_name, help="run name: SAVE_PATH/trained_on_{datasets}_{MODEL_NAME}")
    g.add_argument("--save_path", default=d.save_path, help="folder of the run folders")
    g.add_argument("--save_freq", type=int, default=d.save_freq, help="write epoch_{k}.pth every this many epochs")
    add_bool_flag(g, "--resume", d.resume, "continue the run in the run folder from its last complete epoch")
    add_bool_flag(g, "--overwrite", d.overwrite, "replace the run in the run folder (never an official checkpoint)")
    g.add_argument("--why", default=None, help="published flag without effect: a note kept in args.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and train; return the exit code (2 for unusable input, 130 when interrupted)."""
    setup_logging()
    args = build_parser().parse_args(argv)
    fill_settings(args, "train", offered_only=True)  # the tower-scaled defaults (--features_list) for the --clip_model tower
    opts = TrainOptions(**vars(args))

    def work() -> int:
        folder = train(opts)
        epochs = sorted(folder.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
        print(f"train.py: checkpoints in {folder}/" + (f" (last: {epochs[-1].name})" if epochs else "")
              + (" - random weights: meaningless prompts" if random_weights_banner(opts) else ""))
        return 0

    return guarded("train.py", work, "interrupted; run the same command with --resume to continue from the last "
                                     "complete epoch")
