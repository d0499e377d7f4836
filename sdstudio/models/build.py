"""Build diffusers / transformers modules from weights in our (diffusers) names.

Family conventions (head counts, activations, latent scale) ship in `configs/families.json`; every size that varies
(channels, depth, context width, vocabulary, layers) is read from tensor shapes, so tiny test files and real files
take exactly the same path. Modules are created on the meta device and the weights are assigned, not copied.
"""
from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.errors import ModelFileError
from sdstudio.files.keymaps import fit_text_encoder_keys
from sdstudio.files.readers import is_file_mapped
from sdstudio.models.attention import use_fast_cpu_attention
from sdstudio.models.conversion import converted_weights
from sdstudio.models.fused import use_fused_layers
from sdstudio.models.half_weights import half_kept_names, use_widening_linears
from sdstudio.models.int8 import (calibrate_int8_before_first_use, int8_available, int8_weight_names,
                                  restore_int8_calibration, use_int8_linears)
from sdstudio.models.int8_winograd import int8_convolution_weight_names, use_int8_convolutions
from sdstudio.models.native import release_kernel_buffers
from sdstudio.models.winograd import use_winograd_convolutions
from sdstudio.models.tuning import native_bf16

CONFIG_FILE = Path(__file__).parent / "configs" / "families.json"
GROUP_NORM_GROUPS = 32  # every SD UNet/VAE uses GroupNorm(32)


@cache
def family_config(family: str) -> dict[str, Any]:
    """The shipped conventions of one family ("sd1", "sd2", "sdxl", "sdxl-refiner")."""
    return json.loads(CONFIG_FILE.read_text())["families"][family]


@cache
def text_encoder_config(kind: str) -> dict[str, Any]:
    """The shipped conventions of one text encoder kind ("clip_l", "open_clip_h", "open_clip_g")."""
    return json.loads(CONFIG_FILE.read_text())["text_encoders"][kind]


