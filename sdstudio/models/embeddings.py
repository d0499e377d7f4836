"""Textual-inversion embeddings, A1111 style: the file stem in a prompt stands for the file's vectors.

Files (.pt A1111 `string_to_param`, diffusers .bin, .safetensors `emb_params` or single tensor, SDXL `clip_l` +
`clip_g`) are read through the safe readers, found recursively under the embedding folders, reloaded when they
change. Prompts match them by the token ids of their names (prompt/conditioning.py `EmbeddingLookup`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from sdstudio.errors import ModelFileError
from sdstudio.files.readers import load_pickle, read_state_dict

log = logging.getLogger(__name__)

EXTENSIONS = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")
ENCODER_KEY = {"clip_l": "clip_l", "open_clip_g": "clip_g"}   # encoder kind -> SDXL embedding key


@dataclass
class Embedding:
    """One embedding: its vectors (per SDXL encoder, or one tensor) and what A1111 lists about it."""

    name: str
    path: Path
    vectors: int                      # tokens it occupies in a prompt
    shape: int                        # width (SDXL: clip_l + clip_g)
    tensors: dict[str, torch.Tensor]  # {"": (n, width)} or {"clip_l": (n, 768), "clip_g": (n, 1280)}
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    _hash: str | None = field(default=None, repr=False)

    def vectors_for(self, kind: str) -> torch.Tensor:
        """(vectors, width) for a text encoder kind ("clip_l", "open_clip_h", "open_clip_g")."""
        if "" in self.tensors:
            return self.tensors[""]
        return self.tensors[ENCODER_KEY[kind]]

    @property
    def short_hash(self) -> str:
        """First 12 hex of the file's sha256 (A1111 `TI hashes`)."""
        if self._hash is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._hash = digest.hexdigest()
        return self._hash[:12]

    def listing(self) -> dict[str, Any]:
        """A1111 `/sdapi/v1/embeddings` item."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.vectors}


def _as_2d(path: Path, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ModelFileError(path, f"embedding data is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().float()
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise ModelFileError(path, f"embedding tensor has shape {tuple(tensor.shape)}; expected (vectors, width)")
    return tensor


def load_embedding(path: str | Path) -> Embedding:
    """Read one embedding file (A1111's dispatch: string_to_param, clip_g+clip_l, or a single tensor)."""
    path = Path(path)
    name = path.name.rsplit(".", 1)[0]
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        data: dict[str, Any] = read_state_dict(path)
    else:
        obj = load_pickle(path)
        if not isinstance(obj, dict):
            raise ModelFileError(path, f"expected a dict, found {type(obj).__name__}")
        data = obj
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelFileError(path, "string_to_param must hold exactly one term")
        tensors = {"": _as_2d(path, next(iter(params.values())))}
        meta = {"step": data.get("step"), "sd_checkpoint": data.get("sd_checkpoint"),
                "sd_checkpoint_name": data.get("sd_checkpoint_name")}
    elif all(k in data for k in SDXL_KEYS):
        tensors = {k: _as_2d(path, data[k]) for k in SDXL_KEYS}
        if tensors["clip_l"].shape[0] != tensors["clip_g"].shape[0]:
            raise ModelFileError(path, "clip_l and clip_g hold different numbers of vectors")
    else:
        candidates = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(candidates) != 1:
            raise ModelFileError(path, f"not an embedding: expected one tensor, found keys {sorted(data)[:5]}")
        tensors = {"": _as_2d(path, candidates[0])}
    first = next(iter(tensors.values()))
    width = sum(t.shape[1] for t in tensors.values())
    return Embedding(name, path, int(first.shape[0]), int(width), tensors, **meta)


def model_widths(model) -> dict[str, int]:
    """What an embedding must provide for a loaded checkpoint: {"": width} or SDXL's {"clip_l": w, "clip_g": w}."""
    widths = {e.kind: e.model.get_input_embeddings().weight.shape[1] for e in model.text_encoders}
    if model.family == "sdxl":
        return {"clip_l": widths["clip_l"], "clip_g": widths["open_clip_g"]}
    return {"": next(iter(widths.values()))}


def fits(embedding: Embedding, model) -> str | None:
    """None when the embedding fits the model, else the reason it is skipped."""
    wanted = model_widths(model)
    if "" in wanted and "" not in embedding.tensors:
        return f"SDXL embedding (clip_l + clip_g); the loaded model is {model.family}"
    if "" not in wanted and "" in embedding.tensors:
        return f"single-encoder embedding of width {embedding.shape}; the loaded model is SDXL (needs clip_l + clip_g)"
    for key, width in wanted.items():
        got = embedding.tensors[key].shape[1]
        if got != width:
            return f"width {got} does not fit the loaded {model.family} model ({width})"
    return None


class EmbeddingDB:
    """Embeddings found under some folders; `refresh()` picks up added, changed and removed files."""

    def __init__(self, dirs: Sequence[str | Path]):
        self.dirs = [Path(d) for d in dirs]
        self.embeddings: dict[str, Embedding] = {}
        self.errors: dict[str, str] = {}              # file -> why it could not be read
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._loaded: dict[Path, Embedding] = {}
        self.refresh()

    @classmethod
    def for_data_dir(cls, data_dir: str | Path) -> "EmbeddingDB":
        """A1111's folders: <data>/embeddings and <data>/models/embeddings."""
        data_dir = Path(data_dir)
        return cls([data_dir / "embeddings", data_dir / "models" / "embeddings"])

    def _files(self) -> list[Path]:
        found = []
        for folder in self.dirs:
            if folder.is_dir():
                found += [p for p in folder.rglob("*") if p.is_file() and p.suffix in EXTENSIONS
                          and ".preview." not in p.name and not any(part.startswith(".") for part in p.parts)
                          and p.stat().st_size > 0]
        return sorted(found, key=lambda p: (str(p.parent).lower(), p.name.lower()))

    def refresh(self) -> None:
        """Rescan the folders; only new or changed files are read again."""
        files = self._files()
        self.errors = {}
        for path in files:
            stat = path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            if self._stamps.get(path) == stamp and path in self._loaded:
                continue
            self._stamps[path] = stamp
            try:
                self._loaded[path] = load_embedding(path)
            except ModelFileError as exc:
                self._loaded.pop(path, None)
                self.errors[str(path)] = exc.problem
                log.warning("embedding skipped: %s", exc)
        for gone in set(self._loaded) - set(files):
            del self._loaded[gone]
            self._stamps.pop(gone, None)
        self.embeddings = {}
        for path in files:
            embedding = self._loaded.get(path)
            if embedding is None:
                continue
            if embedding.name in self.embeddings:
                log.warning("two embeddings named %r: using %s, ignoring %s", embedding.name,
                            self.embeddings[embedding.name].path, path)
                continue
            self.embeddings[embedding.name] = embedding

    def usable(self, model) -> list[Embedding]:
        """The embeddings that fit `model` (pass to the pipeline as `embeddings=`; the others are skipped)."""
        return [e for e in self.embeddings.values() if fits(e, model) is None]

    def listing(self, model) -> dict[str, dict[str, Any]]:
        """A1111 `/sdapi/v1/embeddings`: {"loaded": {name: item}, "skipped": {name: item}} for `model`."""
        loaded, skipped = {}, {}
        for name, embedding in sorted(self.embeddings.items()):
            (loaded if fits(embedding, model) is None else skipped)[name] = embedding.listing()
        return {"loaded": loaded, "skipped": skipped}
