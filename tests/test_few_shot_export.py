"""Exporting a reference memory inside the one graph (``python -m crane export --reference``, few-shot).

* onnxruntime and OpenVINO with the memory as constants match ``Detector.predict`` with the same memory
  within 1e-4 (Crane with two banks; Crane+ with a VFM bank and a coreset), the search chunked over the memory;
* the metadata records the memory (K, rows, bytes, coreset, weight, the references' digests), and the
  torch-free runtime and ``predict --backend`` say so;
* a memory over ``--max_reference_mb`` is refused in one line naming the coreset ratio that fits, before the
  memory is built or anything exported; a memory built for other features, or one the thresholds do not
  name, is refused in one line;
* without a memory the graph is the zero-shot one.

Tiny models: the synthetic CLIP of ``tests/test_export.py`` (vision width 128, 6 blocks) at 56 x 56 (a 4 x 4
grid), three 64-pixel reference images.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

from crane.deploy import load_model  # noqa: E402
from crane.detector import Detector  # noqa: E402
from crane.export.graph import InferenceGraph  # noqa: E402
from crane.export.writer import (_SINGLE_FILE_LIMIT, default_info, export_graph, external_data,  # noqa: E402
                                 fitting_ratio, onnx_to_openvino, reference_bytes)
from crane.files import file_identity  # noqa: E402
from crane.models.crane import CraneConfig, CraneModel  # noqa: E402
from crane.models.smoothing import gaussian_smooth  # noqa: E402
from crane.reference import save_reference  # noqa: E402
from tests.conftest import tiny_dinov2  # noqa: E402

TOL = 1e-4
SIZE = 56
CHUNK = 20  # memory rows per MatMul in the tests' graphs: 48 rows are three chunks
TINY_CLIP = dict(vision_width=128, vision_layers=6, patch_size=14, text_width=128, text_layers=4, embed_dim=64)
CONFIGS = {
    # name: (CraneConfig fields, coreset ratio)
    "crane": (dict(dino_model="none", features_list=(2, 4, 6), soft_mean=True), 1.0),
    "crane+_coreset": (dict(dino_model="dinov2", features_list=(6,), soft_mean=False), 0.5),
}


def _detector(clip, **options) -> Detector:
    import open_clip

    config = CraneConfig(**{"image_size": SIZE, "eattn_layers": 4, **options})
    vfm = tiny_dinov2(SIZE) if config.dino_model == "dinov2" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CraneModel(clip, open_clip.get_tokenizer("ViT-L-14-336"), config, vfm)
    return Detector(model.eval(), batch_size=4)


@pytest.fixture(scope="module")
def clip(synth):
    from crane.models.clip_loader import load_clip

    return load_clip(synth.clip_state_dict(**TINY_CLIP))


@pytest.fixture(scope="module")
def pictures(synth) -> list[np.ndarray]:
    """Three reference images and three test images (one with a defect blob), 64 px."""
    return list(synth.images_uint8(n=6, size=64))


def _export(detector: Detector, path: Path, fmt: str = "onnx") -> list[Path]:
    graph = InferenceGraph.from_detector(detector)
    info = default_info(graph, "checkpoint.pth", "0" * 64, {"image_size": SIZE}, None, False)
    return export_graph(graph, path, fmt, info)


# ------------------------------------------------------------------------------ the graph (Python API)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnxruntime_and_openvino_match_the_detector_with_a_memory(name, clip, pictures, tmp_path):
    import onnx

    options, ratio = CONFIGS[name]
    detector = _detector(clip, **options)
    memory = detector.set_reference(pictures[:3], coreset_ratio=ratio)
    memory.chunk = CHUNK
    assert len(memory.banks) >= 2 and all(b.features.shape[0] > CHUNK for b in memory.banks)
    tests = pictures[3:] + pictures[:1]  # new images and one reference (distance 0 to itself without a coreset)
    expected = {b: detector.predict(tests, batch_size=b) for b in (1, 4)}
    zero = Detector(detector.model).predict(tests)
    assert np.abs(expected[1].maps - zero.maps).max() > 1e-3  # the memory changes the maps
    path = tmp_path / "crane.onnx"
    assert _export(detector, path) == [path]
    # the nearest-neighbour search: one MatMul per chunk of CHUNK memory rows, each chunk a constant E x rows
    graph = onnx.load(str(path))
    shapes = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    chunks = sorted((b.features.shape[1], min(CHUNK, b.features.shape[0] - start)) for b in memory.banks
                    for start in range(0, b.features.shape[0], CHUNK))
    searched = sorted(shapes[i] for n in graph.graph.node if n.op_type == "MatMul" for i in n.input
                      if shapes.get(i) in set(chunks))
    assert searched == chunks
    runtimes = [load_model(path, "onnxruntime", "cpu"), load_model(path, "openvino", "cpu")]
    if ratio < 1.0:
        xml = tmp_path / "crane.xml"
        onnx_to_openvino(path, xml)
        runtimes.append(load_model(xml))
    for runtime in runtimes:
        for batch_size in (1, 4):
            got = runtime.predict(tests, batch_size=batch_size)
            np.testing.assert_allclose(got.scores, expected[batch_size].scores, rtol=0, atol=TOL)
            np.testing.assert_allclose(got.maps, expected[batch_size].maps, rtol=0, atol=TOL)


def test_the_graph_searches_with_torch_whatever_the_memory_backend(clip, pictures):
    detector = _detector(clip, **CONFIGS["crane"][0])
    memory = detector.set_reference(pictures[:2])
    memory.backend = "faiss"
    graph = InferenceGraph.from_detector(detector)
    assert graph.memory.backend == "torch" and graph.memory.bank_0 is memory.bank_0  # shared, not copied
    batch = torch.stack([torch.from_numpy(load_model_free_preprocess(p)) for p in pictures[3:]])
    with torch.no_grad():
        scores, maps = graph(batch)
    memory.backend = "torch"
    expected_scores, expected_maps = detector.predict_tensor(batch, smooth=True)
    np.testing.assert_allclose(scores.numpy(), expected_scores.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps.numpy(), expected_maps.numpy(), rtol=0, atol=1e-6)


def load_model_free_preprocess(image: np.ndarray) -> np.ndarray:
    from crane.deploy.image import preprocess

    return preprocess(image, SIZE)


def test_zero_shot_graph_is_unchanged(clip, pictures):
    """No memory: the module is the zero-shot path, bit for bit, and the metadata names no memory."""
    detector = _detector(clip, **CONFIGS["crane"][0])
    detector.set_reference(pictures[:2])
    detector.set_reference(None)
    graph = InferenceGraph.from_detector(detector)
    assert graph.memory is None
    batch = torch.stack([torch.from_numpy(load_model_free_preprocess(p)) for p in pictures[3:]])
    with torch.no_grad():
        scores, maps = graph(batch)
        zero_scores, zero_maps = detector.model(batch, detector.text_features)
    assert torch.equal(scores, zero_scores) and torch.equal(maps, gaussian_smooth(zero_maps, detector.config.sigma))
    info = default_info(graph, "c.pth", "0" * 64, {}, None, False)
    assert info.reference is None and not any("reference" in k for k in info.to_strings())
    assert not [name for name, _ in graph.named_buffers() if "bank" in name]


def test_metadata_records_the_memory(clip, pictures, tmp_path):
    detector = _detector(clip, **CONFIGS["crane"][0])
    memory = detector.set_reference(pictures[:3], few_shot_weight=0.4)
    saved = save_reference(memory, tmp_path / "reference.pt")
    graph = InferenceGraph.from_detector(detector)
    info = default_info(graph, "c.pth", "0" * 64, {}, None, False, saved)
    from crane.deploy.metadata import ExportInfo

    back = ExportInfo.from_strings(info.to_strings())
    record = back.reference
    assert record["references"] == 3 and record["banks"] == 2 and record["rows_per_bank"] == [48, 48]
    assert record["bytes"] == memory.nbytes() == 2 * 48 * 64 * 4 and record["feature_widths"] == [64, 64]
    assert record["coreset_ratio"] == 1.0 and record["few_shot_weight"] == 0.4 and record["patches_per_image"] == 16
    assert [image["digest"] for image in record["images"]] == memory.spec.digests
    assert record["identity"] == file_identity(saved) and record["path"] == str(saved.resolve())
    assert back.reference_summary().startswith("a reference memory of 3 images (2 banks x 48 rows")


def test_budget_arithmetic_and_the_external_data_decision():
    # K = 64 at 518 px: 1,369 patches an image, 87,616 rows of 768 values a bank: 257 MiB each
    assert reference_bytes(64, 1369, [768], 1.0) == 87_616 * 768 * 4
    four = reference_bytes(64, 1369, [768] * 4, 1.0)
    assert four > 2 ** 30  # over the default budget of 1 GiB
    ratio = fitting_ratio(64, 1369, [768] * 4, 2 ** 30)
    assert ratio == 0.99 and reference_bytes(64, 1369, [768] * 4, ratio) <= 2 ** 30
    # rounded down to two significant digits, then lowered while rounding the rows up still exceeds
    assert fitting_ratio(3, 16, [64, 64], 1048) == 0.041  # 1048 / 24576 = 0.0426; 0.042 keeps 3 rows: 1536 bytes
    assert fitting_ratio(3, 16, [64, 64], 10 ** 9) == 1.0 and fitting_ratio(3, 16, [64, 64], 100) is None
    assert external_data(_SINGLE_FILE_LIMIT, Path("g.onnx")) is None
    assert external_data(_SINGLE_FILE_LIMIT + 1, Path("out/g.onnx")) == "g.onnx.data"
    assert external_data(1_300_000_000 + four, Path("g.onnx")) == "g.onnx.data"  # ViT-L weights + a K=64 memory


# ------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, synth_weights, pictures):
    """A checkpoint recording Crane's settings, a folder of three normal images, the CLI's own model with a
    memory of them saved as ``reference.pt``, and a memory built by another model."""
    import open_clip

    from crane.checkpoints import metadata_entry
    from crane.cli import dispatch as cli
    from crane.cli.common import settle
    from crane.detector import build_detector
    from crane.models.clip_loader import load_clip
    from crane.models.prompts import PromptLearner

    root = tmp_path_factory.mktemp("cli")
    clip_path = synth_weights("clip", **TINY_CLIP)
    learner = PromptLearner(load_clip(str(clip_path)).token_embedding, open_clip.get_tokenizer("ViT-L-14-336"))
    checkpoint = root / "run" / "epoch_1.pth"
    checkpoint.parent.mkdir()
    torch.save({"prompt_learner": learner.state_dict(),
                "crane": metadata_entry({"dino_model": "none", "features_list": [2, 4, 6], "soft_mean": True})},
               checkpoint)
    normal, tests = root / "normal", root / "tests"
    normal.mkdir()
    tests.mkdir()
    for i, picture in enumerate(pictures[:3]):
        Image.fromarray(picture).save(normal / f"n{i}.png")
    for i, picture in enumerate(pictures[3:]):
        Image.fromarray(picture).save(tests / f"t{i}.png")
    flags = ["--checkpoint", str(checkpoint), "--clip_weights", str(clip_path), "--image_size", str(SIZE),
             "--dino_model", "none"]
    args = cli.build_parser().parse_args(["export", *flags, "--out", str(root / "x.onnx")])
    state, _ = settle(args)
    args.device = "cpu"
    detector = build_detector(args, state)
    memory = detector.set_reference(sorted(normal.iterdir()))
    reference = save_reference(memory, root / "memory" / "reference.pt")
    other = _detector(load_clip(synth_weights("clip", seed=5, **TINY_CLIP)), **CONFIGS["crane"][0])
    other_file = save_reference(other.set_reference(pictures[:2]), root / "other" / "reference.pt")
    return dict(root=root, flags=flags, detector=detector, reference=reference, other=other_file, normal=normal,
                tests=tests, checkpoint=checkpoint)


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_budget_refusal_is_one_line_naming_a_ratio_before_any_work(cli_setup, tmp_path, capsys, monkeypatch):
    from crane import reference as reference_files
    from crane.cli import dispatch as cli
    from crane.export import writer

    def never(*_args, **_kwargs):
        raise AssertionError("the refusal must come before this")

    monkeypatch.setattr(writer, "export_graph", never)
    monkeypatch.setattr(reference_files, "build_reference", never)
    out = tmp_path / "g.onnx"
    for reference, rebuild in ((cli_setup["normal"], "export with"), (cli_setup["reference"], "build it again")):
        capsys.readouterr()
        status = cli.main(["export", *cli_setup["flags"], "--reference", str(reference), "--max_reference_mb",
                           "0.001", "--out", str(out)])
        errors = _errors(capsys)
        assert status == cli.EXIT_USAGE and len(errors) == 1, errors
        # 3 images x 16 patches, one bank of 64 (E-Attn in every block: the layers are one set): 12,288 bytes;
        # 0.001 MiB = 1,048 bytes: 0.085 keeps ceil(4.08) = 5 rows (1,280 bytes), 0.083 keeps 4 (1,024 bytes)
        assert "is 12,288 bytes of float32 constants (3 images x 16 patches, 1 bank, coreset ratio 1), over " \
               "--max_reference_mb 0.001" in errors[0] and rebuild in errors[0]
        assert "--coreset_ratio 0.083 " in errors[0] and fitting_ratio(3, 16, [64], 1048) == 0.083
    assert not out.exists()
    # the ratio named fits: the memory is built from the folder at that ratio, within the budget
    monkeypatch.undo()
    assert cli.main(["export", *cli_setup["flags"], "--reference", str(cli_setup["normal"]), "--max_reference_mb",
                     "0.001", "--coreset_ratio", "0.083", "--few_shot_weight", "0.3", "--out", str(out),
                     "--no_check"]) == 0
    record = load_model(out).info.reference
    assert record["bytes"] == 4 * 64 * 4 <= 1048 and record["rows_per_bank"] == [4]
    assert record["coreset_ratio"] == 0.083 and record["few_shot_weight"] == 0.3 and record["identity"] is None
    assert sorted(Path(image["source"]).name for image in record["images"]) == ["n0.png", "n1.png", "n2.png"]


def test_refusals_of_memories_that_do_not_fit(cli_setup, tmp_path, capsys):
    from crane.cli import dispatch as cli
    from crane.inspection.thresholds import Thresholds, save_thresholds

    out = tmp_path / "g.onnx"
    named = save_thresholds(Thresholds(0.5, 0.5, {"reference": {"path": "../memory/reference.pt",
                                                                "identity": file_identity(cli_setup["reference"])}}),
                            tmp_path / "t" / "thresholds.json")
    zero = save_thresholds(Thresholds(0.5, 0.5, {}), tmp_path / "z" / "thresholds.json")
    named_copy = tmp_path / "t" / "thresholds.json"
    # the thresholds name ../memory/reference.pt relative to their folder: put a copy of the memory there
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "reference.pt").write_bytes(cli_setup["reference"].read_bytes())
    cases = [
        (["--reference", str(cli_setup["other"])], "was built with other settings: eattn_layers 4, this model 6;"),
        (["--reference", str(cli_setup["other"]), "--thresholds", str(named_copy)],
         f"was calibrated with the reference memory {tmp_path / 't' / '..' / 'memory' / 'reference.pt'}, not "
         f"--reference {cli_setup['other']}"),
        (["--reference", str(cli_setup["normal"]), "--thresholds", str(zero)], "was calibrated zero-shot"),
        (["--reference", str(cli_setup["reference"]), "--coreset_ratio", "0.5"],
         "--coreset_ratio 0.5: it sets how a memory is built from images"),
        (["--reference", str(tmp_path / "missing")], "no such file or folder"),
    ]
    assert named is not None
    for extra, message in cases:
        capsys.readouterr()
        status = cli.main(["export", *cli_setup["flags"], *extra, "--out", str(out), "--no_check"])
        errors = _errors(capsys)
        assert status == cli.EXIT_USAGE and len(errors) == 1 and message in errors[0], (extra, errors)
    assert not out.exists()


def test_export_with_the_memory_the_thresholds_name_then_predict(cli_setup, tmp_path, capsys):
    """No --reference: the thresholds.json beside the checkpoint names reference.pt, so the graph holds it; predict
    --backend onnxruntime says so first and gives the torch detector's scores with that memory."""
    from crane.cli import dispatch as cli
    from crane.inspection.thresholds import Thresholds, save_thresholds

    beside = cli_setup["checkpoint"].parent / "thresholds.json"
    save_thresholds(Thresholds(0.5, None, {"reference": {"path": "../memory/reference.pt",
                                                         "identity": file_identity(cli_setup["reference"])}}), beside)
    try:
        out = tmp_path / "graph" / "crane.onnx"
        capsys.readouterr()
        assert cli.main(["export", *cli_setup["flags"], "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert f"few-shot: exporting the reference memory {beside.parent / '..' / 'memory' / 'reference.pt'}" in err
        assert "the graph holds a reference memory of 3 images (1 bank x 48 rows" in err
    finally:
        beside.unlink()
    model = load_model(out)
    assert model.info.reference["identity"] == file_identity(cli_setup["reference"])
    assert model.info.image_threshold == 0.5 and model.info.thresholds["reference"]["identity"] == \
        model.info.reference["identity"]
    result = tmp_path / "predicted"
    assert cli.main(["predict", str(cli_setup["tests"]), "--out", str(result), "--backend", "onnxruntime",
                     "--model", str(out), "--no_panels"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].startswith("few-shot: the graph holds a reference memory of 3 images"), lines[:3]
    with open(result / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    paths = sorted(cli_setup["tests"].iterdir())
    assert [Path(r["path"]).name for r in rows] == [p.name for p in paths]
    expected = cli_setup["detector"].predict(paths)
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected.scores, rtol=0, atol=TOL)
    np.testing.assert_allclose(model.predict(paths).maps, expected.maps, rtol=0, atol=TOL)
