"""Loaded checkpoints kept within a RAM budget; a failed load keeps what was loaded."""
from __future__ import annotations

import pytest

from sdstudio.errors import ModelFileError
from sdstudio.models.cache import CheckpointCache, model_bytes


def test_switching_back_is_instant_and_failed_loads_keep_the_current_model(synth_file, tmp_path):
    cache = CheckpointCache()
    a = cache.get(synth_file("sd1", "pruned"))
    b = cache.get(synth_file("sd2", "pruned"))
    assert cache.current is b
    assert cache.get(synth_file("sd1", "pruned")) is a          # no reload
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 7)
    with pytest.raises(ModelFileError, match="broken.safetensors"):
        cache.get(broken)
    assert cache.current is a and len(cache.loaded()) == 2
    (tmp_path / "missing").mkdir()
    with pytest.raises(ModelFileError):
        cache.get(tmp_path / "missing" / "gone.ckpt")
    assert cache.current is a


def test_least_recently_used_models_are_evicted_over_budget(synth_file):
    first = synth_file("sd1", "pruned")
    probe = CheckpointCache()
    one = model_bytes(probe.get(first))
    cache = CheckpointCache(budget_bytes=int(one * 2.5))
    cache.get(first)
    cache.get(synth_file("sd1", "fp16"))
    cache.get(synth_file("sd1", "emaonly"))
    cache.get(synth_file("sd1-inpaint", "pruned"))
    assert first.resolve() not in cache.loaded() and len(cache.loaded()) <= 3
    assert cache.loaded()[-1] == synth_file("sd1-inpaint", "pruned").resolve()
