"""External VAE files: read, check the family, swap in without reloading the checkpoint; NaN-safe decode."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL

from sdstudio.errors import ModelFileError
from sdstudio.files.keymaps import vae_to_diffusers
from sdstudio.files.readers import read_state_dict, read_tensor_infos
from sdstudio.models.build import build_vae
from sdstudio.models.checkpoint import LoadedCheckpoint

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


def load_vae_module(path: str | Path, family: str, dtype: torch.dtype) -> AutoencoderKL:
    """Build an AutoencoderKL from a standalone VAE file after checking it fits `family`."""
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
    return build_vae(vae_weights(path), family, dtype, str(path))


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
    new_vae = load_vae_module(path, model.family, model.dtype)  # raises before anything changes
    model.vae, model.vae_path = new_vae, Path(path)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B,4,h,w) -> images (B,3,8h,8w) in [0,1]. A NaN in half precision retries the decode in fp32 (logged), never returning a black image."""
    images = _decode_once(vae, latents, vae.dtype)
    if torch.isnan(images).any() and vae.dtype != torch.float32:
        log.warning("VAE produced NaN in %s; decoding again in float32", vae.dtype)
        images = _decode_once(vae, latents, torch.float32)
    if torch.isnan(images).any():
        raise ModelFileError("<vae>", "VAE decode produced NaN even in float32; the VAE or latents are broken")
    return ((images.float() + 1) / 2).clamp(0, 1)


def _decode_once(vae: AutoencoderKL, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    module = vae if vae.dtype == dtype else _upcast_copy(vae, dtype)
    with torch.inference_mode():
        return module.decode(latents.to(dtype) / vae.config.scaling_factor).sample


def _upcast_copy(vae: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    with torch.device("meta"):
        copy = AutoencoderKL(**vae.config)
    copy.load_state_dict({k: v.to(dtype) for k, v in vae.state_dict().items()}, assign=True)
    return copy.eval()


def encode(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None,
           sample: bool = False) -> torch.Tensor:
    """Images (B,3,H,W) in [0,1] -> scaled latents (B,4,H/8,W/8); the posterior mean unless `sample`."""
    with torch.inference_mode():
        posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
    return latents.float() * vae.config.scaling_factor
