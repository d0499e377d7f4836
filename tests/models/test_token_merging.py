"""Token merging: the same merges as tomesd (A1111's implementation) and applied only inside the context."""
from __future__ import annotations

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d

from sdstudio.models.token_merging import bipartite_merge, token_merging


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A permutation-equivariant stand-in for self-attention (so token order inside the merged set is free)."""
    return torch.softmax(x @ x.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1) @ x


@pytest.mark.parametrize("height, width, ratio", [(8, 8, 0.5), (6, 10, 0.3), (5, 7, 0.5), (4, 4, 0.9)])
def test_merge_and_unmerge_match_tomesd(height, width, ratio):
    generator = torch.Generator().manual_seed(height * width)
    metric = torch.randn(2, height * width, 16, generator=generator)
    x = torch.randn(2, height * width, 24, generator=generator)
    r = int(height * width * ratio)
    merge, unmerge = bipartite_merge(metric, height, width, r)
    # tomesd takes (w, h); no_rand is A1111's use_rand=False
    their_merge, their_unmerge = bipartite_soft_matching_random2d(metric, width, height, 2, 2, r, no_rand=True)
    ours, theirs = merge(x), their_merge(x)
    sources = height * width - (height // 2) * (width // 2)
    assert ours.shape == theirs.shape == (2, height * width - min(r, sources), 24)
    assert torch.allclose(unmerge(_mix(ours)), their_unmerge(_mix(theirs)), atol=1e-6)


def test_merged_tokens_are_means_and_unmerge_copies_back():
    # 2×2 latent: token 0 is the only destination; token 3 is closest to it, then 1, then 2
    metric = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.1]]])
    x = torch.arange(8.0).view(1, 4, 2)
    merge, unmerge = bipartite_merge(metric, 2, 2, 2)
    merged = merge(x)
    assert torch.equal(merged, torch.tensor([[[4.0, 5.0], (x[0, 0] + x[0, 3] + x[0, 1]) / 3]]))
    assert torch.equal(unmerge(merged), torch.stack([merged[0, 1], merged[0, 1], merged[0, 0], merged[0, 1]])[None])


def test_only_full_resolution_self_attention_runs_on_fewer_tokens_and_only_inside(sd1_model):
    unet = sd1_model.unet
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    tokens = []
    hooks = [m.attn1.to_q.register_forward_hook(lambda mod, args, out: tokens.append(args[0].shape[1]))
             for m in unet.modules() if hasattr(m, "attn1")]
    try:
        with torch.no_grad():
            before = unet(x, t, encoder_hidden_states=context).sample
            plain_tokens, tokens[:] = list(tokens), []
            with token_merging(unet, 0.5):
                merged = unet(x, t, encoder_hidden_states=context).sample
            merged_tokens, tokens[:] = list(tokens), []
            after = unet(x, t, encoder_hidden_states=context).sample
    finally:
        for hook in hooks:
            hook.remove()
    assert plain_tokens.count(256) >= 2 and tokens == plain_tokens                 # 16×16 latent, full resolution
    assert merged_tokens == [128 if n == 256 else n for n in plain_tokens]         # 256 − int(0.5·256)
    assert not torch.equal(merged, before) and torch.equal(after, before)          # hooks and processors removed
