"""Safe model-file readers: .safetensors through a private mmap, torch pickles only after a static scan.

Every pickle in the project is loaded here (`read_state_dict`, `read_tensor_infos`, `load_pickle`): the file is
first scanned with `pickle_scan` (nothing executed), then read by `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.modules.container import ParameterDict

from sdstudio.errors import ModelFileError, UnsafeFileError
from sdstudio.files import pickle_scan

# safetensors dtype strings (safetensors/torch.py `_TYPES`).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64,
}
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the limit the safetensors library enforces
WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": sd} (Lightning), {"model": sd}
MAX_WRAPPER_DEPTH = 2  # A1111 strips "state_dict" at most twice (sd_models.py get_state_dict_from_checkpoint)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # pickle PROTO opcode; torch legacy streams start with protocol 2


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype and shape; `data_offsets` = [begin, end) bytes from the data start (safetensors only)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offsets: tuple[int, int] | None = None


@dataclass
class SafetensorsHeader:
    """A validated safetensors header; `data_start` = byte offset in the file where tensor data begins."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def detect_container(path: str | Path) -> str:
    """"safetensors" | "torch-zip" | "torch-legacy", from the first bytes (never the extension)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise ModelFileError(path, f"cannot be read: {exc.strerror or exc}") from exc
    if not head:
        raise ModelFileError(path, "file is empty")
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head[0] == _PICKLE_PROTO and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-legacy"
    raise ModelFileError(path, "unknown file format: neither safetensors nor a torch checkpoint")


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and fully validate a safetensors header without touching tensor data."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            raise ModelFileError(path, f"header: file has {file_size} bytes, too short for a safetensors header")
        length = int.from_bytes(length_bytes, "little")
        if not 2 <= length <= min(SAFETENSORS_MAX_HEADER, file_size - 8):
            raise ModelFileError(
                path, f"header: declared header length {length} is impossible for a file of {file_size} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"header: not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelFileError(path, f"header: expected a JSON object, found {type(header).__name__}")
    metadata = _check_metadata(path, header.pop("__metadata__", {}))
    tensors = {name: _check_entry(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, data_size=file_size - 8 - length)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=8 + length)


def read_tensor_infos(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Names -> dtype/shape, plus safetensors metadata ({} for pickles), reading as little of the file as possible."""
    if detect_container(path) == "safetensors":
        header = read_safetensors_header(path)
        return header.tensors, header.metadata
    state_dict = read_state_dict(path)  # zip pickles are mmapped: no tensor bytes are read
    return {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in state_dict.items()}, {}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model file, wrappers removed and non-tensor entries dropped; safetensors zero-copy."""
    if detect_container(path) == "safetensors":
        return _load_safetensors(path)
    obj = _unwrap(load_pickle(path))
    if not isinstance(obj, dict):
        raise ModelFileError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    tensors = {name: value for name, value in obj.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelFileError(path, f"no tensors found (keys: {', '.join(map(str, list(obj)[:10]))})")
    return _remapped(path, tensors)


def _remapped(path: str | Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors that torch.load mapped from a torch-zip file, as the same views of a registered mapping of our
    own, as safetensors tensors are (their copies can read the file with pread and their pages can go:
    `release_file_pages`); torch's mapping goes with its tensors. Where this process's memory map (Linux's
    /proc/self/maps) shows no mapping of the file, the tensors stay as torch made them."""
    regions = _mapped_regions(path)
    if not regions:
        return tensors
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        _register_mapping(mapped, path, f.fileno())
    result = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        offset = next((start - low + file_offset for low, high, file_offset in regions if low <= start < high), None)
        if (offset is None or tensor.numel() == 0 or offset % tensor.element_size()
                or offset + storage.nbytes() > len(mapped)):
            result[name] = tensor
            continue
        whole = torch.frombuffer(mapped, dtype=tensor.dtype, count=storage.nbytes() // tensor.element_size(),
                                 offset=offset)
        result[name] = whole.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
    return result


def _mapped_regions(path: str | Path) -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of each mapping of `path` in this process (none off Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    status = os.stat(path)
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}"
    regions = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[3] == device and fields[4] == str(status.st_ino):
            low, high = (int(address, 16) for address in fields[0].split("-"))
            regions.append((low, high, int(fields[2], 16)))
    return regions


_TORCH_LOAD_LOCK = threading.Lock()  # torch's safe-globals list is process-wide: one scoped change at a time


