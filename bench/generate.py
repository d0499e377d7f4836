"""Generation speed side by side, in one run: sdstudio beside diffusers (fp32 default; bf16 + channels_last eager;
the same under torch.compile with inductor freezing), OpenVINO and stable-diffusion.cpp, all reading the same
full-size random-weight file. SD1.5 at 512² (a 20-step image end to end, per-step time, VAE decode 512², 1024²
and, tiled, 2048², peak RSS) and SDXL at 1024² (per-step time, peak RSS). The quality guard compares sdstudio's
fast path with its fp32 path: the final images of the same seed, PSNR. Each engine runs in a fresh process
(bench/runners.py).

Raw figures are kept in <bench dir>/generate-results.json; `BENCH_ONLY="row name;row name"` reruns only the named
rows (SDXL rows prefixed "SDXL ") and renders the tables from the merged figures."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_DIR, cpu_kind, diffusers_config_dir, failed_row, full_checkpoint, machine,  # noqa: E402
                    openvino_precision, psnr, run_runner, warm_page_cache, write_section)

SD15_STEPS = 20     # the end-to-end image; per-step time is the median of the intervals after the first
SDXL_STEPS = 3      # a 1024² SDXL step is a minute or more here: the first step plus two measured ones
SDCPP_STEPS = 4     # stable-diffusion.cpp: ~45 s a step here; its 20-step time is extended from 4 measured steps
OUTLIERS_ROW = "sdstudio --precision auto, the file with outlier channels"   # same function (synthetic.py)


def notes_file() -> Path:
    """This kind of CPU's hand-kept notes on its rows, put in with every run (bench/generate_notes-<kind>.md)."""
    return Path(__file__).with_name(f"generate_notes-{cpu_kind().lower()}.md")


def selected(name: str) -> bool:
    only = os.environ.get("BENCH_ONLY")
    return not only or name in only.split(";")


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def sd15_rows(images: Path, results: dict[str, dict]) -> None:
    path = full_checkpoint("sd1", "fp16")
    config = str(diffusers_config_dir(path))
    common = {"steps": SD15_STEPS, "size": 512}
    decode = {"decode_sizes": [512, 1024]}
    plan = {
        "diffusers fp32 (default)": ("diffusers", dict(path=str(path), config=config, mode="fp32", xl=False,
                                                       image=str(images / "diffusers-fp32.png"), **decode)),
        "diffusers bf16 + channels_last": ("diffusers", dict(path=str(path), config=config, mode="bf16", xl=False,
                                                             image=str(images / "diffusers-bf16.png"), **decode)),
        "diffusers bf16 + channels_last + torch.compile (inductor, freezing)": (
            "diffusers", dict(path=str(path), config=config, mode="compile", xl=False, image=None, **decode)),
        f"OpenVINO {openvino_precision()} (UNet + VAE decoder)": (
            "openvino", dict(path=str(path), config=config, precision=openvino_precision(), **decode)),
        "stable-diffusion.cpp (file's fp16 weights)": ("sdcpp", dict(path=str(path), wtype="default",
                                                                        e2e_steps=SD15_STEPS)),
        "sdstudio fp32": ("sdstudio", dict(path=str(path), precision="fp32",
                                           image=str(images / "sd15-fp32.png"), **decode)),
        "sdstudio --precision float": ("sdstudio", dict(path=str(path), precision="float",   # auto without int8
                                                        image=str(images / "sd15-float.png"), decode_sizes=[])),
        "sdstudio --precision auto": ("sdstudio", dict(path=str(path), precision="auto",
                                                       image=str(images / "sd15-auto.png"),
                                                       decode_sizes=[512, 1024, 2048])),  # 2048²: tiled
        OUTLIERS_ROW: ("sdstudio", dict(path=str(full_checkpoint("sd1", "fp16", outlier_channels=True)),
                                        precision="auto", image=str(images / "sd15-auto-outliers.png"),
                                        decode_sizes=[])),
    }
    run_plan(plan, results, common)


