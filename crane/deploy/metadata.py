"""What an exported Crane graph records about itself (ONNX ``metadata_props``, OpenVINO ``rt_info``).

Every entry is a JSON text under a key starting with ``crane.``. Written by
:mod:`crane.export`, read by :mod:`crane.deploy.runtime`; standard library only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from crane.errors import CraneError

FORMAT = "crane-export/1"
PREFIX = "crane."
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps")


class NotACraneExport(CraneError):
    """The file is not a graph written by ``python -m crane export`` (or of an unknown version)."""


@dataclass
class ExportInfo:
    """The metadata of an exported graph.

    ``image_size``: the side ``S`` of the input ``B x 3 x S x S`` and of the maps.
    ``sigma``: the Gaussian smoothing inside the graph. ``model``: the model options
    as ``thresholds.json`` and ``predict`` name them (``dino_model``, ``features_list``,
    ...). ``config``: every :class:`crane.models.crane.CraneConfig` field.
    ``thresholds``: the ``thresholds.json`` content found at export, or ``None``.
    ``precision``: ``fp32`` or ``fp16`` (weights and arithmetic; inputs and outputs are float32).
    ``reference``: the reference memory the graph holds as constants (few-shot), or ``None`` (zero-shot):
    ``references`` ``K``, ``rows_per_bank``, ``feature_widths``, ``bytes`` (fp32 constants), ``coreset_ratio``,
    ``few_shot_weight``, ``scale`` / ``shift`` (the mix's affine map), ``patches_per_image``, ``images`` (each
    reference's source, file identity and pixel digest), and ``path`` / ``identity`` of the ``reference.pt`` it
    was read from (``None`` when built from images at export).
    """

    image_size: int
    sigma: float
    model: dict[str, Any]
    config: dict[str, Any]
    checkpoint: str
    checkpoint_sha256: str
    precision: str = "fp32"
    thresholds: Optional[dict[str, Any]] = None
    reference: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)  # versions, opset, creation time

    @property
    def image_threshold(self) -> Optional[float]:
        return None if self.thresholds is None else self.thresholds.get("image_threshold")

    @property
    def pixel_threshold(self) -> Optional[float]:
        return None if self.thresholds is None else self.thresholds.get("pixel_threshold")

    def reference_summary(self) -> Optional[str]:
        """The reference memory the graph holds, in words (``None``: zero-shot), e.g. ``a reference memory of 4
        images (1 bank x 1,024 rows, 3.1 MB of constants, coreset ratio 1, few-shot weight 0.5)``."""
        if self.reference is None:
            return None
        r = self.reference
        rows = r.get("rows_per_bank") or []
        banks = f"{len(rows)} bank{'s' if len(rows) != 1 else ''} x {max(rows, default=0):,} rows"
        return (f"a reference memory of {r.get('references')} images ({banks}, {r.get('bytes', 0) / 1e6:.1f} MB of "
                f"constants, coreset ratio {r.get('coreset_ratio'):g}, few-shot weight {r.get('few_shot_weight'):g})")

    def to_strings(self) -> dict[str, str]:
        """``{"crane.<key>": text}`` entries for the model file."""
        values: dict[str, Any] = {
            "format": FORMAT, "image_size": self.image_size, "sigma": self.sigma, "model": self.model,
            "config": self.config, "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256,
            "precision": self.precision, "input": f"{INPUT_NAME}: B x 3 x {self.image_size} x {self.image_size} "
            "float32, RGB resized with PIL bicubic (no crop), scaled to [0, 1], normalised with the OpenAI CLIP "
            "mean/std", "outputs": f"{OUTPUT_NAMES[0]}: B float32 anomaly scores; {OUTPUT_NAMES[1]}: B x S x S "
            "float32 smoothed anomaly maps", **self.extra,
        }
        if self.thresholds is not None:
            values["thresholds"] = self.thresholds
        if self.reference is not None:
            values["reference"] = self.reference
        return {PREFIX + k: json.dumps(v, sort_keys=True) for k, v in values.items()}

    @classmethod
    def from_strings(cls, entries: Mapping[str, str], source: str = "model") -> "ExportInfo":
        """Parse the entries of a model file; raise :class:`NotACraneExport` when they are not ours."""
        fmt = entries.get(PREFIX + "format")
        if fmt != json.dumps(FORMAT):
            found = f"format {fmt!r}" if fmt else "no crane metadata"
            raise NotACraneExport(f"{source} is not a Crane export ({found}; expected {FORMAT!r}): export one "
                                  "with `python -m crane export --checkpoint FILE --format onnx|openvino --out PATH`")
        try:
            values = {key[len(PREFIX):]: json.loads(text) for key, text in entries.items() if key.startswith(PREFIX)}
            known = dict(image_size=int(values.pop("image_size")), sigma=float(values.pop("sigma")),
                         model=dict(values.pop("model")), config=dict(values.pop("config")),
                         checkpoint=str(values.pop("checkpoint")),
                         checkpoint_sha256=str(values.pop("checkpoint_sha256")),
                         precision=str(values.pop("precision")), thresholds=values.pop("thresholds", None),
                         reference=values.pop("reference", None))
        except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise NotACraneExport(f"{source}: incomplete Crane metadata ({type(e).__name__}: {e}); export it again") \
                from None
        for name in ("format", "input", "outputs"):
            values.pop(name, None)
        return cls(**known, extra=values)
