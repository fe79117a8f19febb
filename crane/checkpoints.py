"""What a prompt-learner checkpoint says about the model it belongs to.

A checkpoint is ``{"prompt_learner": state_dict}`` (the official format, which the
published code reads). Checkpoints written by our ``train.py`` carry one more key,
``"crane"``: ``{"model": {setting: value}, "train": {...}}``, the model settings
they were trained with (the published code ignores extra keys). The 20 official
checkpoints carry none, so they are recognised by SHA-256 and get their published
settings from :data:`OFFICIAL_SETTINGS`.

Torch-free on import (``hashlib`` only), so command lines can check a checkpoint
before loading any model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from crane.errors import CraneError
from crane.settings import CHECKPOINT_KEYS, DEFAULT_CLIP_MODEL, flag_value, same

METADATA_KEY = "crane"
"""Extra top-level key of our checkpoints (ignored by the published ``test.py``)."""


CRANE = {"clip_model": DEFAULT_CLIP_MODEL, "dino_model": "none", "features_list": [6, 12, 18, 24], "soft_mean": True}
"""Published settings of the official Crane checkpoints (``test.sh``)."""
CRANE_PLUS = {"clip_model": DEFAULT_CLIP_MODEL, "dino_model": "dinov2", "features_list": [24]}
"""Published settings of the official Crane+ checkpoints; ``soft_mean`` varies by dataset in ``test.sh``."""

_OFFICIAL_SUMS = {
    "trained_on_mvtec_crane": ("e6b84fa9bbbc9161f161d206611051e56c46768ec6c00dc7fed019c9b36a66db",
                               "46916c243fd8ee3432fc0e3c8029b187639d2f072cc5432fe96543f5b09761dd",
                               "efa1cba8f434fb79e958e68e7fc49747350937f2d8c8d52049283cc93c89371a",
                               "89f3da4238935112d3f59b22eff9693c00a3246285b8420ae16d1dbc9ad9a32d",
                               "dc9bf1584c8abd8744f39e9607fdea8a04c8d30aa147de595d22bf444488e4c8"),
    "trained_on_mvtec_cranep": ("233cc4e623716f1aa26ebe374dd11aa7d77205266a52902837857c5a0fdc9e21",
                                "c9c8dedd84833b494d9b691622dca75ee6ec2de2405ec45cf22c89e74ceaad12",
                                "09ba665ba63ff2aba053806732e9f011ae4b2247836e8d09c357da8f0ad4629f",
                                "0760ccfe9ddb65280f347e7dda398e6e84c0747656d7ec428aeaa473838f587a",
                                "9163f13a9c0a75ac63de16239b850cf70d366b5591b083bea2c0c41e76beed53"),
    "trained_on_visa_crane": ("66e740da08875bf6b500dee72d6ff0c2dbc80079ad7cecaf25da74a536978f86",
                              "adc4204f0315c214ed7edf4608ab1fd7319bc483a7808998ee9bcefce08fcec5",
                              "14be2ff693e824b58c5b0dcf6b64164c92e015dac32f3242a754ac8650877737",
                              "e4b3d9c8c384f7afdfeab9b03b7cc900c1d17fefb3990db75a12470a360ed7b4",
                              "66d070e3b72b61704495bdadd0f8c4979b62a23ca7211cfe08bd08ec7c0ab831"),
    "trained_on_visa_cranep": ("fa359b2419c851339d3f79684924d55d1ae61fe858a5845b9665e21b873dd5fa",
                               "60ca0fc334afce661fdbc4c49743aa84a0f13658688d248cff3d6f40c22abded",
                               "f8fa69e3d2cb20c9d851c1e2d0a446f11a731c6e02011dfa8b402cdb04de9563",
                               "e3bfeee344cd028f676be37a6531c1e8a77873f1f7c9ce9f6364a937f3df7fca",
                               "732c7d1b76745950c56b0f9846f46f297619dcbb1db69a61e7b8fa5609ac10ab"),
}


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One of the 20 official checkpoints: its run name, epoch and published model settings."""

    run_name: str
    epoch: int
    settings: Mapping[str, Any]

    @property
    def relpath(self) -> str:
        """``trained_on_X_Y/epoch_K.pth`` (its place under ``checkpoints/``)."""
        return f"{self.run_name}/epoch_{self.epoch}.pth"


