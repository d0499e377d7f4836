"""WeightPatcher on plain tensors: W₀ + Σ strength·ΔW, only changed parameters rewritten, restore bit-exact."""
from __future__ import annotations

import pytest
import torch

from sdstudio.models.patcher import Patch, WeightPatcher


def ones(w):
    return torch.ones_like(w)


def test_restores_half_precision_bits():
    weight = torch.randn(8, 8).half()
    original = weight.clone()
    patcher = WeightPatcher({"w": weight})
    patcher.set_patches({"w": [Patch("x", 0.5, ones)]})
    assert not torch.equal(weight, original) and weight.dtype == torch.float16
    patcher.restore()
    assert torch.equal(weight, original) and patcher.patched == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_switch_then_restore_keeps_the_original_untouched(dtype):
    weight = torch.nn.Parameter(torch.randn(6, 8).to(dtype), requires_grad=False)
    original = weight.detach().clone()
    a, b = torch.randn(6, 2), torch.randn(2, 8)
    patcher = WeightPatcher({"w": weight})
    patcher.set_patches({"w": [Patch("x", 0.5, lambda w: a @ b, (a, b))]})
    tolerance = 1e-2 if dtype == torch.float16 else 1e-6
    assert torch.allclose(weight.float(), original.float() + 0.5 * a @ b, atol=tolerance)
    patcher.set_patches({"w": [Patch("y", 2.0, ones), Patch("x", 1.0, lambda w: a @ b, (a, b))]})
    assert torch.allclose(weight.float(), original.float() + 2 + a @ b, atol=tolerance * 10)
    patcher.restore()
    assert torch.equal(weight, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_channels_last_conv_weight_is_patched_by_its_logical_layout_and_stays_channels_last(dtype):
    weight = torch.randn(6, 4, 3, 3).to(dtype).to(memory_format=torch.channels_last)   # the fast path's conv layout
    original = weight.clone()
    a, b = torch.randn(6, 2), torch.randn(2, 4 * 3 * 3)
    patcher = WeightPatcher({"w": weight})
    patcher.set_patches({"w": [Patch("x", 0.5, lambda w: (a @ b).reshape(w.shape), (a, b))]})
    patched = patcher.parameters["w"]
    expected = (original.float() + 0.5 * (a @ b).reshape(6, 4, 3, 3)).to(dtype)
    assert torch.equal(patched.data, expected) and patched.is_contiguous(memory_format=torch.channels_last)
    patcher.set_patches({"w": [Patch("y", 1.0, lambda w: torch.ones_like(w))]})    # the delta path too
    assert torch.equal(patched.data, (original.float() + 1).to(dtype))
    patcher.restore()
    assert torch.equal(patched.data, original)


def test_delta_is_computed_in_fp32_from_the_original_and_added_in_the_weights_dtype():
    weight = torch.full((4,), 1.0, dtype=torch.bfloat16)
    seen = []

    def delta(w):
        seen.append(w.dtype)
        return torch.full_like(w, 1e-3)                 # 1 + 1e-3·1000 in fp32, not 1000 rounded bf16 steps
    patcher = WeightPatcher({"w": weight})
    patcher.set_patches({"w": [Patch(k, 1.0, delta) for k in range(1000)]})
    assert seen == [torch.float32] * 1000 and weight.dtype == torch.bfloat16
    assert torch.equal(weight, torch.full((4,), 2.0, dtype=torch.bfloat16))


def test_only_changed_parameters_are_rewritten_and_zero_strength_is_the_original():
    tensors = {name: torch.randn(3, 3) for name in "abc"}
    originals = {k: v.clone() for k, v in tensors.items()}
    patcher = WeightPatcher(tensors)
    calls = []

    def counted(w):
        calls.append(1)
        return torch.ones_like(w)
    assert patcher.set_patches({"a": [Patch("x", 1.0, counted)], "b": [Patch("x", 1.0, counted)]}) == 2
    assert patcher.set_patches({"a": [Patch("x", 1.0, counted)], "b": [Patch("x", 0.5, counted)]}) == 1
    assert len(calls) == 3 and torch.equal(tensors["c"], originals["c"])
    assert torch.allclose(tensors["b"], originals["b"] + 0.5)
    patcher.set_patches({"a": [Patch("x", 0.0, counted)]})
    assert torch.equal(tensors["a"], originals["a"]) and torch.equal(tensors["b"], originals["b"])
    assert patcher.patched == ["a"]


def test_half_precision_weights_of_any_sizes_share_scratch_buffers_and_a_switch_reuses_the_patched_buffer():
    weights = {"big": torch.randn(16, 32).bfloat16(), "small": torch.randn(4, 8).bfloat16(),
               "conv": torch.randn(8, 4, 3, 3).bfloat16().to(memory_format=torch.channels_last)}
    originals = {name: w.clone() for name, w in weights.items()}
    patcher = WeightPatcher(dict(weights))

    def patches(strength):
        return {name: [Patch("x", strength, lambda w: torch.full_like(w, 1.5))] for name in weights}

    patcher.set_patches(patches(1.0))
    first = {name: patcher.parameters[name].data for name in weights}
    for name, original in originals.items():
        assert torch.equal(first[name], (original.float() + 1.5).bfloat16()), name
    patcher.set_patches(patches(-2.0))
    for name, original in originals.items():
        now = patcher.parameters[name].data
        assert torch.equal(now, (original.float() - 3.0).bfloat16()), name
        assert now.data_ptr() == first[name].data_ptr() and now.stride() == original.stride(), name
    patcher.restore()
    assert all(torch.equal(patcher.parameters[n].data, o) for n, o in originals.items())


@pytest.mark.parametrize("shape,dtype,channels_last", [((24, 8, 3, 3), torch.bfloat16, True),
                                                       ((40, 16), torch.float32, False),
                                                       ((40, 16), torch.bfloat16, False)])
def test_low_rank_patches_merge_by_blocks_of_rows_in_the_weights_memory_order(monkeypatch, shape, dtype,
                                                                              channels_last):
    """LoRA factors merge a block of output rows at a time (a channels-last convolution's B reordered to its memory
    order): blocks of one row and of several, with a partial last one, give W₀ + Σ strength·A@B rounded once."""
    from sdstudio.models import patcher as patcher_module
    monkeypatch.setattr(patcher_module, "MERGE_BLOCK", 100)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(dtype)
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    original = weight.clone()
    width = weight.numel() // shape[0]
    factors = [(torch.randn(shape[0], 4, generator=generator), torch.randn(4, width, generator=generator))
               for _ in range(2)]
    patches = [Patch(k, s, lambda w: None, f) for k, s, f in (("x", 0.5, factors[0]), ("y", -1.5, factors[1]))]

    def exact(chosen):
        return original.double() + sum(p.strength * (p.factors[0].double() @ p.factors[1].double()).reshape(shape)
                                       for p in chosen)

    patcher = WeightPatcher({"w": weight})
    for chosen in (patches, patches[1:]):                  # apply, then switch (into the same buffer)
        patcher.set_patches({"w": chosen})
        patched = patcher.parameters["w"].data
        assert patched.stride() == original.stride()
        if dtype == torch.float32:
            assert torch.allclose(patched.double(), exact(chosen), rtol=1e-5, atol=1e-5)
        else:   # fp32 sums rounded once into bf16: all but rare ties agree with the exact sum rounded, none by more
            want = exact(chosen).to(dtype)
            assert (patched == want).float().mean() > 0.98
            assert ((patched.float() - want.float()).abs() <= want.float().abs() * 2 ** -7).all()
    patcher.restore()
    assert torch.equal(patcher.parameters["w"].data, original)
