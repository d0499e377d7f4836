"""Choices of the CPU fast paths (bf16, fast fp32) that only a measurement on the machine can make, each made once
per machine.

The fast path's kernels were chosen by measurement on CPUs with AVX512-BF16 and no AMX: Winograd 3×3 convolutions
(1.3–1.6× oneDNN's direct ones there) and OpenVINO's attention kernel (1.6–2× PyTorch's). On a CPU whose matrix
units are several times faster (AMX), the same arithmetic cut may not pay for Winograd's memory-bound transforms,
and PyTorch's own kernels may win. So the first process that needs a choice times both ways on a representative
shape of SD1.5 at 512² (alternating, the fastest of ROUNDS runs: a disturbance only slows some of them; 0.4–1.8 s
each) and keeps the figures and the choice in the kernel cache folder, keyed by CPU model and flags, torch version
and thread count: every later process on the machine decides the same way, so the same seed keeps giving the same
image.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ROUNDS = 5     # timed runs of each way, alternating, after one untimed run each; the fastest of each counts
MARGIN = 1.1   # the candidate must be this much faster than the baseline to be chosen


def kernel_cache_dir() -> Path:
    """Where compiled kernels and measured choices are kept: $SDSTUDIO_KERNEL_CACHE, else $XDG_CACHE_HOME
    (~/.cache)/sdstudio/kernels."""
    if os.environ.get("SDSTUDIO_KERNEL_CACHE"):
        return Path(os.environ["SDSTUDIO_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdstudio" / "kernels"


@functools.cache
def cpu_description() -> tuple[str, str]:
    """The CPU's "model name" and "flags" lines of /proc/cpuinfo ("" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return tuple(next((line for line in lines if line.startswith(field)), "") for field in ("model name", "flags"))


def native_bf16() -> bool:
    """Whether the CPU has native bf16 math (AMX or AVX512-BF16): where it has not, torch and oneDNN emulate bf16
    products (6× slower than fp32 ones on an AVX2 CPU) and their int8 products with bf16 output run oneDNN's reference
    code (350× slower than bf16)."""
    flags = cpu_description()[1].split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def machine_key() -> str:
    """What a choice depends on: CPU model and flags, torch version, thread count."""
    key = "\n".join([*cpu_description(), torch.__version__, str(torch.get_num_threads())])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def choice_path(name: str) -> Path:
    """The file that keeps choice `name` on this machine."""
    return kernel_cache_dir() / f"choice-{name}-{machine_key()}.json"


Ways = Callable[[], tuple[Callable[[], object], Callable[[], object]]]


def candidate_pays(name: str, ways: Ways, dtype: torch.dtype) -> bool:
    """Whether the candidate runs at least MARGIN times faster than the baseline on this machine: read from the kept
    choice `name`, else measured now and kept (an unreadable file is measured again; an unwritable folder only
    means measuring again in the next process). `ways()` gives (candidate, baseline) on their representative
    inputs in `dtype`: called only to measure, so a kept choice costs a file read, not the inputs (a first UNet call
    built ~0.5 s of random weights and imported OpenVINO before reading its choices). A bf16 candidate never pays
    where the CPU lacks native bf16 math: the bf16 fast path's kernels are for CPUs that have it, and the emulated
    measurement alone would take minutes elsewhere (the VAE's blocked attention: 141 s on an AVX2 CPU)."""
    if dtype == torch.bfloat16 and not native_bf16():
        return False
    path = choice_path(name)
    try:
        return bool(json.loads(path.read_text())["candidate_pays"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seconds: dict[str, list[float]] = {"candidate": [], "baseline": []}
    with torch.inference_mode():
        candidate, baseline = ways()
        candidate(), baseline()
        for _ in range(ROUNDS):
            for way, run in (("candidate", candidate), ("baseline", baseline)):
                start = time.perf_counter()
                run()
                seconds[way].append(time.perf_counter() - start)
    candidate_ms, baseline_ms = (min(seconds[way]) * 1e3 for way in ("candidate", "baseline"))
    pays = baseline_ms >= MARGIN * candidate_ms
    log.info("fast path choice %s on this machine: candidate %.1f ms, baseline %.1f ms: %s", name, candidate_ms,
             baseline_ms, "candidate" if pays else "baseline")
    record = {"candidate_ms": candidate_ms, "baseline_ms": baseline_ms, "margin": MARGIN, "candidate_pays": pays}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".partial") as f:
            json.dump(record, f)
        os.replace(f.name, path)
    except OSError as exc:
        log.warning("cannot keep the fast path choice %s in %s: %s", name, path, exc)
    return pays
