"""txt2img and img2img: the one place that orchestrates files, models, prompts, sampling and images.

Each entry point reads as A1111's recipe: check the request → seeds → prompt schedules and conditioning →
sigmas → first noise → sampler loop over a CFG denoiser → VAE decode → infotext → save.
"""
from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from PIL import Image

from sdstudio import __version__
from sdstudio.errors import InvalidRequestError, SDStudioError
from sdstudio.files.hashing import sha256_file
from sdstudio.images.infotext import format_infotext
from sdstudio.images.preview import latent_preview
from sdstudio.images.saving import output_dir, save_generated
from sdstudio.models import vae as vae_ops
from sdstudio.models.checkpoint import LoadedCheckpoint
from sdstudio.models.cuda_graphs import unet_forward
from sdstudio.models.device import device_memory
from sdstudio.models.int8 import finish_int8_calibration
from sdstudio.models.memory import release_idle_weights
from sdstudio.models.token_merging import token_merging
from sdstudio.prompt.conditioning import EmbeddingLookup, encode_texts
from sdstudio.prompt.parser import ExtraNetworkTag, extract_extra_networks, prompt_schedule, split_and
from sdstudio.sampling import registry
from sdstudio.sampling.denoisers import (CFGConds, CFGDenoiser, DiscreteSchedule, EpsDenoiser, LCMDenoiser,
                                         LCMSchedule, VDenoiser)
from sdstudio.sampling.brownian import BrownianTreeNoiseSampler
from sdstudio.sampling.rng import ImageRNG, batch_seeds


LATENT_FACTOR = 8             # pixels per latent cell
LATENT_CHANNELS = 4
MAX_SIDE = 8192               # refuse anything larger outright
VERSION_TAG = f"sdstudio-v{__version__}"
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}


class GenerationError(SDStudioError):
    """The generation itself failed (NaN in the UNet output, out of memory estimate, interrupted)."""


class Interrupted(GenerationError):
    """The job was stopped by the user; nothing partial was saved."""


class Skipped(Exception):
    """The current batch was skipped by the user (A1111 "Skip"); the job goes on with the next batch."""


