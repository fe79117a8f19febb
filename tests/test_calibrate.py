"""``python -m crane calibrate`` from normal images (false-alarm statistics) and from plain folders.

The statistics are checked empirically on synthetic normal-score distributions (no model):
the false-alarm rate observed on held-out normal images must fall within the interval
calibrate states. The command line runs end to end with synthetic CLIP weights on small
folders (fixtures in ``conftest.py``).
"""
from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from crane.cli import dispatch as cli
from crane.inspection.calibration import (CalibrationScores, TopValues, false_alarm_threshold, images_needed, pick_false_alarm,
                               pick_labelled)
from crane.data.folders import FolderSample, InputError, folder_samples
from tests.conftest import CLI_IMAGE_SIZE as SIZE

DISTRIBUTIONS = {
    "normal": lambda rng, size: rng.normal(0.3, 0.05, size),
    "exponential": lambda rng, size: rng.exponential(0.1, size),
    "beta": lambda rng, size: rng.beta(2.0, 5.0, size),
    "lognormal": lambda rng, size: rng.lognormal(-2.0, 0.6, size),
}


def _k(target: float, n: int) -> int:
    """The number of calibration images the threshold may flag: the largest k with k / (n + 1) <= target."""
    return math.floor(Fraction(str(target)) * (n + 1))


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("target", [0.01, 0.05, 0.1, 0.29, 0.5])
def test_threshold_flags_the_most_images_whose_expected_rate_is_within_the_target(target):
    rng = np.random.default_rng(0)
    for n in list(range(1, 60)) + [99, 100, 101, 250, 1000]:
        scores = rng.random(n)
        fa = false_alarm_threshold(scores, target)
        k = _k(target, n)
        assert fa.reached == (k >= 1) and fa.n == n
        flagged = max(k, 1)  # too few images: the highest score
        assert fa.flagged == flagged == int((scores >= fa.threshold).sum())
        assert fa.threshold == np.sort(scores)[::-1][flagged - 1]
        assert fa.expected == pytest.approx(flagged / (n + 1))
        if fa.reached:
            assert fa.expected <= target < (flagged + 1) / (n + 1)
        assert fa.interval == pytest.approx(tuple(stats.beta.ppf([0.025, 0.975], flagged, n + 1 - flagged)))
    needed = images_needed(target)
    assert not false_alarm_threshold(rng.random(needed - 1), target).reached if needed > 1 else True
    assert false_alarm_threshold(rng.random(needed), target).reached


def test_too_few_images_for_the_target_are_reported():
    fa = false_alarm_threshold(np.linspace(0, 1, 50), 0.01)
    assert not fa.reached and fa.flagged == 1 and fa.threshold == 1.0
    assert fa.expected == pytest.approx(1 / 51) and images_needed(0.01) == 99
    picked = pick_false_alarm(_scores_of(np.linspace(0, 1, 50)), 0.01)
    assert any(note.startswith("warning: 50 normal images cannot") and "at least 99" in note for note in picked.notes)
    assert picked.record["image"]["target_reached"] is False and picked.record["image"]["images_needed"] == 99


def test_tied_scores_never_flag_more_than_allowed():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(5, 200))
        scores = np.round(rng.random(n), int(rng.integers(1, 3)))  # many ties
        target = float(rng.choice([0.02, 0.05, 0.1, 0.3]))
        fa = false_alarm_threshold(scores, target)
        allowed = max(_k(target, n), 1)
        assert fa.flagged == int((scores >= fa.threshold).sum()) <= allowed
        lower = scores[scores < fa.threshold]  # the next lower candidate would flag too many
        if lower.size:
            assert int((scores >= lower.max()).sum()) > allowed


def _scores_of(normal: np.ndarray, maps: np.ndarray | None = None, target: float = 0.01) -> CalibrationScores:
    """Normal images' scores (and ``N x 4 x 4`` maps) as a run at ``target`` collects them."""
    data = CalibrationScores.for_run(target, len(normal), 4)
    maps = np.zeros((len(normal), 4, 4), np.float32) if maps is None else maps
    data.add(normal, np.zeros(len(normal), bool), maps, np.zeros(maps.shape, bool), np.zeros(len(normal), bool))
    return data


