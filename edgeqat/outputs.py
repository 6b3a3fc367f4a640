"""The run's output directory: claimed before any training, written atomically, never
anyone else's files.

edgeqat replaces only a directory it made itself: each run directory holds a marker file
(``MARKER``), and so does each temp directory while it is being filled. Anything else at
the output path (a file, a directory with files edgeqat did not write) is refused before
training starts. A lock per path (``~/.cache/edgeqat/locks``, nothing beside the user's
files) keeps two runs from sharing an output or checkpoint directory; temp directories a
killed run left (``.NAME.tmp-PID`` holding the marker, PID dead) are removed by the next
run that claims the same path.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgeqat.errors import UserError

MARKER = ".edgeqat-run"
CHECKPOINT_MARKER = ".edgeqat-checkpoint"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def lock_dir() -> Path:
    """Where the per-path lock files live (``$EDGEQAT_LOCK_DIR`` or ~/.cache/edgeqat/locks)."""
    env = os.environ.get("EDGEQAT_LOCK_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgeqat" / "locks"


class PathLock:
    """An exclusive, non-blocking lock on a path (fcntl; released when the process dies)."""

    def __init__(self, path: Path, what: str):
        self.path = Path(os.path.abspath(path))
        self.what = what
        key = hashlib.sha256(str(self.path).encode()).hexdigest()[:24]
        self.file = lock_dir() / f"{key}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
            os.close(fd)
            raise UserError(f"{self.path}: {self.what} is in use by another edgeqat run "
                            f"({holder}); wait for it to finish or choose another "
                            "--output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock file stays: unlinking it would race a waiter
            self._fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_ours(path: Path, marker: str = MARKER) -> bool:
    return path.is_dir() and (path / marker).is_file()


def _written(run_dir: Path) -> list[str]:
    """The top-level entries edgeqat wrote into ``run_dir`` (its marker lists them)."""
    try:
        return list(json.loads((run_dir / MARKER).read_text()).get("files", [])) + [MARKER]
    except (OSError, ValueError, AttributeError):
        return [MARKER]


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable(path: Path, flag: str) -> None:
    """Raises UserError unless ``path`` (not yet existing) can be created.

    Tries what writing will do, in the nearest existing ancestor (a temp file, removed at
    once), so a read-only file system or a file where a directory must go is found now.
    """
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise UserError(f"{path}: cannot create it, {base} is a file, not a directory; "
                        f"choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgeqat-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{path}: cannot write in {base} ({e.strerror}); choose another "
                        f"{flag}") from None


class OutputDir:
    """One run's output directory.

    ``claim()`` checks and locks it before training; ``write(fill)`` fills a sibling
    temp directory and renames it into place; ``release()`` unlocks. Only a directory that
    holds ``MARKER`` (one edgeqat wrote) or an empty one is ever replaced.
    """

    def __init__(self, path: str | Path, flag: str = "--output_dir"):
        self.path = Path(path)
        self.flag = flag
        self._lock = PathLock(self.path, "the output directory")

    def claim(self) -> None:
        """Raises UserError if the path holds anything but an earlier edgeqat run."""
        why = self._not_replaceable()
        if why:
            raise UserError(why)
        if not self.path.exists():
            check_writable(self.path, self.flag)
        self._lock.acquire()
        self.clean_orphans()

    def _not_replaceable(self) -> str | None:
        """Why the output path may not be replaced (None: absent, empty, or edgeqat's own)."""
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            return (f"{p}: exists and is not a directory edgeqat made; edgeqat never "
                    f"replaces it: choose another {self.flag}")
        if p.is_dir() and any(p.iterdir()) and not _is_ours(p):
            return (f"{p}: holds files edgeqat did not write; edgeqat replaces only its own "
                    f"run directories: choose another {self.flag} (or empty that directory "
                    "yourself)")
        if _is_ours(p):
            extra = sorted(set(os.listdir(p)) - set(_written(p)))
            if extra:
                return (f"{p}: is an edgeqat run directory, but {', '.join(extra[:5])} in it "
                        f"is not edgeqat's; move it out or choose another {self.flag}")
        return None

    def release(self) -> None:
        self._lock.release()

    def _siblings(self, kind: str) -> list[Path]:
        parent = self.path.parent
        if not parent.is_dir():
            return []
        return sorted(parent.glob(f".{self.path.name}.{kind}-*"))

    def clean_orphans(self) -> list[Path]:
        """Removes temp directories of dead runs of this path (only ones holding MARKER)."""
        removed = []
        for tmp in self._siblings("tmp") + self._siblings("old"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) \
                    and _is_ours(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    def write(self, fill: Callable[[Path], None], marker: dict) -> Path:
        """Fills a temp directory with ``fill(tmp)`` and renames it onto the output path.

        Raises:
          UserError: the disk is full (naming the path), or the output path changed under
            the run into something edgeqat does not own.
        """
        out = self.path
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        for stale in (tmp, old):
            if _is_ours(stale):
                shutil.rmtree(stale)
        tmp.mkdir()
        try:
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            fill(tmp)
            files = sorted(os.listdir(tmp))  # what a later run may replace, and only that
            (tmp / MARKER).write_text(json.dumps(marker | {"files": files}, indent=1) + "\n")
            why = self._not_replaceable()  # again: the user may have added files since
            if why:
                raise UserError(f"{why} (nothing was written)")
            if out.exists():
                if not any(out.iterdir()):
                    out.rmdir()  # an empty directory: nothing of anyone's to lose
                else:
                    os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not out.exists():
                os.replace(old, out)  # put the previous run back
            if is_disk_full(e):
                raise UserError(f"{out}: no space left on the device while writing the "
                                "outputs; free some space or choose another "
                                f"{self.flag}") from None
            raise
        return out


def is_disk_full(e: BaseException) -> bool:
    """True for an OSError (or TensorFlow error) that says the disk or quota is full."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def remove_checkpoint(path: str | Path) -> None:
    """Removes a checkpoint directory, but only one edgeqat made (it holds the marker)."""
    p = Path(path)
    if _is_ours(p, CHECKPOINT_MARKER):
        shutil.rmtree(p, ignore_errors=True)


def require_checkpoint_dir(path: str | Path) -> None:
    """Raises UserError unless ``path`` is absent, an empty directory or an edgeqat
    checkpoint (it holds ``CHECKPOINT_MARKER``): the only directories QAT writes into."""
    p = Path(path)
    if p.exists() and not (p.is_dir() and (not any(p.iterdir())
                                           or _is_ours(p, CHECKPOINT_MARKER))):
        raise UserError(f"{p}: qat.checkpoint_dir holds files that are not an edgeqat "
                        "checkpoint; choose another qat.checkpoint_dir (or --output_dir)")


def claim_checkpoint(path: str | Path) -> tuple[PathLock, bool]:
    """Locks a checkpoint directory; returns (lock, whether it already existed).

    Raises:
      UserError: the directory holds files that are not an edgeqat checkpoint, or another
        run holds it.
    """
    p = Path(path)
    require_checkpoint_dir(p)
    if not p.exists():
        check_writable(p, "qat.checkpoint_dir")
    lock = PathLock(p, "the QAT checkpoint directory")
    lock.acquire()
    return lock, _is_ours(p, CHECKPOINT_MARKER)
