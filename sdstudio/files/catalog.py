"""The model catalog: checkpoints, VAEs, LoRAs and embeddings of an A1111-style data dir, with hashes and metadata."""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdstudio.errors import InvalidRequestError, SDStudioError
from sdstudio.files.hashing import HashCache, legacy_hash
from sdstudio.files.readers import read_safetensors_header

log = logging.getLogger(__name__)

KINDS = ("checkpoint", "vae", "lora", "embedding")
# A1111 lists .ckpt/.safetensors checkpoints; .pt/.pth full checkpoints exist too, so they are accepted.
CHECKPOINT_EXTS = {".safetensors", ".ckpt", ".pt", ".pth"}
VAE_EXTS = {".safetensors", ".ckpt", ".pt"}  # A1111 sd_vae: models/VAE/**/*.{ckpt,pt,safetensors}
VAE_SUFFIXES_IN_CHECKPOINTS = tuple(f".vae{ext}" for ext in VAE_EXTS)  # model.vae.pt beside checkpoints is a VAE
LORA_EXTS = {".safetensors", ".pt", ".ckpt"}  # A1111 networks.list_available_networks
EMBEDDING_EXTS = {".safetensors", ".pt", ".bin"}
PREVIEW_EXTS = ("png", "jpg", "jpeg", "webp", "gif")  # A1111 default_allowed_preview_extensions
FORBIDDEN_LORA_ALIASES = {"none"}
HASH_QUERY = re.compile(r"[0-9a-fA-F]{8,64}")
CHECKSUM_SUFFIX = re.compile(r"\s*\[[^]]+]\s*$")  # A1111 re_strip_checksum: "name [abc123]" -> "name"


def _is_vae_file(filename: str) -> bool:
    """True for "*.vae.{ckpt,pt,safetensors}", which A1111 lists as VAEs and not as checkpoints."""
    return filename.lower().endswith(VAE_SUFFIXES_IN_CHECKPOINTS)


@dataclass(frozen=True)
class _Source:
    """One folder (relative to the data dir) scanned for one kind, and which file names it accepts."""

    kind: str
    folder: str
    accepts: Callable[[str], bool]


def _ext_in(exts: set[str], exclude_vae: bool = False) -> Callable[[str], bool]:
    """File-name filter: lower-cased extension in `exts` (and not a *.vae.* file when `exclude_vae`)."""
    return lambda n: os.path.splitext(n)[1].lower() in exts and not (exclude_vae and _is_vae_file(n))


SOURCES = (
    _Source("checkpoint", "models/Stable-diffusion", _ext_in(CHECKPOINT_EXTS, exclude_vae=True)),
    _Source("vae", "models/VAE", _ext_in(VAE_EXTS)),
    _Source("vae", "models/Stable-diffusion", _is_vae_file),
    _Source("lora", "models/Lora", _ext_in(LORA_EXTS)),
    _Source("lora", "models/LyCORIS", _ext_in(LORA_EXTS)),
    _Source("embedding", "models/embeddings", _ext_in(EMBEDDING_EXTS)),
    _Source("embedding", "embeddings", _ext_in(EMBEDDING_EXTS)),
)


