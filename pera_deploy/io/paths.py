"""Where the files of a model, adapter or checkpoint folder may really lie, and what a path is
(no heavy imports: the CLI uses this before torch is loaded).

A folder's files must really lie inside it: a link out of it would have its target read,
hashed, and copied into an output that may be published. Two layouts are exceptions, each
recognised by its whole shape, never by a name alone:

* a Hugging Face cache snapshot, `models--ORG--NAME/snapshots/REV/`, whose files link into
  that repository's own `blobs/` (a real folder beside `snapshots/`): only those blobs are
  allowed besides the snapshot, and only there is a blob's name taken as its sha256
  (`hub_blob`);
* the `base/` pera-deploy itself wrote with `--base-files symlink` (merge --keep-branch,
  bundle): see `placed_source`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from ..errors import InputError

PLACED_RECORDS = ("pera_deploy_manifest.json", "bundle.json")  # what marks a folder pera-deploy wrote
MAX_RECORD_BYTES = 16 << 20
MAX_PLACED_DEPTH = 8  # a base placed from a base placed from ...: links of links, not a loop


def real_path(path: Path) -> Path:
    """`path.resolve()`; a symlink loop is one line naming the path (Python 3.11 raises
    RuntimeError for it, later versions OSError)."""
    try:
        return path.resolve()
    except RuntimeError:
        raise InputError(f"{path}: a symlink loop") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path}: a symlink loop") from None
        raise InputError(f"{path}: cannot resolve: {exc.strerror or exc}") from None


def kind_of(path: Path) -> str:
    """What `path` is, in words, for a message: "a file", "a folder", "a FIFO", "missing", ..."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a dangling link" if path.is_symlink() else "missing"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        return f"unreadable ({exc.strerror or exc})"
    except ValueError:  # an embedded NUL byte
        return "not a valid path"
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def require_folder(path: Path, what: str) -> Path:
    """`path` if it is a folder (`what`: "model folder", say); otherwise one line saying what
    it is instead (a file, a device, a FIFO, nothing), where the OS would only say "Not a
    directory"."""
    kind = kind_of(path)
    if kind == "a folder":
        return path
    if kind == "missing":
        raise InputError(f"{path}: {what} not found")
    raise InputError(f"{path}: is {kind}, not a folder; expected a {what}{parent_hint(path)}")


def parent_hint(path: Path) -> str:
    """", give its folder PARENT" when `path` is a file of a model or adapter folder (its
    config.json, a shard, adapter_config.json): the folder is what was meant; "" otherwise."""
    parent = path.parent
    if kind_of(path) == "a file" and any((parent / name).is_file() for name in FOLDER_MARKERS):
        return f" (give the folder it lies in: {parent})"
    return ""


FOLDER_MARKERS = ("config.json", "adapter_config.json")  # what makes a model or an adapter folder one


