"""`--device`: names, precision per device, models placed where asked; the CUDA checks run only where torch sees a
GPU (never on this CPU-only CI: they are the GPU machine's part of `make test`)."""
from __future__ import annotations

import pytest
import torch

from sdstudio import pipeline
from sdstudio.errors import SDStudioError
from sdstudio.models import checkpoint
from sdstudio.models.checkpoint import fast_cpu_dtype, load_checkpoint, precision_options, resolve_precision
from sdstudio.models.device import device_memory, resolve_device
from tests.helpers import psnr

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU on this machine")


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, problem", [("tpu", "not a device name"), ("mps", "runs on cpu or cuda"),
                                           ("cuda:99", "CUDA")])
def test_bad_device_names_are_errors_naming_the_flag(name, problem):
    with pytest.raises(SDStudioError, match=f"--device '{name}'.*{problem}"):
        resolve_device(name)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(SDStudioError, match="--device 'cuda': this torch sees no CUDA GPU"):
        resolve_device("cuda")
    assert device_memory(torch.device("cpu")) is None


def test_fast_precisions_are_fp16_on_a_gpu_and_the_cpu_fast_path_on_the_cpu():
    for name in ("auto", "float"):
        assert resolve_precision(name, "cuda") == torch.float16
        assert resolve_precision(name, "cpu") == fast_cpu_dtype()
    assert resolve_precision("bf16", "cuda") == torch.bfloat16 and resolve_precision("fp32", "cuda") == torch.float32
    with pytest.raises(SDStudioError, match="--precision int8 is for the CPU"):
        resolve_precision("int8", "cuda")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_precision_options_give_auto_the_int8_products_and_the_fast_fp32_path_on_a_cpu_without_bf16(monkeypatch,
                                                                                                    native_bf16):
    """What each --precision name loads as; a CPU without native bf16 math (AVX2-only) is this CPU with the
    detection's answer replaced."""
    monkeypatch.setattr(checkpoint, "fast_cpu_dtype", lambda: torch.bfloat16 if native_bf16 else torch.float32)
    fast = torch.bfloat16 if native_bf16 else torch.float32
    for name in ("auto", "int8"):
        assert precision_options(name) == {"dtype": fast, "int8_linears": True, "fast_fp32": not native_bf16}
    assert precision_options("float") == {"dtype": fast, "int8_linears": False, "fast_fp32": not native_bf16}
    assert precision_options("fp32") == {"dtype": torch.float32, "int8_linears": False, "fast_fp32": False}
    assert precision_options("bf16") == {"dtype": torch.bfloat16, "int8_linears": False, "fast_fp32": False}
    for name in ("auto", "float"):
        assert precision_options(name, "cuda") == {"dtype": torch.float16, "int8_linears": False, "fast_fp32": False}


def test_models_load_onto_the_device_asked_for(sd1_file):
    model = load_checkpoint(sd1_file, device="cpu")
    modules = [model.unet, model.vae] + [e.model for e in model.text_encoders]
    assert model.device == torch.device("cpu")
    assert {p.device for m in modules for p in m.parameters()} == {torch.device("cpu")}


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_gpu_txt2img_and_img2img_match_the_cpu(sd1_file, precision):
    """The same request on the GPU and the CPU (fp32 reference): the GPU path moves every tensor it needs."""
    request = {"prompt": "a (red:1.2) cat [dog:cat:2]", "negative_prompt": "blurry", "steps": 4, "width": 64,
               "height": 64, "seed": 3, "sampler_name": "DPM++ 2M SDE"}
    cpu = load_checkpoint(sd1_file)
    gpu = load_checkpoint(sd1_file, dtype=resolve_precision(precision, "cuda"), device="cuda")
    assert gpu.device.type == "cuda"
    reference = pipeline.txt2img(cpu, **request, save=False).images[0]
    image = pipeline.txt2img(gpu, **request, save=False).images[0]
    assert psnr(image, reference) >= 30
    changed = pipeline.img2img(gpu, **request, init_images=[reference], denoising_strength=0.5, save=False)
    assert changed.images[0].size == (64, 64)


