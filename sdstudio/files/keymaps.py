"""Key maps between the original single-file checkpoint layout and diffusers / transformers names (formats.md §2).

Every map is a table of (original, ours) dotted-name pairs, generated from the block structure read off the keys,
and the same table serves both directions. Conversions rename and take views; nothing is copied on the way in.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
TEXT_MODEL = "text_model."
# cond_stage_model.{transformer,model}. (SD1/SD2) or conditioner.embedders.N.{transformer,model}. (SDXL)
_TEXT_PREFIX = re.compile(r"(?:cond_stage_model\.|conditioner\.embedders\.(\d+)\.)(transformer|model)\.")
_TEXT_KIND = {"transformer": "clip", "model": "open_clip"}
# legacy SD1 files lack the "text_model." level under cond_stage_model.transformer.
# (A1111 modules/sd_models.py checkpoint_dict_replacements_sd1 inserts it)
_LEGACY_CLIP_HEADS = ("embeddings.", "encoder.", "final_layer_norm.")


class KeyMapError(ValueError):
    """A key that no map knows, or a set of keys that cannot be converted; loaders wrap it in ModelFileError."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


@dataclass
class TextEncoderPart:
    """One text encoder of a checkpoint, with weights under our (transformers, "text_model."-level) names."""

    prefix: str  # original prefix, e.g. "cond_stage_model.transformer.", "conditioner.embedders.1.model."
    kind: str  # "clip" (HF CLIP layout in the file) or "open_clip" (OpenCLIP layout in the file)
    weights: dict[str, Tensor]
    legacy_names: bool = False  # the file's CLIP keys lacked the "text_model." level (old SD1 saves)


@dataclass
class CheckpointParts:
    """A single-file checkpoint split into components under diffusers / transformers names."""

    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text_encoders: list[TextEncoderPart]  # file order: cond_stage_model, then conditioner.embedders.0, 1, ...
    extras: dict[str, Tensor]  # every other key, original names (model_ema.*, alphas_cumprod, logit_scale, ...)


# ---------------------------------------------------------------------------------------------------------------
# The table machinery: rows of (original, ours, inner table or None); a row matches a whole dotted prefix of a key.


class _KeyMap:
    """Rows of (original name, our name, inner map); where a name repeats, the first row wins in that direction."""

    def __init__(self, rows: Iterable[tuple[str, str, _KeyMap | None]]):
        self.to_ours: dict[str, tuple[str, _KeyMap | None]] = {}
        self.to_original: dict[str, tuple[str, _KeyMap | None]] = {}
        for original, ours, inner in rows:
            self.to_ours.setdefault(original, (ours, inner))
            self.to_original.setdefault(ours, (original, inner))


def _rename(key: str, keymap: _KeyMap, to_ours: bool) -> str | None:
    """The key renamed by the row of its shortest dotted prefix that has one (the rest by that row's inner map)."""
    table = keymap.to_ours if to_ours else keymap.to_original
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        hit = table.get(".".join(parts[:n]))
        if hit is None:
            continue
        head, inner = hit
        rest = ".".join(parts[n:])
        if not rest:
            return head
        tail = rest if inner is None else _rename(rest, inner, to_ours)
        return None if tail is None else f"{head}.{tail}"
    return None


def _rename_all(
    sd: Mapping[str, Tensor], keymap: _KeyMap, to_ours: bool, what: str, reshape: Callable | None = None
) -> dict[str, Tensor]:
    """All keys renamed (tensors passed through reshape(original key, tensor) if given); unknown keys raise."""
    out = {}
    for key, tensor in sd.items():
        new = _rename(key, keymap, to_ours)
        if new is None:
            raise KeyMapError(key, f"unknown {what} key")
        if new in out:
            raise KeyMapError(key, f"{what} key maps onto {new!r} like another key (two spellings of one weight?)")
        out[new] = reshape(new if not to_ours else key, tensor) if reshape else tensor
    return out


def _pairs(names: Iterable[tuple[str, str]], inner: _KeyMap | None) -> list[tuple[str, str, _KeyMap | None]]:
    return [(original, ours, inner) for original, ours in names]


def _per_level_counts(keys: Iterable[str], pattern: str) -> tuple[int, ...]:
    """For a pattern with groups (level, index): 1 + highest index per level, levels 0..max (0 where absent)."""
    found: dict[int, int] = {}
    regex = re.compile(pattern)
    for key in keys:
        m = regex.match(key)
        if m:
            level, index = int(m[1]), int(m[2])
            found[level] = max(found.get(level, 0), index + 1)
    return tuple(found.get(level, 0) for level in range(max(found, default=-1) + 1))


