"""What a new user broke (issue: overwritten checkpoints, late failures, silent flags, stale resume)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crane.cli import dispatch as cli
from crane.errors import EXIT_USAGE
from tests.conftest import REPO


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- overwrites


def test_init_checkpoint_refuses_an_existing_file_and_never_replaces_an_official_one(tmp_path, official_checkpoint,
                                                                                   capsys):
    official = tmp_path / "trained_on_mvtec_crane" / "epoch_5.pth"
    official.parent.mkdir()
    shutil.copy(official_checkpoint, official)
    before = _digest(official)
    for extra in ([], ["--overwrite"]):
        assert cli.main(["init-checkpoint", str(official), *extra]) == EXIT_USAGE
        (line,) = _err_lines(capsys)
        assert "official checkpoint" in line and "never" in line
    assert _digest(official) == before
    other = tmp_path / "run" / "epoch_3.pth"
    other.parent.mkdir()
    other.write_bytes(b"a run's checkpoint")
    assert cli.main(["init-checkpoint", str(other)]) == EXIT_USAGE
    assert "--overwrite" in _err_lines(capsys)[0] and other.read_bytes() == b"a run's checkpoint"
    assert cli.main(["init-checkpoint", str(other), "--overwrite"]) == 0
    assert other.read_bytes() != b"a run's checkpoint"


def test_calibrate_output_replaces_only_its_own_thresholds(tmp_path, official_checkpoint, model_flags, capsys):
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(normal / f"{i}.png")
    official = tmp_path / "official.pth"
    shutil.copy(official_checkpoint, official)
    victim = tmp_path / "model.pth"
    torch.save({"prompt_learner": {}}, victim)
    before = _digest(victim)
    calibrate = ["calibrate", "--normal", str(normal), "--target_fpr", "0.3", "--checkpoint", str(official_checkpoint),
                 *model_flags]
    assert cli.main([*calibrate, "--output", str(victim)]) == EXIT_USAGE
    assert "--overwrite" in _err_lines(capsys)[0] and _digest(victim) == before
    assert cli.main([*calibrate, "--output", str(official), "--overwrite"]) == EXIT_USAGE
    assert "never replaces" in _err_lines(capsys)[0] and _digest(official) == _digest(official_checkpoint)
    out = tmp_path / "thresholds.json"
    assert cli.main([*calibrate, "--output", str(out)]) == 0
    capsys.readouterr()
    assert cli.main([*calibrate, "--output", str(out)]) == 0  # its own file: replaced, said once
    assert "replacing the thresholds" in capsys.readouterr().err


# ------------------------------------------------------------------------ late failures


def test_train_checks_its_save_path_before_any_model_work(tmp_path, capsys):
    from crane.cli.train import main as train_main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    status = train_main(["--dataset", "nowhere", "--datasets_root_dir", str(tmp_path), "--clip_weights", "synthetic",
                         "--save_path", str(blocker / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE and "Traceback" not in err
    assert "--save_path" in err and "is a file" in err


def test_train_init_checkpoint_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    from crane.cli.train import main as train_main

    bogus = tmp_path / "bogus.pth"
    torch.save({101: torch.zeros(2)}, bogus)
    root = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "datasets.synthetic", str(root / "synth"), "--classes", "1"],
                   cwd=REPO, check=True, capture_output=True)
    status = train_main(["--dataset", "synth", "--datasets_root_dir", str(root), "--clip_weights", "synthetic",
                         "--dino_model", "none", "--image_size", "28", "--save_path", str(tmp_path / "runs"),
                         "--init_checkpoint", str(bogus), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE and "Traceback" not in err and "is not a Crane checkpoint" in err


def test_predict_reports_every_problem_in_one_round(tmp_path, capsys):
    status = cli.main(["predict", str(tmp_path / "photos"), "--out", str(tmp_path / "out"),
                       "--clip_weights", str(tmp_path / "missing.pt"), "--model_name", "trained_on_mvtec_crane"])
    lines = _err_lines(capsys)
    assert status == EXIT_USAGE
    assert any("no such file or folder" in line and "photos" in line for line in lines)
    assert any("CLIP weights file not found" in line for line in lines)


def test_a_wrong_prompt_length_fails_before_any_results_warning(tmp_path, official_checkpoint, model_flags, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    status = cli.main(["predict", str(image), "--out", str(tmp_path / "out"), "--checkpoint", str(official_checkpoint),
                       *model_flags])
    assert status in (0, 1, 2, 3)
    # n_ctx is a checkpoint setting the inspect commands take from the checkpoint; test.py's flag is checked
    from crane.engine.evaluate import EvalError, EvalOptions, prepare

    opts = EvalOptions(dataset="none", datasets_root_dir=str(tmp_path), checkpoint=str(official_checkpoint),
                       clip_weights="synthetic", dino_model="none", device="cpu", n_ctx=8,
                       explicit=frozenset({"n_ctx"}))
    with pytest.raises(Exception) as caught:
        prepare(opts)
    assert "n_ctx" in str(caught.value)
    assert "recomputing" not in capsys.readouterr().err


# ------------------------------------------------------------------------ silent flags
# (predict on an exported graph refusing typed settings: tests/test_deploy.py, on its exported graph)


def test_predict_backend_with_a_checkpoint_file_says_what_an_export_is(tmp_path, official_checkpoint, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    status = cli.main(["predict", str(image), "--out", str(tmp_path / "out"), "--backend", "onnxruntime", "--model",
                       str(official_checkpoint), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not an exported model" in err and "--backend torch --checkpoint" in err


# --------------------------------------------------------------------------- stale resume


def test_file_identity_follows_content_not_size_and_mtime(tmp_path, monkeypatch):
    from crane import files

    monkeypatch.setattr(files, "_DIGESTS", files.DigestCache(tmp_path / "digests.sqlite"))
    image = tmp_path / "a.png"
    image.write_bytes(b"A" * 1000)
    first = files.file_identity(image)
    st = image.stat()
    replacement = tmp_path / "b.png"
    replacement.write_bytes(b"B" * 1000)  # same size
    os.replace(replacement, image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, as touch -r / cp -p / rsync -t
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    assert files.file_identity(image) != first
    assert files.is_identity(first) and not files.is_identity("1000:123456789")
    # a second process-level cache reads the digest from the SQLite file without rereading the file
    again = files.DigestCache(tmp_path / "digests.sqlite")
    assert again.digest(image) == files.file_identity(image)


def test_resume_recomputes_a_class_whose_image_was_replaced_with_the_same_size_and_mtime(tmp_path):
    """test.py on a tiny dataset: replace one image by another of the same size with the old mtime."""
    root = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "datasets.synthetic", str(root / "synth"), "--classes", "1", "--size",
                    "28", "--train", "1", "--test-normal", "2", "--test-anomalous", "2"], cwd=REPO, check=True, capture_output=True)
    from crane.cli.test import main as test_main

    ckpt = tmp_path / "ckpt.pth"
    assert cli.main(["init-checkpoint", str(ckpt)]) == 0
    args = ["--dataset", "synth", "--datasets_root_dir", str(root), "--checkpoint", str(ckpt), "--clip_weights",
            "synthetic", "--dino_model", "none", "--image_size", "28", "--device", "cpu", "--save_path",
            str(tmp_path / "res")]
    a, b = sorted((root / "synth" / "test").glob("*/good/*.png"))[0], sorted((root / "synth" / "test").glob(
        "*/scratch/*.png"))[0]
    Image.open(a).save(a, compress_level=0)  # stored, not compressed: any image of this size has this byte size
    assert test_main(args) == 0
    first = (tmp_path / "res" / "metrics.json").read_text()
    st = a.stat()
    Image.open(b).convert(Image.open(a).mode).save(a, compress_level=0)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    assert test_main(args) == 0
    assert (tmp_path / "res" / "metrics.json").read_text() != first


# ------------------------------------------------------------------- the API and random weights


def test_detector_from_config_takes_the_checkpoint_settings(official_checkpoint, synth_weights):
    import crane
    from crane.checkpoints import CheckpointError

    clip = str(synth_weights("clip", vision_width=256, seed=0))
    detector = crane.Detector.from_config(clip_weights=clip, checkpoint=official_checkpoint, image_size=56)
    assert detector.config.features_list == (6, 12, 18, 24) and detector.config.soft_mean is True
    with pytest.raises(CheckpointError, match="--features_list 24"):
        crane.Detector.from_config(clip_weights=clip, checkpoint=official_checkpoint, image_size=56,
                                   features_list=(24,))
    forced = crane.Detector.from_config(clip_weights=clip, checkpoint=official_checkpoint, image_size=56,
                                        features_list=(24,), force=True)
    assert forced.config.features_list == (24,)


def test_random_weights_are_said_in_metrics_md_and_table1(tmp_path):
    from tests.test_evaluate import _load_make_table

    make_table = _load_make_table()
    root = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "datasets.synthetic", str(root / "mvtec"), "--classes", "1", "--size",
                    "28", "--train", "1", "--test-normal", "2", "--test-anomalous", "2"], cwd=REPO, check=True, capture_output=True)
    from crane.cli.test import main as test_main

    ckpt = tmp_path / "ckpt.pth"
    assert cli.main(["init-checkpoint", str(ckpt)]) == 0
    save = tmp_path / "res" / "crane" / "mvtec"
    assert test_main(["--dataset", "mvtec", "--datasets_root_dir", str(root), "--checkpoint", str(ckpt),
                      "--clip_weights", "synthetic", "--dino_model", "none", "--image_size", "28", "--device", "cpu",
                      "--save_path", str(save)]) == 0
    assert (save / "metrics.md").read_text().startswith("> RANDOM WEIGHTS (--clip_weights synthetic)")
    assert make_table.main([str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "table1.md").read_text().startswith("> RANDOM WEIGHTS")
    assert make_table.main([str(tmp_path / "res"), "--paper"]) == 2
    assert make_table.main([str(tmp_path / "res"), "--paper", "--allow_random"]) == 0


def test_model_name_finds_the_shipped_checkpoints_from_any_folder(tmp_path, monkeypatch):
    from crane.checkpoints import SHIPPED, named_checkpoint

    if not (SHIPPED / "trained_on_mvtec_crane" / "epoch_5.pth").is_file():
        pytest.skip(f"the shipped checkpoints are not in {SHIPPED}")
    monkeypatch.chdir(tmp_path)
    assert named_checkpoint("trained_on_mvtec_crane", 5) == SHIPPED / "trained_on_mvtec_crane" / "epoch_5.pth"
    local = tmp_path / "checkpoints" / "trained_on_mvtec_crane" / "epoch_5.pth"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"x")
    assert named_checkpoint("trained_on_mvtec_crane", 5).resolve() == local.resolve()