@dataclass
class CatalogEntry:
    """One model file: names as A1111 forms them, cheap and full hashes, metadata, preview and user metadata."""

    kind: str  # "checkpoint" | "vae" | "lora" | "embedding"
    path: Path
    name: str  # path relative to its models folder, "/" separators: "sub/model.safetensors"
    stem: str  # file name minus its last extension: "model"
    model_name: str  # A1111: name minus extension, "/" -> "_"
    size: int  # bytes
    mtime: float  # seconds since the epoch
    sha256: str | None  # 64 hex, None until hashed
    legacy_hash: str  # 8 hex, A1111's old model hash
    metadata: dict[str, Any]  # safetensors __metadata__, "{..."-values json-decoded; {} otherwise
    preview: Path | None
    user_metadata: dict  # <stem>.json beside the file, else {}
    alias: str | None = None  # LoRA only: ss_output_name else stem (duplicates, "none" -> stem)
    addnet_hash: str | None = None  # LoRA only: 64 hex (or the file's sshs_model_hash)
    error: str | None = None  # why the file could not be read, if it could not
    mtime_ns: int = field(default=0, repr=False)

    @property
    def short_hash(self) -> str | None:
        """sha256[:10] (A1111 "AutoV2" short hash), None before hashing."""
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        """A1111 title: "sub/model.safetensors [0123456789]", or just the name before hashing."""
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name

    @property
    def basename(self) -> str:
        """File name with extension (A1111's VAE key)."""
        return self.path.name

    def _text_keys(self) -> list[str]:
        """Names this entry answers to, in A1111 lookup priority (title first, hashes separately)."""
        keys = [self.title, self.name, self.basename, self.stem, self.model_name]
        if self.kind == "checkpoint":
            keys.append(f"{self.name} [{self.legacy_hash}]")
        if self.alias:
            keys.append(self.alias)
        return keys

    def _hash_keys(self) -> list[str]:
        """Lower-case hex hashes this entry answers to."""
        keys = [self.sha256[:10], self.sha256[:12], self.sha256] if self.sha256 else []
        if self.kind == "checkpoint":
            keys.append(self.legacy_hash)
        if self.addnet_hash:
            keys += [self.addnet_hash[:12], self.addnet_hash]
        return keys


@dataclass
class CatalogChanges:
    """What one refresh found, per kind: names of entries added, changed (size or mtime) and removed."""

    added: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    changed: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    removed: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def __bool__(self) -> bool:
        return any(names for table in (self.added, self.changed, self.removed) for names in table.values())


def decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """A1111 `read_metadata_from_safetensors`: string values starting with "{" are json-decoded when they parse."""
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        decoded[key] = value
        if isinstance(value, str) and value.startswith("{"):
            try:
                decoded[key] = json.loads(value)
            except ValueError:
                pass
    return decoded


def find_preview(path: Path) -> Path | None:
    """First existing <stem>.<ext> or <stem>.preview.<ext> beside `path`, ext in png, jpg, jpeg, webp, gif."""
    base = path.with_suffix("")
    for ext in PREVIEW_EXTS:
        for candidate in (base.with_name(f"{base.name}.{ext}"), base.with_name(f"{base.name}.preview.{ext}")):
            if candidate.is_file():
                return candidate
    return None


def read_user_metadata(path: Path) -> dict:
    """A1111 user metadata: <stem>.json beside `path` as a dict; {} when missing or unreadable (with a warning)."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return {}
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("ignoring user metadata %s: %s", json_path, e)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring user metadata %s: not a JSON object", json_path)
        return {}
    return data


def _walk(root: Path) -> Iterator[Path]:
    """Files under `root` recursively, following links once, skipping hidden files and folders."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to a folder already listed
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith("."):
                yield Path(dirpath, filename)


