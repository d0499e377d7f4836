"""The weights of a model being built, in the dtype and layout it runs in: the file's own tensors where they already
are, else one copy each.

Loading a bf16 model from an fp16 or fp32 file (`--precision auto` on a bf16 CPU) is mostly copying: each weight's
pages of the mapped file fault in, its converted copy's fresh pages fault in, and on this path's 2-core machines
these faults, one thread after another, were most of the load. So the copies of a mapped file's weights are
made by one C call (kernels/read_weights.c) that reads the file with pread (no file page is mapped into the
process) and shares blocks of every tensor out to torch's threads (the fresh pages fault in on both cores),
converting fp16 / fp32 to bf16 with torch's rounding bit for bit (fp16 to fp32 exactly: an fp32 load of an fp16
file) and laying convolution weights channels-last in the same pass (also for a file kept in its dtype: fp16, bf16,
or fp32 for the fast fp32 path's layout). Other copies (other dtypes, a tensor not read from a mapped safetensors or
torch-zip file, no C compiler) go through `copy_converting`.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import Mapping

import torch

from sdstudio.errors import ModelFileError
from sdstudio.files.readers import MappedFile, copy_converting, file_region, open_mapped_file, release_file_pages
from sdstudio.models.native import compiled_library, kernel_source

# (file dtype, copy dtype) -> the kernel's conversion code (kernels/read_weights.c)
CONVERSIONS = {(torch.float16, torch.float16): 0, (torch.bfloat16, torch.bfloat16): 0,
               (torch.float16, torch.bfloat16): 1, (torch.float32, torch.bfloat16): 2,
               (torch.float16, torch.float32): 3, (torch.float32, torch.float32): 4}


def converted_weights(weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                      channels_last: bool) -> dict[str, torch.Tensor]:
    """Each floating-point weight in `dtype` (None: its own) and, with `channels_last`, each 4-D one channels-last:
    the tensor itself where it already is, else a copy (`copy_weights`)."""
    result: dict[str, torch.Tensor] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, tensor in weights.items():
        target_dtype = dtype or tensor.dtype
        layout = torch.channels_last if channels_last and tensor.dim() == 4 else None
        relayout = layout is not None and not tensor.is_contiguous(memory_format=layout)
        if not tensor.is_floating_point() or (tensor.dtype == target_dtype and not relayout):
            result[key] = tensor
            continue
        result[key] = torch.empty_like(tensor, dtype=target_dtype,
                                       memory_format=layout if relayout else torch.contiguous_format)
        copies.append((result[key], tensor))
    copy_weights(copies)
    return result


def copy_weights(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """target[...] = source for each (target, source) pair (targets contiguous, or 4-D channels-last): the sources
    that are views of a mapped model file read from the file by one kernel call per file and conversion (their pages
    never enter the process), the others by `copy_converting` (a file-mapped source's pages leave the process)."""
    reads = []
    for target, source in copies:
        region = file_region(source) if _kernel_reads(source, target) else None
        if region is None:
            copy_converting(target, source)
            release_file_pages(source)
        else:
            reads.append((target, source, region))
    _read_weights(reads)


def _kernel_reads(source: torch.Tensor, copy: torch.Tensor) -> bool:
    return ((source.dtype, copy.dtype) in CONVERSIONS and source.numel() > 0
            and (copy.is_contiguous() or copy.is_contiguous(memory_format=torch.channels_last))
            and _kernels() is not None)


def _read_weights(reads: list[tuple[torch.Tensor, torch.Tensor, tuple[MappedFile, int]]]) -> None:
    """Fill each copy from its source's file region, one kernel call per (file, conversion)."""
    groups: dict[tuple[MappedFile, int], list] = {}
    for copy, source, (file, offset) in reads:
        groups.setdefault((file, CONVERSIONS[source.dtype, copy.dtype]), []).append((copy, offset))
    for (file, conversion), group in groups.items():
        shapes = [_rows_channels_taps(copy) for copy, _offset in group]
        longs = ctypes.c_long * len(group)
        descriptor = open_mapped_file(file)
        try:
            status = _kernels().read_weights(
                descriptor, conversion, len(group), longs(*(offset for _copy, offset in group)),
                (ctypes.c_void_p * len(group))(*(copy.data_ptr() for copy, _offset in group)),
                longs(*(s[0] for s in shapes)), longs(*(s[1] for s in shapes)), longs(*(s[2] for s in shapes)),
                torch.get_num_threads())
        finally:
            os.close(descriptor)
        if status == -2:
            raise MemoryError(f"no memory left for a block of {file.path} while reading its weights")
        if status != 0:
            raise ModelFileError(file.path, "became shorter while its weights were read (changed on disk?)")


def _rows_channels_taps(copy: torch.Tensor) -> tuple[int, int, int]:
    """The kernel's view of a copy: rows × channels × taps source values, the taps moved outside the channels in
    the copy (a channels-last convolution weight's kernel positions), else taps 1."""
    rows = copy.shape[0] if copy.dim() else 1
    if copy.dim() == 4 and not copy.is_contiguous():
        return rows, copy.shape[1], copy.shape[2] * copy.shape[3]
    return rows, math.prod(copy.shape) // rows, 1


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    kernels = compiled_library("read_weights", kernel_source("read_weights"))
    if kernels is not None:
        long_pointer = ctypes.POINTER(ctypes.c_long)
        kernels.read_weights.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, long_pointer, ctypes.c_void_p,
                                         long_pointer, long_pointer, long_pointer, ctypes.c_int]
        kernels.read_weights.restype = ctypes.c_int
    return kernels
