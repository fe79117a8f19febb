"""One log format for every entry point and process."""
from __future__ import annotations

import logging

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """crane's messages at INFO, other libraries' (open_clip's tokenizer lines, timm) only from WARNING up.
    Safe to call again in spawned processes."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("crane").setLevel(logging.INFO)
