"""The engine: one per process. It owns the catalog, the loaded models (RAM-budgeted cache), VAE choice,
embeddings, LoRA patches and settings, and runs jobs one at a time from a FIFO queue on one worker thread.
Every accepted job ends as done, failed or interrupted — none vanishes."""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdstudio import pipeline
from sdstudio.errors import SDStudioError
from sdstudio.files.catalog import Catalog
from sdstudio.models.cache import CheckpointCache
from sdstudio.models.checkpoint import LoadedCheckpoint
from sdstudio.models.converted import DEFAULT_BUDGET as CONVERTED_DEFAULT_BUDGET, converted_weights
from sdstudio.models.embeddings import EmbeddingDB
from sdstudio.models.lora import LoraNetworks
from sdstudio.images.infotext import parse_infotext
from sdstudio.models.vae import resolve_vae, swap_vae
from sdstudio.service.history import History

log = logging.getLogger(__name__)

DEFAULT_SETTINGS: dict[str, Any] = {
    "sd_model_checkpoint": None,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0,
    "randn_source": "GPU",
    "emphasis": "Original",
    "comma_padding_backtrack": 20,
    "skip_early_cond": 0.0,
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "token_merging_ratio": 0.0,
    "token_merging_ratio_img2img": 0.0,
    "samples_format": "png",
    "samples_save": True,
}
# request fields that settings supply when the request leaves them at their defaults (A1111 options)
SETTING_FIELDS = {"CLIP_stop_at_last_layers": "clip_skip", "eta_noise_seed_delta": "eta_noise_seed_delta",
                  "randn_source": "randn_source", "emphasis": "emphasis",
                  "comma_padding_backtrack": "comma_padding_backtrack", "skip_early_cond": "skip_early_cond",
                  "s_min_uncond": "s_min_uncond", "s_min_uncond_all": "s_min_uncond_all",
                  "token_merging_ratio": "token_merging_ratio"}
PREVIEW_EVERY = 1  # steps between live previews
SHUTTING_DOWN = "the server is shutting down"