def load_pickle(path: str | Path) -> Any:
    """The whole object of a .ckpt/.pt/.bin (no unwrapping), after the static scan; tensors on CPU."""
    container = detect_container(path)
    if container == "safetensors":
        raise ModelFileError(path, "is a safetensors file, not a pickle; use read_state_dict")
    if container == "torch-zip":
        pickle_scan.scan_torch_zip(path)
    else:
        pickle_scan.scan_torch_legacy(path)
    try:
        with _TORCH_LOAD_LOCK, torch.serialization.safe_globals(_extra_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=container == "torch-zip")
    except Exception as exc:  # torch raises many types on damaged data; all mean "cannot use this file"
        raise translate_torch_error(path, exc) from exc


def translate_torch_error(path: str | Path, exc: Exception) -> ModelFileError:
    """Turn a torch.load failure into UnsafeFileError (torch refused a global) or ModelFileError (damaged file)."""
    text = str(exc)
    refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    if refused:
        return UnsafeFileError(path, pickle_scan.refusal([refused.group(1)]))
    detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    return ModelFileError(path, f"not a valid torch checkpoint: {detail[0] if detail else type(exc).__name__}")


class _LightningModelCheckpoint:
    """Stands in for pytorch_lightning's ModelCheckpoint class, which Lightning pickles as a dict key."""


class _LightningModelCheckpointModule:
    """Stands in for the pytorch_lightning.callbacks.model_checkpoint module referenced by old checkpoints."""


def _extra_safe_globals() -> list[Any]:
    """What our allow-list accepts beyond torch's weights_only defaults (ParameterDict, numpy, Lightning refs)."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array and scalar rebuild helpers, numpy 1.x and 2.x alike
    scalar = np.float32(0).__reduce__()[0]
    numeric_dtypes = {type(np.dtype(code)) for code in np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"}
    numpy_helpers = [(helper, f"{module}.{helper.__name__}")
                     for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                     for helper in (reconstruct, scalar)]
    return [
        ParameterDict, np.dtype, np.ndarray, *numeric_dtypes, *numpy_helpers,
        (_LightningModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_LightningModelCheckpointModule, "pytorch_lightning.callbacks.model_checkpoint"),
    ]


def _unwrap(obj: Any) -> Any:
    """Strip {"state_dict": ...} / {"model": ...} wrappers (up to twice) from a dict that holds no tensors itself."""
    for _ in range(MAX_WRAPPER_DEPTH):
        if not isinstance(obj, dict) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _check_metadata(path: str | Path, metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise ModelFileError(path, f"__metadata__: expected an object of strings, found {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ModelFileError(path, f"__metadata__: value of '{key}' is {type(value).__name__}, not a string")
    return metadata


def _check_entry(path: str | Path, name: str, entry: Any) -> TensorInfo:
    """Validate one header entry {dtype, shape, data_offsets}; the byte count must match shape x itemsize."""
    if not isinstance(entry, dict):
        raise ModelFileError(path, f"{name}: expected an object with dtype, shape, data_offsets")
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ModelFileError(path, f"{name}: unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise ModelFileError(path, f"{name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ModelFileError(path, f"{name}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    needed = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != needed:
        raise ModelFileError(path, f"{name}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but "
                                   f"shape {shape} of {entry['dtype']} needs {needed}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), data_offsets=(offsets[0], offsets[1]))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: str | Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Tensors in offset order must not overlap and must end inside the data area (else: truncated file)."""
    previous_name, previous_end = "", 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        begin, end = info.data_offsets
        if begin < previous_end:
            raise ModelFileError(path, f"{name}: data_offsets {list(info.data_offsets)} overlap '{previous_name}'")
        if end > data_size:
            raise ModelFileError(path, f"{name}: data ends at byte {end} of the data area but the file holds only "
                                       f"{data_size} data bytes (truncated file?)")
        previous_name, previous_end = name, end


@dataclass(frozen=True)
class MappedFile:
    """A mapped model file: its path and the identity (device, inode) of what was mapped."""
    path: str
    device: int
    inode: int


# live mappings of model files (safetensors, and torch-zip pickles: `_remapped`): base address -> (mmap, length, the
# file); an entry goes when its mmap is collected
_MAPPINGS: dict[int, tuple[weakref.ref, int, MappedFile]] = {}
_PAGE = mmap.PAGESIZE


