"""The one way crane writes a file, and the one way it tells whether an input file changed.

* :class:`AtomicFile` / :func:`atomic_write`: write to ``.NAME.PID.tmp`` beside the target,
  then ``os.replace`` it into place, so an interrupted run leaves the old file or the new one,
  never half of one; the temporary file is removed on every failure. :func:`write_text`,
  :func:`write_bytes`, :func:`write_json` and :func:`save_torch` are the usual cases.
  New files get the mode the umask gives (not ``mkstemp``'s 0600).
* :func:`file_identity`: what resume, the feature cache and the thresholds compare about an
  input file: its **content** (the 128-bit xxHash XXH3 of the bytes, with the size: a change-detecting
  hash, not a security one). The digest is kept in a
  small cache keyed on path, size, mtime, inode and ctime (:class:`DigestCache`), so an
  unchanged file is read once; a file replaced with its old size and mtime (``touch -r``,
  ``cp -p``, ``rsync -t``) has a new inode or ctime and is read again. Identities recorded in
  an older format are recognised by :func:`is_identity` and never compared as equal.

Torch-free on import (``save_torch`` imports torch when called).
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import IO, Any, Optional, Union

import xxhash

PathLike = Union[str, os.PathLike]

TEMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")
"""Names of :class:`AtomicFile`'s temporary files (``.NAME.PID.tmp``)."""
IDENTITY_PREFIX = "xxh3-128:"
"""Prefix of :func:`file_identity`'s values; anything else was recorded by an older crane."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_path(path: PathLike) -> Path:
    """The temporary name :class:`AtomicFile` writes ``path`` under: ``.NAME.PID.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class AtomicFile:
    """A file written under :func:`temp_path` and moved to ``path`` by :meth:`commit`.

    The target's folder is created. Use it as a context manager (committed on success, discarded on any exception), or keep it
    open over a long run (``predict``'s ``scores.csv``) and call :meth:`commit` / :meth:`discard`.
    """

    def __init__(self, path: PathLike, mode: str = "w", **open_kwargs: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)
        if "b" not in mode:
            open_kwargs.setdefault("encoding", "utf-8")
        self.file: IO = open(self.tmp, mode, **open_kwargs)

    def commit(self) -> Path:
        """Close the temporary file and move it into place; returns the target path."""
        try:
            self.file.close()
            os.chmod(self.tmp, _umask_mode())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file (the target is left as it was)."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: PathLike, mode: str = "w", **open_kwargs: Any) -> AtomicFile:
    """``with atomic_write(path) as f: ...``: see :class:`AtomicFile`."""
    return AtomicFile(path, mode, **open_kwargs)


def write_text(path: PathLike, text: str, newline: Optional[str] = None) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_write(path, "w", newline=newline) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 2, allow_nan: bool = True) -> Path:
    """Write ``obj`` as JSON (with a final newline) atomically."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save`` atomically."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


# ------------------------------------------------------------------------------ identity


def _cache_file() -> Path:
    root = os.environ.get("CRANE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                         os.path.join(os.path.expanduser("~"), ".cache"), "crane")
    return Path(root) / "file_digests.sqlite"


class DigestCache:
    """XXH3-128 digests of files by ``(realpath, size, mtime_ns, inode, ctime_ns)``, in memory and in a
    SQLite file shared by runs (``$CRANE_CACHE``, else ``~/.cache/crane``); where that file cannot be
    written, the digests are kept for this process only."""

    def __init__(self, file: Optional[Path] = None) -> None:
        self.file = file
        self._memory: dict[tuple, str] = {}
        self._db: Optional[sqlite3.Connection] = None
        self._db_failed = False

    def _connect(self) -> Optional[sqlite3.Connection]:
        if self._db is None and not self._db_failed:
            try:
                file = self.file or _cache_file()
                file.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(file, timeout=30, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=OFF")  # a cache: a digest lost in a crash is computed again
                self._db.execute("CREATE TABLE IF NOT EXISTS digest (path TEXT, size INTEGER, mtime INTEGER, "
                                 "inode INTEGER, ctime INTEGER, value TEXT, PRIMARY KEY (path))")
            except (OSError, sqlite3.Error):
                self._db, self._db_failed = None, True
        return self._db

    def digest(self, path: Path) -> str:
        """The :data:`IDENTITY_PREFIX` identity of the existing file ``path``."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = (real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        if key in self._memory:
            return self._memory[key]
        db = self._connect()
        value = None
        if db is not None:
            try:
                row = db.execute("SELECT size, mtime, inode, ctime, value FROM digest WHERE path = ?",
                                 (real,)).fetchone()
                value = row[4] if row is not None and tuple(row[:4]) == key[1:] else None
            except sqlite3.Error:
                value = None
        if value is None:
            h = xxhash.xxh3_128()
            with open(real, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            value = f"{IDENTITY_PREFIX}{h.hexdigest()}:{st.st_size}"
            if db is not None:
                try:
                    db.execute("INSERT OR REPLACE INTO digest VALUES (?, ?, ?, ?, ?, ?)", (real, *key[1:], value))
                except sqlite3.Error:
                    pass
        self._memory[key] = value
        return value


_DIGESTS = DigestCache()


def file_identity(path: Optional[PathLike]) -> Optional[str]:
    """``xxh3-128:HEX:SIZE`` of an existing file's content; ``None`` for ``None`` or a missing file."""
    if path is None:
        return None
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        return None
    return _DIGESTS.digest(p)


def is_identity(value: Any) -> bool:
    """Whether ``value`` is a :func:`file_identity` of this format (older records are ``size:mtime``)."""
    return isinstance(value, str) and value.startswith(IDENTITY_PREFIX)


# ------------------------------------------------------------------------------ outputs


def output_problem(path: PathLike, folder: bool = False, flag: str = "the output") -> Optional[str]:
    """Why ``path`` cannot be written, as one line (``None`` when it can): for a file (``folder=False``) its
    folder must be a folder or creatable, and writable; for a folder (``folder=True``) likewise, and it must
    not be a file. Checked before any model work, so a run never fails late on where its results go."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        return f"{flag} {path} is a file, not a folder"
    if not folder and path.is_dir():
        return f"{flag} {path} is a folder, not a file"
    parent = path if folder else path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None:
        return f"{flag} {path}: no part of its folder exists"
    if not existing.is_dir():
        return f"{flag} {path}: {existing} is a file, so no folder can be made there"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path}: no write permission in {existing}"
    if existing == parent and not folder and path.exists() and not os.access(path, os.W_OK):
        return f"{flag} {path}: the file is read-only"
    return None
