"""Digests of the inputs, computed beside the work, and the manifest that records them.

sha256 runs at a few hundred MB/s on these CPUs, so the base files are hashed in a
background thread (hashlib releases the GIL) while the merge streams; the digests are
written into the output only once both are done.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    """One sha256 for a set of files: that of their `sha256sum` listing, sorted by name.

    `sha256sum FILES | sort -k2 | sha256sum` reproduces it from a shell.
    """
    listing = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    return hashlib.sha256(listing.encode()).hexdigest()


class InputDigests:
    """sha256 of every input file, started now and collected later."""

    def __init__(self, files: dict[str, Path]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pera-deploy-sha256")
        self._futures: dict[str, Future[str]] = {name: self._pool.submit(sha256_file, p) for name, p in files.items()}

    def result(self) -> dict[str, str]:
        try:
            return {name: f.result() for name, f in self._futures.items()}
        finally:
            self._pool.shutdown(wait=False)

    def cancel(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
