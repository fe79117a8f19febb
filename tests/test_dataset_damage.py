"""Every kind of damage to a downloaded dataset gives one error line naming the file and exit status 2.

The fake archives are those of ``test_dataset_layouts.py``; each test damages
one and checks the generator's command line: status 2, nothing on stdout, one
line on stderr with the documented location and the real extension, and no
``meta.json`` written.
"""
from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from crane.data.decode import Damaged, check_image, check_mask, quiet  # noqa: E402
from datasets.generate import main  # noqa: E402
from tests.test_dataset_layouts import (  # noqa: E402
    adaclip,
    build_br35h_kaggle,
    build_btad,
    build_clinicdb_distributed,
    build_custom,
    build_dagm,
    build_headct_distributed,
    build_isic_distributed,
    build_isic_tree,
    build_mvtec,
    build_sdd_raw,
    build_tn3k,
    build_visa_csv,
    build_visa_pytorch,
    build_visa_pytorch_csv,
    img,
)


def fails(capsys: pytest.CaptureFixture[str], key: str, root: Path, *needles: str, args: tuple[str, ...] = ()) -> str:
    """Run the generator's command line; it must fail with one line holding every needle and write nothing."""
    before = (root / "meta.json").read_bytes() if (root / "meta.json").exists() else None
    assert main([key, str(root), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    after = (root / "meta.json").read_bytes() if (root / "meta.json").exists() else None
    assert after == before and not list(root.glob(".meta.*"))
    return lines[0]


def cut(path: Path, keep: str) -> None:
    """Truncate ``path``: to half its size, or by its last byte."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if keep == "half" else data[:-1])


# ---- truncated files of every format ----------------------------------------------------------------------------

TRUNCATED = {  # format and role: (key, builder, file, what the message calls it)
    "jpeg-image": ("br35h", build_br35h_kaggle, "yes/y10.jpg", "image"),
    "jpeg-mask": ("tn3k", build_tn3k, "test-mask/0010.jpg", "mask"),
    "png-image": ("mvtec", build_mvtec, "cable/test/broken/10.png", "image"),
    "png-mask": ("isic", build_isic_distributed,
                 "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000012_Segmentation.png", "mask"),
    "bmp-image": ("btad", build_btad, "BTech_Dataset_transformed/01/test/ko/10.bmp", "image"),
    "bmp-mask": ("sdd", build_sdd_raw, "kos01/Part5_label.bmp", "mask"),
    "tiff-image": ("cvc-clinicdb", build_clinicdb_distributed, "Original/100.tif", "image"),
    "tiff-mask": ("cvc-clinicdb", build_clinicdb_distributed, "Ground Truth/2.tif", "mask"),
}


@pytest.mark.parametrize("keep", ["half", "all but the last byte"])
@pytest.mark.parametrize("case", sorted(TRUNCATED))
def test_truncated_file(case: str, keep: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, build, rel, kind = TRUNCATED[case]
    build(tmp_path)
    cut(tmp_path / rel, keep)
    fails(capsys, key, tmp_path, f"unreadable {kind} {rel}", "replace it with an intact copy")


def _encoded(fmt: str, mode: str, **options: object) -> bytes:
    ramp = (np.arange(64).reshape(8, 8) * 37 % 256).astype(np.uint8)
    if mode == "I;16":
        image = Image.fromarray(ramp.astype(np.uint16) * 257)
    else:
        image = Image.fromarray(np.stack([ramp, 255 - ramp, ramp // 2], axis=2)).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


FORMATS = [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("BMP", {}), ("TIFF", {}),
           ("TIFF", {"compression": "tiff_lzw"}), ("TIFF", {"compression": "packbits"})]


CUT_CASES = [(f, o, m) for f, o in FORMATS for m in ("RGB", "L", "P", "I;16")
             if (f, m) != ("JPEG", "P") and (m != "I;16" or f in ("PNG", "TIFF"))]


@pytest.mark.parametrize(("fmt", "options", "mode"), CUT_CASES)
def test_every_cut_is_detected(fmt: str, options: dict, mode: str, tmp_path: Path) -> None:
    """Cut anywhere (every cut near either end, and spread over the middle), a file never passes."""
    data = _encoded(fmt, mode, **options)
    path = tmp_path / "x"
    path.write_bytes(data)
    assert check_image(path) == (8, 8) and check_mask(path) == (8, 8)
    n = len(data)
    for size in sorted({*range(min(n, 16)), *range(max(0, n - 16), n), *np.linspace(0, n - 1, 16).astype(int)}):
        path.write_bytes(data[:size])
        for check in (check_image, check_mask):
            with quiet(), pytest.raises(Damaged):
                check(path)


def test_empty_and_fake_image_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_mvtec(tmp_path)
    (tmp_path / "bottle/test/good/000.png").write_bytes(b"")
    fails(capsys, "mvtec", tmp_path, "unreadable image bottle/test/good/000.png (empty file)")
    img(tmp_path / "bottle/test/good/000.png")
    (tmp_path / "bottle/train/good/001.png").write_text("not an image at all")
    fails(capsys, "mvtec", tmp_path, "unreadable image bottle/train/good/001.png", "not an image")


# ---- missing masks name the documented place and the real extension ---------------------------------------------

MISSING_MASK: dict[str, tuple[str, Callable[[Path], object], str, str]] = {
    "mvtec": ("mvtec", build_mvtec, "bottle/ground_truth/broken/10_mask.png", "bottle/test/broken/10.png"),
    "btad-bmp-masks": ("btad", build_btad, "BTech_Dataset_transformed/03/ground_truth/ko/10.bmp",
                       "BTech_Dataset_transformed/03/test/ko/10.bmp"),
    "isic-distributed": ("isic", build_isic_distributed,
                         "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000012_Segmentation.png",
                         "ISBI2016_ISIC_Part1_Test_Data/ISIC_0000012.jpg"),
    "isic-tree": ("isic", build_isic_tree, "skin/ground_truth/ISIC_0000012_Segmentation.png",
                  "skin/test/defect/ISIC_0000012.jpg"),
    "tn3k": ("tn3k", build_tn3k, "test-mask/0010.jpg", "test-image/0010.jpg"),
    "clinicdb": ("cvc-clinicdb", build_clinicdb_distributed, "Ground Truth/10.tif", "Original/10.tif"),
    "visa-pytorch": ("visa", build_visa_pytorch, "1cls/candle/ground_truth/bad/010.png",
                     "1cls/candle/test/bad/010.JPG"),
    "sdd-raw": ("sdd", build_sdd_raw, "kos01/Part5_label.bmp", "kos01/Part5.jpg"),
}


@pytest.mark.parametrize("case", sorted(MISSING_MASK))
def test_missing_mask(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, build, mask_rel, image_rel = MISSING_MASK[case]
    build(tmp_path)
    (tmp_path / mask_rel).unlink()
    fails(capsys, key, tmp_path, image_rel, f"expected {mask_rel}")


def test_missing_mask_file_listed_by_visa_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_visa_csv(tmp_path)
    (tmp_path / "pcb2/Data/Masks/Anomaly/001.png").unlink()
    fails(capsys, "visa", tmp_path, "mask file not found: pcb2/Data/Masks/Anomaly/001.png")


def test_orphan_masks_mean_missing_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_mvtec(tmp_path / "mvtec")
    (tmp_path / "mvtec/tile/test/broken/2.png").unlink()
    fails(capsys, "mvtec", tmp_path / "mvtec", "mask tile/ground_truth/broken/2_mask.png matches no image")
    build_tn3k(tmp_path / "tn3k")
    (tmp_path / "tn3k/test-image/0002.jpg").unlink()
    fails(capsys, "tn3k", tmp_path / "tn3k", "mask test-mask/0002.jpg matches no image")
    build_mvtec(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone/wood/test/broken_b")
    fails(capsys, "mvtec", tmp_path / "gone", "wood/ground_truth/broken_b/", "wood/test/broken_b/ is missing")


# ---- missing or empty classes and folders -----------------------------------------------------------------------

def test_missing_class_of_a_fixed_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_mvtec(tmp_path / "mvtec")
    shutil.rmtree(tmp_path / "mvtec/zipper")
    fails(capsys, "mvtec", tmp_path / "mvtec", "class 'zipper' of mvtec is missing", "zipper/test/", "--classes")
    assert main(["mvtec", str(tmp_path / "mvtec"), "--classes", "bottle", "wood"]) == 0
    assert "left out by --classes" in capsys.readouterr().out
    fails(capsys, "mvtec", tmp_path / "mvtec", "--classes: mvtec has no class 'bottel'",
          args=("--classes", "bottel"))
    build_dagm(tmp_path / "dagm")
    shutil.rmtree(tmp_path / "dagm/Class10")
    fails(capsys, "dagm", tmp_path / "dagm", "class 'Class10' of dagm is missing", "Class10/Test/")
    build_visa_csv(tmp_path / "visa")
    csv_path = tmp_path / "visa/split_csv/1cls.csv"
    csv_path.write_text("".join(line for line in csv_path.read_text().splitlines(keepends=True)
                                if not line.startswith("pcb4,")))
    fails(capsys, "visa", tmp_path / "visa", "class 'pcb4' of visa is missing", "split_csv/1cls.csv")


def test_empty_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_mvtec(tmp_path / "mvtec")
    for image in (tmp_path / "mvtec/pill/test/good").glob("*.png"):
        image.unlink()
    fails(capsys, "mvtec", tmp_path / "mvtec", "no images in pill/test/good/ (normal test images)")
    build_mvtec(tmp_path / "defects")
    for image in (tmp_path / "defects/screw/test/broken_b").glob("*.png"):
        image.unlink()
    fails(capsys, "mvtec", tmp_path / "defects", "no images in screw/test/broken_b/ (defect images)")
    build_mvtec(tmp_path / "nodefect")
    for folder in ("test/broken", "test/broken_b", "ground_truth"):
        shutil.rmtree(tmp_path / "nodefect/grid" / folder)
    fails(capsys, "mvtec", tmp_path / "nodefect", "no defect images for 'grid'")
    build_br35h_kaggle(tmp_path / "br35h")
    for image in (tmp_path / "br35h/yes").glob("*.jpg"):
        image.unlink()
    fails(capsys, "br35h", tmp_path / "br35h", "no images in yes/ (anomalous images)")
    build_isic_distributed(tmp_path / "isic")
    for image in (tmp_path / "isic/ISBI2016_ISIC_Part1_Test_Data").glob("*.jpg"):
        image.unlink()
    fails(capsys, "isic", tmp_path / "isic", "no images in ISBI2016_ISIC_Part1_Test_Data/")
    build_custom(tmp_path / "custom")
    (tmp_path / "custom/test/widget/chip").mkdir()
    fails(capsys, "custom", tmp_path / "custom", "no images in test/widget/chip/ (defect images)")


# ---- label files that disagree ----------------------------------------------------------------------------------

def test_dagm_labels_txt_must_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_dagm(tmp_path)
    label = tmp_path / "Class4/Test/Label/0010_label.PNG"
    label.unlink()
    fails(capsys, "dagm", tmp_path, "Class4/Test/Label/Labels.txt calls Class4/Test/0010.PNG defective",
          "expected Class4/Test/Label/0010_label.PNG")
    build_dagm(tmp_path / "again")
    img(tmp_path / "again/Class5/Test/Label/0001_label.PNG", mode="L")
    fails(capsys, "dagm", tmp_path / "again", "calls Class5/Test/0001.PNG defect-free",
          "Class5/Test/Label/0001_label.PNG exists")


def test_headct_labels_csv_must_cover_every_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_headct_distributed(tmp_path)
    (tmp_path / "head_ct/010.png").unlink()
    fails(capsys, "headct", tmp_path, "labels.csv lists id 10", "head_ct/010.png is missing")
    img(tmp_path / "head_ct/010.png")
    img(tmp_path / "head_ct/150.png")
    fails(capsys, "headct", tmp_path, "head_ct/150.png has no row in labels.csv")


def test_visa_csv_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_visa_csv(tmp_path)
    csv_path = tmp_path / "split_csv/1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("Masks/Anomaly/010.png", "Masks/Anomaly/002.png", 1))
    fails(capsys, "visa", tmp_path, "does not match image candle/Data/Images/Anomaly/010.JPG by name")
    csv_path.write_text("object,split,image\n")
    fails(capsys, "visa", tmp_path, "lacks the column(s) label, mask")
    csv_path.unlink()
    fails(capsys, "visa", tmp_path, "split file split_csv/1cls.csv is missing", "--split_csv")


def test_visa_pytorch_and_csv_must_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_visa_pytorch_csv(tmp_path)
    (tmp_path / "1cls/candle/test/good/0107.JPG").unlink()
    fails(capsys, "visa", tmp_path, "lists candle/test/good/0107.jpg but the VisA_pytorch folder lacks it")


def test_accepted_meta_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adaclip("tn3k", True, normal=False)(tmp_path / "swapped")
    meta = tmp_path / "swapped/meta.json"
    meta.write_text(meta.read_text().replace("defect/a_mask.png", "defect/TMP").replace("defect/b_mask.png",
                    "defect/a_mask.png").replace("defect/TMP", "defect/b_mask.png"))
    fails(capsys, "tn3k", tmp_path / "swapped", "pairs tn3k/test/defect/b.png with the mask",
          "pass --rewrite to list the folders afresh")
    assert main(["tn3k", str(tmp_path / "swapped"), "--rewrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    adaclip("headct", False)(tmp_path / "stale")
    img(tmp_path / "stale/headct/test/defect/c.png")
    fails(capsys, "headct", tmp_path / "stale", "headct/test/defect/c.png is not in meta.json")
    adaclip("headct", False)(tmp_path / "lost")
    (tmp_path / "lost/headct/test/good/a.png").unlink()
    fails(capsys, "headct", tmp_path / "lost", "image file not found: headct/test/good/a.png", "or pass --rewrite")
    fails(capsys, "headct", tmp_path / "lost", "--classes does not apply to meta.json, which came with the download",
          "--rewrite", args=("--classes", "headct"))


def test_sdd_raw_label_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_sdd_raw(tmp_path)
    (tmp_path / "kos01/Part7.jpg").unlink()
    fails(capsys, "sdd", tmp_path, "label kos01/Part7_label.bmp matches no image")


# ---- where the dataset is -----------------------------------------------------------------------------------------

def test_unknown_or_ambiguous_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    fails(capsys, "cvc-clinicdb", tmp_path / "empty", "no cvc-clinicdb layout found",
          "CVC-ClinicDB as distributed: Original/N.tif with 'Ground Truth'/N.tif")
    for copy in ("PNG", "TIF"):
        build_tn3k(tmp_path / "two" / copy)
    fails(capsys, "tn3k", tmp_path / "two", "found tn3k in several sub-folders", "PNG/, TIF/")
    fails(capsys, "tn3k", tmp_path / "nowhere", "dataset folder not found")
    build_visa_pytorch(tmp_path / "visa")
    fails(capsys, "visa", tmp_path / "visa", "--split_csv: file not found", args=("--split_csv", "missing.csv"))