def test_observed_false_alarm_rate_on_held_out_normal_images_is_within_the_stated_interval():
    """For many synthetic calibration sets, the rate on 50000 held-out normal images (from the same
    distribution) falls within the stated 95% interval about 95% of the time, its mean is the stated
    expectation, and the false alarms among n new images fall within the stated range."""
    rng = np.random.default_rng(2024)
    inside, ratios, counts_inside, trials = 0, [], 0, 0
    for name, draw in DISTRIBUTIONS.items():
        for n in (100, 250, 1000):
            for target in (0.01, 0.05, 0.1):
                for _ in range(8):
                    fa = false_alarm_threshold(draw(rng, n), target)
                    held_out = draw(rng, 50_000)
                    observed = float(np.mean(held_out >= fa.threshold))
                    inside += fa.interval[0] <= observed <= fa.interval[1]
                    ratios.append(observed / fa.expected)
                    low, high = fa.false_alarms_range(n)
                    counts_inside += low <= int(np.sum(draw(rng, n) >= fa.threshold)) <= high
                    trials += 1
    assert trials == 288
    assert 0.91 <= inside / trials <= 0.99
    assert 0.9 <= float(np.mean(ratios)) <= 1.1
    assert counts_inside / trials >= 0.92


def test_pixel_threshold_from_the_largest_values_equals_the_full_sort():
    rng = np.random.default_rng(5)
    for trial in range(30):
        chunks = [np.round(rng.random(int(rng.integers(50, 3000))), int(rng.integers(2, 5))).astype(np.float32)
                  for _ in range(int(rng.integers(1, 6)))]
        values = np.concatenate(chunks)
        rate = float(rng.choice([0.001, 0.01, 0.05, 0.2]))
        top = TopValues(math.floor(rate * values.size) + 1)
        for chunk in chunks:
            top.add(chunk)
        threshold, flagged = top.threshold_at_rate(rate)
        allowed = math.floor(rate * values.size + 1e-9)
        assert flagged == int((values >= threshold).sum()) <= allowed
        candidates = np.unique(values)
        best = min((c for c in candidates if (values >= c).sum() <= allowed), default=None)
        assert threshold == (best if best is not None else np.nextafter(values.max(), np.inf))


def test_degenerate_thresholds_are_warned_about():
    data = CalibrationScores()
    labels = np.array([False, False, True, True])
    maps = np.full((4, 4, 4), 0.5, np.float32)
    masks = np.zeros((4, 4, 4), bool)
    masks[2:, :2] = True
    data.add(np.full(4, 0.3), labels, maps, masks, labels)
    notes = pick_labelled(data, "f1").notes
    assert any("image threshold flags every one of the 4 calibration images" in n for n in notes)
    assert any("pixel threshold flags every one of the 64 calibration pixels" in n for n in notes)
    notes = pick_false_alarm(_scores_of(np.full(20, 0.3), np.full((20, 4, 4), 0.5, np.float32), 0.1), 0.1).notes
    assert any("image threshold flags none of the 20 normal images" in n for n in notes)
    assert any("pixel threshold flags none of the 320 normal pixels" in n for n in notes)
    maps = np.random.default_rng(0).random((30, 4, 4)).astype(np.float32)
    assert not [n for n in pick_false_alarm(_scores_of(np.linspace(0, 1, 30), maps, 0.1), 0.1).notes
                if n.startswith("warning")]


# ------------------------------------------------------------------------------ folders


def _touch(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / name)


