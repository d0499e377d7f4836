"""Schemathesis hooks for tests/api/test_fuzz.py: keep generated generation jobs small in time, not in shape.

Every request still reaches the server with fuzzed types and values; only the numbers that multiply work (steps,
images, pixels) are clamped after generation, so a schema-valid `steps=1000, n_iter=100, 8192×8192` case runs as a
tiny job instead of for hours. Out-of-range values are left alone: they must still be rejected with a 4xx."""
from __future__ import annotations

from typing import Any

import schemathesis

from sdstudio.api.schemas import Txt2ImgRequest

SMALL = {"steps": 2, "n_iter": 1, "batch_size": 2, "width": 64, "height": 64,
         "seed_resize_from_w": 64, "seed_resize_from_h": 64}
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/jobs")


def schema_maximum(field: str) -> int:
    """The `le` bound the request model declares for `field`."""
    return next(rule.le for rule in Txt2ImgRequest.model_fields[field].metadata if hasattr(rule, "le"))


MAXIMA = {field: schema_maximum(field) for field in SMALL}


def clamp_work(value: Any) -> None:
    """Clamp in place every in-range work-multiplying number of a (nested) JSON body."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in SMALL and isinstance(item, (int, float)) and not isinstance(item, bool):
                if SMALL[key] < item <= MAXIMA[key]:  # larger values stay: the server must reject them
                    value[key] = SMALL[key]
            else:
                clamp_work(item)
    elif isinstance(value, list):
        for item in value:
            clamp_work(item)


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    if case.operation.path in GENERATION_PATHS and isinstance(case.body, dict):
        for key in ("steps", "width", "height"):  # absent = A1111's defaults (50 steps at 512²): minutes each
            case.body.setdefault(key, SMALL[key])
    clamp_work(case.body)
