"""``python -m crane predict / calibrate / init-checkpoint`` and the threshold picking behind them.

The model runs with synthetic CLIP weights (narrow vision tower) and an official
prompt-learner checkpoint at a small image size; the detector built from the flags
is cached per checkpoint content and options (fixtures in ``conftest.py``), so each
configuration loads once. Checks that must happen before any model work replace
``crane.cli.common.load_detector`` with a function that fails the test.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crane.cli import common
from crane.cli import dispatch as cli
from crane.data.folders import InputError, collect_inputs
from crane.inspection.thresholds import (Thresholds, load_thresholds, max_f1_threshold, parse_override, save_thresholds,
                              youden_threshold)
from crane.inspection.visualize import PREDICTED, panel_layout

from tests.conftest import CLI_IMAGE_SIZE as SIZE


# ------------------------------------------------------------------------- brute force


def _brute_force(labels: np.ndarray, scores: np.ndarray, criterion: str) -> tuple[float, float]:
    """Best ``(threshold, value)`` over every distinct score, rule ``score >= t``, lowest threshold on ties."""
    truth = labels.ravel() > 0.5
    flat = scores.ravel()
    best_t, best_v = None, -np.inf
    candidates = np.unique(flat)
    for start in range(0, len(candidates), 256):
        chunk = candidates[start:start + 256]
        predicted = flat[None, :] >= chunk[:, None]
        tp = (predicted & truth).sum(1)
        fp = (predicted & ~truth).sum(1)
        fn = truth.sum() - tp
        if criterion == "f1":
            value = 2.0 * tp / (2 * tp + fp + fn)
        else:
            value = tp / truth.sum() - fp / (~truth).sum()
        i = int(np.argmax(value))
        if value[i] > best_v:
            best_t, best_v = float(chunk[i]), float(value[i])
    return best_t, best_v


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("criterion", ["f1", "youden"])
def test_thresholds_match_brute_force(seed, criterion):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = rng.random(n) + labels * rng.uniform(0.0, 0.8)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    pick = max_f1_threshold if criterion == "f1" else youden_threshold
    assert pick(labels, scores) == _brute_force(labels, scores, criterion)


def test_pixel_threshold_on_maps_matches_brute_force():
    rng = np.random.default_rng(7)
    masks = np.zeros((4, 20, 20), bool)
    masks[1, 5:12, 3:9] = True
    masks[3, 0:4, 10:20] = True
    maps = (rng.random(masks.shape) * 0.6 + masks * 0.3).astype(np.float32)
    assert max_f1_threshold(masks, maps) == _brute_force(masks, maps, "f1")


def test_threshold_picking_needs_both_classes():
    with pytest.raises(ValueError, match="normal and anomalous"):
        max_f1_threshold(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="shape"):
        youden_threshold(np.ones(4), np.arange(5.0))


def test_threshold_override_parsing():
    assert parse_override("0.7") == (0.7, None)
    assert parse_override("0.7,0.4") == (0.7, 0.4)
    assert parse_override(",0.4") == (None, 0.4)
    for bad in ("", ",", "a", "0.1,0.2,0.3", "nan"):
        with pytest.raises(ValueError):
            parse_override(bad)


def test_thresholds_file_round_trip(tmp_path):
    path = save_thresholds(Thresholds(0.25, None, {"calibration": {"images": 3}}), tmp_path / "t" / "thresholds.json")
    loaded = load_thresholds(path)
    assert (loaded.image, loaded.pixel, loaded.meta["calibration"]) == (0.25, None, {"images": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["thresholds.json"]
    path.write_text(json.dumps({"image_threshold": 0.2}))
    with pytest.raises(ValueError, match="not a Crane thresholds file"):
        load_thresholds(path)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="cannot read"):
        load_thresholds(path)


# ------------------------------------------------------------------------------ inputs


def test_collect_inputs_folders_globs_and_files(tmp_path):
    root = tmp_path / "photos"
    for rel in ("a.PNG", "b.jpeg", "sub/c.Tif", "sub/c.png", "sub/deeper/d.bmp", "notes.txt", ".hidden.png",
                ".cache/e.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    out = root / "results"
    (out / "panels").mkdir(parents=True)
    (out / "panels" / "old.png").write_bytes(b"")
    found = collect_inputs([str(root)], exclude=out).files
    assert [f.name for f in found] == ["a", "b.jpeg", "sub/c.Tif", "sub/c", "sub/deeper/d.bmp"]
    assert found[0].path == root / "a.PNG"
    globbed = collect_inputs([str(root / "**" / "*.bmp"), str(root / "notes.txt"), str(root / "a.PNG")]).files
    assert [f.path for f in globbed] == [root / "sub/deeper/d.bmp", root / "notes.txt", root / "a.PNG"]
    assert [f.name for f in globbed] == ["sub/deeper/d.bmp", "notes.txt", "a"]
    assert [f.name for f in collect_inputs([str(root / "a.PNG"), str(root)]).files][:2] == ["a", "b.jpeg"]
    # one rule, whatever else is given: a name depends on its own image only
    assert [f.name for f in collect_inputs([str(root / "sub/c.Tif"), str(root / "b.jpeg")]).files] == \
        ["sub/c.Tif", "b.jpeg"]
    (root / "sub/c.Tif.png").write_bytes(b"")  # would share sub/c.Tif's name: refused, naming both
    with pytest.raises(InputError, match=r"c\.Tif and .*c\.Tif\.png would both be named 'sub/c\.Tif'"):
        collect_inputs([str(root)], exclude=out)
    with pytest.raises(InputError, match="no such file"):
        collect_inputs([str(root / "missing.png")])
    with pytest.raises(InputError, match="no file matches"):
        collect_inputs([str(root / "*.gif")])


def test_collect_inputs_leaves_out_ground_truth_masks(tmp_path):
    root = tmp_path / "data"
    images = ["test/bottle/crack/001.png", "test/bottle/good/000.JPG", "train/bottle/good/010.png"]
    masks = ["test/bottle/masks/001_mask.png", "test/bottle/masks/crack/002_mask.png", "ground_truth/crack/003.png",
             "test/bottle/crack/004_MASK.tif", "Masks/005.png"]
    for rel in images + masks:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    relative = lambda found: sorted(f.path.relative_to(root).as_posix() for f in found.files)  # noqa: E731
    for given in ([str(root)], [str(root / "**" / "*.*")], [str(root / "test"), str(root / "train")]):
        found = collect_inputs(given)
        assert relative(found) == images, given
    assert sorted(p.relative_to(root).as_posix() for p in collect_inputs([str(root)]).masks_left_out) == sorted(masks)
    assert relative(collect_inputs([str(root)], include_masks=True)) == sorted(images + masks)
    named = collect_inputs([str(root / masks[0])])  # a file named on the command line is what the user asked for
    assert relative(named) == [masks[0]] and named.masks_left_out == []
    assert relative(collect_inputs([str(root / "test/bottle/masks")])) == masks[:2]  # so is a masks folder
    assert relative(collect_inputs([str(root / "**" / "*_mask.*")])) == masks[:2]  # (globs are case-sensitive)


# ------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Readable 8/16-bit, gray, RGBA, JPEG and BMP files of several sizes, plus a truncated JPEG."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rgb = (rng.random((60, 90, 3)) * 255).astype(np.uint8)
    (root / "sub").mkdir()
    Image.fromarray(rgb).save(root / "rgb8.png")
    Image.fromarray((rng.random((70, 50)) * 65535).astype(np.uint16)).save(root / "gray16.png")
    cv2.imwrite(str(root / "rgb16.png"), (rng.random((40, 64, 3)) * 65535).astype(np.uint16))
    Image.fromarray(rgb[:, :, 1]).save(root / "sub" / "gray8.PNG")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 100, np.uint8)])).save(root / "sub" / "rgba.png")
    Image.fromarray(rgb).save(root / "sub" / "photo.JPG", quality=90)
    Image.fromarray(rgb[:50]).save(root / "sub" / "scan.bmp")
    data = (root / "sub" / "photo.JPG").read_bytes()
    (root / "sub" / "broken.jpg").write_bytes(data[:len(data) // 2])
    return root


READABLE = ["gray16.png", "rgb16.png", "rgb8.png", "sub/gray8.PNG", "sub/photo.JPG", "sub/rgba.png", "sub/scan.bmp"]


def _output_name(relative: str) -> str:
    """predict's rule: the relative path, a ``.png`` suffix dropped, any other kept."""
    path = Path(relative)
    return (path.with_suffix("") if path.suffix.lower() == ".png" else path).as_posix()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_mixed_formats_skips_the_broken_file(mixed_folder, tmp_path, model_flags, official_checkpoint,
                                                     detectors, capsys):
    out = tmp_path / "out"
    checkpoint = tmp_path / "ckpt" / "epoch_5.pth"  # a folder without thresholds.json
    checkpoint.parent.mkdir()
    shutil.copy(official_checkpoint, checkpoint)
    status = cli.main(["predict", str(mixed_folder), "--out", str(out), "--checkpoint", str(checkpoint),
                       *model_flags, "--save_maps"])
    captured = capsys.readouterr()
    assert status == cli.EXIT_SKIPPED
    assert sum("broken.jpg" in line for line in captured.err.splitlines() if line.startswith("skipped:")) == 1
    assert "skipped 1 unreadable file" in captured.err
    assert "note: no thresholds" in captured.err and "python -m crane calibrate" in captured.err
    rows = _rows(out / "scores.csv")
    assert [r["path"] for r in rows] == [(mixed_folder / name).as_posix() for name in READABLE]
    assert all(r["decision"] == "" for r in rows)
    assert [r["path"] for r in _rows(out / "skipped.csv")] == [(mixed_folder / "sub" / "broken.jpg").as_posix()]

    (detector,) = detectors.values()  # the official Crane checkpoint's settings, no model flag given
    assert detector.config.image_size == SIZE and detector.config.features_list == (6, 12, 18, 24)
    assert detector.config.soft_mean is True and detector.config.dino_model == "none"
    expected = detector.predict([mixed_folder / name for name in READABLE], batch_size=1)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected.scores, rtol=0, atol=1e-6)
    for name, amap in zip(READABLE, expected.maps):
        original = np.asarray(Image.open(mixed_folder / name))
        panel = cv2.imread(str(out / "panels" / f"{_output_name(name)}.png"), cv2.IMREAD_COLOR)
        layout = panel_layout(*original.shape[:2])
        assert panel.shape[1] == layout.lefts[2] + layout.tile_w + layout.lefts[0]
        np.testing.assert_allclose(np.load(out / "maps" / f"{_output_name(name)}.npy"), amap, rtol=0, atol=1e-6)
    assert len(list((out / "panels").rglob("*.png"))) == len(READABLE)


