"""The cost of keying resume and the feature cache on file content (:func:`crane.files.file_identity`).

    python scripts/bench_identity.py --files 5000 --size-kb 300

Writes FILES random files of SIZE_KB into a temporary folder and times, each in a fresh process,
(1) the first run: every file read and hashed (XXH3-128), digests stored in a fresh SQLite cache;
(2) a re-run: the digests read back from the cache by path, size, mtime, inode and ctime;
(3) the old key, ``size:mtime`` from ``os.stat``, for comparison. Prints seconds and ms per file.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from crane import files
files._DIGESTS = files.DigestCache(Path({db!r}))
paths = sorted(Path({folder!r}).iterdir())
start = time.perf_counter()
if {mode!r} == "stat":
    keys = [f"{{p.stat().st_size}}:{{p.stat().st_mtime_ns}}" for p in paths]
else:
    keys = [files.file_identity(p) for p in paths]
print(time.perf_counter() - start)
"""


def run(mode: str, folder: Path, db: Path) -> float:
    code = CHILD.format(repo=str(Path(__file__).resolve().parents[1]), db=str(db), folder=str(folder), mode=mode)
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size-kb", "--size_kb", dest="size_kb", type=int, default=300,
                        help="bytes per file, in KiB (an MVTec AD PNG is about 300-1000 KiB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, db = Path(tmp) / "files", Path(tmp) / "digests.sqlite"
        folder.mkdir()
        for i in range(args.files):
            (folder / f"{i:05d}.png").write_bytes(os.urandom(args.size_kb * 1024))
        rows = [("size:mtime (old key)", run("stat", folder, db)), ("content, first run", run("hash", folder, db)),
                ("content, re-run", run("hash", folder, db))]
    print(f"{args.files} files of {args.size_kb} KiB")
    for name, seconds in rows:
        print(f"{name:22s} {seconds:8.2f} s  {1000 * seconds / args.files:7.3f} ms/file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
