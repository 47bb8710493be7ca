"""Verification that costs once: a bundle's files are hashed on first load, and a stamp of what was
found (per file: the sha256 it matched, size, mtime, ctime, inode, device) is kept in the user cache,
so a later load of an unchanged bundle compares `stat` results instead of rehashing gigabytes.
Torch-free.

A file whose stat differs from its stamp in any field, or whose manifest now lists another sha256,
is hashed again: a changed file is still refused. A file modified less than SETTLE_NS before it was
hashed is not stamped, since file times are coarse (one clock tick, a few ms) and a second write in
the same tick would leave the same times behind. Stamps are keyed by the bundle's real path and can be
deleted at any time; one that cannot be read is ignored, one that cannot be written costs a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from turbotrt.core.cache import cache_dir, warn_once
from turbotrt.core.files import sha256_file, write_atomic

STAMP_VERSION = 1
SETTLE_NS = 2_000_000_000


def stamp_path(root: str | os.PathLike) -> Path:
    real = os.path.realpath(root)
    return cache_dir("verified", hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")


def _stat(path: Path) -> list[int]:
    # fstat of an open file, not stat: NFS revalidates a file's attributes on open (close-to-open
    # consistency) but may answer a plain stat from its attribute cache for up to a minute
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read(path: Path, root: str) -> dict[str, list]:
    """{rel: [sha256, size, mtime_ns, ctime_ns, ino, dev]} from a well-formed stamp, else {}."""
    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError):  # absent, unreadable or corrupt: hash as on a first load
        return {}
    if not isinstance(d, dict) or d.get("version") != STAMP_VERSION or d.get("root") != root:
        return {}
    files = d.get("files")
    if not isinstance(files, dict):
        return {}
    return {rel: rec for rel, rec in files.items()
            if isinstance(rec, list) and len(rec) == 6 and isinstance(rec[0], str)
            and all(type(v) is int for v in rec[1:])}


def changed_files(root: str | os.PathLike, files: dict[str, str], path_of: Callable[[str], Path],
                  manifest_sha256: str = "") -> list[str]:
    """The files (of rel -> expected sha256) whose content differs, hashing only those not stamped."""
    real = os.path.realpath(root)
    where = stamp_path(root)
    old = _read(where, real)
    new: dict[str, list] = {}
    changed = []
    for rel, digest in files.items():
        path = path_of(rel)
        before = _stat(path)
        rec = old.get(rel)
        if rec is not None and rec[0] == digest and rec[1:] == before:
            new[rel] = rec
            continue
        now = time.time_ns()
        if sha256_file(path) != digest:
            changed.append(rel)
        elif _stat(path) == before and now - max(before[1], before[2]) > SETTLE_NS:
            new[rel] = [digest, *before]
    if new != old:
        _write(where, {"version": STAMP_VERSION, "root": real, "manifest_sha256": manifest_sha256, "files": new})
    return changed


def _write(where: Path, stamp: dict) -> None:
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(where, json.dumps(stamp, indent=1, sort_keys=True))
    except OSError as e:
        warn_once("stamps", f"cannot keep verification stamps in {where.parent} ({e.strerror or e}); every load "
                            "hashes the bundle again (set TURBOTRT_CACHE to a writable folder)")
