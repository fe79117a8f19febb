"""``test.py`` end to end against what the published ``test.py`` gave (../shared/conformance/pipeline).

The published script was run unchanged (synthetic weights, CPU) on a small dataset that
``pipeline/make_dataset.py`` rebuilds bit for bit: 3 classes of 7 images, so its batches of 8
(meta.json order) cross class boundaries. Ours must give the same per-class metrics and
per-image scores within 1e-4, for Crane and for Crane+ with the published batch-wide D-Attn
mean and published batching.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import crane
from crane.data.image import preprocess
from crane.engine import evaluate
from tests.conftest import (CONFORMANCE, REPO, SKIP_REASON, conformance_available, interrupt_at_class_metrics,
                            record_predicted_batches)

TOL = 1e-4
PIPELINE = CONFORMANCE / "pipeline"
CASES = ("crane_test", "cranep_test")
REPO_CHECKPOINTS = REPO / "checkpoints"

pytestmark = pytest.mark.skipif(not (conformance_available() and (PIPELINE / "crane_test.json").is_file()),
                                reason=SKIP_REASON)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    """The published run's dataset, rebuilt with its own generator (README of pipeline/)."""
    maker = _load("crane_pipeline_make_dataset", PIPELINE / "make_dataset.py")
    root = tmp_path_factory.mktemp("pipeline")
    maker.make(str(root), "pipe", classes=3, per_class=7, size=160, seed=0, class_names=["bottle", "candle", "screw"])
    return root


def _weights(expected: dict, synth_weights) -> tuple[Path, Path | None]:
    clip = synth_weights("clip", vision_width=64, seed=21)
    dino = synth_weights("dino", seed=22) if expected["weights"]["dino"] else None
    return clip, dino


def _args(expected: dict, root: Path, clip: Path, dino: Path | None, out: Path) -> list[str]:
    flags = expected["flags"]
    checkpoint = REPO_CHECKPOINTS / expected["weights"]["checkpoint"]
    args = ["--dataset", "pipe", "--datasets_root_dir", str(root), "--checkpoint", str(checkpoint),
            "--clip_weights", str(clip), "--dino_model", flags["dino_model"],
            "--features_list", *map(str, flags["features_list"]), "--soft_mean", str(flags["soft_mean"]),
            "--image_size", str(flags["image_size"]), "--device", "cpu", "--save_path", str(out)]
    if dino is not None:
        args += ["--dino_weights", str(dino), "--dattn_batch_mean", "True"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_test_py_gives_the_published_scripts_numbers(case, pipeline_root, synth_weights, tmp_path, monkeypatch):
    expected = json.loads((PIPELINE / f"{case}.json").read_text())
    clip, dino = _weights(expected, synth_weights)
    out = tmp_path / "out"
    seen_batches = record_predicted_batches(monkeypatch)
    script = _load("crane_test_script_pipeline", REPO / "test.py")
    assert script.main(_args(expected, pipeline_root, clip, dino, out)) == 0

    result = json.loads((out / "metrics.json").read_text())
    assert list(result["classes"]) == [c for c in expected["metrics"] if c != "mean"]  # meta.json order
    for cls_name, values in expected["metrics"].items():
        ours = result["mean"] if cls_name == "mean" else result["classes"][cls_name]
        for metric, value in values.items():
            assert ours[metric] == pytest.approx(value, abs=TOL), (cls_name, metric)
    with open(out / "predictions.csv", newline="") as f:
        scores = {row["img_path"]: float(row["score"]) for row in csv.DictReader(f)}
    assert len(scores) == len(expected["images"])
    for image in expected["images"]:
        assert scores[image["img_path"]] == pytest.approx(image["score"], abs=TOL), image["img_path"]
    if dino is not None:  # published batching: the same batches of 8, each computed once
        assert seen_batches == expected["batches"]


@pytest.mark.slow
def test_published_batching_resumes_a_class_with_its_neighbours_batch_mates(pipeline_root, synth_weights, tmp_path,
                                                                            monkeypatch):
    """Resuming after the first class leaves 'candle', whose first batch starts in 'bottle' and whose last
    ends in 'screw': it is recomputed with those batch mates, and the files equal an uninterrupted run's."""
    expected = json.loads((PIPELINE / "cranep_test.json").read_text())
    clip, dino = _weights(expected, synth_weights)
    script = _load("crane_test_script_resume", REPO / "test.py")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert script.main(_args(expected, pipeline_root, clip, dino, whole)) == 0

    real_metrics = evaluate.class_metrics
    interrupt_at_class_metrics(monkeypatch, 2)
    assert script.main(_args(expected, pipeline_root, clip, dino, resumed)) == 130  # interrupted
    assert [p.name for p in (resumed / "classes").iterdir()] == ["bottle.json"]
    (resumed / "classes" / "screw.json").write_text((whole / "classes" / "screw.json").read_text())  # as if done

    monkeypatch.setattr(evaluate, "class_metrics", real_metrics)
    seen = record_predicted_batches(monkeypatch)
    assert script.main(_args(expected, pipeline_root, clip, dino, resumed)) == 0
    assert seen == expected["batches"][:2]  # candle's two batches, with bottle's and screw's images in them
    for name in ("metrics.json", "predictions.csv"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.slow
def test_published_batching_with_a_class_inside_one_batch(synth_weights, tmp_path, monkeypatch):
    """Classes of 5, 2 and 7 images: the first batch of 8 holds all three classes (the middle one
    whole). Every image gets the score of its published batch, also when resuming after the first class."""
    maker = _load("crane_pipeline_make_dataset_small", PIPELINE / "make_dataset.py")
    root = tmp_path / "data"
    maker.make(str(root), "pipe", classes=3, per_class=7, size=160, seed=3, class_names=["bottle", "candle", "screw"])
    meta_file = root / "pipe" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["test"] = {c: v[:n] for (c, v), n in zip(meta["test"].items(), (5, 2, 7))}
    meta_file.write_text(json.dumps(meta))
    expected = json.loads((PIPELINE / "cranep_test.json").read_text())
    clip, dino = _weights(expected, synth_weights)
    script = _load("crane_test_script_small_class", REPO / "test.py")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert script.main(_args(expected, root, clip, dino, whole)) == 0

    det = crane.Detector.from_config(str(clip), REPO_CHECKPOINTS / expected["weights"]["checkpoint"],
                                     dino_weights=str(dino), dino_model="dinov2", features_list=(24,), image_size=112, dattn_batch_mean=True)
    paths = [s["img_path"] for c in meta["test"].values() for s in c]
    images = torch.stack([preprocess(root / "pipe" / p, 112) for p in paths])
    reference = np.concatenate([det.predict_tensor(images[i:i + 8])[0].numpy() for i in range(0, len(paths), 8)])
    with open(whole / "predictions.csv", newline="") as f:
        scores = {row["img_path"]: float(row["score"]) for row in csv.DictReader(f)}
    assert list(scores) == paths
    np.testing.assert_allclose([scores[p] for p in paths], reference, atol=1e-6, rtol=0)

    interrupt_at_class_metrics(monkeypatch, 2)
    assert script.main(_args(expected, root, clip, dino, resumed)) == 130
    monkeypatch.undo()
    assert script.main(_args(expected, root, clip, dino, resumed)) == 0
    for name in ("metrics.json", "predictions.csv"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
