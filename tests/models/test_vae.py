"""External VAE files: layouts, family checks, swapping without reloading, Automatic rule, NaN-safe decode."""
from __future__ import annotations

import logging

import pytest
import torch

from sdstudio import synthetic
from sdstudio.errors import ModelFileError
from sdstudio.files.keymaps import vae_to_original
from sdstudio.files.writers import save_safetensors
from sdstudio.models import vae as vae_ops
from sdstudio.models.build import vae_from_config
from sdstudio.models.checkpoint import fast_cpu_dtype, load_checkpoint
from tests.helpers import psnr


@pytest.fixture()
def model(sd1_file):
    return load_checkpoint(sd1_file)


def weights_equal(module, original: dict[str, torch.Tensor]) -> bool:
    rebuilt = vae_to_original(module.state_dict())
    return rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_plain_prefixed_and_lightning_vae_files_give_the_same_weights(tmp_path):
    weights = synthetic.make_vae_weights(seed=5)
    plain = tmp_path / "plain.safetensors"
    save_safetensors(weights, plain)
    prefixed = tmp_path / "prefixed.safetensors"
    save_safetensors({"first_stage_model." + k: v for k, v in weights.items()}, prefixed)
    lightning = synthetic.write_vae(tmp_path / "vae-ft-mse.ckpt", seed=5)   # state_dict wrapper + loss.* + EMA scalars
    for path in (plain, prefixed, lightning):
        module = vae_ops.load_vae_module(path, "sd1", torch.float32)
        assert weights_equal(module, weights), path.name


def test_swap_in_and_back_without_reloading_the_checkpoint(model, tmp_path):
    unet_before, own = model.unet, model.vae
    path = synthetic.write_vae(tmp_path / "external.safetensors", seed=7)
    vae_ops.swap_vae(model, path)
    assert model.vae is not own and model.vae_path == path and model.unet is unet_before
    assert weights_equal(model.vae, synthetic.make_vae_weights(seed=7))
    vae_ops.swap_vae(model, None)
    assert model.vae is own and model.vae_path is None


