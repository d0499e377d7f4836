"""Random-weight model files in the exact real on-disk layouts (tiny for tests, full-size for benchmarks).

A file is made by creating the diffusers / transformers modules of a family on the meta device (no memory, no
init cost), filling every tensor from one seeded generator (fan-in scaled, so the real zero-initialised output
layers are random too and images are not flat), converting to the original single-file layout with our key maps
and adding what real files carry: EMA copies, DDPM schedule buffers, `position_ids`, `logit_scale`, a Lightning
`state_dict` wrapper for `.ckpt`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.files.detect import SD2_V_PROBE
from sdstudio.files.keymaps import (CheckpointParts, TextEncoderPart, ema_key, join_checkpoint, vae_to_original)
from sdstudio.files.writers import save_safetensors, save_torch

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sd1-inpaint", "sd2-inpaint", "sd1-ip2p")
SIZES = ("tiny", "full")
VARIANTS = ("full", "pruned", "emaonly", "fp16")
FORMATS = ("safetensors", "ckpt")

# Standard SD DDPM schedule ("scaled linear" betas) that real SD1/SD2 files store as buffers.
TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
SD2_V_PROBE_STD = 0.3  # real SD2 768-v files: this bias has std well above ComfyUI's 0.09 threshold


@dataclass(frozen=True)
class TextSize:
    width: int
    layers: int
    projection: int | None = None  # OpenCLIP text_projection width


@dataclass(frozen=True)
class FamilySize:
    unet_channels: tuple[int, ...]
    attention: tuple[bool, ...]      # which UNet levels have cross-attention
    depth: tuple[int, ...]           # transformer blocks per level
    heads: tuple[int, ...] | int     # diffusers attention_head_dim (SD1: head count; SD2/SDXL: per-level heads)
    linear_proj: bool
    text: tuple[tuple[str, TextSize], ...]   # (kind, size) in file order
    vae_channels: tuple[int, ...]
    time_embed_dim: int = 0          # SDXL add-time embedding width
    time_ids: int = 0                # 6 for SDXL base, 5 for the refiner
    upcast: bool = False


_SD_LEVELS = (True, True, True, False)
SPECS: dict[tuple[str, str], FamilySize] = {
    ("sd1", "full"): FamilySize((320, 640, 1280, 1280), _SD_LEVELS, (1,) * 4, 8, False,
                                (("clip_l", TextSize(768, 12)),), (128, 256, 512, 512)),
    ("sd1", "tiny"): FamilySize((32, 64, 64, 64), _SD_LEVELS, (1,) * 4, 8, False,
                                (("clip_l", TextSize(64, 3)),), (32, 32, 64, 64)),
    ("sd2", "full"): FamilySize((320, 640, 1280, 1280), _SD_LEVELS, (1,) * 4, (5, 10, 20, 20), True,
                                (("open_clip_h", TextSize(1024, 24, 1024)),), (128, 256, 512, 512), upcast=True),
    ("sd2", "tiny"): FamilySize((64, 64, 128, 128), _SD_LEVELS, (1,) * 4, (1, 1, 2, 2), True,
                                (("open_clip_h", TextSize(64, 3, 64)),), (32, 32, 64, 64), upcast=True),
    ("sdxl", "full"): FamilySize((320, 640, 1280), (False, True, True), (1, 2, 10), (5, 10, 20), True,
                                 (("clip_l", TextSize(768, 12)), ("open_clip_g", TextSize(1280, 32, 1280))),
                                 (128, 256, 512, 512), time_embed_dim=256, time_ids=6),
    ("sdxl", "tiny"): FamilySize((64, 128, 128), (False, True, True), (1, 1, 2), (1, 2, 2), True,
                                 (("clip_l", TextSize(64, 3)), ("open_clip_g", TextSize(64, 3, 64))),
                                 (32, 32, 64, 64), time_embed_dim=8, time_ids=6),
    ("sdxl-refiner", "full"): FamilySize((384, 768, 1536, 1536), (False, True, True, False), (4,) * 4,
                                         (6, 12, 24, 24), True, (("open_clip_g", TextSize(1280, 32, 1280)),),
                                         (128, 256, 512, 512), time_embed_dim=256, time_ids=5),
    ("sdxl-refiner", "tiny"): FamilySize((64, 128, 128, 128), (False, True, True, False), (1, 2, 2, 1),
                                         (1, 2, 2, 2), True, (("open_clip_g", TextSize(64, 3, 64)),),
                                         (32, 32, 64, 64), time_embed_dim=8, time_ids=5),
}
TEXT_PREFIXES = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    "sdxl-refiner": ("conditioner.embedders.0.model.",),
}
VOCAB, POSITIONS = 49408, 77  # the real CLIP BPE vocabulary and context length, at every size
# outlier channels (`make_checkpoint`): which layers read each transformer norm's output, how many channels, how wide
NORM_READERS = {"norm": ("proj_in",), "norm1": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "norm2": ("attn2.to_q",),
                "norm3": ("ff.net.0.proj",)}
OUTLIER_CHANNELS, OUTLIER_FACTOR = 4, 32.0   # a power of two: float arithmetic gives bit for bit the same results


def _base_family(family: str) -> tuple[str, int, str]:
    """('sd2', in_channels, prediction) for a synth family name like 'sd2-inpaint'."""
    base, _, flavour = family.partition("-")
    if family == "sdxl-refiner":
        return "sdxl-refiner", 4, "eps"
    return base, {"inpaint": 9, "ip2p": 8}.get(flavour, 4), ("v" if flavour == "v" else "eps")


def _unet_module(spec: FamilySize, in_channels: int, context: int, pooled: int) -> UNet2DConditionModel:
    config = dict(
        in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=spec.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention)),
        transformer_layers_per_block=spec.depth, cross_attention_dim=context, attention_head_dim=spec.heads,
        use_linear_projection=spec.linear_proj, upcast_attention=spec.upcast,
    )
    if spec.time_ids:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=spec.time_embed_dim,
                      projection_class_embeddings_input_dim=pooled + spec.time_ids * spec.time_embed_dim)
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _text_module(kind: str, size: TextSize) -> torch.nn.Module:
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=size.width, intermediate_size=4 * size.width,
                            num_hidden_layers=size.layers, num_attention_heads=size.width // 64,
                            max_position_embeddings=POSITIONS, projection_dim=size.projection or size.width,
                            hidden_act="quick_gelu" if kind == "clip_l" else "gelu")
    with torch.device("meta"):
        return CLIPTextModelWithProjection(config) if size.projection else CLIPTextModel(config)


def _vae_module(channels: tuple[int, ...]) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                             up_block_types=("UpDecoderBlock2D",) * len(channels), layers_per_block=2,
                             latent_channels=4, norm_num_groups=32)


def _random_like(shapes: dict[str, torch.Size], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Fill tensors of these shapes: fan-in scaled weights, near-one norm scales, small biases."""
    out = {}
    for name, shape in shapes.items():
        if len(shape) >= 2 and "embedding" not in name:
            fan_in = math.prod(shape[1:])
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif "embedding" in name:
            out[name] = torch.randn(shape, generator=gen) * 0.02
        elif "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=gen)
    return out


