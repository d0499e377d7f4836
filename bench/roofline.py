"""How close the CPU fast path's SD1.5 step runs to this CPU's arithmetic limits, in one process.

- Peaks: C loops of the instructions the path's products run on, in independent chains on all of torch's threads
  (built like the fast path's kernels, models/native.py): bf16 dot products (vdpbf16ps) where the CPU has native bf16
  math, else fp32 FMA (512- or 256-bit: the fast fp32 path); int8 u8 × s8 products (vpdpbusd with VNNI, else
  vpmaddubsw + vpmaddwd + vpaddd, as oneDNN's int8 kernels run there). No real product can beat them; oneDNN's best
  bf16 matrix products reach 80–93 % of vdpbf16ps's.
- Arithmetic of one CFG UNet call (batch 2, 64×64 latents) for `--precision float` and `--precision auto` as this CPU
  runs them, counted from the shapes each module sees (forward hooks): convolutions' and linears' products (GEGLU's
  projection included), attention's two products (q·kᵀ and p·v); a 3×3 convolution that takes Winograd F(m×m, 3×3)
  counts (m+2)² products per m×m outputs instead of 9 per output; the int8 layers' products count at the int8 peak,
  the others at the float one (transforms, norms, activations and the softmax are not counted: they are the
  overhead).
- Time: the same UNet calls, median of 3 after one untimed; then one call with the hooks also timing each module
  that runs products (its own time: less its hooked children's), so each kind's share of its peak shows where the
  rest goes (Winograd's transforms count with its convolutions, the softmax with attention).
- The reference: the exact fp32 UNet (diffusers' UNet with torch's own layers: what diffusers fp32 runs, 0.98–1.0×
  its speed in bench/generate.py), timed in the same process: 3.5× its speed is the issue's target.

The floor (arithmetic at peak) is the time no implementation of the same arithmetic can go below: a target step
time under it asks for other arithmetic (another precision, fewer products), not a faster kernel.
"""
from __future__ import annotations

import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import full_checkpoint, machine, timed, warm_page_cache, write_section  # noqa: E402

PEAK_SOURCE = r"""
#include <immintrin.h>
/* Each function runs `iterations` rounds of independent chains of one instruction kind on every thread and returns
   the operations done (a multiply-add = 2), 0 where this build's instructions lack that kind; the lanes' sums go to
   *sink so nothing is optimised away. */
double peak_bf16(long iterations, int threads, float *sink) {
#ifdef __AVX512BF16__
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
  *sink = total;
  return (double)iterations * threads * 12 * 32 * 2;
#else
  return 0;
#endif
}

double peak_fp32(long iterations, int threads, float *sink) {
#if defined(__AVX512F__)
  typedef __m512 vec;
#define LANES 16
#define FMA _mm512_fmadd_ps
#define SET1 _mm512_set1_ps
#elif defined(__FMA__)
  typedef __m256 vec;
#define LANES 8
#define FMA _mm256_fmadd_ps
#define SET1 _mm256_set1_ps
#endif
#ifdef LANES
  float total = 0.f;
#pragma omp parallel num_threads(threads) reduction(+:total)
  {
    vec acc[12], a = SET1(0.999f), b = SET1(1e-7f);
    for (int j = 0; j < 12; j++) acc[j] = SET1((float)j);
    for (long i = 0; i < iterations; i++) {
      for (int j = 0; j < 12; j++) acc[j] = FMA(acc[j], a, b);
      __asm__ volatile("" : "+v"(a));
    }
    float lanes[LANES];
    for (int j = 0; j < 12; j++) {
      *(vec *)lanes = acc[j];
      for (int k = 0; k < LANES; k++) total += lanes[k];
    }
  }
  *sink = total;
  return (double)iterations * threads * 12 * LANES * 2;
#else
  return 0;
#endif
}

double peak_int8(long iterations, int threads, float *sink) {
#if defined(__AVX512VNNI__)
  long total = 0;
#pragma omp parallel num_threads(threads) reduction(+:total)
  {
    __m512i acc[12], a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (int j = 0; j < 12; j++) acc[j] = _mm512_setzero_si512();
    for (long i = 0; i < iterations; i++) {
      for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
      __asm__ volatile("" : "+v"(a));
    }
    for (int j = 0; j < 12; j++) total += _mm512_reduce_add_epi32(acc[j]);
  }
  *sink = (float)total;
  return (double)iterations * threads * 12 * 64 * 2;
#elif defined(__AVX2__)
  /* u8 × s8 pairs added in 16 bits (vpmaddubsw), pairs of those in 32 (vpmaddwd by ones), then into the sum: each
     chain its own weights, or the compiler would compute the product once for all chains */
  long total = 0;
#pragma omp parallel num_threads(threads) reduction(+:total)
  {
    __m256i acc[6], b[6], a = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    for (int j = 0; j < 6; j++) {
      acc[j] = _mm256_setzero_si256();
      b[j] = _mm256_set1_epi8((char)(j - 3));
    }
    for (long i = 0; i < iterations; i++) {
      for (int j = 0; j < 6; j++)
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b[j]), ones));
      __asm__ volatile("" : "+v"(a));
    }
    int lanes[8];
    for (int j = 0; j < 6; j++) {
      _mm256_storeu_si256((__m256i *)lanes, acc[j]);
      for (int k = 0; k < 8; k++) total += lanes[k];
    }
  }
  *sink = (float)total;
  return (double)iterations * threads * 6 * 32 * 2;
#else
  return 0;
#endif
}
"""
CALLS = 3
TARGET = 3.5   # the issue's target: this many times diffusers fp32's speed per step
INT8 = "int8"
ARITHMETIC = {torch.bfloat16: "bf16", torch.float32: "fp32"}   # of each fast path's float products


