"""Hashes against hashlib over hand-picked byte ranges, and the hash cache's reuse/invalidation/robustness."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.files import hashing
from sdstudio.files.hashing import HashCache, addnet_hash, legacy_hash, sha256_file


@pytest.fixture
def count_sha256(monkeypatch):
    """Count calls to the real whole-file hash (the wrapper still runs it)."""
    calls: list[str] = []
    real = hashing.sha256_file

    def counting(path, progress=None):
        calls.append(str(path))
        return real(path, progress)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    return calls


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_sha256_streams_several_chunks_with_progress(tmp_path):
    data = os.urandom(2 * hashing.CHUNK_BYTES + 12345)
    f = write(tmp_path / "big.bin", data)
    seen: list[tuple[int, int]] = []
    assert sha256_file(f, lambda done, total: seen.append((done, total))) == hashlib.sha256(data).hexdigest()
    assert len(seen) == 3
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (len(data), len(data))


def test_sha256_of_empty_file(tmp_path):
    assert sha256_file(write(tmp_path / "e", b"")) == hashlib.sha256(b"").hexdigest()


def test_legacy_hash_reads_64k_at_1mib(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 50_000)  # > 1.1 MB so the whole window exists
    f = write(tmp_path / "m.ckpt", data)
    window = data[1024 * 1024 : 1024 * 1024 + 64 * 1024]
    assert legacy_hash(f) == hashlib.sha256(window).hexdigest()[:8]
    changed = bytearray(data)
    changed[0] ^= 0xFF  # a byte outside the window does not change it
    changed[-1] ^= 0xFF
    assert legacy_hash(write(tmp_path / "n.ckpt", bytes(changed))) == legacy_hash(f)


def test_legacy_hash_short_files_hash_what_is_there(tmp_path):
    partial = os.urandom(0x100000 + 100)
    assert legacy_hash(write(tmp_path / "p", partial)) == hashlib.sha256(partial[0x100000:]).hexdigest()[:8]
    # A1111 seeks past the end and hashes zero bytes
    assert legacy_hash(write(tmp_path / "s", b"tiny")) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_addnet_hash_skips_safetensors_header(tmp_path):
    f = tmp_path / "lora.safetensors"
    save_file({"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 4)}, str(f), metadata={"ss_x": "1"})
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert raw[8 + n - 1 : 8 + n] in (b"}", b" ")  # the header really ends there
    expected = hashlib.sha256(raw[8 + n :]).hexdigest()
    assert addnet_hash(f) == expected
    assert addnet_hash(f) != hashlib.sha256(raw).hexdigest()


def test_addnet_hash_of_other_formats_is_whole_file(tmp_path):
    data = os.urandom(5000)
    assert addnet_hash(write(tmp_path / "lora.pt", data)) == hashlib.sha256(data).hexdigest()


def test_cache_reuses_hashes_across_instances(tmp_path, count_sha256):
    data = os.urandom(3000)
    f = write(tmp_path / "model.ckpt", data)
    cache_file = tmp_path / "cache.json"
    assert HashCache(cache_file).sha256(f) == hashlib.sha256(data).hexdigest()
    assert len(count_sha256) == 1
    again = HashCache(cache_file)
    assert again.get(f) == hashlib.sha256(data).hexdigest()
    assert again.sha256(f) == hashlib.sha256(data).hexdigest()
    assert len(count_sha256) == 1
    stored = json.loads(cache_file.read_text())["files"][str(f.resolve())]
    assert stored["size"] == 3000 and stored["mtime_ns"] == f.stat().st_mtime_ns


def test_cache_invalidates_on_size_or_mtime_change(tmp_path, count_sha256):
    f = write(tmp_path / "model.ckpt", b"a" * 100)
    cache = HashCache(tmp_path / "cache.json")
    cache.sha256(f)
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size, new content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cache.get(f) is None
    assert cache.sha256(f) == hashlib.sha256(b"b" * 100).hexdigest()
    f.write_bytes(b"c" * 101)  # size change
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cache.sha256(f) == hashlib.sha256(b"c" * 101).hexdigest()
    assert len(count_sha256) == 3


def test_cache_keeps_addnet_and_sha256_side_by_side(tmp_path, count_sha256):
    f = tmp_path / "l.safetensors"
    save_file({"w": torch.zeros(4)}, str(f))
    cache = HashCache(tmp_path / "c.json")
    sha, addnet = cache.sha256(f), cache.addnet(f)
    assert sha != addnet
    fresh = HashCache(tmp_path / "c.json")
    assert (fresh.get(f, "sha256"), fresh.get(f, "addnet")) == (sha, addnet)
    pt = write(tmp_path / "l.pt", b"xyz")
    assert cache.addnet(pt) == cache.sha256(pt) == hashlib.sha256(b"xyz").hexdigest()
    assert count_sha256 == [str(f), str(pt)]  # the .pt addnet hash reused its sha256
    with pytest.raises(ValueError, match="unknown hash kind"):
        cache.hash(f, "md5")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"files": 3}', b"\xff\xfe"])
def test_corrupt_cache_file_warns_and_starts_empty(tmp_path, caplog, content):
    cache_file = write(tmp_path / "cache.json", content)
    f = write(tmp_path / "m.ckpt", b"model")
    with caplog.at_level(logging.WARNING, logger="sdstudio.files.hashing"):
        cache = HashCache(cache_file)
    assert "starting empty" in caplog.text
    assert cache.get(f) is None
    assert cache.sha256(f) == hashlib.sha256(b"model").hexdigest()
    stored = json.loads(cache_file.read_text())["files"][str(f.resolve())]
    assert stored["sha256"] == hashlib.sha256(b"model").hexdigest()


def test_cache_writes_atomically_and_leaves_no_temp_files(tmp_path):
    cache_dir = tmp_path / "sub" / "dir"
    cache = HashCache(cache_dir / "cache.json")
    for i in range(3):
        cache.sha256(write(tmp_path / f"m{i}.ckpt", bytes([i]) * 10))
    assert sorted(p.name for p in cache_dir.iterdir()) == ["cache.json"]
    assert len(json.loads((cache_dir / "cache.json").read_text())["files"]) == 3


def test_cache_is_thread_safe(tmp_path):
    files = [write(tmp_path / f"m{i}.bin", os.urandom(20_000 + i)) for i in range(16)]
    cache = HashCache(tmp_path / "cache.json")
    errors: list[BaseException] = []

    def work(chunk):
        try:
            for f in chunk:
                cache.sha256(f)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reloaded = HashCache(tmp_path / "cache.json")
    assert [reloaded.get(f) for f in files] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
