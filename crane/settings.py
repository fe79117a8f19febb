"""Every model setting, declared once, as plain data.

A :class:`Setting` says a setting's name (the flag and attribute name), type, default (per
context where the contexts must differ, with the reason), choices, bounds, help text, its
role, and which records carry it. Everything else derives from :data:`SETTINGS`:

* the flags of ``test.py``, ``train.py``, ``predict``, ``calibrate`` and ``export``
  (:mod:`crane.cli.args`);
* :class:`crane.models.crane.CraneConfig` (the settings with ``config=True``), and the model
  fields of ``EvalOptions`` / ``TrainOptions`` (:func:`with_settings`);
* what a checkpoint, ``thresholds.json``, ``metrics.json`` and the training records keep
  (:func:`recorded`, by the names in :data:`RECORDS`);
* the one validator, :func:`problems`, used by every entry point.

To add a model setting: add one :class:`Setting` here, and use it where the model computes
with it. No argparse and no torch here.

Contexts (:data:`CONTEXTS`): ``api`` (``CraneConfig``, ``Detector.from_config``), ``test``
(``test.py``), ``train`` (``train.py``), ``inspect`` (``predict``, ``calibrate``, ``export``, the
app). A checkpoint's recorded settings replace the context's defaults unless a flag sets them
(:func:`crane.checkpoints.apply_settings`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

CONTEXTS = ("api", "test", "train", "inspect")
RECORDS = ("checkpoint", "thresholds", "results", "train", "config")
"""``checkpoint``: written into our checkpoints and read back as defaults; ``thresholds``: in
``thresholds.json`` (and an exported graph's metadata), compared when they are used; ``results``:
``metrics.json``'s ``args`` and the resume key of ``test.py``; ``train``: the resume key of
``train.py`` (also the feature cache's, for the settings that shape the frozen features);
``config``: a field of :class:`~crane.models.crane.CraneConfig`."""

ATTN_TYPES = ("qq+kk+vv", "qq+kk", "qq", "kk", "vv", "(q+k+v)^2")
"""E-Attn self-correlation attention types (docs/method.md)."""
DINO_MODELS = ("none", "dinov2", "dino", "sam", "dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitb14",
               "dinov2_vitb14_reg", "dinov2_vitl14", "dinov2_vitl14_reg", "dinov3_vits16", "dinov3_vitb16",
               "dinov3_vitl16")
"""Vision foundation model of D-Attn: none = Crane, dinov2 = Crane+ (DINOv2 ViT-B/14 with registers, the same
model as dinov2_vitb14_reg), dino / sam and the other DINOv2 / DINOv3 sizes = ablations."""
ALIASES = {"dinov2_vitb14_reg": "dinov2"}
"""Setting values that name the same thing (compared as equal by :func:`same`)."""
IMAGE_TOKEN_TYPES = ("none", "replace_prefix", "replace_suffix", "pad_prefix", "pad_suffix")
"""Where the image embedding enters the prompts when they are image-conditioned."""
PRECISIONS = ("fp32", "bf16", "fp16")
"""``--precision`` of the backbones: fp32 (the published arithmetic, the default), bf16 or fp16 autocast."""
AUPRO_METHODS = ("crane", "mvtec")
"""AUPRO definitions of :func:`crane.metrics.aupro`."""

MIN_IMAGE_SIZE = 14
"""One ViT patch: the smallest model input."""
DEFAULT_CLIP_MODEL = "ViT-L-14-336"
"""The published CLIP tower (OpenAI ViT-L/14@336px)."""
CLIP_DEPTH = 24
"""Blocks of the published vision tower (ViT-L/14@336); the tower rules below give its published values."""


def last_block(depth: int) -> tuple[int, ...]:
    """Tower rule of ``features_list``: the last block (24 of 24; Crane's own 6 12 18 24 are the quarters)."""
    return (depth,)


def eattn_blocks(depth: int) -> int:
    """Tower rule of ``eattn_layers``: the dual path runs from the first quarter block ``depth // 4`` to the
    last, ``depth - depth // 4 + 1`` blocks (19 of 24: blocks 6..24, as published; 10 of 12: blocks 3..12;
    every block of a tower under 4 blocks)."""
    return depth - max(1, depth // 4) + 1


@dataclass(frozen=True)
class Setting:
    """One model setting. ``role``: ``model`` (the image side and head), ``map`` (only the test-time
    maps; ``train.py`` has no such flag), ``prompt`` (the prompt learner; ``predict`` and friends read
    it from the checkpoint), ``vfm`` (D-Attn), ``weights`` (which weights; recorded by file identity).
    ``flag``: whether the command lines offer it. ``many``: a list (``nargs="+"``)."""

    name: str
    type: type
    default: Any
    help: str
    role: str
    records: frozenset = frozenset()
    choices: tuple = ()
    many: bool = False
    flag: bool = True
    minimum: Optional[float] = None
    contexts: Mapping[str, Any] = field(default_factory=dict)
    why: str = ""
    rule: Optional[Callable[[Any, str], Optional[str]]] = None
    tower_rule: Optional[Callable[[int], Any]] = None
    """The default for a CLIP vision tower of ``depth`` blocks (``default`` is its value for the published
    tower, :data:`CLIP_DEPTH` blocks); ``None``: the default does not depend on the tower."""

    def default_for(self, context: str, depth: Optional[int] = None) -> Any:
        """The default in ``context`` (one of :data:`CONTEXTS`), for a tower of ``depth`` blocks when given."""
        if self.tower_rule is not None and depth is not None:
            return self.tower_rule(depth)
        return self.contexts.get(context, self.default)

    def offered_in(self, context: str) -> bool:
        """Whether ``context``'s command line has this flag."""
        if not self.flag:
            return False
        return not ((context == "train" and self.role == "map") or (context == "inspect" and self.role == "prompt"))


def _test_conditioning(value: Any, context: str) -> Optional[str]:
    if context == "test" and value not in (0, 1):
        return (f"--train_with_img_cls_prob must be 0 (published evaluation: one text pair for all images) "
                f"or 1 (prompts conditioned on each image) at test, got {value}")
    if not 0.0 <= float(value) <= 1.0:
        return f"--train_with_img_cls_prob must be in [0, 1], got {value}"
    return None


_ALL = frozenset(("checkpoint", "thresholds", "results", "train", "config"))


def _records(*names: str) -> frozenset:
    return frozenset(names)


SETTINGS: tuple[Setting, ...] = (
    Setting("clip_weights", str, "openai", role="weights", records=_records("thresholds", "results", "train"),
            help="weights of the --clip_model tower: 'openai' or another open_clip pretrained tag of it (HF cache / "
                 "~/.cache/clip), a weights file (ViT-L-14-336px.pt for the default tower), or 'synthetic' (random "
                 "weights of that architecture: meaningless numbers, for pipeline demos)"),
    Setting("clip_model", str, DEFAULT_CLIP_MODEL, role="model", records=_ALL,
            help="open_clip architecture of the CLIP tower (a CLIP ViT with a class token: ViT-B-16, ViT-L-14, "
                 "ViT-L-14-quickgelu, ViT-H-14, ...; not SigLIP); the default E-Attn blocks and --features_list "
                 "follow its depth"),
    Setting("dino_weights", str, None, role="weights", records=_records("thresholds", "results", "train"),
            help="VFM weights for --dino_model: a file, or 'synthetic' (random weights: meaningless numbers, for "
                 "offline pipeline runs) (default: the torch hub / HF cache)"),
    Setting("dino_model", str, "none", role="vfm", records=_ALL, choices=DINO_MODELS,
            contexts={"test": "dinov2", "train": "dinov2", "inspect": "dinov2"},
            why="the published test.py and train.py default to DINOv2 (Crane+), and so do the command lines; the "
                "Python API builds plain Crane unless told otherwise or the checkpoint records a VFM",
            help="vision foundation model of D-Attn: none = Crane, dinov2 = Crane+"),
    Setting("features_list", int, (24,), role="model", records=_ALL, many=True, minimum=1, tower_rule=last_block,
            help="CLIP blocks whose tokens are compared with the text (default: the tower's last block, 24 of "
                 "ViT-L-14-336, 12 of ViT-B-16; Crane: the quarters, 6 12 18 24 of 24 blocks)"),
    Setting("soft_mean", bool, False, role="map", records=_records("checkpoint", "thresholds", "results", "config"),
            help="average softmaxed maps over layers (Crane: True), else softmax of averaged logits"),
    Setting("image_size", int, 518, role="model", records=_records("thresholds", "results", "train", "config"),
            minimum=MIN_IMAGE_SIZE, help="model input side S (maps are S x S)"),
    Setting("sigma", float, 4.0, role="map", records=_records("thresholds", "results", "config"), minimum=0.0,
            help="Gaussian smoothing of the maps (0: none)"),
    Setting("attn_type", str, "qq+kk+vv", role="model", records=_ALL, choices=ATTN_TYPES,
            help="E-Attn self-correlation"),
    Setting("both_eattn_dattn", bool, True, role="vfm", records=_ALL,
            help="layer 24 gives both D-Attn and E-Attn tokens"),
    Setting("use_scorebase_pooling", bool, True, role="model", records=_ALL,
            help="score-based pooling for the image score / logits"),
    Setting("dattn_batch_mean", bool, False, role="vfm", records=_records("thresholds", "results", "train", "config"),
            contexts={"train": True}, why="the published training computed the batch-wide mean (quirk 3)",
            help="published D-Attn mean over the whole batch (quirk 3); makes results depend on the batch"),
    Setting("train_with_img_cls_prob", float, 0.0, role="prompt", records=_records("results", "train"),
            contexts={"train": 1.0}, why="the published training conditions every step; its evaluation never",
            rule=_test_conditioning,
            help="probability of image-conditioned prompts: per step in training; at test 1 conditions them on each "
                 "image, 0 is the published evaluation"),
    Setting("train_with_img_cls_type", str, "pad_suffix", role="prompt", records=_records("results", "train"),
            choices=IMAGE_TOKEN_TYPES, help="where the image token goes when conditioning"),
    Setting("n_ctx", int, 12, role="prompt", records=_ALL - {"thresholds"}, minimum=1,
            help="learnable context length"),
    Setting("depth", int, 9, role="prompt", records=_ALL - {"thresholds"}, minimum=1, help="deep text prompt depth"),
    Setting("t_n_ctx", int, 4, role="prompt", records=_ALL - {"thresholds"}, minimum=1,
            help="deep text prompt length"),
    Setting("layer_aliasing", bool, True, role="model", records=_records("config"), flag=False,
            help="quirk 1: every E-Attn layer returns the last refined stream (docs/method.md)"),
    Setting("eattn_layers", int, 19, role="model", records=_records("config"), flag=False, tower_rule=eattn_blocks,
            contexts={"api": None}, why="CraneConfig leaves it to the tower: CraneModel applies the rule to the "
                                        "depth of the tower it is built on (None there means that)",
            help="E-Attn blocks at the end of the vision tower (default: depth - depth // 4 + 1; 19 of 24)"),
    Setting("dattn_gamma", float, 3.0, role="vfm", records=_records("config"), flag=False,
            help="D-Attn mask threshold multiplier"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

REFERENCE_SETTINGS: tuple[Setting, ...] = (
    Setting("coreset_ratio", float, 1.0, role="reference",
            rule=lambda v, _c: None if 0.0 < float(v) <= 1.0 else f"--coreset_ratio must be in (0, 1], got {v}",
            help="keep this fraction of the reference patches (greedy k-centre coreset, as PatchCore; 1: all). "
                 "Smaller memories search faster; the maps move by at most the coreset's covering radius"),
    Setting("few_shot_weight", float, 0.5, role="reference",
            rule=lambda v, _c: None if 0.0 <= float(v) <= 1.0 else f"--few_shot_weight must be in [0, 1], got {v}",
            help="weight w of the few-shot part: map = (1 - w) zero-shot + w few-shot (docs/method.md, Few-shot)"),
)
"""How a reference memory is built (few-shot, ``docs/method.md``): the flags of every command that builds one
(``test.py --few_shot``, ``calibrate --reference_memory``, ``predict --reference DIR``, ``export --reference
DIR``). They are recorded in the memory itself (``reference.pt``), not in the model records."""
REFERENCE_BY_NAME: dict[str, Setting] = {s.name: s for s in REFERENCE_SETTINGS}
DEFAULT_CORESET_RATIO: float = REFERENCE_BY_NAME["coreset_ratio"].default
DEFAULT_FEW_SHOT_WEIGHT: float = REFERENCE_BY_NAME["few_shot_weight"].default
"""The two defaults above, for the Python API's signatures."""

BEFORE_RECORDED = {"clip_model": "ViT-L-14-336"}
"""Settings added after records (``thresholds.json``, exported graphs) were first written, with the value
every record that lacks them was made with."""


def names(record: Optional[str] = None, role: Optional[str] = None) -> tuple[str, ...]:
    """Names of the settings a ``record`` carries (:data:`RECORDS`) and/or of a ``role``, in declaration order."""
    return tuple(s.name for s in SETTINGS if (record is None or record in s.records) and (role is None or s.role == role))


CHECKPOINT_KEYS = names("checkpoint")
"""Settings a checkpoint records (they become the defaults of the model flags)."""
THRESHOLD_KEYS = names("thresholds")
"""Settings ``thresholds.json`` (and an exported graph) records, compared when they are used."""


def defaults(context: str, offered_only: bool = False, depth: Optional[int] = None) -> dict[str, Any]:
    """``{name: default}`` of ``context`` (for a CLIP tower of ``depth`` blocks, when given); lists as lists.
    ``offered_only``: only its flags."""
    out = {}
    for s in SETTINGS:
        if offered_only and not s.offered_in(context):
            continue
        value = s.default_for(context, depth)
        out[s.name] = list(value) if isinstance(value, tuple) else value
    return out


def normalised(name: str, value: Any) -> Any:
    """A setting's value as records keep it (layer lists as lists of int, numbers by type)."""
    s = BY_NAME[name]
    if value is None or s.role == "weights":
        return value
    if s.many:
        return [s.type(v) for v in value]
    return s.type(value)


def recorded(values: Any, record: str) -> dict[str, Any]:
    """``{name: value}`` of the settings ``record`` carries, read from ``values`` (a mapping, or any
    object with attributes named as the settings); settings it lacks are left out."""
    get = values.get if isinstance(values, Mapping) else (lambda k, d=None: getattr(values, k, d))
    missing = object()
    out = {}
    for name in names(record):
        value = get(name, missing)
        if value is not missing:
            out[name] = normalised(name, value)
    return out


def flag_value(name: str, value: Any) -> str:
    """A setting as it is written on the command line (``--features_list 6 12 18 24``)."""
    if isinstance(value, (list, tuple)):
        return f"--{name} {' '.join(str(v) for v in value)}"
    return f"--{name} {value}"


def same(a: Any, b: Any) -> bool:
    """Equal as settings: layer lists by value, booleans only to booleans, numbers as floats."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return [int(v) for v in a] == [int(v) for v in b]
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str):
        return ALIASES.get(a, a) == ALIASES.get(b, b)
    return a == b


def _problem(s: Setting, value: Any, context: str) -> Optional[str]:
    if s.many:
        if value is None or len(value) == 0:
            return f"--{s.name} needs at least one value"
        items = list(value)
    else:
        items = [value]
    if s.choices and value not in s.choices:
        return f"--{s.name} must be one of {', '.join(s.choices)}, got {value!r}"
    if s.type in (int, float):
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"--{s.name} must be a finite number, got {value!r}"
            if s.minimum is not None and v < s.minimum:
                if s.name == "features_list":
                    return f"--features_list counts CLIP blocks from 1, got {' '.join(map(str, value))}"
                if s.name == "image_size":
                    return f"--image_size must be at least {MIN_IMAGE_SIZE} (one ViT patch), got {value}"
                if s.name == "sigma":
                    return f"--sigma must be a finite number >= 0 (0: no smoothing), got {value}"
                return f"--{s.name} must be at least {s.minimum:g}, got {value}"
    return s.rule(value, context) if s.rule is not None else None


def problems(values: Any, context: str, only: Optional[Iterable[str]] = None) -> list[str]:
    """One line per unusable setting in ``values`` (a mapping or an object with attributes named as
    the settings) for ``context``; settings it lacks are not checked. ``only``: check these names."""
    get = values.get if isinstance(values, Mapping) else (lambda k, d=None: getattr(values, k, d))
    missing = object()
    out = []
    for s in SETTINGS + REFERENCE_SETTINGS:
        if only is not None and s.name not in only:
            continue
        value = get(s.name, missing)
        if value is missing or s.role == "weights":
            continue
        problem = _problem(s, value, context)
        if problem:
            out.append(problem)
    return out


def tower_scaled() -> tuple[str, ...]:
    """Names of the settings whose default follows the CLIP tower's depth (:attr:`Setting.tower_rule`)."""
    return tuple(s.name for s in SETTINGS if s.tower_rule is not None)


def scale_to_tower(values: Any, depth: Optional[int], keep: Iterable[str] = ()) -> None:
    """Give the tower-scaled settings of ``values`` (an object with attributes named as the settings) their
    default for a tower of ``depth`` blocks, except those in ``keep`` (typed, or from a checkpoint) and those
    ``values`` lacks. ``depth=None`` (not known): nothing changes."""
    if depth is None:
        return
    keep = set(keep)
    for s in SETTINGS:
        if s.tower_rule is not None and s.name not in keep and hasattr(values, s.name):
            value = s.tower_rule(depth)
            setattr(values, s.name, list(value) if s.many else value)


def layer_problems(features_list: Sequence[int], depth: Optional[int], tower: str,
                   given: str = "--features_list") -> list[str]:
    """``features_list`` against a vision tower of ``depth`` blocks (``None``: not known yet)."""
    bad = [int(f) for f in features_list if depth is not None and not 1 <= int(f) <= depth]
    if not bad:
        return []
    return [f"{given} {' '.join(map(str, bad))}: the CLIP vision tower ({tower}) has blocks 1 to {depth}"]


def with_settings(cls: type, context: str, name: str, roles: Optional[Sequence[str]] = None) -> type:
    """The dataclass ``cls`` extended by one field per setting ``context`` offers as a flag (of ``roles``,
    when given), defaulting as in ``context``, named ``name`` (the module-level name it is bound to, so
    that it pickles): ``EvalOptions = with_settings(EvalRun, "test", "EvalOptions")``."""
    fields = []
    for s in SETTINGS:
        if not s.offered_in(context) or (roles is not None and s.role not in roles):
            continue
        default = s.default_for(context)
        kind = Optional[s.type] if default is None else (Sequence[s.type] if s.many else s.type)
        fields.append((s.name, kind, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(name, fields, bases=(cls,), namespace={"__doc__": cls.__doc__,
                                                                              "__module__": cls.__module__,
                                                                              "__qualname__": name})


def random_weights(values: Any) -> list[str]:
    """The ``--clip_weights synthetic`` / ``--dino_weights synthetic`` flags among ``values`` (a mapping or an
    object with attributes named as the settings): results made with them are meaningless."""
    get = values.get if isinstance(values, Mapping) else (lambda k, d=None: getattr(values, k, d))
    used = [("clip_weights", get("clip_weights")), ("dino_weights", get("dino_weights") if get("dino_model") not in
                                                    (None, "none") else None)]
    return [f"--{name} synthetic" for name, value in used if value == "synthetic"]


def random_weights_banner(values: Any) -> Optional[str]:
    """One line saying the results are meaningless, when :func:`random_weights` finds any; else ``None``."""
    used = random_weights(values)
    if not used:
        return None
    return (f"RANDOM WEIGHTS ({', '.join(used)}): these numbers are meaningless; the run only exercised the "
            "pipeline")
