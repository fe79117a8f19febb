"""Uploaded files into one new folder of the app's working folder: files under the names the user gave them,
zip archives unpacked with limits.

An archive is unpacked only where every member stays inside the target folder (no absolute
paths, no ``..``), its entries are no more than :attr:`ZipLimits.max_files`, and the bytes
written (counted as they are written, not taken from the archive's headers) stay within
:attr:`ZipLimits.max_bytes`. Only image files are written (what ``predict`` and ``calibrate``
read from folders); links, hidden files and folders (``__MACOSX/``) are left out.
"""
from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from crane.data.folders import is_image_name

CHUNK = 1 << 20


class UploadError(ValueError):
    """An upload cannot be used (one-line message)."""


@dataclass(frozen=True)
class ZipLimits:
    """Limits of one upload's archives together: entries, and bytes unpacked."""

    max_files: int = 10_000
    max_bytes: int = 2_000 * 1024 ** 2


def _unique(folder: Path, name: str) -> Path:
    """``folder / name``, or ``folder / "stem-2.suffix"`` (3, ...) when that is taken."""
    target = folder / name
    number = 2
    while target.exists():
        target = folder / f"{Path(name).stem}-{number}{Path(name).suffix}"
        number += 1
    return target


def _member_path(archive: str, member: zipfile.ZipInfo, target: Path) -> Path:
    """Where ``member`` lands inside ``target``; :class:`UploadError` if it would land outside."""
    name = member.filename.replace("\\", "/")
    relative = PurePosixPath(name)
    if name.startswith("/") or relative.is_absolute() or ".." in relative.parts or ":" in relative.parts[0]:
        raise UploadError(f"{archive}: member {member.filename!r} would be written outside its folder; not unpacked")
    path = (target / Path(*relative.parts)).resolve()
    if not path.is_relative_to(target.resolve()):
        raise UploadError(f"{archive}: member {member.filename!r} would be written outside its folder; not unpacked")
    return path


def unpack(archive: Path, name: str, target: Path, limits: ZipLimits, written: list[int]) -> None:
    """Unpack the image members of the zip ``archive`` (uploaded as ``name``) into the new folder ``target``.

    ``written``: ``[entries, bytes]`` of this upload so far, updated. Raises :class:`UploadError`.
    """
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            written[0] += len(members)
            if written[0] > limits.max_files:
                raise UploadError(f"{name}: more than {limits.max_files} files in the archives of this upload")
            for member in members:
                path = _member_path(name, member, target)
                parts = PurePosixPath(member.filename.replace("\\", "/")).parts
                link = stat.S_ISLNK(member.external_attr >> 16)
                if link or any(p.startswith(".") or p == "__MACOSX" for p in parts) or not is_image_name(parts[-1]):
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as source, open(path, "wb") as sink:
                    while chunk := source.read(CHUNK):
                        written[1] += len(chunk)
                        if written[1] > limits.max_bytes:
                            raise UploadError(f"{name}: unpacks to more than {limits.max_bytes / 1024 ** 2:.0f} MB; "
                                              "not unpacked")
                        sink.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as e:
        raise UploadError(f"{name}: not a readable zip archive ({e})") from None


def stage(uploads: Sequence[Path], folder: Path, limits: ZipLimits = ZipLimits()) -> list[Path]:
    """Place ``uploads`` (paths whose file names are the names the user gave) into the new ``folder``: files
    copied under their names (made unique), ``.zip`` archives unpacked into ``folder/<archive name>/``.

    Returns the files and unpacked folders, in upload order (what ``predict`` is given). On an
    :class:`UploadError` nothing of this upload is kept.
    """
    folder.mkdir(parents=True)
    placed: list[Path] = []
    written = [0, 0]
    try:
        for upload in map(Path, uploads):
            if upload.suffix.lower() == ".zip":
                target = _unique(folder, upload.stem)
                target.mkdir()
                unpack(upload, upload.name, target, limits, written)
            else:
                target = _unique(folder, upload.name)
                shutil.copyfile(upload, target)
            placed.append(target)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return placed
