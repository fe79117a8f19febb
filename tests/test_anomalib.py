"""Crane inside anomalib (:mod:`crane.integrations.anomalib`) against crane's own numbers.

One small dataset in the custom layout (datasets/README.md), read both ways: ``test.py`` on the
``meta.json`` that ``datasets.generate`` writes, and anomalib's ``Folder`` datamodule on the same folders
(``normal_test_dir``, ``val_split_mode="same_as_test"``). The images have different sizes, so every resize
path runs. The model is a narrow synthetic CLIP (6 blocks of width 128, text width 128) at 56 pixels with a
prompt-learner checkpoint that records its settings; Crane+ adds timm's randomly initialised DINOv2.
"""
from __future__ import annotations

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

from tests.conftest import REPO

HAVE_ANOMALIB = importlib.util.find_spec("anomalib") is not None
needs_anomalib = pytest.mark.skipif(not HAVE_ANOMALIB, reason="anomalib is not installed (pip install 'crane[anomalib]')")

SIZE = 56
CLASS = "my_part"  # the class name of docs/anomalib_crane.yaml
TINY_CLIP = dict(vision_width=128, vision_layers=6, patch_size=14, text_width=128, text_layers=4, embed_dim=64)
CRANE = {"dino_model": "none", "features_list": [2, 4, 6], "soft_mean": True}
CRANE_PLUS = {"dino_model": "dinov2", "features_list": [6], "soft_mean": False}
AUROC_TOL = 1e-4
SCORE_TOL = 1e-5
EXPORT_TOL = 1e-4


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clip_file(synth, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "clip.pt"
    torch.save(synth.clip_state_dict(**TINY_CLIP), path)
    return path


def _checkpoint(clip_file: Path, settings: dict, path: Path) -> Path:
    """A prompt-learner checkpoint (seeded prompts) recording ``settings``, as ``train.py`` writes one."""
    import open_clip

    from crane.checkpoints import metadata_entry
    from crane.models.clip_loader import load_clip
    from crane.models.crane import CraneConfig, CraneModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CraneModel(load_clip(str(clip_file)), open_clip.get_tokenizer("ViT-L-14-336"),
                           CraneConfig(features_list=(6,)))
    torch.save({"prompt_learner": model.prompt_learner.state_dict(), "crane": metadata_entry(settings)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(clip_file, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {"crane": _checkpoint(clip_file, CRANE, folder / "crane.pth"),
            "crane+": _checkpoint(clip_file, CRANE_PLUS, folder / "cranep.pth")}


@pytest.fixture(scope="module")
def dataset(synth, tmp_path_factory) -> Path:
    """``ROOT/{train,test}/my_part``: 6 normal and 6 defect test images (with masks) of different sizes, one
    training image; ``ROOT/meta.json`` from ``datasets.generate``."""
    from datasets.generate import generate

    root = tmp_path_factory.mktemp("custom")
    images, masks = synth.images_uint8(n=12, size=160, seed=3), synth.masks_uint8(n=12, size=160, seed=3)
    for folder in ("train/my_part/good", "test/my_part/good", "test/my_part/defect", "test/my_part/masks"):
        (root / folder).mkdir(parents=True)
    for i in range(12):
        h, w = 160 - 9 * i, 100 + 5 * i  # tall to wide, so both of PIL's pass orders occur
        image, mask = images[i][:h, :w], masks[i][:h, :w]
        if i % 2:
            Image.fromarray(image).save(root / f"test/my_part/defect/{i:03d}.png")
            Image.fromarray(mask).save(root / f"test/my_part/masks/{i:03d}_mask.png")
        else:
            Image.fromarray(image).save(root / f"test/my_part/good/{i:03d}.png")
    Image.fromarray(images[0]).save(root / "train/my_part/good/000.png")
    generate("custom", root)
    return root


def _folder(root: Path, batch_size: int = 5):
    from anomalib.data import Folder

    return Folder(name=CLASS, root=root, normal_dir=f"train/{CLASS}/good", normal_test_dir=f"test/{CLASS}/good",
                  abnormal_dir=f"test/{CLASS}/defect", mask_dir=f"test/{CLASS}/masks", val_split_mode="same_as_test",
                  eval_batch_size=batch_size, num_workers=0)


def _engine(folder: Path):
    from anomalib.engine import Engine

    return Engine(default_root_dir=folder, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu", devices=1)


def _crane(clip_file: Path, checkpoint: Path, **kwargs):
    from crane.integrations.anomalib import Crane

    dino = {"dino_weights": "synthetic"} if "cranep" in checkpoint.name else {}
    return Crane(checkpoint=str(checkpoint), clip_weights=str(clip_file), image_size=SIZE, visualizer=False,
                 **dino, **kwargs)


def _test_py(dataset: Path, clip_file: Path, checkpoint: Path, out: Path) -> dict:
    """``test.py`` on the dataset's meta.json: metrics.json's class entry and predictions.csv's scores."""
    import csv

    spec = importlib.util.spec_from_file_location("crane_test_script_anomalib", REPO / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--dataset", dataset.name, "--datasets_root_dir", str(dataset.parent), "--checkpoint", str(checkpoint),
            "--clip_weights", str(clip_file), "--dino_weights", "synthetic", "--image_size", str(SIZE),
            "--device", "cpu", "--batch_size", "4", "--num_workers", "0", "--save_path", str(out)]
    assert script.main(args) == 0
    with open(out / "predictions.csv", newline="") as f:
        scores = {Path(row["img_path"]).name: float(row["score"]) for row in csv.DictReader(f)}
    return {**json.loads((out / "metrics.json").read_text())["classes"][CLASS], "scores": scores}


@pytest.fixture(scope="module")
def tested(dataset, clip_file, checkpoints, tmp_path_factory) -> dict:
    """Crane after anomalib's ``Engine.test`` (its post-processor holds the test set's statistics)."""
    model = _crane(clip_file, checkpoints["crane"])
    results = _engine(tmp_path_factory.mktemp("engine")).test(model, datamodule=_folder(dataset), verbose=False)
    return {"model": model.eval(), "results": results[0]}


def _images(paths: list[Path]) -> torch.Tensor:
    """anomalib's input: ``B x 3 x H x W`` float32 in [0, 1], as its datasets and inferencers read files."""
    from anomalib.data.utils import read_image

    return torch.from_numpy(np.stack([read_image(p) for p in paths]).astype(np.float32)).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ import and settings


def test_without_anomalib_the_import_is_one_line(monkeypatch):
    """``import crane.integrations.anomalib`` without anomalib: an ImportError naming the extra, one line."""
    monkeypatch.setitem(sys.modules, "anomalib", None)  # what Python does for a package that is absent
    monkeypatch.delitem(sys.modules, "crane.integrations.anomalib", raising=False)
    with pytest.raises(ImportError) as raised:
        importlib.import_module("crane.integrations.anomalib")
    message = str(raised.value)
    assert type(raised.value).__name__ == "AnomalibNotInstalledError"
    assert "\n" not in message and "pip install 'crane[anomalib]'" in message and "setup.sh" in message


@needs_anomalib
@pytest.mark.slow
def test_the_module_imports_no_command_line_module(clip_file):
    code = ("import sys; from crane.integrations.anomalib import Crane; "
            f"Crane(clip_weights={str(clip_file)!r}, image_size={SIZE}, features_list=[6]); "
            "print(sorted(m for m in sys.modules if m.startswith('crane')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert "crane.detector" in loaded and not [m for m in loaded if re.match(r"crane\.cli($|_|\.)", m)], loaded


@needs_anomalib
def test_model_settings_come_from_the_checkpoint_unless_given(clip_file, checkpoints):
    from crane.checkpoints import CheckpointError

    model = _crane(clip_file, checkpoints["crane"])
    assert {k: model.settings[k] for k in CRANE} == {**CRANE, "features_list": (2, 4, 6)}
    assert model.model.graph.model.config.features_list == (2, 4, 6)
    assert model.settings["image_size"] == SIZE and model.input_size == (SIZE, SIZE)
    with pytest.raises(CheckpointError, match="features_list 6 contradicts") as raised:
        _crane(clip_file, checkpoints["crane"], features_list=[6])
    assert "\n" not in str(raised.value)
    forced = _crane(clip_file, checkpoints["crane"], features_list=[6], force=True)
    assert forced.settings["features_list"] == (6,) and forced.settings["soft_mean"] is True


# ------------------------------------------------------------------------------------- pre-processing


@needs_anomalib
def test_the_pre_processor_gives_crane_input_and_masks(dataset):
    """What anomalib's loops feed the model equals ``crane.data.image.preprocess`` / ``load_mask``, bit for bit."""
    from anomalib.data.utils import read_image, read_mask
    from torchvision import tv_tensors

    from crane.data.image import load_mask, preprocess
    from crane.integrations.anomalib import CranePreProcessor

    transform = CranePreProcessor(SIZE).transform
    for path in sorted((dataset / "test" / CLASS / "defect").glob("*.png")):
        image = tv_tensors.Image(torch.from_numpy(read_image(path)).permute(2, 0, 1).float())
        mask_path = dataset / "test" / CLASS / "masks" / f"{path.stem}_mask.png"
        mask = tv_tensors.Mask(read_mask(mask_path, as_tensor=True))
        once_image, once_mask = transform(image, mask)
        assert torch.equal(once_image, preprocess(path, SIZE))
        assert torch.equal(once_mask.float(), load_mask(mask_path, SIZE))
        # the datamodule resizes each image, the pre-processor the batch again: the second resize changes nothing
        resized = transform.transforms[0](tv_tensors.Image(image[None]), tv_tensors.Mask(mask[None]))
        assert torch.equal(transform(*resized)[0][0], once_image)


@pytest.fixture(scope="module")
def exported_resize(tmp_path_factory) -> dict:
    """:class:`ExportPreprocess` alone as ONNX (dynamic batch, height and width), in ONNX Runtime and OpenVINO."""
    pytest.importorskip("onnxscript")
    ort, ov = pytest.importorskip("onnxruntime"), pytest.importorskip("openvino")

    from crane.integrations.anomalib import ExportPreprocess

    path = tmp_path_factory.mktemp("resize") / "resize.onnx"
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    torch.onnx.export(ExportPreprocess(SIZE), (torch.zeros(2, 3, 40, 50),), dynamo=True, opset_version=18,
                      input_names=["images"], dynamic_shapes=(dims,), verbose=False).save(path)
    session = ort.InferenceSession(str(path))
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return {"torch": lambda x: ExportPreprocess(SIZE)(torch.from_numpy(x)).numpy(),
            "onnxruntime": lambda x: session.run(None, {"images": x})[0],
            "openvino": lambda x: compiled(x)[0]}


@needs_anomalib
@pytest.mark.parametrize("shape", [(97, 131), (131, 97), (300, 90), (151, 105), (56, 56), (40, 30)])
def test_the_export_pre_processor_follows_pil(synth, exported_resize, shape):
    """The traced resize (PIL's weights and rounding as tensor operations, in PIL's pass order) in torch,
    ONNX Runtime and OpenVINO against PIL: at most one 8-bit level apart on at most 0.1% of the values
    (float32 sums where PIL's are integers; OpenVINO computes the float64 weights in float32)."""
    from crane.data.image import OPENAI_STD, preprocess

    h, w = shape
    image = np.ascontiguousarray(synth.images_uint8(n=2, size=320, seed=5)[1][:h, :w])
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0).numpy()
    reference = preprocess(image, SIZE).numpy()
    for runtime, run in exported_resize.items():
        levels = np.abs((run(x)[0] - reference) * np.asarray(OPENAI_STD).reshape(3, 1, 1) * 255.0)
        assert levels.max() < 1.0 + 1e-3 and (levels > 0.5).mean() <= 1e-3, runtime


# ------------------------------------------------------------------------------------ post-processing


@needs_anomalib
def test_the_post_processor_keeps_the_order_anomalib_s_clamps():
    from anomalib.post_processing import PostProcessor

    from crane.integrations.anomalib import CranePostProcessor

    values = torch.tensor([0.10, 0.20, 0.30, 0.35, 0.40, 0.90, 1.00])
    low, high, threshold = values.min(), values.max(), torch.tensor(0.35)
    ours = CranePostProcessor._normalize(values, low, high, threshold)
    assert torch.all(ours[1:] > ours[:-1])  # strictly increasing: every ranking metric unchanged
    assert ours[0] == 0 and ours[-1] == 1 and ours[3] == 0.5  # min, max, threshold
    assert torch.equal(ours > 0.5, values > threshold)  # the same labels at the default sensitivity
    stock = PostProcessor._normalize(values, low, high, threshold)
    assert (stock == 1).sum() == 2  # anomalib's: 0.90 and 1.00 clamped to a tie (threshold below the midpoint)
    nan = torch.tensor(float("nan"))
    assert torch.equal(CranePostProcessor._normalize(values, nan, nan, nan), values)  # no statistics yet


# ---------------------------------------------------------------------------------- Engine.test / predict


@needs_anomalib
@pytest.mark.parametrize("variant", ["crane", pytest.param("crane+", marks=pytest.mark.slow)])
def test_engine_test_gives_test_py_aurocs(dataset, clip_file, checkpoints, tested, variant, tmp_path):
    ours = _test_py(dataset, clip_file, checkpoints[variant], tmp_path / "test_py")
    if variant == "crane":
        results = tested["results"]
    else:
        model = _crane(clip_file, checkpoints[variant])
        results = _engine(tmp_path).test(model, datamodule=_folder(dataset), verbose=False)[0]
    assert 0.05 < ours["image_auroc"] < 0.95 and 0.05 < ours["pixel_auroc"] < 0.95  # neither trivial nor degenerate
    assert abs(results["image_AUROC"] - ours["image_auroc"]) < AUROC_TOL
    assert abs(results["pixel_AUROC"] - ours["pixel_auroc"]) < AUROC_TOL


@needs_anomalib
def test_engine_predict_gives_detector_scores_and_maps(dataset, clip_file, checkpoints, tmp_path):
    """``Engine.predict`` without post-processing: ``Detector.predict``'s scores and maps; with it, the
    normalised scores keep their order and the labels are ``score > image threshold``."""
    from crane import Detector

    detector = Detector.from_config(clip_weights=str(clip_file), checkpoint=str(checkpoints["crane"]), image_size=SIZE,
                                    **CRANE)
    raw = _engine(tmp_path / "raw").predict(_crane(clip_file, checkpoints["crane"], post_processor=False),
                                            datamodule=_folder(dataset))
    paths = [Path(p) for batch in raw for p in batch.image_path]
    assert len(paths) == 12
    expected = detector.predict(paths)
    scores = torch.cat([batch.pred_score for batch in raw]).numpy()
    maps = torch.cat([batch.anomaly_map for batch in raw]).numpy()
    assert np.abs(scores - expected.scores).max() < SCORE_TOL
    assert np.abs(maps - expected.maps).max() < SCORE_TOL

    model = _crane(clip_file, checkpoints["crane"])
    normalised = _engine(tmp_path / "normalised").predict(model, datamodule=_folder(dataset))
    values = torch.cat([batch.pred_score for batch in normalised]).numpy()
    labels = torch.cat([batch.pred_label for batch in normalised]).numpy()
    assert 0 <= values.min() and values.max() <= 1
    assert np.array_equal(np.argsort(values, kind="stable"), np.argsort(scores, kind="stable"))
    assert np.array_equal(labels, scores > model.post_processor.image_threshold.item())


@needs_anomalib
def test_few_shot_takes_references_as_winclip_does(dataset, clip_file, checkpoints, tmp_path):
    """``k_shot``: the first training images the datamodule yields, or the first files of ``few_shot_source``;
    ``Engine.predict`` then gives ``Detector.predict``'s scores and maps with the same reference memory."""
    from anomalib import LearningType

    from crane import Detector

    detector = Detector.from_config(clip_weights=str(clip_file), checkpoint=str(checkpoints["crane"]), image_size=SIZE,
                                    **CRANE)
    good = dataset / "test" / CLASS / "good"
    for kwargs, references in (({"k_shot": 1}, [dataset / "train" / CLASS / "good" / "000.png"]),
                               ({"k_shot": 2, "few_shot_source": str(good)}, sorted(good.iterdir())[:2])):
        model = _crane(clip_file, checkpoints["crane"], post_processor=False, **kwargs)
        assert model.learning_type == LearningType.FEW_SHOT
        raw = _engine(tmp_path / str(kwargs["k_shot"])).predict(model, datamodule=_folder(dataset))
        paths = [Path(p) for batch in raw for p in batch.image_path]
        detector.set_reference(references)
        expected = detector.predict(paths)
        assert np.abs(torch.cat([b.pred_score for b in raw]).numpy() - expected.scores).max() < SCORE_TOL
        assert np.abs(torch.cat([b.anomaly_map for b in raw]).numpy() - expected.maps).max() < SCORE_TOL
        detector.set_reference(None)
        assert np.abs(detector.predict(paths).scores - expected.scores).max() > 10 * SCORE_TOL  # the memory counts
    if importlib.util.find_spec("onnxscript") and importlib.util.find_spec("onnxruntime"):  # the export carries it
        import onnxruntime as ort
        from anomalib.deploy import ExportType

        path = _engine(tmp_path / "export").export(model, ExportType.ONNX, export_root=tmp_path / "export")
        session = ort.InferenceSession(str(path))
        names = [output.name for output in session.get_outputs()]
        images = _inputs(dataset)["preprocessed"]
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()})))
        with torch.no_grad():
            expected = model(images)
        assert np.abs(got["pred_score"] - expected.pred_score.numpy()).max() < EXPORT_TOL
        assert np.abs(got["anomaly_map"] - expected.anomaly_map.numpy()).max() < EXPORT_TOL
    with pytest.raises(ValueError, match="hold only 1 images"):
        model = _crane(clip_file, checkpoints["crane"], k_shot=2)
        _engine(tmp_path / "short").predict(model, datamodule=_folder(dataset))


# ------------------------------------------------------------------------------------------- export


def _inputs(dataset: Path) -> dict[str, torch.Tensor]:
    """``"preprocessed"``: two images resized as crane does (8-bit values at ``S x S``: the graph's resize is then
    the identity in every runtime); ``"native"``: an image and its mirror image at the file's size."""
    from crane.integrations.anomalib import CraneResize

    defects = sorted((dataset / "test" / CLASS / "defect").glob("*.png"))
    first = _images([defects[0]])
    return {"preprocessed": torch.cat([CraneResize(SIZE)(_images([path])) for path in (defects[1], defects[3])]),
            "native": torch.cat([first, first.flip(-1)])}


def _assert_close(got: dict, expected, tolerance: float = EXPORT_TOL) -> None:
    """Scores and maps within ``tolerance``; the same labels except for a score at the threshold (the image the
    adaptive threshold was taken from sits exactly there, 0.5 after normalisation)."""
    assert np.abs(got["pred_score"] - expected.pred_score.numpy()).max() < tolerance
    assert np.abs(got["anomaly_map"] - expected.anomaly_map.numpy()).max() < tolerance
    clear = np.abs(expected.pred_score.numpy() - 0.5) > tolerance
    assert np.array_equal(got["pred_label"][clear], expected.pred_label.numpy()[clear])


@needs_anomalib
@pytest.mark.slow
def test_onnx_export_matches_the_torch_path(tested, dataset, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from anomalib.deploy import ExportType

    model = tested["model"]
    path = _engine(tmp_path).export(model, ExportType.ONNX, export_root=tmp_path)
    session = ort.InferenceSession(str(path))
    names = [output.name for output in session.get_outputs()]
    assert names == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    for images in _inputs(dataset).values():
        with torch.no_grad():
            expected = model(images)
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()})))
        _assert_close(got, expected)