def test_calibrate_then_predict_uses_thresholds(tmp_path, model_flags, official_checkpoint, detectors, capsys):
    from crane.data.image import load_mask
    from datasets.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data / "demo", classes=1, train=0, test_normal=3, test_anomalous=3, size=64)
    checkpoint = tmp_path / "ckpt" / "epoch_5.pth"
    checkpoint.parent.mkdir()
    shutil.copy(official_checkpoint, checkpoint)
    status = cli.main(["calibrate", "--dataset", "demo", "--datasets_root_dir", str(data), "--checkpoint",
                       str(checkpoint), *model_flags])
    assert status == 0, capsys.readouterr().err
    saved = json.loads((checkpoint.parent / "thresholds.json").read_text())
    assert saved["image_criterion"] == "f1" and saved["model"]["image_size"] == SIZE
    assert saved["calibration"]["images"] == 6 and saved["calibration"]["anomalous"] == 3

    meta = json.loads((data / "demo" / "meta.json").read_text())["test"]
    samples = [s for cls in sorted(meta) for s in meta[cls]]
    detector = next(iter(detectors.values()))
    result = detector.predict([data / "demo" / s["img_path"] for s in samples])
    labels = np.array([s["anomaly"] for s in samples])
    masks = np.stack([load_mask(data / "demo" / s["mask_path"] if s["mask_path"] else None, SIZE).numpy()
                      for s in samples])
    image_t, image_f1 = _brute_force(labels, result.scores, "f1")
    pixel_t, pixel_f1 = _brute_force(masks, result.maps, "f1")
    assert saved["image_threshold"] == pytest.approx(image_t, abs=1e-6)
    assert saved["calibration"]["image_f1"] == pytest.approx(image_f1, abs=1e-9)
    assert saved["pixel_threshold"] == pytest.approx(pixel_t, abs=1e-6)
    assert saved["calibration"]["pixel_f1"] == pytest.approx(pixel_f1, abs=1e-9)

    youden = tmp_path / "youden.json"
    assert cli.main(["calibrate", "--dataset", "demo", "--datasets_root_dir", str(data), "--checkpoint",
                     str(checkpoint), "--image_criterion", "youden", "--output", str(youden), *model_flags]) == 0
    assert json.loads(youden.read_text())["image_threshold"] == pytest.approx(
        _brute_force(labels, result.scores, "youden")[0], abs=1e-6)

    out = tmp_path / "out"
    capsys.readouterr()
    images = [str(data / "demo" / s["img_path"]) for s in samples]  # not the masks beside them
    assert cli.main(["predict", *images, "--out", str(out), "--checkpoint", str(checkpoint), *model_flags,
                     "--save_masks"]) == 0
    assert "note:" not in capsys.readouterr().err
    rows = {Path(r["path"]).relative_to(data / "demo").as_posix(): r for r in _rows(out / "scores.csv")}
    common = Path(os.path.commonpath([Path(i).parent for i in images]))  # output names are relative to it
    assert len(rows) == 6
    for sample, score, amap in zip(samples, result.scores, result.maps):
        row = rows[sample["img_path"]]
        assert row["decision"] == ("anomalous" if float(row["score"]) >= saved["image_threshold"] else "normal")
        assert float(row["score"]) == pytest.approx(float(score), abs=1e-6)
        name = _output_name((data / "demo" / sample["img_path"]).relative_to(common).as_posix())
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        full = cv2.resize(amap, (64, 64), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(mask == 255, full >= saved["pixel_threshold"])
        layout = panel_layout(64, 64)
        panel = cv2.imread(str(out / "panels" / f"{name}.png"))[..., ::-1]
        outlined = np.all(layout.tile(panel, 2) == np.array(PREDICTED, np.uint8), axis=-1).any()
        tile_map = cv2.resize(amap, (layout.tile_w, layout.tile_h), interpolation=cv2.INTER_LINEAR)
        assert outlined == bool((tile_map >= saved["pixel_threshold"]).any())

    override = tmp_path / "override"
    assert cli.main(["predict", *images, "--out", str(override), "--checkpoint", str(checkpoint), *model_flags,
                     "--threshold", "0.5", "--no_panels"]) == 0
    for row in _rows(override / "scores.csv"):
        assert row["decision"] == ("anomalous" if float(row["score"]) >= 0.5 else "normal")
    assert not (override / "panels").exists()


def _forbid_model(monkeypatch) -> None:
    def fail(args, state, info):
        raise AssertionError("the model was built")

    monkeypatch.setattr(common, "load_detector", fail)


def _one_error_line(err: str, *parts: str) -> str:
    """The single ``error:`` line of ``err`` (which holds nothing else), checked to name each of ``parts``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "weights_only" not in err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def test_predict_argument_errors_fail_before_loading_the_model(tmp_path, official_checkpoint, model_flags,
                                                               monkeypatch, capsys):
    _forbid_model(monkeypatch)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    base = ["--out", str(tmp_path / "out"), "--checkpoint", str(official_checkpoint), *model_flags]
    cases = [
        (["predict", str(tmp_path / "missing.png"), *base], "no such file or folder"),
        (["predict", str(image), *base, "--save_masks"], "--save_masks needs a pixel threshold"),
        (["predict", str(image), *base, "--threshold", "x"], "--threshold expects numbers"),
        (["predict", str(image), *base, "--thresholds", str(tmp_path / "none.json")], "thresholds file not found"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == cli.EXIT_USAGE
        _one_error_line(capsys.readouterr().err, message)


def test_bad_values_are_one_line_each_exit_2_before_the_model(tmp_path, official_checkpoint, model_flags,
                                                              monkeypatch, capsys):
    import torch

    _forbid_model(monkeypatch)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint")
    with_objects = tmp_path / "objects.pth"
    torch.save({"prompt_learner": {"where": Path("a")}}, with_objects)
    unrecorded = tmp_path / "unrecorded.pth"  # a prompt learner recording no settings (not an official one)
    torch.save({"prompt_learner": torch.load(official_checkpoint, map_location="cpu", weights_only=True)["prompt_learner"]}, unrecorded)
    predict = ["predict", str(image), "--out", str(tmp_path / "out"), *model_flags]
    official = ["--checkpoint", str(official_checkpoint)]
    cases = [
        (["--checkpoint", str(text_file)], ["notes.pth", "not a Crane checkpoint"]),
        (["--checkpoint", str(with_objects)], ["objects.pth", "not a Crane checkpoint"]),
        (["--checkpoint", str(tmp_path / "missing.pth")], ["checkpoint not found"]),
        (["--checkpoint", str(unrecorded), "--features_list", "12", "25"], ["--features_list 25", "blocks 1 to 24"]),
        ([*official, "--dino_model", "dinov2"], ["--dino_model dinov2", "--dino_model none", "--force"]),
        ([*official, "--features_list", "24"], ["--features_list 24", "--features_list 6 12 18 24"]),
        ([*official, "--precision", "fp16"], ["--precision fp16", "GPU"]),
        ([*official, "--image_size", "0"], ["--image_size", "got 0"]),
        ([*official, "--image_size", "-3"], ["--image_size", "got -3"]),
        ([*official, "--sigma", "-1"], ["--sigma", "got -1"]),
        ([*official, "--sigma", "nan"], ["--sigma", "got nan"]),
        ([*official, "--threshold", "1.5"], ["--threshold", "image threshold", "[0, 1]"]),
        ([*official, "--threshold", "0.5,-0.2"], ["--threshold", "pixel threshold", "[0, 1]"]),
        ([*official, "--batch_size", "0"], ["--batch_size"]),
        ([*official, "--device", "tpu"], ["--device", "cpu, cuda, cuda:N, N (GPU N) or auto"]),
    ]
    if not torch.cuda.is_available():
        cases += [([*official, "--device", "cuda"], ["--device cuda", "CUDA is not available"]),
                  ([*official, "--device", "1"], ["--device 1", "CUDA is not available"])]
    for extra, parts in cases:
        assert cli.main([*predict, *extra]) == cli.EXIT_USAGE, extra
        _one_error_line(capsys.readouterr().err, *parts)

    assert cli.main([*predict, *official, "--image_size", "0", "--sigma", "-1", "--threshold", "7"]) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()  # one message per bad value
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert [flag in line for flag, line in zip(("--image_size", "--sigma", "--threshold"), lines)] == [True] * 3

    calibrate = ["calibrate", *official, *model_flags, "--output", str(tmp_path / "t.json")]
    folder = str(tmp_path)
    for extra, parts in [(["--normal", folder], ["--target_fpr"]),
                         (["--normal", folder, "--target_fpr", "0"], ["--target_fpr", "(0, 1)"]),
                         (["--normal", folder, "--target_fpr", "1.5"], ["--target_fpr", "(0, 1)"]),
                         (["--normal", folder, "--target_fpr", "0.1", "--image_criterion", "f1"], ["--image_criterion"]),
                         (["--labelled", folder], ["no 'good' folder"]),
                         (["--labelled", str(image)], ["a.png is a file", "pass the folder"]),
                         (["--normal", str(tmp_path / "none"), "--target_fpr", "0.1"], ["no such file or folder"]),
                         ([], ["--normal", "--labelled", "--dataset"]),
                         (["--dataset", "x", "--normal", folder, "--target_fpr", "0.1"], ["either --dataset"]),
                         (["--dataset", "missing", "--datasets_root_dir", folder], ["missing"])]:
        assert cli.main([*calibrate, *extra]) == cli.EXIT_USAGE, extra
        _one_error_line(capsys.readouterr().err, *parts)


def test_flags_may_repeat_the_checkpoint_settings_and_force_overrides_them(tmp_path, official_checkpoint, model_flags,
                                                                         monkeypatch, capsys):
    built = []

    def record(args, state, info):
        built.append((list(args.features_list), args.soft_mean, args.dino_model, info.official.run_name))
        raise KeyboardInterrupt  # stop there: Ctrl-C while the model loads

    monkeypatch.setattr(common, "load_detector", record)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    predict = ["predict", str(image), "--out", str(tmp_path / "out"), "--checkpoint", str(official_checkpoint),
               *model_flags]
    assert cli.main([*predict, "--features_list", "6", "12", "18", "24", "--soft_mean"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "interrupted" in line or "error" in line] == \
        ["predict: interrupted before any result was written; run the same command again"]
    assert "Traceback" not in err
    assert cli.main([*predict, "--soft_mean", "False", "--force"]) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "warning: --soft_mean False contradicts the official checkpoint" in err and "--force" in err
    assert built == [([6, 12, 18, 24], True, "none", "trained_on_mvtec_crane"),
                     ([6, 12, 18, 24], False, "none", "trained_on_mvtec_crane")]
    assert not (tmp_path / "out").exists()


def _only_detector(detectors):
    (detector,) = detectors.values()
    return detector


class _Loaded(Exception):
    """Raised instead of building the model: the run got past every check."""


def test_predict_refuses_thresholds_of_another_checkpoint_or_other_settings(tmp_path, official_checkpoint,
                                                                            model_flags, monkeypatch, capsys):
    from crane.cli.setup import flag_errors, settle_model
    from crane.inspection.thresholds import model_record

    def loaded(args, state, info):
        raise _Loaded

    monkeypatch.setattr(common, "load_detector", loaded)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    checkpoint = tmp_path / "ckpt" / "epoch_5.pth"
    checkpoint.parent.mkdir()
    shutil.copy(official_checkpoint, checkpoint)
    predict = ["predict", str(image), "--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint), *model_flags]
    args = cli.build_parser().parse_args(predict)
    assert flag_errors(args) == []
    record = model_record(args, settle_model(args)[1])
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["features_list"] == [6, 12, 18, 24] and record["weights"]["clip"].startswith("file of ")
    path = checkpoint.parent / "thresholds.json"

    def write(model):
        save_thresholds(Thresholds(0.5, 0.5, {} if model is None else {"model": model}), path)

    write(record)
    with pytest.raises(_Loaded):  # the same settings: accepted
        cli.main(predict)
    capsys.readouterr()
    assert cli.main([*predict, "--image_size", "84"]) == cli.EXIT_USAGE
    _one_error_line(capsys.readouterr().err, str(path), f"--image_size {SIZE}", "this run --image_size 84", "--force")
    write({**record, "checkpoint_sha256": "0" * 64})
    assert cli.main(predict) == cli.EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "checkpoint SHA-256 000000000000", record["checkpoint_sha256"][:12])
    write({**record, "weights": {"clip": "openai", "dino": None}, "clip_weights": "openai"})
    assert cli.main(predict) == cli.EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "--clip_weights openai")
    write(None)
    assert cli.main(predict) == cli.EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "records no model settings")
    with pytest.raises(_Loaded):  # --force: a warning
        cli.main([*predict, "--force"])
    assert "warning:" in capsys.readouterr().err
    with pytest.raises(_Loaded):  # both values overridden: the file's are not used
        cli.main([*predict, "--threshold", "0.4,0.6"])


def test_ctrl_c_while_predicting_keeps_scores_and_panels_in_step(mixed_folder, tmp_path, model_flags,
                                                                 official_checkpoint, detectors, monkeypatch, capsys):
    real = common.load_detector

    def interrupting(args, state, info):
        detector = real(args, state, info)
        calls = []
        original = type(detector).predict_tensor

        def predict_tensor(images, image_token_type=None, smooth=False):
            calls.append(len(images))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return original(detector, images, image_token_type, smooth)

        monkeypatch.setattr(detector, "predict_tensor", predict_tensor, raising=False)
        return detector

    monkeypatch.setattr(common, "load_detector", interrupting)
    out = tmp_path / "out"
    status = cli.main(["predict", str(mixed_folder), "--out", str(out), "--checkpoint", str(official_checkpoint),
                       *model_flags, "--threshold", "0.5"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_INTERRUPTED and "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        f"predict: interrupted; {out / 'scores.csv'} holds the 3 images scored so far (with their panels); run the "
        "same command again to score them all"]
    rows = _rows(out / "scores.csv")
    assert len(rows) == 3 and len(list((out / "panels").rglob("*.png"))) == 3


def _tiny_images(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_out_folder_holds_one_run(tmp_path, model_flags, official_checkpoint, detectors, capsys):
    from crane.inspection.outputs import MANIFEST

    _tiny_images(tmp_path / "a", ["x.png", "sub/y.png"])
    _tiny_images(tmp_path / "b", ["z.png"], seed=1)
    out = tmp_path / "out"
    base = ["--out", str(out), "--checkpoint", str(official_checkpoint), *model_flags, "--threshold", "0.5,0.5"]
    assert cli.main(["predict", str(tmp_path / "a"), *base, "--save_maps", "--save_masks"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        MANIFEST, "maps/sub/y.npy", "maps/x.npy", "masks/sub/y.png", "masks/x.png", "panels/sub/y.png",
        "panels/x.png", "scores.csv"]
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["predict", str(tmp_path / "b"), *base]) == 0
    assert "removed the 7 files of the earlier predict run" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        MANIFEST, "notes.txt", "panels", "panels/z.png", "scores.csv"]
    assert [Path(r["path"]).name for r in _rows(out / "scores.csv")] == ["z.png"]

    before = sorted(out.rglob("*"))
    (out / "panels" / "mine.png").write_bytes(b"")  # a file no run recorded
    assert cli.main(["predict", str(tmp_path / "a"), *base]) == cli.EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "panels/mine.png", "did not write")
    (out / "panels" / "mine.png").unlink()
    with open(out / "panels" / "z.png", "ab") as f:  # a recorded file changed since
        f.write(b"edited")
    assert cli.main(["predict", str(tmp_path / "a"), *base]) == cli.EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "panels/z.png", "changed since")
    assert sorted(out.rglob("*")) == before  # nothing deleted

    other = tmp_path / "other"
    other.mkdir()
    (other / "scores.csv").write_text("path,score\n")  # results without a record of the run that wrote them
    assert cli.main(["predict", str(tmp_path / "a"), *base, "--out", str(other)]) == cli.EXIT_USAGE
    _one_error_line(capsys.readouterr().err, "scores.csv", "unknown origin", MANIFEST)


def test_predict_turns_photos_as_their_exif_orientation_says(tmp_path, model_flags, official_checkpoint, detectors):
    from PIL import ImageOps

    from crane.data.image import load_rgb

    stored = (np.random.default_rng(3).random((40, 64, 3)) * 255).astype(np.uint8)
    photo = tmp_path / "photos" / "rotated.jpg"
    photo.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(photo, quality=95, exif=exif)
    out = tmp_path / "out"
    assert cli.main(["predict", str(photo), "--out", str(out), "--checkpoint", str(official_checkpoint), *model_flags,
                     "--threshold", "0.5,0.5", "--save_masks"]) == 0
    with Image.open(photo) as img:
        shown = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert shown.shape == (64, 40, 3)
    assert np.asarray(Image.open(out / "masks" / "rotated.jpg.png")).shape == (64, 40)  # a .jpg keeps its suffix
    expected = _only_detector(detectors).predict([shown]).scores[0]
    assert float(_rows(out / "scores.csv")[0]["score"]) == pytest.approx(float(expected), abs=1e-6)
    assert load_rgb(photo).shape == (40, 64, 3)  # datasets are read as stored, as published
    np.testing.assert_array_equal(load_rgb(photo, exif_orientation=True), shown)


def test_init_checkpoint_writes_a_loadable_random_checkpoint(tmp_path, synth_weights, capsys):
    from crane.models.prompts import load_prompt_checkpoint

    out = tmp_path / "random" / "epoch_0.pth"
    assert cli.main(["init-checkpoint", str(out), "--clip_weights",
                     str(synth_weights("clip", vision_width=256, seed=0))]) == 0
    state = load_prompt_checkpoint(out)
    assert len(state) == 16 and state["ctx_pos"].shape == (1, 1, 12, 768)
    assert "meaningless" in capsys.readouterr().out


# --------------------------------------------------------------- scripts/download_weights.sh

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_weights.sh"


def _download_weights(tmp_path: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    """Run the script with every cache folder inside ``tmp_path`` (nothing outside is read or written)."""
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_download_weights_help_and_bad_arguments(tmp_path):
    shown = _download_weights(tmp_path, "--help")
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "--manual" in shown.stdout
    for args in (["--bogus"], ["clip", "weights"], ["--clip-source", "ftp"], ["--crane-url"], ["--dry-run", "--verify"]):
        result = _download_weights(tmp_path, *args)
        assert result.returncode == 2 and "see --help" in result.stderr, args


def test_download_weights_dry_run_and_manual_name_every_destination(tmp_path):
    result = _download_weights(tmp_path, "--dry-run", "--checkpoints-dir", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    torch_dir = tmp_path / "torch" / "hub" / "checkpoints"
    for expected in (f"{torch_dir}/dinov2_vitb14_reg4_pretrain.pth", f"{torch_dir}/sam_vit_b_01ec64.pth",
                     "timm/vit_large_patch14_clip_336.openai", str(tmp_path / "hf" / "hub"),
                     "github.com/AlirezaSalehy/Crane/raw/main/checkpoints/trained_on_visa_cranep/epoch_3.pth",
                     f"{tmp_path}/ckpt/trained_on_visa_cranep/epoch_3.pth"):
        assert expected in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a dry run writes nothing
    manual = _download_weights(tmp_path, "--manual", "--checkpoints-dir", "ckpt")
    assert manual.returncode == 0
    assert "ckpt/trained_on_mvtec_crane/epoch_N.pth" in manual.stdout
    assert str(tmp_path / "home" / ".cache" / "clip" / "ViT-L-14-336px.pt") in manual.stdout


def test_download_weights_verify_checks_sha256(tmp_path, official_checkpoint):
    ckpt = tmp_path / "ckpt"
    for name in ("trained_on_mvtec_crane", "trained_on_visa_crane"):
        (ckpt / name).mkdir(parents=True)
    shutil.copy(official_checkpoint, ckpt / "trained_on_mvtec_crane" / "epoch_5.pth")
    (ckpt / "trained_on_visa_crane" / "epoch_5.pth").write_bytes(b"not a checkpoint")
    result = _download_weights(tmp_path, "--verify", "crane", "--checkpoints-dir", str(ckpt))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["ok", "crane"] and "trained_on_mvtec_crane/epoch_5.pth" in line
               and "SHA-256 verified" in line for line in lines)
    assert any(line.strip().startswith("BAD SUM") and "trained_on_visa_crane/epoch_5.pth" in line for line in lines)
    assert any(line.strip().startswith("MISSING") and "trained_on_visa_cranep/epoch_5.pth" in line for line in lines)


def test_the_repository_ships_the_20_official_checkpoints(tmp_path):
    """A clone holds every official checkpoint with its published sum, and --verify says so."""
    import hashlib

    root = SCRIPT.parents[1]
    sums = [line.split() for line in (root / "checkpoints" / "SHA256SUMS").read_text().splitlines() if line.strip()]
    assert len(sums) == 20 and len({rel for _, rel in sums}) == 20
    for want, rel in sums:
        assert hashlib.sha256((root / "checkpoints" / rel).read_bytes()).hexdigest() == want, rel
    shared = root.parent / "shared" / "official_checkpoints" / "SHA256SUMS"
    if shared.is_file():  # the sums we ship are the official repository's
        official = sorted((s, r.removeprefix("./")) for s, r in (line.split() for line in shared.read_text().splitlines()))
        assert sorted((s, r) for s, r in sums) == official
    result = _download_weights(tmp_path, "--verify", "crane")
    assert result.returncode == 0, result.stdout
    assert sum("SHA-256 verified" in line for line in result.stdout.splitlines()) == 20