def test_plain_folders_are_labelled_by_their_folders(tmp_path):
    root = tmp_path / "parts"
    _touch(root, ["good/a.png", "good/b.jpg", "crack/c.png", "crack/d.png", "hole/c.png", "masks/d_mask.png",
                  "masks/crack/c_mask.png", "masks/hole/c_mask.png", "ground_truth/x/e_mask.png"])
    found = {(s.path.relative_to(root).as_posix(), s.anomaly, s.defect,
              s.mask.relative_to(root).as_posix() if s.mask else None) for s in folder_samples(root, labelled=True)}
    assert found == {("good/a.png", 0, "good", None), ("good/b.jpg", 0, "good", None),
                     ("crack/c.png", 1, "crack", "masks/crack/c_mask.png"), ("crack/d.png", 1, "crack",
                                                                              "masks/d_mask.png"),
                     ("hole/c.png", 1, "hole", "masks/hole/c_mask.png")}
    normal = [s for s in folder_samples(root) if not s.anomaly]
    assert sorted(s.path.name for s in normal) == ["a.png", "b.jpg"]
    flat = tmp_path / "photos"  # just images: all normal
    _touch(flat, ["1.png", "sub/2.png", "3_mask.png"])
    assert sorted(s.path.name for s in folder_samples(flat)) == ["1.png", "2.png"]
    assert all(isinstance(s, FolderSample) and s.anomaly == 0 for s in folder_samples(flat))
    with pytest.raises(InputError, match="no 'good' folder"):
        folder_samples(flat, labelled=True)
    _touch(root, ["loose.png"])
    with pytest.raises(InputError, match="outside any folder"):
        folder_samples(root, labelled=True)
    (root / "loose.png").unlink()
    _touch(root, ["masks/c_mask.png"])  # crack/c.png and hole/c.png keep the masks of their defect folders
    assert {s.mask for s in folder_samples(root, labelled=True) if s.path.stem == "c"} == {
        root / "masks/crack/c_mask.png", root / "masks/hole/c_mask.png"}
    _touch(root, ["masks/other/d_mask.png"])
    with pytest.raises(InputError, match="several masks"):
        folder_samples(root, labelled=True)
    (root / "masks/other/d_mask.png").unlink()
    _touch(root, ["scratch/d.png"])  # crack/d.png and scratch/d.png would share masks/d_mask.png
    with pytest.raises(InputError, match="matches both"):
        folder_samples(root, labelled=True)
    with pytest.raises(InputError, match="no images"):
        folder_samples(tmp_path / "parts" / "masks")


