"""How close the bf16 fast path's SD1.5 step runs to this CPU's bf16 limit, in one process.

- Peak: the CPU's bf16 dot-product instruction (vdpbf16ps: 32 multiply-adds per 512-bit vector) in 12 independent
  chains per thread on all of torch's threads — a C loop, built like the fast path's kernels (models/native.py). No
  real product can beat it; oneDNN's best bf16 matrix products reach 80–93 % of it here.
- Arithmetic of one CFG UNet call (batch 2, 64×64 latents) as the fast path runs it, counted from the shapes each
  module sees (forward hooks): convolutions' and linears' products (GEGLU's projection included), attention's two
  products (q·kᵀ and p·v); a 3×3 convolution that takes Winograd F(2×2, 3×3) counts 16 products per 2×2 outputs
  instead of 36 (its transforms, norms and activations are not counted: they are the overhead).
- Time: the same UNet calls, median of 3 after one untimed; then one call with the hooks also timing each module
  that runs products (its own time: less its hooked children's), so each kind's share of the peak shows where the
  rest goes (Winograd's transforms count with its convolutions, the softmax with attention).

Arithmetic / peak is the time no implementation of the same arithmetic can go below; the step time needed for a
target ratio (e.g. 3.5× diffusers fp32) says which share of the peak that target asks for.
"""
from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import BENCH_DIR, full_checkpoint, machine, timed, warm_page_cache, write_section  # noqa: E402

