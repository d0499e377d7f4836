"""The `sdstudio` command line: thin wrappers over the Python API. Errors print one line and exit 1."""
from __future__ import annotations

import argparse
import atexit
import logging
import sys
from pathlib import Path
from typing import Callable

from sdstudio.errors import SDStudioError
from sdstudio.models.memory import keep_freed_memory

PRECISIONS = ("auto", "float", "fp32", "bf16", "fp16", "int8")   # names models.checkpoint.precision_options takes
PRECISION_HELP = ("auto (default): the device's fast path: fp16 on a GPU; on the CPU bf16 where it computes it "
                  "natively (AMX / AVX512-BF16), else fp32 with near-exact fast kernels (Winograd F(4x4), fused "
                  "GEGLU), with the UNet's transformer linears and large 3x3 convolutions as int8 products where "
                  "this machine measures them faster; float = auto without the int8 products (closer to fp32); "
                  "fp32 = the exact reference path; int8 = auto, refused on a GPU")
DEVICE_HELP = "where the models run: auto (default: the first CUDA GPU when there is one, else the CPU), cpu, cuda[:N]"

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register a subcommand handler."""
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@command("models")
def cmd_models(args: argparse.Namespace) -> int:
    """Table of the checkpoints under <data-dir>/models/Stable-diffusion, then VAEs, LoRAs and embeddings."""
    from sdstudio.files.catalog import Catalog
    from sdstudio.files.detect import inspect_checkpoint

    catalog = Catalog(Path(args.data_dir))
    catalog.refresh()
    rows = [("name", "family", "prediction", "hash", "size", "dtype")]
    for entry in catalog.checkpoints():
        try:
            info = inspect_checkpoint(entry.path)
            family, prediction, dtype = info.label, info.prediction, info.dtypes.get("unet", "?")
        except SDStudioError as exc:
            family, prediction, dtype = f"error: {exc.problem if hasattr(exc, 'problem') else exc}", "-", "-"
        rows.append((entry.name, family, prediction, entry.short_hash or "-", _human_size(entry.size), dtype))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    if catalog.vaes():
        print("\nVAE: " + ", ".join(e.name for e in catalog.vaes()))
    if catalog.loras():
        print("\nLoRA:")
        for entry in catalog.loras():
            print("  " + _lora_line(entry))
    if catalog.embeddings():
        print("\nEmbeddings: " + ", ".join(e.name for e in catalog.embeddings()))
    return 0


def _lora_line(entry) -> str:
    """name (alias) family dim/alpha triggers, from the file's kohya metadata and A1111's user-metadata sidecar."""
    from sdstudio.files.readers import read_tensor_infos
    from sdstudio.models.lora import lora_family, lora_info

    if entry.error:
        return f"{entry.name}  error: {entry.error}"
    tensors, metadata = read_tensor_infos(entry.path)
    info = lora_info(entry.metadata, entry.user_metadata)
    family = lora_family(tensors, metadata) or "?"
    parts = [entry.name, f"alias {entry.alias}" if entry.alias != entry.stem else "", family.upper(),
             f"dim {info['dim']}/alpha {info['alpha']}" if info["dim"] else "",
             "triggers: " + ", ".join(info["trigger_words"][:5]) if info["trigger_words"] else "",
             f"activation: {info['activation_text']}" if info["activation_text"] else ""]
    return "  ".join(p for p in parts if p)


@command("synth")
def cmd_synth(args: argparse.Namespace) -> int:
    """Write a random-weight model file in a real layout (tests and benchmarks)."""
    from sdstudio import synthetic

    if args.vae:
        path = synthetic.write_vae(args.out, size=args.size, seed=args.seed, fmt=args.format)
    else:
        variant = args.variant
        path = synthetic.write_checkpoint(args.out, args.family, args.size, variant, args.format, args.seed)
    print(path)
    return 0


def _load_model(args: argparse.Namespace, catalog, infotext_params: dict[str, str] | None = None):
    """The checkpoint named by --ckpt (a path or a catalog name/hash), else the infotext's model, else the first
    checkpoint in `catalog`; with --vae (Automatic / None / a VAE name or path) applied."""
    from sdstudio.models.checkpoint import load_checkpoint, precision_options
    from sdstudio.models.converted import converted_weights
    from sdstudio.models.device import resolve_device
    from sdstudio.models.vae import resolve_vae

    if args.ckpt and Path(args.ckpt).is_file():
        path = Path(args.ckpt)
    elif args.ckpt:
        path = catalog.find_checkpoint(args.ckpt).path
    elif infotext_params and (infotext_params.get("Model hash") or infotext_params.get("Model")):
        query = infotext_params.get("Model hash") or infotext_params["Model"]
        path = catalog.find_checkpoint(query).path
    else:
        path = _first_usable_checkpoint(catalog)
    vae = Path(args.vae) if args.vae and Path(args.vae).is_file() else resolve_vae(
        args.vae or "Automatic", path, {e.name.rsplit("/", 1)[-1]: e.path for e in catalog.vaes()})
    converted = converted_weights(Path(args.data_dir), _gib(args.converted_cache_gb))
    if converted:
        atexit.register(converted.wait)  # a one-shot command still leaves the converted weights for the next run
    device = resolve_device(args.device)
    return load_checkpoint(path, vae=vae, use_ema=args.ema, converted=converted, device=device,
                           **precision_options(args.precision, device))


def _gib(size: float) -> int:
    return int(size * 2**30)


def _first_usable_checkpoint(catalog) -> Path:
    """The first checkpoint (by name) that is recognised as one; misplaced files are passed over."""
    from sdstudio.files.detect import inspect_checkpoint

    for entry in catalog.checkpoints():
        try:
            inspect_checkpoint(entry.path)
            return entry.path
        except SDStudioError:
            continue
    raise SDStudioError(f"no checkpoint given (--ckpt) and none usable in "
                        f"{Path(catalog.data_dir) / 'models' / 'Stable-diffusion'}")


def _generate(args: argparse.Namespace, mode: str) -> int:
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from sdstudio import pipeline
    from sdstudio.files.catalog import Catalog
    from sdstudio.images.infotext import parse_infotext, read_infotext
    from sdstudio.models.embeddings import EmbeddingDB
    from sdstudio.models.lora import LoraNetworks
    from sdstudio.sampling import registry

    base = pipeline.GenerationRequest()
    infotext_params = None
    if getattr(args, "from_png", None):
        text = read_infotext(args.from_png)
        if not text:
            raise SDStudioError(f"{args.from_png}: has no generation parameters (infotext)")
        base = pipeline.request_from_infotext(text)
        infotext_params = parse_infotext(text).params
    overrides = {name: value for name, value in vars(args).items()
                 if name in pipeline.GenerationRequest.__dataclass_fields__ and value is not None}
    if mode == "img2img":
        images = []
        for path in args.init_images:
            try:
                images.append(Image.open(path).convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                raise SDStudioError(f"{path}: cannot read the init image ({exc})") from exc
        overrides["init_images"] = images
    if args.styles:
        from sdstudio.prompt.styles import StyleDB

        styles = StyleDB(Path(args.data_dir) / "styles.csv")
        unknown = [name for name in args.styles if name not in styles.names()]
        if unknown:
            raise SDStudioError(f"{styles.path}: no style named {unknown[0]!r}; "
                                f"available: {', '.join(styles.names()) or 'none'}")
        overrides["prompt"], overrides["negative_prompt"] = styles.apply_styles(
            overrides.get("prompt", base.prompt), overrides.get("negative_prompt", base.negative_prompt), args.styles)
    request = pipeline.make_request(base, overrides)
    registry.get_sampler_and_scheduler(request.sampler_name, request.scheduler)  # fail before the slow load
    catalog = Catalog(Path(args.data_dir), hash_on_scan=False)
    model = _load_model(args, catalog, infotext_params)
    bars: list[tqdm] = []

    def on_step(info: pipeline.StepInfo) -> None:
        if not bars:
            bars.append(tqdm(total=info.steps * request.n_iter, unit="step", disable=args.quiet))
        bars[0].update(1)

    run = pipeline.img2img if mode == "img2img" else pipeline.txt2img
    try:
        # as the server runs a job: <lora:…> tags, the data dir's embeddings, the sha256 kept in the hash cache
        result = run(model, request, callback=on_step, data_dir=args.data_dir, save=not args.no_save,
                     image_format=args.format, model_hash=catalog.hash_cache.hash(model.path),
                     embeddings=EmbeddingDB.for_data_dir(args.data_dir).usable(model),
                     networks=LoraNetworks(model, catalog))
    finally:
        for bar in bars:
            bar.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in result.paths:
        print(path)
    if args.no_save:
        print(result.infotexts[0])
    return 0


@command("txt2img")
def cmd_txt2img(args: argparse.Namespace) -> int:
    """Generate images from a prompt (or regenerate one from a PNG's infotext with --from-png)."""
    return _generate(args, "txt2img")


@command("img2img")
def cmd_img2img(args: argparse.Namespace) -> int:
    """Generate images from init images and a prompt."""
    return _generate(args, "img2img")


@command("pnginfo")
def cmd_pnginfo(args: argparse.Namespace) -> int:
    """Print the generation parameters stored in an image (PNG text chunk or JPEG/WebP EXIF)."""
    from sdstudio.images.infotext import read_infotext

    try:
        text = read_infotext(args.file)
    except OSError as exc:
        raise SDStudioError(f"{args.file}: cannot read the image ({exc})") from exc
    if not text:
        raise SDStudioError(f"{args.file}: has no generation parameters")
    print(text)
    return 0


@command("tokens")
def cmd_tokens(args: argparse.Namespace) -> int:
    """Print tokens used / chunk capacity of a prompt (embeddings in the data dir count by their vectors)."""
    from sdstudio.models.embeddings import EmbeddingDB
    from sdstudio.prompt.conditioning import EmbeddingLookup, count_tokens
    from sdstudio.prompt.parser import extract_extra_networks, prompt_schedule, split_and

    lookup = EmbeddingLookup(EmbeddingDB.for_data_dir(args.data_dir).embeddings.values())
    text, _ = extract_extra_networks(args.prompt)
    # A1111's counter: the largest count over every AND part and every step of the prompt schedule
    used, capacity = max(count_tokens(step_text, lookup)
                         for part, _ in split_and(text) for _, step_text in prompt_schedule(part, args.steps))
    print(f"{used}/{capacity}")
    return 0


@command("merge-lora")
def cmd_merge_lora(args: argparse.Namespace) -> int:
    """Bake LoRAs into a new checkpoint (original single-file layout, recipe in the metadata)."""
    from sdstudio.files.catalog import Catalog
    from sdstudio.tools.merge_lora import merge_loras, parse_lora_spec

    catalog = Catalog(Path(args.data_dir), hash_on_scan=False)
    loras = [parse_lora_spec(spec, lambda name: catalog.find_lora(name).path) for spec in args.lora]
    base = Path(args.base) if Path(args.base).is_file() else catalog.find_checkpoint(args.base).path
    print(merge_loras(base, loras, args.output))
    return 0


@command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the web page and the A1111-compatible API (127.0.0.1:7860 by default)."""
    from sdstudio.api.app import serve

    serve(data_dir=Path(args.data_dir), host=args.host, port=args.port, listen=args.listen,
          api_auth=args.api_auth, insecure=args.insecure, demo=not args.no_demo, precision=args.precision,
          converted_cache_bytes=_gib(args.converted_cache_gb), device=args.device)
    return 0


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """--device, --precision and the converted weights it may leave on disk (commands that load a checkpoint)."""
    from sdstudio.models.converted import DEFAULT_BUDGET

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument("--converted-cache-gb", type=float, default=DEFAULT_BUDGET / 2**30,
                        help="disk kept for converted weights (e.g. bf16 copies of fp16 files) in "
                             "DATA_DIR/cache/converted, so the next load maps them instead of converting; "
                             "0 = off (default: %(default)g)")


def _add_generation_args(parser: argparse.ArgumentParser, img2img: bool) -> None:
    parser.add_argument("prompt", nargs="?", default=None)
    parser.add_argument("-n", "--negative-prompt", dest="negative_prompt")
    parser.add_argument("--style", dest="styles", action="append",
                        help="apply a style from <data-dir>/styles.csv (repeatable)")
    parser.add_argument("--ckpt", help="checkpoint file, or a name/title/hash from models/Stable-diffusion")
    parser.add_argument("--vae", help="Automatic (default), None, a VAE name from models/VAE, or a path")
    parser.add_argument("--ema", action="store_true", help="use the EMA UNet weights when the file has them")
    _add_model_args(parser)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sampler", dest="sampler_name")
    parser.add_argument("--scheduler")
    parser.add_argument("--cfg-scale", dest="cfg_scale", type=float)
    parser.add_argument("-W", "--width", type=int)
    parser.add_argument("-H", "--height", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--subseed", type=int)
    parser.add_argument("--subseed-strength", dest="subseed_strength", type=float)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--batch-count", dest="n_iter", type=int)
    parser.add_argument("--clip-skip", dest="clip_skip", type=int)
    parser.add_argument("--rng", dest="randn_source", choices=["GPU", "CPU", "NV"])
    parser.add_argument("--ensd", dest="eta_noise_seed_delta", type=int)
    parser.add_argument("--skip-early-cfg", dest="skip_early_cond", type=float, metavar="FRACTION",
                        help="leave the negative prompt out of this first fraction of the model calls (A1111 "
                             "'Skip Early CFG'; faster, changes the image)")
    parser.add_argument("--ngms", dest="s_min_uncond", type=float, metavar="SIGMA",
                        help="leave the negative prompt out of every other model call below this sigma (A1111 "
                             "'Negative Guidance minimum sigma'; faster, changes the image)")
    parser.add_argument("--token-merging-ratio", dest="token_merging_ratio", type=float, metavar="RATIO",
                        help="merge this share of the tokens before self-attention at full resolution (A1111 "
                             "'Token merging ratio', e.g. 0.5; faster, changes the image)")
    parser.add_argument("--ngms-all-steps", dest="s_min_uncond_all", action="store_true", default=None,
                        help="with --ngms: every call below that sigma, not every other one")
    parser.add_argument("--format", choices=["png", "jpg", "webp"], default="png",
                        help="image file format (infotext in a PNG text chunk or EXIF UserComment)")
    parser.add_argument("--no-save", action="store_true", help="do not write files; print the infotext")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    if img2img:
        parser.add_argument("--init", dest="init_images", nargs="+", required=True, type=Path)
        parser.add_argument("--denoising-strength", dest="denoising_strength", type=float)
        parser.add_argument("--resize-mode", dest="resize_mode", type=int, choices=[0, 1, 2, 3])
    else:
        parser.add_argument("--from-png", dest="from_png", type=Path,
                            help="take every setting from this image's infotext (other flags override)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every subcommand."""
    from sdstudio import synthetic

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=".", help="folder holding models/, outputs/ (default: current dir)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(prog="sdstudio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", parents=[common], help="list model files with family, hash, size, dtype")
    _add_generation_args(sub.add_parser("txt2img", parents=[common], help="generate images from text"), False)
    _add_generation_args(sub.add_parser("img2img", parents=[common], help="generate images from images"), True)
    serve = sub.add_parser("serve", parents=[common], help="run the web page and the A1111-compatible API")
    serve.add_argument("--host", default="127.0.0.1")
    _add_model_args(serve)
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (requires --api-auth or --insecure)")
    serve.add_argument("--api-auth", help="user:pass[,user2:pass2] for HTTP basic auth on every route")
    serve.add_argument("--insecure", action="store_true", help="allow --listen without --api-auth")
    serve.add_argument("--no-demo", action="store_true",
                       help="do not build the small demo model when models/Stable-diffusion is empty")
    tokens = sub.add_parser("tokens", parents=[common], help="count a prompt's tokens (n/75 like A1111)")
    tokens.add_argument("prompt")
    tokens.add_argument("--steps", type=int, default=20, help="steps for prompt-editing schedules")
    merge = sub.add_parser("merge-lora", parents=[common], help="bake LoRAs into a new checkpoint")
    merge.add_argument("base", help="checkpoint file, or a name/hash from models/Stable-diffusion")
    merge.add_argument("--lora", action="append", required=True, help="NAME_OR_PATH[:WEIGHT] (repeatable)")
    merge.add_argument("-o", "--output", type=Path, required=True)
    pnginfo = sub.add_parser("pnginfo", parents=[common], help="print an image's generation parameters")
    pnginfo.add_argument("file", type=Path)

    synth = sub.add_parser("synth", parents=[common], help="write a random-weight model file")
    synth.add_argument("out", type=Path)
    synth.add_argument("--family", choices=synthetic.FAMILIES, default="sd1")
    synth.add_argument("--size", choices=synthetic.SIZES, default="tiny")
    synth.add_argument("--variant", choices=synthetic.VARIANTS, default="pruned")
    synth.add_argument("--format", choices=synthetic.FORMATS, default=None,
                       help="default: from the file extension")
    synth.add_argument("--vae", action="store_true", help="write a standalone VAE file instead")
    synth.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdstudio` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    keep_freed_memory()   # before the server's threads allocate (models/memory.py)
    try:
        return COMMANDS[args.command](args)
    except SDStudioError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
