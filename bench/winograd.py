"""Winograd against oneDNN's direct convolution, in one process: on the bf16 fast path (F(2×2, 3×3)) each 3×3
convolution shape of an SD1.5 CFG step at 512² (batch 2) timed both ways with its error against a float64
convolution, then whole UNet calls (full-size random-weight SD1.5, CFG batch, 64×64 latents) alternating the two;
on the fast fp32 path (F(4×4, 3×3): `auto` on CPUs without native bf16 math) the same UNet shapes and the 512²
decode's VAE shapes."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import full_checkpoint, machine, warm_page_cache, write_section  # noqa: E402

# (channels in, channels out, latent side, times per CFG step) for SD1.5 at 512²
SD15_SHAPES = [(320, 320, 64, 7), (640, 320, 64, 2), (960, 320, 64, 1), (640, 640, 32, 6), (1280, 640, 32, 1),
               (1920, 640, 32, 1), (1280, 1280, 16, 7), (2560, 1280, 16, 2), (1280, 1280, 8, 11)]
# (channels in, channels out, side, times per decode) of the VAE decoder's 3×3 convolutions of 128 channels and more
# at 512² (batch 1): the fast fp32 path's Winograd takes them too
VAE_SHAPES = [(512, 512, 64, 10), (512, 512, 128, 7), (512, 512, 256, 1), (512, 256, 256, 1), (256, 256, 256, 5),
              (256, 256, 512, 1), (256, 128, 512, 1), (128, 128, 512, 5)]
ROUNDS = 3


def median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).norm() / exact.norm()).item()


def layer_rows(dtype: torch.dtype, shapes: list[tuple[int, int, int, int]], batch: int, what: str) -> list[str]:
    from sdstudio.models.winograd import winograd_applies, winograd_conv2d

    rows = [f"| {what} conv (in → out @ side², batch {batch}) | per {'step' if batch == 2 else 'decode'} | direct ms | "
            "Winograd ms | speed-up | direct error | Winograd error |", "|---|---|---|---|---|---|---|"]
    for channels, out_channels, side, count in shapes:
        torch.manual_seed(0)
        x = torch.randn(batch, channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            direct_s = median_time(lambda: F.conv2d(x, conv.weight, conv.bias, padding=1))
            winograd_s = median_time(lambda: winograd_conv2d(x, conv.weight, conv.bias))
            errors = (relative_error(F.conv2d(x, conv.weight, conv.bias, padding=1), exact),
                      relative_error(winograd_conv2d(x, conv.weight, conv.bias), exact))
            used = "" if winograd_applies(conv, x) else " (runs direct: too few tiles)"
        rows.append(f"| {channels} → {out_channels} @ {side}²{used} | {count} | {direct_s * 1e3:.1f} | "
                    f"{winograd_s * 1e3:.1f} | {direct_s / winograd_s:.2f}× | {errors[0]:.1e} | {errors[1]:.1e} |")
    return rows


def unet_rows() -> list[str]:
    from sdstudio.models.checkpoint import load_checkpoint
    from sdstudio.models.winograd import WinogradConv2d

    path = full_checkpoint("sd1", "fp16")
    warm_page_cache(path)
    unet = load_checkpoint(path, dtype=torch.bfloat16).unet
    convs = [m for m in unet.modules() if type(m) is WinogradConv2d]
    torch.manual_seed(0)
    latents, timestep = torch.randn(2, 4, 64, 64).bfloat16(), torch.tensor([500, 500])
    context = torch.randn(2, 77, 768).bfloat16()

    def call(kind: type) -> tuple[float, torch.Tensor]:
        for conv in convs:
            conv.__class__ = kind
        with torch.inference_mode():
            start = time.perf_counter()
            out = unet(latents, timestep, encoder_hidden_states=context).sample
            return time.perf_counter() - start, out

    call(torch.nn.Conv2d), call(WinogradConv2d)      # warm-up
    times = {torch.nn.Conv2d: [], WinogradConv2d: []}
    outputs = {}
    for _ in range(ROUNDS):
        for kind in times:
            seconds, outputs[kind] = call(kind)
            times[kind].append(seconds)
    direct, winograd = (statistics.median(times[k]) for k in times)
    difference = relative_error(outputs[WinogradConv2d].float(), outputs[torch.nn.Conv2d].double())
    return ["| UNet call (CFG batch, 512²) | s (median of 3, alternating) |", "|---|---|",
            f"| direct convolutions | {direct:.3f} |", f"| Winograd (the fast path) | {winograd:.3f} |",
            f"| speed-up | {direct / winograd:.2f}× |",
            f"| relative difference of the outputs | {difference:.1e} |"]


def main() -> None:
    from sdstudio.models.tuning import native_bf16

    tables = []
    if native_bf16():
        tables += [layer_rows(torch.bfloat16, SD15_SHAPES, 2, "bf16 UNet"), unet_rows()]
    tables += [layer_rows(torch.float32, SD15_SHAPES, 2, "fp32 UNet"),
               layer_rows(torch.float32, VAE_SHAPES, 1, "fp32 VAE")]
    table = "\n\n".join("\n".join(rows) for rows in tables)
    print(table)
    write_section("Winograd convolutions (bench/winograd.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/winograd.py`. One process; "
                  "errors are relative (L2) to a float64 convolution of the same inputs; bf16 (where the CPU has "
                  "native bf16 math) takes F(2×2, 3×3), fp32 (the fast fp32 path) F(4×4, 3×3); \"runs direct\": "
                  f"too few tiles for the layer to take Winograd.\n\n{table}")


if __name__ == "__main__":
    main()