def _count(weights: Mapping[str, Any], pattern: str) -> int:
    """Number of distinct integers matched by the single group of `pattern` over the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in weights if (m := regex.match(k))})


def _shape(weights: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    if key not in weights:
        raise ModelFileError(where, f"missing weight '{key}'")
    return tuple(weights[key].shape)


def unet_config(weights: Mapping[str, Any], family: str, pooled_dim: int | None = None,
                where: str = "<unet>") -> dict[str, Any]:
    """diffusers UNet2DConditionModel config from diffusers-named weights (sizes from shapes)."""
    conventions = family_config(family)["unet"]
    levels = _count(weights, r"down_blocks\.(\d+)\.")
    layers_per_block = _count(weights, r"down_blocks\.0\.resnets\.(\d+)\.")
    channels = [_shape(weights, f"down_blocks.{i}.resnets.0.conv2.weight", where)[0] for i in range(levels)]
    has_attention = [f"down_blocks.{i}.attentions.0.proj_in.weight" in weights for i in range(levels)]
    depth = [max(_count(weights, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\."), 1)
             for i in range(levels)]
    cross_attention_dim = next(int(w.shape[1]) for k, w in weights.items() if k.endswith("attn2.to_k.weight"))
    if conventions["head_rule"] == "fixed_heads":
        heads: int | list[int] = conventions["heads"]
    else:
        heads = [c // conventions["head_width"] for c in channels]
    linear_proj = any(len(w.shape) == 2 for k, w in weights.items() if k.endswith("proj_in.weight"))
    config: dict[str, Any] = dict(
        sample_size=conventions["sample_size"],
        in_channels=_shape(weights, "conv_in.weight", where)[1],
        out_channels=_shape(weights, "conv_out.weight", where)[0],
        layers_per_block=layers_per_block,
        block_out_channels=tuple(channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=tuple(depth),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        use_linear_projection=linear_proj,
        upcast_attention=conventions["upcast_attention"],
        norm_num_groups=GROUP_NORM_GROUPS,
    )
    if "add_embedding.linear_1.weight" in weights:
        adm_in = _shape(weights, "add_embedding.linear_1.weight", where)[1]
        if pooled_dim is None:
            raise ModelFileError(where, "SDXL UNet needs the pooled text width to size its time embedding")
        time_ids = conventions["addition_time_ids"]
        config.update(addition_embed_type=conventions["addition_embed_type"],
                      addition_time_embed_dim=(adm_in - pooled_dim) // time_ids,
                      projection_class_embeddings_input_dim=adm_in)
    return config


def vae_config(weights: Mapping[str, Any], family: str, where: str = "<vae>") -> dict[str, Any]:
    """diffusers AutoencoderKL config from diffusers-named weights."""
    conventions = family_config(family)["vae"]
    levels = _count(weights, r"encoder\.down_blocks\.(\d+)\.")
    return dict(
        in_channels=_shape(weights, "encoder.conv_in.weight", where)[1],
        out_channels=_shape(weights, "decoder.conv_out.weight", where)[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(_shape(weights, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", where)[0]
                                 for i in range(levels)),
        layers_per_block=_count(weights, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        latent_channels=_shape(weights, "post_quant_conv.weight", where)[0],
        norm_num_groups=GROUP_NORM_GROUPS,
        sample_size=conventions["sample_size"],
        scaling_factor=conventions["scaling_factor"],
        force_upcast=conventions.get("force_upcast", False),
    )


def text_config(weights: Mapping[str, Any], kind: str, where: str = "<text encoder>") -> CLIPTextConfig:
    """transformers CLIPTextConfig for our-named text-encoder weights ("text_model.…")."""
    conventions = text_encoder_config(kind)
    vocab, width = _shape(weights, "text_model.embeddings.token_embedding.weight", where)
    extra = {}
    if "text_projection.weight" in weights:
        extra["projection_dim"] = _shape(weights, "text_projection.weight", where)[0]
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_shape(weights, "text_model.encoder.layers.0.mlp.fc1.weight", where)[0],
        num_hidden_layers=_count(weights, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=width // conventions["head_width"],
        max_position_embeddings=_shape(weights, "text_model.embeddings.position_embedding.weight", where)[0],
        hidden_act=conventions["hidden_act"],
        layer_norm_eps=conventions["layer_norm_eps"],
        bos_token_id=conventions["bos_token_id"],
        eos_token_id=conventions["eos_token_id"],
        pad_token_id=conventions["pad_token_id"],
        **extra,
    )


def assign_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                   where: str, convolutional: bool = False, fast_fp32: bool = False,
                   keep_mapped: Collection[str] = ()) -> torch.nn.Module:
    """Load `weights` into a meta-device `module` by assignment (no copy when dtypes already match). A
    `convolutional` CPU model in half precision, or in fp32 for the `fast_fp32` path, gets its 4-D weights
    channels-last, the layout oneDNN and the Winograd kernels run fastest, in the same copy as the dtype conversion;
    fp32 otherwise keeps the default layout (the exact reference). On the `fast_fp32` path the linear and convolution
    weights of a half-precision file stay in its dtype (models/half_weights.py: widened as each layer runs).
    The weights named in `keep_mapped` stay the file's own tensors, in its dtype, where they are views of a mapped
    file (the int8 path packs its copies from them, then lets their pages go: models/int8.py)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        raise ModelFileError(where, f"{len(missing)} weights missing, e.g. {missing[:3]}")
    for key, target in expected.items():
        if tuple(weights[key].shape) != tuple(target.shape):
            raise ModelFileError(where, f"weight '{key}' has shape {tuple(weights[key].shape)}, "
                                        f"expected {tuple(target.shape)}")
    if unexpected:
        weights = {k: v for k, v in weights.items() if k in expected}
    half = (dtype or weights_dtype(weights)) in (torch.bfloat16, torch.float16)
    kept = {k: v for k, v in weights.items() if k in keep_mapped and is_file_mapped(v)}
    half_kept = half_kept_names(module, weights) - kept.keys() if fast_fp32 else set()
    weights = (kept | converted_weights({k: weights[k] for k in half_kept}, None, channels_last=convolutional)
               | converted_weights({k: v for k, v in weights.items() if k not in kept and k not in half_kept}, dtype,
                                   channels_last=convolutional and (half or fast_fp32)))
    module.load_state_dict(weights, strict=True, assign=True)
    _materialise_meta_buffers(module)
    return module.eval().requires_grad_(False)


