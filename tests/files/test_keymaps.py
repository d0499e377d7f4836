"""Key maps: real diffusers/transformers modules at tiny sizes, original names from formats.md, diffusers' own
single-file converters as an independent oracle, and bit-exact round trips through split/join."""
from functools import cache

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as oracle
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdstudio.files import keymaps as km

MD = "model.diffusion_model."
FS = "first_stage_model."

UNET_CONFIGS = {
    "sd1": dict(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
    ),
    "sd2": dict(
        block_out_channels=(64, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(1, 1, 2, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
    ),
    "sdxl": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 2),
        use_linear_projection=True,
        cross_attention_dim=128,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8,
    ),
    "refiner": dict(
        block_out_channels=(64, 128, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        attention_head_dim=(1, 2, 2, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 5 * 8,
    ),
    # not a real family: a different number of res blocks per level, attention skipping the middle level
    "uneven": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=(1, 2, 3),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
}
FAMILIES = ["sd1", "sd2", "sdxl", "refiner"]


@cache
def unet(family: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = {"layers_per_block": 2, **UNET_CONFIGS[family]}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **config)


@cache
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )


@cache
def text_encoder(open_clip: bool):
    """CLIP-L-like CLIPTextModel, or an OpenCLIP-like tower with a projection (P=32 != D=64 exposes transposes)."""
    torch.manual_seed(1 if open_clip else 0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=3,
        max_position_embeddings=77, projection_dim=32 if open_clip else 64,
        hidden_act="gelu" if open_clip else "quick_gelu",
    )
    return CLIPTextModelWithProjection(config) if open_clip else CLIPTextModel(config)


def clip_ours() -> dict:
    """Our names for the CLIP-L encoder: transformers 5 CLIPTextModel keys plus the "text_model." level."""
    ours = {"text_model." + k: v for k, v in text_encoder(False).state_dict().items()}
    ours["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return ours


def load_strict(module: torch.nn.Module, weights: dict):
    """load_state_dict(strict=True) into an uninitialised (meta-device) twin of module; keys and shapes must fit."""
    with torch.device("meta"):
        diffusers_model = hasattr(module, "register_to_config")
        twin = type(module).from_config(module.config) if diffusers_model else type(module)(module.config)
    twin.load_state_dict(weights, strict=True, assign=True)
    assert_same(twin.state_dict(), weights)


def same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.data_ptr(), x.shape, x.stride(), x.dtype) == (y.data_ptr(), y.shape, y.stride(), y.dtype)


def assert_same(a: dict, b: dict):
    """Same keys, dtypes and values (a view of the very same memory counts as equal without comparing it)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert same_view(a[key], b[key]) or torch.equal(a[key], b[key]), key


# --- UNet --------------------------------------------------------------------------------------------------------

# names and shapes from formats.md §1.3 / §2.1 at the tiny widths (channels per level, context width)
UNET_EXPECTED = {
    "sd1": {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 64),
        "input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),  # conv proj_in
        "input_blocks.3.0.op.weight": (32, 32, 3, 3),
        "middle_block.1.proj_out.weight": (64, 64, 1, 1),
        "output_blocks.2.1.conv.weight": (64, 64, 3, 3),
        "output_blocks.5.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.8.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.11.1.proj_in.weight": (32, 32, 1, 1),
        "input_blocks.4.0.skip_connection.weight": (64, 32, 1, 1),
        "out.2.weight": (4, 32, 3, 3),
    },
    "sd2": {
        "input_blocks.1.1.proj_in.weight": (64, 64),  # linear proj_in
        "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight": (128, 64),
        "output_blocks.2.1.conv.weight": (128, 128, 3, 3),
        "output_blocks.8.2.conv.weight": (64, 64, 3, 3),  # up level 2 has down level 1's width
    },
    "sdxl": {
        "label_emb.0.0.weight": (256, 112),
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (128, 128),
        "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight": (128, 128),
        "output_blocks.2.2.conv.weight": (128, 128, 3, 3),
        "output_blocks.5.2.conv.weight": (128, 128, 3, 3),
        "out.2.weight": (4, 64, 3, 3),
    },
    "refiner": {
        "label_emb.0.0.weight": (256, 104),
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (128, 64),
        "output_blocks.2.1.conv.weight": (128, 128, 3, 3),
        "output_blocks.5.2.conv.weight": (128, 128, 3, 3),
        "output_blocks.8.2.conv.weight": (128, 128, 3, 3),
    },
    "uneven": {  # levels of 1, 2, 3 res blocks: input 0 | 1 op2 | 3 4 op5 | 6 7 8; output 0-3 | 4-6 | 7-8
        "input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "input_blocks.5.0.op.weight": (32, 32, 3, 3),
        "input_blocks.8.1.proj_out.weight": (64, 64, 1, 1),
        "output_blocks.3.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.6.1.conv.weight": (32, 32, 3, 3),
        "output_blocks.8.1.proj_out.weight": (32, 32, 1, 1),
    },
}
UNET_ABSENT = {
    "sd1": ["input_blocks.10.1.norm.weight", "output_blocks.2.2.conv.weight", "label_emb.0.0.weight"],
    "sd2": ["input_blocks.10.1.norm.weight"],
    "sdxl": ["input_blocks.1.1.norm.weight", "output_blocks.6.1.norm.weight", "input_blocks.9.0.op.weight"],
    "refiner": ["input_blocks.1.1.norm.weight", "input_blocks.10.1.norm.weight", "output_blocks.0.1.norm.weight"],
    "uneven": ["input_blocks.3.1.norm.weight", "output_blocks.4.1.norm.weight", "output_blocks.9.0.conv1.weight"],
}


@pytest.mark.parametrize("family", list(UNET_CONFIGS))
def test_unet_original_names_and_strict_load(family):
    ours = unet(family).state_dict()
    original = km.unet_to_original(ours)
    for key, shape in UNET_EXPECTED[family].items():
        assert tuple(original[key].shape) == shape, key
    for key in UNET_ABSENT[family]:
        assert key not in original
    assert torch.equal(original["input_blocks.0.0.weight"], ours["conv_in.weight"])
    back = km.unet_to_diffusers(original)
    assert_same(back, ours)
    load_strict(unet(family), back)


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_matches_diffusers_converter(family):
    ours = unet(family).state_dict()
    original = {MD + k: v for k, v in km.unet_to_original(ours).items()}
    config = {"layers_per_block": 2, **UNET_CONFIGS[family]}
    theirs = oracle.convert_ldm_unet_checkpoint(original, config)
    assert_same(theirs, ours)
    assert_same(km.unet_to_diffusers({k.removeprefix(MD): v for k, v in original.items()}), theirs)


def test_unet_class_embedding_spelling():
    original = km.unet_to_original(unet("sdxl").state_dict())
    as_class = km.unet_to_diffusers(original, class_embedding=True)
    assert "class_embedding.linear_2.bias" in as_class and "add_embedding.linear_1.weight" not in as_class
    assert_same(km.unet_to_original(as_class), original)


def test_unet_unknown_key_is_named():
    original = km.unet_to_original(unet("sd1").state_dict())
    with pytest.raises(km.KeyMapError, match=r"input_blocks\.1\.3\.weight"):
        km.unet_to_diffusers({**original, "input_blocks.1.3.weight": torch.zeros(1)})
    with pytest.raises(km.KeyMapError, match=r"input_blocks\.1\.0\.in_layers\.1\.weight"):
        km.unet_to_diffusers({**original, "input_blocks.1.0.in_layers.1.weight": torch.zeros(1)})


# --- VAE ---------------------------------------------------------------------------------------------------------

def test_vae_names_oracle_and_strict_load():
    ours = vae().state_dict()
    original = km.vae_to_original(ours)
    up = "decoder.up_blocks.0.resnets.0.conv1.weight"  # diffusers counts decoder levels from the lowest resolution
    assert torch.equal(original["decoder.up.3.block.0.conv1.weight"], ours[up])
    assert torch.equal(original["decoder.up.0.block.2.norm2.bias"], ours["decoder.up_blocks.3.resnets.2.norm2.bias"])
    assert "decoder.up.3.upsample.conv.weight" in original and "decoder.up.0.upsample.conv.weight" not in original
    assert "encoder.down.2.downsample.conv.weight" in original
    assert "encoder.down.3.downsample.conv.weight" not in original
    assert original["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    for side in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert original[f"{side}.mid.attn_1.{name}.weight"].shape == (64, 64, 1, 1)
        assert f"{side}.mid.attn_1.norm.weight" in original and f"{side}.norm_out.bias" in original
    config = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    theirs = oracle.convert_ldm_vae_checkpoint({FS + k: v for k, v in original.items()}, config)
    assert_same(theirs, ours)
    back = km.vae_to_diffusers(original)
    assert_same(back, ours)
    load_strict(vae(), back)


def test_vae_accepts_old_diffusers_attention_names():
    ours = vae().state_dict()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, tensor in ours.items():
        for new, legacy in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old[key] = tensor
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    assert_same(km.vae_to_original(old), km.vae_to_original(ours))
    both = {**ours, "decoder.mid_block.attentions.0.query.weight": ours["decoder.mid_block.attentions.0.to_q.weight"]}
    with pytest.raises(km.KeyMapError, match=r"query\.weight"):
        km.vae_to_original(both)


# --- text encoders -----------------------------------------------------------------------------------------------

def test_clip_names_oracle_and_strict_load():
    ours = clip_ours()
    original = km.clip_to_original(ours)
    assert original["text_model.embeddings.token_embedding.weight"].shape == (49408, 64)
    theirs = oracle.convert_ldm_clip_checkpoint({"cond_stage_model.transformer." + k: v for k, v in original.items()})
    assert_same(theirs, ours)
    module = text_encoder(False)
    weights = {k: v for k, v in km.clip_to_ours(original).items() if not k.endswith("position_ids")}
    load_strict(module, km.fit_text_encoder_keys(weights, module.state_dict()))


def test_clip_legacy_names_gain_the_text_model_level():
    legacy = km.clip_to_original(clip_ours(), legacy_names=True)
    assert "embeddings.token_embedding.weight" in legacy and "final_layer_norm.weight" in legacy
    assert_same(km.clip_to_ours(legacy), clip_ours())


def test_open_clip_names_and_strict_load():
    module = text_encoder(True)
    ours = module.state_dict()
    original = km.open_clip_to_original(ours)
    d = 64
    packed = original["transformer.resblocks.2.attn.in_proj_weight"]
    assert packed.shape == (3 * d, d)  # nn.MultiheadAttention packs q, k, v in that order
    for i, name in enumerate("qkv"):
        assert torch.equal(packed[i * d:(i + 1) * d], ours[f"text_model.encoder.layers.2.self_attn.{name}_proj.weight"])
        assert torch.equal(original["transformer.resblocks.2.attn.in_proj_bias"][i * d:(i + 1) * d],
                           ours[f"text_model.encoder.layers.2.self_attn.{name}_proj.bias"])
    assert original["text_projection"].shape == (d, 32)  # OpenCLIP applies x @ text_projection
    assert torch.equal(original["text_projection"], ours["text_projection.weight"].T)
    assert torch.equal(original["positional_embedding"], ours["text_model.embeddings.position_embedding.weight"])
    assert torch.equal(original["ln_final.bias"], ours["text_model.final_layer_norm.bias"])
    assert "transformer.resblocks.0.mlp.c_fc.weight" in original and "transformer.resblocks.0.ln_2.bias" in original
    back = km.open_clip_to_ours(original)
    assert_same(back, ours)
    load_strict(module, km.fit_text_encoder_keys(back, ours))


@pytest.mark.parametrize("prefix", ["conditioner.embedders.1.model.", "cond_stage_model.model."])
def test_open_clip_matches_diffusers_converter(prefix):
    module = text_encoder(True)
    ours = module.state_dict()
    original = {prefix + k: v for k, v in km.open_clip_to_original(ours).items()}
    theirs = oracle.convert_open_clip_checkpoint(module, original, prefix=prefix)
    if prefix == "cond_stage_model.model.":  # diffusers' SD2 text encoder ignores the projection
        ours = {k: v for k, v in ours.items() if k != "text_projection.weight"}
    assert_same(theirs, ours)


def test_fit_text_encoder_keys_strips_and_adds_the_level():
    ours = {"text_model.a.weight": torch.zeros(1), "text_projection.weight": torch.ones(1)}
    assert set(km.fit_text_encoder_keys(ours, ["a.weight"])) == {"a.weight", "text_projection.weight"}
    stripped = {"a.weight": torch.zeros(1), "text_projection.weight": torch.ones(1)}
    fitted = km.fit_text_encoder_keys(stripped, ["text_model.a.weight", "text_projection.weight"])
    assert set(fitted) == {"text_model.a.weight", "text_projection.weight"}


# --- whole checkpoints -------------------------------------------------------------------------------------------

def full_checkpoint(family: str) -> tuple[dict, dict]:
    """An original single-file state dict for a family, and the extras put into it."""
    base = "sd1" if family in ("sd1_legacy_text", "inpaint") else family
    sd = {MD + k: v for k, v in km.unet_to_original(unet(base).state_dict()).items()}
    if family == "inpaint":  # 4 noisy latent + 4 masked-image latent + 1 mask channels
        sd[MD + "input_blocks.0.0.weight"] = torch.randn(32, 9, 3, 3)
    sd.update({FS + k: v for k, v in km.vae_to_original(vae().state_dict()).items()})
    clip = km.clip_to_original(clip_ours(), legacy_names=family == "sd1_legacy_text")
    open_clip = km.open_clip_to_original(text_encoder(True).state_dict())
    texts = {
        "sd1": {"cond_stage_model.transformer.": clip},
        "sd2": {"cond_stage_model.model.": open_clip},
        "sdxl": {"conditioner.embedders.0.transformer.": clip, "conditioner.embedders.1.model.": open_clip},
        "refiner": {"conditioner.embedders.0.model.": open_clip},
    }[base]
    for prefix, weights in texts.items():
        sd.update({prefix + k: v for k, v in weights.items()})
    unet_keys = [k for k in sd if k.startswith(MD)][:5]
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        **{km.ema_key(k): sd[k] + 1 for k in unet_keys},
        "alphas_cumprod": torch.linspace(1, 0.01, 1000, dtype=torch.float64),
        "betas": torch.linspace(1e-4, 0.02, 1000),
        "embedding_manager.embedder.junk": torch.zeros(3),
    }
    extras.update({prefix + "logit_scale": torch.tensor(4.6) for prefix in texts if prefix.endswith("model.")})
    if family == "sdxl":  # most SDXL files ship in half precision
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    sd.update(extras)
    return sd, extras


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", ["sd1", "sd1_legacy_text", "inpaint", "sd2", "sdxl", "refiner"])
def test_split_join_round_trips(family):
    original, extras = full_checkpoint(family)
    parts = km.split_checkpoint(original)
    assert_same(parts.extras, extras)
    assert parts.unet.keys() == unet("sd1" if family in ("sd1_legacy_text", "inpaint") else family).state_dict().keys()
    assert parts.vae.keys() == vae().state_dict().keys()
    expected_text = {
        "sdxl": [("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip")],
        "sd2": [("cond_stage_model.model.", "open_clip")],
        "refiner": [("conditioner.embedders.0.model.", "open_clip")],
    }.get(family, [("cond_stage_model.transformer.", "clip")])
    assert [(p.prefix, p.kind) for p in parts.text_encoders] == expected_text
    assert [p.legacy_names for p in parts.text_encoders][0] == (family == "sd1_legacy_text")
    assert not any(p.legacy_names for p in parts.text_encoders[1:])
    for part in parts.text_encoders:
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in part.weights)
        if part.kind == "clip":
            assert part.weights["text_model.embeddings.position_ids"].dtype == torch.int64
    # the load direction takes views: every converted tensor lives in a storage of the file's tensors
    file_storages = {storage(t) for t in original.values()}
    text = [t for p in parts.text_encoders for t in p.weights.values()]
    converted = [*parts.unet.values(), *parts.vae.values(), *text]
    assert all(storage(t) in file_storages for t in converted)

    joined = km.join_checkpoint(parts)
    assert_same(joined, original)
    again = km.split_checkpoint(joined)
    assert_same(again.unet, parts.unet)
    assert_same(again.vae, parts.vae)
    assert_same(again.extras, parts.extras)
    for a, b in zip(again.text_encoders, parts.text_encoders, strict=True):
        assert (a.prefix, a.kind, a.legacy_names) == (b.prefix, b.kind, b.legacy_names)
        assert_same(a.weights, b.weights)


def test_split_names_unknown_component_keys():
    original, _ = full_checkpoint("sd1")
    for bad in (MD + "input_blocks.1.1.bogus.weight", FS + "encoder.down.0.attn.0.q.weight",
                "cond_stage_model.model.transformer.resblocks.0.attn.bogus"):
        with pytest.raises(km.KeyMapError, match=bad.replace(".", r"\.")):
            km.split_checkpoint({**original, bad: torch.zeros(1)})


def test_join_refuses_extras_that_collide():
    parts = km.split_checkpoint(full_checkpoint("sd1")[0])
    parts.extras[MD + "out.2.bias"] = torch.zeros(4)
    with pytest.raises(km.KeyMapError, match=r"out\.2\.bias"):
        km.join_checkpoint(parts)


# --- EMA ---------------------------------------------------------------------------------------------------------

def test_ema_key_follows_litema_naming():
    key = km.ema_key("model.diffusion_model.input_blocks.0.0.weight")
    assert key == "model_ema.diffusion_modelinput_blocks00weight"  # formats.md §1.6


def test_swap_in_ema():
    original, extras = full_checkpoint("sd1")
    swapped = km.swap_in_ema(original)
    assert swapped.keys() == original.keys()
    for key, tensor in original.items():
        ema = extras.get(km.ema_key(key)) if key.startswith(MD) else None
        assert swapped[key] is (ema if ema is not None else tensor), key
    assert sum(swapped[k] is not original[k] for k in original) == 5
    with pytest.raises(km.KeyMapError, match="no EMA"):
        km.swap_in_ema({k: v for k, v in original.items() if not k.startswith("model_ema.diffusion")})
