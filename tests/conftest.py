"""Shared fixtures: tiny synthetic model files in the real layouts, built once per test session."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdstudio import synthetic

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture
def fast_kernels(monkeypatch):
    """The CPU fast paths' kernels (bf16 and fp32 Winograd and the unfolded convolutions, the flash, OpenVINO's and
    the blocked attention, int8 linears and convolutions, the GEGLU kernels) in use wherever this machine can run
    them, whatever it measured for them (models/tuning.py): for the tests of those kernels. A kernel this CPU cannot
    run (the bf16 flash kernel without AVX512-BF16) stays off."""
    from sdstudio.models import attention, fused, int8, int8_winograd, winograd

    choices = (winograd.winograd_pays, winograd.unfolded_pays, attention.flash_pays, attention.openvino_pays,
               attention.blocked_pays, int8.int8_pays, int8_winograd.int8_winograd_pays, fused.geglu_kernel_pays,
               fused.gelu_product_pays)
    for module in (winograd, attention, int8, int8_winograd, fused):
        monkeypatch.setattr(module, "candidate_pays", lambda name, ways, dtype: True)
    for choice in choices:
        choice.cache_clear()
    yield
    for choice in choices:   # the forced choices leave the caches
        choice.cache_clear()


@pytest.fixture(scope="session")
def synth_file(tmp_path_factory):
    """Factory: path of a tiny synthetic checkpoint (family, variant, fmt, outlier_channels), written once per
    session."""
    folder = tmp_path_factory.mktemp("synth")
    made: dict[tuple[str, str, str, bool], Path] = {}

    def make(family: str = "sd1", variant: str = "pruned", fmt: str = "safetensors",
             outlier_channels: bool = False) -> Path:
        key = (family, variant, fmt, outlier_channels)
        if key not in made:
            name = f"{family}-{variant}{'-outliers' if outlier_channels else ''}.{fmt}"
            made[key] = synthetic.write_checkpoint(folder / name, family, "tiny", variant, fmt,
                                                   outlier_channels=outlier_channels)
        return made[key]

    return make


@pytest.fixture(scope="session")
def sd1_file(synth_file) -> Path:
    return synth_file("sd1", "pruned")


@pytest.fixture(scope="session")
def sd1_model(sd1_file):
    """The tiny SD1 checkpoint loaded in fp32 (shared; tests must not modify it)."""
    from sdstudio.models.checkpoint import load_checkpoint

    return load_checkpoint(sd1_file)


def wait_until_serving(url: str, attempts: int = 300) -> None:
    """Poll a server's OpenAPI schema until it answers (0.1 s apart); fail the test if it never does."""
    import time

    import httpx

    for _ in range(attempts):
        try:
            httpx.get(url + "/openapi.json", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"server at {url} did not start")
