"""Merging LoRAs into a checkpoint: the merged file generates what the base does with the tags."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdstudio import pipeline
from sdstudio.files.catalog import Catalog
from sdstudio.files.readers import read_state_dict
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.lora import LoraNetworks
from tests.helpers import psnr


def make_lora(path, seed):
    g = torch.Generator().manual_seed(seed)
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    t = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    save_file({f"{k}.lora_down.weight": torch.randn(4, 64, generator=g) * 0.2,
               f"{k}.lora_up.weight": torch.randn(64, 4, generator=g) * 0.2,
               f"{t}.lora_down.weight": torch.randn(4, 64, generator=g) * 0.2,
               f"{t}.lora_up.weight": torch.randn(256, 4, generator=g) * 0.2}, path)


def test_merged_checkpoint_equals_base_with_tags(sd1_file, tmp_path):
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    make_lora(lora_dir / "one.safetensors", 1)
    make_lora(lora_dir / "two.safetensors", 2)
    out = tmp_path / "merged.safetensors"
    result = subprocess.run([sys.executable, "-m", "sdstudio.cli", "merge-lora", str(sd1_file), "--lora", "one:0.8",
                             "--lora", f"{lora_dir / 'two.safetensors'}:0.5", "-o", str(out), "--data-dir",
                             str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    base_sd, merged_sd = read_state_dict(sd1_file), read_state_dict(out)
    assert merged_sd.keys() == base_sd.keys()
    assert all(merged_sd[k].dtype == base_sd[k].dtype for k in base_sd)
    changed = [k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])]
    assert sorted(changed) == sorted([
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"])
    with safe_open(out, "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert [(l["name"], l["weight"]) for l in recipe["loras"]] == [("one.safetensors", 0.8), ("two.safetensors", 0.5)]

    kwargs = dict(seed=5, width=64, height=64, steps=4, save=False)
    base = load_checkpoint(sd1_file)
    with_tags = pipeline.txt2img(base, prompt="a cat <lora:one:0.8> <lora:two:0.5>",
                                 networks=LoraNetworks(base, Catalog(tmp_path)), **kwargs)
    merged = pipeline.txt2img(load_checkpoint(out), prompt="a cat", **kwargs)
    plain = pipeline.txt2img(base, prompt="a cat", networks=LoraNetworks(base, Catalog(tmp_path)), **kwargs)
    assert psnr(merged.images[0], with_tags.images[0]) >= 40
    assert psnr(plain.images[0], with_tags.images[0]) < 40
