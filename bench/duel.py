"""SD1.5 512² seconds per CFG step with the engines taking turns: sdstudio (`auto` and `float`), OpenVINO, the fastest
peer of bench/generate.py (bf16 where the CPU has native bf16 math, else f32), and diffusers fp32 (its default, the
baseline of the issue's 3.5× target), each loaded once in its own process, then ROUNDS rounds in which each runs a
STEPS-step image in turn (the order rotating). bench/generate.py times each engine once, minutes apart, and this VM's
speed drifts by 5–10 % over that half hour; here the drift falls on every engine alike, and the medians over rounds
give the ratios. Only one engine computes at a time (the others wait on their pipe)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (RUNNERS, diffusers_config_dir, full_checkpoint, machine, openvino_precision,  # noqa: E402
                    write_section)

ROUNDS = 5
STEPS = 5          # per image: the step figure is the median of the 4 intervals after the first
SIZE = 512
BASELINE = "diffusers fp32 (default)"


class Worker:
    """One engine in its own process (bench/runners.py step_worker), loaded once."""

    def __init__(self, **settings):
        self.process = subprocess.Popen([sys.executable, str(RUNNERS), "step_worker", json.dumps(settings)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        self.loaded = self._reply()

    def image(self, steps: int) -> dict:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"engine process ended (exit status {self.process.wait()})")
        return json.loads(line)


def engines(path: Path) -> tuple[str, dict[str, dict]]:
    """(the peer's name, {engine name: step_worker settings}) for this CPU."""
    config = str(diffusers_config_dir(path))
    precision = openvino_precision()
    peer = f"OpenVINO {precision} (UNet + VAE decoder)"
    plan = {peer: dict(engine="openvino", path=str(path), config=config, precision=precision),
            "sdstudio --precision auto": dict(engine="sdstudio", path=str(path), precision="auto"),
            "sdstudio --precision float": dict(engine="sdstudio", path=str(path), precision="float"),
            BASELINE: dict(engine="diffusers", path=str(path), config=config, mode="fp32")}
    return peer, plan


def main() -> None:
    path = full_checkpoint("sd1", "fp16")
    peer_name, plan = engines(path)
    workers = {}
    try:
        for name, settings in plan.items():   # loads one after another: none computes beside another
            workers[name] = Worker(size=SIZE, **settings)
            print(name, "loaded", workers[name].loaded, flush=True)
        figures = {name: [] for name in workers}
        names = list(workers)
        for round_ in range(ROUNDS):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                figures[name].append(workers[name].image(STEPS))
                print(round_, name, figures[name][-1], flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    peer, baseline = (statistics.median(r["step_s"] for r in figures[name]) for name in (peer_name, BASELINE))
    rows = ["| engine | s / step (median of rounds) | fastest – slowest round | vs OpenVINO | vs diffusers fp32 | "
            f"{STEPS}-step image s (median) | peak RSS GiB |", "|---|---|---|---|---|---|---|"]
    for name, results in figures.items():
        steps = [r["step_s"] for r in results]
        step = statistics.median(steps)
        rows.append(f"| {name} | {step:.2f} | {min(steps):.2f} – {max(steps):.2f} | {peer / step:.2f}× | "
                    f"{baseline / step:.2f}× | {statistics.median(r['e2e_s'] for r in results):.1f} | "
                    f"{results[-1]['rss_gib']:.2f} |")
    table = "\n".join(rows)
    print(table)
    write_section("Step duel: engines taking turns (bench/duel.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/duel.py`. Same full-size "
                  f"random-weight SD1.5 fp16 file; each engine loaded once in its own process, then {ROUNDS} rounds "
                  f"of a {STEPS}-step {SIZE}² image each (Euler, CFG 7, text encode and VAE decode included in the "
                  "image time), the engines taking turns in a rotating order; per round the median of the step "
                  f"intervals after the first; ratios > 1 = faster than OpenVINO / diffusers fp32.\n\n{table}")


if __name__ == "__main__":
    main()
