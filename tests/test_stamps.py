"""Verification that costs once: stamps of hashed files in the user cache (TURBOTRT_CACHE)."""

import os
import shutil
import time

import pytest

from turbotrt.core import stamps
from turbotrt.core.bundle import Bundle, BundleError
from turbotrt.core.files import sha256_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOTRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def settle_at_once(monkeypatch):
    """Stamp files however recently their ctime moved (`_settled` moves it); see test_fresh_files_*."""
    monkeypatch.setattr(stamps, "SETTLE_NS", 0)


@pytest.fixture
def hashes(monkeypatch):
    """Count the files hashed by verification."""
    seen = []

    def counting(path):
        seen.append(os.path.basename(path))
        return sha256_file(path)

    monkeypatch.setattr(stamps, "sha256_file", counting)
    return seen


def _settled(folder):
    """Files last modified a minute ago (their ctime is now: hence SETTLE_NS = 0 in these tests)."""
    old = time.time() - 60
    for p in folder.rglob("*"):
        os.utime(p, (old, old))


def _files(tmp_path, **contents):
    root = tmp_path / "b"
    root.mkdir()
    for name, data in contents.items():
        (root / name).write_bytes(data)
    _settled(root)
    digests = {name: sha256_file(root / name) for name in contents}
    return root, digests


def _check(root, digests):
    return stamps.changed_files(root, digests, lambda rel: root / rel)


def test_second_check_hashes_nothing(tmp_path, cache, hashes):
    root, digests = _files(tmp_path, a=b"aaaa", b=b"bbbb")
    assert _check(root, digests) == [] and sorted(hashes) == ["a", "b"]
    hashes.clear()
    assert _check(root, digests) == [] and hashes == []


def test_rewrite_with_the_same_size_is_found(tmp_path, cache, hashes):
    root, digests = _files(tmp_path, a=b"aaaa", b=b"bbbb")
    assert _check(root, digests) == []
    (root / "a").write_bytes(b"xxxx")  # same size, new content, same inode: the mtime moved
    hashes.clear()
    assert _check(root, digests) == ["a"] and hashes == ["a"]


def test_a_new_digest_in_the_manifest_rehashes(tmp_path, cache, hashes):
    root, digests = _files(tmp_path, a=b"aaaa")
    _check(root, digests)
    hashes.clear()
    assert _check(root, {"a": "0" * 64}) == ["a"] and hashes == ["a"]


def test_fresh_files_are_not_stamped(tmp_path, cache, hashes, monkeypatch):
    """A file written a moment ago could be written again within the same clock tick: hash it next time."""
    monkeypatch.setattr(stamps, "SETTLE_NS", 2_000_000_000)
    root, digests = _files(tmp_path, a=b"aaaa")
    _check(root, digests)
    hashes.clear()
    _check(root, digests)
    assert hashes == ["a"]


@pytest.mark.parametrize("junk", [b"{not json", b"[]", b'{"version": 1, "root": 3}',
                                  b'{"version": 1, "root": "%s", "files": {"a": ["x", "y"]}}'])
def test_a_corrupt_stamp_is_ignored(tmp_path, cache, hashes, junk):
    root, digests = _files(tmp_path, a=b"aaaa")
    where = stamps.stamp_path(root)
    where.parent.mkdir(parents=True)
    where.write_bytes(junk.replace(b"%s", os.path.realpath(root).encode()))
    assert _check(root, digests) == [] and hashes == ["a"]
    hashes.clear()
    assert _check(root, digests) == [] and hashes == []  # rewritten whole


def test_a_forged_stamp_for_another_file_does_not_vouch(tmp_path, cache, hashes):
    root, digests = _files(tmp_path, a=b"aaaa")
    _check(root, digests)
    (root / "a").write_bytes(b"zzzz")
    _settled(root)  # mtime back to the stamped value; ctime moved
    hashes.clear()
    assert _check(root, digests) == ["a"]


def test_an_unwritable_cache_warns_once_and_still_verifies(tmp_path, monkeypatch, hashes, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TURBOTRT_CACHE", str(blocker / "cache"))
    monkeypatch.setattr("turbotrt.core.cache._warned", set())
    root, digests = _files(tmp_path, a=b"aaaa")
    assert _check(root, digests) == []
    assert _check(root, {"a": "0" * 64}) == ["a"]
    assert _check(root, digests) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot keep verification stamps" in err and "TURBOTRT_CACHE" in err


def test_bundle_load_verifies_once(tiny_bundle, tmp_path, cache, hashes):
    b = tmp_path / "copy"
    shutil.copytree(tiny_bundle("sagesla"), b)
    _settled(b)
    Bundle.load(b)
    assert "dit.onnx.data" in hashes
    hashes.clear()
    Bundle.load(b)
    assert hashes == []
    with open(b / "dit.onnx.data", "r+b") as f:  # same size, other bytes
        f.seek(100)
        f.write(b"\x01\x02\x03")
    with pytest.raises(BundleError, match="dit.onnx.data changed since export"):
        Bundle.load(b)
    assert hashes == ["dit.onnx.data"]
