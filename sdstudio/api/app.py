"""The HTTP server: AUTOMATIC1111's `/sdapi/v1/` API, our `/api/`, and the web page, over one Engine."""
from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from sdstudio import __version__, pipeline
from sdstudio.api.schemas import Img2ImgRequest, PngInfoRequest, TokensRequest, Txt2ImgRequest
from sdstudio.errors import InvalidRequestError, SDStudioError
from sdstudio.images.infotext import encode_image, parse_infotext, read_infotext
from sdstudio.models.checkpoint import precision_options
from sdstudio.models.converted import DEFAULT_BUDGET as CONVERTED_DEFAULT_BUDGET
from sdstudio.models.device import device_memory, resolve_device
from sdstudio.sampling import registry
from sdstudio.service.engine import SHUTTING_DOWN, Engine

WEB_DIR = Path(__file__).parent.parent / "web"
MAX_BODY_BYTES = 64 * 2**20
DEMO_NAME = "demo-random-weights.safetensors"

sdapi = APIRouter(prefix="/sdapi/v1", tags=["A1111 API"])
ours = APIRouter(prefix="/api", tags=["sdstudio"])


def get_engine(request: Request) -> Engine:
    """The process's engine (tests may override this dependency)."""
    return request.app.state.engine


def _b64_png(image: Image.Image, infotext: str | None) -> str:
    return base64.b64encode(encode_image(image, infotext, "png")).decode()