@dataclass
class GenerationRequest:
    """Every setting of one txt2img/img2img job, with A1111's names and defaults."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    eta: float | None = None                # ancestral eta (A1111 opt eta_ancestral 1.0 / eta_ddim 0.0)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    eta_noise_seed_delta: int = 0
    randn_source: str = "GPU"              # "GPU" (= NV emulation without CUDA), "CPU", "NV"
    emphasis: str = "Original"
    comma_padding_backtrack: int = 20
    pad_conds: bool = False
    skip_early_cond: float = 0.0            # A1111 "Skip Early CFG": no negative prompt for this fraction of calls
    s_min_uncond: float = 0.0               # A1111 "NGMS": no negative prompt on every other call below this sigma
    s_min_uncond_all: bool = False          # NGMS on every call below that sigma
    token_merging_ratio: float = 0.0        # A1111 "Token merging ratio" (models/token_merging.py)
    # img2img
    init_images: list[Image.Image] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75


@dataclass
class StepInfo:
    """What a step callback receives: the step (1-based), total steps, the current latent (B,4,h,w)."""

    step: int
    steps: int
    latent: torch.Tensor
    family: str

    def preview(self) -> list[Image.Image]:
        """Cheap RGB previews of the current latent (no VAE), one per image, 1/8 of the image size."""
        images = latent_preview(self.latent, "sdxl" if self.family.startswith("sdxl") else "sd1")
        return images if isinstance(images, list) else [images]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    paths: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    request: GenerationRequest | None = None


StepCallback = Callable[[StepInfo], None]


@dataclass
class NetworkReport:
    """What applying extra networks (LoRA) did: infotext pairs (e.g. "Lora hashes") and warnings to show."""

    infotext: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class ExtraNetworks(Protocol):
    """Applies the prompt's `<lora:...>` tags to the model's weights (see models/lora); [] restores the base."""

    def apply(self, tags: list[ExtraNetworkTag]) -> NetworkReport: ...


# ---------------------------------------------------------------------------------------------------------------
# 1. checking the request


def check_request(model: LoadedCheckpoint, request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
    """Validate fields (names, ranges, memory) before any work; returns the request with the size rounded down
    to a multiple of 8 (A1111 floors it the same way) and warnings saying so."""
    warnings: list[str] = []
    registry.get_sampler_and_scheduler(request.sampler_name, request.scheduler)  # raises listing valid names
    if request.steps < 1:
        raise InvalidRequestError("steps", f"must be at least 1, got {request.steps}")
    if request.batch_size < 1 or request.n_iter < 1:
        raise InvalidRequestError("batch_size", "batch_size and n_iter must be at least 1")
    for name in ("width", "height"):
        value = getattr(request, name)
        if value < LATENT_FACTOR or value > MAX_SIDE:
            raise InvalidRequestError(name, f"{value} is outside {LATENT_FACTOR}..{MAX_SIDE} pixels")
        if value % LATENT_FACTOR:
            rounded = value - value % LATENT_FACTOR
            warnings.append(f"{name} {value} is not a multiple of 8: rounded down to {rounded}")
            request = replace(request, **{name: rounded})
    needed = estimate_memory(model, request)
    available = available_memory(model.device)
    if needed > available:
        raise InvalidRequestError(
            "width", f"{request.width}x{request.height} with batch size {request.batch_size} needs about "
                     f"{needed / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB is available")
    if request.init_images is not None and not 0 <= request.denoising_strength <= 1:
        raise InvalidRequestError("denoising_strength", f"must be within 0..1, got {request.denoising_strength}")
    if not 0 <= request.skip_early_cond <= 1:
        raise InvalidRequestError("skip_early_cond", f"must be within 0..1, got {request.skip_early_cond}")
    if not 0 <= request.token_merging_ratio < 1:
        raise InvalidRequestError("token_merging_ratio", f"must be within 0..1 (0 = off), got "
                                                         f"{request.token_merging_ratio}")
    if request.s_min_uncond < 0:
        raise InvalidRequestError("s_min_uncond", f"must be 0 (off) or a positive sigma, got {request.s_min_uncond}")
    if request.resize_mode not in RESIZE_MODES:
        raise InvalidRequestError("resize_mode", f"must be one of {sorted(RESIZE_MODES)}")
    return request, warnings


UNET_LIVE_TENSORS = 40     # activations of the first UNet level alive at once (skip connections included)
VAE_LIVE_TENSORS = 6       # full-resolution decoder activations alive at once


def estimate_memory(model: LoadedCheckpoint, request: GenerationRequest) -> int:
    """Rough peak bytes of a job: one UNet call with CFG at the first level (attention through SDPA's
    memory-efficient kernels, so no n² matrix) or the fp32 VAE decode of the batch at full resolution."""
    itemsize = torch.finfo(model.dtype).bits // 8
    rows = 2 * request.batch_size                      # cond + uncond
    cells = (request.width // LATENT_FACTOR) * (request.height // LATENT_FACTOR)
    unet = rows * cells * model.unet.config.block_out_channels[0] * itemsize * UNET_LIVE_TENSORS
    decode = (request.batch_size * request.width * request.height * model.vae.config.block_out_channels[0]
              * 4 * VAE_LIVE_TENSORS)
    return max(unet, decode)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes available now where `device`'s tensors live: a CUDA GPU's free memory, else RAM (MemAvailable, or a
    large number where it cannot be read)."""
    gpu = device_memory(device) if device is not None else None
    if gpu is not None:
        return gpu[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# ---------------------------------------------------------------------------------------------------------------
# 2. the UNet as a k-diffusion model and scheduled prompt conditioning


class UNetModel:
    """Calls the diffusers UNet with our cond dict: crossattn, SDXL text_embeds/time_ids, inpainting concat; the
    inputs go to the UNet's device and dtype, the output comes back as float32 on the CPU (models/device.py). On a
    GPU the calls replay CUDA graphs (models/cuda_graphs.py).
    Stops with an error suggesting fp32 when the output holds NaN."""

    def __init__(self, model: LoadedCheckpoint):
        self.unet = model.unet
        self.dtype = model.unet.dtype
        self.device = model.device

    def __call__(self, x: torch.Tensor, t: torch.Tensor, crossattn: torch.Tensor, text_embeds=None, time_ids=None,
                 concat=None) -> torch.Tensor:
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        inputs = {"sample": x, "timestep": t, "encoder_hidden_states": crossattn}
        if text_embeds is not None:
            inputs |= {"text_embeds": text_embeds, "time_ids": time_ids}
        with torch.inference_mode():
            out = unet_forward(self.unet, {name: self._in(value) for name, value in inputs.items()}).float().cpu()
        if torch.isnan(out).any():
            raise GenerationError(f"the UNet produced NaN in {self.dtype}; try --precision fp32")
        return out

    def _in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)


