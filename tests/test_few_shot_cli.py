"""Few-shot inspection on the command line: ``calibrate --reference_memory``, ``predict`` with the memory the
thresholds name, ``predict --reference FILE|DIR``, and their one-line refusals.

A small synthetic Crane (``model_flags``: synthetic CLIP, 56 px) on the demo textures of ``datasets.synthetic``
(one class, 64 px); the ``detectors`` fixture builds the model once per module.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from crane.cli import dispatch as cli
from crane.files import file_identity
from crane.reference import load_reference
from datasets.synthetic import make_synthetic_dataset

REFERENCES = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    """The demo class ``blotches``: ``refs``, 6 normal training images; ``new``, 4 normal test images;
    ``more_refs`` and ``more_new``: 20 of each."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("few_shot_cli") / "demo", classes=3, train=20,
                                  test_normal=20, test_anomalous=0, size=64, seed=5)
    meta = json.loads((root / "meta.json").read_text())
    refs = sorted((root / "train" / "blotches" / "good").glob("*.png"))
    new = [root / s["img_path"] for s in meta["test"]["blotches"]]
    return {"refs": refs[:REFERENCES], "new": new[:4], "more_refs": refs, "more_new": new}


def _folder(tmp_path: Path, name: str, files: list[Path]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for path in files:
        shutil.copy(path, folder / path.name)
    return folder


def _checkpoint(tmp_path: Path, official_checkpoint: Path, name: str = "ckpt") -> Path:
    checkpoint = tmp_path / name / "epoch_5.pth"
    checkpoint.parent.mkdir()
    shutil.copy(official_checkpoint, checkpoint)
    return checkpoint


def _scores(out: Path) -> dict[str, float]:
    with open(out / "scores.csv", newline="") as f:
        return {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(f)}


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.fixture(scope="module")
def detector(detectors, images, model_flags, official_checkpoint, tmp_path_factory):
    """The model the command line builds (56 px), from the ``detectors`` cache after one predict run."""
    folder = tmp_path_factory.mktemp("first")
    assert cli.main(["predict", str(images["new"][0]), "--out", str(folder / "out"), "--checkpoint",
                     str(_checkpoint(folder, official_checkpoint)), *model_flags]) == 0
    (built,) = [d for d in detectors.values() if d.config.image_size == 56]
    return built


def test_calibrate_with_a_reference_memory_and_predict_with_it(images, tmp_path, model_flags, official_checkpoint,
                                                               detector, capsys):
    checkpoint = _checkpoint(tmp_path, official_checkpoint)
    refs, new = _folder(tmp_path, "refs", images["refs"]), _folder(tmp_path, "new", images["new"])
    common = ["--checkpoint", str(checkpoint), *model_flags]
    assert cli.main(["calibrate", "--normal", str(refs), "--target_fpr", "0.3", "--reference_memory", *common]) == 0
    out = capsys.readouterr().out
    assert "calibrated by leave-one-out" in out
    memory_file = checkpoint.parent / "reference.pt"
    saved = json.loads((checkpoint.parent / "thresholds.json").read_text())
    assert saved["reference"] == {"path": "reference.pt", "identity": file_identity(memory_file),
                                  "references": REFERENCES, "coreset_ratio": 1.0, "few_shot_weight": 0.5,
                                  "scoring": "leave-one-out", "leave_one_out_images": REFERENCES}

    # the thresholds are those of the references' leave-one-out scores (the Python API's)
    memory = load_reference(memory_file, detector.model)
    assert memory.info["provenance"]["checkpoint_sha256"] == saved["model"]["checkpoint_sha256"]
    detector.set_reference(memory)
    loo = detector.predict(sorted(refs.iterdir()), leave_one_out=True).scores
    assert saved["image_threshold"] == pytest.approx(float(np.sort(loo)[::-1][1]), abs=1e-6)  # k = 2 of 6 at 0.3
    expected = dict(zip((p.name for p in sorted(new.iterdir())), detector.predict(sorted(new.iterdir())).scores))

    # predict uses the memory the thresholds name, and says so first
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "named"), "--no_panels", *common]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"few-shot: scoring against reference memory {memory_file} ({REFERENCES} images, "
                            "coreset 1") and first.endswith(f"named by {checkpoint.parent / 'thresholds.json'}")
    scores = _scores(tmp_path / "named")
    assert scores.keys() == expected.keys()
    np.testing.assert_allclose([scores[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)
    used = json.loads((tmp_path / "named" / "reference.json").read_text())["reference"]
    assert used["origin"] == "thresholds" and used["identity"] == file_identity(memory_file)
    assert used["references"] == REFERENCES

    # --reference FILE: the same memory, the same scores
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "file"), "--no_panels", "--reference",
                     str(memory_file), *common]) == 0
    assert "given by --reference, the one" in capsys.readouterr().out.splitlines()[0]
    assert _scores(tmp_path / "file") == scores

    # --reference DIR: built on the fly from the same images, the same memory; the thresholds (calibrated with the
    # file) are refused unless replaced
    args = ["predict", str(new), "--out", str(tmp_path / "dir"), "--no_panels", "--reference", str(refs), *common]
    assert cli.main(args) == 2
    assert "do not fit the scores of --reference" in _error(capsys)
    assert cli.main([*args, "--threshold", "0.5,0.5"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(
        f"few-shot: scoring against a reference memory built from the {REFERENCES} images in {refs}")
    built = _scores(tmp_path / "dir")
    np.testing.assert_allclose([built[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "dir" / "reference.json").read_text())["reference"]["origin"] == "--reference"

    # the app scores with the memory its thresholds name, and its calibrations name it too (leave-one-out)
    from crane.cli.app.backend import Engine, check_flags
    from crane.cli.app.command import build_parser

    app_args = build_parser().parse_args(common)
    assert check_flags(app_args) == []
    engine = Engine.open(app_args)
    assert engine.notes[0] == first
    some = sorted(new.iterdir())[0]
    assert engine.predict_file(some)["score"] == pytest.approx(expected[some.name], abs=1e-6)
    calibration = engine.calibrate(refs, 0.3)
    assert calibration.thresholds.meta["reference"] == saved["reference"]
    assert calibration.thresholds.image == pytest.approx(saved["image_threshold"], abs=1e-6)

    # the coreset and weight flags build a memory from images only
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "x"), "--coreset_ratio", "0.5", *common]) == 2
    assert "--coreset_ratio 0.5: it sets how a memory is built from images" in _error(capsys)

    # zero-shot thresholds with --reference: refused; the memory changed or missing: refused
    zero = tmp_path / "zero.json"
    assert cli.main(["calibrate", "--normal", str(refs), "--target_fpr", "0.2", "--output", str(zero), *common]) == 0
    capsys.readouterr()
    assert "reference" not in json.loads(zero.read_text())
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "z"), "--thresholds", str(zero), "--reference",
                     str(memory_file), *common]) == 2
    assert "calibrated zero-shot" in _error(capsys)
    moved = tmp_path / "moved.pt"
    memory_file.rename(moved)
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "m"), *common]) == 2
    assert "which is missing" in _error(capsys)
    memory_file.write_bytes(moved.read_bytes()[:-1] + b"x")
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "m"), *common]) == 2
    assert "which has changed since" in _error(capsys)
    assert not (tmp_path / "m").exists()  # refused before any output


