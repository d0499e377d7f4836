"""CUDA graphs of the UNet (models/cuda_graphs.py): replays equal eager calls bit for bit, follow LoRA patches and
keep off when token merging hooks the UNet. The GPU checks run only where torch sees a CUDA GPU."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdstudio import pipeline
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models import cuda_graphs
from sdstudio.models.cuda_graphs import call_unet, recorded_graphs, unet_forward
from sdstudio.models.lora import AppliedLora, LoraSet
from sdstudio.models.token_merging import token_merging

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU on this machine")


def unet_inputs(unet: torch.nn.Module, batch: int = 2, side: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {"sample": torch.randn(batch, 4, side, side, generator=gen), "timestep": torch.full((batch,), 500.0),
              "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)}
    return {name: t.to(unet.device, unet.dtype) for name, t in inputs.items()}


def test_on_the_cpu_the_unet_is_called_directly(sd1_model):
    inputs = unet_inputs(sd1_model.unet)
    with torch.inference_mode():
        assert torch.equal(unet_forward(sd1_model.unet, inputs), sd1_model.unet(
            inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample)
    assert recorded_graphs(sd1_model.unet) == 0


@needs_cuda
def test_replays_equal_eager_calls_and_are_recorded_per_shape(sd1_file):
    unet = load_checkpoint(sd1_file, dtype="fp16", device="cuda").unet
    with torch.inference_mode():
        for side, seeds in ((8, (0, 1, 2, 3)), (16, (4, 5, 6))):
            for seed in seeds:
                inputs = unet_inputs(unet, side=side, seed=seed)
                assert torch.equal(unet_forward(unet, inputs), call_unet(unet, inputs))
        assert recorded_graphs(unet) == 2   # each shape recorded at its second call


@needs_cuda
def test_replays_follow_lora_patches(sd1_file, tmp_path):
    model = load_checkpoint(sd1_file, dtype="fp16", device="cuda")
    gen = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 32, generator=gen),
               f"{name}.lora_up.weight": torch.randn(32, 4, generator=gen)}, tmp_path / "a.safetensors")
    inputs = unet_inputs(model.unet)
    with torch.inference_mode():
        plain = [unet_forward(model.unet, inputs) for _ in range(3)]
        LoraSet(model).apply([AppliedLora(tmp_path / "a.safetensors", 1.0, 1.0)])
        patched = [unet_forward(model.unet, inputs) for _ in range(3)]
        assert all(torch.equal(p, call_unet(model.unet, inputs)) for p in patched)
        assert not torch.equal(patched[-1], plain[-1])
        LoraSet(model).apply([])
        assert torch.equal(unet_forward(model.unet, inputs), plain[0])
    assert recorded_graphs(model.unet) == 2


@needs_cuda
def test_token_merging_runs_eagerly_and_generation_repeats_exactly(sd1_file):
    model = load_checkpoint(sd1_file, dtype="fp16", device="cuda")
    inputs = unet_inputs(model.unet, side=16)
    with torch.inference_mode(), token_merging(model.unet, 0.5):
        merged = [unet_forward(model.unet, inputs) for _ in range(3)]
        eager = call_unet(model.unet, inputs)   # close, not equal: merging averages by atomic adds on a GPU
        assert all(torch.allclose(m, eager, atol=1e-2, rtol=1e-2) for m in merged)
    assert recorded_graphs(model.unet) == 0
    request = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 7, "save": False}
    first, second = (pipeline.txt2img(model, **request).images[0] for _ in range(2))
    assert recorded_graphs(model.unet) == 1 and list(first.getdata()) == list(second.getdata())


@needs_cuda
def test_no_graphs_when_recording_leaves_too_little_gpu_memory(sd1_file, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MIN_FREE_AFTER_RECORDING", 1.0)   # no GPU has all its memory free
    unet = load_checkpoint(sd1_file, dtype="fp16", device="cuda").unet
    inputs = unet_inputs(unet)
    with torch.inference_mode():
        assert all(torch.equal(unet_forward(unet, inputs), call_unet(unet, inputs)) for _ in range(4))
    assert recorded_graphs(unet) == 0
