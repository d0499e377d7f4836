"""Converted weights kept on disk: a checkpoint's modules as loaded (dtype, channels-last layout, our key names).

Loading an fp16 file for the bf16 CPU path converts every weight (2 GB for SD1.5, 7 GB for SDXL): most of the load
time. The first load writes the converted weights to one safetensors file in the cache folder; later loads of the
same file version (path, size, mtime) in the same dtype map that file instead: nothing is converted or copied, and
the weights are file-backed pages the kernel can drop and re-read under memory pressure. InvokeAI keeps a similar
conversion cache. What a load measures from the weights (int8's calibration, models/int8.py) is kept the same way,
in a small file of its own. The folder keeps within a byte budget, least recently used files removed first; a
damaged or outdated cache file is ignored and replaced, never trusted over the source.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import diffusers
import torch
import transformers

import sdstudio
from sdstudio.errors import ModelFileError
from sdstudio.files.readers import read_safetensors_header, read_state_dict
from sdstudio.files.writers import save_safetensors

log = logging.getLogger(__name__)

FORMAT = "sdstudio-converted-1"   # bump when what a load produces changes (key maps, layouts)
DEFAULT_BUDGET = 20 * 2**30       # bytes of cache files kept
HALF_TYPES = (torch.float16, torch.bfloat16)
STALE_PARTIAL_SECONDS = 3600  # a write this old without finishing belongs to a process that is gone


def worth_storing(file_dtype: torch.dtype | None, dtype: torch.dtype, device: torch.device | str = "cpu",
                  fast_fp32: bool = False) -> bool:
    """Whether loading a file of `file_dtype` as `dtype` for `device` copies weights (a dtype change, or the
    channels-last relayout of the CPU's half-precision and fast fp32 paths); a load in the file's dtype otherwise
    maps the file (a GPU's then copies it to the device) and needs no cache."""
    return file_dtype != dtype or ((dtype in HALF_TYPES or fast_fp32) and torch.device(device).type == "cpu")


def converted_weights(data_dir: Path, budget_bytes: int = DEFAULT_BUDGET) -> ConvertedWeights | None:
    """The cache of a data folder (`cache/converted/`, next to the hash cache); None when the budget is 0 (off)."""
    return ConvertedWeights(Path(data_dir) / "cache" / "converted", budget_bytes) if budget_bytes > 0 else None


class ConvertedWeights:
    """The cache folder: `read` the converted parts of a checkpoint, `write` them after a load that converted."""

    def __init__(self, folder: str | Path, budget_bytes: int = DEFAULT_BUDGET):
        self.folder = Path(folder)
        self.budget = budget_bytes
        self._writers: list[threading.Thread] = []
        self._lock = threading.Lock()     # one write (and trim) at a time

    def path_for(self, source: Path, dtype: torch.dtype, use_ema: bool, fast_fp32: bool = False,
                 measured: str = "") -> Path:
        """The cache file of one file version loaded one way (dtype, EMA, the fast fp32 path's layout) by these
        library versions (their module key names); with `measured`, that of what such a load measured from the
        weights (`read_measured`)."""
        stat = source.stat()
        key = json.dumps([FORMAT, sdstudio.__version__, diffusers.__version__, transformers.__version__,
                          str(source.resolve()), stat.st_size, stat.st_mtime_ns, str(dtype), use_ema]
                         + (["fast fp32, 16-bit weights kept"] if fast_fp32 else [])   # (the others' as before)
                         + ([measured] if measured else []))
        return self.folder / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    def read_measured(self, measured: str, source: Path, dtype: torch.dtype, use_ema: bool,
                      fast_fp32: bool = False) -> dict[str, torch.Tensor] | None:
        """The tensors `write_measured` kept under `measured` (a name that changes whenever what it names would be
        measured differently: int8's calibration, models/int8.py) for this file version and way of loading, or None
        (not kept, damaged or unreadable: the caller measures again)."""
        path = self.path_for(source, dtype, use_ema, fast_fp32, measured)
        if not path.is_file():
            return None
        try:
            tensors = {key: tensor.clone() for key, tensor in read_state_dict(path).items()}
        except (ModelFileError, OSError) as exc:
            log.warning("ignoring the damaged file %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # most recently used
        return tensors

    def write_measured(self, measured: str, source: Path, dtype: torch.dtype, use_ema: bool, fast_fp32: bool,
                       tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep what a load of `source` measured from its weights (a few MB: written at once) for `read_measured`;
        a failure is logged, never raised."""
        path = self.path_for(source, dtype, use_ema, fast_fp32, measured)
        try:
            with self._lock:
                self.folder.mkdir(parents=True, exist_ok=True)
                save_safetensors(tensors, path, metadata={"format": FORMAT, "source": str(source),
                                                          "measured": measured})
        except OSError as exc:
            log.warning("could not keep %s of %s in %s: %s", measured, source, self.folder, exc)

    def read(self, source: Path, dtype: torch.dtype, use_ema: bool,
             fast_fp32: bool = False) -> dict[str, dict[str, torch.Tensor]] | None:
        """{part: {key: tensor}} as written by `write` for this file version and way of loading, or None (not
        cached, damaged or unreadable: the caller loads from the source)."""
        path = self.path_for(source, dtype, use_ema, fast_fp32)
        if not path.is_file():
            return None
        try:
            tensors = read_state_dict(path)
            permuted = json.loads(read_safetensors_header(path).metadata["permuted"])
        except (ModelFileError, OSError, KeyError, ValueError) as exc:
            log.warning("ignoring the damaged converted-weights file %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # most recently used
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            part, key = name.split("/", 1)
            if name in permuted:
                tensor = tensor.permute(sorted(range(tensor.dim()), key=permuted[name].__getitem__))
            parts.setdefault(part, {})[key] = tensor
        return parts

    def write(self, source: Path, dtype: torch.dtype, use_ema: bool, fast_fp32: bool,
              parts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Store the converted parts ({part: state dict}) of `source` in a background thread (writing GBs takes
        seconds; the weights are never written in place, so generating meanwhile is safe), then trim the folder to
        the budget. A failure (disk full, read-only folder) is logged, never raised: the model is already loaded.
        Parts not wholly in `dtype` (an int8 load keeps its linears' weights as the file's) are not stored, but for
        the fast fp32 path (its half-precision weights are the file's values, relaid: models/half_weights.py)."""
        size = sum(t.numel() * t.element_size() for sd in parts.values() for t in sd.values())
        mixed = any(t.is_floating_point() and t.dtype != dtype for sd in parts.values() for t in sd.values())
        if size > self.budget or (mixed and not fast_fp32):
            return
        tensors = {f"{part}/{key}": t for part, sd in parts.items() for key, t in sd.items()}
        # a permuted layout (channels-last weights, transposed projections) is stored as its bytes in memory order
        # and permuted back on reading: no copy either way, and the same strides, so the same arithmetic
        permuted = {name: order for name, t in tensors.items() if (order := _memory_order(t))}
        for name, order in permuted.items():
            tensors[name] = tensors[name].permute(order)
        metadata = {"format": FORMAT, "source": str(source), "permuted": json.dumps(permuted)}
        path = self.path_for(source, dtype, use_ema, fast_fp32)
        writer = threading.Thread(target=self._store, args=(path, tensors, metadata, size), daemon=True,
                                  name=f"sdstudio-convert-cache-{source.name}")
        self._writers = [w for w in self._writers if w.is_alive()] + [writer]
        writer.start()

    def wait(self) -> None:
        """Return once every background write started so far has finished."""
        while self._writers:
            self._writers.pop().join()

    def _store(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], size: int) -> None:
        _lowest_cpu_priority()
        try:
            with self._lock:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._trim(keep_free=size)
                save_safetensors(tensors, path, metadata=metadata)
            log.info("kept the converted weights of %s in %s", metadata["source"], path)
        except OSError as exc:
            log.warning("could not keep the converted weights of %s in %s: %s", metadata["source"], self.folder, exc)

    def _trim(self, keep_free: int) -> None:
        """Remove least recently used cache files until `keep_free` more bytes fit in the budget, and the partial
        files of writes that a closing process cut short."""
        for partial in self.folder.glob(".*.tmp"):
            if time.time() - partial.stat().st_mtime > STALE_PARTIAL_SECONDS:
                partial.unlink(missing_ok=True)
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total + keep_free > self.budget:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)


def _lowest_cpu_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19; on Linux a thread's nice value is its own): a
    background write then takes the CPU only where the generation that follows a load leaves it idle. Written during
    the first SD1.5 steps at normal priority it slowed three UNet calls by 2.5–3.2 s (of 11.8); at nice 19 by none,
    and it still finished within 15 s. Elsewhere nothing changes."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as exc:
            log.debug("background write at normal priority: %s", exc)


def _memory_order(tensor: torch.Tensor) -> list[int] | None:
    """The dimension order in which a non-contiguous dense tensor's bytes lie (e.g. [0, 2, 3, 1] for a
    channels-last weight); None for a contiguous one."""
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
    if order == list(range(tensor.dim())) or not tensor.permute(order).is_contiguous():
        return None
    return order
