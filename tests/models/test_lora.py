"""LoRA/LyCORIS formats applied to a tiny real-layout model: each format's formula, exact restore, sums, bad input.
The reference ΔW of every test is computed here from the format's published formula, independently of the code."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sdstudio import pipeline
from sdstudio.errors import ModelFileError, UnsafeFileError
from sdstudio.files.catalog import Catalog
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.lora import AppliedLora, LoraNetworks, LoraSet, compatibility, lora_info, read_lora

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"          # Linear [32, 32]
CONV = "down_blocks.0.resnets.0.conv1.weight"                                    # Conv [32, 32, 3, 3]
TE_Q = "encoder.layers.0.self_attn.q_proj.weight"                                # CLIP-L Linear [64, 64]
KQ = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KCONV = "lora_unet_down_blocks_0_resnets_0_conv1"
KTE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed)) * 0.1


@pytest.fixture()
def model(sd1_file):
    return load_checkpoint(sd1_file)


def unet_param(model, name):
    return dict(model.unet.named_parameters())[name]


def applied(model, path, weight=0.7, te=None):
    report = LoraSet(model).apply([AppliedLora(path, te if te is not None else weight, weight)])
    return report


def check(model, base, name, expected_delta, weight=0.7, module="unet"):
    params = dict(model.unet.named_parameters()) if module == "unet" else dict(
        model.text_encoders[0].model.named_parameters())
    assert (params[name].detach() - (base + weight * expected_delta)).abs().max() <= 1e-5


def test_lora_linear_and_locon_conv_with_alpha(model, tmp_path):
    down, up = rand(4, 32, seed=1), rand(32, 4, seed=2)
    cdown, cup = rand(2, 32, 3, 3, seed=3), rand(32, 2, 1, 1, seed=4)
    save_file({f"{KQ}.lora_down.weight": down, f"{KQ}.lora_up.weight": up, f"{KQ}.alpha": torch.tensor(2.0),
               f"{KCONV}.lora_down.weight": cdown, f"{KCONV}.lora_up.weight": cup}, tmp_path / "a.safetensors")
    q0, c0 = unet_param(model, Q).detach().clone(), unet_param(model, CONV).detach().clone()
    report = applied(model, tmp_path / "a.safetensors")
    assert report.unmatched == {}
    check(model, q0, Q, (up @ down) * (2.0 / 4))
    expected_conv = torch.einsum("or,rihw->oihw", cup[:, :, 0, 0], cdown)   # no alpha: scale 1
    check(model, c0, CONV, expected_conv)


def test_locon_cp_decomposition(model, tmp_path):
    down, mid, up = rand(3, 32, 1, 1, seed=1), rand(3, 3, 3, 3, seed=2), rand(32, 3, 1, 1, seed=3)
    save_file({f"{KCONV}.lora_down.weight": down, f"{KCONV}.lora_mid.weight": mid, f"{KCONV}.lora_up.weight": up,
               f"{KCONV}.alpha": torch.tensor(3.0)}, tmp_path / "cp.safetensors")
    c0 = unet_param(model, CONV).detach().clone()
    applied(model, tmp_path / "cp.safetensors")
    expected = torch.zeros(32, 32, 3, 3)
    for o in range(32):
        for i in range(32):
            expected[o, i] = sum(up[o, m, 0, 0] * down[n, i, 0, 0] * mid[m, n] for m in range(3) for n in range(3))
    check(model, c0, CONV, expected)


def test_loha_plain_and_tucker(model, tmp_path):
    w1a, w1b, w2a, w2b = rand(32, 4, seed=1), rand(4, 32, seed=2), rand(32, 4, seed=3), rand(4, 32, seed=4)
    t1, t2 = rand(4, 4, 3, 3, seed=5), rand(4, 4, 3, 3, seed=6)
    c1a, c1b, c2a, c2b = rand(4, 32, seed=7), rand(4, 32, seed=8), rand(4, 32, seed=9), rand(4, 32, seed=10)
    save_file({f"{KQ}.hada_w1_a": w1a, f"{KQ}.hada_w1_b": w1b, f"{KQ}.hada_w2_a": w2a, f"{KQ}.hada_w2_b": w2b,
               f"{KQ}.alpha": torch.tensor(8.0),
               f"{KCONV}.hada_w1_a": c1a, f"{KCONV}.hada_w1_b": c1b, f"{KCONV}.hada_w2_a": c2a,
               f"{KCONV}.hada_w2_b": c2b, f"{KCONV}.hada_t1": t1, f"{KCONV}.hada_t2": t2},
              tmp_path / "loha.safetensors")
    q0, c0 = unet_param(model, Q).detach().clone(), unet_param(model, CONV).detach().clone()
    applied(model, tmp_path / "loha.safetensors")
    check(model, q0, Q, (w1a @ w1b) * (w2a @ w2b) * 2.0)
    # Tucker: factor[p, r, k, l] = Σ_ij t[i, j, k, l] · b[j, r] · a[i, p]   (a = "_a" transposed layout [rank, out])
    f1 = torch.einsum("ijkl,jr,ip->prkl", t1, c1b, c1a)
    f2 = torch.einsum("ijkl,jr,ip->prkl", t2, c2b, c2a)
    check(model, c0, CONV, f1 * f2)


@pytest.mark.parametrize("layout", ["full", "w1_decomposed", "w2_decomposed", "w2_tucker"])
def test_lokr_variants(model, tmp_path, layout):
    w1 = rand(4, 4, seed=1)
    w2 = rand(8, 8, seed=2)
    keys = {}
    if layout == "w1_decomposed":
        a, b = rand(4, 2, seed=3), rand(2, 4, seed=4)
        keys.update({"lokr_w1_a": a, "lokr_w1_b": b, "lokr_w2": w2, "alpha": torch.tensor(1.0)})
        expected = torch.kron(a @ b, w2) * 0.5
    elif layout == "w2_decomposed":
        a, b = rand(8, 2, seed=3), rand(2, 8, seed=4)
        keys.update({"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "alpha": torch.tensor(4.0)})
        expected = torch.kron(w1, a @ b) * 2.0
    elif layout == "w2_tucker":
        a, b, t = rand(2, 8, seed=3), rand(2, 8, seed=4), rand(2, 2, 3, 3, seed=5)
        keys.update({"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "lokr_t2": t})
        w2t = torch.einsum("ijkl,jr,ip->prkl", t, b, a).contiguous()
        expected = torch.kron(w1[:, :, None, None], w2t)
    else:
        keys.update({"lokr_w1": w1, "lokr_w2": w2})
        expected = torch.kron(w1, w2)
    key, name = (KCONV, CONV) if layout == "w2_tucker" else (KQ, Q)
    save_file({f"{key}.{k}": v for k, v in keys.items()}, tmp_path / "lokr.safetensors")
    base = unet_param(model, name).detach().clone()
    applied(model, tmp_path / "lokr.safetensors")
    check(model, base, name, expected.reshape(base.shape))


def test_full_diff_and_ia3(model, tmp_path):
    diff, diff_b = rand(32, 32, seed=1), rand(32, seed=2)
    bias_name = Q.replace(".weight", ".bias")
    proj = "down_blocks.0.attentions.0.proj_in"
    save_file({f"{KQ}.diff": diff, "lora_unet_down_blocks_0_attentions_0_proj_in.diff": rand(32, 32, 1, 1, seed=3),
               "lora_unet_down_blocks_0_attentions_0_proj_in.diff_b": diff_b}, tmp_path / "full.safetensors")
    q0 = unet_param(model, Q).detach().clone()
    b0 = unet_param(model, proj + ".bias").detach().clone()
    applied(model, tmp_path / "full.safetensors", weight=1.0)
    check(model, q0, Q, diff, weight=1.0)
    assert torch.allclose(unet_param(model, proj + ".bias").detach(), b0 + diff_b, atol=1e-6)
    assert bias_name not in dict(model.unet.named_parameters())  # to_q has no bias
    fresh = load_checkpoint(model.path)
    scale = rand(32, seed=4)
    save_file({f"{KQ}.weight": scale, f"{KQ}.on_input": torch.tensor(False)}, tmp_path / "ia3.safetensors")
    applied(fresh, tmp_path / "ia3.safetensors", weight=0.5)
    check(fresh, q0, Q, q0 * scale[:, None], weight=0.5)


def test_dora_decomposes_the_merged_weight(model, tmp_path):
    down, up, magnitude = rand(4, 32, seed=1), rand(32, 4, seed=2), rand(1, 32, seed=3).abs() + 1
    save_file({f"{KQ}.lora_down.weight": down, f"{KQ}.lora_up.weight": up, f"{KQ}.dora_scale": magnitude},
              tmp_path / "dora.safetensors")
    q0 = unet_param(model, Q).detach().clone()
    applied(model, tmp_path / "dora.safetensors", weight=0.7)
    merged = q0 + up @ down
    column_norms = torch.sqrt((merged ** 2).sum(dim=0, keepdim=True))
    check(model, q0, Q, merged * magnitude / column_norms - q0)


def test_peft_and_old_diffusers_spellings_and_original_layout_names(model, tmp_path):
    a, b = rand(4, 32, seed=1), rand(32, 4, seed=2)
    peft = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{peft}.lora_A.weight": a, f"{peft}.lora_B.weight": b}, tmp_path / "peft.safetensors")
    old = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    save_file({f"{old}.down.weight": a, f"{old}.up.weight": b}, tmp_path / "old.safetensors")
    original = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"   # SD1 level 0, first attention
    save_file({f"{original}.lora_down.weight": a, f"{original}.lora_up.weight": b}, tmp_path / "orig.safetensors")
    te_a, te_b = rand(4, 64, seed=3), rand(64, 4, seed=4)
    save_file({f"{KTE}.lora_down.weight": te_a, f"{KTE}.lora_up.weight": te_b, f"{KTE}.alpha": torch.tensor(4.0)},
              tmp_path / "te.safetensors")
    q0 = unet_param(model, Q).detach().clone()
    te0 = dict(model.text_encoders[0].model.named_parameters())[TE_Q].detach().clone()
    for name in ("peft", "old", "orig"):
        fresh = load_checkpoint(model.path)
        report = applied(fresh, tmp_path / f"{name}.safetensors")
        assert report.unmatched == {}, name
        check(fresh, q0, Q, b @ a)
    applied(model, tmp_path / "te.safetensors", weight=0.25, te=0.5)
    check(model, te0, TE_Q, te_b @ te_a, weight=0.5, module="te")


def test_sdxl_te1_te2_names(synth_file, tmp_path):
    sdxl = load_checkpoint(synth_file("sdxl", "pruned"))
    a, b = rand(4, 64, seed=1), rand(64, 4, seed=2)
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": a,
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": b,
               "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": a.clone(),
               "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": rand(256, 4, seed=3)},
              tmp_path / "xl.safetensors")
    l0 = dict(sdxl.text_encoders[0].model.named_parameters())[TE_Q].detach().clone()
    g_name = "text_model.encoder.layers.1.mlp.fc1.weight"
    g0 = dict(sdxl.text_encoders[1].model.named_parameters())[g_name].detach().clone()
    report = LoraSet(sdxl).apply([AppliedLora(tmp_path / "xl.safetensors", 1.0, 1.0)])
    assert report.unmatched == {} and report.warnings == []
    assert (dict(sdxl.text_encoders[0].model.named_parameters())[TE_Q] - (l0 + b @ a)).abs().max() < 1e-5
    assert (dict(sdxl.text_encoders[1].model.named_parameters())[g_name] - (g0 + rand(256, 4, seed=3) @ a)
            ).abs().max() < 1e-5


def test_a1111_compvis_text_encoder_names_sd2_and_sd1(synth_file, model, tmp_path):
    sd2 = load_checkpoint(synth_file("sd2", "pruned"))
    params = dict(sd2.text_encoders[0].model.named_parameters())
    q, fc1 = "text_model.encoder.layers.1.self_attn.k_proj.weight", "text_model.encoder.layers.0.mlp.fc1.weight"
    width, hidden = params[q].shape[1], params[fc1].shape[0]
    a, b, c = rand(2, width, seed=1), rand(width, 2, seed=2), rand(hidden, 2, seed=3)
    save_file({"model_transformer_resblocks_1_attn_k_proj.lora_down.weight": a,       # A1111's SD2 module names
               "model_transformer_resblocks_1_attn_k_proj.lora_up.weight": b,
               "lora_te_model_transformer_resblocks_0_mlp_c_fc.lora_down.weight": a.clone(),
               "lora_te_model_transformer_resblocks_0_mlp_c_fc.lora_up.weight": c}, tmp_path / "sd2.safetensors")
    q0, fc0 = params[q].detach().clone(), params[fc1].detach().clone()
    report = LoraSet(sd2).apply([AppliedLora(tmp_path / "sd2.safetensors", 0.5, 1.0)])
    assert report.unmatched == {} and report.warnings == []
    assert (params[q].detach() - (q0 + 0.5 * b @ a)).abs().max() <= 1e-5
    assert (params[fc1].detach() - (fc0 + 0.5 * c @ a)).abs().max() <= 1e-5
    te_a, te_b = rand(4, 64, seed=3), rand(64, 4, seed=4)
    sd1_name = "transformer_text_model_encoder_layers_0_self_attn_q_proj"                 # A1111's SD1 module name
    save_file({f"{sd1_name}.lora_down.weight": te_a, f"{sd1_name}.lora_up.weight": te_b}, tmp_path / "sd1.safetensors")
    te0 = dict(model.text_encoders[0].model.named_parameters())[TE_Q].detach().clone()
    assert applied(model, tmp_path / "sd1.safetensors", te=0.5).unmatched == {}
    check(model, te0, TE_Q, te_b @ te_a, weight=0.5, module="te")


def test_four_channel_conv_in_delta_is_zero_padded_on_inpainting_models(synth_file, tmp_path):
    inpaint = load_checkpoint(synth_file("sd1-inpaint", "pruned"))
    weight = inpaint.unet.conv_in.weight                                                  # [32, 9, 3, 3]
    down, up = rand(2, 4, 3, 3, seed=1), rand(weight.shape[0], 2, 1, 1, seed=2)
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up},
              tmp_path / "conv_in.safetensors")
    w0 = weight.detach().clone()
    assert applied(inpaint, tmp_path / "conv_in.safetensors", weight=0.5).unmatched == {}
    expected = torch.zeros_like(w0)
    expected[:, :4] = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    assert (inpaint.unet.conv_in.weight.detach() - (w0 + 0.5 * expected)).abs().max() <= 1e-5


def lora_file(tmp_path, name, seed, metadata=None):
    tensors = {f"{KQ}.lora_down.weight": rand(4, 32, seed=seed), f"{KQ}.lora_up.weight": rand(32, 4, seed=seed + 1),
               f"{KCONV}.lora_down.weight": rand(2, 32, 3, 3, seed=seed + 2),
               f"{KCONV}.lora_up.weight": rand(32, 2, 1, 1, seed=seed + 3),
               f"{KTE}.lora_down.weight": rand(4, 64, seed=seed + 4), f"{KTE}.lora_up.weight": rand(64, 4, seed=seed + 5)}
    path = tmp_path / name
    save_file(tensors, path, metadata=metadata)
    return path


def state(model):
    return {k: v.detach().clone() for m in [model.unet] + [e.model for e in model.text_encoders]
            for k, v in m.state_dict().items()}


def test_restore_is_bit_exact_sums_add_and_zero_is_nothing(model, tmp_path):
    a, b = lora_file(tmp_path, "a.safetensors", 10), lora_file(tmp_path, "b.safetensors", 20)
    base = state(model)
    loras = LoraSet(model)
    loras.apply([AppliedLora(a, 0.6, 0.6)])
    only_a = {k: v - base[k] for k, v in state(model).items()}
    loras.apply([AppliedLora(b, 0.3, 0.3)])
    only_b = {k: v - base[k] for k, v in state(model).items()}
    loras.apply([AppliedLora(a, 0.6, 0.6), AppliedLora(b, 0.3, 0.3)])
    both = state(model)
    for k in base:
        assert torch.allclose(both[k], base[k] + only_a[k] + only_b[k], atol=1e-6), k
    assert loras.apply([AppliedLora(a, 0.6, 0.6), AppliedLora(b, 0.3, 0.3)]).patched_parameters == 0  # unchanged
    loras.apply([AppliedLora(a, 0.0, 0.0)])
    assert all(torch.equal(v, base[k]) for k, v in state(model).items())
    loras.apply([AppliedLora(a, 1.0, 1.0)])
    loras.apply([])
    fresh = state(load_checkpoint(model.path))
    assert all(torch.equal(v, fresh[k]) for k, v in state(model).items())


def test_other_family_unmatched_keys_and_bad_files(model, tmp_path):
    xl = lora_file(tmp_path, "xl.safetensors", 1, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    report = applied(model, xl)
    assert any("SDXL LoRA on a SD1 model" in w for w in report.warnings)
    assert compatibility(xl, model) == (False, "SDXL LoRA; the loaded model is SD1")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"lora_unet_nonexistent_block.lora_down.weight": rand(2, 8), "lora_unet_nonexistent_block.lora_up.weight":
               rand(8, 2), f"{KQ}.lora_down.weight": rand(2, 16, seed=3), f"{KQ}.lora_up.weight": rand(32, 2, seed=4)},
              wrong)
    report = applied(load_checkpoint(model.path), wrong)
    assert report.unmatched == {"wrong.safetensors": 3}
    junk = tmp_path / "junk.safetensors"
    save_file({"something.else": torch.zeros(3)}, junk)
    with pytest.raises(ModelFileError, match="junk.safetensors: no LoRA/LyCORIS keys recognised"):
        read_lora(junk)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(UnsafeFileError):
        read_lora(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.fixture()
def data_dir(tmp_path, sd1_file):
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    lora_file(lora_dir, "inkstyle.safetensors", 30, metadata={"ss_output_name": "ink", "ss_network_dim": "4",
                                                              "ss_tag_frequency": '{"set": {"ink": 5, "pen": 2}}'})
    return tmp_path


def test_prompt_tags_hashes_warnings_and_regeneration(sd1_file, data_dir):
    model = load_checkpoint(sd1_file)
    base = state(model)
    catalog = Catalog(data_dir)
    networks = LoraNetworks(model, catalog)
    kwargs = dict(seed=3, width=64, height=64, steps=3, save=False, networks=networks)
    plain = pipeline.txt2img(model, prompt="a cat", **kwargs)
    styled = pipeline.txt2img(model, prompt="a cat <lora:inkstyle:0.8>", **kwargs)
    by_alias = pipeline.txt2img(model, prompt="a cat <lora:ink:0.8>", **kwargs)
    entry = catalog.find_lora("inkstyle")
    assert f'Lora hashes: "inkstyle: {entry.addnet_hash[:12]}"' in styled.infotexts[0]
    assert styled.images[0].tobytes() != plain.images[0].tobytes()
    assert by_alias.images[0].tobytes() == styled.images[0].tobytes()
    again = pipeline.txt2img(model, pipeline.request_from_infotext(styled.infotexts[0]), save=False, networks=networks)
    assert again.images[0].tobytes() == styled.images[0].tobytes()
    missing = pipeline.txt2img(model, prompt="a cat <lora:nothere:1> <lora:inkstyle:abc>", **kwargs)
    assert "LoRA 'nothere' is not installed" in missing.infotexts[0] and "weight is not a number" in missing.warnings[1]
    assert missing.images[0].tobytes() == plain.images[0].tobytes()
    pipeline.txt2img(model, prompt="a cat", **kwargs)
    assert all(torch.equal(v, base[k]) for k, v in state(model).items())
    info = lora_info(entry.metadata, {"activation text": "ink style", "preferred weight": 0.8})
    assert info["trigger_words"] == ["ink", "pen"] and info["preferred_weight"] == 0.8 and info["dim"] == "4"


def test_unchanged_lora_set_is_not_repatched(sd1_file, data_dir):
    model = load_checkpoint(sd1_file)
    networks = LoraNetworks(model, Catalog(data_dir))
    from sdstudio.prompt.parser import extract_extra_networks

    _, tags = extract_extra_networks("<lora:inkstyle:0.5>")
    networks.apply(tags)
    assert networks.loras.apply([AppliedLora(Catalog(data_dir).find_lora("inkstyle").path, 0.5, 0.5)]
                                ).patched_parameters == 0


def test_the_fast_fp32_path_patches_its_channels_last_weights_like_the_exact_path(sd1_file, data_dir, monkeypatch):
    """`<lora:…>` on the fast fp32 path (channels-last weights run by Winograd, which reads them on every call): the
    image stays within fp32 rounding of the exact path's, and the weights come back bit for bit."""
    from sdstudio.models import winograd
    from sdstudio.models.winograd import WinogradConv2d
    from tests.helpers import psnr

    monkeypatch.setitem(winograd.MIN_CHANNELS, torch.float32, winograd.CHANNEL_BLOCK)   # the tiny model's widths
    monkeypatch.setitem(winograd.MIN_TILES, torch.float32, 1)                            # and its 8×8 latents
    monkeypatch.setattr(winograd, "winograd_pays", lambda dtype: True)
    catalog = Catalog(data_dir)
    images = {}
    for fast in (False, True):
        model = load_checkpoint(sd1_file, fast_fp32=fast)
        assert any(type(m) is WinogradConv2d for m in model.unet.modules()) == fast
        base = state(model)
        kwargs = dict(seed=3, width=64, height=64, steps=3, save=False, networks=LoraNetworks(model, catalog))
        images[fast] = [pipeline.txt2img(model, prompt=prompt, **kwargs).images[0]
                        for prompt in ("a cat <lora:inkstyle:0.8>", "a cat")]
        assert all(torch.equal(v, base[k]) for k, v in state(model).items())
    styled, plain = images[True]
    assert styled.tobytes() != plain.tobytes()
    assert psnr(styled, images[False][0]) >= 50 and psnr(plain, images[False][1]) >= 50