def _count(keys: Iterable[str], pattern: str) -> int:
    """1 + the highest index captured by the pattern's group (0 if none matches)."""
    regex = re.compile(pattern)
    return max((int(m[1]) + 1 for key in keys if (m := regex.match(key))), default=0)


_LEAF = _KeyMap(_pairs([("weight", "weight"), ("bias", "bias")], None))

# ---------------------------------------------------------------------------------------------------------------
# UNet (formats.md §2.1, §2.2); keys without "model.diffusion_model." on the original side

_UNET_RESNET = _KeyMap(_pairs([
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
], _LEAF))
# SpatialTransformer / Transformer2DModel: identical names on both sides
_UNET_TRANSFORMER = _KeyMap(
    _pairs([(n, n) for n in ("norm", "proj_in", "proj_out")], _LEAF)
    + [("transformer_blocks", "transformer_blocks", None)]
)
_UNET_FIXED = _pairs([
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
], _LEAF) + [
    ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
    ("middle_block.1", "mid_block.attentions.0", _UNET_TRANSFORMER),
    ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
]


@dataclass(frozen=True)
class _UNetLayout:
    res_blocks: tuple[int, ...]  # res blocks per level on the down path (up level i has res_blocks[L-1-i] + 1)
    down_attn: tuple[bool, ...]  # down level i has attention
    up_attn: tuple[bool, ...]  # up level i (diffusers order: lowest resolution first) has attention
    class_embedding: bool  # label_emb <-> class_embedding (unCLIP) instead of add_embedding (SDXL)