def weights_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype of the first floating-point weight (a file's dtype); None when there is none."""
    return next((w.dtype for w in weights.values() if w.is_floating_point()), None)


def _materialise_meta_buffers(module: torch.nn.Module) -> None:
    """Non-persistent buffers stay on the meta device after assign-loading; recreate the ones we know."""
    for name, buffer in list(module.named_buffers()):
        if buffer.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr == "position_ids":
            owner.register_buffer(attr, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
        else:
            raise RuntimeError(f"buffer '{name}' left on the meta device after loading")


def build_unet(weights: Mapping[str, torch.Tensor], family: str, pooled_dim: int | None = None,
               dtype: torch.dtype | None = None, where: str = "<unet>",
               device: torch.device | str = "cpu", int8_linears: bool = False, fast_fp32: bool = False,
               int8_calibration: Mapping[str, torch.Tensor] | None = None,
               on_int8_calibrated: Callable[[dict[str, torch.Tensor]], None] = lambda maxima: None,
               ) -> UNet2DConditionModel:
    """UNet2DConditionModel from diffusers-named weights, built on the CPU to run on `device` (the caller moves it);
    a bf16 UNet for the CPU (the CPU fast path) gets the fast CPU attention (models/attention.py), fused layers
    (models/fused.py) and Winograd convolutions (models/winograd.py); an fp32 one with `fast_fp32` (the fast paths
    where the CPU has no native bf16 math) gets channels-last weights (those of a half-precision file in its
    dtype: models/half_weights.py), the fused layers, the near-exact fp32 Winograd convolutions and the attention
    processor (of which only its CFG saving applies to fp32: a batch of two equal halves attends once). Either fast
    path with `int8_linears` (`--precision auto` on the CPU) gets int8 linears in its transformers (models/int8.py)
    and int8 Winograd 3×3 convolutions (models/int8_winograd.py), whose weights stay the file's (not converted: only
    their packed copies stay in memory), the linears given `int8_calibration` kept from an earlier load of the same
    weights or calibrated by one UNet call before the model's first use, whose maxima go to `on_int8_calibrated`
    (models/int8.py: `calibrate_int8_before_first_use`)."""
    config = unet_config(weights, family, pooled_dim, where)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    on_cpu = _runs_on_cpu(device)
    computes_in = torch.float32 if fast_fp32 else dtype
    packed_int8 = int8_linears and on_cpu and int8_available(computes_in)
    int8_names = int8_weight_names(unet) | int8_convolution_weight_names(unet, computes_in) if packed_int8 else ()
    unet = assign_weights(unet, weights, dtype, where, convolutional=on_cpu, fast_fp32=fast_fp32,
                          keep_mapped=int8_names)
    if on_cpu and _fast_path(unet, fast_fp32):
        use_fast_cpu_attention(unet)
        use_fused_layers(unet)
        use_winograd_convolutions(unet)
        use_widening_linears(unet)
        if int8_linears:
            use_int8_linears(unet)
            use_int8_convolutions(unet, computes_in)
            if not restore_int8_calibration(unet, int8_calibration or {}):
                calibrate_int8_before_first_use(unet, pooled_dim, on_int8_calibrated)
        unet.register_forward_hook(release_kernel_buffers)   # kept through a call, nothing between calls
        unet.fast_cpu_kernels = True
    return unet


def build_vae(weights: Mapping[str, torch.Tensor], family: str, dtype: torch.dtype | None = None,
              where: str = "<vae>", device: torch.device | str = "cpu", fast_fp32: bool = False) -> AutoencoderKL:
    """AutoencoderKL from diffusers-named weights, built on the CPU to run on `device`; a bf16 one for the CPU (the
    CPU fast path) gets the fast CPU attention (models/attention.py: its attention block by blocks of rows) and
    Winograd convolutions (models/winograd.py; vae.decode and vae.encode release their buffers), an fp32 one with
    `fast_fp32` channels-last weights (a half-precision file's in its dtype) and the fp32 Winograd convolutions."""
    return vae_from_config(vae_config(weights, family, where), weights, dtype, where, device, fast_fp32)


def vae_from_config(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                    where: str, device: torch.device | str, fast_fp32: bool = False) -> AutoencoderKL:
    """build_vae's module from its diffusers config (a copy of a loaded VAE in another dtype is built the same way)."""
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    on_cpu = _runs_on_cpu(device)
    vae = assign_weights(vae, weights, dtype, where, convolutional=on_cpu, fast_fp32=fast_fp32)
    if on_cpu and _fast_path(vae, fast_fp32):
        use_fast_cpu_attention(vae)
        use_winograd_convolutions(vae)
        use_widening_linears(vae)
        vae.fast_cpu_kernels = True
    return vae


def _fast_path(model: torch.nn.Module, fast_fp32: bool) -> bool:
    """Whether a CPU model gets a fast path's kernels: bf16 where the CPU has native bf16 math (elsewhere oneDNN has
    no bf16 products to fuse: torch's own layers emulate them), fp32 with `fast_fp32` (the exact reference
    without)."""
    return (model.dtype == torch.bfloat16 and native_bf16()) or (fast_fp32 and model.dtype == torch.float32)


def has_fast_cpu_kernels(model: torch.nn.Module) -> bool:
    """Whether `model` was built with a CPU fast path's kernels (bf16 with native bf16 math, or fast fp32)."""
    return getattr(model, "fast_cpu_kernels", False)


def _runs_on_cpu(device: torch.device | str) -> bool:
    """Whether a module is built for the CPU: only there do its half-precision convolution weights go channels-last
    in the load's copy, and a bf16 model get the CPU kernels. For a GPU the load keeps the file's layout (no copy
    before the move); `gpu_unet_layout` says which the UNet takes there."""
    return torch.device(device).type == "cpu"


def gpu_unet_layout(family: str) -> torch.memory_format:
    """The half-precision UNet's weight layout on a CUDA GPU, as measured (H200, fp16, one CFG call replayed from a
    CUDA graph, bench/gpu_unet.py): channels-last for SD1/SD2 (SD1.5 512²: 10.3 ms vs 12.1 in the file's layout),
    the file's own for SDXL (1024²: 41.9 ms vs 44.0 channels-last)."""
    return torch.contiguous_format if family.startswith("sdxl") else torch.channels_last


def build_text_encoder(weights: Mapping[str, torch.Tensor], kind: str, dtype: torch.dtype | None = None,
                       where: str = "<text encoder>",
                       fast_fp32: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """CLIPTextModel (CLIP-L) or CLIPTextModelWithProjection (OpenCLIP, all layers kept) from our-named weights; with
    `fast_fp32` (an fp32 model on the fast path) a half-precision file's linear weights stay in its dtype, widened
    as each layer runs (models/half_weights.py)."""
    config = text_config(weights, kind, where)
    cls = CLIPTextModelWithProjection if "text_projection.weight" in weights else CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    fitted = fit_text_encoder_keys(weights, model.state_dict().keys())
    model = assign_weights(model, fitted, dtype, where, fast_fp32=fast_fp32)
    if fast_fp32:
        use_widening_linears(model)
        model.register_forward_hook(release_kernel_buffers)
    return model