def require_readable_file(path: Path) -> None:
    """One line saying why `path` cannot be read as a file, if it cannot: missing, a dangling
    link, permission denied, or not a regular file (a FIFO would block the reader forever).
    Opened without blocking, and closed again; readers whose own errors are vaguer (the
    safetensors library reports permission denied as "No such file") ask this first."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{path}: {'a dangling link' if path.is_symlink() else 'file not found'}") from None
    except OSError as exc:
        reason = "a symlink loop" if exc.errno == errno.ELOOP else f"cannot read: {exc.strerror or exc}"
        raise InputError(f"{path}: {reason}") from None
    except ValueError:
        raise InputError(f"{path}: not a valid path") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: is {kind_of(path)}, expected a file")


def contained_file(folder: Path, name: object, where: str, roots: tuple[Path, ...] | None = None) -> Path:
    """`folder / name`, for a file a container names (`where` says which entry: a DCP
    `relative_path`, an index's shard): a relative path without `..`, whose real location
    lies inside `roots` (by default the folder's own real location), and a regular file.

    Anything else is one line naming the entry: `../other/x`, `/abs/x` or a link out would
    read another checkpoint's files in this one's stead, and a FIFO or a device would hang
    or never end."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{where} {name!r} is not a file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"{where} {name!r} lies outside {folder}; refused")
    path = folder / relative
    real = real_path(path)
    if not inside(real, roots if roots is not None else (real_path(folder),)):
        raise InputError(f"{where} {name!r}: {path} leads to {real}, outside {folder}; refused")
    kind = kind_of(path)
    if kind != "a file":
        raise InputError(f"{where} {name!r} is {kind}" + ("" if kind == "missing" else ", expected a file"))
    return path


def checked_file(path: Path, roots: tuple[Path, ...]) -> Path:
    """`path` if it is a regular file that really lies inside `roots` (the folder it belongs
    to: a model folder, an adapter, a training checkpoint); one line naming it otherwise.

    A link that leaves the folder would have its target read, hashed, and copied into an
    output that may be published: a `notes.txt` linked to /etc/shadow must not travel.
    """
    if path.is_symlink():
        target = real_path(path)
        if not target.exists():
            raise InputError(f"{path}: a dangling link (to {os.readlink(path)})")
        if not inside(target, roots):
            where = f"{roots[0]}" + (" and where its files may lie" if len(roots) > 1 else "")
            raise InputError(f"{path}: a link to {target}, outside {where}; refused")
    kind = kind_of(path)
    if kind != "a file":
        raise InputError(f"{path}: is {kind}, expected a file")
    return path


def inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path`, resolved, lies inside one of `roots` (a symlink loop lies nowhere)."""
    try:
        real = path.resolve()
    except (RuntimeError, OSError):
        return False
    return any(real.is_relative_to(root) for root in roots)


# -- the Hugging Face cache ------------------------------------------------------------------------


def hub_blobs(snapshot: Path) -> Path | None:
    """The `blobs/` folder of the repository whose snapshot `snapshot` (a real, resolved path)
    is, when it lies as huggingface_hub lays out its cache: `models--ORG--NAME/snapshots/REV`
    beside a real `blobs/` folder. None for anything else (a folder that is merely under a
    directory named `snapshots`)."""
    snapshots = snapshot.parent
    repo = snapshots.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--") or repo.name == "models--":
        return None
    blobs = repo / "blobs"
    if blobs.is_symlink() or not blobs.is_dir():
        return None
    return blobs


def hub_blob(path: Path) -> Path | None:
    """The blob `path` links to, when `path` is a file of a real Hugging Face cache snapshot
    (see `hub_blobs`) linked straight into its repository's `blobs/`: there alone a blob's
    name is the sha256 of its content (LFS files are content-addressed). None otherwise."""
    try:
        link = path.absolute().parent.resolve() / path.name
        if not link.is_symlink():
            return None
        target = link.resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    for snapshot in link.parents:
        blobs = hub_blobs(snapshot)
        if blobs is not None:
            return target if target.parent == blobs and target.is_file() else None
    return None


# -- a base pera-deploy placed as links --------------------------------------------------------------


def _placed_as_links(record: Path) -> bool:
    """Whether `record` (a pera_deploy_manifest.json or bundle.json, a regular file) says its
    base's files were placed as symlinks."""
    try:
        if record.is_symlink() or not record.is_file() or record.stat().st_size > MAX_RECORD_BYTES:
            return False
        data = json.loads(record.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    sections = [data.get("base_files"), data.get("base")]  # merge --keep-branch's manifest; bundle.json
    return any(isinstance(s, dict) and s.get("placed_as") == "symlink" for s in sections)


def placed_source(folder: Path) -> Path | None:
    """The model folder S whose files `folder`'s links are, when `folder` (a real, resolved path)
    is a `base/` pera-deploy wrote with `--base-files symlink`; None otherwise.

    The rule, so that a folder of links reads nothing that S itself would not: `folder` is
    named `base` and its parent holds pera-deploy's record (pera_deploy_manifest.json or
    bundle.json) saying its base was placed as links; and every link in it is an absolute
    link to S/<its own relative name> (what `model_files.place_files` writes), for one and
    the same folder S other than `folder`, which has a config.json. S is then read by its own
    rules (`allowed_roots(S)`: a link of S's that leaves S is refused as it would be if S
    were given), so the exception lends `folder` exactly S's files. A link that fits no such
    S, or any other folder of links, is left to the ordinary rule: refused.
    """
    if folder.name != "base" or not any(_placed_as_links(folder.parent / name) for name in PLACED_RECORDS):
        return None
    sources: set[Path] = set()
    try:
        for item in folder.rglob("*"):
            if not item.is_symlink():
                continue
            relative = item.relative_to(folder)
            target = Path(os.readlink(item))
            if not target.is_absolute() or ".." in target.parts or target.parts[-len(relative.parts):] != relative.parts:
                return None
            sources.add(target.parents[len(relative.parts) - 1])
    except (OSError, ValueError, RuntimeError):
        return None
    if len(sources) != 1:
        return None
    source = sources.pop()
    try:
        real = source.resolve()
    except (OSError, RuntimeError):
        return None
    if real == folder or not real.is_dir() or not (real / "config.json").is_file():
        return None
    return source


def allowed_roots(folder: Path, _depth: int = 0) -> tuple[Path, ...]:
    """Where the files of the model folder `folder` may really lie: inside the folder itself;
    for a Hugging Face cache snapshot (`hub_blobs`), also in that repository's `blobs/`; for a
    base pera-deploy placed as links (`placed_source`), also wherever its source's may."""
    real = real_path(folder)
    blobs = hub_blobs(real)
    if blobs is not None:
        return (real, blobs)
    source = placed_source(real) if _depth < MAX_PLACED_DEPTH else None
    if source is not None:
        return (real, *allowed_roots(source, _depth + 1))
    return (real,)


def protected_roots(roots: tuple[Path, ...]) -> tuple[Path, ...]:
    """What no output may be written into, for a folder read from `roots`: each root, and for
    a Hub cache `blobs/` the whole repository (its snapshots and refs too)."""
    return tuple(root.parent if root.name == "blobs" and root.parent.name.startswith("models--") else root
                 for root in roots)


# What a path a user gave looks like, model folder or adapter, for the message that says two
# arguments are swapped (issue 24: `merge BASE ADAPTER` said only "found 21 tensors, none of
# them PERA factors"). Only asked once reading the path as what it was given as has failed,
# so a folder that looks like both is never refused on looks alone.
CONFIG, ADAPTER_CONFIG = "config.json", "adapter_config.json"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def _small_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None: anything unreadable, large or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def looks_like_model_folder(path: Path) -> str | None:
    """How `path` looks like a Hugging Face model folder (a config.json naming a model_type or
    an architecture, and weight files, and no adapter_config.json), in words; None if it does not."""
    try:
        if not path.is_dir() or (path / ADAPTER_CONFIG).exists():
            return None
        weights = [p.name for p in path.iterdir() if p.name.endswith(WEIGHTS)]
    except OSError:
        return None
    config = _small_json(path / CONFIG)
    if config is None or not weights or not (config.get("model_type") or config.get("architectures")):
        return None
    kind = config.get("model_type") or config["architectures"][0]
    return f"a {CONFIG} of a {kind} model, {len(weights)} weight file(s)"


def looks_like_adapter(path: Path) -> str | None:
    """How `path` looks like an adapter (a folder with an adapter_config.json, or such a
    folder's weights file), in words; None if it does not."""
    folder = path if path.is_dir() else path.parent
    config = _small_json(folder / ADAPTER_CONFIG)
    if config is None:
        return None
    return f"it holds an {ADAPTER_CONFIG}"