@needs_anomalib
@pytest.mark.slow
def test_openvino_export_loads_in_anomalib_s_inferencer(tested, dataset, tmp_path, monkeypatch):
    """``OpenVINOInferencer`` in float32 (OpenVINO's CPU default on CPUs with bf16 units is bfloat16), on the
    preprocessed input: OpenVINO computes the resize weights in float32 where torch computes them in float64,
    which may move a resized pixel by one 8-bit level (test_the_export_pre_processor_follows_pil)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    from anomalib.deploy import ExportType, OpenVINOInferencer

    model = tested["model"]
    path = _engine(tmp_path).export(model, ExportType.OPENVINO, export_root=tmp_path)
    monkeypatch.chdir(tmp_path)  # the inferencer keeps OpenVINO's compilation cache in ./openvino_cache
    inferencer = OpenVINOInferencer(path, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    images = _inputs(dataset)["preprocessed"]
    with torch.no_grad():
        expected = model(images)
    got = inferencer.predict(images.numpy())
    _assert_close({"pred_score": got.pred_score, "anomaly_map": got.anomaly_map, "pred_label": got.pred_label}, expected)
    from_file = inferencer.predict(sorted((dataset / "test" / CLASS / "good").glob("*.png"))[0])  # its own size
    assert from_file.anomaly_map.shape == (1, SIZE, SIZE) and 0 <= float(from_file.pred_score[0]) <= 1


# ---------------------------------------------------------------------------------------- command line


@needs_anomalib
@pytest.mark.slow
def test_anomalib_cli_with_the_example_config(dataset, clip_file, checkpoints, tested, tmp_path):
    """``anomalib test --config docs/anomalib_crane.yaml`` with the paths of this dataset: Engine.test's AUROCs."""
    anomalib = Path(sys.executable).parent / "anomalib"
    command = [str(anomalib), "test", "--config", str(REPO / "docs" / "anomalib_crane.yaml"),
               "--model.init_args.checkpoint", str(checkpoints["crane"]),
               "--model.init_args.clip_weights", str(clip_file), "--model.init_args.image_size", str(SIZE),
               "--model.init_args.visualizer", "false", "--data.init_args.root", str(dataset),
               "--data.init_args.num_workers", "0", "--default_root_dir", str(tmp_path)]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("image_AUROC", "pixel_AUROC"):
        value = float(re.search(rf"{name}\W+([0-9.]+)", out.stdout).group(1))
        assert abs(value - tested["results"][name]) < AUROC_TOL