OFFICIAL: dict[str, OfficialCheckpoint] = {
    sha: OfficialCheckpoint(name, epoch, CRANE_PLUS if name.endswith("cranep") else CRANE)
    for name, sums in _OFFICIAL_SUMS.items() for epoch, sha in enumerate(sums, start=1)
}
"""SHA-256 -> official checkpoint."""

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes (cached per path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@dataclass
class CheckpointInfo:
    """What is known about a checkpoint file without building a model.

    ``settings``: model settings (flag names, :data:`CHECKPOINT_KEYS`) the checkpoint
    records or, for an official checkpoint, its published settings; empty when unknown.
    ``official``: the official checkpoint it is, if any. ``run_name``: the folder name
    results go under (the official run name, else the checkpoint's parent folder).
    """

    path: Path
    sha256: str
    settings: dict[str, Any] = field(default_factory=dict)
    official: Optional[OfficialCheckpoint] = None
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        if self.official is not None:
            return self.official.run_name
        return self.path.resolve().parent.name

    @property
    def source(self) -> str:
        """How the settings are known, for messages."""
        if self.official is not None:
            return f"official checkpoint {self.official.relpath}"
        return f"checkpoint {self.path}" if self.settings else f"checkpoint {self.path} (records no settings)"


def describe(path: Union[str, os.PathLike], metadata: Optional[Mapping[str, Any]] = None) -> CheckpointInfo:
    """:class:`CheckpointInfo` of ``path``; ``metadata`` is the checkpoint's ``"crane"`` entry
    when the caller has already loaded it (else only the official table is consulted)."""
    path = Path(path)
    sha = sha256_file(path)
    official = OFFICIAL.get(sha)
    if official is not None:
        return CheckpointInfo(path, sha, dict(official.settings), official)
    metadata = metadata or {}
    model = metadata.get("model", {}) if isinstance(metadata, Mapping) else {}
    settings = {k: model[k] for k in CHECKPOINT_KEYS if k in model}
    train = dict(metadata.get("train", {})) if isinstance(metadata, Mapping) else {}
    return CheckpointInfo(path, sha, settings, None, train)


def metadata_entry(model_settings: Mapping[str, Any], train_settings: Optional[Mapping[str, Any]] = None
                   ) -> dict[str, Any]:
    """The ``"crane"`` entry our ``train.py`` writes beside ``"prompt_learner"``."""
    model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_settings.items() if k in CHECKPOINT_KEYS}
    return {"model": model, "train": dict(train_settings or {})}


class CheckpointError(CraneError):
    """A file is not a usable prompt-learner checkpoint, or contradicts the flags given (one-line message)."""


def read_checkpoint(path: Union[str, os.PathLike]) -> tuple[dict[str, Any], CheckpointInfo]:
    """Load ``path`` (CPU, ``weights_only``) -> (its ``prompt_learner`` state dict, :class:`CheckpointInfo`).

    Raises :class:`CheckpointError` with one line when the file is missing, is not a torch file,
    or holds no ``prompt_learner`` entry.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    expected = "a torch file holding {'prompt_learner': state_dict}, as train.py writes"
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(f"{path} is not a Crane checkpoint ({expected}): not a torch file, or truncated")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is not a Crane checkpoint ({expected}): it holds Python objects besides "
                              "tensors, which are not loaded") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a readable checkpoint ({expected}): truncated or damaged "
                              f"({reason[:120]})") from None
    if not isinstance(ckpt, dict) or "prompt_learner" not in ckpt or not isinstance(ckpt["prompt_learner"], dict):
        found = sorted(map(str, ckpt))[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a Crane checkpoint: expected a dict with key 'prompt_learner', "
                              f"found {found}")
    return ckpt["prompt_learner"], describe(path, ckpt.get(METADATA_KEY))


def apply_settings(options: Any, explicit: Any, info: CheckpointInfo, force: bool = False) -> list[str]:
    """Fill ``options`` (attributes named as the flags) from the checkpoint's model settings.

    A setting whose flag is in ``explicit`` (given on the command line) keeps the flag's value; if it
    contradicts the checkpoint, :class:`CheckpointError` names both, unless ``force`` (then the flag
    wins and a warning line is returned). Other settings take the checkpoint's value. Returns notes.
    """
    notes = []
    for key, value in info.settings.items():
        if key in explicit:
            if not same(getattr(options, key), value):
                clash = (f"{flag_value(key, getattr(options, key))} contradicts the {info.source}, which was "
                         f"trained/published with {flag_value(key, value)}")
                if not force:
                    raise CheckpointError(f"{clash}; drop the flag, or pass --force to run it anyway")
                notes.append(f"warning: {clash} (--force: using the flag)")
            continue
        setattr(options, key, list(value) if isinstance(value, tuple) else value)
    return notes


def official_at(path: Union[str, os.PathLike]) -> Optional[OfficialCheckpoint]:
    """The official checkpoint the file at ``path`` is (by SHA-256), else ``None`` (also for no file)."""
    path = Path(path).expanduser()
    return OFFICIAL.get(sha256_file(path)) if path.is_file() else None


def replace_problem(path: Union[str, os.PathLike], overwrite: bool, flag: str = "the output") -> Optional[str]:
    """Why the file at ``path`` must not be replaced, as one line (``None`` when it may): an official
    checkpoint never, any other existing file only with ``--overwrite``."""
    path = Path(path).expanduser()
    official = official_at(path)
    if official is not None:
        return (f"{flag} {path} is the shipped official checkpoint {official.relpath}, which crane never "
                "replaces; choose another file")
    if path.exists() and not overwrite:
        return f"{flag} {path} already exists; choose another file, or pass --overwrite to replace it"
    return None


SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"
"""The checkpoints that ship with crane: the source tree's ``checkpoints/`` (a clone, or an editable
install; a plain wheel does not carry them: pass ``--checkpoint FILE`` there)."""


def named_checkpoint(model_name: str, epoch: int) -> Path:
    """``checkpoints/MODEL_NAME/epoch_EPOCH.pth`` under the current folder when it exists there, else the one
    that ships with crane (:data:`SHIPPED`) when that exists, else the former (for the error message)."""
    relative = Path("checkpoints") / model_name / f"epoch_{epoch}.pth"
    shipped = SHIPPED / model_name / f"epoch_{epoch}.pth"
    return shipped if not relative.is_file() and shipped.is_file() else relative