def open_image(data: str, field: str) -> Image.Image:
    """A base64 image (optionally a data: URL) as read, text chunks intact; bad data is a 422 naming the field."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        return image
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise InvalidRequestError(field, f"not a base64-encoded image ({exc})") from exc


def generation_request(body: Txt2ImgRequest) -> pipeline.GenerationRequest:
    """A1111 API fields -> GenerationRequest (`infotext`, when given, fills what the body leaves unset)."""
    base = pipeline.request_from_infotext(body.infotext) if body.infotext else pipeline.GenerationRequest()
    given = body.model_fields_set
    values: dict[str, Any] = {"sampler_name": body.sampler_name or body.sampler_index}
    for name in ("prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "steps", "cfg_scale", "width",
                 "height", "batch_size", "n_iter", "eta"):
        if name in given or not body.infotext:
            values[name] = getattr(body, name)
    values["scheduler"] = body.scheduler or base.scheduler
    values["seed_resize_from_w"] = max(body.seed_resize_from_w, 0)
    values["seed_resize_from_h"] = max(body.seed_resize_from_h, 0)
    for name in ("s_churn", "s_tmin", "s_noise", "s_tmax", "s_min_uncond", "token_merging_ratio"):
        if getattr(body, name) is not None:
            values[name] = getattr(body, name)
    if isinstance(body, Img2ImgRequest):
        values["init_images"] = [open_image(img, "init_images").convert("RGB") for img in body.init_images]
        values["resize_mode"] = body.resize_mode
        values["denoising_strength"] = body.denoising_strength
    return pipeline.make_request(base, {k: v for k, v in values.items() if v is not None})


def _run(engine: Engine, mode: str, body: Txt2ImgRequest) -> dict[str, Any]:
    request = generation_request(body)
    if body.styles:
        from sdstudio.prompt.styles import StyleDB

        styles = StyleDB(engine.data_dir / "styles.csv")
        prompt, negative = styles.apply_styles(request.prompt, request.negative_prompt, body.styles)
        request = pipeline.make_request(request, {"prompt": prompt, "negative_prompt": negative})
    job = engine.submit(mode, request, body.override_settings)
    job.done.wait()
    if job.status == "failed" and job.error == SHUTTING_DOWN:
        raise HTTPException(503, SHUTTING_DOWN)
    if job.status == "failed":
        raise InvalidRequestError("request", job.error or "generation failed")
    result = job.result
    images = [_b64_png(img, text) for img, text in zip(result.images, result.infotexts)] if result else []
    info = {"prompt": request.prompt, "all_prompts": [request.prompt] * len(images),
            "negative_prompt": request.negative_prompt, "seed": result.seeds[0] if result else None,
            "all_seeds": result.seeds if result else [], "subseed": result.subseeds[0] if result else None,
            "all_subseeds": result.subseeds if result else [], "subseed_strength": request.subseed_strength,
            "width": request.width, "height": request.height, "sampler_name": request.sampler_name,
            "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
            "sd_model_name": engine.settings.values.get("sd_model_checkpoint"),
            "infotexts": result.infotexts if result else [], "index_of_first_image": 0,
            "version": __version__, "warnings": result.warnings if result else [],
            "interrupted": job.status == "interrupted"}
    return {"images": images if body.send_images else [], "parameters": body.model_dump(exclude={"init_images"}),
            "info": json.dumps(info)}


@sdapi.post("/txt2img")
def txt2img(body: Txt2ImgRequest, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return _run(engine, "txt2img", body)


@sdapi.post("/img2img")
def img2img(body: Img2ImgRequest, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return _run(engine, "img2img", body)


@sdapi.get("/progress")
def progress(skip_current_image: bool = False, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    job = engine.current
    queued = sum(1 for j in engine.jobs.values() if j.status == "queued")
    if job is None:
        return {"progress": 0, "eta_relative": 0, "state": {"job_count": queued, "sampling_step": 0,
                "sampling_steps": 0, "interrupted": False, "skipped": False}, "current_image": None,
                "textinfo": None, "current_task": None}
    fraction = min(1.0, 0.01 + job.step / max(job.steps, 1))
    image = None if skip_current_image or job.preview is None else _b64_png(job.preview, None)
    return {"progress": fraction, "eta_relative": job.eta or 0,
            "state": {"job": job.id, "job_count": queued + 1, "sampling_step": job.step,
                      "sampling_steps": job.steps, "interrupted": False, "skipped": False},
            "current_image": image, "textinfo": None, "current_task": job.id}


@sdapi.post("/interrupt")
def interrupt(engine: Engine = Depends(get_engine)) -> dict:
    engine.interrupt()
    return {}


@sdapi.post("/skip")
def skip(engine: Engine = Depends(get_engine)) -> dict:
    engine.skip()
    return {}


@sdapi.get("/options")
def get_options(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return dict(engine.settings.values)


@sdapi.post("/options")
def set_options(body: dict[str, Any], engine: Engine = Depends(get_engine)) -> dict:
    engine.set_options(body)
    return {}


@sdapi.get("/sd-models")
def sd_models(engine: Engine = Depends(get_engine)) -> list[dict[str, Any]]:
    return [{"title": e.title, "model_name": e.model_name, "hash": e.short_hash, "sha256": e.sha256,
             "filename": str(e.path), "config": None} for e in engine.catalog.checkpoints()]


@sdapi.get("/sd-vae")
def sd_vae(engine: Engine = Depends(get_engine)) -> list[dict[str, Any]]:
    return [{"model_name": e.path.name, "filename": str(e.path)} for e in engine.catalog.vaes()]


@sdapi.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    return [{"name": s.name, "aliases": list(s.aliases), "options": s.options} for s in registry.SAMPLERS]


@sdapi.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
             "need_inner_model": s.need_inner_model} for s in registry.SCHEDULERS]


@sdapi.get("/upscalers")
def upscalers() -> list[dict[str, Any]]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in ("None", "Lanczos", "Nearest")]


@sdapi.get("/loras")
def loras(engine: Engine = Depends(get_engine)) -> list[dict[str, Any]]:
    return [{"name": e.stem, "alias": e.alias, "path": str(e.path), "metadata": e.metadata}
            for e in engine.catalog.loras()]


@sdapi.get("/embeddings")
def embeddings(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    return engine.embeddings.listing(engine.model())


@sdapi.get("/prompt-styles")
def prompt_styles(engine: Engine = Depends(get_engine)) -> list[dict[str, Any]]:
    from sdstudio.prompt.styles import StyleDB

    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in StyleDB(engine.data_dir / "styles.csv").styles.values()]


@sdapi.post("/png-info")
def png_info(body: PngInfoRequest) -> dict[str, Any]:
    text = read_infotext(open_image(body.image, "image")) or ""
    parsed = parse_infotext(text) if text else None
    return {"info": text, "items": {"parameters": text} if text else {},
            "parameters": parsed.to_a1111_dict() if parsed else {}}


@sdapi.post("/refresh-checkpoints")
@sdapi.post("/refresh-vae")
@sdapi.post("/refresh-loras")
@sdapi.post("/refresh-embeddings")
def refresh(engine: Engine = Depends(get_engine)) -> dict:
    engine.refresh()
    return {}


@sdapi.get("/memory")
def memory(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    from sdstudio.pipeline import available_memory

    total = 0
    try:
        total = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal:"))) * 1024
    except (OSError, StopIteration):
        pass
    free = available_memory()
    return {"ram": {"free": free, "used": max(total - free, 0), "total": total}, "cuda": _cuda_memory(engine.device)}


def _cuda_memory(device: torch.device) -> dict[str, Any]:
    """A1111's `cuda` part of /sdapi/v1/memory: the GPU's free/used/total and torch's allocator figures."""
    gpu = device_memory(device)
    if gpu is None:
        return {"error": "no CUDA"}
    free, total = gpu
    stats = torch.cuda.memory_stats(device)

    def current_peak(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {"system": {"free": free, "used": total - free, "total": total},
            "active": current_peak("active_bytes"), "allocated": current_peak("allocated_bytes"),
            "reserved": current_peak("reserved_bytes"), "inactive": current_peak("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}


@sdapi.get("/cmd-flags")
def cmd_flags(request: Request) -> dict[str, Any]:
    return dict(request.app.state.flags)


def _job_view(job, with_images: bool) -> dict[str, Any]:
    view = {"id": job.id, "mode": job.mode, "status": job.status, "step": job.step, "steps": job.steps,
            "eta": job.eta, "error": job.error,
            "preview": _b64_png(job.preview, None) if job.preview is not None and job.status == "running" else None}
    if with_images and job.result is not None:
        view["images"] = [_b64_png(img, text) for img, text in zip(job.result.images, job.result.infotexts)]
        view["infotexts"] = job.result.infotexts
        view["warnings"] = job.result.warnings
    return view


@ours.post("/jobs")
def submit_job(body: dict[str, Any], engine: Engine = Depends(get_engine)) -> dict[str, str]:
    """Queue a txt2img/img2img job without waiting (body as /sdapi/v1/txt2img plus "mode")."""
    mode = body.pop("mode", "txt2img")
    if mode not in ("txt2img", "img2img"):
        raise InvalidRequestError("mode", f"must be txt2img or img2img, got {mode!r}")
    try:
        parsed = (Img2ImgRequest if mode == "img2img" else Txt2ImgRequest).model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequestError(".".join(str(p) for p in first["loc"]), first["msg"]) from exc
    return {"job_id": engine.submit(mode, generation_request(parsed), parsed.override_settings).id}


@ours.get("/jobs")
def list_jobs(engine: Engine = Depends(get_engine)) -> list[dict[str, Any]]:
    return [_job_view(job, False) for job in engine.jobs.values()]


@ours.get("/jobs/{job_id}")
def get_job(job_id: str, engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    job = engine.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return _job_view(job, True)


@ours.get("/history")
def history(q: str = "", limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=2**62),
            engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    items, total = engine.history.search(q, limit, offset)
    outputs = engine.data_dir / "outputs"
    for item in items:
        path = Path(item["path"]) if item["path"] else None
        item["image_url"] = ("/outputs/" + path.relative_to(outputs).as_posix()
                             if path and path.is_relative_to(outputs) else None)
        item["time"] = item.pop("created")
    return {"items": items, "total": total}


@ours.post("/history/{image_id}/rerun")
def rerun(image_id: int, engine: Engine = Depends(get_engine)) -> dict[str, str]:
    item = engine.history.get(image_id)
    if item is None:
        raise HTTPException(404, f"no history item {image_id}")
    if item["mode"] != "txt2img":
        raise InvalidRequestError("mode", "img2img history items cannot be re-run without their init image")
    request = pipeline.make_request(None, {k: v for k, v in item["params"].items()
                                           if k in pipeline.GenerationRequest.__dataclass_fields__})
    return {"job_id": engine.submit("txt2img", request).id}


@ours.get("/catalog")
def catalog(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    """Every model file with what the page needs: family labels, LoRA compatibility with the loaded model."""
    from sdstudio.files.detect import inspect_checkpoint
    from sdstudio.models.lora import compatibility, lora_info

    model = engine.models.current
    checkpoints = []
    for entry in engine.catalog.checkpoints():
        try:
            label = inspect_checkpoint(entry.path).label
        except SDStudioError as exc:
            label = f"error: {exc}"
        checkpoints.append({"title": entry.title, "name": entry.name, "hash": entry.short_hash, "label": label,
                            "demo": entry.name.startswith("demo-random-weights"),
                            "preview_url": f"/api/preview/checkpoint/{entry.name}" if entry.preview else None})
    loras = []
    for entry in engine.catalog.loras():
        ok, reason = compatibility(entry.path, model) if model is not None else (True, "no model loaded")
        info = lora_info(entry.metadata, entry.user_metadata)
        loras.append({"name": entry.stem, "alias": entry.alias, "compatible": ok, "reason": reason,
                      "preferred_weight": info["preferred_weight"], "activation_text": info["activation_text"],
                      "info": info, "preview_url": f"/api/preview/lora/{entry.name}" if entry.preview else None})
    listing = engine.embeddings.listing(model) if model is not None else {"loaded": {}, "skipped": {}}
    embedding_files = {entry.stem: entry for entry in engine.catalog.embeddings()}
    embeddings = []
    for name in sorted(engine.embeddings.embeddings):
        entry = embedding_files.get(name)
        embeddings.append({"name": name, "loaded": name in listing["loaded"],
                           "reason": None if name in listing["loaded"] else "does not fit the loaded model",
                           "preview_url": f"/api/preview/embedding/{entry.name}" if entry and entry.preview else None})
    return {"checkpoints": checkpoints, "loras": loras, "embeddings": embeddings,
            "vaes": [{"name": e.path.name} for e in engine.catalog.vaes()]}


@ours.get("/preview/{kind}/{name:path}")
def preview(kind: str, name: str, engine: Engine = Depends(get_engine)) -> FileResponse:
    """A model's preview image, looked up by catalog name (never a path from the request)."""
    entries = {"checkpoint": engine.catalog.checkpoints, "lora": engine.catalog.loras,
               "embedding": engine.catalog.embeddings}.get(kind)
    entry = next((e for e in entries() if e.name == name), None) if entries else None
    if entry is None or entry.preview is None:
        raise HTTPException(404, "no such preview")
    return FileResponse(entry.preview)


@ours.post("/tokens")
def tokens(body: TokensRequest, engine: Engine = Depends(get_engine)) -> dict[str, int]:
    from sdstudio.prompt.conditioning import EmbeddingLookup, count_tokens
    from sdstudio.prompt.parser import extract_extra_networks

    text, _ = extract_extra_networks(body.text)
    used, capacity = count_tokens(text, EmbeddingLookup(engine.embeddings.embeddings.values()))
    return {"used": used, "capacity": capacity}


def create_app(engine: Engine, api_auth: str | None = None, flags: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app over an engine; `api_auth` = "user:pass[,user2:pass2]" turns on HTTP basic auth."""
    app = FastAPI(title="sdstudio", version=__version__)
    app.state.engine = engine
    app.state.flags = flags or {}
    app.include_router(sdapi)
    app.include_router(ours)
    credentials = [pair.split(":", 1) for pair in api_auth.split(",")] if api_auth else []

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return JSONResponse({"error": "PayloadTooLarge", "detail": "request body too large"}, status_code=413)
        if credentials and not _authorised(request.headers.get("authorization", ""), credentials):
            return JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                                headers={"WWW-Authenticate": "Basic"})
        return await call_next(request)

    @app.exception_handler(SDStudioError)
    async def sdstudio_error(request: Request, exc: SDStudioError):
        status = 422 if isinstance(exc, InvalidRequestError) else 400
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc), "body": None, "errors": str(exc)},
                            status_code=status)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/outputs/{path:path}", include_in_schema=False)
    def output_file(path: str):
        """Files under <data>/outputs only: anything resolving elsewhere (../, symlinks out) is a 404."""
        root = (engine.data_dir / "outputs").resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(target)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    return app


def _authorised(header: str, credentials: list[list[str]]) -> bool:
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return any(secrets.compare_digest(user, u) & secrets.compare_digest(password, p) for u, p in credentials)


def ensure_demo_model(data_dir: Path) -> Path | None:
    """With an empty models/Stable-diffusion, write a tiny random-weight demo checkpoint so Generate works at once."""
    folder = data_dir / "models" / "Stable-diffusion"
    if folder.is_dir() and any(p.suffix in (".safetensors", ".ckpt") for p in folder.rglob("*")):
        return None
    from sdstudio import synthetic

    return synthetic.write_checkpoint(folder / DEMO_NAME, "sd1", "tiny")


def serve(data_dir: Path, host: str = "127.0.0.1", port: int = 7860, listen: bool = False,
          api_auth: str | None = None, insecure: bool = False, demo: bool = True, precision: str = "auto",
          converted_cache_bytes: int = CONVERTED_DEFAULT_BUDGET, device: str = "auto") -> None:
    """Run the server (blocking). `--listen` binds every interface and needs `--api-auth` unless `--insecure`;
    `device` names where models run (models/device.py) and `precision` the dtype they load in
    (models.checkpoint.precision_options; `int8`: with int8 linears); `converted_cache_bytes` bounds the
    converted weights kept on disk (models/converted.py; 0 = none)."""
    import uvicorn

    if listen:
        if not api_auth and not insecure:
            raise SDStudioError("--listen exposes the server to the network: give --api-auth user:pass "
                                "(or --insecure to accept the risk)")
        host = "0.0.0.0"
    if demo:
        made = ensure_demo_model(Path(data_dir))
        if made:
            print(f"models/Stable-diffusion was empty: wrote a DEMO checkpoint with random weights: {made}")
    where = resolve_device(device)
    engine = Engine(data_dir, converted_cache_bytes=converted_cache_bytes, device=where,
                    **precision_options(precision, where))
    flags = {"data_dir": str(data_dir), "host": host, "port": port, "listen": listen, "api_auth": bool(api_auth),
             "precision": precision, "device": str(where)}

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn waits for open requests before it exits; release the ones waiting on jobs first
            engine.close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(engine, api_auth, flags), host=host, port=port, log_level="warning")
    Server(config).run()