def sdxl_rows(images: Path, results: dict[str, dict]) -> None:
    path = full_checkpoint("sdxl", "fp16")
    config = str(diffusers_config_dir(path))
    common = {"steps": SDXL_STEPS, "size": 1024, "decode_sizes": []}
    plan = {
        "diffusers fp32 (default)": ("diffusers", dict(path=str(path), config=config, mode="fp32", xl=True,
                                                       image=None)),
        "diffusers bf16 + channels_last": ("diffusers", dict(path=str(path), config=config, mode="bf16", xl=True,
                                                             image=None)),
        "diffusers bf16 + channels_last + torch.compile (inductor, freezing)": (
            "diffusers", dict(path=str(path), config=config, mode="compile", xl=True, image=None)),
        "sdstudio fp32": ("sdstudio", dict(path=str(path), precision="fp32", image=str(images / "sdxl-fp32.png"))),
        "sdstudio --precision float": ("sdstudio", dict(path=str(path), precision="float",
                                                        image=str(images / "sdxl-float.png"))),
        "sdstudio --precision auto": ("sdstudio", dict(path=str(path), precision="auto",
                                                       image=str(images / "sdxl-auto.png"))),
        OUTLIERS_ROW: ("sdstudio", dict(path=str(full_checkpoint("sdxl", "fp16", outlier_channels=True)),
                                        precision="auto", image=str(images / "sdxl-auto-outliers.png"))),
    }
    run_plan(plan, results, common, prefix="SDXL ")


def run_plan(plan: dict[str, tuple[str, dict]], results: dict[str, dict], common: dict, prefix: str = "") -> None:
    """Run the selected rows of `plan` (name -> runner, arguments), each in a fresh process from a warm page cache;
    `results` ends in plan order (the tables' row order)."""
    for name, (runner, kwargs) in plan.items():
        if selected(prefix + name):
            warm_page_cache(Path(kwargs["path"]))  # every engine starts from its file in the page cache
            steps = {"steps": SDCPP_STEPS} if runner == "sdcpp" else {}
            results[name] = run_runner(runner, **{**common, **steps}, **kwargs)
            print(prefix + name, json.dumps(results[name]), flush=True)
    ordered = {name: results[name] for name in plan if name in results}
    results.clear()
    results.update(ordered)


def ratio(base: dict | None, r: dict) -> str:
    if not base or "step_s" not in base:
        return "–"
    return f"{base['step_s'] / r['step_s']:.2f}×"


