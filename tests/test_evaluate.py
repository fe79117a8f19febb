"""``test.py`` end to end on a small synthetic dataset with synthetic CLIP weights.

The dataset (images and masks from the conformance ``synth.py``) has three classes:
``mixed`` (normal images, anomalous images with masks, and one anomalous image
without a mask, which must be left out of the pixel metrics), ``allbad`` (every
image anomalous: image metrics undefined) and ``imgonly`` (no masks at all: pixel
metrics undefined).
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

import crane
from crane import metrics
from crane.data.image import load_mask
from crane.engine import evaluate
from tests.conftest import edit_image, REPO, interrupt_at_class_metrics, predicted_classes, record_predicted_batches

SIZE = 112
BATCH = 3
CHECKPOINT = "checkpoints/trained_on_mvtec_crane/epoch_5.pth"
METRIC_NAMES = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_aupro", "pixel_f1")


def _load_script():
    spec = importlib.util.spec_from_file_location("crane_test_script", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _load_script()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, synth) -> Path:
    """``ROOT/toy`` with meta.json: classes ``mixed`` (8 images), ``allbad`` (4), ``imgonly`` (4)."""
    root = tmp_path_factory.mktemp("datasets")
    folder = root / "toy"
    images, masks = synth.images_uint8(n=8, size=64, seed=1), synth.masks_uint8(n=8, size=64, seed=1)
    layout = {"mixed": (range(8), {1, 3, 5}), "allbad": ([1, 3, 5, 7], {1, 3, 5, 7}), "imgonly": (range(4), set())}
    meta = {"train": {}, "test": {}}
    for cls_name, (indices, with_mask) in layout.items():
        samples = []
        for i in indices:
            anomaly = int(i % 2 == 1)
            specie = "blob" if anomaly else "good"
            img_path = f"{cls_name}/test/{specie}/{i:03d}.png"
            (folder / img_path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / img_path)
            mask_path = ""
            if i in with_mask:
                mask_path = f"{cls_name}/ground_truth/{specie}/{i:03d}_mask.png"
                (folder / mask_path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(masks[i]).save(folder / mask_path)
            samples.append({"img_path": img_path, "mask_path": mask_path, "cls_name": cls_name,
                            "specie_name": specie, "anomaly": anomaly})
        meta["test"][cls_name] = samples
    (folder / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def clip_file(synth_weights) -> Path:
    return synth_weights("clip", vision_width=256, seed=0)


@pytest.fixture(scope="module")
def base_args(data_root, clip_file, conformance_dir) -> list[str]:
    return ["--dataset", "toy", "--datasets_root_dir", str(data_root), "--checkpoint", str(conformance_dir / CHECKPOINT),
            "--clip_weights", str(clip_file), "--dino_model", "none", "--features_list", "6", "12", "18", "24",
            "--soft_mean", "True", "--image_size", str(SIZE), "--device", "cpu", "--batch_size", str(BATCH),
            "--save_maps"]


@contextlib.contextmanager
def one_thread():
    """Compute on one CPU thread, like each process of the 2-process run: CPU matrix products
    round differently with different thread counts, and the files are compared byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(base_args, tmp_path_factory) -> Path:
    """A single-process in-process run, decoding in the main process (no loader workers)."""
    out = tmp_path_factory.mktemp("run") / "single"
    with one_thread():
        assert SCRIPT.main([*base_args, "--num_workers", "0", "--save_path", str(out)]) == 0
    return out


def _meta(data_root: Path) -> dict:
    return json.loads((data_root / "toy" / "meta.json").read_text())["test"]


def _predictions(out: Path) -> dict[str, dict]:
    with open(out / "predictions.csv", newline="") as f:
        return {row["img_path"]: row for row in csv.DictReader(f)}


def _map(out: Path, img_path: str) -> np.ndarray:
    return np.load(out / "maps" / f"{img_path}.npy")  # the image's extension kept: a.png and a.jpg differ


def _pixel_set(samples: list[dict]) -> list[dict]:
    return [s for s in samples if s["mask_path"] or s["anomaly"] == 0]


