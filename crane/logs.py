"""One log format for every entry point and process, and one progress display (:func:`progress`)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """crane's messages at INFO, other libraries' (open_clip's tokenizer lines, timm) only from WARNING up.
    Safe to call again in spawned processes."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("crane").setLevel(logging.INFO)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60)} s"


class LineProgress:
    """Progress as plain lines, for a log file: one line every ``interval`` seconds while work goes on
    and one when it ends (``desc: N img in T (rate)``); no carriage returns. The interface of the tqdm
    bars it stands in for: iteration, ``update``, ``set_postfix``, ``write``, ``close``, ``with``."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", file: Optional[TextIO] = None, interval: float = 60.0) -> None:
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.file = file
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def _out(self) -> TextIO:
        return self.file or sys.stderr

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is not None:  # stopped by an error or Ctrl-C: its own message says how far it got
            self.closed = True
        self.close()

    def _line(self, final: bool) -> str:
        elapsed = time.monotonic() - self.start
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 and self.n else ""
        done = f"{self.n} {self.unit}" if final or not self.total else \
            f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} in {_duration(elapsed)}{rate}{extra}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self._line(final=False), file=self._out(), flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, message: str, file: Optional[TextIO] = None) -> None:
        print(message, file=file or self._out(), flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n or self.total:
                print(self._line(final=True), file=self._out(), flush=True)


def _length(iterable: Iterable) -> Optional[int]:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
             enabled: bool = True, file: Optional[TextIO] = None) -> Any:
    """The one progress display of a process: a tqdm bar when ``file`` (stderr) is a terminal, else
    plain lines (:class:`LineProgress`), nothing when not ``enabled`` (other ranks). Only the main
    thread of a process shows progress: background work (metrics, panels) shows none."""
    from tqdm import tqdm

    out = file or sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if getattr(out, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=out, dynamic_ncols=True)
    return LineProgress(iterable, total, desc, unit, file)
