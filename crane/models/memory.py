"""Few-shot scoring with a reference memory of normal images' patch features (``docs/method.md``, "Few-shot").

A :class:`ReferenceMemory` holds, for each of its token sets (a "bank"), the L2-normalised patch
features of ``K`` normal reference images: ``M x E`` after an optional greedy k-centre coreset
(PatchCore), each row remembering the reference image it came from (its "owner"). An image with
patch features ``q`` (``L x E`` per bank) gets, per bank, the cosine distance of each patch to its
nearest reference patch, ``d = 1 - max_m q . m``; the few-shot patch distance is the mean of ``d``
over the banks (``B x L``), its map that distance upsampled to ``S x S`` as Crane's maps are
(bilinear, ``align_corners=False``), its image score the largest patch distance. They are mixed with
Crane's zero-shot map and score per image, after an affine map ``a F + b`` fixed when the memory is built
(it gives the few-shot maps of the references, scored by leave-one-out, the mean and spread of their
zero-shot maps): ``map = (1 - w) zero_map + w (a few_map + b)``,
``score = (1 - w) zero_score + w (a max_L d + b)``. Nothing is normalised over a set of test images, so an
image's score does not depend on the others.

Token sets. A memory uses every distinct token set the model scores with (``ImageFeatures.patch_tokens``;
with quirk 1 the E-Attn sets of layers 6/12/18/24 are one tensor and are stored once, which leaves
their mean unchanged) and, when a VFM is loaded, its patch features (``ImageFeatures.vfm_features``,
normalised over channels), as AnomalyDINO scores with DINOv2's. All banks share one grid (Crane's,
or with a VFM the VFM's, as ``CraneModel.image_parts`` arranges).

Nearest-neighbour search is exact: chunked matrix products and a running maximum over the memory
(``MatMul`` + ``ReduceMax``, bounded peak memory, exportable with the memory as a constant), or
faiss's exact inner-product index on the CPU where installed (``faiss-cpu``); both give the same
distances up to float rounding.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from .crane import ImageFeatures
from .head import upsample

CHUNK = 4096
"""Memory rows per matrix product: the search holds ``Q x CHUNK`` similarities at a time."""

SEARCH_BACKENDS = ("torch", "faiss", "auto")


def faiss_available() -> bool:
    """Whether the optional ``faiss`` package (``pip install faiss-cpu``) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ token sets


