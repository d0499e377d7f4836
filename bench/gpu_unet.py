"""One UNet CFG call (batch 2, fp16) of sdstudio's loaded model on a CUDA GPU, ms, synchronised each: eager, a bare
CUDA graph replay, and `unet_forward` (sdstudio's graphs: key, input copies, output copy), with the file's (NCHW)
weights and with channels-last ones. Prints only; without a CUDA GPU it says so and measures nothing."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import full_checkpoint  # noqa: E402


def ms_per_call(fn, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bare_graph(call):
    """call() recorded as a CUDA graph; its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def measure(family: str, side: int) -> None:
    from sdstudio.models.checkpoint import load_checkpoint
    from sdstudio.models.cuda_graphs import call_unet, unet_forward

    unet = load_checkpoint(full_checkpoint(family, "fp16"), dtype=torch.float16, device="cuda").unet
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, side // 8, side // 8, device="cuda", generator=gen),
              "timestep": torch.tensor([500.0, 500.0], device="cuda"),
              "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda",
                                                   generator=gen)}
    if unet.config.addition_embed_type == "text_time":
        inputs |= {"text_embeds": torch.randn(2, 1280, device="cuda", generator=gen),
                   "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, device="cuda")}
    inputs = {name: t.half() for name, t in inputs.items()}
    print(f"{family} {side}², one UNet CFG call, ms (eager / bare graph replay / unet_forward):")
    with torch.inference_mode():
        for layout in ("file layout (NCHW)", "channels-last weights"):
            if layout.startswith("channels"):
                unet.to(memory_format=torch.channels_last)
            eager = ms_per_call(lambda: call_unet(unet, inputs))
            replay = ms_per_call(bare_graph(lambda: call_unet(unet, inputs)))
            ours = ms_per_call(lambda: unet_forward(unet, inputs))
            print(f"  {layout}: {eager:.2f} / {replay:.2f} / {ours:.2f}")


def main() -> None:
    if not torch.cuda.is_available():
        print("bench/gpu_unet.py: torch sees no CUDA GPU here; nothing measured")
        return
    measure("sd1", 512)
    measure("sdxl", 1024)


if __name__ == "__main__":
    main()
