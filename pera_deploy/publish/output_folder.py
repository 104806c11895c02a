"""Output folders that appear only when complete, never over an input, never half-replaced.

Everything is written into a temporary folder beside the target and renamed into place at
the very end, so a crash, a refused input or a failed check never leaves something that
looks like a finished model. Around that:

* **Inputs are untouchable.** An output that is, contains or lies inside anything the
  command reads is refused (on resolved paths: links and `..` do not get around it), with or
  without --force. --force replaces only an earlier output of pera-deploy (a folder holding
  its manifest) or an empty folder.
* **Owners.** Each temporary folder holds a lock file with its owner's PID and host, locked
  with `fcntl.flock` for as long as the owner lives. Any run into the same parent folder
  removes temporary folders whose lock is free (their owner was killed), and refuses to
  write a target another live run is writing. These steps, and the final renames, happen
  under a lock on the parent folder, so two runs never interleave them.
* **Durability.** Files are fsync'd before the rename and the parent folder after it: after
  a power cut the target is either the old state or the complete new one. A replacement
  (--force) that was cut between its two renames is finished or undone by the next run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import InputError, environment_failure
from .manifest import MANIFEST

TMP_MARK = ".pera-deploy-tmp-"
OLD_MARK = ".pera-deploy-old-"
LOCK_FILE = ".pera-deploy.lock"


def _relation(target: Path, source: Path) -> str | None:
    if target == source:
        return "is"
    if source.is_relative_to(target):
        return "contains"
    if target.is_relative_to(source):
        return "lies inside"
    return None


def refuse_overlap(target: Path, inputs: Iterable[Path]) -> None:
    """An InputError when `target` is, contains or lies inside any of `inputs` (resolved)."""
    real = Path(os.path.realpath(target))
    for source in inputs:
        relation = _relation(real, Path(os.path.realpath(source)))
        if relation:
            raise InputError(f"{target}: the output {relation} the input {source}; "
                             "pera-deploy never writes over what it reads: choose another output")


def check_target(target: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output over an input, or over anything but an earlier pera-deploy output or
    an empty folder; an existing one needs `force`. Run before any work is done."""
    target = Path(target)
    refuse_overlap(target, inputs)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise InputError(f"{target}: output path exists and is not a folder")
    if not target.is_dir():
        return
    present = sorted(p.name for p in target.iterdir())
    if not present:
        return
    if not force:
        raise InputError(f"{target}: output folder exists and is not empty; pass --force to replace it")
    if MANIFEST not in present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise InputError(f"{target}: not an output of pera-deploy (no {MANIFEST}; it holds {shown}); "
                         "--force replaces only those, or an empty folder")


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself, for the few steps that must not interleave."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _owner(tmp: Path) -> tuple[int | None, str]:
    """(PID, host) written in a temporary folder's lock file, if it is still held; (None, "")
    when its owner is gone (or never got to lock it)."""
    try:
        fd = os.open(tmp / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None, ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        text = os.read(fd, 512).decode("utf-8", "replace").split()
        os.close(fd)
        pid = int(text[0]) if text and text[0].isdigit() else -1
        return pid, text[1] if len(text) > 1 else "?"
    os.close(fd)
    return None, ""


def sweep(parent: Path) -> list[str]:
    """Remove temporary folders whose owner is gone, and settle interrupted replacements:
    an old copy whose target exists is removed; one whose target is missing is put back.
    Call with the parent's lock held. Returns what it did, for tests and logs."""
    done = []
    for item in sorted(parent.iterdir()) if parent.is_dir() else []:
        name = item.name
        if not name.startswith(".") or not item.is_dir() or item.is_symlink():
            continue
        if TMP_MARK in name and _owner(item)[0] is None:
            shutil.rmtree(item, ignore_errors=True)
            done.append(f"removed {name}")
        elif OLD_MARK in name:
            target = parent / name[1:name.index(OLD_MARK)]
            if target.exists() or target.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
                done.append(f"removed {name}")
            else:
                os.replace(item, target)
                done.append(f"restored {target.name}")
    return done


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, folders after their contents."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root) / name
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputFolder:
    """A locked temporary folder beside `target` that becomes `target` on `commit()`, or vanishes."""

    def __init__(self, target: str | Path, force: bool = False, inputs: Iterable[Path] = ()):
        self.target = Path(target)
        self.force = force
        self.inputs = list(inputs)
        self.path = self.target.parent / f".{self.target.name}{TMP_MARK}{secrets.token_hex(4)}"
        self._lock_fd: int | None = None
        self._committed = False

    def __enter__(self) -> OutputFolder:
        check_target(self.target, self.force, self.inputs)
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with _folder_lock(parent):
                sweep(parent)
                for other in parent.glob(f".{self.target.name}{TMP_MARK}*"):
                    pid, host = _owner(other)
                    if pid is not None:
                        raise InputError(f"{self.target}: another pera-deploy (PID {pid} on {host}) is writing it "
                                         "now; wait for it to finish, or choose another output")
                self.path.mkdir()
                self._lock_fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                os.write(self._lock_fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as exc:
            self._release()
            shutil.rmtree(self.path, ignore_errors=True)
            raise environment_failure(exc, self.target) from None
        return self

    def commit(self) -> None:
        """Make the temporary folder the target: fsync, then rename (replacing an earlier
        output with --force), then fsync the parent."""
        check_target(self.target, self.force, self.inputs)
        parent = self.target.parent
        try:
            with _folder_lock(parent):
                (self.path / LOCK_FILE).unlink()
                _fsync_tree(self.path)
                old = None
                if self.target.exists():
                    old = parent / f".{self.target.name}{OLD_MARK}{secrets.token_hex(4)}"
                    os.replace(self.target, old)
                os.replace(self.path, self.target)
                _fsync_dir(parent)
                self._committed = True
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise environment_failure(exc, self.target) from None
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()
