"""Input digests: correct, remembered between runs, taken from the Hugging Face hub cache."""

from __future__ import annotations

import hashlib
import os

import pytest

from pera_deploy.io import digests as provenance
from pera_deploy.io.digests import Digests, combined_digest


def test_digest_is_sha256_and_cached(tmp_path, monkeypatch):
    data = tmp_path / "w.safetensors"
    data.write_bytes(b"x" * 100_000)
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    calls = []
    real = provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda p, stop=None: calls.append(p) or real(p, stop))
    for _ in range(2):
        d = Digests(cache_dir=tmp_path / "cache")
        assert d.sha256(data) == want
        d.close()
    assert len(calls) == 1  # the second run found it in the cache
    data.write_bytes(b"y" * 100_000)  # same size, new content: new mtime/ctime, so hashed again
    d = Digests(cache_dir=tmp_path / "cache")
    assert d.sha256(data) == hashlib.sha256(b"y" * 100_000).hexdigest()
    d.close()
    assert len(calls) == 2


def test_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PERA_DEPLOY_CACHE_DIR", "off")
    assert provenance.default_cache_dir() is None
    assert Digests().cache is None


def test_hub_blob_name_is_its_digest(tmp_path, monkeypatch):
    """In the hub cache, snapshots/<rev>/file links to blobs/<sha256>: the name is the digest."""
    blob = tmp_path / "models--x" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not what the name says")
    link = tmp_path / "models--x" / "snapshots" / "rev" / "model.safetensors"
    link.parent.mkdir(parents=True)
    os.symlink(blob, link)
    monkeypatch.setattr(provenance, "sha256_file", lambda p, stop=None: pytest.fail("hashed a hub blob"))
    d = Digests(use_cache=False)
    assert d.sha256(link) == "ab" * 32
    d.close()


def test_combined_digest_is_the_sorted_sha256sum_listing():
    digests = {"b.safetensors": "1" * 64, "a.json": "2" * 64}
    listing = f"{'2' * 64}  a.json\n{'1' * 64}  b.safetensors\n"
    assert combined_digest(digests) == hashlib.sha256(listing.encode()).hexdigest()


def test_closing_abandons_a_file_being_hashed(tmp_path, monkeypatch):
    """A refused input must not keep the process alive hashing a large base in the background."""
    import threading

    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (provenance.CHUNK * 4))
    started, release = threading.Event(), threading.Event()
    real = provenance.sha256_file

    def slow(path, stop=None):
        started.set()
        release.wait(5)
        return real(path, stop)

    monkeypatch.setattr(provenance, "sha256_file", slow)
    digests = Digests(use_cache=False)
    digests.prefetch([big])
    assert started.wait(5)
    digests.close()
    release.set()
    future = next(iter(digests._futures.values()))
    with pytest.raises(provenance.Stopped):
        future.result(timeout=5)