def _published_aupro(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The AUPRO the published test.py calls (``cal_pro_score_gpu``), in substance: the grid over the
    Python-float extremes, each threshold compared in the maps' dtype (``tensor > float`` in torch)."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = float(amaps.min()), float(amaps.max())
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, (max_th - min_th) / max_step):
        th = amaps.dtype.type(th)
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                pro.append(binary_amap[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        inverse_masks = 1 - masks
        fprs.append(np.logical_and(inverse_masks, binary_amaps).sum() / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < expect_fpr
    fprs = fprs[kept]
    return auc((fprs - fprs.min()) / (fprs.max() - fprs.min()), pros[kept])


def _published_f1(truth: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(truth.ravel(), scores.ravel())
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def test_flags_accept_the_original_boolean_style():
    parser = SCRIPT.build_parser()
    args = parser.parse_args(["--soft_mean", "True", "--visualize", "false", "--both_eattn_dattn", "0",
                              "--save_maps", "--features_list", "6", "12", "--devices", "0", "1"])
    assert (args.soft_mean, args.visualize, args.both_eattn_dattn, args.save_maps) == (True, False, False, True)
    assert args.features_list == [6, 12] and args.devices == [0, 1]
    with pytest.raises(SystemExit):
        parser.parse_args(["--soft_mean", "maybe"])


def test_scores_and_maps_equal_the_detector(reference, data_root, clip_file, conformance_dir):
    det = crane.Detector.from_config(clip_weights=clip_file, checkpoint=conformance_dir / CHECKPOINT,
                                     features_list=(6, 12, 18, 24), soft_mean=True, image_size=SIZE, batch_size=BATCH)
    rows = _predictions(reference)
    for cls_name, samples in _meta(data_root).items():
        expected = det.predict([data_root / "toy" / s["img_path"] for s in samples])
        maps = np.stack([_map(reference, s["img_path"]) for s in samples])
        assert maps.dtype == np.float32 and maps.shape == (len(samples), SIZE, SIZE)
        np.testing.assert_allclose(maps, expected.maps, rtol=0, atol=1e-6)
        scores = np.array([float(rows[s["img_path"]]["score"]) for s in samples], np.float32)
        np.testing.assert_allclose(scores, expected.scores, rtol=0, atol=1e-6)
        for s in samples:
            row = rows[s["img_path"]]
            assert (row["cls_name"], row["specie_name"], int(row["anomaly"])) == (cls_name, s["specie_name"], s["anomaly"])


def test_metrics_equal_published_definitions_on_the_saved_maps(reference, data_root):
    result = json.loads((reference / "metrics.json").read_text())
    for cls_name, samples in _meta(data_root).items():
        got = result["classes"][cls_name]
        assert set(got) == set(METRIC_NAMES)
        labels = np.array([s["anomaly"] for s in samples])
        scores = np.array([float(_predictions(reference)[s["img_path"]]["score"]) for s in samples], np.float32)
        if 0 < labels.sum() < len(labels):
            assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
            assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
            assert got["image_f1"] == pytest.approx(_published_f1(labels, scores), abs=1e-6)
        pixel = _pixel_set(samples)
        if any(s["mask_path"] for s in samples):
            masks = np.stack([load_mask(data_root / "toy" / s["mask_path"] if s["mask_path"] else None, SIZE).numpy()
                              for s in pixel]).astype(np.uint8)
            maps = np.stack([_map(reference, s["img_path"]) for s in pixel])
            assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
            assert got["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, maps), abs=1e-6)
            assert got["pixel_f1"] == pytest.approx(_published_f1(masks, maps), abs=1e-6)
            assert got["pixel_aupro"] == pytest.approx(_published_aupro(masks, maps), abs=1e-6)
            assert got["pixel_aupro"] == pytest.approx(metrics.aupro(masks, maps, method="crane"), abs=1e-6)


def test_undefined_metrics_are_null_and_left_out_of_the_mean(reference, data_root):
    result = json.loads((reference / "metrics.json").read_text())
    classes = result["classes"]
    assert all(classes["allbad"][m] is None for m in METRIC_NAMES[:3])
    assert all(classes["allbad"][m] is not None for m in METRIC_NAMES[3:])
    assert all(classes["imgonly"][m] is None for m in METRIC_NAMES[3:])
    assert all(classes["imgonly"][m] is not None for m in METRIC_NAMES[:3])
    assert all(classes["mixed"][m] is not None for m in METRIC_NAMES)
    for m in METRIC_NAMES:
        assert result["mean"][m] == pytest.approx(np.mean([v[m] for v in classes.values() if v[m] is not None]))
    # the anomalous image of `mixed` without a mask is left out of the pixel metrics
    samples = _meta(data_root)["mixed"]
    everything = np.stack([_map(reference, s["img_path"]) for s in samples])
    zeros = np.stack([load_mask(data_root / "toy" / s["mask_path"] if s["mask_path"] else None, SIZE).numpy()
                      for s in samples])
    assert classes["mixed"]["pixel_auroc"] != pytest.approx(metrics.pixel_auroc(zeros, everything), abs=1e-6)
    assert result["args"]["dataset"] == "toy" and result["args"]["soft_mean"] is True
    table = (reference / "metrics.md").read_text()
    assert all(name in table for name in ("allbad", "imgonly", "mixed", "mean"))


def test_two_gloo_processes_write_the_same_files(reference, base_args, tmp_path):
    """Two processes, each with a loader worker, against one process decoding in the main process
    (tests/test_pipeline_speed.py compares 0 and 1 workers alone)."""
    out = tmp_path / "two"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "test.py"), *base_args, "--devices", "0", "1",
                           "--num_workers", "1", "--save_path", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mean" in proc.stdout
    for name in ("metrics.json", "predictions.csv", "metrics.md"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    ours = sorted(p.relative_to(out) for p in (out / "maps").rglob("*.npy"))
    assert ours == sorted(p.relative_to(reference) for p in (reference / "maps").rglob("*.npy")) and len(ours) == 16
    for rel in ours:
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel


def test_interrupted_run_resumes_without_recomputing_finished_classes(reference, base_args, data_root, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "resumed"
    args = [*base_args, "--save_path", str(out)]
    real_metrics = evaluate.class_metrics
    interrupt_at_class_metrics(monkeypatch, 2)
    with one_thread():
        assert SCRIPT.main(args) == 130  # Ctrl-C: one line, exit 130
    assert [p.name for p in (out / "classes").iterdir()] == ["mixed.json"]  # classes run in meta.json order
    assert not (out / "metrics.json").exists()
    assert not list((out / "classes").glob(".*"))  # no temporary leftovers

    monkeypatch.setattr(evaluate, "class_metrics", real_metrics)
    predicted = record_predicted_batches(monkeypatch)
    with one_thread():
        assert SCRIPT.main(args) == 0
    assert predicted_classes(predicted) == ["allbad", "imgonly"]
    for name in ("metrics.json", "predictions.csv"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name

    predicted.clear()
    assert SCRIPT.main(args) == 0  # everything finished: nothing recomputed
    assert predicted == []

    predicted.clear()
    assert SCRIPT.main([*args, "--aupro_method", "mvtec", "--visualize", "True"]) == 0  # other settings: recomputed
    assert predicted_classes(predicted) == ["mixed", "allbad", "imgonly"]
    result = json.loads((out / "metrics.json").read_text())
    assert result["args"]["aupro_method"] == "mvtec"
    root = data_root / "toy"
    pixel = _pixel_set(_meta(data_root)["mixed"])
    masks = np.stack([load_mask(root / s["mask_path"] if s["mask_path"] else None, SIZE).numpy() for s in pixel])
    maps = np.stack([_map(out, s["img_path"]) for s in pixel])
    assert result["classes"]["mixed"]["pixel_aupro"] == pytest.approx(
        metrics.aupro(masks, maps, method="mvtec", num_thresholds=None), abs=1e-6)
    for cls_name, class_samples in _meta(root.parent).items():  # --visualize: one panel per image
        panels = sorted(p.name for p in (out / "visualization" / cls_name).glob("*.png"))
        assert all(Path(s["img_path"]).suffix == ".png" for s in class_samples)
        assert panels == sorted(f"{s['specie_name']}_{Path(s['img_path']).stem}.png" for s in class_samples)
        with Image.open(out / "visualization" / cls_name / panels[0]) as img:
            assert img.mode == "RGB" and img.width > img.height


def test_a_log_file_gets_plain_lines_and_no_bars_from_threads(base_args, tmp_path, capsys):
    """stderr not a terminal (a log file): no carriage returns or bars; one line per class from the process's
    one progress display, nothing from the background metrics and panels; the table whole on stdout."""
    out = tmp_path / "logged"
    with one_thread():
        assert SCRIPT.main([*base_args, "--save_path", str(out), "--k_shot", "2", "--visualize", "True",
                            "--num_workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\x1b" not in captured.err
    lines = captured.err.splitlines()
    per_class = [line for line in lines if re.match(r"^\w+ \[\d/3\]: \d+ img in [\d.]+ s", line)]
    assert [line.split(" ")[0] for line in per_class] == ["mixed", "allbad", "imgonly"]
    assert not any(line.startswith(("metrics", "panels")) or "metric/s" in line for line in lines)
    table = [line for line in captured.out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 + 1 and all(line.endswith("|") for line in table)  # header, rule, classes, mean


def test_missing_inputs_fail_early_with_one_line(base_args, tmp_path, capsys):
    args = [*base_args, "--save_path", str(tmp_path / "x")]
    assert SCRIPT.main([*args[:args.index("--checkpoint")], "--checkpoint", str(tmp_path / "none.pth"),
                        *args[args.index("--checkpoint") + 2:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint not found" in err and "none.pth" in err
    assert SCRIPT.main([*args, "--dataset", "absent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent" in err
    assert not (tmp_path / "x").exists()


def _load_make_table():
    spec = importlib.util.spec_from_file_location("crane_make_table", REPO / "scripts" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tables_never_print_negative_zero():
    from crane.engine import results
    assert results.fixed(-0.0, 4) == "0.0000" and results.fixed(-1e-9, 4) == "0.0000"
    assert results.fixed(-0.5, 4) == "-0.5000" and results.percent(-2e-5) == "0.0" and results.percent(None) == "-"
    table = results.metrics_table({"a": {"pixel_aupro": -3e-6, "image_auroc": 0.5}}, {"pixel_aupro": -3e-6})
    assert "-0.0" not in table and "50.0" in table and " - |" in table


def test_make_table_collects_metrics_into_the_table1_layout(tmp_path, capsys):
    make_table = _load_make_table()
    means = {"mvtec": dict(zip(METRIC_NAMES, (0.9, 0.8, 0.7, 0.6, 0.5, 0.4))),
             "visa": dict(zip(METRIC_NAMES, (0.5, 0.6, 0.7, 0.8, None, 1.0))),
             "isic": dict(zip(METRIC_NAMES, (None, None, None, 0.3, 0.2, 0.1)))}
    for method in ("crane", "cranep"):
        for ds, mean in means.items():
            folder = tmp_path / method / ds
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps({"classes": {}, "mean": mean,
                                                             "args": {"aupro_method": "crane"}}))
    assert make_table.main([str(tmp_path), "--paper"]) == 0
    text = (tmp_path / "table1.md").read_text()
    assert text in capsys.readouterr().out
    assert "| MVTec AD" in text and "90.0 (93.8)" in text and "40.0 (43.8)" in text
    with open(tmp_path / "table1.csv", newline="") as f:
        rows = {row["dataset"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["MVTec AD", "VisA", "Industrial average", "ISIC", "Medical average"]
    industrial = rows["Industrial average"]
    assert float(industrial["crane_image_auroc"]) == pytest.approx(70.0)
    assert float(industrial["cranep_pixel_aupro"]) == pytest.approx(50.0)  # VisA undefined: left out
    assert industrial["paper_crane_image_auroc"] == f"{(93.8 + 85.3) / 2:.1f}"
    assert rows["ISIC"]["crane_image_auroc"] == "" and float(rows["ISIC"]["crane_pixel_f1"]) == pytest.approx(10.0)
    assert make_table.main([str(tmp_path / "empty")]) == 2


def _without(args: list[str], *flags: str) -> list[str]:
    """``args`` without the given flags and their values."""
    out, skip = [], False
    for token in args:
        if token.startswith("--"):
            skip = token in flags
        if not skip:
            out.append(token)
    return out


MODEL_FLAGS = ("--dino_model", "--features_list", "--soft_mean")


def test_the_checkpoint_decides_the_model_unless_a_flag_does(base_args, reference, tmp_path, capsys):
    """An official Crane checkpoint with no model flags runs as Crane (same files as with the flags);
    a contradicting flag stops with one line naming both, before any model work, unless --force."""
    out = tmp_path / "defaults"
    with one_thread():
        assert SCRIPT.main([*_without(base_args, *MODEL_FLAGS), "--save_path", str(out)]) == 0
    args = json.loads((out / "metrics.json").read_text())["args"]
    assert (args["dino_model"], args["features_list"], args["soft_mean"]) == ("none", [6, 12, 18, 24], True)
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    capsys.readouterr()
    bad = [*_without(base_args, "--dino_model"), "--dino_model", "dinov2", "--save_path", str(tmp_path / "bad")]
    assert SCRIPT.main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dino_model dinov2" in err and "--dino_model none" in err and "--force" in err
    assert not (tmp_path / "bad").exists()
    forced = [*_without(base_args, "--features_list"), "--features_list", "24", "--force", "--save_path",
              str(tmp_path / "forced")]
    with one_thread():
        assert SCRIPT.main(forced) == 0
    assert json.loads((tmp_path / "forced" / "metrics.json").read_text())["args"]["features_list"] == [24]


def test_resume_keys_on_content_not_names(base_args, data_root, tmp_path, monkeypatch, conformance_dir):
    """A checkpoint retrained into the same path, or an image replaced, gives fresh numbers."""
    ckpt = tmp_path / "trained_on_toy_mine" / "epoch_5.pth"
    ckpt.parent.mkdir()
    state = torch.load(conformance_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    state["prompt_learner"]["ctx_pos"] = state["prompt_learner"]["ctx_pos"] + 0.01  # our own (not an official) file
    torch.save(state, ckpt)
    args = [*_without(base_args, "--checkpoint", "--save_maps"), "--checkpoint", str(ckpt)]
    predicted = record_predicted_batches(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with one_thread():
        assert SCRIPT.main(args) == 0
    out = tmp_path / "results" / "trained_on_toy_mine" / "test_on_toy"  # the checkpoint's run name
    first = json.loads((out / "metrics.json").read_text())
    assert first["run"]["run_name"] == "trained_on_toy_mine" and len(predicted_classes(predicted)) == 3
    assert oct((out / "metrics.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    state["prompt_learner"]["ctx_neg"] = state["prompt_learner"]["ctx_neg"] + 0.05  # "retrained" into the same file
    torch.save(state, ckpt)
    predicted.clear()
    with one_thread():
        assert SCRIPT.main(args) == 0
    assert predicted_classes(predicted) == ["mixed", "allbad", "imgonly"]
    second = json.loads((out / "metrics.json").read_text())
    assert second["classes"]["mixed"]["image_auroc"] is not None
    assert second["args"]["checkpoint_sha256"] != first["args"]["checkpoint_sha256"]

    image = data_root / "toy" / _meta(data_root)["imgonly"][0]["img_path"]
    edit_image(image)  # the image changed (its content; a touch alone changes nothing)
    predicted.clear()
    with one_thread():
        assert SCRIPT.main(args) == 0
    assert predicted_classes(predicted) == ["imgonly"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_file_that_is_not_a_checkpoint_is_one_line(base_args, tmp_path, capsys):
    for content in (b"hello", b"PK\x03\x04 truncated zip"):
        bogus = tmp_path / "bogus.pth"
        bogus.write_bytes(content)
        assert SCRIPT.main([*_without(base_args, "--checkpoint"), "--checkpoint", str(bogus),
                            "--save_path", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not a Crane checkpoint" in err and "weights_only" not in err
        assert "Traceback" not in err


def test_metrics_as_published(base_args, reference, data_root, tmp_path):
    """--metrics_as_published: pixel metrics over every image (the anomalous image without a mask counts as
    all-normal pixels) and undefined metrics reported as 0, averaged like the others."""
    out = tmp_path / "published"
    with one_thread():
        assert SCRIPT.main([*base_args, "--save_path", str(out), "--metrics_as_published"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert all(result["classes"]["allbad"][m] == 0.0 for m in METRIC_NAMES[:3])
    assert all(result["classes"]["imgonly"][m] == 0.0 for m in METRIC_NAMES[3:])
    for m in METRIC_NAMES:
        assert result["mean"][m] == pytest.approx(np.mean([result["classes"][c][m] for c in result["classes"]]))
    root = data_root / "toy"
    samples = _meta(data_root)["mixed"]
    masks = np.stack([load_mask(root / s["mask_path"] if s["mask_path"] else None, SIZE).numpy() for s in samples])
    maps = np.stack([_map(reference, s["img_path"]) for s in samples])
    assert result["classes"]["mixed"]["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, maps), abs=1e-9)
    ours = json.loads((reference / "metrics.json").read_text())["classes"]["mixed"]
    assert ours["pixel_auroc"] != pytest.approx(result["classes"]["mixed"]["pixel_auroc"], abs=1e-6)


def test_bad_values_are_one_line_each_before_the_model(base_args, tmp_path, capsys):
    out = ["--save_path", str(tmp_path / "x")]
    for extra, words in ((["--features_list", "6", "30", "--force"], ["--features_list 30", "blocks 1 to 24"]),
                         (["--sigma", "-1"], ["--sigma"]), (["--device", "tpu"], ["--device"]),
                         (["--image_size", "0"], ["--image_size"])):
        flags = {e for e in extra if e.startswith("--")} - {"--force"}
        assert SCRIPT.main([*_without(base_args, *flags), *extra, *out]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(w in err for w in words), (extra, err)
    assert not (tmp_path / "x").exists()
