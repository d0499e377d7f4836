"""File hashes as AUTOMATIC1111 computes them (AutoV2 sha256, legacy 8-hex, LoRA addnet) and a persistent cache."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from sdstudio.files.readers import read_safetensors_header

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024  # streaming read size for whole-file hashes
LEGACY_OFFSET = 0x100000  # A1111 `model_hash`: 64 KiB read at 1 MiB
LEGACY_LENGTH = 0x10000

Progress = Callable[[int, int], None]


def _sha256_stream(file, total: int, progress: Progress | None) -> str:
    """sha256 hex of the rest of an open binary file; progress gets (bytes_done, total)."""
    digest = hashlib.sha256()
    done = 0
    while chunk := file.read(CHUNK_BYTES):
        digest.update(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return digest.hexdigest()


def sha256_file(path: str | Path, progress: Progress | None = None) -> str:
    """sha256 (64 hex) of the whole file (A1111 "AutoV2"), read in 8 MiB chunks; progress gets (bytes_done, total)."""
    with open(path, "rb") as file:
        return _sha256_stream(file, os.fstat(file.fileno()).st_size, progress)


def legacy_hash(path: str | Path) -> str:
    """A1111's old `model_hash`: sha256 of the 64 KiB at offset 1 MiB, first 8 hex (short files hash what is there)."""
    with open(path, "rb") as file:
        file.seek(LEGACY_OFFSET)
        return hashlib.sha256(file.read(LEGACY_LENGTH)).hexdigest()[:8]


def addnet_hash(path: str | Path, progress: Progress | None = None) -> str:
    """LoRA "addnet" hash (64 hex): .safetensors hash the bytes after the 8+n header, other files the whole file."""
    if Path(path).suffix.lower() != ".safetensors":
        return sha256_file(path, progress)
    data_start = read_safetensors_header(path).data_start
    with open(path, "rb") as file:
        total = os.fstat(file.fileno()).st_size - data_start
        file.seek(data_start)
        return _sha256_stream(file, total, progress)


class HashCache:
    """JSON file of hashes keyed by absolute path, valid while the file's size and mtime_ns are unchanged."""

    VERSION = 1

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        """Read the cache file; a missing, unreadable or malformed file gives an empty cache (with a warning)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("hash cache %s is unreadable (%s); starting empty", self.path, e)
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            log.warning("hash cache %s has no 'files' table; starting empty", self.path)
            return {}
        return {k: v for k, v in files.items() if isinstance(v, dict)}

    @staticmethod
    def _key_and_stamp(file: str | Path) -> tuple[str, int, int]:
        """Absolute path key, size in bytes and mtime in ns of `file`."""
        resolved = Path(file).resolve()
        st = resolved.stat()
        return str(resolved), st.st_size, st.st_mtime_ns

    def get(self, file: str | Path, kind: str = "sha256") -> str | None:
        """Cached hash of `kind` ("sha256" | "addnet") if the file is unchanged since it was stored, else None."""
        key, size, mtime_ns = self._key_and_stamp(file)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.get("size") != size or entry.get("mtime_ns") != mtime_ns:
                return None
            value = entry.get(kind)
            return value if isinstance(value, str) else None

    def hash(self, file: str | Path, kind: str = "sha256", progress: Progress | None = None) -> str:
        """Hash of `kind` from the cache, or computed, stored and saved; a changed size/mtime drops older hashes."""
        if kind not in ("sha256", "addnet"):
            raise ValueError(f"unknown hash kind {kind!r}; expected 'sha256' or 'addnet'")
        if kind == "addnet" and Path(file).suffix.lower() != ".safetensors":
            kind = "sha256"  # the addnet hash of a non-safetensors file is its whole-file sha256
        cached = self.get(file, kind)
        if cached is not None:
            return cached
        key, size, mtime_ns = self._key_and_stamp(file)
        log.info("hashing %s (%s, %.1f MB)", file, kind, size / 1e6)
        value = sha256_file(file, progress) if kind == "sha256" else addnet_hash(file, progress)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.get("size") != size or entry.get("mtime_ns") != mtime_ns:
                entry = self._entries[key] = {"size": size, "mtime_ns": mtime_ns}
            entry[kind] = value
            self._save_locked()
        return value

    def sha256(self, file: str | Path, progress: Progress | None = None) -> str:
        """Whole-file sha256 (64 hex), cached."""
        return self.hash(file, "sha256", progress)

    def addnet(self, file: str | Path, progress: Progress | None = None) -> str:
        """LoRA addnet hash (64 hex), cached."""
        return self.hash(file, "addnet", progress)

    def _save_locked(self) -> None:
        """Write the cache atomically (temp file + os.replace); caller holds the lock. Failure only warns."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": self.VERSION, "files": self._entries}, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not write hash cache %s: %s", self.path, e)
            tmp.unlink(missing_ok=True)
