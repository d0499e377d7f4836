"""Model-file writers: .safetensors streamed tensor by tensor, .ckpt via torch.save; both atomic (tmp + os.replace)."""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch

from sdstudio.files.readers import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
HEADER_ALIGNMENT = 8  # bytes; the header is space-padded so tensor data starts aligned, as the safetensors library does


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors (any device/layout; shared storages are fine) and string metadata to a .safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = metadata
    offset = 0
    for name, tensor in sd.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{name}: cannot store {type(tensor).__name__} "
                            f"{getattr(tensor, 'dtype', '')} in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % HEADER_ALIGNMENT)
    with _atomic_file(path) as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for tensor in sd.values():
            if tensor.numel():
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_torch(sd: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write {"state_dict": sd} with torch.save (the .ckpt layout A1111 reads)."""
    with _atomic_file(path) as f:
        torch.save({"state_dict": dict(sd)}, f)


@contextmanager
def _atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A file opened next to `path` that replaces `path` only when the block finishes without error."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
