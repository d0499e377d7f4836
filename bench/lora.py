"""LoRA apply / switch / remove on a full-size synthetic SD1.5: a rank-32 LoRA over every attention projection and
conv of the UNet (kohya names), against a full checkpoint reload (what A1111 pays without in-place patching)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_DIR, diffusers_config_dir, full_checkpoint, machine, run_runner,  # noqa: E402
                    warm_page_cache, write_section)

RANK = 32


def make_lora(model, path: Path, seed: int) -> Path:
    """Rank-32 LoRA on all attention projections, proj_in/out and resnet convs (diffusers-layout kohya names)."""
    if path.exists():
        return path
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.unet.named_parameters():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or param.ndim < 2:
            continue
        if not any(p in module for p in ("attn1.", "attn2.", "proj_in", "proj_out", "conv1", "conv2", "ff.net")):
            continue
        key = "lora_unet_" + module.replace(".", "_")
        out_ch, in_shape = param.shape[0], param.shape[1:]
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, *in_shape, generator=g) * 0.01
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_ch, RANK, *([1, 1] if param.ndim == 4 else []),
                                                       generator=g) * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, path)
    return path


def main() -> None:
    from sdstudio.models.checkpoint import load_checkpoint

    checkpoint = full_checkpoint("sd1", "fp16")
    config = str(diffusers_config_dir(checkpoint))
    warm_page_cache(checkpoint)
    model = load_checkpoint(checkpoint, dtype="fp16")
    a = make_lora(model, BENCH_DIR / "lora-r32-a.safetensors", 1)
    b = make_lora(model, BENCH_DIR / "lora-r32-b.safetensors", 2)
    del model
    files = {"lora_a": str(a), "lora_b": str(b)}
    columns = {
        "sdstudio fp32": run_runner("sdstudio_lora", path=str(checkpoint), precision="fp32", **files),
        "sdstudio --precision float": run_runner("sdstudio_lora", path=str(checkpoint), precision="float", **files),
        "sdstudio --precision auto": run_runner("sdstudio_lora", path=str(checkpoint), precision="auto", **files),
        "diffusers + peft fp32 (load + fuse)": run_runner("diffusers_lora", path=str(checkpoint), config=config,
                                                          precision="fp32", **files),
        "diffusers + peft bf16 (load + fuse)": run_runner("diffusers_lora", path=str(checkpoint), config=config,
                                                          precision="bf16", **files),
    }
    operations = {"read_s": "read the LoRA file", "apply_s": "apply", "same_s": "apply the same set again",
                  "switch_s": "switch to another LoRA",
                  "call_after_switch_s": "then a small UNet call (8×8 latent: int8 packs the switched weights here)",
                  "call_again_s": "the same call again", "remove_s": "remove"}
    rows = ["| operation | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, label in operations.items():
        cells = [r["error"][:60] if "error" in r else (f"{r[key]:.3f}" if key in r else "–")
                 for r in columns.values()]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)
    write_section("LoRA switching (bench/lora.py)", f"{machine()}\n\nCommand: `make bench` or "
                  f"`.venv/bin/python bench/lora.py`. Two rank-{RANK} kohya LoRAs "
                  f"({a.stat().st_size / 2**20:.0f} MiB each) over every attention/conv/ff layer of the full-size "
                  f"SD1.5 UNet (fp16 file), seconds; each column in a fresh process. sdstudio restores the exact "
                  f"original weights on remove.\n\n{table}")


if __name__ == "__main__":
    main()
