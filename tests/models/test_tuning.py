"""Fast-path choices measured once per machine and kept: the faster way wins, later processes read the choice."""
from __future__ import annotations

import inspect
import json
import time

import pytest
import torch

from sdstudio.models import attention, fused, int8, tuning, winograd


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTUDIO_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def sleepers(candidate_s: float, baseline_s: float, calls: list[str]):
    """`ways` for candidate_pays: two runs that sleep and log their calls; building them is logged too."""
    def sleeper(seconds: float, name: str):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    def ways():
        calls.append("built")
        return sleeper(candidate_s, "c"), sleeper(baseline_s, "b")
    return ways


@pytest.mark.parametrize("candidate_s,baseline_s,expected", [(0.001, 0.02, True), (0.02, 0.001, False),
                                                             (0.01, 0.0105, False)])   # within the margin: no
def test_the_faster_way_is_chosen_once_and_kept(cache, candidate_s, baseline_s, expected):
    calls = []
    assert tuning.candidate_pays("case", sleepers(candidate_s, baseline_s, calls), torch.float32) == expected
    assert calls.count("c") == calls.count("b") == tuning.ROUNDS + 1   # one untimed run each, then alternating
    assert calls.count("built") == 1
    record = json.loads(tuning.choice_path("case").read_text())
    assert record["candidate_pays"] == expected
    assert (record["baseline_ms"] >= tuning.MARGIN * record["candidate_ms"]) == expected
    calls.clear()   # a later process: the kept choice, nothing run or even built
    assert tuning.candidate_pays("case", sleepers(1, 1, calls), torch.float32) == expected
    assert calls == []


def test_a_damaged_choice_is_measured_again(cache):
    path = tuning.choice_path("case")
    path.write_text("{not json")
    calls = []
    assert tuning.candidate_pays("case", sleepers(0.001, 0.02, calls), torch.float32)
    assert calls and json.loads(path.read_text())["candidate_pays"] is True


def test_choices_are_kept_per_thread_count(cache):
    threads = torch.get_num_threads()
    try:
        first = tuning.choice_path("case")
        torch.set_num_threads(threads + 1)
        assert tuning.choice_path("case") != first
    finally:
        torch.set_num_threads(threads)
    assert tuning.choice_path("case") == first


@pytest.mark.parametrize("choice,dtype,name", [
    (winograd.winograd_pays, torch.bfloat16, "winograd"), (winograd.winograd_pays, torch.float32, "winograd-fp32"),
    (attention.openvino_pays, torch.bfloat16, "openvino-attention"),
    (attention.blocked_pays, torch.bfloat16, "blocked-attention"),
    (attention.blocked_pays, torch.float32, "blocked-attention-fp32"),
    (attention.flash_pays, torch.float32, "flash-attention-fp32"), (int8.int8_pays, torch.bfloat16, "int8-linear"),
    (int8.int8_pays, torch.float32, "int8-linear-fp32"),
    (fused.gelu_product_pays, torch.float32, "gelu-product")])
def test_the_fast_path_choices_follow_their_measurement_on_this_machine(cache, choice, dtype, name):
    if dtype == torch.bfloat16 and not tuning.native_bf16():
        pytest.skip("bf16 kernels are not measured without native bf16 math (the test below)")
    if (choice is attention.flash_pays and attention._flash_kernels(dtype) is None
            or choice is fused.gelu_product_pays and fused._gelu_product_kernel() is None):
        pytest.skip("no such kernel for this CPU")
    choice.cache_clear()
    try:
        per_dtype = "dtype" in inspect.signature(choice.__wrapped__).parameters
        made = choice(dtype) if per_dtype else choice()
    finally:
        choice.cache_clear()
    record = json.loads(tuning.choice_path(name).read_text())
    assert made == record["candidate_pays"] == (record["baseline_ms"] >= tuning.MARGIN * record["candidate_ms"])
    assert record["candidate_ms"] > 0 and record["baseline_ms"] > 0


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_candidate_is_measured_only_on_a_cpu_with_native_bf16(cache, monkeypatch, native):
    """bf16 is emulated elsewhere: the bf16 fast path's kernels are not for such CPUs, and measuring them there took
    minutes (int8 products with bf16 output run oneDNN's reference code)."""
    monkeypatch.setattr(tuning, "native_bf16", lambda: native)
    calls = []
    assert tuning.candidate_pays("case", sleepers(0.001, 0.02, calls), torch.bfloat16) is native
    assert bool(calls) == native == tuning.choice_path("case").exists()
    assert tuning.candidate_pays("fp32 case", sleepers(0.001, 0.02, calls), torch.float32)


@pytest.mark.skipif(attention._flash_kernels() is None, reason="the flash kernel needs AVX512-BF16 and a C compiler")
def test_a_kept_flash_choice_consults_no_other_kernel(cache):
    """The flash kernel is measured against OpenVINO's kernel where that beats PyTorch's; once kept, its choice is a
    file read: OpenVINO is not even imported for it (~0.3 s of every first UNet call)."""
    choices = (attention.flash_pays, attention.openvino_pays, attention._openvino)
    for choice in choices:
        choice.cache_clear()
    try:
        made = attention.flash_pays()
        assert attention.openvino_pays.cache_info().misses == 1      # the measurement chose its baseline
        for choice in choices:
            choice.cache_clear()
        assert attention.flash_pays() == made == json.loads(tuning.choice_path("flash-attention").read_text())[
            "candidate_pays"]
        assert attention._openvino.cache_info().misses == 0 and attention.openvino_pays.cache_info().misses == 0
    finally:
        for choice in choices:
            choice.cache_clear()
