"""Winograd F(2×2, 3×3) against oneDNN's direct convolution on the bf16 fast path, in one process: each 3×3
convolution shape of an SD1.5 CFG step at 512² (batch 2) timed both ways with its error against a float64
convolution, then whole UNet calls (full-size random-weight SD1.5, CFG batch, 64×64 latents) alternating the two."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import full_checkpoint, machine, native_bf16, warm_page_cache, write_section  # noqa: E402

# (channels in, channels out, latent side, times per CFG step) for SD1.5 at 512²
SD15_SHAPES = [(320, 320, 64, 7), (640, 320, 64, 2), (960, 320, 64, 1), (640, 640, 32, 6), (1280, 640, 32, 1),
               (1920, 640, 32, 1), (1280, 1280, 16, 7), (2560, 1280, 16, 2), (1280, 1280, 8, 11)]
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


def layer_rows() -> list[str]:
    from sdstudio.models.winograd import winograd_applies, winograd_conv2d

    rows = ["| conv (in → out @ side², batch 2) | per step | direct ms | Winograd ms | speed-up | direct error | "
            "Winograd error |", "|---|---|---|---|---|---|---|"]
    for channels, out_channels, side, count in SD15_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(2, channels, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)
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
    if not native_bf16():
        print("no native bf16 on this CPU: the fast path runs fp32 and Winograd does not apply")
        return
    table = "\n".join(layer_rows()) + "\n\n" + "\n".join(unet_rows())
    print(table)
    write_section("Winograd convolutions (bench/winograd.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/winograd.py`. One process; "
                  f"errors are relative (L2) to a float64 convolution of the same bf16 inputs.\n\n{table}")


if __name__ == "__main__":
    main()