def test_the_fast_fp32_paths_16_bit_weights_take_a_lora_and_come_back_bit_for_bit(synth_file, data_dir, monkeypatch):
    """`<lora:…>` on an fp16 file's weights kept 16-bit by the fast fp32 path (models/half_weights.py): patched in
    their dtype, the image within that rounding of the same path's with fp32 copies, and restored bit for bit."""
    from sdstudio.models import half_weights, winograd
    from tests.helpers import psnr

    monkeypatch.setitem(winograd.MIN_CHANNELS, torch.float32, winograd.CHANNEL_BLOCK)
    monkeypatch.setitem(winograd.MIN_TILES, torch.float32, 1)
    monkeypatch.setattr(winograd, "winograd_pays", lambda dtype: True)
    images = {}
    for kept_min in (1024, 1 << 62):   # the tiny model's big weights 16-bit; every weight fp32
        monkeypatch.setattr(half_weights, "HALF_KEPT_MIN", kept_min)
        model = load_checkpoint(synth_file("sd1", "fp16"), fast_fp32=True)
        targets = [model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                   model.unet.down_blocks[0].resnets[0].conv1.weight,
                   model.text_encoders[0].model.get_encoder().layers[0].self_attn.q_proj.weight]
        assert all(t.dtype == (torch.float16 if kept_min == 1024 else torch.float32) for t in targets)
        base = state(model)
        kwargs = dict(seed=3, width=64, height=64, steps=3, save=False, networks=LoraNetworks(model, Catalog(data_dir)))
        images[kept_min] = [pipeline.txt2img(model, prompt=prompt, **kwargs).images[0]
                            for prompt in ("a cat <lora:inkstyle:0.8>", "a cat")]
        assert all(torch.equal(v, base[k]) for k, v in state(model).items())
    (styled, plain), (styled_wide, plain_wide) = images.values()
    assert styled.tobytes() != plain.tobytes() and plain.tobytes() == plain_wide.tobytes()
    assert psnr(styled, styled_wide) >= 40


