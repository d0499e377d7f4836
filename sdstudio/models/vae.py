"""External VAE files: read, check the family, swap in without reloading the checkpoint; NaN-safe decode."""
from __future__ import annotations

import logging
import math
import re
import weakref
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from diffusers import AutoencoderKL

from sdstudio.errors import ModelFileError
from sdstudio.files.keymaps import vae_to_diffusers
from sdstudio.files.readers import read_state_dict, read_tensor_infos
from sdstudio.models.build import build_vae, has_fast_cpu_kernels, vae_from_config
from sdstudio.models.checkpoint import LoadedCheckpoint, fast_cpu_dtype
from sdstudio.models.memory import return_freed_heap
from sdstudio.models.native import release_kernel_buffers
from sdstudio.models.strip_decode import group_normalise, group_statistics, up_path_in_strips

log = logging.getLogger(__name__)

VAE_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
VAE_PREFIXES = ("first_stage_model.", "vae.")
IGNORED_PREFIXES = ("loss.", "model_ema.")   # A1111 vae_ignore_keys: LPIPS/discriminator and EMA scalars
SD_LATENT_CHANNELS = 4
XL_NAME = re.compile(r"(^|[^a-z])(sd)?xl([^a-z]|$)", re.IGNORECASE)

AUTOMATIC, NONE = "Automatic", "None"


def vae_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A standalone VAE file's weights in diffusers names (prefix, state_dict wrapper and loss.* removed)."""
    path = Path(path)
    sd = read_state_dict(path)
    if any(k.startswith("model.diffusion_model.") for k in sd):
        raise ModelFileError(path, "this is a full checkpoint, not a VAE: move it to models/Stable-diffusion")
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix + "decoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    if "decoder.conv_out.weight" not in sd or "post_quant_conv.weight" not in sd:
        raise ModelFileError(path, "not a VAE file: no decoder.conv_out / post_quant_conv weights")
    if any(".up_blocks." in k or ".down_blocks." in k for k in sd):
        return sd  # already diffusers layout
    try:
        return vae_to_diffusers(sd)
    except (KeyError, ValueError) as exc:
        raise ModelFileError(path, f"VAE keys not recognised: {exc}") from exc


def vae_family(path: str | Path, latent_channels: int, metadata: dict[str, str]) -> str | None:
    """'sdxl', 'sd' or None (unknown). SD1/SD2/SDXL VAEs have identical shapes, so beyond the latent width this
    uses what the file declares (ModelSpec / kohya metadata) and, last, an 'xl' token in the file name."""
    if latent_channels != SD_LATENT_CHANNELS:
        return f"{latent_channels}-channel latents (SD3/Flux-style)"
    declared = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    if "xl" in declared:
        return "sdxl"
    if declared.strip():
        return "sd"
    return "sdxl" if XL_NAME.search(Path(path).stem) else None


def load_vae_module(path: str | Path, family: str, dtype: torch.dtype, device: torch.device | str = "cpu",
                    fast_fp32: bool = False) -> AutoencoderKL:
    """Build an AutoencoderKL on `device` from a standalone VAE file after checking it fits `family` (`fast_fp32`:
    models/build.build_vae)."""
    path = Path(path)
    infos, metadata = read_tensor_infos(path)
    latent = next((int(t.shape[0]) for k, t in infos.items() if k.endswith("post_quant_conv.weight")), None)
    if latent is None:
        raise ModelFileError(path, "not a VAE file: no post_quant_conv weight")
    kind = vae_family(path, latent, metadata)
    wants_xl = family.startswith("sdxl")
    if kind is not None and kind not in ("sd", "sdxl"):
        raise ModelFileError(path, f"VAE has {kind}; a {family} model needs a 4-channel SD VAE")
    if kind == "sdxl" and not wants_xl:
        raise ModelFileError(path, f"this is an SDXL VAE; the loaded model is {family}: pick an SD1/SD2 VAE")
    if kind == "sd" and wants_xl:
        raise ModelFileError(path, f"this is an SD1/SD2 VAE; the loaded model is {family}: pick an SDXL VAE")
    return build_vae(vae_weights(path), family, dtype, str(path), device, fast_fp32).to(device)


def find_automatic_vae(checkpoint: Path, candidates: Iterable[Path]) -> Path | None:
    """A1111 'Automatic': the first VAE whose file name starts with the checkpoint's name minus its extension."""
    stem = checkpoint.name.rsplit(".", 1)[0]
    for candidate in sorted(candidates, key=lambda p: p.name.lower()):
        if candidate.name.startswith(stem + ".") and candidate.suffix in VAE_EXTENSIONS:
            return candidate
    return None


def resolve_vae(mode: str, checkpoint: Path, available: dict[str, Path]) -> Path | None:
    """The VAE file for a mode: 'Automatic' (one named after the checkpoint, else the baked-in VAE),
    'None' (the checkpoint's own) or a name from `available` (file name -> path)."""
    if mode == NONE:
        return None
    if mode == AUTOMATIC:
        return find_automatic_vae(checkpoint, list(available.values()) + list(checkpoint.parent.glob("*.vae.*")))
    if mode not in available:
        raise ModelFileError(mode, f"unknown VAE; available: {', '.join(sorted(available)) or 'none'}")
    return available[mode]


