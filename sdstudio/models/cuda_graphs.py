"""The UNet on a CUDA GPU through CUDA graphs: a call at one set of input shapes is recorded once and then replayed
each step, so the GPU no longer waits on Python launching a thousand kernels per call (H200, fp16, CFG batch 2, one
UNet call: SD1.5 512² 38–56 ms eager → 10–12 ms replayed, SDXL 1024² 63–87 → 42–44 ms, `bench/gpu_unet.py`; a
20-step image's steps 1.96× / 1.44× diffusers' it/s, `bench/gpu.py`).

A replay reruns the recorded kernels on the recorded memory, so:
- its inputs are copied into buffers the graph owns and its output is copied out at once;
- a graph is keyed by the inputs' shapes and dtypes and by where each weight lives and how it is laid out (a LoRA
  patch gives parameters new tensors, models/patcher.py; then the next key is recorded, and the old graph serves
  again if the weights come back);
- a UNet with hooks on its forward (token merging plans its merges in one) runs eagerly: a replay would skip them;
- a key is recorded the second time it is met (a shape used for one call only never pays for a recording), and at
  most MAX_GRAPHS are kept per UNet, all in one memory pool: replays run one at a time (a lock), and each output is
  copied before the next replay can reuse the pool's memory;
- the pool keeps one UNet call's activations (by the pipeline's estimate 0.2 GiB for SD1.5 512², 0.8 for SDXL
  1024², CFG) from the rest of the job, so graphs are dropped, and the UNet runs eagerly, when recording leaves less
  than a quarter of the GPU's memory free (SDXL on an 8 GB card).
Replayed outputs equal eager ones bit for bit (the same kernels). Anything that fails to record runs eagerly.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAX_GRAPHS = 6   # per UNet: CFG and no-CFG batches, a hires pass, an inpainting model's 9-channel input…
MIN_FREE_AFTER_RECORDING = 0.25   # of the GPU's memory; else no graphs (an 8 GB card with SDXL needs it for the VAE)

Inputs = dict[str, torch.Tensor]   # sample, timestep, encoder_hidden_states[, text_embeds, time_ids]


def unet_forward(unet: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    """`unet(...).sample` for these inputs (on the UNet's device and dtype); replayed from a CUDA graph when the UNet
    is on a GPU and nothing hooks its forward (module docstring), else called directly."""
    if inputs["sample"].device.type != "cuda" or torch.is_grad_enabled() or _hooked(unet):
        return call_unet(unet, inputs)
    graphs = _GRAPHS.get(unet)
    if graphs is None:
        graphs = _GRAPHS.setdefault(unet, UNetGraphs(unet))
    return graphs.run(unet, inputs)


def call_unet(unet: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    """`unet(...).sample`, called directly (what a replay reproduces)."""
    added = {name: inputs[name] for name in ("text_embeds", "time_ids") if name in inputs} or None
    return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs=added).sample


def _hooked(unet: torch.nn.Module) -> bool:
    from torch.nn.modules import module

    return bool(unet._forward_hooks or unet._forward_pre_hooks or module._global_forward_hooks
                or module._global_forward_pre_hooks)


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: Inputs          # the buffers the graph reads
    output: torch.Tensor    # the buffer it writes


class UNetGraphs:
    """The recorded graphs of one UNet (see the module docstring)."""

    def __init__(self, unet: torch.nn.Module):
        self._tensors = list(unet.parameters()) + list(unet.buffers())   # the objects stay; their .data may change
        self._graphs: OrderedDict[tuple, _Recorded] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._pool = None
        self._lock = threading.Lock()
        self.failed = False

    def run(self, unet: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
        key = (tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items()),
               tuple((t.data_ptr(), t.stride()) for t in self._tensors))
        with self._lock, torch.cuda.device(inputs["sample"].device):
            recorded = self._graphs.get(key)
            if recorded is None and not self.failed and key in self._seen:
                recorded = self._record(unet, inputs, key)
            if recorded is None:
                self._seen[key] = None
                while len(self._seen) > 4 * MAX_GRAPHS:
                    self._seen.popitem(last=False)
                return call_unet(unet, inputs)
            self._graphs.move_to_end(key)
            for name, tensor in inputs.items():
                recorded.inputs[name].copy_(tensor)
            recorded.graph.replay()
            return recorded.output.clone()

    def _record(self, unet: torch.nn.Module, inputs: Inputs, key: tuple) -> _Recorded | None:
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                call_unet(unet, static)   # a warm-up on the recording stream (lazy library set-up happens outside)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                output = call_unet(unet, static)
        except RuntimeError as exc:
            log.warning("recording a CUDA graph of the UNet failed (%s); it runs without graphs", exc)
            self.failed = True
            return None
        free, total = torch.cuda.mem_get_info()
        if free < MIN_FREE_AFTER_RECORDING * total:   # the graphs' activations are kept from the VAE and the rest
            log.warning("CUDA graphs of the UNet leave %.1f of %.1f GiB free on the GPU; it runs without graphs",
                        free / 2 ** 30, total / 2 ** 30)
            self._graphs.clear()
            self.failed = True
            del graph, output
            torch.cuda.empty_cache()
            return None
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self._graphs[key] = recorded = _Recorded(graph, static, output)
        return recorded

    def __len__(self) -> int:
        return len(self._graphs)


_GRAPHS: weakref.WeakKeyDictionary[torch.nn.Module, UNetGraphs] = weakref.WeakKeyDictionary()


def recorded_graphs(unet: torch.nn.Module) -> int:
    """How many graphs are kept for this UNet (0 when none were recorded)."""
    graphs = _GRAPHS.get(unet)
    return len(graphs) if graphs is not None else 0
