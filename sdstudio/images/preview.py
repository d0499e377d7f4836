"""Cheap live previews: a linear latent -> RGB map per pixel, no VAE ("Approx cheap" in A1111).

Factors (4x3 matrix + RGB bias) are ComfyUI's `comfy/latent_formats.py` SD15 / SDXL `latent_rgb_factors`
(`_bias`); they act on the sampler's latent (already multiplied by the VAE scaling factor) and give RGB in
[-1, 1]. Each latent pixel becomes one preview pixel, so the preview is 8x smaller than the image.
The arithmetic runs in numpy on the CPU: for a few thousand pixels torch's thread pool costs more than it saves.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sdstudio.errors import InvalidRequestError

_SD1_FACTORS = (  # rows: latent channels 0..3, columns: R, G, B
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)
_NO_BIAS = (0.0, 0.0, 0.0)

# family (as files.detect names it) -> (factors, bias); SD2 shares SD1's VAE, the refiner SDXL's.
LATENT_RGB: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "sd1": (_SD1_FACTORS, _NO_BIAS),
    "sd2": (_SD1_FACTORS, _NO_BIAS),
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
    "sdxl-refiner": (_SDXL_FACTORS, _SDXL_BIAS),
}


def latent_to_rgb(latent: torch.Tensor, family: str = "sd1") -> np.ndarray:
    """(..., 4, h, w) latent (any device/dtype) -> (..., h, w, 3) uint8 RGB array."""
    if family not in LATENT_RGB:
        raise InvalidRequestError("family", f"{family!r} is not one of {', '.join(LATENT_RGB)}")
    if latent.ndim < 3 or latent.shape[-3] != 4:
        raise InvalidRequestError("latent", f"expected shape (4, h, w) or (B, 4, h, w), got {tuple(latent.shape)}")
    factors, bias = LATENT_RGB[family]
    values = latent.detach().to("cpu", torch.float32).numpy()
    rgb = np.einsum("...chw,cr->...hwr", values, np.asarray(factors, np.float32)) + np.asarray(bias, np.float32)
    return np.clip((rgb + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def latent_preview(latent: torch.Tensor, family: str = "sd1") -> Image.Image | list[Image.Image]:
    """RGB preview of a (4, h, w) latent as one h x w image, or of a (B, 4, h, w) batch as a list of images."""
    pixels = latent_to_rgb(latent, family)
    if latent.ndim == 3:
        return Image.fromarray(pixels)
    return [Image.fromarray(item) for item in pixels.reshape(-1, *pixels.shape[-3:])]