class Catalog:
    """Model files under an A1111-layout data dir; `refresh()` picks up additions, changes and removals."""

    def __init__(self, data_dir: Path, hash_cache: HashCache | None = None, hash_on_scan: bool = True):
        self.data_dir = Path(data_dir)
        if hash_cache is None:  # beside A1111's own cache/ folders, under a name of our own
            hash_cache = HashCache(self.data_dir / "cache" / "sdstudio-hashes.json")
        self.hash_cache = hash_cache
        self.hash_on_scan = hash_on_scan
        self._lock = threading.RLock()
        self._entries: dict[str, dict[Path, CatalogEntry]] = {k: {} for k in KINDS}
        self.refresh()

    # ---- scanning -------------------------------------------------------------------------------------------------

    def _scan(self) -> dict[str, dict[Path, tuple[Path, os.stat_result]]]:
        """Every model file on disk: kind -> path -> (its models folder, stat)."""
        found: dict[str, dict[Path, tuple[Path, os.stat_result]]] = {k: {} for k in KINDS}
        for source in SOURCES:
            root = self.data_dir / source.folder
            if not root.is_dir():
                continue
            for path in _walk(root):
                if not source.accepts(path.name):
                    continue
                try:
                    st = path.stat()
                except OSError as e:
                    log.warning("skipping %s: %s", path, e)
                    continue
                if source.kind == "embedding" and st.st_size == 0:  # A1111 skips empty embedding files
                    continue
                found[source.kind].setdefault(path, (root, st))
        return found

    def _read_entry(self, kind: str, path: Path, root: Path, st: os.stat_result) -> CatalogEntry:
        """Build an entry: names, legacy hash, safetensors metadata; a bad file gets `error` set instead of raising."""
        name = path.relative_to(root).as_posix()
        entry = CatalogEntry(
            kind=kind, path=path, name=name, stem=path.stem, model_name=os.path.splitext(name)[0].replace("/", "_"),
            size=st.st_size, mtime=st.st_mtime, mtime_ns=st.st_mtime_ns, sha256=None, legacy_hash="",
            metadata={}, preview=find_preview(path), user_metadata=read_user_metadata(path),
        )
        try:
            entry.legacy_hash = legacy_hash(path)
            if path.suffix.lower() == ".safetensors":
                entry.metadata = decode_metadata(read_safetensors_header(path).metadata)
        except (SDStudioError, OSError, ValueError) as e:
            entry.error = str(e)
            log.warning("%s %s: %s", kind, path, e)
        self._fill_hashes(entry, compute=self.hash_on_scan)
        return entry

    def _fill_hashes(self, entry: CatalogEntry, compute: bool) -> None:
        """Set sha256 (and a LoRA's addnet hash) from the cache, computing missing ones when `compute`."""
        cache = self.hash_cache
        try:
            if entry.sha256 is None:
                entry.sha256 = cache.sha256(entry.path) if compute else cache.get(entry.path, "sha256")
            if entry.kind == "lora" and entry.addnet_hash is None:
                sshs = entry.metadata.get("sshs_model_hash")
                if isinstance(sshs, str) and sshs:
                    entry.addnet_hash = sshs  # A1111 prefers the hash stored by the trainer
                elif entry.error is None:
                    entry.addnet_hash = cache.addnet(entry.path) if compute else cache.get(entry.path, "addnet")
        except (SDStudioError, OSError, ValueError) as e:
            entry.error = entry.error or str(e)
            log.warning("cannot hash %s: %s", entry.path, e)

    def refresh(self) -> CatalogChanges:
        """Rescan the folders; unchanged files keep their entries (no header re-read, no re-hash)."""
        with self._lock:
            changes = CatalogChanges()
            for kind, on_disk in self._scan().items():
                old = self._entries[kind]
                new: dict[Path, CatalogEntry] = {}
                for path, (root, st) in on_disk.items():
                    entry = old.get(path)
                    if entry is not None and (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns):
                        entry.preview = find_preview(path)
                        entry.user_metadata = read_user_metadata(path)
                        new[path] = entry
                        continue
                    new[path] = self._read_entry(kind, path, root, st)
                    (changes.added if entry is None else changes.changed)[kind].append(new[path].name)
                changes.removed[kind] = [e.name for p, e in old.items() if p not in new]
                self._entries[kind] = new
            self._assign_lora_aliases()
            for table in (changes.added, changes.changed, changes.removed):
                for names in table.values():
                    names.sort(key=str.lower)
            if changes:
                log.info("catalog refreshed: added %s, changed %s, removed %s",
                         changes.added, changes.changed, changes.removed)
            return changes

    def _assign_lora_aliases(self) -> None:
        """A1111 alias: ss_output_name else stem; an alias that is "none", shared, or another LoRA's stem -> stem."""
        loras = list(self._entries["lora"].values())
        wanted = {id(e): str(e.metadata.get("ss_output_name") or e.stem) for e in loras}
        alias_count = Counter(alias.lower() for alias in wanted.values())
        stem_count = Counter(e.stem.lower() for e in loras)
        for e in loras:
            alias = wanted[id(e)].lower()
            clashes = alias_count[alias] > 1 or stem_count[alias] > (alias == e.stem.lower())
            e.alias = e.stem if alias in FORBIDDEN_LORA_ALIASES or clashes else wanted[id(e)]

    # ---- listing ---------------------------------------------------------------------------------------------------

    def entries(self, kind: str) -> list[CatalogEntry]:
        """Entries of one kind, sorted by name case-insensitively."""
        if kind not in KINDS:
            raise InvalidRequestError("kind", f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
        with self._lock:
            return sorted(self._entries[kind].values(), key=lambda e: (e.name.lower(), e.name, str(e.path)))

    def checkpoints(self) -> list[CatalogEntry]:
        """Checkpoints in models/Stable-diffusion (not *.vae.*), sorted by name."""
        return self.entries("checkpoint")

    def vaes(self) -> list[CatalogEntry]:
        """VAEs in models/VAE and *.vae.* files beside checkpoints, sorted by name."""
        return self.entries("vae")

    def loras(self) -> list[CatalogEntry]:
        """LoRAs in models/Lora and models/LyCORIS, sorted by name."""
        return self.entries("lora")

    def embeddings(self) -> list[CatalogEntry]:
        """Textual-inversion embeddings in models/embeddings and embeddings/, sorted by name."""
        return self.entries("embedding")

    def ensure_hashes(self, entry: CatalogEntry) -> CatalogEntry:
        """Compute (or take from the cache) the entry's sha256 and, for a LoRA, its addnet hash."""
        self._fill_hashes(entry, compute=True)  # no catalog lock: listing stays responsive while a big file hashes
        return entry

    # ---- lookup ----------------------------------------------------------------------------------------------------

    def find(self, kind: str, query: str) -> CatalogEntry:
        """A1111 lookup: title, name, file name, stem, model_name, alias, then hashes; InvalidRequestError if none."""
        entries = self.entries(kind)
        found = _match(entries, query, kind == "checkpoint")
        if found is None and HASH_QUERY.fullmatch(query.strip()) and any(_unhashed(e) for e in entries):
            for e in entries:
                self.ensure_hashes(e)
            found = _match(entries, query, kind == "checkpoint")
        if found is None:
            raise InvalidRequestError(kind, _unknown_message(kind, query, entries))
        return found

    def find_checkpoint(self, query: str) -> CatalogEntry:
        """Checkpoint by title, name, model_name, stem, legacy 8-hex, sha10 or full sha256 (A1111 rules)."""
        return self.find("checkpoint", query)

    def find_vae(self, query: str) -> CatalogEntry:
        """VAE by file name (A1111's key), name, stem, model_name or hash."""
        return self.find("vae", query)

    def find_lora(self, query: str) -> CatalogEntry:
        """LoRA by stem, alias, name, model_name, addnet hash (12 or 64 hex) or sha256."""
        return self.find("lora", query)

    def find_embedding(self, query: str) -> CatalogEntry:
        """Embedding by stem, name, model_name or sha256 (12 hex as in TI hashes, 10 or 64)."""
        return self.find("embedding", query)


def _unhashed(entry: CatalogEntry) -> bool:
    """True when a hash the lookup could use has not been computed yet."""
    return entry.error is None and (entry.sha256 is None or (entry.kind == "lora" and entry.addnet_hash is None))


def _match(entries: list[CatalogEntry], query: str, substring: bool) -> CatalogEntry | None:
    """Best entry for `query`: exact names by priority, then hashes, then (checkpoints) A1111's title substrings."""
    query = query.strip()
    if not query:
        return None
    ranked = [(keys.index(query), i) for i, keys in enumerate(e._text_keys() for e in entries) if query in keys]
    if ranked:  # the entry whose matching key comes first in the priority order wins
        return entries[min(ranked)[1]]
    for e in entries:
        if query.lower() in e._hash_keys():
            return e
    if substring:  # A1111 get_closet_checkpoint_match: shortest title containing the query, then without "[hash]"
        for needle in (query, CHECKSUM_SUFFIX.sub("", query)):
            hits = sorted((e for e in entries if needle and needle in e.title), key=lambda e: len(e.title))
            if hits:
                return hits[0]
    return None


def _unknown_message(kind: str, query: str, entries: list[CatalogEntry]) -> str:
    """"no <kind> named 'x'" plus close names, or some known names when nothing is close."""
    names = sorted({e.name for e in entries} | {e.stem for e in entries} | {e.alias for e in entries if e.alias})
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.5)
    if close:
        return f"no {kind} named {query!r}; did you mean: {', '.join(close)}"
    if names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return f"no {kind} named {query!r}; known: {shown}"
    return f"no {kind} named {query!r}; none found in {kind} folders"
