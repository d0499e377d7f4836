"""Recognise what a model file is from its key names and tensor shapes (never from its file name).

`detect_checkpoint` returns a typed record for SD1.x / SD2.x / SDXL base / SDXL refiner single-file checkpoints
(incl. inpainting and instruct-pix2pix); `classify_file` tells checkpoints, VAEs, LoRAs and embeddings apart so a
file dropped in the wrong folder gets a one-line explanation.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from sdstudio.errors import ModelFileError
from sdstudio.files.readers import read_state_dict, read_tensor_infos

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_G = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_G = "conditioner.embedders.0.model."
EMA = "model_ema."

# Sentinel keys (original layout); shapes of these decide the family.
CONV_IN = UNET + "input_blocks.0.0.weight"
LABEL_EMB = UNET + "label_emb.0.0.weight"  # SDXL "vector" conditioning (ADM)
# ComfyUI's SD2 v-prediction test: population std of this bias is > 0.09 in v-models, small in eps-models.
SD2_V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_PROBE_STD = 0.09

LORA_MARKERS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".hada_w1_a", ".lokr_w1", "lora_A.", "lora_B.",
                ".oft_blocks", "lora_magnitude_vector")
EMBEDDING_KEYS = ("string_to_param", "emb_params", "clip_l", "clip_g")


class _HasShape(Protocol):
    shape: Any
    dtype: Any


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: family, prediction type and what it contains."""

    family: str                 # "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    variant: str                # "base" | "inpaint" | "instruct-pix2pix"
    prediction: str             # "eps" | "v"
    in_channels: int            # UNet input channels: 4, 9 (inpaint) or 8 (instruct-pix2pix)
    dtypes: dict[str, str]      # component ("unet", "vae", "text") -> dtype name of most of its weights
    has_ema: bool
    has_vae: bool
    text_encoders: tuple[str, ...]  # e.g. ("clip_l",), ("open_clip_h",), ("clip_l", "open_clip_g")
    parameter_count: int        # all tensors except EMA copies
    context_dim: int            # cross-attention width the UNet expects
    prediction_source: str = "default"  # how prediction was decided: "default" | "marker" | "metadata" | "weights" | "yaml"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """Short human label, e.g. 'SD2 v inpaint'."""
        names = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
        parts = [names[self.family]]
        if self.prediction == "v":
            parts.append("v")
        if self.variant != "base":
            parts.append(self.variant)
        return " ".join(parts)


def classify_file(tensors: Mapping[str, _HasShape]) -> str:
    """'checkpoint' | 'vae' | 'lora' | 'embedding' | 'unknown' from key names alone."""
    keys = list(tensors)
    if any(k.startswith(UNET) for k in keys):
        return "checkpoint"
    if any(marker in k for k in keys for marker in LORA_MARKERS):
        return "lora"
    if any(k in EMBEDDING_KEYS or k.startswith("string_to_param") for k in keys):
        return "embedding"
    if _vae_prefix(keys) is not None:
        return "vae"
    if len(keys) == 1 and next(iter(tensors.values())).shape and len(next(iter(tensors.values())).shape) <= 2:
        return "embedding"  # diffusers learned_embeds: {"<token>": [dim] or [n, dim]}
    return "unknown"