def test_sdxl_vae_for_an_sd1_model_is_refused_and_the_previous_vae_stays(model, tmp_path):
    good = synthetic.write_vae(tmp_path / "good.safetensors", seed=3)
    vae_ops.swap_vae(model, good)
    active = model.vae
    declared = synthetic.write_vae(tmp_path / "declared.safetensors", seed=4,
                                   metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    named = synthetic.write_vae(tmp_path / "sdxl_vae.safetensors", seed=4)
    for path in (declared, named):
        with pytest.raises(ModelFileError, match=rf"{path.name}: this is an SDXL VAE; the loaded model is sd1"):
            vae_ops.swap_vae(model, path)
        assert model.vae is active and model.vae_path == good


def test_sd_vae_for_an_sdxl_model_is_refused(synth_file, tmp_path):
    sdxl = load_checkpoint(synth_file("sdxl", "pruned"))
    path = synthetic.write_vae(tmp_path / "v.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(ModelFileError, match="SD1/SD2 VAE; the loaded model is sdxl"):
        vae_ops.swap_vae(sdxl, path)


def test_a_checkpoint_or_lora_given_as_vae_is_explained(tmp_path, sd1_file):
    with pytest.raises(ModelFileError, match="full checkpoint, not a VAE"):
        vae_ops.vae_weights(sd1_file)
    lora = tmp_path / "lora.safetensors"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora)
    with pytest.raises(ModelFileError, match="lora.safetensors: not a VAE file"):
        vae_ops.load_vae_module(lora, "sd1", torch.float32)


def test_automatic_picks_the_vae_named_after_the_checkpoint(tmp_path):
    ckpt = tmp_path / "Stable-diffusion" / "dream.safetensors"
    ckpt.parent.mkdir()
    ckpt.touch()
    other = tmp_path / "VAE" / "other.safetensors"
    mine = tmp_path / "VAE" / "dream.vae.pt"
    available = {p.name: p for p in (other, mine)}
    assert vae_ops.resolve_vae("Automatic", ckpt, available) == mine
    assert vae_ops.resolve_vae("None", ckpt, available) is None
    assert vae_ops.resolve_vae("other.safetensors", ckpt, available) == other
    assert vae_ops.resolve_vae("Automatic", ckpt, {"other.safetensors": other}) is None
    beside = ckpt.parent / "dream.vae.safetensors"
    beside.touch()
    assert vae_ops.resolve_vae("Automatic", ckpt, {}) == beside
    with pytest.raises(ModelFileError, match="unknown VAE; available: dream.vae.pt, other.safetensors"):
        vae_ops.resolve_vae("missing.pt", ckpt, available)


def test_decode_gives_images_in_range(model):
    images = vae_ops.decode(model.vae, torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1 and images.std() > 0.01


def test_half_precision_nan_decodes_again_wider_and_keeps_that_copy(sd1_file, caplog):
    half = load_checkpoint(sd1_file, dtype="fp16")
    vae = half.vae
    with torch.no_grad():  # make fp16 overflow: activations beyond 65504 before the first GroupNorm
        vae.decoder.conv_in.weight.mul_(3e4)
    latents = torch.randn(1, 4, 8, 8) * 3
    raw = vae.decode(latents.half() / vae.config.scaling_factor).sample
    assert torch.isnan(raw).any()  # the failure really happens in fp16
    wider = "torch.bfloat16" if fast_cpu_dtype() == torch.bfloat16 else "torch.float32"
    with caplog.at_level(logging.WARNING):
        images = vae_ops.decode(vae, latents)
    assert torch.isfinite(images).all() and images.std() > 0
    assert f"decoding in {wider} from now on" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):   # the next decode goes straight to the wider copy: no NaN, no warning
        again = vae_ops.decode(vae, latents)
    assert torch.equal(again, images) and "NaN" not in caplog.text
    assert vae.dtype == torch.float16           # the loaded VAE itself is left as it was
    exact = vae_from_config(vae.config, vae.state_dict(), torch.float32, "<vae>", "cpu")
    assert psnr(images, vae_ops.decode(exact, latents), peak=1.0) > 35


def test_encode_is_the_deterministic_scaled_posterior_mean(model):
    image = torch.rand(1, 3, 64, 48)
    latents = vae_ops.encode(model.vae, image)
    assert latents.shape == (1, 4, 8, 6)
    assert torch.equal(latents, vae_ops.encode(model.vae, image))
    mean = model.vae.encode(image * 2 - 1).latent_dist.mean
    assert torch.allclose(latents, mean * model.vae.config.scaling_factor)


def structured_image(height: int, width: int) -> torch.Tensor:
    """Not stationary like noise: a dark and a bright half, a gradient and a disc, so tile statistics differ."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    disc = (((y - 0.6) ** 2 + (x - 0.3) ** 2) < 0.05).float()
    return torch.stack([0.1 + 0.8 * (x > 0.5).float(), y, 0.5 * disc + 0.25]).unsqueeze(0)


@pytest.mark.parametrize("fast_fp32", [False, True])   # diffusers' blocks in each tile; strips of rows in each
def test_tiled_decode_matches_the_untiled_decode_without_visible_seams(sd1_file, monkeypatch, fast_fp32):
    model = load_checkpoint(sd1_file, fast_fp32=fast_fp32)
    in_strips = []
    strips = vae_ops.up_path_in_strips
    monkeypatch.setattr(vae_ops, "up_path_in_strips", lambda *args: in_strips.append(1) or strips(*args))
    latents = vae_ops.encode(model.vae, structured_image(384, 320))  # 48×40 latents
    whole = vae_ops.decode(model.vae, latents, tiled=False)
    # tiles of 32, two rows and two columns; GroupNorm statistics exact (the image fits the untiled budget)
    tiled = vae_ops.decode(model.vae, latents, tiled=True, tile=32, overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 384, 320)
    assert psnr(tiled, whole, peak=1) >= 35
    # a budget below the image: statistics estimated from it subsampled 0.88× per side. Random weights respond to
    # texture far more than a trained VAE; this measures 35.5 dB (31.5 at 0.73×, 17.5 with tile-local statistics)
    monkeypatch.setattr(vae_ops, "TILE_ABOVE", 1500)  # latent pixels
    estimated = vae_ops.decode(model.vae, latents, tiled=True, tile=32, overlap=16)
    assert psnr(estimated, whole, peak=1) >= 35
    # untiled once, then the statistics pass and 4 tiles twice
    assert len(in_strips) == (11 if fast_fp32 else 0)
    assert not any(hasattr(m, "shared_statistics") for m in model.vae.modules())


def test_tiled_encode_matches_the_untiled_encode(model, monkeypatch):
    image = structured_image(384, 320)
    whole = vae_ops.encode(model.vae, image, tiled=False)
    monkeypatch.setattr(vae_ops, "TILE_ABOVE", 1500)  # statistics estimated at 0.88× per side
    tiled = vae_ops.encode(model.vae, image, tiled=True, tile=32, overlap=16)
    spread = float(whole.max() - whole.min())
    assert tiled.shape == whole.shape and psnr(tiled, whole, peak=spread) >= 35


def test_large_images_go_tiled_automatically(model, monkeypatch):
    small, large = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 16, 12)
    monkeypatch.setattr(vae_ops, "TILE_ABOVE", 100)  # latent pixels; 1024×1024 images by default
    assert torch.equal(vae_ops.decode(model.vae, small), vae_ops.decode(model.vae, small, tiled=False))
    auto = vae_ops.decode(model.vae, large, tile=8, overlap=4)
    assert torch.equal(auto, vae_ops.decode(model.vae, large, tiled=True, tile=8, overlap=4))
    assert not torch.equal(auto, vae_ops.decode(model.vae, large, tiled=False))
