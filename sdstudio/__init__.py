"""sdstudio: a local Stable Diffusion studio compatible with AUTOMATIC1111's files, prompts and API.

Public Python API (imported lazily so `import sdstudio` stays cheap):
`load_checkpoint(path, vae=None, use_ema=False, dtype=...)`, `txt2img(...)`, `img2img(...)`.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_checkpoint": "sdstudio.models.checkpoint",
    "txt2img": "sdstudio.pipeline",
    "img2img": "sdstudio.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdstudio' has no attribute {name!r}")
