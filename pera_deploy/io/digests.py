"""sha256 of the inputs, computed beside the work and remembered between runs.

sha256 runs at only a few hundred MB/s on CPUs without SHA extensions: for a 1.5 GB base
that is several seconds, as long as the merge itself. So digests are computed in a
background thread (hashlib releases the GIL) that can start before torch is even
imported, and are kept in a small cache keyed by the file's identity (device, inode,
size, mtime and ctime in ns, as git's index does), so merging many adapters into one
base hashes it once. A file in a real Hugging Face hub cache snapshot is content-addressed:
its blob name *is* its sha256, which is taken as is (`paths.hub_blob` says where that holds).
The cache only saves time: an entry that cannot be read, is not what this version writes,
or does not carry its own check is ignored and rewritten, never trusted and never fatal.

This module imports nothing heavy, so the CLI can start hashing first.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError
from .paths import allowed_roots, hub_blob, inside

CHUNK = 8 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Stopped(Exception):
    """Hashing was abandoned because its Digests was closed."""


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Read into one reused buffer: a fresh 8 MB bytes object per chunk is an allocation
    (and its page faults) per chunk, in a thread running beside the merge."""
    h = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            if stop is not None and stop.is_set():
                raise Stopped(str(path))
            h.update(view[:n])
    return h.hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    """One sha256 for a set of files: that of their `sha256sum` listing, sorted by name.

    `sha256sum FILES | sort -k2 | sha256sum` reproduces it from a shell.
    """
    listing = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    return hashlib.sha256(listing.encode()).hexdigest()


def default_cache_dir() -> Path | None:
    """$PERA_DEPLOY_CACHE_DIR, else $XDG_CACHE_HOME/pera-deploy or ~/.cache/pera-deploy; "off" disables."""
    value = os.environ.get("PERA_DEPLOY_CACHE_DIR")
    if value:
        return None if value.lower() in ("off", "0", "none") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pera-deploy"


class DigestCache:
    """sha256 by file identity, one small file per entry (safe with concurrent runs).

    An entry holds the digest and a check of it bound to the key it was stored under (a
    truncated, bit-flipped, foreign or copied entry fails the check). Entries are read only
    when they are small regular files, without following links, and never block (a FIFO in
    the cache folder is not waited on)."""

    ENTRY_BYTES = 200

    def __init__(self, folder: Path):
        self.folder = folder / "sha256"

    @staticmethod
    def _key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"

    @staticmethod
    def _check(key: str, digest: str) -> str:
        return hashlib.sha256(f"pera-deploy digest cache 2|{key}|{digest}".encode()).hexdigest()[:32]

    def _entry(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def get(self, path: Path) -> str | None:
        try:
            key = self._key(path)
            fd = os.open(self._entry(key), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None
                raw = os.read(fd, self.ENTRY_BYTES + 1)
            finally:
                os.close(fd)
        except (OSError, RuntimeError, ValueError):
            return None
        fields = raw.decode("ascii", "replace").split()
        if len(raw) > self.ENTRY_BYTES or len(fields) != 2 or not _SHA256.fullmatch(fields[0]) \
                or fields[1] != self._check(key, fields[0]):
            return None
        return fields[0]

    def put(self, path: Path, digest: str) -> None:
        try:
            key = self._key(path)
            entry = self._entry(key)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(f"{digest} {self._check(key, digest)}\n")
            os.replace(tmp, entry)
        except (OSError, RuntimeError, ValueError):
            pass  # a cache that cannot be written is only slower


def _hub_blob_digest(path: Path) -> str | None:
    """The sha256 a file of a real Hugging Face hub cache snapshot is stored under (LFS blobs
    are content-addressed); None anywhere else, where a 64-hex name proves nothing."""
    blob = hub_blob(path)
    return blob.name if blob is not None and _SHA256.fullmatch(blob.name) else None


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns): what changes when a file's contents are rewritten or
    replaced. Not ctime, which a hard link to the file (keep-branch's --base-files hardlink)
    also moves."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Digests:
    """sha256 of input files, started early and collected when needed.

    Each file's identity is noted when its digest is taken; `changed()` tells, before an
    output is published, whether any of them was rewritten since, so a manifest never
    records the sha256 of bytes other than those the command read.
    """

    def __init__(self, cache_dir: Path | None = None, use_cache: bool = True):
        folder = cache_dir if cache_dir is not None else default_cache_dir()
        self.cache = DigestCache(folder) if use_cache and folder is not None else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pera-deploy-sha256")
        self._futures: dict[Path, Future[str]] = {}
        self._stop = threading.Event()
        self._identities: dict[Path, tuple[int, int, int, int]] = {}

    def _compute(self, path: Path) -> str:
        identity = file_identity(path)
        self._identities[path] = identity
        known = _hub_blob_digest(path) or (self.cache.get(path) if self.cache else None)
        if known:
            return known
        digest = sha256_file(path, self._stop)
        if file_identity(path) != identity:
            raise InputError(f"{path}: changed while its sha256 was being computed")
        if self.cache:
            self.cache.put(path, digest)
        return digest

    def changed(self) -> Path | None:
        """The first file digested whose identity is no longer what it was (or that is gone)."""
        for path, identity in list(self._identities.items()):
            try:
                if file_identity(path) != identity:
                    return path
            except OSError:
                return path
        return None

    def prefetch(self, paths: list[Path]) -> None:
        for path in paths:
            key = Path(path).absolute()
            if key not in self._futures and key.is_file():
                self._futures[key] = self._pool.submit(self._compute, key)

    def sha256(self, path: Path) -> str:
        key = Path(path).absolute()
        if key not in self._futures:
            self._futures[key] = self._pool.submit(self._compute, key)
        return self._futures[key].result()

    def close(self) -> None:
        """Stop hashing: queued files are dropped and the file being hashed is abandoned within
        one chunk, so a refused input does not keep the process alive hashing a large base."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def likely_inputs(adapter: Path, base: Path) -> list[Path]:
    """The files a merge of `adapter` into `base` will most likely read, to start hashing them.

    Only a head start: the merge asks for exactly the files it uses. Only regular files that
    really lie inside their folder are taken: a link out of it, to a device or to a huge file
    elsewhere, is refused by the merge, and must not keep a hashing thread busy meanwhile.
    """
    def weights(folder: Path) -> list[Path]:
        try:
            names = sorted(os.listdir(folder))
            roots = allowed_roots(folder)
        except (OSError, InputError):
            return []
        wanted = (".safetensors", ".bin", ".index.json")
        return [folder / n for n in names if (n.endswith(wanted) or n == "adapter_config.json")
                and (folder / n).is_file() and inside(folder / n, roots)]

    return weights(Path(adapter)) + weights(Path(base))