PEAK_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
/* iterations × 12 vdpbf16ps per thread; returns the sum of the lanes so nothing is optimised away */
float peak(long iterations, int threads) {
  float total = 0.f;
#pragma omp parallel num_threads(threads) reduction(+:total)
  {
    __m512 acc[12];
    for (int j = 0; j < 12; j++) acc[j] = _mm512_setzero_ps();
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3c00);
    for (long i = 0; i < iterations; i++) {
      for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
      __asm__ volatile("" : "+v"(a));
    }
    for (int j = 0; j < 12; j++) total += _mm512_reduce_add_ps(acc[j]);
  }
  return total;
}
"""
CALLS = 3


def peak_gflops() -> float | None:
    """The measured bf16 dot-product peak of all torch threads, GFLOP/s (None without AVX512-BF16 or a compiler)."""
    from sdstudio.models.native import compiled_library
    from sdstudio.models.tuning import cpu_description

    if "avx512_bf16" not in cpu_description()[1].split():
        return None
    library = compiled_library("bf16_peak", PEAK_SOURCE)
    if library is None:
        return None
    library.peak.argtypes, library.peak.restype = [ctypes.c_long, ctypes.c_int], ctypes.c_float
    threads, iterations = torch.get_num_threads(), 50_000_000
    library.peak(iterations // 10, threads)
    best = min(timed(library.peak, iterations, threads)[0] for _ in range(3))
    return iterations * 12 * 64 * threads / best / 1e9


class Tally:
    """Per kind of product: its arithmetic (floating-point operations, a multiply-add = 2) and the own time of the
    modules that ran it (their time less their counted children's), from forward hooks on one UNet call."""

    def __init__(self):
        self.flops: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self._open: list[list] = []   # [start, children's seconds] of the modules being run

    def start(self, *_args) -> None:
        self._open.append([time.perf_counter(), 0.0])

    def finish(self, kind: str, flops: float) -> None:
        began, children = self._open.pop()
        spent = time.perf_counter() - began
        if self._open:
            self._open[-1][1] += spent
        self.flops[kind] = self.flops.get(kind, 0.0) + flops
        self.seconds[kind] = self.seconds.get(kind, 0.0) + spent - children


def hook_products(unet: torch.nn.Module, tally: Tally) -> list:
    """Hooks on every convolution, linear, GEGLU and attention module of `unet` adding what it runs to `tally`; the
    hooks' handles."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    from sdstudio.models.winograd import winograd_applies

    def convolution(module, args, out):
        flops = 2 * out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        if module.kernel_size == (3, 3) and winograd_applies(module, args[0]):
            tally.finish("3×3 convolutions (Winograd)", flops * 16 / 36)
        else:
            tally.finish(f"{module.kernel_size[0]}×{module.kernel_size[1]} convolutions (direct)", flops)

    def linear(weight: torch.Tensor, kind: str):
        return lambda module, args, out: tally.finish(kind, 2 * args[0].numel() // weight.shape[1] * weight.numel())

    def attention(module, args, kwargs, out):
        x = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states")
        keys = x.shape[1] if context is None else context.shape[1]
        tally.finish("attention products (with the softmax)", 4 * x.shape[0] * x.shape[1] * keys * module.inner_dim)

    projections = {id(m.proj) for m in unet.modules() if isinstance(m, GEGLU)}   # counted with their GEGLU
    handles = []
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            post = convolution
        elif isinstance(module, GEGLU):
            post = linear(module.proj.weight, "GEGLU projections (with GELU · product)")
        elif isinstance(module, torch.nn.Linear) and id(module) not in projections:
            post = linear(module.weight, "linears")
        elif isinstance(module, Attention):
            handles.append(module.register_forward_pre_hook(tally.start))
            handles.append(module.register_forward_hook(attention, with_kwargs=True))
            continue
        else:
            continue
        handles += [module.register_forward_pre_hook(tally.start), module.register_forward_hook(post)]
    return handles


def diffusers_fp32_step() -> float | None:
    """diffusers fp32's s/step from bench/generate.py's last run on this machine (its kept raw figures), if any."""
    try:
        return json.loads((BENCH_DIR / "generate-results.json").read_text())["sd15"]["diffusers fp32 (default)"][
            "step_s"]
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    from sdstudio.models.checkpoint import load_checkpoint

    peak = peak_gflops()
    if peak is None:
        print("no AVX512-BF16 (or no C compiler): the bf16 peak cannot be measured here")
        return
    path = full_checkpoint("sd1", "fp16")
    warm_page_cache(path)
    unet = load_checkpoint(path, dtype=torch.bfloat16).unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=generator).bfloat16()
    context = torch.randn(2, 77, 768, generator=generator).bfloat16()

    def call() -> float:
        with torch.inference_mode():
            return timed(unet, latents, torch.tensor([500, 500]), encoder_hidden_states=context)[0]

    call()
    seconds = statistics.median(call() for _ in range(CALLS))
    tally = Tally()
    handles = hook_products(unet, tally)
    hooked = call()
    for handle in handles:
        handle.remove()
    total = sum(tally.flops.values())
    floor = total / 1e9 / peak
    rows = ["| part of one SD1.5 CFG UNet call (512², batch 2) | GFLOP | at peak s | measured s (own time) | "
            "share of peak |", "|---|---|---|---|---|"]
    for kind, flops in sorted(tally.flops.items(), key=lambda item: -item[1]):
        at_peak, spent = flops / 1e9 / peak, tally.seconds[kind]
        rows.append(f"| {kind} | {flops / 1e9:.1f} | {at_peak:.2f} | {spent:.2f} | {at_peak / spent:.0%} |")
    rest = hooked - sum(tally.seconds.values())
    rows.append(f"| everything else (norms, activations, residual adds, hooks) | – | – | {rest:.2f} | – |")
    rows.append(f"| **the call** | **{total / 1e9:.1f}** | **{floor:.2f}** | **{hooked:.2f}** (unhooked "
                f"{seconds:.2f}) | **{floor / seconds:.0%}** |")
    lines = [f"measured bf16 peak (vdpbf16ps, {torch.get_num_threads()} threads): {peak:.0f} GFLOP/s",
             f"UNet call measured: {seconds:.2f} s = {floor / seconds:.0%} of the peak over its products"]
    diffusers_fp32 = diffusers_fp32_step()
    if diffusers_fp32:
        needed = diffusers_fp32 / 3.5
        lines.append(f"3.5× diffusers fp32 ({diffusers_fp32:.2f} s/step in bench/generate.py's last run) = "
                     f"{needed:.2f} s/step: {floor / needed:.0%} of the peak over the products, with no time left "
                     "for anything else")
    text = "\n".join(rows) + "\n\n" + "\n".join(f"- {line}" for line in lines)
    print(text)
    write_section("bf16 limit of the SD1.5 step (bench/roofline.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/roofline.py`. Peak: vdpbf16ps "
                  "in independent chains on every thread (a C loop); arithmetic: the products of one CFG UNet call "
                  "(batch 2, 64×64 latents) as the fast path runs them, counted from each module's shapes (Winograd's "
                  "3×3 convolutions at 16/36 of the direct products; transforms, norms and activations not counted); "
                  f"time: median of {CALLS} such calls, then one more with hooks timing each kind's modules (their "
                  f"own time, less their hooked children's).\n\n{text}")


if __name__ == "__main__":
    main()