def swap_vae(model: LoadedCheckpoint, path: str | Path | None) -> None:
    """Use the VAE file at `path` (None = the checkpoint's own). On any error the previous VAE stays active."""
    if path is None:
        if model.own_vae is None:
            raise ModelFileError(model.path, "has no baked-in VAE; an external VAE is required")
        model.vae, model.vae_path = model.own_vae, None
        return
    if model.vae_path is not None and Path(path) == model.vae_path:
        return
    # raises before anything changes
    new_vae = load_vae_module(path, model.family, model.dtype, model.device, model.fast_fp32)
    model.vae, model.vae_path = new_vae, Path(path)


TILE_LATENT = 128       # decode tiles of at most 128×128 latents (1024 px, the largest decode that runs untiled)
TILE_OVERLAP = 32       # latents of overlap between neighbouring tiles, blended linearly
TILE_ABOVE = 128 * 128  # latent pixels above which decode/encode go tiled (larger than 1024×1024 images)


def decode(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool | None = None, tile: int = TILE_LATENT,
           overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """Scaled latents (B,4,h,w) -> images (B,3,8h,8w) in [0,1], float32 on the CPU, whatever device the VAE runs on.
    Large images (or `tiled=True`) decode in overlapping tiles of at most `tile` latents so memory stays bounded. A
    half-precision VAE that produces NaN (its activations overflow fp16: SDXL's VAE does) decodes again in a wider
    dtype and keeps that copy for its later decodes (logged once; A1111 converts its VAE likewise): bf16 where the
    device computes bf16 natively (fp32's range at half the work), else fp32 — never a black image."""
    tiled = latents.shape[-2] * latents.shape[-1] > TILE_ABOVE if tiled is None else tiled
    module = _WIDER_COPIES.get(vae, vae)
    images = _decode_once(module, latents, tiled, tile, overlap)
    while torch.isnan(images).any() and module.dtype != torch.float32:
        wider = _wider_dtype(module)
        log.warning("VAE produced NaN in %s; decoding in %s from now on", module.dtype, wider)
        module = _WIDER_COPIES[vae] = vae_from_config(vae.config, vae.state_dict(), wider, "<vae>", vae.device)
        images = _decode_once(module, latents, tiled, tile, overlap)
    if torch.isnan(images).any():
        raise ModelFileError("<vae>", "VAE decode produced NaN even in float32; the VAE or latents are broken")
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


# a half-precision VAE -> its copy in a wider dtype, made when it overflowed (goes with the VAE)
_WIDER_COPIES: weakref.WeakKeyDictionary[AutoencoderKL, AutoencoderKL] = weakref.WeakKeyDictionary()


def _wider_dtype(vae: AutoencoderKL) -> torch.dtype:
    """bf16 for an fp16 VAE on a device with native bf16 math (a CUDA GPU that has it, an AMX / AVX512-BF16 CPU),
    else fp32."""
    if vae.dtype == torch.float16:
        native = (torch.cuda.is_bf16_supported() if vae.device.type == "cuda" else
                  vae.device.type == "cpu" and fast_cpu_dtype() == torch.bfloat16)
        if native:
            return torch.bfloat16
    return torch.float32


def _decode_once(vae: AutoencoderKL, latents: torch.Tensor, tiled: bool, tile: int, overlap: int) -> torch.Tensor:
    return_freed_heap()
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    # exact fp32 is the reference (diffusers' own forward), and a GPU runs it whole; half precision on the CPU and
    # the fast fp32 path run the same arithmetic in strips of rows (SD1.5 512², fast fp32: +0.72 GiB over the loaded
    # model against +1.78, the same speed)
    strips = latents.device.type == "cpu" and (vae.dtype != torch.float32 or has_fast_cpu_kernels(vae))
    with torch.inference_mode():
        if not tiled:
            images = (up_path_in_strips(vae.decoder, decoder_trunk(vae, latents)) if strips
                      else vae.decode(latents).sample)
        else:   # the low-resolution trunk (mid-block attention is global) runs whole; the high-resolution up path,
            # where the memory goes, runs in tiles (in strips within each, where strips run)
            features = decoder_trunk(vae, latents)
            up_path = partial(up_path_in_strips, vae.decoder) if strips else partial(_decoder_up_path, vae)
            with shared_group_norm_statistics(vae.decoder, up_path, features, _statistics_budget(tile)):
                images = run_tiled(up_path, features, tile, overlap, scale=8)
    release_kernel_buffers()
    return images


def decoder_trunk(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' Decoder.forward up to the end of its mid block (at latent resolution)."""
    if vae.post_quant_conv is not None:
        latents = vae.post_quant_conv(latents)
    return vae.decoder.mid_block(vae.decoder.conv_in(latents), None)


def _decoder_up_path(vae: AutoencoderKL, features: torch.Tensor) -> torch.Tensor:
    """The rest of diffusers' Decoder.forward: up blocks, output norm, activation and convolution."""
    decoder = vae.decoder
    for block in decoder.up_blocks:
        features = block(features, None)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(features)))


