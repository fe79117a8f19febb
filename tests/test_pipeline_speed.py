"""The speed options of the pipeline on CPU: loader workers, ``--precision``, ``--compile``.

A tiny model (random CLIP with a 64-wide vision tower, the shipped Crane checkpoint) on a
generated dataset at 56 px, so each ``test.py`` run takes seconds. The 2-process (gloo)
comparison lives in ``tests/test_evaluate.py``.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import crane
from crane.cli import dispatch as cli
from crane.data.dataset import CraneDataset
from crane.engine import train as engine
from crane.engine.feature_cache import FrozenImageEncoder
from crane.models.precision import CompiledOrEager
from crane.models.synthetic import synthetic_clip_state_dict
from datasets.synthetic import make_synthetic_dataset
from tests.conftest import REPO

SIZE = 56
CHECKPOINT = REPO / "checkpoints" / "trained_on_mvtec_crane" / "epoch_5.pth"
BF16_MAP_TOLERANCE = 1e-2
"""Max abs difference of a bf16 map from the fp32 one allowed here (maps are probabilities; measured: 3.6e-3)."""
COMPILE_WARNING = "--compile: compiling the image encoder failed"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TEST_PY = _load("crane_test_script_speed", "test.py")
TRAIN_PY = _load("crane_train_script_speed", "train.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """``ROOT/toy``: two classes of 2 normal and 2 anomalous 64 px images."""
    root = tmp_path_factory.mktemp("datasets")
    make_synthetic_dataset(root / "toy", classes=2, train=0, test_normal=2, test_anomalous=2, size=64)
    return root


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "clip64.pt"
    torch.save(synthetic_clip_state_dict(vision_width=64), path)
    return path


@pytest.fixture(scope="module")
def base_args(data_root, clip_file) -> list[str]:
    return ["--dataset", "toy", "--datasets_root_dir", str(data_root), "--checkpoint", str(CHECKPOINT),
            "--clip_weights", str(clip_file), "--image_size", str(SIZE), "--device", "cpu", "--batch_size", "3",
            "--save_maps"]


@pytest.fixture(scope="module")
def fp32_run(base_args, tmp_path_factory) -> Path:
    """The reference: fp32, no loader workers, uncompiled."""
    out = tmp_path_factory.mktemp("fp32") / "run"
    assert TEST_PY.main([*base_args, "--num_workers", "0", "--save_path", str(out)]) == 0
    return out


def _files(out: Path) -> dict[str, bytes]:
    names = ["metrics.json", "predictions.csv", "metrics.md", *(str(p.relative_to(out)) for p in (out / "maps").rglob("*.npy"))]
    return {name: (out / name).read_bytes() for name in sorted(names)}


def _maps(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.load(p) for p in sorted((out / "maps").rglob("*.npy"))}


def test_loader_workers_give_identical_files(fp32_run, base_args, tmp_path):
    out = tmp_path / "workers"
    assert TEST_PY.main([*base_args, "--num_workers", "1", "--save_path", str(out)]) == 0
    ours, reference = _files(out), _files(fp32_run)
    assert len(reference) == 3 + 8 and ours == reference


def test_bf16_maps_stay_near_fp32_and_are_never_mixed_with_them(fp32_run, base_args, tmp_path, caplog):
    out = tmp_path / "mixed"
    shutil.copytree(fp32_run, out)
    with caplog.at_level(logging.WARNING, logger="crane"):
        assert TEST_PY.main([*base_args, "--precision", "bf16", "--save_path", str(out)]) == 0
    assert any("from other settings" in r.getMessage() for r in caplog.records)  # the fp32 classes are recomputed
    result = json.loads((out / "metrics.json").read_text())
    assert result["args"]["precision"] == "bf16"
    assert json.loads((fp32_run / "metrics.json").read_text())["args"]["precision"] == "fp32"
    ours, reference = _maps(out), _maps(fp32_run)
    assert ours.keys() == reference.keys()
    worst = max(float(np.abs(ours[k] - reference[k]).max()) for k in ours)
    assert 0 < worst <= BF16_MAP_TOLERANCE  # bf16 did run (the maps moved), and not far


def test_compile_runs_the_image_encoder_through_torch_compile(fp32_run, base_args, tmp_path, monkeypatch):
    """``--compile`` on the real dynamo graph capture; the ``eager`` backend stands in for inductor, whose C++
    compilation of even this tiny model takes minutes on this CPU (measured by hand: maps within 4e-7)."""
    real, compiled = torch.compile, []

    def eager_backend(fn, **kwargs):
        compiled.append(getattr(fn, "__name__", fn))
        return real(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_backend)
    torch._dynamo.reset()
    out = tmp_path / "compiled"
    assert TEST_PY.main([*base_args, "--compile", "--save_path", str(out)]) == 0
    assert compiled == ["encode_image"]
    ours, reference = _maps(out), _maps(fp32_run)
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=0, atol=1e-5)


def test_compile_failure_falls_back_with_one_warning(fp32_run, base_args, tmp_path, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("simulated: no C++ compiler\nsecond line of the report")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "fallback"
    with caplog.at_level(logging.WARNING, logger="crane"):
        assert TEST_PY.main([*base_args, "--compile", "--num_workers", "0", "--save_path", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if COMPILE_WARNING in r.getMessage()]
    assert len(warnings) == 1 and "simulated: no C++ compiler" in warnings[0] and "\n" not in warnings[0]
    assert _files(out) == _files(fp32_run)  # the uncompiled model, bit for bit


def test_compiled_or_eager_never_hides_an_error_of_the_computation(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # "compiled" = the function itself

    def bad_input(x):
        raise ValueError("input side must be a multiple of 14")

    with caplog.at_level(logging.WARNING, logger="crane"), pytest.raises(ValueError, match="multiple of 14"):
        CompiledOrEager(bad_input, "f")(1)
    assert not caplog.records  # not mistaken for a compilation failure

    def refuse(fn, **kw):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    with caplog.at_level(logging.WARNING, logger="crane"):
        assert CompiledOrEager(lambda x: x + 1, "f")(1) == 2
    assert len(caplog.records) == 1 and "not supported on this Python" in caplog.records[0].getMessage()


def test_fp16_on_the_cpu_is_one_line_before_any_model_work(base_args, data_root, clip_file, tmp_path, monkeypatch,
                                                           capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(crane.detector, "build_model", no_model)
    monkeypatch.setattr(engine, "build_model", no_model)
    runs = [
        (TEST_PY.main, [*base_args, "--precision", "fp16", "--save_path", str(tmp_path / "t")], "test.py: error: "),
        (TRAIN_PY.main, ["--dataset", "toy", "--datasets_root_dir", str(data_root), "--clip_weights", str(clip_file),
                         "--device", "cpu", "--precision", "fp16", "--save_path", str(tmp_path / "r")],
         "train.py: error: "),
        (cli.main, ["predict", str(data_root / "toy" / "test"), "--out", str(tmp_path / "p"), "--checkpoint",
                    str(CHECKPOINT), "--clip_weights", str(clip_file), "--device", "cpu", "--precision", "fp16"],
         "error: "),
    ]
    for main, argv, prefix in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(prefix) and "--precision fp16 needs a GPU" in err[0], err
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists() and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        crane.Detector(None, "cpu", "fp16")


def test_predict_and_train_take_the_flags():
    args = cli.build_parser().parse_args(["predict", "a.png", "--out", "o", "--precision", "bf16", "--compile"])
    assert (args.precision, args.compile) == ("bf16", True)
    args = TRAIN_PY.build_parser().parse_args(["--precision", "bf16", "--compile", "False"])
    assert (args.precision, args.compile) == ("bf16", False)
    args = TEST_PY.build_parser().parse_args([])
    assert (args.precision, args.compile) == ("fp32", False)  # the reproduction default


def test_training_encodes_under_the_precision_and_records_it(data_root, clip_file, tmp_path):
    model = crane.build_model(str(clip_file), None, None,
                              crane.CraneConfig(features_list=(6, 12, 18, 24), image_size=SIZE))
    dataset = CraneDataset(data_root / "toy", split="test", image_size=SIZE)
    images = torch.stack([dataset[i]["img"] for i in range(4)])
    fp32, bf16 = FrozenImageEncoder(model).encode(images), FrozenImageEncoder(model, "bf16").encode(images)
    for a, b in zip(fp32, bf16):
        assert b["embedding"].dtype == torch.float32 and all(s.dtype == torch.float32 for s in b["sets"])
        drift = max(float((x - y).abs().max()) for x, y in zip(a["sets"], b["sets"]))
        assert 0 < drift < 0.05  # unit-norm token sets

    opts = engine.TrainOptions(dataset=["toy"], datasets_root_dir=str(data_root), clip_weights=str(clip_file),
                               dino_model="none", features_list=(24,), image_size=SIZE, batch_size=4, epoch=1,
                               save_path=str(tmp_path / "runs"), model_name="t", device="cpu", precision="bf16")
    config = crane.CraneConfig.from_options(opts)
    assert engine.disk_cache_folder(opts, config) != engine.disk_cache_folder(replace(opts, precision="fp32"), config)
    run = engine.train(opts)
    assert torch.load(run / "epoch_1.pth", weights_only=True)["crane"]["train"]["precision"] == "bf16"
    with pytest.raises(engine.TrainError, match="precision: saved 'bf16' vs now 'fp32'"):
        engine.train(replace(opts, precision="fp32", epoch=2, resume=True))


def test_gpu_check_script_parses_and_refuses_without_a_gpu(tmp_path):
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/gpu_check.sh would run for minutes")
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)})
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr, proc.stderr
