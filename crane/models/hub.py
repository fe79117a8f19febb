"""Locating pretrained files in local caches, and failing fast when offline.

The Hugging Face client retries for about 45 s when the network is down; we
look in the caches first and probe the hub once with a short timeout, so a
missing file is reported within seconds with instructions.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Iterable, Optional

from .errors import WeightsNotFoundError

HF_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub opens within ``timeout`` seconds.

    The probe runs in a daemon thread because the socket timeout does not cover the
    name lookup, which can hang far longer on a machine without network.
    """
    reached = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((HF_HOST, 443), timeout=timeout):
                reached.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return reached.is_set()


def hub_offline(timeout: float = 3.0) -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    return not hub_reachable(timeout)


def find_in_hf_cache(repo_id: str, filenames: Iterable[str], cache_dir: Optional[str] = None) -> Optional[str]:
    """Path of the first of ``filenames`` of ``repo_id`` present in the Hugging Face cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def torch_hub_checkpoint(filename: str) -> Path:
    """Where ``torch.hub`` keeps downloaded checkpoints (``$TORCH_HOME/hub/checkpoints``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def download_hf(repo_id: str, filenames: Iterable[str], cache_dir: Optional[str], what: str, hint: str) -> str:
    """Return a cached or freshly downloaded file of ``repo_id``; fail fast with ``hint`` when offline."""
    filenames = list(filenames)
    cached = find_in_hf_cache(repo_id, filenames, cache_dir)
    if cached:
        return cached
    if hub_offline():
        raise WeightsNotFoundError(
            f"{what} is not in the Hugging Face cache and the hub cannot be reached (offline).\n{hint}"
        )
    from huggingface_hub import hf_hub_download

    errors = []
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, cache_dir=cache_dir)
        except Exception as e:  # the hub reports missing files and network errors alike
            errors.append(f"{name}: {e}")
    raise WeightsNotFoundError(f"could not download {what} from {repo_id}: {'; '.join(errors)}\n{hint}")