def test_zero_shot_predict_is_unchanged_without_a_memory(images, tmp_path, model_flags, official_checkpoint,
                                                         detector, capsys):
    """Without a memory (none given, none named) predict's scores are the zero-shot ones, bit for bit, also after
    a run with a memory on the same detector; a memory's first line and ``reference.json`` are not written."""
    checkpoint = _checkpoint(tmp_path, official_checkpoint)
    new = _folder(tmp_path, "new", images["new"])
    common = ["--checkpoint", str(checkpoint), *model_flags]
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "before"), "--no_panels", *common]) == 0
    assert not capsys.readouterr().out.startswith("few-shot")
    detector.set_reference(images["refs"][:3])  # a memory left on the (cached) detector must not leak
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "after"), "--no_panels", *common]) == 0
    assert detector.reference is None
    zero = detector.predict(sorted(new.iterdir()), batch_size=3).scores
    before, after = _scores(tmp_path / "before"), _scores(tmp_path / "after")
    assert before == after == dict(zip((p.name for p in sorted(new.iterdir())), zero.tolist()))
    assert not (tmp_path / "before" / "reference.json").exists()


def test_one_line_refusals(images, tmp_path, model_flags, official_checkpoint, detector, capsys):
    checkpoint = _checkpoint(tmp_path, official_checkpoint)
    new = _folder(tmp_path, "new", images["new"][:2])
    common = ["--checkpoint", str(checkpoint), *model_flags]
    one = _folder(tmp_path, "one", images["refs"][:1])
    assert cli.main(["calibrate", "--normal", str(one), "--target_fpr", "0.2", "--reference_memory", *common]) == 2
    assert "needs at least 2 normal images" in _error(capsys)
    assert cli.main(["calibrate", "--labelled", str(new), "--reference_memory", *common]) == 2
    assert "pass --normal DIR" in _error(capsys)
    assert cli.main(["calibrate", "--normal", str(new), "--target_fpr", "0.3", "--few_shot_weight", "0.7",
                     *common]) == 2
    assert "--few_shot_weight 0.7: sets how --reference_memory builds" in _error(capsys)
    assert cli.main(["calibrate", "--normal", str(new), "--target_fpr", "0.3", "--reference_memory",
                     "--coreset_ratio", "0", *common]) == 2
    assert "--coreset_ratio must be in (0, 1], got 0.0" in _error(capsys)
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "o"), "--reference", str(tmp_path / "empty"),
                     *common]) == 2
    assert _error(capsys).startswith(f"error: --reference {tmp_path / 'empty'}: no images")
    # a reference.pt not written by calibrate is never replaced
    (checkpoint.parent / "reference.pt").write_text("mine")
    assert cli.main(["calibrate", "--normal", str(_folder(tmp_path, "two", images["refs"][:2])), "--target_fpr",
                     "0.4", "--reference_memory", *common]) == 2
    assert "exists and is not a reference memory" in _error(capsys)
    assert (checkpoint.parent / "reference.pt").read_text() == "mine"
    # a memory built with other settings (another image size)
    memory = detector.set_reference(images["refs"][:2])
    from crane.reference import save_reference

    save_reference(memory, tmp_path / "other.pt")
    detector.set_reference(None)
    size = model_flags.index("--image_size")
    flags = [*model_flags[:size], "--image_size", "84", *model_flags[size + 2:]]
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "o"), "--reference", str(tmp_path / "other.pt"),
                     "--checkpoint", str(checkpoint), *flags]) == 2
    assert "was built with other settings: image_size 56, this model 84" in _error(capsys)
    # an exported graph holds its own memory
    assert cli.main(["predict", str(new), "--out", str(tmp_path / "o"), "--backend", "onnxruntime", "--model",
                     str(tmp_path / "m.onnx"), "--reference", str(tmp_path / "other.pt")]) == 2
    assert "--reference is for --backend torch" in _error(capsys)


