"""Where the models run (`--device`): the CPU, or a CUDA GPU when one is present.

Only the networks (UNet, text encoders, VAE) and their weights live on the device; each is called with its inputs
moved there and gives its outputs back as float32 CPU tensors. Sampling, schedules, noise and prompt bookkeeping stay
on the CPU in float32: a few hundred kilobytes per step cross the bus (nothing next to a UNet call), and the sampler
arithmetic is the same on every machine.
"""
from __future__ import annotations

import torch

from sdstudio.errors import SDStudioError

DEVICES = ("auto", "cpu", "cuda")   # names resolve_device takes (also "cuda:N")


def resolve_device(name: str) -> torch.device:
    """torch device for a `--device` name; `auto` is the first CUDA GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SDStudioError(f"--device {name!r}: not a device name; use one of {', '.join(DEVICES)}") from exc
    if device.type not in ("cpu", "cuda"):
        raise SDStudioError(f"--device {name!r}: sdstudio runs on cpu or cuda")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SDStudioError(f"--device {name!r}: this torch sees no CUDA GPU (a CPU-only build, or no driver)")
        if device.index is not None and device.index >= count:
            raise SDStudioError(f"--device {name!r}: there are only {count} CUDA GPUs (cuda:0..cuda:{count - 1})")
    return device


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device's memory; None for the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)