def test_a_file_is_one_normal_image_and_cannot_be_labelled(tmp_path):
    _touch(tmp_path, ["good/a.png"])
    image = tmp_path / "good" / "a.png"
    assert folder_samples(image) == [FolderSample(image, 0, "good")]
    with pytest.raises(InputError, match=r"a\.png is a file, .* pass the folder .*good"):
        folder_samples(image, labelled=True)
    with pytest.raises(InputError, match="no such file or folder"):
        folder_samples(tmp_path / "missing.png")


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A synthetic dataset (custom layout and meta.json): 14 normal and 4 defect images with masks."""
    from datasets.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("parts") / "demo"
    make_synthetic_dataset(root, classes=1, train=0, test_normal=14, test_anomalous=4, size=64)
    return root


def _checkpoint(tmp_path: Path, official_checkpoint: Path) -> Path:
    checkpoint = tmp_path / "ckpt" / "epoch_5.pth"
    checkpoint.parent.mkdir()
    shutil.copy(official_checkpoint, checkpoint)
    return checkpoint


def test_calibrate_on_normal_images_then_predict(parts, tmp_path, model_flags, official_checkpoint, detectors,
                                                  capsys):
    checkpoint = _checkpoint(tmp_path, official_checkpoint)
    (cls,) = [p for p in (parts / "test").iterdir() if p.is_dir()]
    good = sorted((cls / "good").iterdir())
    calibration, held_out = tmp_path / "normal", tmp_path / "new"
    for i, path in enumerate(good):  # 10 to calibrate on, 4 held out
        target = (calibration if i < 10 else held_out) / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
    status = cli.main(["calibrate", "--normal", str(calibration), "--target_fpr", "0.2", "--checkpoint",
                       str(checkpoint), *model_flags])
    out, err = capsys.readouterr()
    assert status == 0, err
    saved = json.loads((checkpoint.parent / "thresholds.json").read_text())
    assert saved["image_criterion"] == saved["pixel_criterion"] == "target_fpr"
    image = saved["calibration"]["image"]
    assert image["normal_images"] == 10 and image["flagged"] == 2 == _k(0.2, 10)
    assert image["expected_fpr"] == pytest.approx(2 / 11) and image["target_reached"] is True
    assert image["expected_fpr_interval"] == pytest.approx(list(stats.beta.ppf([0.025, 0.975], 2, 9)))
    assert "expected false-alarm rate on new normal images: 18.2%" in out
    assert saved["model"]["checkpoint_sha256"] and saved["model"]["features_list"] == [6, 12, 18, 24]

    detector = next(iter(detectors.values()))
    result = detector.predict(sorted(calibration.iterdir()))
    assert saved["image_threshold"] == pytest.approx(float(np.sort(result.scores)[::-1][1]), abs=1e-6)
    values = np.sort(result.maps.ravel())[::-1]
    allowed = math.floor(0.2 * values.size)
    assert saved["calibration"]["pixel"]["pixels"] == values.size == 10 * SIZE * SIZE
    assert saved["pixel_threshold"] == pytest.approx(float(values[allowed - 1]), abs=1e-6)
    assert saved["calibration"]["pixel"]["flagged"] <= allowed

    predicted = tmp_path / "predicted"
    assert cli.main(["predict", str(held_out), "--out", str(predicted), "--checkpoint", str(checkpoint),
                     *model_flags]) == 0
    rows = (predicted / "scores.csv").read_text().splitlines()[1:]
    assert len(rows) == 4
    # the same images named one by one: the same thresholds
    assert cli.main(["calibrate", "--normal", *map(str, sorted(calibration.iterdir())), "--target_fpr", "0.2",
                     "--checkpoint", str(checkpoint), "--output", str(tmp_path / "files.json"), *model_flags]) == 0
    capsys.readouterr()
    from_files = json.loads((tmp_path / "files.json").read_text())
    assert (from_files["image_threshold"], from_files["pixel_threshold"]) == \
        (saved["image_threshold"], saved["pixel_threshold"])
    for row in rows:
        _, score, decision = row.rsplit(",", 2)
        assert decision == ("anomalous" if float(score) >= saved["image_threshold"] else "normal")

    # a whole class folder: its good/ images are the normal ones; an unreadable one is skipped (exit 3)
    whole = tmp_path / "class"
    shutil.copytree(cls, whole)
    data = (whole / "good" / good[0].name).read_bytes()
    (whole / "good" / "broken.png").write_bytes(data[:len(data) // 3])
    assert cli.main(["calibrate", "--normal", str(whole), "--target_fpr", "0.2", "--checkpoint", str(checkpoint),
                     "--output", str(tmp_path / "class.json"), *model_flags]) == cli.EXIT_SKIPPED
    out, err = capsys.readouterr()
    assert "using the 15 images under its good/ folders, not the 4 in other folders" in err
    assert "skipped 1 unreadable file" in err
    saved = json.loads((tmp_path / "class.json").read_text())
    assert saved["calibration"]["image"]["normal_images"] == 14
    assert [Path(p).name for p, _ in saved["calibration"]["skipped"]] == ["broken.png"]


def test_labelled_folder_gives_the_thresholds_of_its_meta_json(parts, tmp_path, model_flags, official_checkpoint,
                                                              detectors, capsys):
    checkpoint = _checkpoint(tmp_path, official_checkpoint)
    common = ["--checkpoint", str(checkpoint), *model_flags]
    assert cli.main(["calibrate", "--dataset", parts.name, "--datasets_root_dir", str(parts.parent),
                     "--output", str(tmp_path / "meta.json"), *common]) == 0
    assert cli.main(["calibrate", "--labelled", str(parts / "test"), "--output", str(tmp_path / "folder.json"),
                     *common]) == 0
    from_meta = json.loads((tmp_path / "meta.json").read_text())
    from_folder = json.loads((tmp_path / "folder.json").read_text())
    assert from_folder["calibration"]["pixel_images"] == from_meta["calibration"]["pixel_images"] == 18
    for key in ("image_threshold", "pixel_threshold"):
        assert from_folder[key] == pytest.approx(from_meta[key], abs=1e-6)
    for key in ("images", "anomalous", "image_f1", "pixel_f1"):
        assert from_folder["calibration"][key] == pytest.approx(from_meta["calibration"][key], abs=1e-9)
    assert from_folder["model"] == from_meta["model"] | {"checkpoint": str(checkpoint)}

    for source, name in ((["--dataset", parts.name, "--datasets_root_dir", str(parts.parent)], "meta_fpr.json"),
                         (["--labelled", str(parts / "test")], "folder_fpr.json")):
        assert cli.main(["calibrate", *source, "--target_fpr", "0.2", "--output", str(tmp_path / name), *common]) == 0
    from_meta = json.loads((tmp_path / "meta_fpr.json").read_text())
    from_folder = json.loads((tmp_path / "folder_fpr.json").read_text())
    assert from_meta["calibration"]["image"]["normal_images"] == 14 and from_meta["calibration"]["anomalous"] == 4
    assert from_folder["calibration"]["image"] == from_meta["calibration"]["image"]
    assert 0 <= from_meta["calibration"]["image"]["defects_flagged"] <= 4
    for key in ("image_threshold", "pixel_threshold"):
        assert from_folder[key] == pytest.approx(from_meta[key], abs=1e-6)
