"""Serving without the training stack: ``crane.deploy`` and ``predict --backend onnxruntime|openvino``.

* the numpy preprocessing equals ``crane.data.image.preprocess`` bit for bit on every input kind;
* ``crane.deploy`` imports and predicts in a process where torch cannot be imported;
* ``python -m crane export`` (settings read from the checkpoint, thresholds from the
  thresholds.json beside it) then ``predict`` with each backend: the same scores.csv,
  decisions, maps and panels as the torch backend.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crane.data import image as torch_image
from crane.deploy import image as deploy_image
from tests.conftest import REPO

TINY_CLIP = dict(vision_width=128, vision_layers=6, patch_size=14, text_width=128, text_layers=4, embed_dim=64)
SIZE = 84


# ------------------------------------------------------------------------ preprocessing


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> Path:
    """Files of every kind the loader handles."""
    root = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(0)
    rgb = (rng.random((45, 70, 3)) * 255).astype(np.uint8)
    gray = rgb[:, :, 0]
    Image.fromarray(rgb).save(root / "rgb8.png")
    Image.fromarray(gray).save(root / "gray8.png")
    Image.fromarray((rng.random((50, 40)) * 65535).astype(np.uint16)).save(root / "gray16.png")
    cv2.imwrite(str(root / "rgb16.png"), (rng.random((40, 64, 3)) * 65535).astype(np.uint16))
    cv2.imwrite(str(root / "rgb16.tif"), (rng.random((33, 47, 3)) * 65535).astype(np.uint16))
    cv2.imwrite(str(root / "float_rgb.tif"), rng.random((21, 26, 3)).astype(np.float32))  # Pillow cannot: OpenCV
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 90, np.uint8)])).save(root / "rgba.png")
    Image.fromarray(np.dstack([gray, gray[::-1]])).save(root / "la.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "palette.png")
    palette.info["transparency"] = 3
    palette.save(root / "palette_transparent.png", transparency=3)
    Image.fromarray(rgb).save(root / "photo.jpg", quality=85)
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb).save(root / "scan.bmp")
    Image.fromarray(gray > 128).save(root / "bits.png")
    Image.fromarray(rng.random((20, 30)).astype(np.float32)).save(root / "float.tif")
    return root


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    shape = (31, 23)
    u8 = (rng.random((*shape, 4)) * 255).astype(np.uint8)
    return [u8[:, :, 0], u8[:, :, :1], u8[:, :, :2], u8[:, :, :3], u8, (rng.random((*shape, 3)) * 65535).astype(np.uint16),
            rng.random(shape).astype(np.float32), (rng.random(shape) * 300).astype(np.float64),
            rng.random(shape) > 0.5, (rng.random(shape) * 255 - 128).astype(np.int8),
            (rng.random((*shape, 3)) * 70000).astype(np.int32)]


def _pil_images() -> list[Image.Image]:
    rgb = (np.random.default_rng(2).random((17, 29, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    return [img, img.convert("L"), img.convert("I"), img.convert("F"), img.convert("CMYK"), img.convert("LA"),
            img.convert("P"), Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).convert("I;16")]


def test_preprocessing_equals_the_torch_path_bit_for_bit(image_files):
    assert deploy_image.load_rgb is torch_image.load_rgb  # one decoder for both paths
    files = sorted(image_files.iterdir())
    inputs = [*files, *[str(p) for p in files[:2]], *_arrays(), *_pil_images()]
    for item in inputs:
        for size in (SIZE, 37):
            expected = torch_image.preprocess(item, size).numpy()
            got = deploy_image.preprocess(item, size)
            assert got.dtype == np.float32 and np.array_equal(got, expected), (item, size)


# ---------------------------------------------------------------------- export + serve


@pytest.fixture(scope="module")
def photos(tmp_path_factory, synth) -> Path:
    """Readable photographs of mixed formats and sizes, and one broken file."""
    root = tmp_path_factory.mktemp("photos")
    images = synth.images_uint8(n=4, size=96)
    Image.fromarray(images[0]).save(root / "a.png")
    Image.fromarray(images[1][:, :80]).save(root / "b.jpg", quality=90)
    cv2.imwrite(str(root / "c16.png"), images[2].astype(np.uint16)[:, :, ::-1] * 257)
    Image.fromarray(np.dstack([images[3], np.full((96, 96), 50, np.uint8)])).save(root / "d_rgba.png")
    Image.fromarray(images[1][10:70, :, 1]).save(root / "e_gray.bmp")
    data = (root / "b.jpg").read_bytes()
    (root / "z_broken.jpg").write_bytes(data[:len(data) // 3])
    return root


READABLE = ["a.png", "b.jpg", "c16.png", "d_rgba.png", "e_gray.bmp"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_weights, photos):
    """A checkpoint recording its settings, a thresholds.json beside it, the torch predict run, and the
    graph exported with the model settings from the checkpoint (``--sigma 3``, ``--image_size`` as flags)."""
    import open_clip
    import torch

    from crane.cli import dispatch as cli
    from crane.checkpoints import metadata_entry
    from crane.models.clip_loader import load_clip
    from crane.models.prompts import PromptLearner
    from crane.inspection.thresholds import Thresholds, save_thresholds

    root = tmp_path_factory.mktemp("served")
    clip_path = synth_weights("clip", **TINY_CLIP)
    learner = PromptLearner(load_clip(str(clip_path)).token_embedding, open_clip.get_tokenizer("ViT-L-14-336"))
    checkpoint = root / "run" / "epoch_1.pth"
    checkpoint.parent.mkdir()
    settings = {"dino_model": "none", "features_list": [2, 4, 6], "soft_mean": True}
    torch.save({"prompt_learner": learner.state_dict(), "crane": metadata_entry(settings)}, checkpoint)
    flags = ["--clip_weights", str(clip_path), "--features_list", "2", "4", "6", "--dino_model", "none",
             "--soft_mean", "True", "--image_size", str(SIZE), "--sigma", "3", "--device", "cpu"]

    torch_out = root / "torch"
    assert cli.main(["predict", str(photos), "--out", str(torch_out), "--checkpoint", str(checkpoint), *flags,
                     "--threshold", "0.5", "--no_panels", "--save_maps"]) == cli.EXIT_SKIPPED
    scores = np.sort([float(r["score"]) for r in _rows(torch_out / "scores.csv")])
    maps = np.stack([np.load(p) for p in sorted((torch_out / "maps").glob("*.npy"))])
    image_t = float((scores[1] + scores[2]) / 2)  # halfway between two scores: a robust decision
    pixel_t = float(np.quantile(maps, 0.9))
    from crane.cli.setup import flag_errors, settle_model
    from crane.inspection.thresholds import model_record

    args = cli.build_parser().parse_args(["predict", "x", "--out", "y", "--checkpoint", str(checkpoint), *flags])
    assert not flag_errors(args)
    _, info, _ = settle_model(args)  # what calibrate records: checkpoint SHA-256 and settings
    save_thresholds(Thresholds(image_t, pixel_t, {"model": model_record(args, info)}), checkpoint.parent /
                    "thresholds.json")
    onnx_path = root / "graph" / "crane.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--clip_weights", str(clip_path), "--sigma", "3",
                     "--image_size", str(SIZE), "--out", str(onnx_path)]) == 0
    return dict(root=root, checkpoint=checkpoint, flags=flags, onnx=onnx_path, thresholds=(image_t, pixel_t),
                clip=clip_path)


def test_export_records_settings_checkpoint_and_thresholds(served):
    from crane.checkpoints import sha256_file
    from crane.deploy import load_model

    info = load_model(served["onnx"]).info
    assert info.image_size == SIZE and info.sigma == 3.0 and info.precision == "fp32"
    assert info.model["features_list"] == [2, 4, 6] and info.model["soft_mean"] is True  # from the checkpoint
    assert info.model["dino_model"] == "none" and info.model["sigma"] == 3.0  # the flags
    assert info.checkpoint_sha256 == sha256_file(served["checkpoint"])
    assert (info.image_threshold, info.pixel_threshold) == served["thresholds"]
    assert info.thresholds["source"] == str(served["checkpoint"].parent / "thresholds.json")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_predict_backends_match_the_torch_backend(backend, served, photos):
    from crane.cli import dispatch as cli

    root = served["root"]
    reference, out = root / f"torch_{backend}", root / backend
    base = [str(photos), "--save_maps", "--save_masks", "--batch_size", "2"]
    assert cli.main(["predict", *base, "--out", str(reference), "--checkpoint", str(served["checkpoint"]),
                     *served["flags"]]) == cli.EXIT_SKIPPED
    assert cli.main(["predict", *base, "--out", str(out), "--backend", backend, "--model",
                     str(served["onnx"])]) == cli.EXIT_SKIPPED
    expected, got = _rows(reference / "scores.csv"), _rows(out / "scores.csv")
    assert [r["path"] for r in got] == [r["path"] for r in expected] == [(photos / n).as_posix() for n in READABLE]
    assert [r["decision"] for r in got] == [r["decision"] for r in expected]
    assert {r["decision"] for r in got} == {"normal", "anomalous"}
    np.testing.assert_allclose([float(r["score"]) for r in got], [float(r["score"]) for r in expected],
                               rtol=0, atol=1e-5)
    assert _rows(out / "skipped.csv") == _rows(reference / "skipped.csv")
    for name in READABLE:
        named = Path(name).stem if name.endswith(".png") else name  # predict's output names: a .png suffix dropped
        np.testing.assert_allclose(np.load(out / "maps" / f"{named}.npy"), np.load(reference / "maps" / f"{named}.npy"),
                                   rtol=0, atol=1e-5)
        for folder in ("panels", "masks"):
            a = cv2.imread(str(out / folder / f"{named}.png"), cv2.IMREAD_UNCHANGED)
            b = cv2.imread(str(reference / folder / f"{named}.png"), cv2.IMREAD_UNCHANGED)
            assert a.shape == b.shape
            # a map value within 1e-5 of a colour step or of the pixel threshold may land on the other side
            assert np.mean(np.any(a != b, axis=-1) if a.ndim == 3 else a != b) < 1e-3, (folder, name)


def test_openvino_ir_from_the_command_line(served, photos, capsys):
    from crane.cli import dispatch as cli
    from crane.deploy import load_model

    xml = served["root"] / "ir" / "crane.xml"
    assert cli.main(["export", "--checkpoint", str(served["checkpoint"]), "--clip_weights", str(served["clip"]),
                     "--sigma", "3", "--image_size", str(SIZE), "--format", "openvino", "--out", str(xml),
                     "--no_check"]) == 0
    assert sorted(p.name for p in xml.parent.iterdir()) == ["crane.bin", "crane.xml"]
    ir_model, onnx_model = load_model(xml), load_model(served["onnx"])
    assert ir_model.backend == "openvino" and ir_model.info.model == onnx_model.info.model
    images = [photos / n for n in READABLE]
    a, b = ir_model.predict(images), onnx_model.predict(images)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.maps, b.maps, rtol=0, atol=1e-5)
    assert np.array_equal(a.anomalous, a.scores >= served["thresholds"][0])


def test_deploy_runs_where_torch_cannot_be_imported(served, photos, tmp_path):
    """A child process whose imports of torch (and scipy, OpenCV, open_clip, timm) fail."""
    from crane.deploy import load_model

    script = tmp_path / "serve.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "BLOCKED = ('torch', 'scipy', 'cv2', 'open_clip', 'timm', 'onnx')\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from crane.deploy import load_model\n"
        "model = load_model(sys.argv[1], sys.argv[2])\n"
        "out = model.predict(sys.argv[4:], batch_size=2)\n"
        "np.savez(sys.argv[3], scores=out.scores, maps=out.maps, anomalous=out.anomalous)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED], 'imported a blocked module'\n")
    images = [str(photos / n) for n in READABLE]
    expected = load_model(served["onnx"]).predict(images)
    for backend in ("onnxruntime", "openvino"):
        result = tmp_path / f"{backend}.npz"
        run = subprocess.run([sys.executable, str(script), str(served["onnx"]), backend, str(result), *images],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert run.returncode == 0, run.stderr[-3000:]
        got = np.load(result)
        np.testing.assert_allclose(got["scores"], expected.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["maps"], expected.maps, rtol=0, atol=1e-5)
        assert np.array_equal(got["anomalous"], expected.anomalous)


def test_ctrl_c_after_several_openvino_models_is_a_keyboard_interrupt(served, tmp_path):
    """OpenVINO's CPU plugin left a freed alternate signal stack on the thread after two models
    (two Cores) were released: the next Ctrl-C was a segmentation fault (runtime.kept_signal_stack)."""
    script = tmp_path / "two_models.py"
    script.write_text(
        "import faulthandler, gc, os, signal, sys\n"
        "faulthandler.enable()  # an alternate signal stack, as pytest and many programs have\n"
        "from crane.deploy import load_model\n"
        "first = load_model(sys.argv[1], 'openvino')\n"
        "second = load_model(sys.argv[1], 'openvino')\n"
        "del first, second\n"
        "gc.collect()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n")
    run = subprocess.run([sys.executable, str(script), str(served["onnx"])], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0 and run.stdout.strip() == "interrupted", (run.returncode, run.stderr[-2000:])


def test_command_line_errors(served, photos, tmp_path, capsys):
    import onnx

    from crane.cli import dispatch as cli

    plain = tmp_path / "plain.onnx"  # an ONNX file that is not a Crane export
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), plain)
    model = str(served["onnx"])
    out = ["--out", str(tmp_path / "out")]
    checkpoint = str(served["checkpoint"])
    cases = [
        (["predict", str(photos), *out, "--backend", "onnxruntime"], "needs --model PATH"),
        (["predict", str(photos), *out, "--backend", "onnxruntime", "--model", model, "--checkpoint", checkpoint],
         "--checkpoint is for --backend torch"),
        (["predict", str(photos), *out, "--backend", "openvino", "--model", model, "--image_size", "336"],
         "exported with other model settings: --image_size 336 (exported: 84)"),
        (["predict", str(photos), *out, "--backend", "onnxruntime", "--model", model, "--precision", "bf16"],
         "--precision is for --backend torch"),
        (["predict", str(photos), *out, "--model", model], "--model is for --backend onnxruntime|openvino"),
        (["predict", str(photos), *out, "--backend", "onnxruntime", "--model", str(plain)], "is not a Crane export"),
        (["predict", str(photos), *out, "--backend", "openvino", "--model", str(tmp_path / "missing.xml")],
         "exported model not found"),
        (["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "m.txt")], "use a .onnx or .xml file name"),
        (["export", "--checkpoint", checkpoint, "--format", "onnx", "--out", str(tmp_path / "m.xml")],
         "--format onnx writes a .onnx file"),
        (["export", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "m.onnx")],
         "checkpoint not found"),
        (["export", "--checkpoint", str(plain), "--out", str(tmp_path / "m.onnx")], "is not a Crane checkpoint"),
        (["export", "--checkpoint", checkpoint, "--features_list", "6", "--out", str(tmp_path / "m.onnx")],
         "--features_list 6 contradicts the checkpoint"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == cli.EXIT_USAGE, argv  # unusable input: one line per problem, exit 2
        errors = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error: ")]
        assert any(message in line for line in errors), (argv, errors)  # (with every other problem of the run)
    assert not (tmp_path / "out").exists()
    # the same file also passes every check: only the refused flag made those runs fail
    assert cli.main(["predict", str(photos / "a.png"), *out, "--backend", "onnxruntime", "--model", model,
                     "--image_size", str(SIZE), "--no_panels"]) == 0
    assert _rows(tmp_path / "out" / "scores.csv")[0]["decision"] in ("normal", "anomalous")


@pytest.mark.parametrize("flag", [["--image_size", "518"], ["--dino_model", "dinov2"], ["--features_list", "24"],
                                  ["--soft_mean", "False"], ["--clip_weights", "openai"], ["--sigma", "4"]])
def test_predict_on_an_exported_graph_refuses_a_typed_setting_it_lacks_even_at_the_default(served, tmp_path, flag,
                                                                                           capsys):
    """Each value is predict's default and differs from the graph's: typed, it is refused in one line."""
    from crane.cli import dispatch as cli

    image = next(p for p in sorted(Path(served["root"]).rglob("*.png")))
    status = cli.main(["predict", str(image), "--out", str(tmp_path / "out"), "--backend", "onnxruntime", "--model",
                       str(served["onnx"]), "--device", "cpu", *flag])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == cli.EXIT_USAGE and len(errors) == 1
    assert "exported with other model settings" in errors[0] and flag[0] in errors[0]
