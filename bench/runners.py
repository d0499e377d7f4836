"""One benchmark runner per engine. Each runs alone in a fresh process (`python bench/runners.py NAME JSON`) and
prints one JSON line: load seconds, seconds per CFG step (median of the step intervals after the first), the
first step (warm-up or compile), end to end (text encode + sampling + VAE decode, after the load), VAE decode
times, peak RSS, and where asked the final image saved as PNG for the quality guard.

Every engine reads the same full-size random-weight checkpoint file and runs the same work: CFG 7, Euler, batch 1.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import timed  # noqa: E402

PROMPT, NEGATIVE = "a lighthouse on a cliff at dawn", "blurry"
# CLIP token ids for the diffusers and OpenVINO runs, which have no tokenizer (no hub): BOS, two words, EOS/pad
PROMPT_IDS = [49406, 320, 7086] + [49407] * 74
NEGATIVE_IDS = [49406] + [49407] * 76


def peak_rss_gib() -> float:
    """Peak resident set of this process's own address space (VmHWM; ru_maxrss would also count the parent's pages
    from before exec)."""
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 2 ** 20


def touch(modules) -> None:
    """Read one value per 4 KiB page of every weight (what the first generation pays when a loader maps the file)."""
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():   # over the storage: a channels-last weight's reshape would copy it
                flat = torch.empty(0, dtype=param.dtype).set_(param.untyped_storage(), param.storage_offset(),
                                                             (param.numel(),))
                flat[::512].sum()


class StepClock:
    """Marks the end of each sampling step; the first interval runs from `start()`."""

    def __init__(self):
        self.marks: list[float] = []

    def start(self) -> None:
        self.marks = [time.perf_counter()]

    def mark(self, *_args) -> None:
        if torch.cuda.is_available():   # a GPU runs ahead of Python: count a step when its kernels finished
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def figures(self) -> dict[str, float]:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return {"first_step_s": steps[0], "step_s": statistics.median(steps[1:] or steps)}


def load_on(target: str, load, *args, **kwargs):
    """load(*args, **kwargs), finished on the `target` device (a GPU's copies synchronised): a load ends with the
    model ready where it runs."""
    model = load(*args, **kwargs)
    if torch.device(target).type == "cuda":
        torch.cuda.synchronize()
    return model


# --- sdstudio ---------------------------------------------------------------------------------------------------

def sdstudio_session(path: str, precision: str, device: str = "cpu"):
    """sdstudio loaded (`load_checkpoint(dtype=…, device=…)`, what the CLI and server run): (load seconds, model,
    generate) where generate(steps, size, clock) runs `txt2img` and returns (seconds, result)."""
    from sdstudio.files.hashing import sha256_file
    from sdstudio.models.checkpoint import load_checkpoint, precision_options
    from sdstudio.pipeline import txt2img

    load_s, model = timed(load_on, device, load_checkpoint, path, device=device,
                          **precision_options(precision, device))
    model_hash = sha256_file(path)   # the infotext's model hash: the server and CLI keep it in their hash cache

    def generate(steps: int, size: int, clock: StepClock):
        clock.start()
        return timed(txt2img, model, prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, width=size, height=size,
                     sampler_name="Euler", cfg_scale=7, seed=1, save=False, callback=clock.mark,
                     model_hash=model_hash)

    return load_s, model, generate


def sdstudio(path: str, precision: str, steps: int, size: int, decode_sizes: list[int], image: str | None,
             device: str = "cpu") -> dict:
    """sdstudio's own path: `load_checkpoint` + `txt2img` (sdstudio_session), then VAE decodes."""
    from sdstudio.models import vae as vae_ops

    load_s, model, generate = sdstudio_session(path, precision, device)
    clock = StepClock()
    e2e_s, result = generate(steps, size, clock)
    out = {"load_s": load_s, "e2e_s": e2e_s, **clock.figures(), "rss_gib": peak_rss_gib(),
           "dtype": str(model.dtype).replace("torch.", "")}
    if image:
        result.images[0].save(image)
    for side in decode_sizes:
        latent = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(2))
        out[f"decode_{side}_s"], _ = timed(vae_ops.decode, model.vae, latent)
    out["rss_all_gib"] = peak_rss_gib()
    return out