@needs_cuda
def test_gpu_tiled_decode_matches_the_cpu(sd1_file):
    from sdstudio.models import vae as vae_ops

    latents = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(0))
    cpu = load_checkpoint(sd1_file).vae
    gpu = load_checkpoint(sd1_file, device="cuda").vae
    for tiled in (False, True):
        expected = vae_ops.decode(cpu, latents, tiled=tiled, tile=32, overlap=16)
        got = vae_ops.decode(gpu, latents, tiled=tiled, tile=32, overlap=16)
        assert got.device.type == "cpu" and torch.allclose(got, expected, atol=2e-3)


@needs_cuda
def test_gpu_lora_patches_and_embeddings_match_the_cpu(sd1_file, tmp_path):
    """Plain LoRA factors (fused on the GPU), DoRA and IA3 (ΔW made on the CPU, moved) and a bias diff patch the GPU
    weights as they patch the CPU ones; a textual-inversion vector reaches the GPU text encoder."""
    from safetensors.torch import save_file

    from sdstudio.models.embeddings import load_embedding
    from sdstudio.models.lora import AppliedLora, LoraSet

    gen = torch.Generator().manual_seed(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{q}.lora_down.weight": torch.randn(4, 32, generator=gen) * 0.1,
               f"{q}.lora_up.weight": torch.randn(32, 4, generator=gen) * 0.1, f"{q}.alpha": torch.tensor(2.0),
               f"{proj}.diff": torch.randn(32, 32, 1, 1, generator=gen) * 0.1,
               f"{proj}.diff_b": torch.randn(32, generator=gen) * 0.1}, tmp_path / "a.safetensors")
    save_file({f"{k}.weight": torch.randn(32, generator=gen), f"{k}.on_input": torch.tensor(False)},
              tmp_path / "ia3.safetensors")
    save_file({"emb_params": torch.randn(2, 64, generator=gen)}, tmp_path / "shiny.safetensors")
    models = [load_checkpoint(sd1_file), load_checkpoint(sd1_file, device="cuda")]
    for model in models:
        LoraSet(model).apply([AppliedLora(tmp_path / "a.safetensors", 0.7, 0.7),
                              AppliedLora(tmp_path / "ia3.safetensors", 0.5, 0.5)])
    cpu, gpu = (dict(m.unet.named_parameters()) for m in models)
    assert all(torch.allclose(gpu[name].cpu(), cpu[name], atol=1e-5) for name in cpu)
    request = {"prompt": "a shiny cat", "steps": 3, "width": 64, "height": 64, "seed": 5}
    embeddings = [load_embedding(tmp_path / "shiny.safetensors")]
    images = [pipeline.txt2img(m, **request, embeddings=embeddings, save=False).images[0] for m in models]
    plain = pipeline.txt2img(models[1], **request, save=False).images[0]
    assert psnr(images[1], images[0]) >= 30 and psnr(plain, images[1]) < 30


@needs_cuda
def test_gpu_unet_layout_is_the_measured_one(synth_file):
    """Half-precision UNets on a GPU: SD1/SD2 channels-last, SDXL in the file's layout (models/build.py)."""
    sd1 = load_checkpoint(synth_file("sd1"), dtype="fp16", device="cuda").unet
    xl = load_checkpoint(synth_file("sdxl"), dtype="fp16", device="cuda").unet
    assert sd1.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert xl.conv_in.weight.is_contiguous() and not xl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_bf16_model_on_a_cpu_without_native_bf16_math_is_torchs_own(monkeypatch, sd1_file):
    """There the bf16 fast path's fused oneDNN products do not exist (bf16 is emulated): an explicit bf16 load keeps
    torch's own layers, and runs."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdstudio.models import build
    from sdstudio.models.fused import FusedGEGLU
    from sdstudio.models.winograd import WinogradConv2d

    monkeypatch.setattr(build, "native_bf16", lambda: False)
    model = load_checkpoint(sd1_file, dtype=torch.bfloat16)
    for part in (model.unet, model.vae):
        assert {type(p) for p in part.attn_processors.values()} == {AttnProcessor2_0}
        assert not any(isinstance(m, (FusedGEGLU, WinogradConv2d)) for m in part.modules())
    with torch.inference_mode():
        out = model.unet(torch.randn(1, 4, 8, 8).bfloat16(), 500,
                         encoder_hidden_states=torch.randn(1, 77, model.unet.config.cross_attention_dim).bfloat16())
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample).all()