@dataclass
class PromptConds:
    """One image's conditioning over the steps: AND parts [(weight, [(end_step, cond)])], negative schedule."""

    parts: list[tuple[float, list[tuple[int, dict]]]]
    negative: list[tuple[int, dict]]


def _at(schedule: list[tuple[int, dict]], step: int) -> dict:
    """A1111 `reconstruct_cond_batch`: the first entry whose end step is >= the current step."""
    for end, cond in schedule:
        if step <= end:
            return cond
    return schedule[-1][1]


@dataclass
class NegativeSkipping:
    """A1111's optimizations that leave the negative prompt out of some model calls (such a call does the UNet
    work of the prompt alone; the image changes): "Skip Early CFG" for the first `early` fraction of the calls,
    "NGMS" on every other call (`all_calls`: every call) whose sigma is below `min_sigma`."""

    early: float = 0.0
    min_sigma: float = 0.0
    all_calls: bool = False
    total_calls: int = 1
    infotext: dict[str, Any] = field(default_factory=dict)   # what A1111 adds to the infotext once a call skipped

    @classmethod
    def of(cls, request: GenerationRequest, sigmas: torch.Tensor, second_order: bool, edit_model: bool):
        """The request's skipping over these sigmas (A1111 counts 2 calls a step for second-order samplers; NGMS
        never applies to instruct-pix2pix models)."""
        return cls(request.skip_early_cond, 0.0 if edit_model else request.s_min_uncond, request.s_min_uncond_all,
                   (len(sigmas) - 1) * (2 if second_order else 1))

    def skips(self, call: int, sigma: float) -> bool:
        """Whether model call number `call` (from 0) at noise level `sigma` leaves the negative prompt out."""
        if self.early and call / self.total_calls <= self.early:
            self.infotext["Skip Early CFG"] = self.early
            return True
        if (call % 2 or self.all_calls) and sigma < self.min_sigma:
            self.infotext["NGMS"] = self.min_sigma
            if self.all_calls:
                self.infotext["NGMS all steps"] = True
            return True
        return False


class ScheduledCFG:
    """k-diffusion model callable: picks each image's conds for the current step and applies CFG. The step
    counter advances once per model call, exactly like A1111's CFGDenoiser (so 2nd-order samplers advance
    the prompt schedule twice per sampler step, as in A1111)."""

    def __init__(self, denoiser, cfg_scale: float, conds: list[PromptConds], pad_chunk: torch.Tensor | None = None,
                 skipping: NegativeSkipping | None = None):
        self.cfg = CFGDenoiser(denoiser, cfg_scale)
        self.conds = conds
        self.pad_chunk = pad_chunk   # A1111 "Pad conds": the empty prompt's chunk, appended to the shorter side
        self.skipping = skipping or NegativeSkipping()
        self.step = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        parts = [[(_at(schedule, self.step), weight) for weight, schedule in image.parts] for image in self.conds]
        uncond = [_at(image.negative, self.step) for image in self.conds]
        if self.pad_chunk is not None:
            longest = max(c["crossattn"].shape[0] for c in uncond + [c for image in parts for c, _ in image])
            parts = [[(self._padded(c, longest), w) for c, w in image] for image in parts]
            uncond = [self._padded(c, longest) for c in uncond]
        skip_uncond = self.skipping.skips(self.step, sigma[0].item())
        out = self.cfg(x, sigma, CFGConds.build(parts, uncond), skip_uncond)
        self.step += 1
        return out

    def _padded(self, cond: dict, length: int) -> dict:
        missing = (length - cond["crossattn"].shape[0]) // self.pad_chunk.shape[0]
        if missing <= 0:
            return cond
        return {**cond, "crossattn": torch.cat([cond["crossattn"], self.pad_chunk.repeat(missing, 1)])}