def sdstudio_options(path: str, precision: str, steps: int, size: int, options: dict[str, dict],
                     step_size: int, step_options: list[str]) -> dict:
    """A1111's speed options in one process: a `steps`-step `size`² image with each entry of `options` (request
    fields; the first entry is the plain run and runs again last, to show drift), its per-step time and the PSNR of
    its image against the plain one; then 2 steps at `step_size`² for the names in `step_options` (per-step only)."""
    from common import psnr

    from sdstudio.models.checkpoint import load_checkpoint, precision_options
    from sdstudio.pipeline import txt2img

    model = load_checkpoint(path, **precision_options(precision))

    def run(side: int, count: int, fields: dict):
        clock = StepClock()
        clock.start()
        e2e_s, result = timed(txt2img, model, prompt=PROMPT, negative_prompt=NEGATIVE, steps=count, width=side,
                              height=side, sampler_name="Euler", cfg_scale=7, seed=1, save=False,
                              callback=clock.mark, **fields)
        steps_s = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
        return {"e2e_s": e2e_s, "mean_step_s": sum(steps_s) / len(steps_s)}, result.images[0]

    for fields in options.values():      # first use of each option's shapes (oneDNN primitives, OpenVINO graphs)
        run(64 * (size // 64), 2, fields)
    names = list(options) + [next(iter(options))]
    out, images = {}, {}
    for i, name in enumerate(names):
        figures, images[name] = run(size, steps, options[name])
        out[name if i < len(options) else name + " (again)"] = figures
    for name in options:
        out[name]["psnr_db"] = psnr(images[name], images[names[0]])
    for name in step_options:
        run(step_size, 1, options[name])
        out[name][f"step_{step_size}_s"] = run(step_size, 2, options[name])[0]["mean_step_s"]
    return out


# --- diffusers --------------------------------------------------------------------------------------------------

def _import_diffusers() -> None:
    """Import diffusers' pipeline modules before a load is timed (sdstudio's modules are imported before its clock
    too): the first import costs seconds that are not loading."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401


def _diffusers_pipeline(path: str, config: str, xl: bool, dtype: torch.dtype):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {"tokenizer_2": None} if xl else {"safety_checker": None, "feature_extractor": None}
    pipe = cls.from_single_file(path, config=config, local_files_only=True, tokenizer=None, torch_dtype=dtype,
                                **extra)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_embeddings(pipe, xl: bool) -> dict:
    """Prompt embeddings from the pipeline's own text encoders (token ids given: no tokenizer files here)."""
    def encode(ids):
        ids = torch.tensor([ids], device=pipe.device)
        if not xl:
            return {"": pipe.text_encoder(ids)[0]}
        first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
        return {"": torch.cat([first, second.hidden_states[-2]], dim=-1), "pooled_": second.text_embeds}

    with torch.no_grad():
        cond, uncond = encode(PROMPT_IDS), encode(NEGATIVE_IDS)
    out = {f"{kind}prompt_embeds": value for kind, value in cond.items()}
    out.update({f"negative_{kind}prompt_embeds": value for kind, value in uncond.items()})
    return out


def diffusers_session(path: str, config: str, mode: str, xl: bool = False, device: str = "cpu"):
    """diffusers' pipeline from the same single file: (load seconds, pipeline, generate) where generate(steps, size,
    clock, output_type="pil") runs it and returns (seconds, result). `mode`: fp32 (its default), bf16 (+
    channels_last, its best eager CPU settings), compile (bf16 + channels_last + torch.compile(inductor) with
    freezing: it compiles on its first call), fp16 (on a GPU: its documented CUDA setting, SDPA attention by
    default)."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(mode, torch.bfloat16)
    _import_diffusers()
    load_s, pipe = timed(load_on, device, lambda: _diffusers_pipeline(path, config, xl, dtype).to(device))
    if mode in ("bf16", "compile"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if mode == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        pipe.unet = torch.compile(pipe.unet)
    generator = torch.Generator().manual_seed(1)

    @torch.no_grad()
    def generate(steps: int, size: int, clock: StepClock, output_type: str = "pil"):
        clock.start()
        return timed(pipe, num_inference_steps=steps, guidance_scale=7, height=size, width=size,
                     output_type=output_type, callback_on_step_end=lambda p, i, t, kw: (clock.mark(), kw)[1],
                     generator=generator, **_diffusers_embeddings(pipe, xl))

    return load_s, pipe, generate


def diffusers(path: str, config: str, mode: str, steps: int, size: int, decode_sizes: list[int], xl: bool,
              image: str | None, device: str = "cpu") -> dict:
    """diffusers' pipeline (diffusers_session): a `steps` image (after a 1-step call that compiles, for `compile`),
    then VAE decodes."""
    load_s, pipe, generate = diffusers_session(path, config, mode, xl, device)
    out: dict = {"load_s": load_s}
    clock = StepClock()
    if mode == "compile":
        out["compile_s"], _ = generate(1, size, clock, "latent")    # compiles for these shapes
    e2e_s, result = generate(steps, size, clock)
    out.update({"e2e_s": e2e_s, **clock.figures(), "rss_gib": peak_rss_gib()})
    with torch.no_grad():
        if image:
            result.images[0].save(image)
        for side in decode_sizes:
            latent = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(2))
            out[f"decode_{side}_s"], _ = timed(pipe.vae.decode,
                                               latent.to(device, pipe.vae.dtype) / pipe.vae.config.scaling_factor)
    out["rss_all_gib"] = peak_rss_gib()
    return out


# --- OpenVINO ---------------------------------------------------------------------------------------------------

def openvino_session(path: str, config: str, size: int, precision: str):
    """OpenVINO: the UNet and VAE decoder of the diffusers pipeline (same weights) converted with
    `openvino.convert_model` and compiled for the CPU with inference precision `precision` (bf16 or f32); the text
    encoder stays in torch (one call per image). Euler sampling with diffusers' scheduler, CFG in one batch of 2.
    (load seconds, decoder, generate) where generate(steps, size, clock) returns (seconds, decoded image)."""
    import openvino as ov
    from diffusers import EulerDiscreteScheduler

    start = time.perf_counter()
    pipe = _diffusers_pipeline(path, config, False, torch.float32)

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, context):
            return self.unet(sample, timestep, context, return_dict=False)[0]

    class Decoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    core = ov.Core()
    settings = {"INFERENCE_PRECISION_HINT": precision}
    side = size // 8
    with torch.no_grad():
        unet = core.compile_model(ov.convert_model(
            UNet(pipe.unet), example_input=(torch.randn(2, 4, side, side), torch.tensor(999.0),
                                             torch.randn(2, 77, pipe.text_encoder.config.hidden_size))),
            "CPU", settings)
        decoder_model = ov.convert_model(Decoder(pipe.vae), example_input=(torch.randn(1, 4, side, side),))
        decoder_model.reshape({decoder_model.inputs[0]: ov.PartialShape([1, 4, -1, -1])})
        decoder = core.compile_model(decoder_model, "CPU", settings)
    load_s = time.perf_counter() - start
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def run(n: int, clock: StepClock):
        clock.start()
        with torch.no_grad():
            embeds = _diffusers_embeddings(pipe, False)
        context = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]]).numpy()
        scheduler.set_timesteps(n)
        latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latent] * 2), t)
            noise = unet((model_in.numpy(), t.float().reshape(()).numpy(), context))[0]
            uncond, cond = torch.from_numpy(noise).chunk(2)
            latent = scheduler.step(uncond + 7 * (cond - uncond), t, latent).prev_sample
            clock.mark()
        return decoder((latent / pipe.vae.config.scaling_factor).numpy())[0]

    def generate(steps: int, size_px: int, clock: StepClock):
        assert size_px == size, "the OpenVINO UNet is compiled for one size"
        return timed(run, steps, clock)

    return load_s, decoder, generate


def openvino(path: str, config: str, steps: int, size: int, decode_sizes: list[int], precision: str) -> dict:
    """OpenVINO's pipeline (openvino_session): a `steps` image, then VAE decodes."""
    load_s, decoder, generate = openvino_session(path, config, size, precision)
    clock = StepClock()
    e2e_s, _ = generate(steps, size, clock)
    out = {"load_s": load_s, "e2e_s": e2e_s, **clock.figures(), "rss_gib": peak_rss_gib()}
    for side_px in decode_sizes:
        latent = torch.randn(1, 4, side_px // 8, side_px // 8, generator=torch.Generator().manual_seed(2)).numpy()
        out[f"decode_{side_px}_s"], _ = timed(decoder, latent)
    out["rss_all_gib"] = peak_rss_gib()
    return out


# --- step duels: engines loaded once, taking turns ----------------------------------------------------------------

def step_worker(engine: str, size: int, **kwargs) -> None:
    """Loads `engine` ("sdstudio": path, precision; "openvino": path, config, precision; "diffusers": path, config,
    mode) once, prints {"ready": load seconds}, then for each line N on stdin runs an N-step image at `size` and
    prints its step figures and seconds end to end (one JSON line each) until stdin closes."""
    if engine == "sdstudio":
        load_s, _, generate = sdstudio_session(kwargs["path"], kwargs["precision"])
    elif engine == "diffusers":
        load_s, _, generate = diffusers_session(kwargs["path"], kwargs["config"], kwargs["mode"])
    else:
        load_s, _, generate = openvino_session(kwargs["path"], kwargs["config"], size, kwargs["precision"])
    print(json.dumps({"ready": load_s, "rss_gib": peak_rss_gib()}), flush=True)
    for line in sys.stdin:
        clock = StepClock()
        e2e_s, _ = generate(int(line), size, clock)
        print(json.dumps({"e2e_s": e2e_s, **clock.figures(), "rss_gib": peak_rss_gib()}), flush=True)


# --- stable-diffusion.cpp ---------------------------------------------------------------------------------------

def sdcpp(path: str, steps: int, size: int, wtype: str, e2e_steps: int) -> dict:
    """stable-diffusion.cpp through stable-diffusion-cpp-python (built from PyPI), reading the same file;
    `wtype` = the weight type it computes in ("default" = the file's). At ~45 s a step here, a full `e2e_steps`
    image costs a quarter of an hour, so it runs `steps` and its end-to-end time is extended by the measured
    per-step time (reported as estimated)."""
    from stable_diffusion_cpp import StableDiffusion

    load_s, sd = timed(StableDiffusion, model_path=path, n_threads=os.cpu_count(), wtype=wtype, verbose=False)
    clock = StepClock()
    clock.start()
    # its callback reports step 0 as sampling starts (after text encoding), then each step's end
    e2e_s, _ = timed(sd.generate_image, prompt=PROMPT, negative_prompt=NEGATIVE, width=size, height=size,
                     sample_steps=steps, cfg_scale=7, sample_method="euler", seed=1,
                     progress_callback=lambda step, total, seconds: clock.mark() if total == steps else None)
    figures = clock.figures()
    figures["first_step_s"] = clock.marks[2] - clock.marks[1]
    figures["step_s"] = statistics.median(b - a for a, b in zip(clock.marks[2:], clock.marks[3:]))
    return {"load_s": load_s, "e2e_s": e2e_s + (e2e_steps - steps) * figures["step_s"], "e2e_estimated": True,
            **figures, "rss_gib": peak_rss_gib()}


# --- checkpoint load --------------------------------------------------------------------------------------------

def sdstudio_load(path: str, dtype: str, converted: str | None = None, int8_linears: bool = False,
                  fast_fp32: bool = False) -> dict:
    """`load_checkpoint(path, dtype)` (through the converted-weights folder `converted` when given: the first load
    fills it, later ones map it; with `int8_linears` as `--precision auto` loads, with `fast_fp32` as the fast paths
    do on a CPU without native bf16 math), then every weight touched once."""
    from sdstudio.models.checkpoint import load_checkpoint
    from sdstudio.models.converted import ConvertedWeights

    cache = ConvertedWeights(converted) if converted else None
    start = time.perf_counter()
    model = load_checkpoint(path, dtype=dtype, converted=cache, int8_linears=int8_linears, fast_fp32=fast_fp32)
    loaded = time.perf_counter() - start
    touch([model.unet, model.vae] + [e.model for e in model.text_encoders])
    touched = time.perf_counter() - start
    if cache:
        cache.wait()
    return {"load_s": loaded, "touch_s": touched, "rss_gib": peak_rss_gib()}


def diffusers_load(path: str, config: str, dtype: str) -> dict:
    """diffusers' `from_single_file` (local config, no hub), then every weight touched once."""
    _import_diffusers()
    start = time.perf_counter()
    pipe = _diffusers_pipeline(path, config, False, getattr(torch, dtype))
    loaded = time.perf_counter() - start
    touch([pipe.unet, pipe.vae, pipe.text_encoder])
    return {"load_s": loaded, "touch_s": time.perf_counter() - start, "rss_gib": peak_rss_gib()}


# --- LoRA switching -------------------------------------------------------------------------------------------

def sdstudio_lora(path: str, precision: str, lora_a: str, lora_b: str) -> dict:
    """sdstudio's in-place LoRA patching (what `<lora:…>` in a prompt does): apply, same set again, switch, remove;
    and a small UNet call (8×8 latent, CFG batch) right after the switch and again: what follows a patch before the
    next step (the int8 path packs the changed weights there)."""
    from sdstudio.models.checkpoint import load_checkpoint, precision_options
    from sdstudio.models.lora import AppliedLora, LoraSet

    model = load_checkpoint(path, **precision_options(precision))
    unet = model.unet
    sample = torch.zeros(2, 4, 8, 8, dtype=unet.dtype)
    context = torch.zeros(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype)

    def unet_call():
        with torch.inference_mode():
            unet(sample, 999, context)

    unet_call()   # a generation before the LoRAs, as in the app (int8: its calibration and packing)
    loras = LoraSet(model)
    read_s, _ = timed(loras.read, Path(lora_a))
    loras.read(Path(lora_b))
    a, b = [AppliedLora(Path(lora_a), 1.0, 1.0)], [AppliedLora(Path(lora_b), 1.0, 1.0)]
    out = {"read_s": read_s, "apply_s": timed(loras.apply, a)[0], "same_s": timed(loras.apply, a)[0]}
    unet_call()
    out["switch_s"] = timed(loras.apply, b)[0]
    out["call_after_switch_s"], out["call_again_s"] = timed(unet_call)[0], timed(unet_call)[0]
    return out | {"remove_s": timed(loras.apply, [])[0]}


def diffusers_lora(path: str, config: str, precision: str, lora_a: str, lora_b: str) -> dict:
    """diffusers + peft with the same kohya files: load_lora_weights then fuse_lora (weights patched, no per-step
    cost, as A1111 does); a switch unfuses, unloads, loads and fuses the other; remove unfuses and unloads."""
    pipe = _diffusers_pipeline(path, config, False, torch.float32 if precision == "fp32" else torch.bfloat16)

    def load(lora: str) -> None:
        pipe.load_lora_weights(lora, adapter_name="lora")

    def remove() -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    read_s, _ = timed(load, lora_a)
    fuse_s, _ = timed(pipe.fuse_lora)
    switch_s = timed(remove)[0] + timed(load, lora_b)[0] + timed(pipe.fuse_lora)[0]
    return {"read_s": read_s, "apply_s": read_s + fuse_s, "switch_s": switch_s, "remove_s": timed(remove)[0]}


# --- torch.compile on sdstudio's path ---------------------------------------------------------------------------

def sdstudio_compiled(path: str, calls: int) -> dict:
    """One CFG UNet call (SD1.5 512², `--precision float`) eager and under torch.compile (inductor's default mode:
    the weights stay graph inputs, so in-place LoRA patches still count), `calls` times each, alternating. The fast
    path's own kernels (Winograd convolutions, the attention processor, the fused GEGLU) stay eager inside the
    compiled UNet: dynamo cannot trace their ctypes calls and scratch buffers, so inductor gets everything else."""
    from sdstudio.models.attention import FastCPUAttention
    from sdstudio.models.checkpoint import load_checkpoint
    from sdstudio.models.fused import FusedGEGLU
    from sdstudio.models.winograd import WinogradConv2d

    for kind, method in ((WinogradConv2d, "forward"), (FastCPUAttention, "__call__"), (FusedGEGLU, "forward")):
        setattr(kind, method, torch.compiler.disable(getattr(kind, method)))
    unet = load_checkpoint(path, dtype=torch.bfloat16).unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=generator).bfloat16()
    context = torch.randn(2, 77, 768, generator=generator).bfloat16()

    def call(model) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            return timed(lambda: model(latents, torch.tensor([500, 500]), context).sample)

    _, eager_out = call(unet)
    compiled = torch.compile(unet)
    compile_s, compiled_out = call(compiled)
    eager, fast = [], []
    for _ in range(calls):
        eager.append(call(unet)[0])
        fast.append(call(compiled)[0])
    return {"compile_s": compile_s, "eager_s": statistics.median(eager), "compiled_s": statistics.median(fast),
            "max_difference": (compiled_out.float() - eager_out.float()).abs().max().item()}


def sdstudio_fast_fp32(path: str, calls: int, steps: int) -> dict:
    """The fast fp32 path (`--precision float` on a CPU without native bf16 math) beside the exact fp32 one, both
    loaded in this process (their loads: bench/load.py): `calls` CFG UNet calls (512², batch 2) and 2 decodes of a
    512² image each way, alternating (medians); the UNet output's relative difference and the decode's PSNR; with
    `steps`, a `steps`-step 512² image each way (Euler, CFG 7, seed 1) and their PSNR (the quality guard)."""
    from common import psnr

    from sdstudio.models import vae as vae_ops
    from sdstudio.models.checkpoint import load_checkpoint
    from sdstudio.pipeline import txt2img

    models = {name: load_checkpoint(path, dtype=torch.float32, fast_fp32=fast)
              for name, fast in (("exact", False), ("fast", True))}
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 64, 64, generator=generator), torch.randn(2, 77, 768, generator=generator)
    image_latents = torch.randn(1, 4, 64, 64, generator=generator)
    works = {"unet": (calls, lambda model: model.unet(latents, 500, encoder_hidden_states=context).sample),
             "decode": (2, lambda model: vae_ops.decode(model.vae, image_latents))}
    seconds: dict[str, dict[str, list[float]]] = {work: {name: [] for name in models} for work in works}
    outputs: dict[str, dict[str, torch.Tensor]] = {work: {} for work in works}
    for work, (count, run) in works.items():
        for _ in range(count):
            for name, model in models.items():
                with torch.inference_mode():
                    took, outputs[work][name] = timed(run, model)
                seconds[work][name].append(took)
    exact_unet = outputs["unet"]["exact"].double()
    out = {f"{name}_{work}_s": statistics.median(seconds[work][name]) for work in seconds for name in models}
    out["unet_difference"] = ((outputs["unet"]["fast"].double() - exact_unet).norm() / exact_unet.norm()).item()
    out["decode_psnr"] = psnr(outputs["decode"]["fast"][0], outputs["decode"]["exact"][0])
    if steps:
        images = [txt2img(model, prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, width=512, height=512,
                          sampler_name="Euler", cfg_scale=7, seed=1, save=False).images[0] for model in models.values()]
        out["image_psnr"] = psnr(images[1], images[0])
    return out


RUNNERS = {"sdstudio": sdstudio, "diffusers": diffusers, "openvino": openvino, "sdcpp": sdcpp,
           "sdstudio_load": sdstudio_load, "diffusers_load": diffusers_load, "sdstudio_lora": sdstudio_lora,
           "diffusers_lora": diffusers_lora, "sdstudio_options": sdstudio_options,
           "sdstudio_compiled": sdstudio_compiled, "sdstudio_fast_fp32": sdstudio_fast_fp32}

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "step_worker":
        step_worker(**json.loads(sys.argv[2]))
    else:
        print(json.dumps(RUNNERS[sys.argv[1]](**json.loads(sys.argv[2]))))