class Settings:
    """A1111-named options in <data>/config.json, written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.values = dict(DEFAULT_SETTINGS)
        if path.exists():
            try:
                self.values.update(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                log.warning("%s unreadable (%s); using defaults", path, exc)

    def update(self, changes: dict[str, Any]) -> None:
        self.values.update(changes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".config.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.values, f, indent=2)
        os.replace(tmp, self.path)


@dataclass
class Job:
    """One queued generation: its request, progress and outcome."""

    id: str
    mode: str                                   # "txt2img" | "img2img"
    request: pipeline.GenerationRequest
    override_settings: dict[str, Any] = field(default_factory=dict)
    status: str = "queued"                      # queued | running | done | failed | interrupted
    step: int = 0
    steps: int = 0
    started: float | None = None
    finished: float | None = None
    preview: Any = None                         # PIL image of the current latent (cheap approximation)
    result: pipeline.GenerationResult | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def eta(self) -> float | None:
        if not self.started or not self.step or not self.steps:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.step * (self.steps - self.step)


class Engine:
    """Models, settings and the worker; the API and the CLI server talk only to this."""

    def __init__(self, data_dir: str | Path, dtype: torch.dtype = torch.float32,
                 converted_cache_bytes: int = CONVERTED_DEFAULT_BUDGET, device: torch.device | str = "cpu",
                 int8_linears: bool = False, fast_fp32: bool = False):
        self.data_dir = Path(data_dir)
        self.dtype = dtype          # every checkpoint loads in this dtype (`--precision`)
        self.device = torch.device(device)   # and runs there (`--device`)
        self.settings = Settings(self.data_dir / "config.json")
        self.catalog = Catalog(self.data_dir, hash_on_scan=False)
        self.embeddings = EmbeddingDB.for_data_dir(self.data_dir)
        self.models = CheckpointCache(converted=converted_weights(self.data_dir, converted_cache_bytes),
                                      int8_linears=int8_linears, fast_fp32=fast_fp32)
        self.history = History(self.data_dir / "history.sqlite")
        self._networks: dict[int, LoraNetworks] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.current: Job | None = None
        self._worker = threading.Thread(target=self._run, name="sdstudio-worker", daemon=True)
        self._worker.start()

    # --- models -------------------------------------------------------------------------------------------

    def model(self) -> LoadedCheckpoint:
        """The model named by the `sd_model_checkpoint` setting (first usable checkpoint when unset), with the
        `sd_vae` choice applied. A failed switch keeps the previous model and raises."""
        wanted = self.settings.values.get("sd_model_checkpoint")
        entry = self.catalog.find_checkpoint(wanted) if wanted else self._first_checkpoint()
        model = self.models.get(entry.path, dtype=self.dtype, device=self.device)
        if self.settings.values.get("sd_model_checkpoint") != entry.title:
            self.catalog.ensure_hashes(entry)
            self.settings.values["sd_model_checkpoint"] = entry.title
        vaes = {e.path.name: e.path for e in self.catalog.vaes()}
        swap_vae(model, resolve_vae(self.settings.values.get("sd_vae") or "Automatic", model.path, vaes))
        return model

    def _first_checkpoint(self):
        if not self.catalog.checkpoints():
            raise SDStudioError(f"no checkpoints in {self.data_dir / 'models' / 'Stable-diffusion'}")
        return self.catalog.checkpoints()[0]

    def set_options(self, changes: dict[str, Any]) -> None:
        """Validate and store options; a model or VAE change is loaded now so errors reach the caller."""
        unknown = sorted(set(changes) - set(DEFAULT_SETTINGS))
        if unknown:
            log.info("storing options sdstudio does not use: %s", unknown)
        if "sd_model_checkpoint" in changes:
            self.catalog.find_checkpoint(changes["sd_model_checkpoint"])   # raises for unknown names
        previous = dict(self.settings.values)
        self.settings.values.update(changes)
        try:
            if "sd_model_checkpoint" in changes or "sd_vae" in changes:
                with self._lock:
                    self.model()
        except SDStudioError:
            self.settings.values = previous
            raise
        self.settings.update({})

    # --- jobs ---------------------------------------------------------------------------------------------

    def submit(self, mode: str, request: pipeline.GenerationRequest,
               override_settings: dict[str, Any] | None = None) -> Job:
        """Queue a job (FIFO); returns it at once."""
        if self._closed.is_set():
            raise SDStudioError(SHUTTING_DOWN)
        job = Job(f"job-{next(self._ids)}", mode, request, override_settings or {}, steps=request.steps)
        self.jobs[job.id] = job
        self._queue.put(job)
        return job

    def interrupt(self) -> None:
        """Stop the running job (it ends as interrupted); queued jobs still run."""
        self._interrupt.set()

    def skip(self) -> None:
        """Drop the running job's current batch; it goes on with its next batch (A1111 "Skip")."""
        self._skip.set()

    def close(self) -> None:
        """Stop working (server shutdown): the running job ends as interrupted, queued jobs fail at once, so no
        client waits on work that will never run and the process can exit."""
        self._closed.set()
        self._interrupt.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._fail(job, SHUTTING_DOWN)
        self._queue.put(None)

    @staticmethod
    def _fail(job: Job, error: str) -> None:
        job.status, job.error, job.finished = "failed", error, time.time()
        job.done.set()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._closed.is_set():
                self._fail(job, SHUTTING_DOWN)
                continue
            self.current = job
            self._interrupt.clear()
            self._skip.clear()
            if self._closed.is_set():    # closed between the check above and the clear
                self._interrupt.set()
            job.status, job.started = "running", time.time()
            try:
                job.result = self._generate(job)
                job.status = "done"
                self._record(job)
            except pipeline.Interrupted:
                job.status = "interrupted"
            except SDStudioError as exc:
                job.status, job.error = "failed", str(exc)
            except Exception as exc:   # the worker must survive anything a job does
                log.exception("job %s failed", job.id)
                job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                job.finished = time.time()
                self.current = None
                job.done.set()

    def _generate(self, job: Job) -> pipeline.GenerationResult:
        saved = {k: self.settings.values.get(k) for k in job.override_settings}   # restored afterwards (A1111)
        self.settings.values.update(job.override_settings)
        try:
            with self._lock:
                model = self.model()
                request = self._with_settings(job.request, job.mode, job.override_settings)
                networks = self._networks.setdefault(id(model), LoraNetworks(model, self.catalog))

                def on_step(info: pipeline.StepInfo) -> None:
                    job.step, job.steps = info.step, info.steps
                    if info.step % PREVIEW_EVERY == 0:
                        job.preview = info.preview()[0]

                run = pipeline.img2img if job.mode == "img2img" else pipeline.txt2img
                entry = self.catalog.find_checkpoint(self.settings.values["sd_model_checkpoint"])
                return run(model, request, callback=on_step, data_dir=self.data_dir,
                           save=bool(self.settings.values.get("samples_save", True)), model_hash=entry.sha256,
                           embeddings=self.embeddings.usable(model), networks=networks, interrupt=self._interrupt,
                           skip=self._skip,
                           image_format=self.settings.values.get("samples_format", "png"))
        finally:
            self.settings.values.update(saved)

    def _record(self, job: Job) -> None:
        """One history row per image of a finished job."""
        result = job.result
        params = {k: v for k, v in asdict(result.request).items() if k != "init_images"}
        seconds = time.time() - job.started if job.started else None
        for i, text in enumerate(result.infotexts):
            parsed = parse_infotext(text).params
            self.history.add(mode=job.mode, prompt=result.request.prompt,
                             negative_prompt=result.request.negative_prompt, params=params, seed=result.seeds[i],
                             model=parsed.get("Model"), model_hash=parsed.get("Model hash"), vae=parsed.get("VAE"),
                             loras=parsed.get("Lora hashes"),
                             path=str(result.paths[i]) if i < len(result.paths) else None, infotext=text,
                             seconds=seconds)

    def _with_settings(self, request: pipeline.GenerationRequest, mode: str,
                       overrides: dict[str, Any]) -> pipeline.GenerationRequest:
        """Fill request fields left at their defaults from the A1111 options (clip skip, ENSD, RNG…); img2img takes
        `token_merging_ratio_img2img` when set, unless the job overrides `token_merging_ratio` (A1111's rule)."""
        defaults = pipeline.GenerationRequest()
        changes = {}
        for option, name in SETTING_FIELDS.items():
            if getattr(request, name) == getattr(defaults, name) and option in self.settings.values:
                changes[name] = type(getattr(defaults, name))(self.settings.values[option])
        img2img_ratio = self.settings.values.get("token_merging_ratio_img2img")
        if (mode == "img2img" and img2img_ratio and not request.token_merging_ratio
                and "token_merging_ratio" not in overrides):
            changes["token_merging_ratio"] = float(img2img_ratio)
        return replace(request, **changes)

    def refresh(self) -> None:
        """Rescan model folders and embeddings (A1111's refresh buttons)."""
        self.catalog.refresh()
        self.embeddings.refresh()