def encode(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None,
           sample: bool = False, tiled: bool | None = None, tile: int = TILE_LATENT,
           overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """Images (B,3,H,W) in [0,1] -> scaled latents (B,4,H/8,W/8), float32 on the CPU; the posterior mean unless
    `sample` (drawn with `generator`, which must be on the VAE's device). Large images
    (or `tiled=True`) encode in overlapping tiles of at most 8×`tile` pixels; the posterior is blended, then sampled
    once."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pixels = (images * 2 - 1).to(vae.device, vae.dtype)
    tiled = images.shape[-2] * images.shape[-1] > TILE_ABOVE * 64 if tiled is None else tiled
    with torch.inference_mode():
        if tiled:
            with shared_group_norm_statistics(vae.encoder, vae.encode, pixels, _statistics_budget(tile) * 64):
                parameters = run_tiled(lambda piece: vae.encode(piece).latent_dist.parameters, pixels, tile * 8,
                                       overlap * 8, scale=1 / 8)
            posterior = DiagonalGaussianDistribution(parameters.to(vae.dtype))
        else:
            posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
    release_kernel_buffers()
    return latents.float().cpu() * vae.config.scaling_factor


def _statistics_budget(tile: int) -> int:
    """Latent pixels the statistics pass may run on: what runs untiled anyway, or one tile if tiles are larger."""
    return max(tile * tile, TILE_ABOVE)


@contextmanager
def shared_group_norm_statistics(network: torch.nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor,
                                 budget: int):
    """Make every GroupNorm of `network` normalise each tile with whole-image statistics instead of the tile's own
    (tile-local statistics shift colours from tile to tile: visible seams). The statistics come from one run of
    `run` on `x` subsampled (nearest, which keeps the fine texture the statistics depend on) to at most `budget`
    pixels, the area the caller would run untiled, so the extra memory is no more than that; exact when `x` fits.
    The less it shrinks the better: a random-weight VAE measures 31.5 dB vs the untiled decode at 0.73× per side,
    35.5 dB at 0.88× (tests/models/test_vae.py); trained VAEs respond far less to texture."""
    norms = [m for m in network.modules() if isinstance(m, torch.nn.GroupNorm)]
    shrink = min(1.0, math.sqrt(budget / (x.shape[-2] * x.shape[-1])))
    small = x if shrink == 1 else torch.nn.functional.interpolate(
        x.float(), scale_factor=shrink, mode="nearest-exact").to(x.dtype)
    statistics: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def statistics_of(norm: torch.nn.GroupNorm, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if norm not in statistics:  # each GroupNorm runs once per pass: the first (estimating) pass records
            statistics[norm] = group_statistics(values, norm.num_groups)
        return statistics[norm]

    def forward(norm: torch.nn.GroupNorm, values: torch.Tensor) -> torch.Tensor:
        return group_normalise(values, norm, statistics_of(norm, values))

    originals = {norm: norm.forward for norm in norms}
    for norm in norms:
        norm.forward = partial(forward, norm)
        norm.shared_statistics = partial(statistics_of, norm)   # the strips' way in (models/strip_decode.py)
    try:
        run(small)
        yield
    finally:
        for norm, original in originals.items():
            norm.forward = original
            del norm.shared_statistics


def run_tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply a convolutional `fn` (input side s -> output side s·scale) to overlapping tiles of at most `tile` per
    side of `x` and blend the outputs with linear ramps across each overlap; only one tile's activations live at a
    time."""
    height, width = x.shape[-2:]
    ramp = round(overlap * scale)
    out = weight = None
    for top, span_y in _tile_spans(height, tile, overlap):
        for left, span_x in _tile_spans(width, tile, overlap):
            piece = fn(x[..., top:top + span_y, left:left + span_x]).float()
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], round(height * scale), round(width * scale))
                weight = piece.new_zeros(round(height * scale), round(width * scale))
            rows, cols = piece.shape[-2:]
            y, x0 = round(top * scale), round(left * scale)
            mask = (_ramp(rows, ramp, y > 0, y + rows < out.shape[-2])[:, None]
                    * _ramp(cols, ramp, x0 > 0, x0 + cols < out.shape[-1])[None, :]).to(piece.device)
            out[..., y:y + rows, x0:x0 + cols] += piece * mask
            weight[y:y + rows, x0:x0 + cols] += mask
    return out / weight


def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of the fewest tiles of at most `tile` that cover `size` with at least `overlap` between
    neighbours, all the same length and evenly spaced (no sliver tile re-running a mostly covered strip)."""
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (count - 1) * overlap) / count)
    return [(round(i * (size - length) / (count - 1)), length) for i in range(count)]


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """Weights along one tile side: linear in over `ramp` samples on a side shared with a neighbour, else 1."""
    weights = torch.ones(length)
    steps = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
    if rise and ramp:
        weights[:ramp] = steps
    if fall and ramp:
        weights[-ramp:] = torch.minimum(weights[-ramp:], steps.flip(0))
    return weights
