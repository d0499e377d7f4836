"""Load a single-file checkpoint into torch modules: read safely, detect, map keys, build, pick EMA/VAE."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdstudio.errors import ModelFileError, SDStudioError
from sdstudio.files.detect import CheckpointInfo, detect_checkpoint, yaml_prediction
from sdstudio.files.keymaps import KeyMapError, split_checkpoint, swap_in_ema, text_encoder_keys_as_ours
from sdstudio.files.readers import read_state_dict
from sdstudio.models.build import build_text_encoder, build_unet, build_vae, gpu_unet_layout, weights_dtype
from sdstudio.models.converted import ConvertedWeights, worth_storing
from sdstudio.models.int8 import calibration_name
from sdstudio.models.memory import keep_freed_memory
from sdstudio.models.tuning import native_bf16

log = logging.getLogger(__name__)

TEXT_KIND_OF_PREFIX = {
    "cond_stage_model.transformer.": "clip_l",
    "cond_stage_model.model.": "open_clip_h",
    "conditioner.embedders.0.transformer.": "clip_l",
    "conditioner.embedders.1.model.": "open_clip_g",
    "conditioner.embedders.0.model.": "open_clip_g",
}
FAST_PATHS = ("auto", "float", "int8")   # the --precision names of the device's fast path (the rest name a dtype)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def fast_cpu_dtype() -> torch.dtype:
    """bf16 where the CPU has native bf16 math (AMX or AVX512-BF16), else fp32 (the fast paths' dtype on a CPU)."""
    return torch.bfloat16 if native_bf16() else torch.float32


def resolve_precision(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """torch dtype for a `--precision` name; the fast paths (`auto`, `float`, `int8`) compute in fp16 on
    a CUDA GPU (as A1111 runs) and in fast_cpu_dtype on the CPU; `int8` is for the CPU only. `precision_options`
    gives all of a name's load options."""
    on_gpu = torch.device(device).type == "cuda"
    if name == "int8" and on_gpu:
        raise SDStudioError("--precision int8 is for the CPU; on a GPU use auto, fp16 or bf16")
    if name in DTYPES:
        return DTYPES[name]
    return torch.float16 if on_gpu else fast_cpu_dtype()


def precision_options(name: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """load_checkpoint's arguments for a `--precision` name on `device`: `dtype` (resolve_precision), `int8_linears`
    (`auto` and `int8` on the CPU: the UNet's int8 products, where this machine measures them faster than the float
    ones — models/int8.py — on the CPU's fast float path) and `fast_fp32` (the fast paths where the CPU has no native
    bf16 math: fp32 with the near-exact fast kernels; `fp32` stays the exact reference). `float` is `auto` without
    the int8 products."""
    dtype, on_cpu = resolve_precision(name, device), torch.device(device).type == "cpu"
    return {"dtype": dtype, "int8_linears": on_cpu and name in ("auto", "int8"),
            "fast_fp32": on_cpu and name in FAST_PATHS and dtype == torch.float32}


@dataclass
class TextEncoder:
    """One text encoder of a checkpoint and what it is ("clip_l", "open_clip_h", "open_clip_g")."""

    kind: str
    model: torch.nn.Module


@dataclass
class LoadedCheckpoint:
    """A checkpoint as torch modules, ready for the pipeline."""

    path: Path
    info: CheckpointInfo
    unet: UNet2DConditionModel
    vae: AutoencoderKL                  # the VAE in use (the checkpoint's own or an external one)
    text_encoders: list[TextEncoder]
    alphas_cumprod: torch.Tensor | None  # from the file when present (custom schedules), else None
    dtype: torch.dtype
    own_vae: AutoencoderKL | None = None  # the checkpoint's baked-in VAE (kept to switch back to "None")
    vae_path: Path | None = None          # external VAE file in use, None = the checkpoint's own
    load_seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)
    patcher: Any = None                   # the one WeightPatcher of this model's weights (models/patcher.py)
    fast_fp32: bool = False               # an fp32 model with the fast kernels (`--precision auto`, no bf16 CPU)

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def device(self) -> torch.device:
        """Where the networks run (models/device.py)."""
        return self.unet.device


def load_checkpoint(path: str | Path, vae: str | Path | None = None, use_ema: bool = False,
                    dtype: torch.dtype | str = torch.float32,
                    converted: ConvertedWeights | None = None, device: torch.device | str = "cpu",
                    int8_linears: bool = False, fast_fp32: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint file (.safetensors/.ckpt) as modules on `device`; `vae` = a standalone VAE file to use
    instead of the baked-in one; `use_ema` selects the EMA UNet weights when the file has them (A1111 uses the main
    ones); `converted` = the on-disk cache of converted weights (and int8's calibration) to read from and fill
    (models/converted.py); `int8_linears` = a CPU fast path UNet's transformer linears run in int8 (`--precision
    auto`, models/int8.py); `fast_fp32` = an fp32 CPU model runs the near-exact fast kernels (models/build.py;
    `precision_options`)."""
    from sdstudio.models.vae import load_vae_module  # vae.py imports this module's types

    keep_freed_memory()
    start = time.perf_counter()
    path = Path(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    sd = read_state_dict(path)
    info = detect_checkpoint(path, sd, read_tensor=sd.__getitem__, prediction_override=yaml_prediction(path))
    if use_ema and not info.has_ema:
        raise ModelFileError(path, "use_ema was requested but the file has no EMA weights (model_ema.*)")
    try:
        parts = split_checkpoint(swap_in_ema(sd) if use_ema else sd)
    except KeyMapError as exc:
        raise ModelFileError(path, str(exc)) from exc
    where = str(path)
    if not parts.text_encoders:
        raise ModelFileError(path, "has no text encoder weights (cond_stage_model.* / conditioner.*); "
                                   "UNet-only files are not supported")
    file_weights = {"unet": parts.unet, **({"vae": parts.vae} if parts.vae else {}),
                    **{f"text{i}": p.weights for i, p in enumerate(parts.text_encoders)}}
    stored = converted.read(path, dtype, use_ema, fast_fp32) if converted else None
    weights = stored if stored is not None and stored.keys() == file_weights.keys() else file_weights
    encoders = [TextEncoder(TEXT_KIND_OF_PREFIX[p.prefix], build_text_encoder(
                    weights[f"text{i}"], TEXT_KIND_OF_PREFIX[p.prefix], dtype, f"{where} ({p.prefix})", fast_fp32))
                for i, p in enumerate(parts.text_encoders)]
    pooled_dim = getattr(encoders[-1].model.config, "projection_dim", None)

    def keep_calibration(maxima: dict[str, torch.Tensor]) -> None:   # int8's, measured before the first use
        if converted and maxima:
            converted.write_measured(calibration_name(), path, dtype, use_ema, fast_fp32, maxima)

    kept_calibration = (converted.read_measured(calibration_name(), path, dtype, use_ema, fast_fp32)
                        if converted and int8_linears else None)
    unet = build_unet(weights["unet"], info.family, pooled_dim, dtype, f"{where} (UNet)", device, int8_linears,
                      fast_fp32, kept_calibration, keep_calibration)
    own_vae = (build_vae(weights["vae"], info.family, dtype, f"{where} (VAE)", device, fast_fp32)
               if "vae" in weights else None)
    if converted and weights is file_weights and worth_storing(weights_dtype(parts.unet), dtype, device, fast_fp32):
        converted.write(path, dtype, use_ema, fast_fp32, {"unet": unet.state_dict()}
                        | ({"vae": own_vae.state_dict()} if own_vae else {})
                        | {f"text{i}": text_encoder_keys_as_ours(e.model.state_dict()) for i, e in enumerate(encoders)})
    for module in [unet, own_vae] + [e.model for e in encoders]:
        if module is not None:
            module.to(device)   # no-op on the CPU; the converted-weights writer keeps its CPU tensors
    if torch.device(device).type == "cuda" and dtype != torch.float32:
        unet.to(memory_format=gpu_unet_layout(info.family))   # relaid on the GPU, after the move
    alphas = parts.extras.get("alphas_cumprod")
    loaded = LoadedCheckpoint(path=path, info=info, unet=unet, vae=own_vae, text_encoders=encoders,
                              alphas_cumprod=alphas.float() if alphas is not None else None, dtype=dtype,
                              own_vae=own_vae, fast_fp32=fast_fp32)
    if vae is not None:
        loaded.vae = load_vae_module(vae, info.family, dtype, device, fast_fp32)
        loaded.vae_path = Path(vae)
    elif own_vae is None:
        raise ModelFileError(path, "has no VAE weights (first_stage_model.*); choose an external VAE")
    loaded.load_seconds = time.perf_counter() - start
    log.info("loaded %s (%s) in %.2f s", path.name, info.label, loaded.load_seconds)
    return loaded