class PromptEncoder:
    """Encodes prompt schedules once per job (cache by text), as A1111's get_learned_conditioning does:
    all schedule texts of one prompt in one encoder call, negatives likewise."""

    def __init__(self, model: LoadedCheckpoint, request: GenerationRequest, embeddings=None):
        self.model = model
        self.request = request
        sampler, _ = registry.get_sampler_and_scheduler(request.sampler_name, request.scheduler)
        # A1111 schedules prompts over the sampler's total model calls: 2 per step for second-order samplers
        self.schedule_steps = request.steps * (2 if sampler.second_order else 1)
        self.embeddings = EmbeddingLookup(embeddings) if embeddings is not None else None
        self.encoders = {e.kind: e.model for e in model.text_encoders}
        self.used_embeddings: dict[str, Any] = {}
        self._cache: dict[tuple[str, bool], list[tuple[int, dict]]] = {}

    def schedule(self, text: str, negative: bool, extra: dict[str, torch.Tensor]) -> list[tuple[int, dict]]:
        """[(end_step, cond dict)] for one prompt text (no AND left)."""
        key = (text, negative)
        if key not in self._cache:
            steps = prompt_schedule(text, self.schedule_steps)
            encoded = encode_texts(self.encoders, self.model.family, [t for _, t in steps], self.embeddings,
                                   clip_skip=self.request.clip_skip, emphasis=self.request.emphasis,
                                   comma_backtrack=self.request.comma_padding_backtrack, zero_if_empty=negative)
            for embedding in encoded.embeddings:
                self.used_embeddings[embedding.name] = embedding
            conds = []
            for i, (end, _) in enumerate(steps):
                cond = {"crossattn": encoded.crossattn[i]}
                if encoded.pooled is not None:
                    cond["text_embeds"] = encoded.pooled[i]
                conds.append((end, cond))
            self._cache[key] = conds
        return [(end, {**cond, **extra}) for end, cond in self._cache[key]]

    def image_conds(self, prompt: str, negative: str, extra: dict[str, torch.Tensor],
                    extra_negative: dict[str, torch.Tensor]) -> PromptConds:
        """AND-split positive parts with weights, plus the negative schedule (not AND-split, as in A1111)."""
        parts = [(weight, self.schedule(text, False, extra)) for text, weight in split_and(prompt)]
        return PromptConds(parts, self.schedule(negative, True, extra_negative))


def _sdxl_time_ids(model: LoadedCheckpoint, width: int, height: int, negative: bool) -> torch.Tensor:
    """SDXL size/crop conditioning: (orig h, w, crop top, left, target h, w); the refiner uses an aesthetic score
    (A1111 defaults 6.0 for the prompt, 2.5 for the negative) instead of the target size."""
    if model.family == "sdxl-refiner":
        return torch.tensor([height, width, 0, 0, 2.5 if negative else 6.0], dtype=torch.float32)
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def _image_conditioning(model: LoadedCheckpoint, latent_shape, init_latent: torch.Tensor | None,
                        init_pixels: torch.Tensor | None) -> torch.Tensor | None:
    """Extra UNet input channels per image: inpainting models get [mask(1), masked-image latent(4)] (A1111's
    txt2img uses a grey image and a full mask; img2img the whole init image with a full mask); instruct-pix2pix
    gets the init image latent (zeros in txt2img)."""
    extra = model.info.in_channels - LATENT_CHANNELS
    if extra == 0:
        return None
    _, h, w = latent_shape
    if model.info.variant == "inpaint":
        if init_pixels is None:
            grey = torch.full((1, 3, h * LATENT_FACTOR, w * LATENT_FACTOR), 0.5)
            masked = vae_ops.encode(model.vae, grey)[0]
        else:
            masked = init_latent
        return torch.cat([torch.ones(1, h, w), masked])
    return init_latent if init_latent is not None else torch.zeros(extra, h, w)


