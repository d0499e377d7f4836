"""The `sdstudio` command line: thin wrappers over the Python API. Errors print one line and exit 1."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from sdstudio.errors import SDStudioError

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
    for title, entries in (("VAE", catalog.vaes()), ("LoRA", catalog.loras()), ("Embeddings", catalog.embeddings())):
        if entries:
            print(f"\n{title}: " + ", ".join(e.name for e in entries))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every subcommand."""
    from sdstudio import synthetic

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=".", help="folder holding models/, outputs/ (default: current dir)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(prog="sdstudio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", parents=[common], help="list model files with family, hash, size, dtype")

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