def _vae_prefix(keys: list[str]) -> str | None:
    for prefix in ("", VAE, "vae."):
        if prefix + "encoder.conv_in.weight" in keys and prefix + "decoder.conv_out.weight" in keys:
            return prefix
    return None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _main_dtype(tensors: Mapping[str, _HasShape], prefixes: tuple[str, ...]) -> str | None:
    counts: Counter[str] = Counter()
    for k, t in tensors.items():
        if k.startswith(prefixes) and not k.endswith("position_ids"):
            counts[_dtype_name(t.dtype)] += 1
    return counts.most_common(1)[0][0] if counts else None


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def detect_checkpoint(
    path: str | Path,
    tensors: Mapping[str, _HasShape],
    metadata: Mapping[str, str] | None = None,
    read_tensor: Callable[[str], Any] | None = None,
    prediction_override: str | None = None,
) -> CheckpointInfo:
    """Detect an SD checkpoint's family and contents from keys/shapes; `read_tensor` reads one small tensor by key
    (used for SD2's v-prediction test). Raises ModelFileError naming what was recognised when it is not a checkpoint."""
    metadata = metadata or {}
    kind = classify_file(tensors)
    if kind != "checkpoint":
        raise ModelFileError(path, _wrong_folder_message(kind, tensors))
    if CONV_IN not in tensors:
        raise ModelFileError(path, f"has UNet keys but no '{CONV_IN}'; recognised: {_recognised(tensors)}")
    in_channels = int(tensors[CONV_IN].shape[1])
    keys = tensors.keys()

    if SDXL_OPEN_CLIP_G + "ln_final.weight" in keys:
        family, encoders = "sdxl", ("clip_l", "open_clip_g")
    elif REFINER_OPEN_CLIP_G + "ln_final.weight" in keys:
        family, encoders = "sdxl-refiner", ("open_clip_g",)
    elif SD2_OPEN_CLIP + "ln_final.weight" in keys or SD2_OPEN_CLIP + "token_embedding.weight" in keys:
        family, encoders = "sd2", ("open_clip_h",)
    elif any(k.startswith(SD1_CLIP) for k in keys):
        family, encoders = "sd1", ("clip_l",)
    else:
        family, encoders = _family_from_unet(tensors), ()

    context_dim = _context_dim(tensors)
    if not context_dim:
        raise ModelFileError(path, f"UNet has no cross-attention weights (attn2.to_k); recognised: {_recognised(tensors)}")
    if family in ("sd1", "sd2") and LABEL_EMB in keys:
        raise ModelFileError(path, f"UNet has '{LABEL_EMB}' (unCLIP-style vector conditioning), which sdstudio "
                                   f"does not support; recognised: {_recognised(tensors)}")
    variant = {4: "base", 9: "inpaint", 8: "instruct-pix2pix"}.get(in_channels)
    if variant is None:
        raise ModelFileError(path, f"UNet has {in_channels} input channels ({CONV_IN}); supported: 4 (normal), "
                                   f"9 (inpainting), 8 (instruct-pix2pix); recognised: {_recognised(tensors)}")
    prediction, source = _prediction(family, variant, tensors, metadata, read_tensor, prediction_override)

    ema_count = sum(1 for k in keys if k.startswith(EMA) and k not in (EMA + "decay", EMA + "num_updates"))
    return CheckpointInfo(
        family=family,
        variant=variant,
        prediction=prediction,
        in_channels=in_channels,
        dtypes={name: dt for name, dt in (
            ("unet", _main_dtype(tensors, (UNET,))),
            ("vae", _main_dtype(tensors, (VAE,))),
            ("text", _main_dtype(tensors, ("cond_stage_model.", "conditioner."))),
        ) if dt},
        has_ema=ema_count > 0,
        has_vae=any(k.startswith(VAE + "decoder.") for k in keys),
        text_encoders=encoders if any(k.startswith(("cond_stage_model.", "conditioner.")) for k in keys) else (),
        parameter_count=sum(_numel(t.shape) for k, t in tensors.items()
                            if not k.startswith(EMA) and k.startswith((UNET, VAE, "cond_stage_model.", "conditioner."))),
        context_dim=context_dim,
        prediction_source=source,
    )


def _family_from_unet(tensors: Mapping[str, _HasShape]) -> str:
    """Family of a UNet-only file (no text encoder keys): SDXL base has 3 levels and label_emb, the refiner 4 with
    label_emb; SD2 uses linear proj_in, SD1 1×1 convs."""
    if LABEL_EMB in tensors:
        levels = 1 + sum(1 for k in tensors if k.startswith(UNET + "input_blocks.") and k.endswith(".0.op.weight"))
        return "sdxl" if levels == 3 else "sdxl-refiner"
    proj_in = [t for k, t in tensors.items() if k.startswith(UNET) and k.endswith("proj_in.weight")]
    return "sd2" if proj_in and len(proj_in[0].shape) == 2 else "sd1"


def _context_dim(tensors: Mapping[str, _HasShape]) -> int:
    """Cross-attention width (0 when the UNet has no attn2 weights)."""
    return next((int(t.shape[1]) for k, t in tensors.items()
                 if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), 0)


def _prediction(family, variant, tensors, metadata, read_tensor, override) -> tuple[str, str]:
    if override in ("eps", "v"):
        return override, "yaml"
    if "v_pred" in tensors:
        return "v", "marker"
    declared = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        return "v", "metadata"
    if declared in ("epsilon", "eps"):
        return "eps", "metadata"
    if family == "sd2" and variant == "base" and read_tensor is not None and SD2_V_PROBE in tensors:
        bias = read_tensor(SD2_V_PROBE).float()
        return ("v" if float(bias.std(unbiased=False)) > SD2_V_PROBE_STD else "eps"), "weights"
    return "eps", "default"


def _recognised(tensors: Mapping[str, _HasShape]) -> str:
    prefixes = Counter(k.split(".")[0] for k in tensors)
    top = ", ".join(f"{p}.* ({n} keys)" for p, n in prefixes.most_common(6))
    return top or "no tensors"


def _wrong_folder_message(kind: str, tensors: Mapping[str, _HasShape]) -> str:
    if kind == "lora":
        return "this looks like a LoRA, not a checkpoint: move it to models/Lora"
    if kind == "vae":
        return "this looks like a standalone VAE, not a checkpoint: move it to models/VAE"
    if kind == "embedding":
        return "this looks like a textual-inversion embedding, not a checkpoint: move it to models/embeddings"
    return f"not a Stable Diffusion checkpoint (no '{UNET}*' UNet keys); recognised: {_recognised(tensors)}"


def yaml_prediction(path: str | Path) -> str | None:
    """A1111: a `<name>.yaml` beside the checkpoint wins; `parameterization: "v"` in it means v-prediction."""
    config = Path(path).with_suffix(".yaml")
    if not config.is_file():
        return None
    match = re.search(r"^\s*parameterization:\s*['\"]?(\w+)", config.read_text(errors="replace"), re.MULTILINE)
    return "v" if match and match.group(1) == "v" else "eps"


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Detect a checkpoint file without loading its weights (header / lazy mmap only)."""
    infos, metadata = read_tensor_infos(path)
    return detect_checkpoint(path, infos, metadata, read_tensor=lambda key: read_state_dict(path)[key],
                             prediction_override=yaml_prediction(path))
