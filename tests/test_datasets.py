"""The dataset tools end to end (generator CLI, meta.json into CraneDataset, synthetic demo data) and CraneDataset.

Every archive layout is in ``test_dataset_layouts.py``, every kind of damage in
``test_dataset_damage.py``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the dataset tools are a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from crane.data import CraneDataset, DatasetError, ImageReadError  # noqa: E402
from datasets.generate import generate, main  # noqa: E402
from datasets.synthetic import make_synthetic_dataset  # noqa: E402
from tests.test_dataset_layouts import build_colondb, build_dtd, build_mvtec, img, mask  # noqa: E402

Counts = dict[str, tuple[int, int, int, int]]  # class -> train normal, test normal, test anomalous, with masks


def counts(meta: dict) -> Counts:
    out = {}
    for cls_name in meta["test"]:
        train, test = meta["train"].get(cls_name, []), meta["test"][cls_name]
        out[cls_name] = (sum(s["anomaly"] == 0 for s in train), sum(s["anomaly"] == 0 for s in test),
                         sum(s["anomaly"] == 1 for s in test), sum(bool(s["mask_path"]) for s in test))
    return out


def box_mask(path: Path, box: tuple[int, int, int, int]) -> Path:
    """An 8x8 mask with one white rectangle ``(x0, y0, x1, y1)``."""
    arr = np.zeros((8, 8), np.uint8)
    arr[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(arr).save(path)
    return path


# ---- generator, end to end --------------------------------------------------------------------------------------

def test_pairs_by_name_into_crane_dataset(tmp_path: Path) -> None:
    """Images 1, 10, 2 against masks 10_mask, 1_mask, 2_mask: each image gets its own mask's pixels."""
    build_mvtec(tmp_path)
    gt = tmp_path / "bottle/ground_truth/broken"
    box_mask(gt / "1_mask.png", (0, 0, 2, 2))
    box_mask(gt / "10_mask.png", (6, 6, 8, 8))
    box_mask(gt / "2_mask.png", (0, 6, 2, 8))
    generate("mvtec", tmp_path)
    ds = CraneDataset(tmp_path, image_size=8, classes="bottle")
    items = {ds[i]["img_path"]: ds[i]["img_mask"] for i in range(len(ds))}
    assert items["bottle/test/broken/1.png"][0, 0] == 1 and items["bottle/test/broken/1.png"].sum() == 4
    assert items["bottle/test/broken/10.png"][7, 7] == 1 and items["bottle/test/broken/10.png"].sum() == 4
    assert items["bottle/test/broken/2.png"][7, 0] == 1 and items["bottle/test/broken/2.png"].sum() == 4
    assert items["bottle/test/good/000.png"].sum() == 0
    assert ds.classes == ["bottle"]
    assert CraneDataset(tmp_path, image_size=8).classes[:3] == ["bottle", "cable", "capsule"]


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_dtd(tmp_path)
    assert main(["dtd", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dtd: layout DTD-Synthetic archive" in out and "total" in out and "wrote" in out
    lines = out.splitlines()
    table = [line.split()[0] for line in lines if line.startswith(("Woven", "Stratified", "Blotchy"))]
    assert table[:4] == ["Woven_001", "Woven_127", "Woven_104", "Stratified_154"]  # published order
    assert main(["dtd", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["imagenet", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown dataset 'imagenet'; use one of mvtec visa" in err


def test_cli_one_line_error_exit_2_and_old_meta_kept(tmp_path: Path) -> None:
    build_mvtec(tmp_path)
    generate("mvtec", tmp_path)
    before = (tmp_path / "meta.json").read_bytes()
    data = (tmp_path / "carpet/test/broken/10.png").read_bytes()
    (tmp_path / "carpet/test/broken/10.png").write_bytes(data[: len(data) - 3])
    bad = subprocess.run([sys.executable, "-m", "datasets.generate", "mvtec", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "unreadable image carpet/test/broken/10.png" in bad.stderr
    assert (tmp_path / "meta.json").read_bytes() == before
    assert not list(tmp_path.glob(".meta.*"))


# ---- CraneDataset -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), classes=3, train=3, test_normal=3,
                                  test_anomalous=4, size=32, seed=1)


def test_dataset_items(synthetic: Path) -> None:
    ds = CraneDataset(synthetic, image_size=24)
    assert ds.classes == ["blotches", "grid", "stripes"] and len(ds) == 3 * 7
    for i in range(len(ds)):
        item = ds[i]
        assert item["img"].shape == (3, 24, 24) and item["img"].dtype == torch.float32
        assert item["img_mask"].shape == (24, 24) and item["img_mask"].dtype == torch.float32
        assert set(item["img_mask"].unique().tolist()) <= {0.0, 1.0}
        assert isinstance(item["anomaly"], int) and isinstance(item["has_mask"], bool)
        assert item["has_mask"] == bool(item["anomaly"]) == (item["img_mask"].sum() > 0)
        assert item["img_path"].startswith(f"test/{item['cls_name']}/") and not Path(item["img_path"]).is_absolute()
        assert item["specie_name"] in ("good", "scratch", "blob", "crack")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["img"].shape == (4, 3, 24, 24)
    train = CraneDataset(synthetic, split="train", image_size=24, classes=["grid"])
    assert len(train) == 3 and train.classes == ["grid"] and all(train[i]["anomaly"] == 0 for i in range(3))


def test_dataset_k_shot_and_portion(synthetic: Path) -> None:
    def paths(**kw: object) -> list[str]:
        return [s["img_path"] for s in CraneDataset(synthetic, image_size=16, **kw).samples]

    two = paths(k_shot=2, seed=5)
    assert len(two) == 6 and two == paths(k_shot=2, seed=5)
    assert paths(k_shot=2, seed=5, classes="grid") == [p for p in two if "/grid/" in p]
    assert any(paths(k_shot=2, seed=s) != two for s in range(6, 12))
    assert len(paths(k_shot=100)) == 21
    half = paths(portion=0.5)
    assert len(half) == 3 * 4 and set(half) <= set(paths())
    assert len(paths(portion=0.01)) == 3
    with pytest.raises(DatasetError, match="portion"):
        CraneDataset(synthetic, portion=0.0)


def test_dataset_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="datasets.generate"):
        CraneDataset(tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text('{"train": {}, "test": {')
    with pytest.raises(DatasetError, match="malformed JSON"):
        CraneDataset(tmp_path)
    meta.write_text('{"test": {}}')
    with pytest.raises(DatasetError, match="'train' and 'test'"):
        CraneDataset(tmp_path)
    good = {"img_path": "a.png", "mask_path": "", "cls_name": "a", "specie_name": "good", "anomaly": 0}
    meta.write_text(json.dumps({"train": {}, "test": {"a": [{k: v for k, v in good.items() if k != "anomaly"}]}}))
    with pytest.raises(DatasetError, match=r"test/a\[0\] lacks the key 'anomaly'"):
        CraneDataset(tmp_path)
    meta.write_text(json.dumps({"train": {}, "test": {"a": [good], "b": []}}))
    img(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="class 'b' has no samples"):
        CraneDataset(tmp_path)
    with pytest.raises(DatasetError, match="unknown class 'zz'.*available: a, b"):
        CraneDataset(tmp_path, classes=["a", "zz"])
    assert len(CraneDataset(tmp_path, classes="a")) == 1
    with pytest.raises(DatasetError, match="no training images"):
        CraneDataset(tmp_path, split="train")


def test_dataset_missing_and_corrupt_files(tmp_path: Path) -> None:
    build_colondb(tmp_path)
    generate("cvc-colondb", tmp_path)
    (tmp_path / "masks/2.png").unlink()
    with pytest.raises(DatasetError, match=r"mask file not found: .*masks/2\.png"):
        CraneDataset(tmp_path)
    mask(tmp_path / "masks/2.png")
    (tmp_path / "images/10.png").write_bytes(b"broken")
    ds = CraneDataset(tmp_path, image_size=8)  # existence is checked on construction, decoding on load
    with pytest.raises(DatasetError, match=r"unreadable image .*images/10\.png"):
        ds.validate(decode=True)
    index = [s["img_path"] for s in ds.samples].index("images/10.png")
    with pytest.raises(ImageReadError, match=r"images/10\.png"):
        ds[index]


# ---- synthetic data ---------------------------------------------------------------------------------------------

def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = _files(make_synthetic_dataset(tmp_path / "a", seed=3, size=32))
    b = _files(make_synthetic_dataset(tmp_path / "b", seed=3, size=32))
    c = _files(make_synthetic_dataset(tmp_path / "c", seed=4, size=32))
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert sum(k.endswith(".png") for k in a) == 2 * (4 + 4 + 4 + 4)


def test_synthetic_masks_and_layout(synthetic: Path) -> None:
    meta = json.loads((synthetic / "meta.json").read_text())
    assert counts(meta) == {c: (3, 3, 4, 4) for c in ("blotches", "grid", "stripes")}
    for s in (s for samples in meta["test"].values() for s in samples if s["anomaly"]):
        area = (np.asarray(Image.open(synthetic / s["mask_path"])) > 0).mean()
        assert 0 < area < 0.5
        assert s["specie_name"] in ("scratch", "blob", "crack")
    with pytest.raises(DatasetError, match="not empty"):
        make_synthetic_dataset(synthetic)


def test_synthetic_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from datasets.synthetic import main as synthetic_main

    args = [str(tmp_path), "--classes", "1", "--train", "0", "--test-normal", "1", "--test-anomalous", "2",
            "--size", "16"]
    assert synthetic_main(args) == 0
    assert "stripes" in capsys.readouterr().out
    assert synthetic_main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert synthetic_main([*args, "--overwrite", "--test-anomalous", "1"]) == 0
    assert counts(json.loads((tmp_path / "meta.json").read_text())) == {"stripes": (0, 1, 1, 1)}
