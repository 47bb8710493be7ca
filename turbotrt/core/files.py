"""Files written atomically, folders committed whole, paths that stay inside their folder. Torch-free.

- `write_atomic`: a temp file beside the target, fsync'd, then renamed: readers see the old file or
  the new one, never half of one.
- `StagingDir`: a folder built as `<out>.partial` and renamed to `<out>` only when complete;
  removed on every exit path that Python sees (errors, Ctrl-C, SIGTERM), and found and removed
  by the next run after one it cannot see (kill -9, power loss).
- `check_relpath` / `inside`: a path read from a file we did not write (a manifest) is relative,
  normalised, made of plain characters, and reaches its target through no symlink.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

from turbotrt.core.errors import TurbotrtError

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_RELPATH = 255


class UnsafePathError(TurbotrtError):
    """A path from an untrusted file that would leave its folder (or is not plain)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | str) -> Path:
    """Write `data` to `path` through a temp file in the same folder, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")  # unique per writer
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse, before any work, a folder we cannot create files in (read-only file system, permissions).

    A real probe rather than os.access: root passes every permission check but not a read-only mount."""
    folder = Path(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".turbotrt-probe-", dir=folder)
    except OSError as e:
        raise TurbotrtError(f"cannot write into {folder.resolve()} ({e.strerror}); choose another output") from None
    os.close(fd)
    os.unlink(probe)


def check_relpath(rel: object, what: str) -> str:
    """`rel` as a safe relative POSIX path, or UnsafePathError naming `what` it is.

    Safe: a non-empty string, relative, normalised (no `.`, `..` or empty components), each
    component plain (letters, digits, `_ . + -`, not starting with a dot).
    """
    if not isinstance(rel, str) or not rel or len(rel) > MAX_RELPATH:
        raise UnsafePathError(f"{what}: {rel!r} is not a relative path")
    parts = rel.split("/")
    if rel.startswith("/") or any(not _SAFE_COMPONENT.fullmatch(p) for p in parts):
        raise UnsafePathError(f"{what}: {rel!r} is not a plain relative path inside the bundle "
                              "(absolute, '..', hidden or unusual characters)")
    return rel


def check_identifier(name: object, what: str) -> str:
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise UnsafePathError(f"{what}: {name!r} is not a plain name (lowercase letters, digits, '_')")
    return name


def inside(root: str | os.PathLike, rel: str, what: str) -> Path:
    """root/rel after checking `rel` and that no component from root down is a symlink.

    The target need not exist; a symlink anywhere on the way (the target included) is refused,
    so nothing outside `root` is reached through it.
    """
    check_relpath(rel, what)
    path = Path(root)
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise UnsafePathError(f"{what}: {rel!r} goes through a symlink ({path}); bundles hold no symlinks")
    return path


def has_symlink(root: str | os.PathLike) -> Path | None:
    """The first symlink found anywhere under `root` (not following any), or None."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            if p.is_symlink():
                return p
    return None


# --- folders committed whole ---------------------------------------------------------------------------

_OWNER = ".turbotrt-owner"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _terminate_as_exit():
    """Within the block, SIGTERM raises SystemExit in the main thread, so `finally` clauses clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StagingDir:
    """`with StagingDir(out, force, is_replaceable) as stage:` build the folder in `stage.path`
    (`<out>.partial`), then `stage.commit()` puts it at `out`.

    - `out` exists and `force` is off: refused before any work. With `force`, only a folder that
      `is_replaceable(out)` accepts (e.g. a bundle: it has a manifest) is replaced, and only by a
      complete new one; anything else (a folder of user files, a file) is refused.
    - A `<out>.partial` left by a run that was killed is removed (and said so); one that a live
      process is writing is refused.
    - Leaving the block without `commit()` removes `<out>.partial`; SIGTERM counts as leaving.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False,
                 is_replaceable: Callable[[Path], bool] = lambda p: False, what: str = "folder",
                 log: Callable[[str], None] = print):
        self.out = Path(out)
        self.force, self.is_replaceable, self.what, self.log = force, is_replaceable, what, log
        self.path = self.out.with_name(self.out.name + ".partial")
        self.committed = False
        self._signals = None

    def check_target(self) -> None:
        """The refusals that come before any work."""
        out = self.out
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise TurbotrtError(f"{out} exists and is not a folder; choose another output")
        if out.exists():
            if not self.force:
                raise TurbotrtError(f"{out} exists; pass --force to replace it")
            if not self.is_replaceable(out):
                raise TurbotrtError(f"{out} exists and is not a turbotrt {self.what}; --force only replaces a "
                                    f"{self.what}: choose another output or move it away first")
        parent = out.parent if str(out.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TurbotrtError(f"cannot create {parent} ({e.strerror}); choose another output") from None
        check_writable(parent)

    def _clear_stale(self) -> None:
        for stale in (self.path, *self.out.parent.glob(f"{self.out.name}.old-*")):
            if not stale.exists() and not stale.is_symlink():
                continue
            owner = stale / _OWNER
            try:
                pid = int(owner.read_text().strip()) if owner.is_file() else None
            except (OSError, ValueError):
                pid = None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise TurbotrtError(f"{stale} is being written by another turbotrt (pid {pid}); wait for it or "
                                    "choose another output")
            self.log(f"removing {stale}, left by an earlier run that was interrupted")
            _remove(stale)

    def __enter__(self) -> "StagingDir":
        self.check_target()
        self._clear_stale()
        # SIGTERM becomes an exit before the folder exists, so no moment leaves it behind.
        self._signals = _terminate_as_exit()
        self._signals.__enter__()
        try:
            self.path.mkdir(parents=True)
            (self.path / _OWNER).write_text(f"{os.getpid()}\n")
        except BaseException as e:  # SIGTERM, disk full, ...: a folder this call made goes again
            if not isinstance(e, FileExistsError):  # one that was there is another run's
                _remove(self.path)
            self._signals.__exit__(None, None, None)
            raise
        return self

    def commit(self) -> Path:
        """Rename the complete folder into place (replacing the old one last, when forced)."""
        (self.path / _OWNER).unlink(missing_ok=True)
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        self.committed = True
        if old is not None:
            _remove(old)
        return self.out

    def __exit__(self, *exc) -> None:
        try:
            if not self.committed:
                _remove(self.path)
        finally:
            if self._signals is not None:
                self._signals.__exit__(None, None, None)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
