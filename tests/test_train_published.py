"""train.py against the published train.py end to end (``../shared/conformance/pipeline/train_crane``).

The reference: the published ``train.py`` run unchanged on the CPU with synthetic CLIP weights
on the pipeline dataset (rebuilt here with its ``make_dataset.py``), two epochs from
``epoch_0.pth``, batch 4 (21 images: every epoch ends with a one-image batch); ``trace.json``
holds each step's images and losses. Ours must take the same batches in the same order, the
same losses per step (relative 1e-4, the conformance tolerance for losses) and end with the
same prompts.

Prompt tolerance: one step of ours and the published step agree to ~1e-7, but Adam divides
each gradient by its own running magnitude, so elements whose gradients are tiny turn float
rounding into visible differences; after these 12 steps the largest is ~5e-5. Anything that
is actually different (a batch, a label, a loss term) moves elements by about one step,
``lr = 1e-3``, per step, so ``2e-4`` separates the two.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crane.engine import train as engine
from crane.models.prompts import load_prompt_checkpoint
from tests.conftest import CONFORMANCE, SKIP_REASON

PIPELINE = CONFORMANCE / "pipeline"
REFERENCE = PIPELINE / "train_crane"
DATASET_FLAGS = ["--classes", "3", "--per_class", "7", "--size", "160", "--seed", "0",
                 "--class_names", "bottle,candle,screw"]  # pipeline/README.md
CLIP = {"vision_width": 64, "seed": 21}
PROMPT_ATOL = 2e-4
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict:
    if not (REFERENCE / "trace.json").is_file() or not (PIPELINE / "make_dataset.py").is_file():
        pytest.skip(SKIP_REASON + " (pipeline/train_crane)")
    trace = json.loads((REFERENCE / "trace.json").read_text())
    assert trace["weights"]["clip"] == f"synth.clip_state_dict(vision_width={CLIP['vision_width']}, seed={CLIP['seed']})"
    return trace


@pytest.fixture(scope="module")
def our_run(reference, synth_weights, tmp_path_factory) -> dict:
    """Our train.py with the published run's flags, from its epoch_0.pth; every step's batch and loss."""
    data_root = tmp_path_factory.mktemp("pipeline_data")
    name = reference["dataset"]["names"][0]
    subprocess.run([sys.executable, str(PIPELINE / "make_dataset.py"), str(data_root), name, *DATASET_FLAGS],
                   check=True, capture_output=True, timeout=120)
    args = reference["published_args"]
    opts = engine.TrainOptions(
        dataset=args["dataset"], datasets_root_dir=str(data_root), clip_weights=str(synth_weights("clip", **CLIP)),
        init_checkpoint=str(REFERENCE / "epoch_0.pth"), save_path=str(tmp_path_factory.mktemp("runs")),
        device="cpu", **{k: args[k] for k in (
            "model_name", "seed", "save_freq", "epoch", "learning_rate", "batch_size", "aug_rate", "k_shot", "portion",
            "image_size", "features_list", "interpolation", "depth", "n_ctx", "t_n_ctx", "train_with_img_cls_prob",
            "train_with_img_cls_type", "dino_model", "both_eattn_dattn", "use_scorebase_pooling", "attn_type",
            "type")})
    steps: list[dict] = []
    run_epoch, step = engine.Trainer.run_epoch, engine.Trainer.step

    def record_epoch(self, epoch, plan):
        steps.extend({"epoch": epoch, "img_path": [self.data.samples[i][1]["img_path"] for i in batch]}
                     for batch in plan.batches)
        return run_epoch(self, epoch, plan)

    totals: list[float] = []

    def record_step(self, *a, **k):
        out = step(self, *a, **k)
        totals.append(float(out[0]))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Trainer, "run_epoch", record_epoch)
        mp.setattr(engine.Trainer, "step", record_step)
        run = engine.train(opts)
    return {"run": run, "steps": steps, "totals": totals}


def test_batches_follow_the_published_order(reference, our_run):
    want = [(s["epoch"], s["img_path"]) for s in reference["steps"]]
    got = [(s["epoch"], s["img_path"]) for s in our_run["steps"]]
    assert got == want


def test_step_losses_match_the_published_run(reference, our_run):
    want = [s["loss_total"] for s in reference["steps"]]
    assert len(our_run["totals"]) == len(want)
    for i, (got, expected) in enumerate(zip(our_run["totals"], want)):
        assert got == pytest.approx(expected, rel=LOSS_RTOL), f"step {i}"


@pytest.mark.parametrize("epoch", [1, 2])
def test_checkpoints_match_the_published_run(reference, our_run, epoch):
    name = f"epoch_{epoch}.pth"
    got, want = load_prompt_checkpoint(our_run["run"] / name), load_prompt_checkpoint(REFERENCE / name)
    assert set(got) == set(want)
    for key in want:
        if key.startswith(("token_", "tokenized_")):
            assert torch.equal(got[key], want[key]), key  # buffers are not trained
        else:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=PROMPT_ATOL, msg=f"{name} {key}")
    moved = max((want[k] - load_prompt_checkpoint(REFERENCE / "epoch_0.pth")[k]).abs().max().item() for k in want)
    assert moved > 10 * PROMPT_ATOL  # the tolerance is far below what training changes


def test_reference_files_are_what_the_trace_names(reference):
    import hashlib

    for name, sha in reference["checkpoints"].items():
        assert hashlib.sha256(Path(REFERENCE / name).read_bytes()).hexdigest() == sha, name
