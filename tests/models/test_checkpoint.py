"""Loading real-layout checkpoints into diffusers/transformers modules: every family, variant and container."""
from __future__ import annotations

import pytest
import torch

from sdstudio.errors import ModelFileError
from sdstudio.files.keymaps import CheckpointParts, TextEncoderPart, join_checkpoint, split_checkpoint
from sdstudio.files.readers import read_state_dict
from sdstudio.models.checkpoint import load_checkpoint

FAMILIES = ["sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sd1-inpaint", "sd2-inpaint", "sd1-ip2p"]


def rebuild_original(model) -> dict[str, torch.Tensor]:
    """The loaded modules' weights mapped back to the original single-file layout."""
    file_parts = split_checkpoint(read_state_dict(model.path))
    encoders = []
    for part, encoder in zip(file_parts.text_encoders, model.text_encoders):
        weights = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
                   for k, v in encoder.model.state_dict().items()}
        if "text_model.embeddings.position_ids" in part.weights:
            weights["text_model.embeddings.position_ids"] = part.weights["text_model.embeddings.position_ids"]
        encoders.append(TextEncoderPart(part.prefix, part.kind, weights))
    return join_checkpoint(CheckpointParts(unet=model.unet.state_dict(), vae=model.own_vae.state_dict(),
                                           text_encoders=encoders, extras=file_parts.extras))


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_modules_hold_exactly_the_file_weights(synth_file, family):
    path = synth_file(family, "pruned")
    model = load_checkpoint(path)
    original = read_state_dict(path)
    rebuilt = rebuild_original(model)
    assert rebuilt.keys() == original.keys()
    for key in original:
        assert torch.equal(rebuilt[key], original[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_a_unet_step(synth_file, family):
    model = load_checkpoint(synth_file(family, "pruned"))
    unet = model.unet
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = model.text_encoders[-1].model.config.projection_dim
        ids = 6 if family == "sdxl" else 5
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.ones(1, ids)}
    with torch.inference_mode():
        out = unet(x, torch.tensor([500.0]), encoder_hidden_states=context, **extra).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 0


def test_ckpt_and_safetensors_load_the_same_weights(synth_file):
    a = load_checkpoint(synth_file("sd1", "full", "safetensors"))
    b = load_checkpoint(synth_file("sd1", "full", "ckpt"))
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.info == b.info


def test_main_weights_by_default_and_ema_on_request(synth_file):
    path = synth_file("sd1", "full")
    sd = read_state_dict(path)
    main = load_checkpoint(path)
    ema = load_checkpoint(path, use_ema=True)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(main.unet.conv_in.weight, sd[key])
    assert torch.equal(ema.unet.conv_in.weight, sd["model_ema.diffusion_modelinput_blocks00weight"])
    assert not torch.equal(main.unet.conv_in.weight, ema.unet.conv_in.weight)


def test_ema_requested_without_ema_weights_is_an_error(synth_file):
    with pytest.raises(ModelFileError, match="no EMA weights"):
        load_checkpoint(synth_file("sd1", "pruned"), use_ema=True)


def test_fp16_file_loads_in_the_requested_precision(synth_file):
    path = synth_file("sd1", "fp16")
    assert load_checkpoint(path).unet.dtype == torch.float32
    half = load_checkpoint(path, dtype="fp16")
    assert half.unet.dtype == torch.float16 and half.info.dtypes["unet"] == "float16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_convolution_weights_are_channels_last_with_the_files_values(synth_file, precision):
    path = synth_file("sd1", "fp16")
    reference, fast = load_checkpoint(path), load_checkpoint(path, dtype=precision)
    for ref_module, fast_module in ((reference.unet, fast.unet), (reference.vae, fast.vae)):
        conv_weights = [(name, p) for name, p in fast_module.named_parameters() if p.dim() == 4]
        assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for _, p in conv_weights)
        fp32 = dict(ref_module.named_parameters())
        for name, weight in conv_weights:
            assert fp32[name].is_contiguous() and torch.equal(weight.float(), fp32[name].to(weight.dtype).float())
    assert all(p.is_contiguous() for p in fast.text_encoders[0].model.parameters())


def test_alphas_cumprod_come_from_the_file(synth_file):
    sd1 = load_checkpoint(synth_file("sd1", "pruned"))
    assert sd1.alphas_cumprod is not None and sd1.alphas_cumprod.shape == (1000,)
    assert load_checkpoint(synth_file("sdxl", "pruned")).alphas_cumprod is None  # SGM files carry none


def test_a_lora_in_the_checkpoint_folder_is_explained(tmp_path):
    from sdstudio.files.writers import save_safetensors

    path = tmp_path / "models" / "Stable-diffusion" / "style.safetensors"
    path.parent.mkdir(parents=True)
    save_safetensors({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
                      "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)}, path)
    with pytest.raises(ModelFileError, match="style.safetensors: this looks like a LoRA.*models/Lora"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_weight(tmp_path, synth_file):
    from sdstudio.files.writers import save_safetensors

    sd = dict(read_state_dict(synth_file("sd1", "pruned")))
    key = "model.diffusion_model.out.2.weight"
    sd[key] = torch.zeros(4, 16, 3, 3)
    path = tmp_path / "broken.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(ModelFileError, match=r"broken.safetensors \(UNet\).*conv_out.weight.*shape"):
        load_checkpoint(path)