@lru_cache(maxsize=32)
def _unet_map(layout: _UNetLayout) -> _KeyMap:
    """The UNet table for one block structure."""
    rows = list(_UNET_FIXED)
    label_names = ["add_embedding", "class_embedding"]
    if layout.class_embedding:
        label_names.reverse()
    for name in label_names:  # both spellings accepted going back; the preferred one going in
        rows += _pairs([("label_emb.0.0", f"{name}.linear_1"), ("label_emb.0.2", f"{name}.linear_2")], _LEAF)
    levels = len(layout.res_blocks)
    block = 1
    for i, res_blocks in enumerate(layout.res_blocks):
        for j in range(res_blocks):
            rows.append((f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if layout.down_attn[i]:
                rows.append((f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}", _UNET_TRANSFORMER))
            block += 1
        if i < levels - 1:
            rows.append((f"input_blocks.{block}.0.op", f"down_blocks.{i}.downsamplers.0.conv", _LEAF))
            block += 1
    block = 0
    for i, has_attn in enumerate(layout.up_attn):
        for j in range(layout.res_blocks[levels - 1 - i] + 1):
            rows.append((f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if has_attn:
                rows.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", _UNET_TRANSFORMER))
            block += 1
        if i < levels - 1:  # the upsampler follows the last res block's attention, if any
            original = f"output_blocks.{block - 1}.{2 if has_attn else 1}.conv"
            rows.append((original, f"up_blocks.{i}.upsamplers.0.conv", _LEAF))
    return _KeyMap(rows)


_BLOCK_PART = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.([^.]+)")


def _unet_layout_from_original(keys: Iterable[str], class_embedding: bool) -> _UNetLayout:
    """Levels, res blocks per level and attention placement read from original UNet keys."""
    downsamplers, attn = set(), {"input_blocks": set(), "output_blocks": set()}
    last_input = 0
    for key in keys:
        m = _BLOCK_PART.match(key)
        if not m:
            continue
        side, block, sub, name = m[1], int(m[2]), int(m[3]), m[4]
        if side == "input_blocks":
            last_input = max(last_input, block)
            if sub == 0 and name == "op":
                downsamplers.add(block)
        if sub == 1 and name != "conv":  # output_blocks.N.1.conv is an upsampler, not attention
            attn[side].add(block)
    res_blocks, down_attn, level = [], [], []
    for block in range(1, last_input + 1):  # levels are the runs of blocks between downsamplers
        if block in downsamplers:
            res_blocks.append(len(level))
            down_attn.append(any(b in attn["input_blocks"] for b in level))
            level = []
        else:
            level.append(block)
    if level or res_blocks:
        res_blocks.append(len(level))
        down_attn.append(any(b in attn["input_blocks"] for b in level))
    up_attn, block = [], 0
    for res in reversed(res_blocks):
        up_attn.append(any(b in attn["output_blocks"] for b in range(block, block + res + 1)))
        block += res + 1
    return _UNetLayout(tuple(res_blocks), tuple(down_attn), tuple(up_attn), class_embedding)


def _unet_layout_from_diffusers(keys: Iterable[str]) -> _UNetLayout:
    """Levels, res blocks per level and attention placement read from diffusers UNet keys."""
    keys = list(keys)
    res_blocks = _per_level_counts(keys, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
    levels = len(res_blocks)
    down_attn = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
    up_attn = tuple(any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(levels))
    class_embedding = any(k.startswith("class_embedding.") for k in keys)
    return _UNetLayout(res_blocks, down_attn, up_attn, class_embedding)


def unet_to_diffusers(sd: Mapping[str, Tensor], class_embedding: bool = False) -> dict[str, Tensor]:
    """Original UNet keys (no "model.diffusion_model.") -> diffusers UNet2DConditionModel keys; same tensors.

    label_emb maps to add_embedding (SDXL) unless class_embedding is set (unCLIP-style).
    """
    return _rename_all(sd, _unet_map(_unet_layout_from_original(sd, class_embedding)), to_ours=True, what="UNet")


def unet_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel keys -> original UNet keys (no "model.diffusion_model."); same tensors."""
    return _rename_all(sd, _unet_map(_unet_layout_from_diffusers(sd)), to_ours=False, what="UNet")


# ---------------------------------------------------------------------------------------------------------------
# VAE (formats.md §2.3); keys without "first_stage_model." on the original side

_VAE_RESNET = _KeyMap(
    _pairs([(n, n) for n in ("norm1", "conv1", "norm2", "conv2")] + [("nin_shortcut", "conv_shortcut")], _LEAF)
)
# current diffusers names first; old diffusers (pre-2023) names accepted going back
_VAE_ATTENTION = _KeyMap(_pairs([
    ("norm", "group_norm"),
    ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"),
    ("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "proj_attn"),
], _LEAF))
# original stores these as 1x1 convs [C, C, 1, 1]; diffusers as Linear [C, C]
_VAE_CONV_ATTENTION = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
_VAE_FIXED = _pairs([
    (f"{side}.{name}", f"{side}.{name}") for side in ("encoder", "decoder") for name in ("conv_in", "conv_out")
] + [
    ("encoder.norm_out", "encoder.conv_norm_out"),
    ("decoder.norm_out", "decoder.conv_norm_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
], _LEAF) + [
    row
    for side in ("encoder", "decoder")
    for row in [
        (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET),
        (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTENTION),
        (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET),
    ]
]


@lru_cache(maxsize=32)
def _vae_map(encoder_blocks: tuple[int, ...], decoder_blocks: tuple[int, ...]) -> _KeyMap:
    """The VAE table for res blocks per encoder level and per decoder level (diffusers order)."""
    rows = list(_VAE_FIXED)
    for i, blocks in enumerate(encoder_blocks):
        rows += [
            (f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET) for j in range(blocks)
        ]
        if i < len(encoder_blocks) - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", _LEAF))
    for i, blocks in enumerate(decoder_blocks):
        level = len(decoder_blocks) - 1 - i  # the original decoder counts levels from the full-resolution end
        rows += [
            (f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET) for j in range(blocks)
        ]
        if i < len(decoder_blocks) - 1:
            rows.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", _LEAF))
    return _KeyMap(rows)


def _attention_as_linear(original_key: str, tensor: Tensor) -> Tensor:
    """Mid-attention 1x1 conv [C, C, 1, 1] -> Linear [C, C] (a view); everything else unchanged."""
    return tensor.flatten(1) if tensor.ndim > 2 and _VAE_CONV_ATTENTION.fullmatch(original_key) else tensor


def _attention_as_conv(original_key: str, tensor: Tensor) -> Tensor:
    """Mid-attention Linear [C, C] -> 1x1 conv [C, C, 1, 1] (a view); everything else unchanged."""
    return tensor[:, :, None, None] if tensor.ndim == 2 and _VAE_CONV_ATTENTION.fullmatch(original_key) else tensor


def vae_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original VAE keys (no "first_stage_model.") -> diffusers AutoencoderKL keys; attention 1x1 convs become views."""
    encoder = _per_level_counts(sd, r"encoder\.down\.(\d+)\.block\.(\d+)\.")
    decoder = _per_level_counts(sd, r"decoder\.up\.(\d+)\.block\.(\d+)\.")[::-1]
    return _rename_all(sd, _vae_map(encoder, decoder), to_ours=True, what="VAE", reshape=_attention_as_linear)


def vae_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL keys (current or old attention names) -> original VAE keys (no "first_stage_model.")."""
    encoder = _per_level_counts(sd, r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.")
    decoder = _per_level_counts(sd, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.")
    return _rename_all(sd, _vae_map(encoder, decoder), to_ours=False, what="VAE", reshape=_attention_as_conv)


# ---------------------------------------------------------------------------------------------------------------
# Text encoders (formats.md §2.4); keys relative to TextEncoderPart.prefix on the original side


def clip_to_ours(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIP keys from a file ("text_model.X", or legacy "X" lacking that level) -> ours ("text_model.X")."""
    out = {}
    for key, tensor in sd.items():
        new = TEXT_MODEL + key if key.startswith(_LEGACY_CLIP_HEADS) else key
        if not (new.startswith(TEXT_MODEL) or new == "text_projection.weight"):
            raise KeyMapError(key, "unknown CLIP text encoder key")
        out[new] = tensor
    return out


def clip_to_original(sd: Mapping[str, Tensor], legacy_names: bool = False) -> dict[str, Tensor]:
    """Ours ("text_model.X") -> HF CLIP keys as files store them; legacy_names drops the "text_model." level."""
    if not legacy_names:
        return dict(sd)
    return {key.removeprefix(TEXT_MODEL): tensor for key, tensor in sd.items()}


_OPEN_CLIP_LAYER = _KeyMap(_pairs([
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
], _LEAF))
_IN_PROJ = ("in_proj_weight", "in_proj_bias")  # OpenCLIP's packed q, k, v ([3D, D] and [3D]), in that order
_QKV = ("q", "k", "v")


@lru_cache(maxsize=8)
def _open_clip_map(layers: int) -> _KeyMap:
    """The OpenCLIP table for a text tower of that many residual blocks."""
    return _KeyMap([
        ("token_embedding", "text_model.embeddings.token_embedding", _LEAF),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight", None),
        ("ln_final", "text_model.final_layer_norm", _LEAF),
        ("text_projection", "text_projection.weight", None),  # [D, P] used as x @ P  <->  Linear weight [P, D]
    ] + [(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", _OPEN_CLIP_LAYER) for i in range(layers)])


def open_clip_to_ours(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text keys (after "...model.") -> transformers CLIPTextModelWithProjection keys; views only.

    All layers are kept; logit_scale is not a text-encoder weight and is refused (split_checkpoint keeps it in extras).
    """
    keymap = _open_clip_map(_count(sd, r"transformer\.resblocks\.(\d+)\."))
    out = {}
    for key, tensor in sd.items():
        head, _, leaf = key.rpartition(".")
        if leaf in _IN_PROJ and head.endswith(".attn"):
            layer = _rename(head.removesuffix(".attn"), keymap, to_ours=True)
            if layer is None:
                raise KeyMapError(key, "unknown OpenCLIP text encoder key")
            suffix = leaf.removeprefix("in_proj_")
            for name, third in zip(_QKV, tensor.chunk(3)):
                out[f"{layer}.self_attn.{name}_proj.{suffix}"] = third
            continue
        new = _rename(key, keymap, to_ours=True)
        if new is None:
            raise KeyMapError(key, "unknown OpenCLIP text encoder key")
        out[new] = tensor.t() if new == "text_projection.weight" else tensor
    return out


_QKV_KEY = re.compile(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)")


def open_clip_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIP text keys -> OpenCLIP keys (after "...model."); q, k, v packed back with torch.cat."""
    keymap = _open_clip_map(_count(sd, r"text_model\.encoder\.layers\.(\d+)\."))
    out = {}
    for key, tensor in sd.items():
        m = _QKV_KEY.fullmatch(key)
        if m:
            layer, suffix = m[1], m[3]
            thirds = [f"{layer}.self_attn.{name}_proj.{suffix}" for name in _QKV]
            missing = [k for k in thirds if k not in sd]
            if missing:
                raise KeyMapError(missing[0], "missing: q, k and v projections are packed together")
            original_layer = _rename(layer, keymap, to_ours=False)
            if original_layer is None:
                raise KeyMapError(key, "unknown CLIP text encoder key")
            if m[2] == "q":
                out[f"{original_layer}.attn.in_proj_{suffix}"] = torch.cat([sd[k] for k in thirds])
            continue
        new = _rename(key, keymap, to_ours=False)
        if new is None:
            raise KeyMapError(key, "unknown CLIP text encoder key")
        out[new] = tensor.t().contiguous() if key == "text_projection.weight" else tensor
    return out


def fit_text_encoder_keys(ours: Mapping[str, Tensor], module_keys: Iterable[str]) -> dict[str, Tensor]:
    """Our text-encoder keys with the "text_model." level stripped or added to match a module's state_dict keys.

    transformers 5 CLIPTextModel has no "text_model." level; CLIPTextModelWithProjection has it.
    """
    module_keys = set(module_keys)
    if any(k.startswith(TEXT_MODEL) for k in module_keys):
        return {
            (k if k.startswith(TEXT_MODEL) or k in module_keys else TEXT_MODEL + k): t for k, t in ours.items()
        }
    return {k.removeprefix(TEXT_MODEL): t for k, t in ours.items()}


def text_encoder_keys_as_ours(module_sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `fit_text_encoder_keys`: a text encoder module's state_dict in our names ("text_model.…",
    "text_projection.…")."""
    return {(k if k.startswith((TEXT_MODEL, "text_projection.")) else TEXT_MODEL + k): t for k, t in module_sd.items()}


# ---------------------------------------------------------------------------------------------------------------
# EMA (formats.md §1.6)


def ema_key(original_unet_key: str) -> str:
    """LitEma buffer name: "model.diffusion_model.a.0.w" -> "model_ema.diffusion_modela0w"."""
    return EMA_PREFIX + original_unet_key.removeprefix("model.").replace(".", "")


def swap_in_ema(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A new dict whose "model.diffusion_model.*" values are their EMA tensors where present; model_ema.* is kept."""
    out = dict(sd)
    swapped = 0
    for key in sd:
        if key.startswith(UNET_PREFIX):
            ema = sd.get(ema_key(key))
            if ema is not None:
                out[key] = ema
                swapped += 1
    if not swapped:
        raise KeyMapError(EMA_PREFIX + "*", "the checkpoint has no EMA weights for its UNet")
    log.debug("swapped in %d EMA tensors", swapped)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def _with_prefix(prefix: str, convert: Callable, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """convert(sd), with any KeyMapError re-raised naming the full original key."""
    try:
        return convert(sd)
    except KeyMapError as e:
        raise KeyMapError(prefix + e.key, e.problem) from None


def _text_order(prefix: str) -> int:
    """File order of text encoders: cond_stage_model first, then conditioner.embedders by index."""
    m = _TEXT_PREFIX.match(prefix)
    return -1 if m[1] is None else int(m[1])


def split_checkpoint(sd: Mapping[str, Tensor]) -> CheckpointParts:
    """Split an original single-file state dict into UNet, VAE, text encoders (our names) and untouched extras."""
    unet, vae, extras = {}, {}, {}
    texts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in sd.items():
        m = _TEXT_PREFIX.match(key)
        if key.startswith(UNET_PREFIX):
            unet[key.removeprefix(UNET_PREFIX)] = tensor
        elif key.startswith(VAE_PREFIX):
            vae[key.removeprefix(VAE_PREFIX)] = tensor
        elif m and not (m[2] == "model" and key == m[0] + "logit_scale"):
            texts.setdefault(m[0], {})[key[m.end():]] = tensor
        else:
            extras[key] = tensor
    text_encoders = []
    for prefix in sorted(texts, key=_text_order):
        weights = texts[prefix]
        kind = _TEXT_KIND[_TEXT_PREFIX.match(prefix)[2]]
        if kind == "clip":
            legacy = any(k.startswith(_LEGACY_CLIP_HEADS) for k in weights)
            part = TextEncoderPart(prefix, kind, _with_prefix(prefix, clip_to_ours, weights), legacy)
        else:
            part = TextEncoderPart(prefix, kind, _with_prefix(prefix, open_clip_to_ours, weights))
        text_encoders.append(part)
    return CheckpointParts(
        unet=_with_prefix(UNET_PREFIX, unet_to_diffusers, unet),
        vae=_with_prefix(VAE_PREFIX, vae_to_diffusers, vae),
        text_encoders=text_encoders,
        extras=extras,
    )


def join_checkpoint(parts: CheckpointParts) -> dict[str, Tensor]:
    """The original single-file state dict for these parts (inverse of split_checkpoint)."""
    out = {UNET_PREFIX + k: t for k, t in unet_to_original(parts.unet).items()}
    out.update({VAE_PREFIX + k: t for k, t in vae_to_original(parts.vae).items()})
    for part in parts.text_encoders:
        if part.kind == "clip":
            weights = clip_to_original(part.weights, part.legacy_names)
        elif part.kind == "open_clip":
            weights = open_clip_to_original(part.weights)
        else:
            raise KeyMapError(part.prefix, f"unknown text encoder kind {part.kind!r} (expected 'clip' or 'open_clip')")
        out.update({part.prefix + k: t for k, t in weights.items()})
    clash = out.keys() & parts.extras.keys()
    if clash:
        raise KeyMapError(min(clash), "an extra key collides with a converted component key")
    out.update(parts.extras)
    return out
