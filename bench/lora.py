"""LoRA apply / switch / remove on a full-size synthetic SD1.5: a rank-32 LoRA over every attention projection and
conv of the UNet (kohya names), against a full checkpoint reload (what A1111 pays without in-place patching)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import BENCH_DIR, full_sd15, machine, warm_page_cache, write_section  # noqa: E402

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
    from sdstudio.models.lora import AppliedLora, LoraSet

    checkpoint = full_sd15("pruned")
    warm_page_cache(checkpoint)
    model = load_checkpoint(checkpoint)
    a = make_lora(model, BENCH_DIR / "lora-r32-a.safetensors", 1)
    b = make_lora(model, BENCH_DIR / "lora-r32-b.safetensors", 2)
    loras = LoraSet(model)
    loras.read(a), loras.read(b)   # file reading is measured separately below

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    read = timed(lambda: LoraSet(model).read(a))
    apply = timed(lambda: loras.apply([AppliedLora(a, 1.0, 1.0)]))
    same = timed(lambda: loras.apply([AppliedLora(a, 1.0, 1.0)]))
    switch = timed(lambda: loras.apply([AppliedLora(b, 1.0, 1.0)]))
    remove = timed(lambda: loras.apply([]))

    def reload() -> None:
        fresh = load_checkpoint(checkpoint)
        with torch.no_grad():
            for p in fresh.unet.parameters():
                p.detach().reshape(-1)[::512].sum()

    full = timed(reload)
    rows = ["| operation | seconds |", "|---|---|",
            f"| read the LoRA file ({a.stat().st_size / 2**20:.0f} MiB, {len(loras.read(a).adapters)} modules) | {read:.2f} |",
            f"| apply | {apply:.2f} |", f"| apply the same set again | {same:.3f} |",
            f"| switch to another LoRA | {switch:.2f} |", f"| remove (exact restore) | {remove:.2f} |",
            f"| full checkpoint reload + touch (A1111-style) | {full:.2f} |"]
    table = "\n".join(rows)
    print(table)
    write_section("LoRA switching (bench/lora.py)", f"{machine()}\n\nCommand: `make bench` or "
                  f"`.venv/bin/python bench/lora.py`. Rank {RANK}, every attention/conv/ff layer of a full-size "
                  f"SD1.5 UNet, fp32.\n\n{table}")


if __name__ == "__main__":
    main()
