"""Load k-diffusion 0.1.1.post1's `sampling`, `utils` and `external` as reference code for tests.

The installed package's `__init__` imports torchvision, clip etc., which are not installed, so the three
modules are loaded from their files under a synthetic package name; `torchvision.transforms.functional`
(imported by utils.py and never used by sampling) is a throw-away stub that exists only during loading.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_PACKAGE = "_kdiffusion_ref"


def _load() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed")
    root = Path(spec.submodule_search_locations[0])
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(root)]
    sys.modules[_PACKAGE] = package
    stubs = {name: types.ModuleType(name)
             for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
             if name not in sys.modules}
    if "torchvision.transforms" in stubs:
        stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules.update(stubs)
    try:
        loaded = {}
        for name in ("utils", "sampling", "external"):
            module_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            setattr(package, name, module)
            loaded[name] = module
    finally:
        for name in stubs:
            del sys.modules[name]
    return types.SimpleNamespace(**loaded)


_ref = _load()
sampling = _ref.sampling
external = _ref.external
