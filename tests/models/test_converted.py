"""Converted weights kept on disk: the next load maps them, bit-exact; stale, damaged or oversized entries are never
trusted or kept."""
from __future__ import annotations

import os
import shutil
import sys
import threading

import pytest
import torch

from sdstudio.files.readers import read_safetensors_header
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models import converted
from sdstudio.models.converted import ConvertedWeights, worth_storing

BF16 = torch.bfloat16


def modules(model):
    return {"unet": model.unet, "vae": model.vae} | {f"text{i}": e.model for i, e in enumerate(model.text_encoders)}


def assert_same_weights(a, b):
    for name, module in modules(a).items():
        ours, theirs = module.state_dict(), modules(b)[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, tensor in ours.items():
            assert tensor.dtype == theirs[key].dtype and tensor.stride() == theirs[key].stride(), f"{name} {key}"
            assert torch.equal(tensor, theirs[key]), f"{name} {key}"


def load_through(cache, path, dtype=BF16):
    model = load_checkpoint(path, dtype=dtype, converted=cache)
    cache.wait()
    return model


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_converted_load_is_kept_and_the_next_load_maps_it_bit_exact(synth_file, tmp_path, family):
    source = synth_file(family, "fp16")
    cache = ConvertedWeights(tmp_path / "converted")
    first = load_through(cache, source)
    (stored,) = (tmp_path / "converted").glob("*.safetensors")
    header = read_safetensors_header(stored)
    assert {info.dtype for info in header.tensors.values() if info.dtype.is_floating_point} == {BF16}
    second = load_through(cache, source)
    assert_same_weights(second, load_checkpoint(source, dtype=BF16))
    assert_same_weights(second, first)
    conv = second.unet.conv_in.weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)


def test_the_fast_fp32_and_exact_fp32_loads_keep_their_own_layouts(synth_file, tmp_path):
    """An fp32 load of an fp16 file converts either way; the fast path's channels-last weights never reach the
    exact path through the cache, nor the other way round."""
    source = synth_file("sd1", "fp16")
    cache = ConvertedWeights(tmp_path / "converted")

    def load(fast: bool):
        model = load_checkpoint(source, dtype=torch.float32, converted=cache, fast_fp32=fast)
        cache.wait()
        return model

    exact, fast = load(False), load(True)
    assert len(list((tmp_path / "converted").glob("*.safetensors"))) == 2
    for first, fast_path in ((exact, False), (fast, True)):
        again = load(fast_path)
        assert_same_weights(again, first)
        conv = again.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) != conv.is_contiguous() == (not fast_path)
    assert worth_storing(torch.float32, torch.float32, "cpu", fast_fp32=True)
    assert not worth_storing(torch.float32, torch.float32, "cpu")


def test_the_next_load_really_reads_the_cache_and_a_changed_source_does_not(synth_file, tmp_path):
    source = tmp_path / "model.safetensors"
    shutil.copy(synth_file("sd1", "fp16"), source)
    cache = ConvertedWeights(tmp_path / "converted")
    original = load_through(cache, source).unet.conv_out.bias.clone()
    (stored,) = (tmp_path / "converted").glob("*.safetensors")
    header = read_safetensors_header(stored)
    begin, end = header.tensors["unet/conv_out.bias"].data_offsets
    with open(stored, "r+b") as f:             # mark one weight in the cache file
        f.seek(header.data_start + begin)
        f.write(torch.full_like(original, 3.0).view(torch.uint8).numpy().tobytes())
    assert torch.equal(load_through(cache, source).unet.conv_out.bias, torch.full_like(original, 3.0))
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # the source changed: cache not used
    assert torch.equal(load_through(cache, source).unet.conv_out.bias, original)


def test_what_a_load_measured_is_kept_under_its_name_for_that_file_version_and_way_of_loading(synth_file, tmp_path):
    source = tmp_path / "model.safetensors"
    shutil.copy(synth_file("sd1", "fp16"), source)
    cache = ConvertedWeights(tmp_path / "converted")
    maxima = {"layer.a": torch.arange(4.0), "layer.b": torch.ones(2)}
    cache.write_measured("calibration 1", source, BF16, False, False, maxima)
    kept = cache.read_measured("calibration 1", source, BF16, False, False)
    assert kept.keys() == maxima.keys() and all(torch.equal(kept[k], t) for k, t in maxima.items())
    assert cache.read_measured("calibration 2", source, BF16, False, False) is None
    assert cache.read_measured("calibration 1", source, torch.float32, False, True) is None
    assert cache.read_measured("calibration 1", source, BF16, True, False) is None
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # the source changed
    assert cache.read_measured("calibration 1", source, BF16, False, False) is None


def test_a_damaged_cache_file_is_ignored_and_replaced(synth_file, tmp_path):
    source = synth_file("sd1", "fp16")
    cache = ConvertedWeights(tmp_path / "converted")
    load_through(cache, source)
    (stored,) = (tmp_path / "converted").glob("*.safetensors")
    stored.write_bytes(stored.read_bytes()[:1000])
    model = load_through(cache, source)
    assert_same_weights(model, load_checkpoint(source, dtype=BF16))
    assert stored.stat().st_size > 1000                     # written again, whole


def test_the_folder_keeps_within_its_budget_least_recently_used_first(synth_file, tmp_path):
    older, newer = synth_file("sd1", "fp16"), synth_file("sd1", "pruned")   # same size once in bf16
    probe = ConvertedWeights(tmp_path / "probe")
    load_through(probe, older)
    one = next((tmp_path / "probe").glob("*.safetensors")).stat().st_size
    cache = ConvertedWeights(tmp_path / "converted", budget_bytes=int(one * 1.5))
    load_through(cache, older)
    load_through(cache, newer)
    (kept,) = (tmp_path / "converted").glob("*.safetensors")
    assert kept.name.startswith("sd1-pruned-")
    too_small = ConvertedWeights(tmp_path / "small", budget_bytes=one // 2)
    load_through(too_small, older)
    assert not list((tmp_path / "small").glob("*"))


def test_loads_that_map_the_file_as_it_is_are_not_cached(synth_file, tmp_path):
    cache = ConvertedWeights(tmp_path / "converted")
    load_through(cache, synth_file("sd1", "pruned"), dtype=torch.float32)
    assert not (tmp_path / "converted").exists()
    load_through(cache, synth_file("sd1", "pruned"), dtype=BF16)       # fp32 file as bf16: converted, kept
    assert len(list((tmp_path / "converted").glob("*.safetensors"))) == 1


def test_a_gpu_load_in_the_files_half_dtype_copies_nothing_so_is_not_kept():
    # a GPU keeps the file's layout (no channels-last copy): its fp16 load of an fp16 file would store the file again
    assert not worth_storing(torch.float16, torch.float16, "cuda")
    assert worth_storing(torch.float16, torch.float16, "cpu")      # the CPU's half path relays out convolutions
    assert worth_storing(torch.float32, torch.float16, "cuda")     # a dtype change is a conversion anywhere


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_the_background_write_runs_at_the_lowest_cpu_priority_and_the_caller_keeps_its_own(synth_file, tmp_path,
                                                                                        monkeypatch):
    priorities = []
    real_save = converted.save_safetensors

    def save_noting_the_priority(*args, **kwargs):
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        real_save(*args, **kwargs)
    monkeypatch.setattr(converted, "save_safetensors", save_noting_the_priority)
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    load_through(ConvertedWeights(tmp_path / "converted"), synth_file("sd1", "fp16"))
    assert priorities == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    assert list((tmp_path / "converted").glob("*.safetensors"))