def test_int8_on_the_fast_fp32_path_packs_a_lora_and_gives_the_plain_image_back(synth_file, data_dir, fast_kernels):
    """`--precision int8` without native bf16 math (the fast fp32 path, models/int8.py): the LoRA's changed weights
    are packed again at the next step, and removing it gives the plain image back bit for bit."""
    from sdstudio.models.int8 import Int8Linear

    model = load_checkpoint(synth_file("sd1", "fp16"), fast_fp32=True, int8_linears=True)
    assert any(type(m) is Int8Linear for m in model.unet.modules())
    base = state(model)
    kwargs = dict(seed=3, width=64, height=64, steps=3, save=False, networks=LoraNetworks(model, Catalog(data_dir)))
    plain, styled, again = (pipeline.txt2img(model, prompt=prompt, **kwargs).images[0]
                            for prompt in ("a cat", "a cat <lora:inkstyle:0.8>", "a cat"))
    assert styled.tobytes() != plain.tobytes() and again.tobytes() == plain.tobytes()
    assert all(torch.equal(v, base[k]) for k, v in state(model).items())


@pytest.mark.parametrize("job", [{"prompt": "a cat <lora:inkstyle:0.8>"},
                                 {"prompt": "a cat", "token_merging_ratio": 0.5}])
def test_an_int8_models_calibration_before_its_first_job_sees_neither_the_jobs_lora_nor_its_token_merging(
        synth_file, data_dir, fast_kernels, job):
    """The int8 calibration waits for the model's first use (models/int8.py): a first job with a LoRA or token
    merging gives the image it gives after a plain first job, bit for bit."""
    path = synth_file("sd1", "fp16")
    images = []
    for first_jobs in ([job], [{"prompt": "a cat"}, job]):
        model = load_checkpoint(path, fast_fp32=True, int8_linears=True)
        networks = LoraNetworks(model, Catalog(data_dir)) if "<lora:" in job["prompt"] else None
        for request in first_jobs:
            image = pipeline.txt2img(model, seed=3, width=128, height=128, steps=2, save=False, networks=networks,
                                     **request).images[0]   # the calibrating call's latent size: token merging too
        images.append(image.tobytes())
    assert images[0] == images[1]


def test_a_lora_applied_before_an_int8_models_first_call_leaves_its_calibration_to_the_models_own_weights(
        synth_file, data_dir, fast_kernels):
    path, lora = synth_file("sd1", "fp16"), data_dir / "models" / "Lora" / "inkstyle.safetensors"
    sample = torch.randn(2, 4, 16, 16, generator=gen(40))
    outputs = []
    for lora_first in (True, False):
        model = load_checkpoint(path, fast_fp32=True, int8_linears=True)
        context = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=gen(41))
        with torch.inference_mode():
            if lora_first:   # the first call with the LoRA applied: the calibration ran before the patch
                loras = LoraSet(model)
                loras.apply([AppliedLora(lora, 0.8, 0.8)])
                model.unet(sample, 500, context)
                loras.apply([])
            outputs.append(model.unet(sample, 500, context).sample)
    assert torch.equal(outputs[0], outputs[1])