def peaks() -> dict[str, float] | None:
    """GFLOP/s (a multiply-add = 2) of each arithmetic this CPU has, measured on all torch threads: "bf16" or "fp32"
    (the fast path's float products) and "int8"; None without a C compiler."""
    from sdstudio.models.native import compiled_library

    library = compiled_library("arithmetic_peaks", PEAK_SOURCE)
    if library is None:
        return None
    threads, sink, found = torch.get_num_threads(), ctypes.c_float(), {}
    for name in ("bf16", "fp32", INT8):
        run = getattr(library, f"peak_{name}")
        run.argtypes, run.restype = [ctypes.c_long, ctypes.c_int, ctypes.POINTER(ctypes.c_float)], ctypes.c_double
        iterations = 50_000_000 if name != INT8 else 25_000_000
        if run(1000, threads, ctypes.byref(sink)) == 0:
            continue
        run(iterations // 10, threads, ctypes.byref(sink))
        best = min(timed(run, iterations, threads, ctypes.byref(sink))[0] for _ in range(3))
        found[name] = run(1, threads, ctypes.byref(sink)) * iterations / best / 1e9
    return found


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
    """Hooks on every convolution, linear, GEGLU and attention module of `unet` adding what it runs to `tally` (the
    int8 layers' kinds named "int8 …"); the hooks' handles."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    from sdstudio.models.int8 import Int8GEGLU, Int8Linear
    from sdstudio.models.int8_winograd import M as INT8_TILE, Int8WinogradConv2d, int8_winograd_applies
    from sdstudio.models.winograd import OUTPUT_TILES, winograd_applies

    def int8(module, kind: str) -> str:
        return f"{INT8} {kind}" if type(module) in (Int8Linear, Int8GEGLU) else kind

    def winograd(flops: float, m: int) -> float:
        """A direct convolution's products at F(m×m, 3×3)'s count: (m + 2)² per m² outputs instead of 9."""
        return flops * (m + 2) ** 2 / (9 * m * m)

    def convolution(module, args, out):
        flops = 2 * out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        if type(module) is Int8WinogradConv2d and int8_winograd_applies(module, args[0]):
            tally.finish(f"{INT8} 3×3 convolutions (Winograd F({INT8_TILE}×{INT8_TILE}))", winograd(flops, INT8_TILE))
        elif module.kernel_size == (3, 3) and winograd_applies(module, args[0]):
            m = OUTPUT_TILES[args[0].dtype]
            tally.finish(f"3×3 convolutions (Winograd F({m}×{m}))", winograd(flops, m))
        else:
            size = f"{module.kernel_size[0]}×{module.kernel_size[1]}"
            tally.finish(int8(module, f"{size} convolutions") if size == "1×1" else f"{size} convolutions (direct)",
                         flops)

    def linear(weight: torch.Tensor, kind: str):
        return lambda module, args, out: tally.finish(int8(module, kind),
                                                      2 * args[0].numel() // weight.shape[1] * weight.numel())

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


def timer(unet: torch.nn.Module):
    """A function timing one CFG UNet call (seconds) on seeded 64×64 latents and a random text condition."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=generator).to(unet.dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(unet.dtype)

    def call() -> float:
        with torch.inference_mode():
            return timed(unet, latents, torch.tensor([500, 500]), encoder_hidden_states=context)[0]

    return call


def median_call(unet: torch.nn.Module) -> float:
    """Median seconds of CALLS such calls after an untimed one."""
    call = timer(unet)
    call()
    return statistics.median(call() for _ in range(CALLS))


def tallied_call(unet: torch.nn.Module) -> tuple[Tally, float]:
    """The tally of one more such call with the hooks, and its seconds."""
    tally = Tally()
    handles = hook_products(unet, tally)
    seconds = timer(unet)()
    for handle in handles:
        handle.remove()
    return tally, seconds


def main() -> None:
    from sdstudio.models.checkpoint import load_checkpoint, precision_options

    found = peaks()
    if found is None or "int8" not in found or not ({"bf16", "fp32"} & found.keys()):
        print("no C compiler, or neither AVX2 nor AVX-512: the peaks cannot be measured here")
        return
    path = full_checkpoint("sd1", "fp16")
    warm_page_cache(path)
    reference = median_call(load_checkpoint(path).unet)
    target = reference / TARGET
    rows = ["| precision | part of one SD1.5 CFG UNet call (512², batch 2) | arithmetic | GFLOP | at peak s | "
            "measured s (own time) | share of peak |", "|---|---|---|---|---|---|---|"]
    lines = [f"measured peaks ({torch.get_num_threads()} threads): "
             + ", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in found.items()),
             f"the exact fp32 UNet call (diffusers' UNet, torch's own layers): {reference:.2f} s; "
             f"{TARGET}× its speed = {target:.2f} s"]
    for precision in ("float", "auto"):
        options = precision_options(precision)
        unet = load_checkpoint(path, **options).unet
        float_arithmetic = ARITHMETIC[options["dtype"]]
        seconds = median_call(unet)
        tally, hooked = tallied_call(unet)
        del unet
        floor = 0.0
        for kind, flops in sorted(tally.flops.items(), key=lambda item: -item[1]):
            arithmetic = INT8 if kind.startswith(INT8) else float_arithmetic
            at_peak, spent = flops / 1e9 / found[arithmetic], tally.seconds[kind]
            floor += at_peak
            rows.append(f"| {precision} | {kind} | {arithmetic} | {flops / 1e9:.1f} | {at_peak:.2f} | {spent:.2f} | "
                        f"{at_peak / spent:.0%} |")
        rest = hooked - sum(tally.seconds.values())
        rows.append(f"| {precision} | everything else (norms, activations, residual adds, hooks) | – | – | – | "
                    f"{rest:.2f} | – |")
        rows.append(f"| {precision} | **the call** | | **{sum(tally.flops.values()) / 1e9:.1f}** | **{floor:.2f}** | "
                    f"**{hooked:.2f}** (unhooked {seconds:.2f}) | **{floor / seconds:.0%}** |")
        lines.append(f"`--precision {precision}`: {seconds:.2f} s a call ({reference / seconds:.2f}× the exact fp32 "
                     f"call), its arithmetic at peak {floor:.2f} s ({reference / floor:.2f}× the exact call at most "
                     f"with this arithmetic); {TARGET}× ({target:.2f} s) asks for {floor / target:.0%} of the peaks "
                     "over the products, with no time left for anything else")
    text = "\n".join(rows) + "\n\n" + "\n".join(f"- {line}" for line in lines)
    print(text)
    write_section("Arithmetic limit of the SD1.5 step (bench/roofline.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/roofline.py`. Peaks: C loops of "
                  "independent chains of the products' instructions on every thread (bf16: vdpbf16ps; fp32: FMA; "
                  "int8: vpdpbusd with VNNI, else vpmaddubsw + vpmaddwd + vpaddd); arithmetic: the products of one CFG "
                  "UNet call (batch 2, 64×64 latents) as each precision runs them here, counted from each module's "
                  "shapes (Winograd F(m×m) at (m+2)²/9m² of the direct products; transforms, norms and activations "
                  "not counted), the int8 layers' at the int8 peak; time: median of "
                  f"{CALLS} such calls, then one more with hooks timing each kind's modules (their own time, less "
                  "their hooked children's); the reference: the exact fp32 UNet (torch's own layers) in the same "
                  f"process.\n\n{text}")


if __name__ == "__main__":
    main()
