"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023) the way A1111 applies it for its "Token merging
ratio" option (tomesd with merge_attn only, fixed 2×2 windows, no randomness, highest resolution only).

In each transformer block at the UNet's full latent resolution, before self-attention: every 2×2 window's top-left
token is a destination, the other tokens are sources; the `ratio`·N sources most similar (cosine of the block's
input) to some destination are averaged into it, self-attention runs on the N − r tokens left, and its output is
copied back to all N positions (a merged source takes its destination's output). At 512² SD1.5 that is 4096 → 2048
tokens at ratio 0.5: the attention at that level does a quarter of the work. The image changes (less so at small
ratios); SDXL has no transformer blocks at full resolution, so it is unaffected, as in A1111. Cross-attention and
feed-forward are untouched. Applied per job by `token_merging()` (hooks and processor wrappers, removed after).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from diffusers.models.attention import BasicTransformerBlock

WINDOW = 2   # tomesd sx = sy = 2: one destination per 2×2 window

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_merge(metric: torch.Tensor, height: int, width: int, r: int) -> tuple[Merge, Merge]:
    """(merge, unmerge) for (B, height·width, C) tokens in row-major order: merge averages the r sources most
    similar to a destination into it, (B, N, C) → (B, N − r, C); unmerge copies results back, (B, N − r, C) →
    (B, N, C)."""
    batch, tokens, _ = metric.shape
    is_destination = torch.zeros(height, width, dtype=torch.bool, device=metric.device)
    is_destination[:height - height % WINDOW:WINDOW, :width - width % WINDOW:WINDOW] = True
    destinations = is_destination.flatten().nonzero().squeeze(1)          # (D,) token positions
    sources = (~is_destination).flatten().nonzero().squeeze(1)            # (S,)
    r = min(r, len(sources))
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, sources] @ unit[:, destinations].transpose(1, 2)  # (B, S, D) cosine similarities
        best, best_destination = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
    merged, kept = sources[order[:, :r]], sources[order[:, r:]]           # (B, r), (B, S − r) token positions
    into = best_destination.gather(1, order[:, :r])                       # (B, r) destination slots

    def expand(index: torch.Tensor, channels: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, channels)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        pooled = x[:, destinations].scatter_reduce(1, expand(into, c), x.gather(1, expand(merged, c)), reduce="mean")
        return torch.cat([x.gather(1, expand(kept, c)), pooled], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        unmerged, pooled = x[:, :kept.shape[1]], x[:, kept.shape[1]:]
        out = x.new_empty(batch, tokens, c)
        out[:, destinations] = pooled
        out.scatter_(1, expand(kept, c), unmerged)
        out.scatter_(1, expand(merged, c), pooled.gather(1, expand(into, c)))
        return out

    return merge, unmerge


class _MergingSelfAttention:
    """attn1 processor wrapper: merge → the block's own processor → unmerge, when its block set a plan."""

    def __init__(self, inner):
        self.inner = inner
        self.plan: tuple[Merge, Merge] | None = None

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.plan is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        merge, unmerge = self.plan
        self.plan = None
        return unmerge(self.inner(attn, merge(hidden_states), *args, **kwargs))


@contextlib.contextmanager
def token_merging(unet: torch.nn.Module, ratio: float) -> Iterator[None]:
    """Inside, the self-attention of `unet`'s full-resolution transformer blocks runs on merged tokens (A1111
    "Token merging ratio" `ratio`, 0 = off)."""
    blocks = [] if ratio <= 0 else [m for m in unet.modules()
                                    if isinstance(m, BasicTransformerBlock) and not m.only_cross_attention]
    if not blocks:
        yield
        return
    latent: dict[str, tuple[int, int]] = {}

    def note_size(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        latent["size"] = tuple(sample.shape[-2:])

    def plan_merge(block, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        height, width = latent["size"]
        if x.ndim == 3 and x.shape[1] == height * width:
            block.attn1.processor.plan = bipartite_merge(x, height, width, int(x.shape[1] * ratio))

    handles = [unet.register_forward_pre_hook(note_size, with_kwargs=True)]
    originals = [block.attn1.processor for block in blocks]
    try:
        for block in blocks:
            block.attn1.processor = _MergingSelfAttention(block.attn1.processor)
            handles.append(block.register_forward_pre_hook(plan_merge, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block, original in zip(blocks, originals):
            block.attn1.processor = original