def sd15_table(results: dict[str, dict]) -> str:
    base = results.get("diffusers fp32 (default)")
    peers = {n: r for n, r in results.items() if not n.startswith("sdstudio") and "step_s" in r}
    fastest = min(peers.items(), key=lambda kv: kv[1]["step_s"]) if peers else None
    fastest_e2e = min(peers.items(), key=lambda kv: kv[1]["e2e_s"]) if peers else None
    rows = [f"| engine | load s | s / step | vs diffusers fp32 | vs fastest peer | first step s | {SD15_STEPS}-step "
            "image s | VAE decode 512² s | VAE decode 1024² s | VAE decode 2048² s | peak RSS 512² GiB | "
            "peak RSS incl. the decodes GiB |",
            "|---" * 12 + "|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(failed_row([name], r["error"], 12))
            continue
        first = r["first_step_s"] + r.get("compile_s", 0)
        rows.append(f"| {name} | {fmt(r['load_s'])} | {fmt(r['step_s'])} | {ratio(base, r)} | "
                    f"{ratio(fastest[1], r) if fastest else '–'} | {fmt(first)} | {'≈' if r.get('e2e_estimated') else ''}"
                    f"{fmt(r['e2e_s'], 1)} | "
                    f"{fmt(r.get('decode_512_s'))} | {fmt(r.get('decode_1024_s'))} | {fmt(r.get('decode_2048_s'))} | "
                    f"{fmt(r['rss_gib'])} | "
                    f"{fmt(r.get('rss_all_gib'))} |")
    lines = ["\n".join(rows)]
    if fastest:
        ours = {p: results.get(f"sdstudio --precision {p}", {}) for p in ("auto", "float")}
        lines.append(f"Fastest peer per step: {fastest[0]} ({fastest[1]['step_s']:.2f} s); end to end: "
                     f"{fastest_e2e[0]} ({fastest_e2e[1]['e2e_s']:.1f} s)"
                     + "".join(f"; sdstudio --precision {p} end to end {fastest_e2e[1]['e2e_s'] / r['e2e_s']:.2f}× "
                               "the fastest peer's speed" for p, r in ours.items() if "e2e_s" in r) + ".")
    return "\n\n".join(lines)


def sdxl_table(results: dict[str, dict]) -> str:
    base = results.get("diffusers fp32 (default)")
    peers = [r for n, r in results.items() if not n.startswith("sdstudio") and "step_s" in r]
    fastest = min(peers, key=lambda r: r["step_s"]) if peers else None
    rows = ["| engine | load s | s / step (CFG, 1024²) | vs diffusers fp32 | vs fastest peer | first step s | "
            "peak RSS GiB |", "|---" * 7 + "|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(failed_row([name], r["error"], 7))
            continue
        rows.append(f"| {name} | {fmt(r['load_s'])} | {fmt(r['step_s'])} | {ratio(base, r)} | {ratio(fastest, r)} | "
                    f"{fmt(r['first_step_s'] + r.get('compile_s', 0))} | {fmt(r['rss_gib'])} |")
    return "\n".join(rows)


def quality(images: Path) -> str:
    rows = ["| images compared (same seed and settings) | PSNR dB |", "|---|---|"]
    pairs = {f"SD1.5 512², {SD15_STEPS} steps: sdstudio --precision auto vs sdstudio fp32": ("sd15-auto", "sd15-fp32"),
             f"SD1.5 512², {SD15_STEPS} steps: sdstudio --precision auto on the file with outlier channels (the same "
             "function: 4 channels ×32 after every transformer norm) vs sdstudio fp32": ("sd15-auto-outliers",
                                                                                         "sd15-fp32"),
             f"SD1.5 512², {SD15_STEPS} steps: sdstudio --precision float vs sdstudio fp32": ("sd15-float",
                                                                                             "sd15-fp32"),
             f"SD1.5 512², {SD15_STEPS} steps: diffusers bf16 vs diffusers fp32": ("diffusers-bf16", "diffusers-fp32"),
             f"SDXL 1024², {SDXL_STEPS} steps: sdstudio --precision auto vs sdstudio fp32": ("sdxl-auto", "sdxl-fp32"),
             f"SDXL 1024², {SDXL_STEPS} steps: sdstudio --precision auto on the file with outlier channels vs sdstudio "
             "fp32": ("sdxl-auto-outliers", "sdxl-fp32"),
             f"SDXL 1024², {SDXL_STEPS} steps: sdstudio --precision float vs sdstudio fp32": ("sdxl-float",
                                                                                            "sdxl-fp32")}
    for label, (a, b) in pairs.items():
        pa, pb = images / f"{a}.png", images / f"{b}.png"
        if pa.exists() and pb.exists():
            rows.append(f"| {label} | {psnr(Image.open(pa), Image.open(pb)):.1f} |")
    return "\n".join(rows)


def main() -> None:
    images = BENCH_DIR / "images"
    images.mkdir(parents=True, exist_ok=True)
    store = BENCH_DIR / "generate-results.json"
    stored = json.loads(store.read_text()) if store.exists() and os.environ.get("BENCH_ONLY") else {}
    if not stored:
        for stale in images.glob("*.png"):
            stale.unlink()
    results = {"sd15": stored.get("sd15", {}), "sdxl": stored.get("sdxl", {})}
    for key, rows in (("sd15", sd15_rows), ("sdxl", sdxl_rows)):
        rows(images, results[key])
        store.write_text(json.dumps(results, indent=1))   # kept after each model: a later crash loses nothing
    sd15, sdxl = results["sd15"], results["sdxl"]
    notes = f"{notes_file().read_text().strip()}\n\n" if notes_file().exists() else ""
    body = (f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/generate.py` (runners: "
            "`bench/runners.py`). Same full-size random-weight fp16 file for every engine; Euler, CFG 7, batch 1, "
            "seed 1; per-step = median of the step intervals after the first; each engine in a fresh process, one "
            f"after another on an otherwise idle machine. Ratios > 1 = faster.\n\n{notes}"
            f"### SD1.5, 512×512\n\n{sd15_table(sd15)}\n\n### SDXL, 1024×1024\n\n{sdxl_table(sdxl)}\n\n"
            f"### Quality guard\n\n{quality(images)}")
    print(body)
    write_section("Generation speed, side by side (bench/generate.py)", body)


if __name__ == "__main__":
    main()