def test_leave_one_out_thresholds_are_not_biased_low(images, tmp_path, model_flags, official_checkpoint, detector,
                                                     capsys):
    """The image threshold calibrated by leave-one-out flags new normal images at about the target rate; the
    threshold picked on the references scored against the whole memory (each its own nearest neighbour) is biased
    low and flags nearly all of them."""
    from crane.inspection.calibration import false_alarm_threshold

    checkpoint = _checkpoint(tmp_path, official_checkpoint)
    refs = _folder(tmp_path, "refs", images["more_refs"])
    target = 0.25  # 5 of 20: an expected rate of 5 / 21 on new normal images
    assert cli.main(["calibrate", "--normal", str(refs), "--target_fpr", str(target), "--reference_memory",
                     "--checkpoint", str(checkpoint), *model_flags]) == 0
    capsys.readouterr()
    saved = json.loads((checkpoint.parent / "thresholds.json").read_text())
    assert saved["reference"]["leave_one_out_images"] == 20
    detector.set_reference(load_reference(checkpoint.parent / "reference.pt", detector.model))
    new = detector.predict(images["more_new"], batch_size=20).scores
    naive = false_alarm_threshold(detector.predict(images["more_refs"], batch_size=20).scores, target).threshold
    detector.set_reference(None)
    loo_rate, naive_rate = float(np.mean(new >= saved["image_threshold"])), float(np.mean(new >= naive))
    assert 0.05 <= loo_rate <= 0.5, (loo_rate, naive_rate)
    assert naive_rate >= 0.8, (loo_rate, naive_rate)


def test_an_exported_graph_refuses_thresholds_of_a_memory_it_does_not_hold():
    from crane.inspection.reference_use import deployed_problem
    from crane.inspection.thresholds import Thresholds

    named = Thresholds(0.5, 0.5, {"reference": {"path": "reference.pt", "identity": "xxh3-128:ab:1"}}, "t.json")
    assert "holds no reference memory: export it with the memory" in deployed_problem(named, None)
    assert "holds another reference memory" in deployed_problem(named, {"identity": "xxh3-128:cd:1"})
    assert deployed_problem(named, {"identity": "xxh3-128:ab:1"}) is None
    assert deployed_problem(Thresholds(0.5, 0.5, {}, "t.json"), None) is None