def _with_text_model_level(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our canonical text-encoder names always carry the 'text_model.' level (transformers 5 drops it)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in weights.items()}


def _with_outlier_channels(unet: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The same UNet function with OUTLIER_CHANNELS channels of every transformer norm's output OUTLIER_FACTOR times
    wider (its scale and shift) and the layers reading them taking the factor out of those input columns: the
    activation outlier channels of real trained transformers, which random weights lack (diffusers names)."""
    for name in list(unet):
        found = re.fullmatch(r"(.*\.attentions\.\d+\.(?:transformer_blocks\.\d+\.)?)(norm\d?)\.weight", name)
        if not found or (found[2] == "norm") == ("transformer_blocks" in found[1]):
            continue
        owner, norm = found[1], found[2]
        channels = torch.randperm(unet[name].shape[0], generator=gen)[:OUTLIER_CHANNELS]
        for part in ("weight", "bias"):
            unet[f"{owner}{norm}.{part}"][channels] *= OUTLIER_FACTOR
        for reader in NORM_READERS[norm]:
            weight = unet[f"{owner}{reader}.weight"]
            weight.view(weight.shape[0], -1)[:, channels] /= OUTLIER_FACTOR
    return unet


def ddpm_buffers() -> dict[str, torch.Tensor]:
    """The schedule buffers real SD1/SD2 checkpoints carry (float32, 1000 steps)."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(), "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {k: v.float() for k, v in buffers.items()}


def make_vae_weights(size: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """VAE weights in the original layout (no prefix), as standalone VAE files store them."""
    gen = torch.Generator().manual_seed(seed)
    channels = SPECS[("sd1", size)].vae_channels
    shapes = {k: v.shape for k, v in _vae_module(channels).state_dict().items()}
    return vae_to_original(_random_like(shapes, gen))


def make_checkpoint(family: str = "sd1", size: str = "tiny", variant: str = "pruned", seed: int = 0,
                    outlier_channels: bool = False) -> dict[str, torch.Tensor]:
    """A random-weight state dict in the original single-file layout of `family` (see FAMILIES); with
    `outlier_channels` its UNet computes the same function through activations with outlier channels
    (`_with_outlier_channels`: the same weights otherwise)."""
    if family not in FAMILIES or size not in SIZES or variant not in VARIANTS:
        raise ValueError(f"family must be one of {FAMILIES}, size {SIZES}, variant {VARIANTS}")
    base, in_channels, prediction = _base_family(family)
    spec = SPECS[(base, size)]
    gen = torch.Generator().manual_seed(seed)

    encoders = []
    for (kind, text_size), prefix in zip(spec.text, TEXT_PREFIXES[base]):
        module = _text_module(kind, text_size)
        weights = _with_text_model_level(_random_like({k: v.shape for k, v in module.state_dict().items()}, gen))
        if kind == "clip_l":
            weights["text_model.embeddings.position_ids"] = torch.arange(POSITIONS).unsqueeze(0)
        encoders.append(TextEncoderPart(prefix=prefix, kind="clip" if kind == "clip_l" else "open_clip",
                                        weights=weights))
    context = sum(size.width for _, size in spec.text) if base == "sdxl" else spec.text[-1][1].width
    pooled = spec.text[-1][1].projection or 0
    unet_module = _unet_module(spec, in_channels, context, pooled)
    unet = _random_like({k: v.shape for k, v in unet_module.state_dict().items()}, gen)
    if outlier_channels:
        _with_outlier_channels(unet, torch.Generator().manual_seed(seed + 1))
    vae = _random_like({k: v.shape for k, v in _vae_module(spec.vae_channels).state_dict().items()}, gen)

    extras: dict[str, torch.Tensor] = {}
    if base in ("sd1", "sd2"):
        extras.update(ddpm_buffers())
    for part in encoders:
        if part.kind == "open_clip":
            extras[part.prefix + "logit_scale"] = torch.tensor(math.log(100.0))
    sd = join_checkpoint(CheckpointParts(unet=unet, vae=vae, text_encoders=encoders, extras=extras))
    if base == "sd2" and prediction == "v":
        probe = sd[SD2_V_PROBE]
        sd[SD2_V_PROBE] = torch.randn(probe.shape, generator=gen) * SD2_V_PROBE_STD
    elif base == "sd2":
        sd[SD2_V_PROBE] = torch.randn(sd[SD2_V_PROBE].shape, generator=gen) * 0.02

    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    if variant in ("full", "emaonly"):
        ema = {k: sd[k] + 0.01 * torch.randn(sd[k].shape, generator=gen) for k in unet_keys}
        if variant == "emaonly":
            sd.update(ema)
        else:
            sd.update({ema_key(k): v for k, v in ema.items()})
            sd["model_ema.decay"] = torch.tensor(0.9999)
            sd["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    if variant == "fp16":
        sd = {k: (v.half() if v.dtype == torch.float32 else v) for k, v in sd.items()}
    return {k: v.contiguous() for k, v in sd.items()}


def write_checkpoint(path: str | Path, family: str = "sd1", size: str = "tiny", variant: str = "pruned",
                     fmt: str | None = None, seed: int = 0, outlier_channels: bool = False) -> Path:
    """Write a synthetic checkpoint; format from `fmt` or the file extension (.safetensors / .ckpt)."""
    path = Path(path)
    fmt = fmt or ("ckpt" if path.suffix in (".ckpt", ".pt", ".pth") else "safetensors")
    sd = make_checkpoint(family, size, variant, seed, outlier_channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_safetensors(sd, path)
    else:
        save_torch(sd, path)
    return path


def write_vae(path: str | Path, size: str = "tiny", seed: int = 1, fmt: str | None = None,
              metadata: dict[str, str] | None = None) -> Path:
    """Write a standalone VAE file: safetensors without prefix, or a Lightning .pt/.ckpt with loss.* and EMA scalars."""
    path = Path(path)
    fmt = fmt or ("ckpt" if path.suffix in (".ckpt", ".pt", ".pth") else "safetensors")
    weights = make_vae_weights(size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_safetensors(weights, path, metadata=metadata)
    else:
        weights.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4),
                        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0)})
        save_torch(weights, path)
    return path