def tensor_digest(image: torch.Tensor) -> str:
    """SHA-256 of a preprocessed ``3 x S x S`` float32 image: how a reference image is recognised again
    (leave-one-out scoring), whatever it was given as."""
    return hashlib.sha256(image.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def distinct_sets(features: ImageFeatures) -> list[int]:
    """Indices of the distinct token sets of ``features.patch_tokens`` (the first of each group of equal
    tensors). With quirk 1 every E-Attn set is the same tensor, so Crane's four layers give one index."""
    kept: list[int] = []
    for i, tokens in enumerate(features.patch_tokens):
        if not any(tokens is features.patch_tokens[j] or torch.equal(tokens, features.patch_tokens[j]) for j in kept):
            kept.append(i)
    return kept


def memory_queries(features: ImageFeatures, sets: Sequence[int], use_vfm: bool) -> list[torch.Tensor]:
    """The normalised float32 patch features a memory compares, one ``B x L x E`` tensor per bank:
    the token sets ``sets`` of ``features``, then (``use_vfm``) the VFM features ``B x C x H x W``
    as ``B x HW x C``, normalised over ``C``."""
    queries = [features.patch_tokens[i].float() for i in sets]
    if use_vfm:
        if features.vfm_features is None:
            raise ValueError("this reference memory holds VFM features, but the model has no VFM")
        queries.append(F.normalize(features.vfm_features.float().flatten(2).transpose(1, 2), dim=-1))
    return queries


# ------------------------------------------------------------------------------ search


def max_cosine(queries: torch.Tensor, bank: torch.Tensor, chunk: int = CHUNK,
               owners: Optional[torch.Tensor] = None, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Largest inner product of each query with the rows of ``bank`` (the cosine similarity to the nearest
    row, for normalised rows), over chunks of ``chunk`` rows so at most ``Q x chunk`` products are held.

    Args:
        queries: ``Q x E``.
        bank: ``M x E`` (``M >= 1``).
        owners: ``M`` ints, the reference image of each row; with ``exclude`` (``Q`` ints, ``-1`` for
            none) a query never matches a row whose owner is its ``exclude`` (leave-one-out).
    Returns:
        ``Q`` similarities (``-inf`` where every row was excluded).
    """
    best: Optional[torch.Tensor] = None
    for start in range(0, bank.shape[0], chunk):
        sims = queries @ bank[start:start + chunk].transpose(0, 1)
        if exclude is not None:
            own = owners[start:start + chunk][None, :] == exclude[:, None]
            sims = sims.masked_fill(own, -math.inf)
        top = sims.amax(dim=1)
        best = top if best is None else torch.maximum(best, top)
    return best


class FaissSearch:
    """Exact maximum inner product with faiss (``IndexFlatIP``, CPU), one index per bank, built on first use."""

    def __init__(self) -> None:
        self._indexes: dict[int, Any] = {}

    def max_cosine(self, queries: torch.Tensor, bank: torch.Tensor, key: int) -> torch.Tensor:
        """As :func:`max_cosine` without exclusion: ``Q x E`` queries against the ``M x E`` bank ``key``."""
        import faiss

        if key not in self._indexes:
            index = faiss.IndexFlatIP(bank.shape[1])
            index.add(bank.detach().cpu().float().contiguous().numpy())
            self._indexes[key] = index
        sims, _ = self._indexes[key].search(queries.detach().cpu().float().contiguous().numpy(), 1)
        return torch.from_numpy(sims[:, 0]).to(queries.device)


# ------------------------------------------------------------------------------ coreset


@dataclass
class Coreset:
    """A greedy k-centre choice: ``indices`` (sorted) of the kept rows and the covering ``radius``, the largest
    cosine distance of any row to its nearest kept row (every row lies within it)."""

    indices: torch.Tensor
    radius: float


def greedy_coreset(x: torch.Tensor, count: int, progress: Optional[Callable[[int], None]] = None) -> Coreset:
    """PatchCore's greedy k-centre subsampling of the normalised rows ``x`` (``N x E``) to ``count`` rows.

    Starts at row 0 and repeatedly adds the row farthest (in cosine distance ``1 - x.c``, which orders
    like the Euclidean distance of unit vectors) from the rows kept so far; the covering radius of the
    result is within twice the optimum. Deterministic; ``O(N count E)``. ``progress(n)`` is called with
    the number of rows added at each step.
    """
    n = x.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"a coreset of {count} rows out of {n}")
    chosen = torch.empty(count, dtype=torch.long, device=x.device)
    chosen[0] = 0
    nearest = 1.0 - x @ x[0]
    nearest[0] = -math.inf  # a kept row is never picked again, even among identical rows
    for i in range(1, count):
        pick = torch.argmax(nearest)  # stays on the device: no synchronisation per step on a GPU
        chosen[i] = pick
        nearest = torch.minimum(nearest, 1.0 - x @ x[pick])
        nearest[pick] = -math.inf
        if progress is not None:
            progress(1)
    radius = float(nearest.clamp_min(0.0).max()) if count < n else 0.0
    return Coreset(torch.sort(chosen).values, radius)


def coreset_size(n: int, ratio: float) -> int:
    """Rows kept of ``n`` at coreset ``ratio`` in (0, 1]: ``ceil(ratio n)``, at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(n, math.ceil(ratio * n - 1e-9)))


# ------------------------------------------------------------------------------ the memory


@dataclass
class Bank:
    """One token set's memory: ``features`` ``M x E`` (normalised float32), ``indices`` ``M`` (each row's place
    among the ``K L`` reference patches, image-major: the coreset choice) and the coreset's covering
    ``radius`` in cosine distance (``0`` without a coreset)."""

    features: torch.Tensor
    indices: torch.Tensor
    radius: float


@dataclass
class MemorySpec:
    """How a memory scores.

    ``sets``: the token sets it compares (indices into ``ImageFeatures.patch_tokens``); ``use_vfm``: also the
    VFM features; ``weight``: the few-shot weight ``w``; ``scale``, ``shift``: the affine map ``a F + b``
    that puts few-shot distances on the zero-shot map's scale (:func:`matching_affine`); ``coreset_ratio``;
    ``patches_per_image`` ``L``; ``digests``: SHA-256 of each reference's preprocessed image, in order.
    """

    sets: list[int]
    use_vfm: bool
    weight: float = settings.DEFAULT_FEW_SHOT_WEIGHT
    scale: float = 1.0
    shift: float = 0.0
    coreset_ratio: float = settings.DEFAULT_CORESET_RATIO
    patches_per_image: int = 0
    digests: list[str] = field(default_factory=list)


@dataclass
class MapStatistics:
    """Running mean and standard deviation of map values (float64 sums)."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double()
        self.count += v.numel()
        self.total += float(v.sum())
        self.squares += float((v * v).sum())

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.squares / self.count - self.mean ** 2, 0.0))


def matching_affine(zero: MapStatistics, few: MapStatistics) -> tuple[float, float]:
    """``(a, b)`` with ``a F + b`` having the zero-shot maps' mean and standard deviation on the references:
    ``a = std_zero / std_few``, ``b = mean_zero - a mean_few`` (``a = 1`` where a spread is zero)."""
    a = zero.std / few.std if few.std > 0 and zero.std > 0 else 1.0
    return a, zero.mean - a * few.mean


class ReferenceMemory(nn.Module):
    """Patch features of normal reference images and the few-shot scoring with them (module docstring).

    Build one with :meth:`build`. Its banks are buffers, so ``.to(device)`` moves them and an exported graph
    holds them as constants. ``info``: a JSON-able record of what built it (:mod:`crane.reference` fills and
    checks it). ``backend``: ``torch`` (chunked matrix products), ``faiss`` (exact index, CPU tensors only) or
    ``auto`` (faiss for CPU tensors where installed: as fast or faster in ``scripts/bench_few_shot.py``);
    leave-one-out search, GPU tensors and graphs being traced (``torch.export``, ``torch.compile``) always
    run on torch.
    """

    def __init__(self, banks: Sequence[Bank], spec: MemorySpec, backend: str = "auto", chunk: int = CHUNK,
                 info: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        if not banks:
            raise ValueError("a reference memory needs at least one bank")
        if backend not in SEARCH_BACKENDS:
            raise ValueError(f"search backend must be one of {', '.join(SEARCH_BACKENDS)}, got {backend!r}")
        if not 0.0 <= spec.weight <= 1.0:
            raise ValueError(f"few-shot weight must be in [0, 1], got {spec.weight}")
        self.spec = spec
        self.info = dict(info or {})
        self.chunk = chunk
        self.backend = backend
        self.radii = [float(b.radius) for b in banks]
        for i, bank in enumerate(banks):
            self.register_buffer(f"bank_{i}", bank.features.float().contiguous())
            self.register_buffer(f"indices_{i}", bank.indices.long())
            self.register_buffer(f"owners_{i}", bank.indices.long() // max(spec.patches_per_image, 1),
                                 persistent=False)
        self._faiss = FaissSearch()

    # ---------------------------------------------------------------- construction

    @classmethod
    def build(cls, features: Sequence[torch.Tensor], spec: MemorySpec, coreset_ratio: float = settings.DEFAULT_CORESET_RATIO,
              progress: Optional[Callable[[int], None]] = None, **kwargs: Any) -> "ReferenceMemory":
        """A memory from the references' patch features, one ``K x L x E`` tensor per bank (normalised, as
        :func:`memory_queries` gives them), each bank subsampled by :func:`greedy_coreset` to
        ``coreset_ratio`` of its ``K L`` rows. Sets ``spec.coreset_ratio`` and ``spec.patches_per_image``
        (``spec.scale`` and ``spec.shift`` are set by :meth:`match_zero_shot`); ``kwargs`` go to the
        constructor."""
        if not features or features[0].shape[0] == 0:
            raise ValueError("no reference images")
        k, length = features[0].shape[:2]
        if any(f.shape[:2] != (k, length) for f in features):
            raise ValueError(f"the token sets of a memory must share one grid, got shapes "
                             f"{[tuple(f.shape) for f in features]}")
        spec.coreset_ratio, spec.patches_per_image = float(coreset_ratio), int(length)
        banks = []
        for f in features:
            rows = f.reshape(k * length, -1).float()
            count = coreset_size(rows.shape[0], coreset_ratio)
            if count == rows.shape[0]:
                chosen = Coreset(torch.arange(rows.shape[0], device=rows.device), 0.0)
            else:
                chosen = greedy_coreset(rows, count, progress)
            banks.append(Bank(rows[chosen.indices].clone(), chosen.indices, chosen.radius))
        return cls(banks, spec, **kwargs)

    def match_zero_shot(self, features: Sequence[torch.Tensor], zero: MapStatistics, image_size: int,
                        batch: int = 8) -> None:
        """Set ``spec.scale`` and ``spec.shift`` (:func:`matching_affine`) from the zero-shot maps' statistics
        ``zero`` on the references and those of their own few-shot maps scored by leave-one-out (:meth:`distances`
        with ``exclude``; with one reference, each patch without only itself), ``features`` being the memory's
        input to :meth:`build`. Both statistics go to ``info["statistics"]``."""
        few = MapStatistics()
        k = features[0].shape[0]
        for start in range(0, k, batch):
            queries = [f[start:start + batch] for f in features]
            owners = torch.arange(start, min(start + batch, k), device=queries[0].device)
            d = self.distances(queries, owners, by_patch=k == 1)
            few.add(upsample(d[..., None], image_size))
        self.spec.scale, self.spec.shift = matching_affine(zero, few)
        self.info["statistics"] = {name: {"mean": stats.mean, "std": stats.std, "pixels": stats.count}
                                   for name, stats in (("zero_shot", zero), ("few_shot", few))}

    @property
    def banks(self) -> list[Bank]:
        """The banks (views of the buffers)."""
        return [Bank(getattr(self, f"bank_{i}"), getattr(self, f"indices_{i}"), r) for i, r in enumerate(self.radii)]

    @property
    def references(self) -> int:
        """Number of reference images ``K``."""
        return len(self.spec.digests)

    def exclusions(self, images: torch.Tensor) -> torch.Tensor:
        """For preprocessed images ``B x 3 x S x S``: the reference index of each (the same pixels as a
        reference, by :func:`tensor_digest`), ``-1`` for an image that is none of them; the ``exclude`` of
        leave-one-out scoring. ``B`` int64 on the CPU."""
        index = {digest: i for i, digest in enumerate(self.spec.digests)}
        return torch.tensor([index.get(tensor_digest(image), -1) for image in images], dtype=torch.long)

    def nbytes(self) -> int:
        """Bytes of the banks' features."""
        return sum(b.features.numel() * b.features.element_size() for b in self.banks)

    # ---------------------------------------------------------------- scoring

    def _use_faiss(self, bank: torch.Tensor) -> bool:
        if bank.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        return self.backend == "faiss" or (self.backend == "auto" and faiss_available())

    def distances(self, queries: Sequence[torch.Tensor], exclude: Optional[torch.Tensor] = None,
                  by_patch: bool = False) -> torch.Tensor:
        """Few-shot distance of each patch, the mean over banks of ``1 - max cosine`` to the memory: ``B x L``.

        Args:
            queries: one ``B x L x E`` tensor per bank (:func:`memory_queries`).
            exclude: ``B`` reference indices (``-1``: none): image ``b`` is compared with the memory without
                the rows of reference ``exclude[b]`` (leave-one-out), or with ``by_patch`` without only the
                row of its own patch (patch ``p`` of reference ``exclude[b]``; for a single reference).
        """
        b, length = queries[0].shape[:2]
        rows = None
        if exclude is not None:
            exclude = exclude.to(queries[0].device).long()
            rows = exclude.repeat_interleave(length)
            if by_patch:
                patch = torch.arange(length, device=rows.device).repeat(b)
                rows = torch.where(rows >= 0, rows * length + patch, rows)
        total: Optional[torch.Tensor] = None
        for i, (q, bank) in enumerate(zip(queries, self.banks)):
            flat = q.reshape(b * length, -1)
            if rows is None and self._use_faiss(bank.features):
                sims = self._faiss.max_cosine(flat, bank.features, i)
            else:
                owners = bank.indices if by_patch else getattr(self, f"owners_{i}")
                sims = max_cosine(flat, bank.features, self.chunk, owners, rows)
            d = 1.0 - sims
            total = d if total is None else total + d
        return (total / len(queries)).reshape(b, length)

    def few_shot(self, features: ImageFeatures, image_size: int, exclude: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Few-shot image scores ``B`` (the largest patch distance) and maps ``B x S x S`` (the patch distances
        upsampled bilinearly, ``align_corners=False``), float32, before the affine map of :meth:`fuse`."""
        d = self.distances(memory_queries(features, self.spec.sets, self.spec.use_vfm), exclude)
        return d.amax(dim=1), upsample(d[..., None], image_size)[:, 0]

    def fuse(self, features: ImageFeatures, zero_scores: torch.Tensor, zero_maps: torch.Tensor,
             exclude: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Crane's zero-shot scores ``B`` and unsmoothed maps ``B x S x S`` mixed with the few-shot ones, per
        image: ``(1 - w) zero + w (a few + b)``. Returns (scores ``B``, unsmoothed maps ``B x S x S``)."""
        w, a, b = self.spec.weight, self.spec.scale, self.spec.shift
        scores, maps = self.few_shot(features, zero_maps.shape[-1], exclude)
        return (1.0 - w) * zero_scores + w * (a * scores + b), (1.0 - w) * zero_maps + w * (a * maps + b)
