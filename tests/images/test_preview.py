"""Cheap latent -> RGB previews."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.errors import InvalidRequestError
from sdstudio.images.preview import latent_preview, latent_to_rgb


def _unit_latent(channel: int, h: int = 2, w: int = 3) -> torch.Tensor:
    latent = torch.zeros(4, h, w)
    latent[channel] = 1.0
    return latent


def test_single_latent_gives_rgb_image_of_latent_size():
    image = latent_preview(torch.randn(4, 64, 48, generator=torch.Generator().manual_seed(0)))
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB" and image.size == (48, 64)  # PIL size is (width, height)


def test_batch_gives_one_image_each():
    images = latent_preview(torch.randn(3, 4, 8, 16), family="sdxl")
    assert isinstance(images, list) and len(images) == 3
    assert all(im.size == (16, 8) and im.mode == "RGB" for im in images)


def test_rgb_array_shape_and_dtype():
    rgb = latent_to_rgb(torch.randn(2, 4, 5, 7).half())
    assert rgb.shape == (2, 5, 7, 3) and rgb.dtype == np.uint8


def test_sd1_values_from_published_factors():
    # zero latent -> mid grey; channel 0 = 1 -> (1 + row 0 of ComfyUI's SD15 factors) * 127.5
    assert latent_to_rgb(torch.zeros(4, 1, 1))[0, 0].tolist() == [128, 128, 128]
    # R = 1.3512 * 127.5 = 172.28, G = 1.2297 * 127.5 = 156.79, B = 1.3227 * 127.5 = 168.64
    assert latent_to_rgb(_unit_latent(0))[1, 2].tolist() == [172, 157, 169]
    # channel 3 = 1: R = 0.7880 * 127.5 = 100.47, G = 0.7384 * 127.5 = 94.15, B = 0.2823 * 127.5 = 35.99
    assert latent_to_rgb(_unit_latent(3))[0, 0].tolist() == [100, 94, 36]


def test_sdxl_uses_its_own_factors_and_bias():
    # zero latent -> bias only: (1 + 0.1084, 1 - 0.0175, 1 - 0.0011) * 127.5 = 141.32, 125.27, 127.36
    assert latent_to_rgb(torch.zeros(4, 1, 1), "sdxl")[0, 0].tolist() == [141, 125, 127]
    # SD2 shares SD1's VAE latent space, the refiner SDXL's
    latent = torch.randn(4, 4, 4)
    assert np.array_equal(latent_to_rgb(latent, "sd2"), latent_to_rgb(latent, "sd1"))
    assert np.array_equal(latent_to_rgb(latent, "sdxl-refiner"), latent_to_rgb(latent, "sdxl"))
    assert not np.array_equal(latent_to_rgb(latent, "sdxl"), latent_to_rgb(latent, "sd1"))


def test_different_latents_give_different_colours_and_saturate():
    colours = {tuple(latent_to_rgb(_unit_latent(c))[0, 0].tolist()) for c in range(4)}
    assert len(colours) == 4
    # column sums of the SD15 factors are all positive (0.1813, 0.6417, 0.1121): clamped, no uint8 wrap-around
    assert latent_to_rgb(torch.full((4, 1, 1), 100.0))[0, 0].tolist() == [255, 255, 255]
    assert latent_to_rgb(torch.full((4, 1, 1), -100.0))[0, 0].tolist() == [0, 0, 0]


def test_fast_for_a_64x64_latent():
    latent = torch.randn(4, 64, 64)
    latent_preview(latent)
    start = time.perf_counter()
    for _ in range(10):
        latent_preview(latent)
    assert (time.perf_counter() - start) / 10 < 0.02  # a few ms expected; generous for loaded CI machines


def test_bad_family_or_shape_is_a_request_error():
    with pytest.raises(InvalidRequestError, match="family"):
        latent_preview(torch.zeros(4, 2, 2), family="flux")
    with pytest.raises(InvalidRequestError, match="latent"):
        latent_preview(torch.zeros(3, 2, 2))