# ---------------------------------------------------------------------------------------------------------------
# 3. images in, images out


def resize_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's resize modes: 0 just resize, 1 crop and resize (fill, centre crop), 2 resize and fill (fit,
    pad by stretching the edges), 3 as 0 (latent upscale is done on latents by A1111; same pixels here)."""
    image = image.convert("RGB")
    if mode in (0, 3):
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        scale = width / image.width if ratio > src_ratio else height / image.height
        resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                               Image.LANCZOS)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))
    scale = width / image.width if ratio < src_ratio else height / image.height
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    left, top = (width - resized.width) // 2, (height - resized.height) // 2
    canvas.paste(resized, (left, top))
    if ratio < src_ratio and top > 0:      # fill above/below with the stretched first/last rows
        canvas.paste(resized.resize((width, top), box=(0, 0, width, 0)), (0, 0))
        canvas.paste(resized.resize((width, height - top - resized.height),
                                    box=(0, resized.height, width, resized.height)), (0, top + resized.height))
    elif ratio > src_ratio and left > 0:   # fill left/right with the stretched first/last columns
        canvas.paste(resized.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        canvas.paste(resized.resize((width - left - resized.width, height),
                                    box=(resized.width, 0, resized.width, height)), (left + resized.width, 0))
    return canvas


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1,3,H,W) float in [0,1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [0,1] -> PIL images (A1111 rounds 255·x down after clamping)."""
    array = (images.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def infotext_params(model: LoadedCheckpoint, request: GenerationRequest, seed: int, subseed: int,
                    model_hash: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The `Key: value` pairs A1111 writes for one image (None values are left out by the formatter)."""
    sampler, _ = registry.get_sampler_and_scheduler(request.sampler_name, request.scheduler)
    variation = request.subseed_strength != 0
    params: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": sampler.name,
        "Schedule type": registry.resolve_schedule(sampler, request.scheduler) if not sampler.timesteps else None,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash[:10] if model_hash else None,
        "Model": model.path.name.rsplit(".", 1)[0],
        "VAE hash": extra.pop("VAE hash", None),
        "VAE": model.vae_path.name if model.vae_path else None,
        "Variation seed": subseed if variation else None,
        "Variation seed strength": request.subseed_strength if variation else None,
        "Seed resize from": (f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
                             if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0 else None),
        "Denoising strength": request.denoising_strength if request.init_images else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "ENSD": (request.eta_noise_seed_delta if request.eta_noise_seed_delta and sampler.uses_ensd else None),
        "Token merging ratio": request.token_merging_ratio or None,
        "RNG": request.randn_source if request.randn_source != "GPU" else None,
    }
    eta = _eta(sampler, request)
    if sampler.eta_default is not None and eta != sampler.eta_default:
        params["Eta DDIM" if sampler.timesteps else "Eta"] = eta
    if request.emphasis != "Original" and any(c in request.prompt + request.negative_prompt for c in "()[]"):
        params["Emphasis"] = request.emphasis
    if request.pad_conds:
        params["Pad conds"] = True
    params.update(extra)
    params["Version"] = VERSION_TAG
    return params


def _eta(sampler: registry.SamplerSpec, request: GenerationRequest) -> float | None:
    return request.eta if request.eta is not None else sampler.eta_default


# ---------------------------------------------------------------------------------------------------------------
# 4. the recipe


def txt2img(model: LoadedCheckpoint, request: GenerationRequest | None = None, *, callback: StepCallback | None = None,
            data_dir: str | Path | None = None, save: bool = True, model_hash: str | None = None,
            embeddings=None, networks: ExtraNetworks | None = None, interrupt: threading.Event | None = None,
            skip: threading.Event | None = None, image_format: str = "png", **fields_: Any) -> GenerationResult:
    """Generate images from text. Fields of GenerationRequest may be given as keywords; images are saved
    under <data_dir>/outputs/txt2img-images/YYYY-MM-DD/ as `image_format` (png, jpg, webp) unless save=False. `embeddings` resolves
    textual-inversion names (a list of models.embeddings.Embedding), `networks` applies `<lora:...>` tags (without it, tags are reported as ignored)."""
    request = make_request(request, fields_)
    return _generate(model, replace(request, init_images=None), "txt2img", callback, data_dir, save, model_hash,
                     embeddings, networks, interrupt, skip, image_format)


def img2img(model: LoadedCheckpoint, request: GenerationRequest | None = None, *, callback: StepCallback | None = None,
            data_dir: str | Path | None = None, save: bool = True, model_hash: str | None = None,
            embeddings=None, networks: ExtraNetworks | None = None, interrupt: threading.Event | None = None,
            skip: threading.Event | None = None, image_format: str = "png", **fields_: Any) -> GenerationResult:
    """Generate images from init_images (PIL) and text with A1111's denoising-strength step semantics."""
    request = make_request(request, fields_)
    if not request.init_images:
        raise InvalidRequestError("init_images", "img2img needs at least one init image")
    return _generate(model, request, "img2img", callback, data_dir, save, model_hash, embeddings, networks,
                     interrupt, skip, image_format)


def make_request(request: GenerationRequest | None, overrides: dict[str, Any]) -> GenerationRequest:
    """`request` (or the defaults) with `overrides` applied; unknown field names are an error listing the valid ones."""
    known = {f.name for f in fields(GenerationRequest)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidRequestError(unknown[0], f"unknown field; valid fields: {', '.join(sorted(known))}")
    return replace(request or GenerationRequest(), **overrides)


def _generate(model: LoadedCheckpoint, request: GenerationRequest, mode: str, callback: StepCallback | None,
              data_dir: str | Path | None, save: bool, model_hash: str | None, embeddings,
              networks: ExtraNetworks | None, interrupt: threading.Event | None,
              skip: threading.Event | None = None, image_format: str = "png") -> GenerationResult:
    # 1. inputs
    request, warnings = check_request(model, request)
    sampler, _ = registry.get_sampler_and_scheduler(request.sampler_name, request.scheduler)
    prompt, tags = extract_extra_networks(request.prompt)   # A1111 reads tags from the positive prompt only
    negative = request.negative_prompt
    finish_int8_calibration(model.unet)   # before the job's LoRAs and hooks change the UNet (models/int8.py)
    if networks is not None:
        report = networks.apply(tags)
    else:
        report = NetworkReport(warnings=[f"<{t.kind}:{':'.join(t.positional)}> ignored: no extra networks here"
                                         for t in tags])
    warnings += report.warnings
    total = request.batch_size * request.n_iter
    seeds, subseeds = batch_seeds(request.seed, request.subseed, request.subseed_strength, total)
    latent_shape = (LATENT_CHANNELS, request.height // LATENT_FACTOR, request.width // LATENT_FACTOR)

    # 2. sigmas: the model's discrete schedule (alphas_cumprod from the file when it has them)
    unet = UNetModel(model)
    if sampler.consistency:
        schedule = LCMSchedule(model.alphas_cumprod)
        denoiser = LCMDenoiser(unet, schedule)
    else:
        schedule = DiscreteSchedule(model.alphas_cumprod)
        denoiser = (VDenoiser if model.info.prediction == "v" else EpsDenoiser)(unet, schedule)
    img2img_mode = request.init_images is not None
    sigmas = registry.make_sigmas(sampler, request.scheduler, request.steps, schedule,
                                  is_sdxl=model.family.startswith("sdxl"))
    if img2img_mode:
        t_enc = int(min(request.denoising_strength, 0.999) * request.steps)
        sigmas = sigmas[len(sigmas) - t_enc - 2:] if not sampler.timesteps else sigmas[-(t_enc + 1):]

    # 3. init latents (img2img): resized, VAE-encoded posterior means
    init_latents = init_pixels = None
    if img2img_mode:
        pixels = [_to_tensor(resize_image(img, request.resize_mode, request.width, request.height))
                  for img in request.init_images]
        init_pixels = torch.cat([pixels[i % len(pixels)] for i in range(request.batch_size)])
        init_latents = vae_ops.encode(model.vae, init_pixels)

    encoder = PromptEncoder(model, request, embeddings)
    pad_chunk = encoder.schedule("", False, {})[0][1]["crossattn"] if request.pad_conds else None
    skipping = NegativeSkipping.of(request, sigmas, sampler.second_order, model.info.variant == "instruct-pix2pix")
    result = GenerationResult([], [], seeds, subseeds, warnings=warnings, request=request)
    out_dir = output_dir(Path(data_dir or "."), mode) if save else None
    for batch in range(request.n_iter):
        if interrupt is not None and interrupt.is_set():
            raise Interrupted("interrupted before batch %d" % (batch + 1))
        batch_seed = seeds[batch * request.batch_size:(batch + 1) * request.batch_size]
        batch_subseed = subseeds[batch * request.batch_size:(batch + 1) * request.batch_size]
        # 4. conditioning for each image of the batch (A1111: the batch shares the first prompt's networks)
        conds = []
        for i in range(request.batch_size):
            concat = _image_conditioning(model, latent_shape,
                                         init_latents[i] if init_latents is not None else None,
                                         init_pixels[i] if init_pixels is not None else None)
            extra, extra_neg = {}, {}
            if concat is not None:
                extra["concat"] = extra_neg["concat"] = concat
            if model.unet.config.addition_embed_type == "text_time":
                extra["time_ids"] = _sdxl_time_ids(model, request.width, request.height, False)
                extra_neg["time_ids"] = _sdxl_time_ids(model, request.width, request.height, True)
            conds.append(encoder.image_conds(prompt, negative, extra, extra_neg))

        # 5. first noise and the sampler loop
        rng = ImageRNG(latent_shape, batch_seed, batch_subseed, request.subseed_strength,
                       request.seed_resize_from_h, request.seed_resize_from_w, request.randn_source,
                       request.eta_noise_seed_delta)
        noise = rng.first()
        if img2img_mode:
            x = init_latents + noise * sigmas[0]
        else:
            x = noise * sampler.initial_noise_scale(sigmas)
        release_idle_weights(model.vae, *(encoder.model for encoder in model.text_encoders))
        try:
            with token_merging(model.unet, request.token_merging_ratio):
                latents = _sample(sampler, request, ScheduledCFG(denoiser, request.cfg_scale, conds, pad_chunk,
                                                                 skipping),
                                  x, sigmas, rng, batch_seed, callback, model.family, interrupt, skip)
        except Skipped:
            skip.clear()
            result.warnings.append(f"batch {batch + 1} skipped")
            continue

        # 6. decode, infotext, save
        release_idle_weights(model.unet)
        images = _to_pil(vae_ops.decode(model.vae, latents))
        ti_hashes = _ti_hashes(encoder.used_embeddings)
        for i, image in enumerate(images):
            extra = dict(report.infotext)
            if ti_hashes:
                extra["TI hashes"] = ti_hashes
            extra.update(skipping.infotext)
            if report.warnings:
                extra["Warnings"] = "; ".join(report.warnings)
            params = infotext_params(model, request, batch_seed[i], batch_subseed[i], model_hash or _hash(model), extra)
            text = format_infotext(request.prompt, request.negative_prompt, params)
            result.images.append(image)
            result.infotexts.append(text)
            if out_dir is not None:
                result.paths.append(save_generated(image, outdir=out_dir, seed=batch_seed[i], infotext=text,
                                                   ext=image_format).path)
    return result


def _sample(sampler: registry.SamplerSpec, request: GenerationRequest, model_fn: ScheduledCFG, x: torch.Tensor,
            sigmas: torch.Tensor, rng: ImageRNG, seeds: list[int], callback: StepCallback | None, family: str,
            interrupt: threading.Event | None, skip: threading.Event | None = None) -> torch.Tensor:
    """Run the sampler function with only the keyword arguments it takes (A1111 filters them the same way)."""
    options: dict[str, Any] = dict(sampler.extra_kwargs)
    accepted = inspect.signature(sampler.function).parameters
    wanted = {"eta": _eta(sampler, request), "s_churn": request.s_churn, "s_tmin": request.s_tmin,
              "s_tmax": request.s_tmax, "s_noise": request.s_noise}
    options.update({k: v for k, v in wanted.items() if k in accepted and v is not None})
    if "noise_sampler" in accepted:
        if sampler.brownian_noise:
            positive = sigmas[sigmas > 0]
            options["noise_sampler"] = BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seeds)
        else:
            options["noise_sampler"] = rng.noise_sampler
    steps = len(sigmas) - 1

    def on_step(info: dict) -> None:
        if interrupt is not None and interrupt.is_set():
            raise Interrupted("interrupted at step %d" % (info["i"] + 1))
        if skip is not None and skip.is_set():
            raise Skipped()
        if callback is not None:
            callback(StepInfo(info["i"] + 1, steps, info["x"], family))

    return sampler.function(model_fn, x, sigmas, extra_args={}, callback=on_step, **options)


def _ti_hashes(used: dict[str, Any]) -> str | None:
    """A1111 `TI hashes: "name: hash12, ..."` for the embeddings a job used."""
    items = [f"{name.replace(':', '').replace(',', '')}: {e.short_hash}" for name, e in used.items()
             if getattr(e, "short_hash", None)]
    return ", ".join(items) or None


def _hash(model: LoadedCheckpoint) -> str:
    """The checkpoint's sha256 (computed once per loaded model)."""
    if "sha256" not in model.metadata:
        model.metadata["sha256"] = sha256_file(model.path)
    return model.metadata["sha256"]


# ---------------------------------------------------------------------------------------------------------------
# 5. regenerating from an infotext

_INFOTEXT_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Seed resize from-1": ("seed_resize_from_w", int),
    "Seed resize from-2": ("seed_resize_from_h", int),
    "Denoising strength": ("denoising_strength", float),
    "Clip skip": ("clip_skip", int),
    "ENSD": ("eta_noise_seed_delta", int),
    "RNG": ("randn_source", str),
    "Eta": ("eta", float),
    "Eta DDIM": ("eta", float),
    "Emphasis": ("emphasis", str),
    "Pad conds": ("pad_conds", lambda v: str(v).lower() == "true"),
    "Skip Early CFG": ("skip_early_cond", float),
    "NGMS": ("s_min_uncond", float),
    "NGMS all steps": ("s_min_uncond_all", lambda v: str(v).lower() == "true"),
    "Token merging ratio": ("token_merging_ratio", float),
}


def request_from_infotext(text: str, base: GenerationRequest | None = None) -> GenerationRequest:
    """A GenerationRequest that regenerates the image an A1111/sdstudio infotext describes (unknown keys ignored;
    `Model`/`Model hash` are for the caller to pick the checkpoint)."""
    from sdstudio.images.infotext import parse_infotext

    parsed = parse_infotext(text)
    values: dict[str, Any] = {"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt}
    for key, (name, convert) in _INFOTEXT_FIELDS.items():
        if key in parsed.params:
            try:
                values[name] = convert(parsed.params[key])
            except ValueError as exc:
                raise InvalidRequestError(key, f"infotext value {parsed.params[key]!r} is not valid: {exc}") from exc
    return replace(base or GenerationRequest(), **values)