def _register_mapping(mapped: mmap.mmap, path: str | Path, fileno: int) -> None:
    view = ctypes.c_char.from_buffer(mapped)
    base = ctypes.addressof(view)
    del view   # no lasting buffer export: the mmap stays closable
    status = os.fstat(fileno)
    _MAPPINGS[base] = (weakref.ref(mapped, lambda _ref: _MAPPINGS.pop(base, None)), len(mapped),
                       MappedFile(str(path), status.st_dev, status.st_ino))


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor read from a mapped model file once a copy of it replaced it (a converted
    weight, or the int8 path's packed one): its bytes stay in the page cache, not in this process (a bf16 model
    loaded from an fp16/fp32 file would otherwise hold both copies). The mapping is private and never written, so a
    later read of the same range simply faults the file's bytes in again. Tensors not in such a mapping are left
    alone."""
    found = _mapping_of(tensor)
    if found is not None:
        mapped, start, end, _file = found
        first = -(-start // _PAGE) * _PAGE          # whole pages inside the tensor only
        last = end // _PAGE * _PAGE
        if last > first:
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def is_file_mapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a view of a mapped model file (its pages can go back to the page cache)."""
    return _mapping_of(tensor) is not None


def file_region(tensor: torch.Tensor) -> tuple[MappedFile, int] | None:
    """(file, byte offset) of a contiguous tensor that is a view of a mapped model file: its bytes can be read from
    the file (`open_mapped_file`) without faulting the mapping's pages into this process (models/conversion.py);
    None for any other tensor."""
    found = _mapping_of(tensor)
    if found is None or not tensor.is_contiguous():
        return None
    _mapped, start, _end, file = found
    return file, start


def open_mapped_file(file: MappedFile) -> int:
    """A read-only descriptor of the file that was mapped (the caller closes it); a ModelFileError where the path
    now holds another file (replaced since it was mapped) or none."""
    try:
        descriptor = os.open(file.path, os.O_RDONLY)
    except OSError as exc:
        raise ModelFileError(file.path, f"cannot be read again: {exc.strerror}") from exc
    status = os.fstat(descriptor)
    if (status.st_dev, status.st_ino) != (file.device, file.inode):
        os.close(descriptor)
        raise ModelFileError(file.path, "was replaced on disk while its weights were being read")
    return descriptor


def _mapping_of(tensor: torch.Tensor) -> tuple[mmap.mmap, int, int, MappedFile] | None:
    """The live mapping holding `tensor`'s storage, with the storage's start and end offsets in it and the mapped
    file; None if none."""
    start = tensor.data_ptr()
    end = start + tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
    for base, (ref, length, file) in list(_MAPPINGS.items()):
        mapped = ref()
        if mapped is not None and base <= start and end <= base + length:
            return mapped, start - base, end - base, file
    return None


CONVERSION_CHUNK = 1 << 18   # elements per float32 step of a float16 → bfloat16 copy (1 MiB: stays in cache)


def copy_converting(target: torch.Tensor, source: torch.Tensor) -> None:
    """target[...] = source (any dtypes and layouts of one shape). float16 → bfloat16 goes in chunks of rows through
    a float32 buffer: the same bits as a direct copy (float16 → float32 is exact), 2.3× faster on the CPU, where
    torch converts float16 → bfloat16 one element at a time but float16 → float32 → bfloat16 in vectors."""
    if not (source.dtype == torch.float16 and target.dtype == torch.bfloat16):
        target.copy_(source)
    elif source.dim() == 0 or source.numel() <= CONVERSION_CHUNK:
        target.copy_(source.float())
    else:
        rows = max(1, CONVERSION_CHUNK * source.shape[0] // source.numel())
        for start in range(0, source.shape[0], rows):
            target[start:start + rows].copy_(source[start:start + rows].float())


def _load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors as views over one private (copy-on-write) mmap of the file: nothing is read until used."""
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        _register_mapping(mapped, path, f.fileno())
    tensors = {}
    for name, info in header.tensors.items():
        begin = header.data_start + info.data_offsets[0]
        count = math.prod(info.shape)
        if count == 0:
            tensor = torch.empty(0, dtype=info.dtype)
        elif begin % info.dtype.itemsize:  # misaligned for this dtype: copy just this tensor
            end = header.data_start + info.data_offsets[1]
            tensor = torch.frombuffer(bytearray(mapped[begin:end]), dtype=info.dtype)
        else:
            tensor = torch.frombuffer(mapped, dtype=info.dtype, count=count, offset=begin)
        tensors[name] = tensor.reshape(info.shape)
    return tensors
