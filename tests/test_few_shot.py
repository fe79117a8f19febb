"""Few-shot scoring with a reference memory (``crane.models.memory``, ``crane.reference``, ``Detector.set_reference``).

A tiny synthetic CLIP (vision width 128, 6 blocks, E-Attn in the last 4, patch 14; text width 128, 4 blocks,
embedding 64) at 56 x 56 pixels (a 4 x 4 grid), and the demo textures of ``datasets.synthetic``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crane import metrics
from crane.detector import Detector
from crane.models.crane import CraneConfig, CraneModel
from crane.models.memory import (MapStatistics, ReferenceMemory, faiss_available, greedy_coreset, matching_affine,
                                 max_cosine)
from crane.reference import ReferenceMemoryError, load_reference, save_reference
from datasets.synthetic import make_synthetic_dataset
from tests.conftest import tiny_dinov2

SIZE = 56
TINY_CLIP = dict(vision_width=128, vision_layers=6, patch_size=14, text_width=128, text_layers=4, embed_dim=64)


def _clip(synth, seed: int = 0):
    from crane.models.clip_loader import load_clip

    return load_clip(synth.clip_state_dict(seed=seed, **TINY_CLIP))


def _detector(clip, **options) -> Detector:
    import open_clip

    config = CraneConfig(**{"image_size": SIZE, "eattn_layers": 4, "features_list": (2, 4, 6), "soft_mean": True,
                            **options})
    vfm = tiny_dinov2(config.image_size) if config.dino_model == "dinov2" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the (untrained) prompts
        model = CraneModel(clip, open_clip.get_tokenizer("ViT-L-14-336"), config, vfm)
    return Detector(model.eval(), batch_size=4)


@pytest.fixture(scope="module")
def clip(synth):
    return _clip(synth)


@pytest.fixture(scope="module")
def detector(clip):
    return _detector(clip)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Demo textures: 3 classes, 10 normal training images, 10 normal and 4 defect test images each, 96 px."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("demo") / "data", classes=3, train=10, test_normal=10,
                                  test_anomalous=4, size=96, seed=3)


def _class_files(root: Path, cls: str) -> tuple[list[Path], list[dict]]:
    meta = json.loads((root / "meta.json").read_text())
    return sorted((root / "train" / cls / "good").glob("*.png")), meta["test"][cls]


def _unit(rng: np.random.Generator, n: int, dim: int, clusters: int = 0) -> torch.Tensor:
    x = rng.standard_normal((n, dim))
    if clusters:
        x = rng.standard_normal((clusters, dim))[rng.integers(0, clusters, n)] * 3.0 + x
    return torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=-1)


# --------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_max_cosine_is_the_brute_force_nearest_neighbour(chunk):
    rng = np.random.default_rng(0)
    queries, bank = _unit(rng, 50, 32), _unit(rng, 37, 32)
    brute = (queries.double() @ bank.double().T).max(dim=1).values
    ours = max_cosine(queries, bank, chunk)
    torch.testing.assert_close(ours.double(), brute, atol=1e-6, rtol=0)
    # leave-one-out: rows of the query's own image never match
    owners = torch.from_numpy(rng.integers(0, 4, 37))
    exclude = torch.from_numpy(rng.integers(-1, 4, 50))
    sims = queries.double() @ bank.double().T
    sims[owners[None, :] == exclude[:, None]] = -np.inf
    torch.testing.assert_close(max_cosine(queries, bank, chunk, owners, exclude).double(), sims.max(dim=1).values,
                               atol=1e-6, rtol=0)


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed (pip install faiss-cpu)")
def test_faiss_and_torch_search_give_the_same_distances(detector, demo):
    refs, samples = _class_files(demo, "grid")
    memory = detector.set_reference(refs[:3], coreset_ratio=0.5)
    images = [demo / s["img_path"] for s in samples[-4:]]
    features = detector.encode(torch.stack([_preprocess(p) for p in images]))
    memory.backend = "torch"
    torch_d = memory.distances(_queries(memory, features))
    memory.backend = "faiss"
    faiss_d = memory.distances(_queries(memory, features))
    torch.testing.assert_close(faiss_d, torch_d, atol=1e-6, rtol=0)
    detector.set_reference(None)


def _preprocess(path) -> torch.Tensor:
    from crane.data.image import preprocess

    return preprocess(path, SIZE)


def _queries(memory: ReferenceMemory, features) -> list[torch.Tensor]:
    from crane.models.memory import memory_queries

    return memory_queries(features, memory.spec.sets, memory.spec.use_vfm)


def test_memory_distances_are_the_mean_over_banks_of_the_brute_force_distance(detector, demo):
    refs, _ = _class_files(demo, "blotches")
    memory = detector.set_reference(refs[:3], coreset_ratio=0.3)
    features = detector.encode(torch.stack([_preprocess(p) for p in refs[3:6]]))
    queries = _queries(memory, features)
    expected = torch.stack([1.0 - (q.double() @ b.features.double().T).max(dim=-1).values
                            for q, b in zip(queries, memory.banks)]).mean(0)
    torch.testing.assert_close(memory.distances(queries).double(), expected, atol=1e-6, rtol=0)
    detector.set_reference(None)


# --------------------------------------------------------------------------------------- coreset


def test_coreset_covers_every_row_within_its_radius():
    rng = np.random.default_rng(1)
    x = _unit(rng, 600, 24, clusters=12)
    coreset = greedy_coreset(x, 40)
    assert coreset.indices.shape == (40,) and len(set(coreset.indices.tolist())) == 40
    nearest = 1.0 - (x.double() @ x[coreset.indices].double().T).max(dim=1).values
    assert float(nearest.max()) <= coreset.radius + 1e-6
    assert float(nearest.max()) == pytest.approx(coreset.radius, abs=1e-6)  # the stated radius is attained
    # greedy k-centre: the kept rows are pairwise at least the radius apart (so the radius is within 2x optimal)
    kept = x[coreset.indices].double()
    pairwise = 1.0 - kept @ kept.T
    assert float(pairwise[~torch.eye(40, dtype=torch.bool)].min()) >= coreset.radius - 1e-6
    assert torch.equal(greedy_coreset(x, 40).indices, coreset.indices)  # deterministic
    repeated = torch.cat([x[:5], x[:5], x[:5]])  # identical rows: still distinct picks, radius 0 once all are kept
    picked = greedy_coreset(repeated, 8).indices.tolist()
    assert len(set(picked)) == 8
    assert greedy_coreset(repeated, 5).radius == pytest.approx(0.0, abs=1e-6)


def test_memory_coreset_covers_the_reference_patches(detector, demo):
    from crane.models.memory import memory_queries

    refs, _ = _class_files(demo, "stripes")
    memory = detector.set_reference(refs[:4], coreset_ratio=0.25)
    features = detector.encode(torch.stack([_preprocess(p) for p in refs[:4]]))
    for q, bank in zip(memory_queries(features, memory.spec.sets, memory.spec.use_vfm), memory.banks):
        rows = q.reshape(-1, q.shape[-1])
        assert bank.features.shape[0] == int(np.ceil(0.25 * rows.shape[0]))
        torch.testing.assert_close(bank.features, rows[bank.indices])  # the coreset choice, image-major
        d = 1.0 - (rows.double() @ bank.features.double().T).max(dim=1).values
        assert float(d.max()) <= bank.radius + 1e-6
    detector.set_reference(None)


# --------------------------------------------------------------------------------------- zero-shot unchanged


def test_zero_shot_is_bit_identical_without_references(detector, synth):
    from crane.models.smoothing import smooth

    images = list(synth.images_uint8(n=3, size=70))
    batch = torch.stack([_preprocess(im) for im in images])
    with torch.no_grad():  # the zero-shot path as Detector.forward computed it before references existed
        model = detector.model
        features = model.encode_image(batch)
        logits = model.patch_logits(features, detector.text_features)
        scores = model.scores(features, logits, detector.text_features).float()
        maps = smooth(model.maps(logits).float(), model.config.sigma)
    before = detector.predict(images)
    assert np.array_equal(before.scores, scores.numpy()) and np.array_equal(before.maps, maps.numpy())
    detector.set_reference(images[:2])
    with_refs = detector.predict(images)
    assert not np.array_equal(with_refs.maps, before.maps)
    detector.set_reference(None)
    after = detector.predict(images)
    assert np.array_equal(after.scores, before.scores) and np.array_equal(after.maps, before.maps)


# --------------------------------------------------------------------------------------- leave-one-out


def _rank_auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a value of ``high`` exceeds one of ``low``), ties counting half."""
    diff = high[:, None] - low[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_leave_one_out_scores_are_not_biased_low(detector, demo):
    """Without a coreset, the reference images' own scores are far below those of new normal images (each is its
    own nearest neighbour); scored by leave-one-out they are distributed as the new normal images' are. After a
    coreset, leave-one-out leaves holes where the image's own rows covered others' (it is not the coreset of the
    other images), so it errs high (conservative thresholds), never low."""
    auc: dict[tuple[float, str], list[float]] = {}
    for cls in ("blotches", "grid", "stripes"):
        refs, samples = _class_files(demo, cls)
        batches = {"refs": torch.stack([_preprocess(p) for p in refs]),
                   "new": torch.stack([_preprocess(demo / s["img_path"]) for s in samples if not s["anomaly"]])}
        features = {name: detector.encode(batch) for name, batch in batches.items()}
        zero = {name: detector.zero_shot(f) for name, f in features.items()}
        for ratio in (1.0, 0.25):
            memory = detector.set_reference(refs, coreset_ratio=ratio)
            new = memory.fuse(features["new"], *zero["new"])[0].numpy()
            loo = memory.fuse(features["refs"], *zero["refs"], memory.exclusions(batches["refs"]))[0].numpy()
            naive = memory.fuse(features["refs"], *zero["refs"])[0].numpy()
            auc.setdefault((ratio, "loo"), []).append(_rank_auc(new, loo))
            auc.setdefault((ratio, "naive"), []).append(_rank_auc(new, naive))
        np.testing.assert_allclose(detector.predict(refs[:3], leave_one_out=True).scores, loo[:3], rtol=0, atol=1e-6)
    detector.set_reference(None)
    mean = {key: float(np.mean(values)) for key, values in auc.items()}
    assert min(auc[(1.0, "naive")]) >= 0.9, auc  # in-memory scoring: biased low
    assert 0.3 <= mean[(1.0, "loo")] <= 0.7, auc  # leave-one-out: exchangeable with new normal images
    assert mean[(0.25, "loo")] <= 0.7, auc  # after a coreset: not below new normal images
    assert mean[(0.25, "naive")] >= mean[(0.25, "loo")] + 0.3, auc


def test_leave_one_out_excludes_exactly_the_own_rows(detector, demo):
    refs, _ = _class_files(demo, "grid")
    memory = detector.set_reference(refs[:4], coreset_ratio=0.5)
    features = detector.encode(torch.stack([_preprocess(p) for p in refs[:4]]))
    queries = _queries(memory, features)
    exclude = torch.tensor([0, 1, 2, -1])
    expected = []
    for q, bank in zip(queries, memory.banks):
        owners = bank.indices // memory.spec.patches_per_image  # image-major patch places -> reference image
        sims = q.double() @ bank.features.double().T  # B x L x M
        sims = sims.masked_fill((owners[None, :] == exclude[:, None])[:, None, :], -np.inf)
        expected.append(1.0 - sims.max(dim=-1).values)
    torch.testing.assert_close(memory.distances(queries, exclude).double(), torch.stack(expected).mean(0),
                               atol=1e-6, rtol=0)
    detector.set_reference(None)


# --------------------------------------------------------------------------------------- files and errors


def test_reference_file_round_trip_and_refusals(clip, synth, demo, tmp_path):
    detector = _detector(clip)
    refs, samples = _class_files(demo, "stripes")
    images = [demo / s["img_path"] for s in samples[-3:]]
    memory = detector.set_reference(refs[:3], coreset_ratio=0.5)
    expected = detector.predict(images)
    path = save_reference(memory, tmp_path / "reference.pt", provenance={"checkpoint_sha256": "0" * 64})
    loaded = load_reference(path, detector.model)
    assert loaded.spec == memory.spec and loaded.radii == memory.radii
    assert [r["source"] for r in loaded.info["images"]] == [str(p.resolve()) for p in refs[:3]]
    assert loaded.info["provenance"] == {"checkpoint_sha256": "0" * 64}
    detector.set_reference(None)
    detector.set_reference(path)  # a reference.pt path
    again = detector.predict(images)
    assert np.array_equal(again.scores, expected.scores) and np.array_equal(again.maps, expected.maps)

    others = {"image size": _detector(clip, image_size=84), "layers": _detector(clip, features_list=(4, 6)),
              "CLIP weights": _detector(_clip(synth, seed=1))}
    for what, other in others.items():
        with pytest.raises(ReferenceMemoryError) as err:
            other.set_reference(path)
        message = str(err.value)
        assert "\n" not in message and "other settings" in message, (what, message)
    (tmp_path / "not.pt").write_bytes(b"garbage")
    for bad in (tmp_path / "not.pt", tmp_path / "missing.pt"):
        with pytest.raises(ReferenceMemoryError, match=r"^[^\n]*$"):
            load_reference(bad, detector.model)


def test_empty_references_refused_in_one_line(detector):
    with pytest.raises(ReferenceMemoryError, match=r"^no reference images given[^\n]*$"):
        detector.set_reference([])
    assert detector.reference is None


def test_one_reference_and_duplicates(detector, demo):
    refs, samples = _class_files(demo, "blotches")
    memory = detector.set_reference([refs[0], refs[0], Image.open(refs[0])])  # the same pixels three times
    assert memory.references == 1 and len(memory.info["images"]) == 1
    assert memory.spec.scale > 0  # scaled from each patch's distance to the others (no second image)
    with pytest.raises(ValueError, match="at least two"):
        detector.predict(refs[:1], leave_one_out=True)
    detector.set_reference(None)


def test_crane_plus_memory_holds_the_vfm_features(clip, demo):
    detector = _detector(clip, dino_model="dinov2", features_list=(6,), soft_mean=False)
    refs, samples = _class_files(demo, "grid")
    memory = detector.set_reference(refs[:2])
    assert memory.spec.use_vfm and memory.spec.sets == [0, 1]  # D-Attn, E-Attn, then the DINOv2 features
    assert [b.features.shape[1] for b in memory.banks] == [64, 64, 96]
    out = detector.predict([demo / s["img_path"] for s in samples[-2:]])
    assert out.maps.shape == (2, SIZE, SIZE) and np.isfinite(out.scores).all()
    assert not detector.set_reference(refs[:2], use_vfm=False).spec.use_vfm


def test_matching_affine_puts_few_shot_maps_on_the_zero_shot_scale():
    rng = np.random.default_rng(2)
    zero, few = MapStatistics(), MapStatistics()
    z, f = torch.from_numpy(rng.normal(0.4, 0.02, 1000)), torch.from_numpy(rng.normal(0.01, 0.003, 1000))
    zero.add(z)
    few.add(f)
    a, b = matching_affine(zero, few)
    assert float((a * f + b).mean()) == pytest.approx(float(z.mean()), abs=1e-9)
    assert float((a * f + b).std(unbiased=False)) == pytest.approx(float(z.std(unbiased=False)), rel=1e-9)


# --------------------------------------------------------------------------------------- effectiveness


def test_few_shot_beats_zero_shot_on_the_demo_textures(detector, demo):
    """Random CLIP weights (zero-shot near chance) on the demo textures; 4 references per class."""
    results = {"zero": [], "few": []}
    for cls in ("blotches", "grid", "stripes"):
        refs, samples = _class_files(demo, cls)
        images = [demo / s["img_path"] for s in samples]
        labels = np.array([s["anomaly"] for s in samples])
        masks = np.stack([np.asarray(Image.open(demo / s["mask_path"]).convert("L").resize((SIZE, SIZE),
                          Image.Resampling.BILINEAR)) > 127 if s["mask_path"] else np.zeros((SIZE, SIZE), bool)
                          for s in samples])
        for kind, reference in (("zero", None), ("few", refs[:4])):
            detector.set_reference(reference)
            out = detector.predict(images)
            results[kind].append((metrics.pixel_auroc(masks, out.maps), metrics.image_auroc(labels, out.scores)))
    detector.set_reference(None)
    zero, few = np.mean(results["zero"], axis=0), np.mean(results["few"], axis=0)
    assert few[0] >= zero[0] + 0.2 and few[1] >= zero[1] + 0.2, (zero, few)
    assert few[0] >= 0.9, few
