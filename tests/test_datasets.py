"""Dataset generators (every layout of datasets.md), CraneDataset and the synthetic demo data."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
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

Counts = dict[str, tuple[int, int, int, int]]  # class -> train normal, test normal, test anomalous, with masks


def img(path: Path, mode: str = "RGB", size: int = 16, value: int = 100) -> Path:
    """Write a small image; ``mode`` RGB, L, RGBA, P or I;16 (16-bit grayscale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = (np.arange(size * size).reshape(size, size) * 7 + value) % 256
    if mode == "I;16":
        image = Image.fromarray((ramp * 257).astype(np.uint16))
    elif mode == "L":
        image = Image.fromarray(ramp.astype(np.uint8))
    else:
        image = Image.fromarray(np.stack([ramp, 255 - ramp, np.full_like(ramp, value)], axis=2).astype(np.uint8))
        image = image.convert(mode) if mode != "P" else image.quantize(8)
    image.save(path)
    return path


def mask(path: Path, box: tuple[int, int, int, int] = (2, 2, 8, 8), size: int = 16) -> Path:
    """Write a binary mask with one white rectangle ``(x0, y0, x1, y1)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), np.uint8)
    arr[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(arr).save(path)
    return path


def counts(meta: dict) -> Counts:
    out = {}
    for cls_name in meta["test"]:
        train, test = meta["train"].get(cls_name, []), meta["test"][cls_name]
        out[cls_name] = (sum(s["anomaly"] == 0 for s in train), sum(s["anomaly"] == 0 for s in test),
                         sum(s["anomaly"] == 1 for s in test), sum(bool(s["mask_path"]) for s in test))
    return out


def by_image(meta: dict, split: str = "test") -> dict[str, dict]:
    return {s["img_path"]: s for samples in meta[split].values() for s in samples}


# ---- one fake tree per layout, as the archive unpacks -------------------------------------------------------------

def build_mvtec(r: Path) -> Counts:
    img(r / "bottle/train/good/000.png")
    img(r / "bottle/train/good/001.png")
    img(r / "bottle/test/good/000.png", "L")
    # image order 000, 000_1 but mask order 000_1_mask, 000_mask: pairing by position would cross them
    img(r / "bottle/test/broken/000.png")
    img(r / "bottle/test/broken/000_1.png")
    mask(r / "bottle/ground_truth/broken/000_mask.png", (0, 0, 4, 4))
    mask(r / "bottle/ground_truth/broken/000_1_mask.png", (8, 8, 16, 16))
    img(r / "carpet/train/good/000.png", "RGBA")
    img(r / "carpet/test/good/000.png", "P")
    img(r / "carpet/test/hole/000.png", "I;16")
    mask(r / "carpet/ground_truth/hole/000_mask.png")
    (r / "license.txt").write_text("CC BY-NC-SA 4.0")
    (r / "carpet/test/good/.DS_Store").write_bytes(b"\0")
    return {"bottle": (2, 1, 2, 2), "carpet": (1, 1, 1, 1)}


def build_mpdd(r: Path) -> Counts:
    img(r / "tubes/train/good/000.png")
    img(r / "tubes/test/good/000.png")
    img(r / "tubes/test/anomalous/000.png")
    mask(r / "tubes/ground_truth/anomalous/000_mask.png")
    return {"tubes": (1, 1, 1, 1)}


def build_btad(r: Path) -> Counts:
    img(r / "01/train/ok/0000.bmp")
    img(r / "01/test/ok/0000.bmp")
    img(r / "01/test/ko/0000.bmp")
    img(r / "01/test/ko/0001.bmp")
    mask(r / "01/ground_truth/ko/0000.png")
    mask(r / "01/ground_truth/ko/0001.png")
    img(r / "03/train/ok/0000.bmp", "L")
    img(r / "03/test/ok/0000.bmp")
    img(r / "03/test/ko/0000.bmp")
    mask(r / "03/ground_truth/ko/0000.bmp")
    return {"01": (1, 1, 2, 2), "03": (1, 1, 1, 1)}


def build_sdd(r: Path) -> Counts:
    c = r / "electrical commutators"
    img(c / "train/good/kos01_Part0.png")
    img(c / "test/good/kos02_Part1.png")
    img(c / "test/defect/kos03_Part5.png")
    mask(c / "ground_truth/defect/kos03_Part5_mask.png")
    return {"electrical commutators": (1, 1, 1, 1)}


def build_dtd(r: Path) -> Counts:
    img(r / "Woven_001/train/good/000.png")
    img(r / "Woven_001/test/good/000.png")
    img(r / "Woven_001/test/bad/000.png")
    mask(r / "Woven_001/ground_truth/bad/000_mask.png")
    return {"Woven_001": (1, 1, 1, 1)}


def build_visa(r: Path) -> Counts:
    for name in ("0000", "0001"):
        img(r / f"candle/Data/Images/Normal/{name}.JPG")
    for name in ("000", "001"):
        img(r / f"candle/Data/Images/Anomaly/{name}.JPG")
        mask(r / f"candle/Data/Masks/Anomaly/{name}.png")
    img(r / "pcb1/Data/Images/Normal/0000.JPG")
    img(r / "pcb1/Data/Images/Anomaly/000.JPG")
    mask(r / "pcb1/Data/Masks/Anomaly/000.png")
    rows = [  # not in path order: pairing comes from each row
        "candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,candle/Data/Masks/Anomaly/001.png",
        "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png",
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
        "pcb1,test,normal,pcb1/Data/Images/Normal/0000.JPG,",
    ]
    (r / "split_csv").mkdir(parents=True)
    (r / "split_csv/1cls.csv").write_text("object,split,label,image,mask\n" + "\n".join(rows) + "\n")
    return {"candle": (1, 1, 2, 2), "pcb1": (0, 1, 1, 1)}


def build_dagm(r: Path) -> Counts:
    img(r / "Class1/Train/0001.PNG", "L")
    img(r / "Class1/Train/0002.PNG", "L")
    mask(r / "Class1/Train/Label/0002_label.PNG")
    (r / "Class1/Train/Label/Labels.txt").write_text("1\n")
    for name in ("0001", "0002", "0003"):
        img(r / f"Class1/Test/{name}.PNG", "L")
    mask(r / "Class1/Test/Label/0003_label.PNG")
    img(r / "Class10/Test/0001.PNG", "L")
    mask(r / "Class10/Test/Label/0001_label.PNG")
    img(r / "Class1_def/1.png", "L")  # defect-only folder of the development set: not a class
    return {"Class1": (1, 2, 1, 1), "Class10": (0, 0, 1, 1)}


def build_headct(r: Path) -> Counts:
    img(r / "brain/test/good/000.png", "L")
    img(r / "brain/test/good/001.png", "L")
    img(r / "brain/test/anomaly/100.png", "L")
    return {"brain": (0, 2, 1, 0)}


def build_brainmri(r: Path) -> Counts:
    img(r / "brain_tumor_dataset/no/no 1.jpg")
    img(r / "brain_tumor_dataset/yes/Y1.JPG")
    img(r / "brain_tumor_dataset/yes/Y2.jpg", "L")
    return {"brain": (0, 1, 2, 0)}


def build_br35h(r: Path) -> Counts:
    img(r / "brain/no/no0.jpg")
    img(r / "brain/yes/y0.jpg")
    img(r / "brain/pred/pred0.jpg")  # unlabelled, not read
    return {"brain": (0, 1, 1, 0)}


def build_isic(r: Path) -> Counts:
    img(r / "skin/test/defect/ISIC_0000000.jpg")
    img(r / "skin/test/defect/ISIC_0000001.jpg")
    mask(r / "skin/ground_truth/ISIC_0000000_Segmentation.png")
    mask(r / "skin/ground_truth/ISIC_0000001_Segmentation.png")
    return {"skin": (0, 0, 2, 2)}


def build_tn3k(r: Path) -> Counts:
    for name in ("0000", "0001"):
        img(r / f"test-image/{name}.jpg", "L")
        mask(r / f"test-mask/{name}.jpg")
    img(r / "trainval-image/0002.jpg")  # not read
    return {"thyroid": (0, 0, 2, 2)}


def build_cvc_colondb(r: Path) -> Counts:
    for name in ("1", "2", "10"):
        img(r / f"images/{name}.png")
        mask(r / f"masks/{name}.png")
    return {"colon": (0, 0, 3, 3)}


def build_cvc_clinicdb(r: Path) -> Counts:
    img(r / "images/1.tif")
    mask(r / "masks/1.tif")
    return {"colon": (0, 0, 1, 1)}


def build_custom(r: Path) -> Counts:
    img(r / "train/widget/good/a.png")
    img(r / "test/widget/good/c.png", "I;16")
    img(r / "test/widget/crack/c.png")  # same stem as a normal image: no conflict
    img(r / "test/widget/dent/d.jpg")  # no mask: image metrics only
    mask(r / "test/widget/masks/c_mask.png")
    img(r / "test/gadget/good/x.png")
    img(r / "test/gadget/scratch/x.png")
    img(r / "test/gadget/stain/x.png")  # same stem in two defect types: masks in per-type folders
    mask(r / "test/gadget/masks/scratch/x_mask.png", (0, 0, 4, 4))
    mask(r / "test/gadget/masks/stain/x_mask.png", (8, 8, 16, 16))
    return {"widget": (1, 1, 2, 1), "gadget": (0, 1, 2, 2)}


BUILDERS: dict[str, Callable[[Path], Counts]] = {
    "mvtec": build_mvtec, "visa": build_visa, "mpdd": build_mpdd, "btad": build_btad, "sdd": build_sdd,
    "dtd": build_dtd, "dagm": build_dagm, "headct": build_headct, "brainmri": build_brainmri, "br35h": build_br35h,
    "isic": build_isic, "tn3k": build_tn3k, "cvc-colondb": build_cvc_colondb, "cvc-clinicdb": build_cvc_clinicdb,
    "custom": build_custom,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_generator_counts_and_pairing(name: str, tmp_path: Path) -> None:
    expected = BUILDERS[name](tmp_path)
    meta = generate(name, tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert counts(meta) == expected
    assert list(meta["test"]) == sorted(expected)
    assert not list(tmp_path.glob(".meta.*"))  # no temporary file left behind
    for split in ("train", "test"):
        for cls_name, samples in meta[split].items():
            assert [s["img_path"] for s in samples] == sorted(s["img_path"] for s in samples)
            for s in samples:
                assert s["cls_name"] == cls_name and s["anomaly"] in (0, 1)
                assert "\\" not in s["img_path"] and (tmp_path / s["img_path"]).is_file()
                assert s["specie_name"] == "good" if s["anomaly"] == 0 else s["specie_name"] not in ("", "good")
                if s["mask_path"]:
                    assert s["anomaly"] == 1
                    assert Path(s["mask_path"]).stem.lower().startswith(Path(s["img_path"]).stem.lower())


def test_mvtec_pairs_masks_by_name_not_position(tmp_path: Path) -> None:
    build_mvtec(tmp_path)
    samples = by_image(generate("mvtec", tmp_path))
    assert samples["bottle/test/broken/000.png"]["mask_path"] == "bottle/ground_truth/broken/000_mask.png"
    assert samples["bottle/test/broken/000_1.png"]["mask_path"] == "bottle/ground_truth/broken/000_1_mask.png"
    assert samples["bottle/test/broken/000_1.png"]["specie_name"] == "broken"
    ds = CraneDataset(tmp_path, image_size=16, classes="bottle")
    items = {ds[i]["img_path"]: ds[i]["img_mask"] for i in range(len(ds))}
    assert items["bottle/test/broken/000.png"][0, 0] == 1 and items["bottle/test/broken/000.png"][15, 15] == 0
    assert items["bottle/test/broken/000_1.png"][15, 15] == 1 and items["bottle/test/broken/000_1.png"][0, 0] == 0


def test_other_pairings(tmp_path: Path) -> None:
    build_btad(tmp_path / "btad")
    btad = by_image(generate("btad", tmp_path / "btad"))
    assert btad["01/test/ko/0001.bmp"]["mask_path"] == "01/ground_truth/ko/0001.png"
    assert btad["03/test/ok/0000.bmp"]["specie_name"] == "good"
    build_visa(tmp_path / "visa")
    visa = generate("visa", tmp_path / "visa")
    assert by_image(visa)["candle/Data/Images/Anomaly/001.JPG"]["mask_path"] == "candle/Data/Masks/Anomaly/001.png"
    assert [s["img_path"] for s in visa["train"]["candle"]] == ["candle/Data/Images/Normal/0000.JPG"]
    build_dagm(tmp_path / "dagm")
    dagm = generate("dagm", tmp_path / "dagm")
    assert by_image(dagm)["Class1/Test/0003.PNG"]["mask_path"] == "Class1/Test/Label/0003_label.PNG"
    assert [s["img_path"] for s in dagm["train"]["Class1"]] == ["Class1/Train/0001.PNG"]
    build_custom(tmp_path / "custom")
    custom = by_image(generate("custom", tmp_path / "custom"))
    assert custom["test/gadget/stain/x.png"]["mask_path"] == "test/gadget/masks/stain/x_mask.png"
    assert custom["test/widget/crack/c.png"]["mask_path"] == "test/widget/masks/c_mask.png"
    assert custom["test/widget/dent/d.jpg"]["mask_path"] == "" and custom["test/widget/dent/d.jpg"]["anomaly"] == 1
    assert custom["test/widget/good/c.png"]["mask_path"] == ""


# ---- generator errors -------------------------------------------------------------------------------------------

def _fails(name: str, root: Path, *needles: str) -> str:
    with pytest.raises(DatasetError) as info:
        generate(name, root)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_missing_mask_names_the_file(tmp_path: Path) -> None:
    build_mvtec(tmp_path)
    (tmp_path / "bottle/ground_truth/broken/000_1_mask.png").unlink()
    _fails("mvtec", tmp_path, "bottle/test/broken/000_1.png", "bottle/ground_truth/broken/000_1_mask.png")
    assert not (tmp_path / "meta.json").exists()


def test_cli_reports_one_line_and_keeps_old_meta(tmp_path: Path) -> None:
    build_mvtec(tmp_path)
    generate("mvtec", tmp_path)
    before = (tmp_path / "meta.json").read_bytes()
    (tmp_path / "carpet/ground_truth/hole/000_mask.png").unlink()
    bad = subprocess.run([sys.executable, "-m", "datasets.generate", "mvtec", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "carpet/test/hole/000.png" in bad.stderr
    assert (tmp_path / "meta.json").read_bytes() == before


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_dtd(tmp_path)
    assert main(["dtd", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train normal" in out and "Woven_001" in out and "total" in out
    assert main(["dtd", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="unknown dataset"):
        generate("imagenet", tmp_path)


def test_corrupt_files_are_named(tmp_path: Path) -> None:
    build_mvtec(tmp_path)
    good = tmp_path / "bottle/test/good/000.png"
    good.write_bytes(b"not an image at all")
    _fails("mvtec", tmp_path, "unreadable image", "bottle/test/good/000.png")
    img(good)
    data = (tmp_path / "bottle/train/good/001.png").read_bytes()
    (tmp_path / "bottle/train/good/001.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    _fails("mvtec", tmp_path, "bottle/train/good/001.png")
    img(tmp_path / "bottle/train/good/001.png")
    (tmp_path / "carpet/ground_truth/hole/000_mask.png").write_bytes(b"\x89PNG garbage")
    _fails("mvtec", tmp_path, "unreadable mask", "carpet/ground_truth/hole/000_mask.png")


def test_layout_errors(tmp_path: Path) -> None:
    build_mvtec(tmp_path / "mvtec")
    (tmp_path / "mvtec/empty/test/good").mkdir(parents=True)
    _fails("mvtec", tmp_path / "mvtec", "empty/test")
    _fails("mvtec", tmp_path / "mvtec/bottle/test", "no class folder")

    build_dagm(tmp_path / "dagm")
    mask(tmp_path / "dagm/Class1/Test/Label/0009_label.PNG")
    _fails("dagm", tmp_path / "dagm", "Class1/Test/Label/0009_label.PNG")

    build_visa(tmp_path / "visa")
    csv = tmp_path / "visa/split_csv/1cls.csv"
    csv.write_text(csv.read_text().replace("Anomaly/001.png", "Anomaly/000.png", 1))
    _fails("visa", tmp_path / "visa", "1cls.csv line 2", "does not match")
    csv.write_text("object,split,image\n")
    _fails("visa", tmp_path / "visa", "label, mask")

    build_custom(tmp_path / "custom")
    mask(tmp_path / "custom/test/widget/masks/d-mask.png")  # misspelt
    _fails("custom", tmp_path / "custom", "test/widget/masks/d-mask.png")
    (tmp_path / "custom/test/widget/masks/d-mask.png").unlink()
    mask(tmp_path / "custom/test/gadget/masks/x_mask.png")
    (tmp_path / "custom/test/gadget/masks/stain/x_mask.png").unlink()
    img(tmp_path / "custom/test/gadget/dent/x.png")
    _fails("custom", tmp_path / "custom", "matches both")

    build_tn3k(tmp_path / "tn3k")
    (tmp_path / "tn3k/test-mask/0001.jpg").unlink()
    _fails("tn3k", tmp_path / "tn3k", "test-image/0001.jpg", "test-mask/0001.png")
    _fails("br35h", tmp_path / "tn3k", "brain/no")


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
    build_cvc_colondb(tmp_path)
    generate("cvc-colondb", tmp_path)
    (tmp_path / "masks/2.png").unlink()
    with pytest.raises(DatasetError, match=r"mask file not found: .*masks/2\.png"):
        CraneDataset(tmp_path)
    mask(tmp_path / "masks/2.png")
    (tmp_path / "images/10.png").write_bytes(b"broken")
    ds = CraneDataset(tmp_path, image_size=16)  # existence is checked on construction, decoding on load
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
    assert synthetic_main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert synthetic_main([*args, "--overwrite", "--test-anomalous", "1"]) == 0
    assert counts(json.loads((tmp_path / "meta.json").read_text())) == {"stripes": (0, 1, 1, 1)}
