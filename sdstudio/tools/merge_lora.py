"""Bake LoRAs into a checkpoint: load the base, patch it with the same LoraSet the prompts use, write the result
in the original single-file layout (safetensors) with the recipe in its metadata."""
from __future__ import annotations

import json
from pathlib import Path

from sdstudio.errors import InvalidRequestError
from sdstudio.files.hashing import addnet_hash, sha256_file
from sdstudio.files.keymaps import CheckpointParts, TextEncoderPart, join_checkpoint, split_checkpoint
from sdstudio.files.readers import read_state_dict
from sdstudio.files.writers import save_safetensors
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.lora import AppliedLora, LoraSet


def parse_lora_spec(spec: str, resolve) -> tuple[Path, float]:
    """"name_or_path:0.8" -> (path, weight); the weight defaults to 1; `resolve(name)` finds catalog names."""
    name, _, weight = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    try:
        value = float(weight)
    except ValueError as exc:
        raise InvalidRequestError("lora", f"{spec!r}: weight {weight!r} is not a number") from exc
    path = Path(name)
    return (path if path.is_file() else resolve(name)), value


def merge_loras(base: str | Path, loras: list[tuple[Path, float]], out: str | Path) -> Path:
    """Write `out`: `base` with each (LoRA file, weight) merged in (fp32 math, the base's dtypes kept)."""
    base, out = Path(base), Path(out)
    model = load_checkpoint(base)
    original = read_state_dict(base)
    parts = split_checkpoint(original)
    report = LoraSet(model).apply([AppliedLora(path, weight, weight) for path, weight in loras])
    if report.unmatched:
        raise InvalidRequestError("lora", "; ".join(report.warnings))
    encoders = []
    for part, encoder in zip(parts.text_encoders, model.text_encoders):
        live = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                for k, v in encoder.model.state_dict().items()}
        weights = {k: live.get(k, v).to(v.dtype) for k, v in part.weights.items()}
        encoders.append(TextEncoderPart(part.prefix, part.kind, weights, part.legacy_names))
    unet = {k: v.to(parts.unet[k].dtype) for k, v in model.unet.state_dict().items()}
    merged = join_checkpoint(CheckpointParts(unet=unet, vae=parts.vae, text_encoders=encoders, extras=parts.extras))
    recipe = {"type": "lora-merge", "base": base.name, "base_sha256": sha256_file(base),
              "loras": [{"name": p.name, "addnet_hash": addnet_hash(p)[:12], "weight": w} for p, w in loras]}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in merged.items()}, out,
                     metadata={"sd_merge_recipe": json.dumps(recipe), "format": "pt"})
    return out
