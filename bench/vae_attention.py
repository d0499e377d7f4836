"""The VAE's attention block on the bf16 fast path: blocks of query rows (models/attention.py) against PyTorch's SDPA
kernel (diffusers' own processor), in one process on the full-size random-weight SD1.5 VAE: whole decodes at 512²
and 1024², and at 2048² the decoder's trunk alone (conv_in + mid block: where the attention runs, over every latent
pixel; the tiled up path after it does not change); quality as PSNR against the fp32 decode."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import full_checkpoint, machine, psnr, warm_page_cache, write_section  # noqa: E402

DECODES = (512, 1024)   # whole decodes
TRUNK_ONLY = (2048,)    # the trunk alone: the whole decode takes minutes, the rest of it runs the same either way
ROUNDS = 2              # whole decodes: after one untimed decode, each way in turn, best of ROUNDS


def timed_decode(vae, processor, latents: torch.Tensor, trunk_only: bool) -> tuple[float, torch.Tensor | None]:
    """Seconds to decode `latents` (or only run the decoder's trunk) with `processor` on the attention block, and the
    image (None for the trunk)."""
    from sdstudio.models import vae as vae_ops

    vae.set_attn_processor(processor)
    start = time.perf_counter()
    if trunk_only:
        with torch.inference_mode():
            vae_ops.decoder_trunk(vae, latents.bfloat16() / vae.config.scaling_factor)
        return time.perf_counter() - start, None
    image = vae_ops.decode(vae, latents)
    return time.perf_counter() - start, image


def main() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdstudio.models import vae as vae_ops
    from sdstudio.models.attention import FastCPUAttention
    from sdstudio.models.checkpoint import load_checkpoint
    from sdstudio.models.tuning import native_bf16

    if not native_bf16():
        print("this CPU has no native bf16: the fast path (and this comparison) does not apply")
        return
    path = full_checkpoint("sd1", "fp16")
    warm_page_cache(path)
    vae = load_checkpoint(path, dtype=torch.bfloat16).vae
    exact = load_checkpoint(path, dtype=torch.float32).vae
    ways = {"blocks of rows (sdstudio)": FastCPUAttention(), "PyTorch SDPA (diffusers)": AttnProcessor2_0()}
    rows = ["| decode | " + " s | ".join(ways) + " s | speed-up | PSNR vs fp32 dB (each way) |",
            "|---|---|---|---|---|"]
    for side in DECODES + TRUNK_ONLY:
        latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(1))
        trunk = side in TRUNK_ONLY
        if not trunk:
            timed_decode(vae, ways["blocks of rows (sdstudio)"], latents, trunk)   # oneDNN's first use of the shapes
        runs = [[timed_decode(vae, processor, latents, trunk) for processor in ways.values()]
                for _ in range(1 if trunk else ROUNDS)]
        seconds = [min(r[i][0] for r in runs) for i in range(len(ways))]
        images = [image for _, image in runs[0]]
        quality = "–"
        if side == DECODES[0]:
            reference = vae_ops.decode(exact, latents)
            quality = " / ".join(f"{psnr(image, reference):.1f}" for image in images)
        what = f"{side}² trunk only (conv_in + mid block)" if trunk else f"{side}² whole"
        rows.append(f"| {what} | {seconds[0]:.2f} | {seconds[1]:.2f} | {seconds[1] / seconds[0]:.2f}× | {quality} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    write_section("VAE attention block (bench/vae_attention.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/vae_attention.py`. One process, "
                  "full-size random-weight SD1.5 VAE in bf16 (`--precision auto`); whole decodes: one untimed decode, "
                  f"then each way in turn, best of {ROUNDS}; the trunk: each way once, sdstudio's first (it pays "
                  "oneDNN's first use of the shapes).\n\n" + table)


if __name__ == "__main__":
    main()
