"""Output folders that appear only when complete, never over an input, never half-replaced.

Everything is written into a temporary folder beside the target and renamed into place at
the very end, so a crash, a refused input or a failed check never leaves something that
looks like a finished model. Around that:

* **Inputs are untouchable.** An output that is, contains or lies inside anything the
  command reads is refused (on resolved paths: links and `..` do not get around it), with or
  without --force. --force replaces only an earlier output of pera-deploy (a folder whose
  manifest parses as one) or an empty folder; without it, the refusal names what --force
  would delete.
* **Short temporary names.** A run stages its output as `.pera-deploy-tmp-XXXXXXXX/NAME`
  (a box holding the output under its own name, and the lock file), and --force moves the
  output it replaces to `.pera-deploy-old-XXXXXXXX/NAME`. No name is longer than the
  target's own or than 25 characters, so every output name the file system allows works.
* **Owners.** Each box holds a lock file with its owner's PID, host and target name,
  locked with `fcntl.flock` for as long as the owner lives. Any run into the same parent
  folder removes boxes whose lock is free (their owner was killed), and refuses to write a
  target another live run is writing. These steps, and the final renames, happen under a
  lock on the parent folder, so two runs never interleave them.
* **Durability.** Files are fsync'd before the rename and the parent folder after it: after
  a power cut the target is either the old state or the complete new one. A replacement
  (--force) that was cut between its two renames is finished or undone by the next run.
* **Signals.** The renames run with stop signals held (`scoped.held_stop_signals`), and the
  rename of the outermost output settles the run (`scoped.settle`): once the output is in
  place, a SIGINT or SIGTERM can no longer turn the run into a reported failure.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import socket
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .. import scoped
from ..errors import InputError, environment_failure
from ..io.strict_json import read_json
from .manifest import MANIFEST, MAX_MANIFEST_BYTES

TMP_MARK = ".pera-deploy-tmp-"
OLD_MARK = ".pera-deploy-old-"
LOCK_FILE = ".pera-deploy.lock"

TargetCheck = Callable[[Path, bool, Iterable[Path]], None]


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


def listing(names: list[str]) -> str:
    """The first few names, and how many more: for a message that says what a folder holds."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def not_ours(folder: Path) -> str | None:
    """Why `folder` is not an earlier output of pera-deploy, or None when it is one: its
    manifest must parse as a pera-deploy manifest (a JSON object naming the version and the
    command that wrote it). An empty file, or any file of that name, is not enough."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        return f"no {MANIFEST}"
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        return f"its {MANIFEST} is too large to be a pera-deploy manifest"
    try:
        manifest = read_json(path)
    except InputError as exc:
        return f"its {MANIFEST} is not a pera-deploy manifest: {str(exc).removeprefix(f'{path}: ')}"
    if not isinstance(manifest.get("pera_deploy_version"), str) or not isinstance(manifest.get("command"), str):
        return f"its {MANIFEST} is not a pera-deploy manifest (no pera_deploy_version and command)"
    return None


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
    problem = not_ours(target)
    if not force:
        replaced = "" if problem else f" (an earlier output of pera-deploy: --force deletes {listing(present)})"
        raise InputError(f"{target}: output folder exists and is not empty; pass --force to replace it{replaced}")
    if problem:
        raise InputError(f"{target}: not an output of pera-deploy ({problem}; it holds {listing(present)}); "
                         "--force replaces only those, or an empty folder")


def anchored(target: str | Path) -> Path:
    """`target` with its parent resolved: the same place after the working folder moves.

    Run from inside the folder it replaces (`cd out && pera-deploy ... -o ../out`), the
    first rename of --force (or of an empty target) moves the working folder itself, and a
    relative `../out` would then name a place inside the moved-aside copy. The target
    itself is not resolved: a link at the target is the check's to refuse, not to follow."""
    path = Path(target)
    if path.name in ("", ".", ".."):  # `-o .` or `-o ..`: the folder itself
        return path.resolve()
    return path.parent.resolve() / path.name


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself, for the few steps that must not interleave."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _owner(box: Path) -> tuple[int | None, str, str]:
    """(PID, host, target name) written in a box's lock file, if it is still held; (None, "",
    "") when its owner is gone (or never got to lock it)."""
    try:
        fd = os.open(box / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None, "", ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        first, _, name = os.read(fd, 4096).partition(b"\n")
        os.close(fd)
        words = first.decode("utf-8", "replace").split()
        pid = int(words[0]) if words and words[0].isdigit() else -1
        return pid, words[1] if len(words) > 1 else "?", os.fsdecode(name)
    os.close(fd)
    return None, "", ""


def _put_back(old: Path, target: Path) -> bool:
    """An output moved aside by an interrupted replacement: dropped when the new one made it
    into place, put back otherwise (True)."""
    if target.exists() or target.is_symlink():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with suppress(OSError):
                old.unlink()
        return False
    os.replace(old, target)
    return True


def sweep(parent: Path) -> list[str]:
    """Remove boxes whose owner is gone, and settle interrupted replacements: an old copy
    whose target exists is removed; one whose target is missing is put back. Call with the
    parent's lock held. Returns what it did, for tests and logs.

    Also recognises what earlier versions left, named `.NAME.pera-deploy-tmp-X` and
    `.NAME.pera-deploy-old-X` (the target's name inside the temporary one's)."""
    done = []
    for item in sorted(parent.iterdir()) if parent.is_dir() else []:
        name = item.name
        if not name.startswith(".") or not item.is_dir() or item.is_symlink():
            continue
        if TMP_MARK in name and _owner(item)[0] is None:
            shutil.rmtree(item, ignore_errors=True)
            done.append(f"removed {name}")
        elif name.startswith(OLD_MARK):
            done += [f"restored {entry.name}" for entry in list(item.iterdir()) if _put_back(entry, parent / entry.name)]
            shutil.rmtree(item, ignore_errors=True)
            done.append(f"removed {name}")
        elif OLD_MARK in name:
            target = name[1:name.index(OLD_MARK)]
            done.append(f"restored {target}" if _put_back(item, parent / target) else f"removed {name}")
    return done


def _fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (or the file `path`), folders after their contents."""
    if not path.is_dir():
        _fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not (Path(root) / name).is_symlink():
                _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_OPEN: list[object] = []  # the OutputFolders open in this process, outermost first (and scratch marks)


@contextmanager
def scratch_outputs() -> Iterator[None]:
    """Outputs published inside are scratch, not the run's result (reproduce re-derives an
    output into a private folder, then compares): their rename does not settle the run, so a
    stop signal still stops it."""
    mark = object()
    _OPEN.insert(0, mark)
    try:
        yield
    finally:
        _OPEN.remove(mark)


class OutputFolder:
    """A locked temporary folder (or file: `folder=False`) beside `target` that becomes
    `target` on `commit()`, or vanishes. `path` is where to write it: `box/NAME`.

    `check` refuses a target it may not write (`check_target` for folders; a single-file
    output brings its own), before any work and again before the rename."""

    def __init__(self, target: str | Path, force: bool = False, inputs: Iterable[Path] = (), *,
                 check: TargetCheck = check_target, folder: bool = True):
        self.target = anchored(target)
        self.force = force
        self.inputs = list(inputs)
        self.check = check
        self.folder = folder
        self.box = self.target.parent / f"{TMP_MARK}{secrets.token_hex(4)}"
        self.path = self.box / self.target.name
        self._lock_fd: int | None = None
        self._committed = False

    def __enter__(self) -> OutputFolder:
        self.check(self.target, self.force, self.inputs)
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with _folder_lock(parent):
                sweep(parent)
                for other in parent.iterdir():
                    if other.name.startswith(TMP_MARK):
                        pid, host, name = _owner(other)
                        if pid is not None and name == self.target.name:
                            raise InputError(f"{self.target}: another pera-deploy (PID {pid} on {host}) is writing it "
                                             "now; wait for it to finish, or choose another output")
                self.box.mkdir()
                self._lock_fd = os.open(self.box / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                os.write(self._lock_fd, f"{os.getpid()} {socket.gethostname()}\n".encode() + os.fsencode(self.target.name))
                if self.folder:
                    self.path.mkdir()
        except OSError as exc:
            self._release()
            shutil.rmtree(self.box, ignore_errors=True)
            raise environment_failure(exc, self.target) from None
        _OPEN.append(self)
        return self

    def commit(self) -> None:
        """Make the staged output the target: fsync it, rename it into place (moving an
        earlier output aside first, with --force), fsync the parent. The renames run with stop
        signals held, and the outermost output's rename settles the run."""
        self.check(self.target, self.force, self.inputs)
        parent = self.target.parent
        try:
            with _folder_lock(parent):
                _fsync_tree(self.path)
                old = None
                with scoped.held_stop_signals():
                    if self.target.is_dir() and not self.target.is_symlink():  # os.replace replaces files only
                        old = parent / f"{OLD_MARK}{secrets.token_hex(4)}"
                        old.mkdir()
                        os.replace(self.target, old / self.target.name)
                    try:
                        os.replace(self.path, self.target)
                    except OSError:
                        if old is not None:  # put the earlier output back at once, not at the next run's sweep
                            with suppress(OSError):
                                os.replace(old / self.target.name, self.target)
                                old.rmdir()
                        raise
                    self._committed = True
                    if _OPEN and _OPEN[0] is self:
                        scoped.settle()
                _fsync_dir(parent)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                self._remove_box()
        except OSError as exc:
            raise environment_failure(exc, self.target) from None
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove_box(self) -> None:
        self._release()
        shutil.rmtree(self.box, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        with suppress(ValueError):
            _OPEN.remove(self)
        self._remove_box()
