"""LoRA and LyCORIS files applied to a loaded checkpoint by patching its weights in place.

A file's keys are grouped per module (kohya `lora_unet_…` names in the diffusers or the original UNet layout,
`lora_te_/te1_/te2_` text-encoder names, PEFT/diffusers dotted names), each group becomes an adapter by the first
format module that recognises it (`FORMATS`), and adapters are bound to the model's parameters through a name table
built from the model itself. Every key is either applied or counted as unmatched.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from sdstudio.errors import ModelFileError, SDStudioError
from sdstudio.files.keymaps import open_clip_to_original, unet_to_original
from sdstudio.files.readers import read_state_dict, read_tensor_infos
from sdstudio.models.checkpoint import LoadedCheckpoint
from sdstudio.models.int8 import finish_int8_calibration
from sdstudio.models.lora import full, ia3, loha, lokr, lora
from sdstudio.models.lora.base import Adapter
from sdstudio.models.patcher import Patch, WeightPatcher

log = logging.getLogger(__name__)

FORMATS = [lora.load, loha.load, lokr.load, full.load, ia3.load]   # first match wins
SUFFIXES = sorted({s for spelling in lora.SPELLINGS for s in spelling if s} | set(loha.KEYS) | {
    "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "weight", "on_input", "alpha", "dora_scale", "lora_magnitude_vector"}, key=len, reverse=True)
OLD_DIFFUSERS = re.compile(r"^(?P<module>.*)_lora\.(?P<which>up|down)\.weight$")   # attn processor LoRAs
# Cross-attention key widths of the real families (SD1 CLIP-L, SD2 OpenCLIP-H, SDXL CLIP-L + bigG)
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, suffix) of a LoRA file key."""
    old = OLD_DIFFUSERS.match(key)
    if old:
        return old["module"].replace(".processor.", ".").replace("to_out", "to_out.0"), f"lora.{old['which']}.weight"
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _normalise_module(name: str) -> str:
    """Dotted PEFT/diffusers module paths -> kohya underscore names (`unet.down_blocks.0…` -> `lora_unet_down_…`)."""
    if name.startswith(("lora_unet_", "lora_te")):
        return name
    name = name.removeprefix("base_model.model.")
    for dotted, kohya in (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te_")):
        if name.startswith(dotted):
            return kohya + name[len(dotted):].replace(".", "_")
    return name.replace(".", "_")


@dataclass
class LoraFile:
    """A LoRA file read into per-module adapters, with what could not be read."""

    path: Path
    adapters: dict[str, Adapter]       # kohya-style module name -> adapter
    unreadable: list[str]              # keys no format recognised
    metadata: dict[str, str]
    family: str | None


def lora_family(tensors: dict[str, Any], metadata: dict[str, str]) -> str | None:
    """'sd1' | 'sd2' | 'sdxl' from `ss_base_model_version`/ModelSpec, else from names and shapes; None if unknown."""
    declared = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "xl" in declared:
        return "sdxl"
    if "v2" in declared or "sd_v2" in declared:
        return "sd2"
    if "v1" in declared:
        return "sd1"
    keys = list(tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    if any("model_transformer_resblocks_" in k for k in keys):   # A1111's names of the SD2 OpenCLIP text encoder
        return "sd2"
    for key, tensor in tensors.items():
        if "attn2" in key and ("to_k" in key) and ("lora_down" in key or "lora_A" in key):
            return CONTEXT_FAMILY.get(int(tensor.shape[-1]))
    return None


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA/LyCORIS file safely into adapters; a file with no recognisable key is an error naming it."""
    path = Path(path)
    tensors = read_state_dict(path)
    _, metadata = read_tensor_infos(path)
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    unreadable = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unreadable.append(key)
            continue
        module, suffix = split
        groups[_normalise_module(module)][suffix] = tensor
    adapters = {}
    for module, group in groups.items():
        adapter = next((a for a in (fmt(group) for fmt in FORMATS) if a is not None), None)
        if adapter is None:
            unreadable += [f"{module}.{s}" for s in group]
            continue
        scale = group.get("dora_scale", group.get("lora_magnitude_vector"))
        adapter.dora_scale = scale
        unreadable += [f"{module}.{s}" for s in group
                       if s not in adapter.keys and s not in ("dora_scale", "lora_magnitude_vector")]
        adapters[module] = adapter
    if not adapters:
        raise ModelFileError(path, f"no LoRA/LyCORIS keys recognised (first keys: {sorted(tensors)[:3]})")
    return LoraFile(path, adapters, unreadable, metadata, lora_family(tensors, metadata))


@dataclass
class Target:
    """Where a kohya module name points in the loaded model."""

    weight: str        # patcher parameter name of the weight
    bias: str | None
    text: bool         # text-encoder module (te multiplier) or UNet (unet multiplier)


def model_targets(model: LoadedCheckpoint) -> tuple[dict[str, Target], dict[str, Tensor]]:
    """Kohya module name -> target, and patcher parameter name -> live tensor, for every weight of the model."""
    targets: dict[str, Target] = {}
    params: dict[str, Tensor] = {}
    unet_params = dict(model.unet.named_parameters())
    modules = sorted({name.rsplit(".", 1)[0] for name in unet_params if name.endswith(".weight")})
    original = unet_to_original({m + ".weight": m for m in modules})
    names = {m: [m] for m in modules}
    for original_key, module in original.items():
        names[module].append(original_key.rsplit(".", 1)[0])
    for module, spellings in names.items():
        bias = f"unet:{module}.bias" if module + ".bias" in unet_params else None
        target = Target(f"unet:{module}.weight", bias, False)
        for spelling in spellings:
            targets["lora_unet_" + spelling.replace(".", "_")] = target
    params.update({f"unet:{k}": v for k, v in unet_params.items()})
    sdxl = model.family == "sdxl"
    for index, encoder in enumerate(model.text_encoders):
        prefixes = ["lora_te_"] if index == 0 else []
        if sdxl:
            prefixes.append(f"lora_te{index + 1}_")
        encoder_params = dict(encoder.model.named_parameters())
        modules = {key.rsplit(".", 1)[0]: ("" if key.startswith("text_model.") else "text_model.") + key
                   for key in encoder_params if key.endswith(".weight")}
        # A1111 also matches its own (compvis) module names: SD1 `transformer_text_model_…`, SD2 `model_transformer_…`
        compvis = {}
        if index == 0 and not sdxl:
            layers = [k for k in modules.values() if k.startswith("text_model.encoder.")]
            compvis = (_open_clip_names(layers) if encoder.kind.startswith("open_clip") else
                       {ours: "transformer." + ours.removesuffix(".weight") for ours in layers})
        for module, ours in modules.items():
            bias = f"te{index}:{module}.bias" if module + ".bias" in encoder_params else None
            target = Target(f"te{index}:{module}.weight", bias, True)
            names = [prefix + ours.removesuffix(".weight") for prefix in prefixes]
            if ours in compvis:
                names += [compvis[ours], "lora_te_" + compvis[ours]]
            for name in names:
                targets[name.replace(".", "_")] = target
        params.update({f"te{index}:{k}": v for k, v in encoder_params.items()})
    return targets, params


def _open_clip_names(weight_keys: list[str]) -> dict[str, str]:
    """Our CLIP encoder-layer weight keys -> A1111's SD2 module names (`model.transformer.resblocks.N.attn_q_proj`)."""
    index = {key: torch.tensor([float(i)]) for i, key in enumerate(weight_keys)}   # each key's position, packed
    names = {}
    for original, packed in open_clip_to_original(index).items():
        if original.endswith(".in_proj_weight"):    # q, k, v packed: A1111 names them attn_q_proj, attn_k_proj, …
            for which, position in zip("qkv", packed.tolist()):
                names[weight_keys[int(position)]] = f"model.{original.removesuffix('.in_proj_weight')}_{which}_proj"
        elif original.endswith(".weight"):
            names[weight_keys[int(packed.item())]] = "model." + original.removesuffix(".weight")
    return names


@dataclass
class AppliedLora:
    path: Path
    te: float
    unet: float


@dataclass
class ApplyReport:
    """What applying a set of LoRA files did."""

    warnings: list[str] = field(default_factory=list)
    unmatched: dict[str, int] = field(default_factory=dict)     # file name -> keys that did not apply
    patched_parameters: int = 0


class LoraSet:
    """LoRA files applied to one loaded model through one WeightPatcher (files cached by path and mtime)."""

    def __init__(self, model: LoadedCheckpoint):
        self.model = model
        self.targets, params = model_targets(model)
        if model.patcher is None:   # one patcher per model, shared by every LoraSet on it
            model.patcher = WeightPatcher(params)
        self.patcher = model.patcher
        self._files: dict[tuple[Path, int], LoraFile] = {}
        self._mismatched: set[tuple] = set()      # (file, module) whose ΔW does not fit the model
        self._mismatched_now: set[tuple] = set()

    def read(self, path: Path) -> LoraFile:
        key = (path.resolve(), path.stat().st_mtime_ns)
        if key not in self._files:
            self._files[key] = read_lora(path)
        return self._files[key]

    def apply(self, loras: list[AppliedLora]) -> ApplyReport:
        """Make the model's weights base + these LoRAs (deltas summed); [] restores the base weights exactly."""
        report = ApplyReport()
        patches: dict[str, list[Patch]] = defaultdict(list)
        for applied in loras:
            lora_file = self.read(applied.path)
            unmatched = len(lora_file.unreadable)
            family = self.model.family.removesuffix("-refiner")
            if lora_file.family and lora_file.family != family:
                report.warnings.append(f"{applied.path.name}: {lora_file.family.upper()} LoRA on a "
                                       f"{self.model.family.upper()} model")
            for module, adapter in lora_file.adapters.items():
                target = self.targets.get(module)
                if target is None:
                    unmatched += len(adapter.keys)
                    continue
                strength = applied.te if target.text else applied.unet
                if strength == 0:
                    continue
                source = (str(applied.path), module)
                if source in self._mismatched:
                    unmatched += len(adapter.keys)
                    continue
                if adapter.weight_delta is not None:
                    patches[target.weight].append(Patch(source, strength, self._checked(source, adapter),
                                                        adapter.low_rank_factors))
                if adapter.bias_delta is not None and target.bias is not None:
                    bias = adapter.bias_delta
                    patches[target.bias].append(Patch(source + ("bias",), strength, lambda b, d=bias: d.reshape(b.shape)))
            if unmatched:
                report.unmatched[applied.path.name] = unmatched
                report.warnings.append(f"{applied.path.name}: {unmatched} keys did not apply to this "
                                       f"{self.model.family} model")
        finish_int8_calibration(self.model.unet)   # on the model's own weights (models/int8.py)
        report.patched_parameters = self.patcher.set_patches(dict(patches))
        late = {}
        for applied in loras:   # shape mismatches found while patching (first application of a file)
            late[applied.path.name] = sum(1 for path, _ in self._mismatched_now if path == str(applied.path))
        self._mismatched_now.clear()
        for name, count in late.items():
            if count:
                report.unmatched[name] = report.unmatched.get(name, 0) + count
                report.warnings.append(f"{name}: {count} modules have shapes that do not fit this "
                                       f"{self.model.family} model")
        return report

    def _checked(self, source: tuple, adapter: Adapter) -> Callable[[Tensor], Tensor]:
        """ΔW of the adapter, computed on the CPU where its tensors are (the patcher moves it to the weight's device),
        or zeros (recorded as a mismatch) when its shape does not fit the weight."""
        def delta(weight: Tensor) -> Tensor:
            weight = weight.cpu()
            try:
                return adapter.delta(weight)
            except (ValueError, RuntimeError):
                self._mismatched.add(source)
                self._mismatched_now.add(source)
                return torch.zeros_like(weight)
        return delta


def parse_weights(tag) -> tuple[float, float]:
    """A1111 `<lora:name:te:unet:dyn>` weights: te = 1st number (default 1), unet = 2nd (default te); te=/unet=."""
    te_text = tag.named.get("te", tag.positional[1] if len(tag.positional) > 1 else "1")
    te = float(te_text)
    unet_text = tag.named.get("unet", tag.positional[2] if len(tag.positional) > 2 else None)
    return te, (float(unet_text) if unet_text is not None else te)


class LoraNetworks:
    """The pipeline's ExtraNetworks for `<lora:…>` / `<lyco:…>` tags, names resolved through the catalog."""

    def __init__(self, model: LoadedCheckpoint, catalog):
        self.loras = LoraSet(model)
        self.catalog = catalog

    def apply(self, tags):
        """Apply the tags' LoRAs (only changed parameters are re-patched); report hashes and warnings."""
        from sdstudio.pipeline import NetworkReport

        warnings, chosen, hashes = [], [], []
        for tag in tags:
            if tag.kind not in ("lora", "lyco") or not tag.positional:
                continue
            name = tag.positional[0]
            try:
                te, unet = parse_weights(tag)
            except ValueError:
                warnings.append(f"<{tag.kind}:{':'.join(tag.positional)}>: weight is not a number; LoRA not applied")
                continue
            try:
                entry = self.catalog.find_lora(name)
            except SDStudioError:
                warnings.append(f"LoRA '{name}' is not installed (models/Lora); not applied")
                continue
            chosen.append(AppliedLora(entry.path, te, unet))
            self.catalog.ensure_hashes(entry)
            if entry.addnet_hash:
                hashes.append(f"{name.replace(':', '').replace(',', '')}: {entry.addnet_hash[:12]}")
        try:
            report = self.loras.apply(chosen)
        except ModelFileError as exc:
            self.loras.apply([])
            return NetworkReport(warnings=warnings + [str(exc)])
        infotext = {"Lora hashes": ", ".join(hashes)} if hashes else {}
        return NetworkReport(infotext=infotext, warnings=warnings + report.warnings)

    def restore(self) -> None:
        """Base weights back, bit-exact."""
        self.loras.apply([])


def compatibility(path: str | Path, model: LoadedCheckpoint) -> tuple[bool, str]:
    """(ok, reason) for the web page's badge: declared/inferred family vs the loaded model."""
    tensors, metadata = read_tensor_infos(path)
    family = lora_family(tensors, metadata)
    model_family = model.family.removesuffix("-refiner")
    if family is None:
        return True, "family unknown"
    if family != model_family:
        return False, f"{family.upper()} LoRA; the loaded model is {model.family.upper()}"
    return True, family.upper()


def lora_info(metadata: dict[str, Any], user_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summary of kohya `ss_*` training metadata and A1111's user-metadata sidecar for the catalog/web page."""
    user_metadata = user_metadata or {}
    tags = metadata.get("ss_tag_frequency") or {}
    if isinstance(tags, str):
        try:
            tags = json.loads(tags)
        except ValueError:
            tags = {}
    counts: dict[str, int] = defaultdict(int)
    for dataset in tags.values() if isinstance(tags, dict) else []:
        for tag, count in dataset.items():
            counts[tag.strip()] += int(count)
    return {
        "base_model": metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture"),
        "dim": metadata.get("ss_network_dim"), "alpha": metadata.get("ss_network_alpha"),
        "resolution": metadata.get("ss_resolution"), "module": metadata.get("ss_network_module"),
        "trigger_words": [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:10]],
        "activation_text": user_metadata.get("activation text", ""),
        "preferred_weight": user_metadata.get("preferred weight", 0) or 1.0,
        "notes": user_metadata.get("notes", ""),
    }

