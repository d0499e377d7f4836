"""Small C kernels of the CPU fast paths: built once per machine with the system C compiler, run through ctypes.

Each kernel library is compiled from its source (generated or fixed) into the kernel cache folder
(models/tuning.py), keyed by the source, the compiler flags and the CPU's flags, so a machine builds it once and a
changed source or CPU builds anew. The kernels run their loops on torch's own OpenMP threads (`-fopenmp` links the
libgomp torch has loaded, the same soname; each call takes torch.get_num_threads()): a pool of our own competed with
torch's threads, which keep spinning for a while after each of its ops — the same flash-attention call ran 1.2–2.4×
slower inside a UNet than alone. ctypes releases the GIL for the call. Where there is no compiler,
`compiled_library` logs why and returns None, and the caller keeps its PyTorch path. Their big intermediates live in
`scratch` buffers, kept from one call to the next (fresh ones cost page faults on every call) until
`release_kernel_buffers`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

from sdstudio.models.memory import keep_freed_memory
from sdstudio.models.tuning import cpu_description, kernel_cache_dir

log = logging.getLogger(__name__)

COMPILER_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# per dtype a generated kernel reads: the suffix of its SCALAR_LOADS load and its C element type
SCALAR_TYPES = {torch.bfloat16: ("bf16", "uint16_t"), torch.float16: ("f16", "uint16_t"),
                torch.float32: ("f32", "float")}
# C preamble of generated kernels, which build without headers (a bare C compiler): one value of a bf16, fp16 or fp32
# tensor as float (load_bf16, load_f16: exact; load_f32), and a float rounded to bf16's precision as torch rounds
SCALAR_LOADS = """typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef union { uint32_t u; float f; } bits;
static inline float load_f32(float f) { return f; }
static inline float load_bf16(uint16_t h) { bits v; v.u = (uint32_t)h << 16; return v.f; }
static inline float load_f16(uint16_t h) {   /* exact for every fp16 value, vectorises (no branch) */
  bits v; v.u = (uint32_t)(h & 0x7FFFu) << 13;
  v.f *= 0x1p112f;                                       /* the exponent's bias, for normals and subnormals alike */
  if ((h & 0x7FFFu) >= 0x7C00u) v.u |= 0x7F800000u;      /* infinities and NaN */
  v.u |= (uint32_t)(h & 0x8000u) << 16;
  return v.f;
}
static inline float bf16_rounded(float f) {   /* to nearest even */
  bits v; v.f = f; v.u = (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) & 0xFFFF0000u; return v.f;
}
"""
KERNELS = Path(__file__).parent / "kernels"


def kernel_source(name: str) -> str:
    """The text of kernels/<name>.c with each `#include "x.h"` of a header there replaced by that header's text: one
    source for `compiled_library`, so a changed header changes the build's cache key too."""
    lines = (KERNELS / f"{name}.c").read_text().splitlines()
    return "\n".join((KERNELS / line.split('"')[1]).read_text() if line.startswith('#include "') else line
                     for line in lines) + "\n"


def compiled_library(name: str, source: str) -> ctypes.CDLL | None:
    """The C `source` built as library `name` (once per source and machine, kept in the kernel cache); None,
    logged, where it cannot be built."""
    flags = cpu_description()[1]
    key = hashlib.sha256("\n".join([source, " ".join(COMPILER_FLAGS), flags]).encode()).hexdigest()[:20]
    library = kernel_cache_dir() / f"{name}-{key}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as work:
                (Path(work) / f"{name}.c").write_text(source)
                subprocess.run([os.environ.get("CC", "cc"), *COMPILER_FLAGS, f"{name}.c", "-o", f"{name}.so"],
                               cwd=work, check=True, capture_output=True, timeout=120)
                os.replace(Path(work) / f"{name}.so", library)
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("%s kernels off (the PyTorch path runs instead): cannot build %s: %s %s", name, library, exc,
                    detail.decode(errors="replace")[:500])
        return None


def cpu_library(name: str, *required_flags: str) -> ctypes.CDLL | None:
    """kernels/<name>.c built for this machine (`compiled_library` of `kernel_source`) where the CPU has every one of
    `required_flags` (/proc/cpuinfo's names: "avx512_bf16" for vdpbf16ps products, "avx2" and "fma" for 256-bit
    fp32 ones); None elsewhere, or without a C compiler."""
    if not set(required_flags) <= set(cpu_description()[1].split()):
        return None
    return compiled_library(name, kernel_source(name))


_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """This thread's reused buffer `name` as a `shape` tensor of `dtype` (grown when too small; contents undefined)."""
    buffers = _buffers()
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < nbytes:
        buffers[name] = buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(dtype).view(shape)


def release_kernel_buffers(*_) -> None:
    """Free this thread's scratch buffers (takes and ignores a forward hook's arguments)."""
    _buffers().clear()


def releasing_buffers(forward: Callable) -> Callable:
    """A layer's `forward` that frees this thread's scratch buffers when it returns, where the C heap keeps freed
    memory for the next allocation (models/memory.py): the next layer's buffers then reuse it without page faults,
    and a model call holds one layer's buffers at a time, not every layer's (SD1.5 fast fp32 UNet call, 512² with
    CFG, on AVX2: peak RSS 3.2 → 2.8–3.0 GiB at the same speed, 7.5–7.8 s either way). Elsewhere the buffers stay
    until the model's call ends (its forward hook), as fresh pages for each layer would cost page faults. A caller
    still holding a buffer keeps its memory: a freed name only gets a new buffer."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        finally:
            if keep_freed_memory():
                release_kernel_buffers()
    return run


def _buffers() -> dict[str, torch.Tensor]:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers
