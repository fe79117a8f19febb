"""``python -m crane predict / calibrate / init-checkpoint`` and the threshold picking behind them.

The model runs with synthetic CLIP weights (narrow vision tower) and an official
prompt-learner checkpoint at a small image size; the detector built from the flags
is cached per checkpoint content and options, so each configuration loads once.
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

from crane import cli
from crane.thresholds import (Thresholds, load_thresholds, max_f1_threshold, parse_override, save_thresholds,
                              youden_threshold)
from crane.visualize import PREDICTED, panel_layout

SIZE = 56


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
    found = cli.collect_inputs([str(root)], exclude=out)
    assert [f.name for f in found] == ["a", "b", "sub/c.Tif", "sub/c.png", "sub/deeper/d"]
    assert found[0].path == root / "a.PNG"
    globbed = cli.collect_inputs([str(root / "**" / "*.bmp"), str(root / "notes.txt"), str(root / "a.PNG")])
    assert [f.path for f in globbed] == [root / "sub/deeper/d.bmp", root / "notes.txt", root / "a.PNG"]
    assert [f.name for f in globbed] == ["sub/deeper/d", "notes", "a"]
    assert [f.name for f in cli.collect_inputs([str(root / "a.PNG"), str(root)])][:2] == ["a", "b"]
    with pytest.raises(cli.CliError, match="no such file"):
        cli.collect_inputs([str(root / "missing.png")])
    with pytest.raises(cli.CliError, match="no file matches"):
        cli.collect_inputs([str(root / "*.gif")])


# ------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def model_flags(conformance_dir, synth_weights):
    return ["--clip_weights", str(synth_weights("clip", vision_width=256, seed=0)), "--image_size", str(SIZE),
            "--dino_model", "none", "--device", "cpu", "--batch_size", "3"]


@pytest.fixture(scope="module")
def official_checkpoint(conformance_dir) -> Path:
    return conformance_dir / "checkpoints" / "trained_on_mvtec_crane" / "epoch_5.pth"


@pytest.fixture(scope="module")
def detectors():
    """Cache ``cli.build_detector`` by checkpoint content and model options (the first build is the real one)."""
    cache: dict[str, object] = {}
    real = cli.build_detector

    def cached(args):
        digest = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
        key = repr((digest, sorted(cli.model_options(args).items()), args.device, args.precision))
        if key not in cache:
            cache[key] = real(args)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "build_detector", cached)
        yield cache


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
    return Path(relative).with_suffix("").as_posix()


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

    (detector,) = detectors.values()
    assert detector.config.image_size == SIZE and detector.config.features_list == (24,)
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


def test_predict_argument_errors_fail_before_loading_the_model(tmp_path, official_checkpoint, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    base = ["--out", str(tmp_path / "out"), "--checkpoint", str(official_checkpoint), "--clip_weights", "/nonexistent"]
    cases = [
        (["predict", str(tmp_path / "missing.png"), *base], "no such file or folder"),
        (["predict", str(image), *base, "--save_masks"], "--save_masks needs a pixel threshold"),
        (["predict", str(image), *base, "--threshold", "x"], "--threshold expects numbers"),
        (["predict", str(image), *base, "--thresholds", str(tmp_path / "none.json")], "thresholds file not found"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


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
