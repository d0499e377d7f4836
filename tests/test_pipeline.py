"""txt2img / img2img end to end on tiny real-layout checkpoints: k-diffusion equivalence, reproducibility,
every family, infotext round trip, bad input."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio import pipeline
from sdstudio.errors import InvalidRequestError
from sdstudio.images.infotext import parse_infotext, read_infotext
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.sampling import registry
from sdstudio.sampling.brownian import BrownianTreeNoiseSampler
from sdstudio.sampling.denoisers import DiscreteSchedule, EpsDenoiser
from sdstudio.sampling.rng import ImageRNG
from tests.sampling.kdiffusion_ref import sampling as kd

SMALL = dict(width=64, height=64, steps=4, save=False)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- k-diffusion equivalence on the real tiny UNet with CFG -------------------------------------------------

KD_NAMES = {"Euler a": "sample_euler_ancestral", "Euler": "sample_euler", "LMS": "sample_lms",
            "Heun": "sample_heun", "DPM2": "sample_dpm_2", "DPM2 a": "sample_dpm_2_ancestral",
            "DPM++ 2S a": "sample_dpmpp_2s_ancestral", "DPM++ 2M": "sample_dpmpp_2m",
            "DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
            "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde", "DPM++ 3M SDE": "sample_dpmpp_3m_sde"}


@pytest.fixture(scope="module")
def cfg_setup(sd1_model):
    request = pipeline.GenerationRequest(prompt="a red (cat:1.3)", negative_prompt="blurry", width=64, height=64)
    encoder = pipeline.PromptEncoder(sd1_model, request)
    conds = [encoder.image_conds(request.prompt, request.negative_prompt, {}, {})]
    schedule = DiscreteSchedule(sd1_model.alphas_cumprod)
    return request, conds, EpsDenoiser(pipeline.UNetModel(sd1_model), schedule), schedule


@pytest.mark.parametrize("name", list(KD_NAMES))
def test_sampler_matches_k_diffusion_on_the_tiny_unet(cfg_setup, name):
    request, conds, denoiser, schedule = cfg_setup
    sampler = registry.get_sampler(name)
    sigmas = registry.make_sigmas(sampler, "Automatic", 5, schedule)

    def run(function):
        rng = ImageRNG((4, 8, 8), [1234])
        x = rng.first() * sigmas[0]
        kwargs = dict(sampler.extra_kwargs)
        if sampler.brownian_noise:
            kwargs["noise_sampler"] = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[1234]) \
                if function.__module__.startswith("sdstudio") else \
                kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[1234])
        elif "noise_sampler" in inspect.signature(function).parameters:
            kwargs["noise_sampler"] = rng.noise_sampler
        model = pipeline.ScheduledCFG(denoiser, 7.0, conds)
        return function(model, x, sigmas, extra_args={}, disable=True, **kwargs)

    ours = run(sampler.function)
    theirs = run(getattr(kd, KD_NAMES[name]))
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() <= 1e-4


# --- reproducibility ---------------------------------------------------------------------------------------

def test_same_seed_gives_bit_identical_images(sd1_model):
    a = pipeline.txt2img(sd1_model, prompt="a cat", seed=77, sampler_name="Euler a", **SMALL)
    b = pipeline.txt2img(sd1_model, prompt="a cat", seed=77, sampler_name="Euler a", **SMALL)
    c = pipeline.txt2img(sd1_model, prompt="a cat", seed=78, sampler_name="Euler a", **SMALL)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE"])
def test_batch_image_i_equals_a_single_run_with_seed_plus_i(sd1_model, sampler):
    batch = pipeline.txt2img(sd1_model, prompt="a cat", seed=100, batch_size=3, sampler_name=sampler, **SMALL)
    assert batch.seeds == [100, 101, 102]
    for i in range(3):
        single = pipeline.txt2img(sd1_model, prompt="a cat", seed=100 + i, sampler_name=sampler, **SMALL)
        assert np.abs(pixels(single.images[0]) - pixels(batch.images[i])).max() <= 1, i
        assert f"Seed: {100 + i}," in batch.infotexts[i]


def test_image_regenerated_from_its_own_png_is_bit_identical(sd1_model, tmp_path):
    first = pipeline.txt2img(sd1_model, prompt='a "quoted", (cat:1.2)\nsecond line', negative_prompt="dog, ugly",
                             seed=31337, sampler_name="DPM++ 2M SDE", scheduler="Karras", cfg_scale=5.5, clip_skip=2,
                             width=64, height=48, steps=4, subseed=9, subseed_strength=0.3, data_dir=tmp_path)
    path = first.paths[0]
    assert path.parent.parent == tmp_path / "outputs" / "txt2img-images" and path.name == "00000-31337.png"
    text = read_infotext(path)
    assert text == first.infotexts[0]
    request = pipeline.request_from_infotext(text)
    again = pipeline.txt2img(sd1_model, request, save=False)
    assert np.array_equal(pixels(Image.open(path)), pixels(again.images[0]))
    params = parse_infotext(text).params
    assert params["Clip skip"] == "2" and params["Variation seed"] == "9" and params["Size"] == "64x48"


def test_variation_seed_blends_between_two_seeds(sd1_model):
    base = pipeline.txt2img(sd1_model, prompt="x", seed=5, sampler_name="Euler", **SMALL).images[0]
    other = pipeline.txt2img(sd1_model, prompt="x", seed=6, sampler_name="Euler", **SMALL).images[0]
    none = pipeline.txt2img(sd1_model, prompt="x", seed=5, subseed=6, subseed_strength=0.0, sampler_name="Euler",
                            **SMALL).images[0]
    full = pipeline.txt2img(sd1_model, prompt="x", seed=5, subseed=6, subseed_strength=1.0, sampler_name="Euler",
                            **SMALL).images[0]
    assert np.array_equal(pixels(base), pixels(none))
    assert np.abs(pixels(full) - pixels(other)).max() <= 1


# --- every family ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd2-v", "sdxl", "sdxl-refiner", "sd1-inpaint", "sd2-inpaint", "sd1-ip2p"])
def test_other_families_generate_finite_non_flat_images(synth_file, family):
    model = load_checkpoint(synth_file(family, "pruned"))
    result = pipeline.txt2img(model, prompt="a house", negative_prompt="", seed=1, **SMALL)
    array = pixels(result.images[0])
    assert result.images[0].size == (64, 64) and array.std() > 5


def test_img2img_keeps_the_init_image_at_low_strength(sd1_model):
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    weak = pipeline.img2img(sd1_model, prompt="x", init_images=[init], denoising_strength=0.1, seed=3,
                            sampler_name="Euler", steps=10, width=64, height=64, save=False)
    strong = pipeline.img2img(sd1_model, prompt="x", init_images=[init], denoising_strength=0.9, seed=3,
                              sampler_name="Euler", steps=10, width=64, height=64, save=False)
    reference = pipeline.vae_ops.decode(sd1_model.vae, pipeline.vae_ops.encode(sd1_model.vae, pipeline._to_tensor(init)))
    roundtrip = pixels(pipeline._to_pil(reference)[0])
    assert np.abs(pixels(weak.images[0]) - roundtrip).mean() < np.abs(pixels(strong.images[0]) - roundtrip).mean()
    assert "Denoising strength: 0.1" in weak.infotexts[0]


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_resize_modes_give_the_target_size(mode):
    wide = Image.new("RGB", (200, 100), (200, 10, 10))
    out = pipeline.resize_image(wide, mode, 64, 64)
    assert out.size == (64, 64)
    corner = out.getpixel((0, 0))
    assert corner[0] > 150  # crop and fill modes stretch the image's own colour into the corners


def test_step_callback_gets_steps_latents_and_previews(sd1_model):
    seen = []
    pipeline.txt2img(sd1_model, prompt="x", seed=1, sampler_name="Euler", callback=seen.append, **SMALL)
    assert [s.step for s in seen] == [1, 2, 3, 4] and seen[0].steps == 4
    assert seen[0].latent.shape == (1, 4, 8, 8) and seen[-1].preview()[0].size == (8, 8)


def test_interrupt_stops_without_saving(sd1_model, tmp_path):
    import threading

    stop = threading.Event()

    def stop_at_two(info):
        if info.step == 2:
            stop.set()

    with pytest.raises(pipeline.Interrupted):
        pipeline.txt2img(sd1_model, prompt="x", callback=stop_at_two, interrupt=stop, data_dir=tmp_path,
                         width=64, height=64, steps=4)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.png"))


# --- bad input ---------------------------------------------------------------------------------------------

def test_unknown_sampler_and_schedule_list_valid_names(sd1_model):
    with pytest.raises(InvalidRequestError, match="unknown sampler 'Euler z'; valid: .*DPM\\+\\+ 2M.*Euler a"):
        pipeline.txt2img(sd1_model, sampler_name="Euler z", **SMALL)
    with pytest.raises(InvalidRequestError, match="scheduler.*Karras"):
        pipeline.txt2img(sd1_model, scheduler="Wobbly", **SMALL)


def test_size_not_multiple_of_8_is_rounded_down_and_said(sd1_model):
    result = pipeline.txt2img(sd1_model, prompt="x", width=70, height=64, steps=2, save=False)
    assert result.images[0].size == (64, 64)
    assert result.warnings == ["width 70 is not a multiple of 8: rounded down to 64"]
    assert "Size: 64x64" in result.infotexts[0]


def test_steps_below_one_and_absurd_sizes_are_refused(sd1_model):
    with pytest.raises(InvalidRequestError, match="steps: must be at least 1"):
        pipeline.txt2img(sd1_model, steps=0, width=64, height=64)
    with pytest.raises(InvalidRequestError, match=r"width: 8000x8000 .* needs about [\d.]+ GiB, but only"):
        pipeline.txt2img(sd1_model, width=8000, height=8000, batch_size=8, steps=1)
    with pytest.raises(InvalidRequestError, match="outside 8..8192"):
        pipeline.txt2img(sd1_model, width=100000, height=64, steps=1)


def test_nan_in_the_unet_stops_with_a_hint(sd1_file):
    model = load_checkpoint(sd1_file)
    with torch.no_grad():
        model.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(pipeline.GenerationError, match="NaN.*--precision fp32"):
        pipeline.txt2img(model, prompt="x", **SMALL)


def test_img2img_without_images_is_refused(sd1_model):
    with pytest.raises(InvalidRequestError, match="init_images"):
        pipeline.img2img(sd1_model, prompt="x", **SMALL)


def test_skip_drops_the_current_batch_and_goes_on(sd1_model):
    import threading

    skip = threading.Event()

    def skip_first_batch(info):
        if info.step == 2 and not seen:
            seen.append(True)
            skip.set()

    seen: list[bool] = []
    result = pipeline.txt2img(sd1_model, prompt="x", seed=10, n_iter=2, callback=skip_first_batch, skip=skip,
                              **SMALL)
    assert len(result.images) == 1 and "Seed: 11," in result.infotexts[0]
    assert result.warnings == ["batch 1 skipped"] and not skip.is_set()


# --- leaving the negative prompt out (A1111 "Skip Early CFG", "NGMS") --------------------------------------

def test_negative_skipping_follows_a1111_call_rules():
    early = pipeline.NegativeSkipping(early=0.2, total_calls=10)
    assert [early.skips(call, 5.0) for call in range(5)] == [True, True, True, False, False]  # call/total <= 0.2
    assert early.infotext == {"Skip Early CFG": 0.2}
    ngms = pipeline.NegativeSkipping(min_sigma=1.0, total_calls=10)
    assert [ngms.skips(call, sigma) for call, sigma in enumerate([3.0, 2.0, 0.9, 0.8, 0.5, 0.4])] == \
        [False, False, False, True, False, True]        # odd calls below the sigma only
    assert ngms.infotext == {"NGMS": 1.0}
    every = pipeline.NegativeSkipping(min_sigma=1.0, all_calls=True, total_calls=10)
    assert [every.skips(call, sigma) for call, sigma in enumerate([2.0, 0.9, 0.8])] == [False, True, True]
    assert every.infotext == {"NGMS": 1.0, "NGMS all steps": True}
    off = pipeline.NegativeSkipping(total_calls=10)
    assert not any(off.skips(call, 0.01) for call in range(10)) and off.infotext == {}


def _unet_batches(model, **fields):
    batches = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        return pipeline.txt2img(model, **{"prompt": "a cat", "negative_prompt": "blurry", "seed": 21,
                                          "sampler_name": "Euler", **SMALL, **fields}), batches
    finally:
        hook.remove()


def test_ngms_runs_the_prompt_alone_on_odd_calls_and_regenerates_from_its_infotext(sd1_model):
    plain, plain_batches = _unet_batches(sd1_model)
    assert plain_batches == [2, 2, 2, 2]
    never, _ = _unet_batches(sd1_model, s_min_uncond=0.001)      # below every sigma: nothing skipped, nothing said
    assert np.array_equal(pixels(never.images[0]), pixels(plain.images[0])) and "NGMS" not in never.infotexts[0]
    fast, fast_batches = _unet_batches(sd1_model, s_min_uncond=100.0)
    assert fast_batches == [2, 1, 2, 1]
    assert not np.array_equal(pixels(fast.images[0]), pixels(plain.images[0]))
    params = parse_infotext(fast.infotexts[0]).params
    assert float(params["NGMS"]) == 100 and "NGMS all steps" not in params
    again = pipeline.txt2img(sd1_model, pipeline.request_from_infotext(fast.infotexts[0]), save=False)
    assert np.array_equal(pixels(again.images[0]), pixels(fast.images[0]))
    _, every_batches = _unet_batches(sd1_model, s_min_uncond=100.0, s_min_uncond_all=True)
    assert every_batches == [1, 1, 1, 1]


def test_skip_early_cfg_counts_model_calls_of_second_order_samplers(sd1_model):
    # Heun makes 2 calls a step (the last step 1): A1111 counts total_steps = 2 × steps
    result, batches = _unet_batches(sd1_model, sampler_name="Heun", skip_early_cond=0.25)
    assert batches == [1, 1, 1, 2, 2, 2, 2]                      # calls 0..2 of 8: 0, 1/8, 2/8 <= 0.25
    assert parse_infotext(result.infotexts[0]).params["Skip Early CFG"] == "0.25"


def test_negative_skipping_values_out_of_range_are_refused(sd1_model):
    with pytest.raises(InvalidRequestError, match="skip_early_cond: must be within 0..1"):
        pipeline.txt2img(sd1_model, skip_early_cond=1.5, **SMALL)
    with pytest.raises(InvalidRequestError, match="s_min_uncond: must be 0"):
        pipeline.txt2img(sd1_model, s_min_uncond=-1, **SMALL)


def test_token_merging_changes_the_image_says_so_and_regenerates_from_its_infotext(sd1_model):
    plain = pipeline.txt2img(sd1_model, prompt="a cat", seed=8, sampler_name="Euler", **SMALL)
    merged = pipeline.txt2img(sd1_model, prompt="a cat", seed=8, sampler_name="Euler", token_merging_ratio=0.5,
                              **SMALL)
    assert not np.array_equal(pixels(merged.images[0]), pixels(plain.images[0]))
    assert "Token merging ratio" not in plain.infotexts[0]
    assert parse_infotext(merged.infotexts[0]).params["Token merging ratio"] == "0.5"
    again = pipeline.txt2img(sd1_model, pipeline.request_from_infotext(merged.infotexts[0]), save=False)
    assert np.array_equal(pixels(again.images[0]), pixels(merged.images[0]))
    with pytest.raises(InvalidRequestError, match="token_merging_ratio: must be within 0..1"):
        pipeline.txt2img(sd1_model, token_merging_ratio=1.0, **SMALL)


def test_token_merging_leaves_sdxl_alone_like_a1111(synth_file):
    # SDXL's full-resolution level has no transformer blocks; tomesd (max_downsample 1) merges nothing there
    model = load_checkpoint(synth_file("sdxl", "pruned"))
    plain = pipeline.txt2img(model, prompt="a house", seed=2, **SMALL)
    merged = pipeline.txt2img(model, prompt="a house", seed=2, token_merging_ratio=0.5, **SMALL)
    assert np.array_equal(pixels(merged.images[0]), pixels(plain.images[0]))
