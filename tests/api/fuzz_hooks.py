"""Schemathesis hooks for tests/api/test_fuzz.py: keep generated generation jobs small in time, not in shape.

Every request still reaches the server with fuzzed types and values; only the numbers that multiply work (steps,
images, pixels) are clamped after generation, so a schema-valid `steps=1000, n_iter=100, 8192×8192` case runs as a
tiny job instead of for hours. Out-of-range values are left alone: they must still be rejected with a 4xx."""
from __future__ import annotations

from typing import Any

import schemathesis

WORK_LIMITS = {"steps": 2, "n_iter": 1, "batch_size": 2, "width": 64, "height": 64,
               "seed_resize_from_w": 64, "seed_resize_from_h": 64, "hr_scale": 1}


def clamp_work(value: Any) -> None:
    """Clamp in place every in-range work-multiplying number of a (nested) JSON body."""
    if isinstance(value, dict):
        for key, item in value.items():
            limit = WORK_LIMITS.get(key)
            if limit is not None and isinstance(item, (int, float)) and not isinstance(item, bool) and item > limit:
                if item <= 8192:  # larger values stay: the server must reject them
                    value[key] = limit
            else:
                clamp_work(item)
    elif isinstance(value, list):
        for item in value:
            clamp_work(item)


GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/api/jobs")


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    if case.operation.path in GENERATION_PATHS and isinstance(case.body, dict):
        for key in ("steps", "width", "height"):  # absent = A1111's defaults (50 steps at 512²): minutes each
            case.body.setdefault(key, WORK_LIMITS[key])
    clamp_work(case.body)
