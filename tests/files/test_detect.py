"""Family detection from keys and shapes of real-layout (synthetic) checkpoints."""
from __future__ import annotations


import pytest
import torch

from sdstudio import synthetic
from sdstudio.errors import ModelFileError
from sdstudio.files.detect import (CheckpointInfo, SD2_V_PROBE, classify_file, detect_checkpoint,
                                   inspect_checkpoint)

EXPECTED = {
    # family name: (family, variant, prediction, in_channels, text encoders)
    "sd1": ("sd1", "base", "eps", 4, ("clip_l",)),
    "sd2": ("sd2", "base", "eps", 4, ("open_clip_h",)),
    "sd2-v": ("sd2", "base", "v", 4, ("open_clip_h",)),
    "sdxl": ("sdxl", "base", "eps", 4, ("clip_l", "open_clip_g")),
    "sdxl-refiner": ("sdxl-refiner", "base", "eps", 4, ("open_clip_g",)),
    "sd1-inpaint": ("sd1", "inpaint", "eps", 9, ("clip_l",)),
    "sd2-inpaint": ("sd2", "inpaint", "eps", 9, ("open_clip_h",)),
    "sd1-ip2p": ("sd1", "instruct-pix2pix", "eps", 8, ("clip_l",)),
}


@pytest.fixture(scope="module")
def state_dicts():
    return {name: synthetic.make_checkpoint(name, "tiny", "full") for name in EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_family_is_recognised(state_dicts, name):
    sd = state_dicts[name]
    info = detect_checkpoint("x.safetensors", sd, read_tensor=sd.__getitem__)
    family, variant, prediction, in_channels, encoders = EXPECTED[name]
    assert (info.family, info.variant, info.prediction, info.in_channels, info.text_encoders) == (
        family, variant, prediction, in_channels, encoders)
    assert info.has_ema and info.has_vae
    assert info.dtypes == {"unet": "float32", "vae": "float32", "text": "float32"}
    main = sum(t.numel() for k, t in sd.items()
               if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")))
    assert info.parameter_count == main


def test_context_width_follows_the_text_encoders(state_dicts):
    widths = {name: detect_checkpoint("x", sd, read_tensor=sd.__getitem__).context_dim
              for name, sd in state_dicts.items()}
    assert widths["sdxl"] == 128          # CLIP-L 64 + bigG 64 concatenated
    assert widths["sd1"] == widths["sd2"] == widths["sdxl-refiner"] == 64


def test_fp16_and_emaonly_variants():
    info = detect_checkpoint("x", synthetic.make_checkpoint("sd1", "tiny", "fp16"))
    assert info.dtypes["unet"] == "float16" and not info.has_ema
    assert not detect_checkpoint("x", synthetic.make_checkpoint("sd1", "tiny", "emaonly")).has_ema


def test_sd2_v_prediction_from_weights_marker_metadata_and_yaml(state_dicts, tmp_path):
    eps = dict(state_dicts["sd2"])
    assert detect_checkpoint("x", eps, read_tensor=eps.__getitem__).prediction_source == "weights"
    marked = dict(eps, v_pred=torch.tensor(0))
    assert detect_checkpoint("x", marked).prediction == "v"
    declared = detect_checkpoint("x", eps, {"modelspec.prediction_type": "v"})
    assert (declared.prediction, declared.prediction_source) == ("v", "metadata")
    path = synthetic.write_checkpoint(tmp_path / "m.safetensors", "sd2")
    assert inspect_checkpoint(path).prediction == "eps"
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert inspect_checkpoint(path).prediction == "v"


def test_v_probe_threshold_is_the_population_std(state_dicts):
    sd = dict(state_dicts["sd2"])
    n = sd[SD2_V_PROBE].numel()
    sd[SD2_V_PROBE] = torch.tensor([0.1, -0.1] * (n // 2))  # population std exactly 0.1 > 0.09
    assert detect_checkpoint("x", sd, read_tensor=sd.__getitem__).prediction == "v"


@pytest.mark.parametrize("keys, kind, words", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "lora", "move it to models/Lora"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "vae", "models/VAE"),
    ({"string_to_param.*": (2, 768)}, "embedding", "models/embeddings"),
    ({"emb_params": (4, 768)}, "embedding", "models/embeddings"),
    ({"some.random.weight": (3, 3), "other.bias": (3,)}, "unknown", "recognised: some.* (1 keys), other.* (1 keys)"),
])
def test_files_in_the_wrong_folder_are_named(keys, kind, words):
    tensors = {k: torch.zeros(shape) for k, shape in keys.items()}
    assert classify_file(tensors) == kind
    with pytest.raises(ModelFileError) as err:
        detect_checkpoint("models/Stable-diffusion/thing.safetensors", tensors)
    assert "thing.safetensors" in str(err.value) and words in str(err.value)


def test_unsupported_input_channels_are_reported(state_dicts):
    sd = dict(state_dicts["sd1"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(sd[key].shape[0], 5, 3, 3)
    with pytest.raises(ModelFileError, match="5 input channels"):
        detect_checkpoint("depth.ckpt", sd)


def test_label_is_readable():
    info = CheckpointInfo("sd2", "inpaint", "v", 9, {}, False, True, ("open_clip_h",), 1, 1024)
    assert info.label == "SD2 v inpaint"


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_unet_only_files_get_their_family_from_the_unet(state_dicts, name):
    unet_only = {k: v for k, v in state_dicts[name].items() if k.startswith("model.diffusion_model.")}
    info = detect_checkpoint("unet.safetensors", unet_only)
    assert info.family == EXPECTED[name][0] and info.text_encoders == () and not info.has_vae
