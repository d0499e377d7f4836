"""Request bodies of the AUTOMATIC1111 API (`/sdapi/v1/…`), with A1111's field names and defaults."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_SIDE = 8192


class Txt2ImgRequest(BaseModel):
    """StableDiffusionProcessingTxt2Img fields A1111 clients send (unknown fields are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = Field(-1, le=MAX_SIDE)
    seed_resize_from_w: int = Field(-1, le=MAX_SIDE)
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=100)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=8, le=MAX_SIDE)
    height: int = Field(512, ge=8, le=MAX_SIDE)
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    s_min_uncond: float | None = None
    token_merging_ratio: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    send_images: bool = True
    save_images: bool = False
    infotext: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str]
    resize_mode: int = Field(0, ge=0, le=3)
    denoising_strength: float = Field(0.75, ge=0, le=1)
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


class TokensRequest(BaseModel):
    text: str = ""
