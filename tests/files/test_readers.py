"""Model-file readers and writers: safetensors header validation, zero-copy mmap loading, pickles, atomic writes."""
from __future__ import annotations

import json
import os
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from sdstudio.errors import ModelFileError
from sdstudio.files.readers import (
    CONVERSION_CHUNK,
    TensorInfo,
    copy_converting,
    detect_container,
    file_region,
    is_file_mapped,
    load_pickle,
    read_safetensors_header,
    read_state_dict,
    read_tensor_infos,
)
from sdstudio.files.writers import save_safetensors, save_torch

MB = 1024 * 1024


def _raw_safetensors(path: Path, header: dict, data: bytes, pad_to: int = 8) -> Path:
    """Write a safetensors file byte by byte (u64 length, JSON, data) so each test controls every field."""
    header_bytes = json.dumps(header).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % pad_to)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _small_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f16": torch.randn(3, 4, generator=generator).half(),
        "bf16": torch.randn(2, 5, generator=generator).bfloat16(),
        "i64": torch.arange(-3, 4),
        "f32": torch.randn(7, generator=generator),
    }


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- container detection ---------------------------------------------------------------------------------------

def test_detect_container_by_magic_not_extension(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "looks_like.ckpt")
    torch.save({"w": torch.ones(2)}, tmp_path / "looks_like.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    assert detect_container(tmp_path / "looks_like.ckpt") == "safetensors"
    assert detect_container(tmp_path / "looks_like.safetensors") == "torch-zip"
    assert detect_container(tmp_path / "old.bin") == "torch-legacy"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        read_state_dict(path)


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are not weights at all")
    with pytest.raises(ModelFileError, match="unknown file format"):
        read_state_dict(path)


# --- safetensors header validation -----------------------------------------------------------------------------

def test_truncated_safetensors_names_first_tensor_past_the_end(tmp_path):
    header = {"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 16, 32), "c": _entry("F32", [4], 32, 48)}
    path = _raw_safetensors(tmp_path / "cut.safetensors", header, bytes(20))  # 'b' ends at 32 > 20
    with pytest.raises(ModelFileError, match=r"b: data ends at byte 32 .* only 20 data bytes") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a":1}')
    with pytest.raises(ModelFileError, match="header: declared header length 10000 is impossible"):
        read_safetensors_header(path)


def test_header_length_absurdly_large(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(ModelFileError, match="header: declared header length"):
        read_safetensors_header(path)


def test_header_offsets_disagree_with_shape(tmp_path):
    path = _raw_safetensors(tmp_path / "sizes.safetensors", {"w": _entry("F32", [2, 2], 0, 8)}, bytes(8))
    with pytest.raises(ModelFileError, match=r"w: data_offsets \[0, 8\] span 8 bytes but shape \[2, 2\] of F32 needs 16"):
        read_safetensors_header(path)


def test_header_offsets_overlap(tmp_path):
    header = {"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}
    path = _raw_safetensors(tmp_path / "overlap.safetensors", header, bytes(24))
    with pytest.raises(ModelFileError, match="b: data_offsets \\[8, 24\\] overlap 'a'"):
        read_safetensors_header(path)


def test_header_not_json(tmp_path):
    path = tmp_path / "nojson.safetensors"
    body = b"{this is not json}"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ModelFileError, match="header: not valid UTF-8 JSON"):
        read_safetensors_header(path)


def test_header_not_utf8(tmp_path):
    path = tmp_path / "latin1.safetensors"
    body = b'{"\xe9": 1}'
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ModelFileError, match="header: not valid UTF-8 JSON"):
        read_safetensors_header(path)


@pytest.mark.parametrize("entry, problem", [
    (_entry("F13", [1], 0, 4), "w: unknown dtype 'F13'"),
    (_entry("F32", [-1], 0, 4), "w: shape [-1] is not a list of non-negative integers"),
    (_entry("F32", [1], 4, 0), "w: data_offsets [4, 0] is not [begin, end]"),
    ([1, 2], "w: expected an object"),
])
def test_header_bad_entry(tmp_path, entry, problem):
    path = _raw_safetensors(tmp_path / "bad.safetensors", {"w": entry}, bytes(4))
    with pytest.raises(ModelFileError) as info:
        read_safetensors_header(path)
    assert problem in str(info.value)


def test_header_metadata_must_be_strings(tmp_path):
    header = {"__metadata__": {"ss_epoch": 3}, "w": _entry("F32", [1], 0, 4)}
    path = _raw_safetensors(tmp_path / "meta.safetensors", header, bytes(4))
    with pytest.raises(ModelFileError, match="__metadata__: value of 'ss_epoch' is int"):
        read_safetensors_header(path)


def test_header_infos_and_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2, 3, dtype=torch.float16)}, path, metadata={"ss_network_dim": "4"})
    infos, metadata = read_tensor_infos(path)
    assert metadata == {"ss_network_dim": "4"}
    assert infos["w"].dtype == torch.float16 and infos["w"].shape == (2, 3)
    assert infos["w"].data_offsets == (0, 12)


# --- safetensors loading -----------------------------------------------------------------------------------------

def test_safetensors_load_is_zero_copy_and_matches_reference(tmp_path):
    path = tmp_path / "big.safetensors"
    n = 50 * MB // 4
    source = {
        "f32": torch.arange(n, dtype=torch.float32),
        "i32": -torch.arange(n, dtype=torch.int32),
        "f16": torch.arange(2 * n, dtype=torch.float16),
        "i64": torch.arange(n // 2, dtype=torch.int64) * 3,
    }
    safetensors.torch.save_file(source, path)
    del source
    before = _resident_bytes()
    loaded = read_state_dict(path)
    grown = _resident_bytes() - before
    assert grown < 20 * MB, f"loading 200 MB raised RSS by {grown / MB:.0f} MB"
    _assert_same(loaded, safetensors.torch.load_file(path))


def test_safetensors_mmap_is_private(tmp_path):
    path = tmp_path / "cow.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1024)}, path)
    original = path.read_bytes()
    loaded = read_state_dict(path)
    loaded["w"] += 5.0
    assert path.read_bytes() == original
    assert torch.equal(read_state_dict(path)["w"], torch.zeros(1024))


def test_misaligned_tensor_is_copied_correctly(tmp_path):
    values = [1.5, -2.0, 3.25]
    header = {"x": _entry("I8", [1], 0, 1), "w": _entry("F32", [3], 1, 13)}
    data = b"\x07" + struct.pack("<3f", *values)
    path = _raw_safetensors(tmp_path / "odd.safetensors", header, data)
    loaded = read_state_dict(path)
    assert torch.equal(loaded["w"], torch.tensor(values))
    assert loaded["x"].item() == 7


def test_zero_size_and_scalar_tensors(tmp_path):
    path = tmp_path / "edge.safetensors"
    source = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    safetensors.torch.save_file(source, path)
    loaded = read_state_dict(path)
    assert loaded["empty"].shape == (0, 3)
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 2.5


# --- writers -----------------------------------------------------------------------------------------------------

def test_save_safetensors_round_trip_dtypes(tmp_path):
    path = tmp_path / "out.safetensors"
    source = _small_state() | {"flag": torch.tensor([True, False, True])}
    save_safetensors(source, path, metadata={"modelspec.title": "test"})
    _assert_same(safetensors.torch.load_file(path), source)  # the reference library reads our file
    _assert_same(read_state_dict(path), source)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"modelspec.title": "test"}


def test_save_safetensors_accepts_views_of_one_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    source = {"first": base[:6].view(2, 3), "second_t": base[6:].view(2, 3).t()}
    path = tmp_path / "views.safetensors"
    save_safetensors(source, path)
    _assert_same(safetensors.torch.load_file(path), {k: v.contiguous() for k, v in source.items()})


def test_atomic_write_leaves_no_temp_file(tmp_path):
    save_safetensors(_small_state(), tmp_path / "a.safetensors")
    save_torch(_small_state(), tmp_path / "b.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.ckpt"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="bad: cannot store"):
        save_safetensors({"w": torch.zeros(2), "bad": np.zeros(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_torch_writes_state_dict_wrapper(tmp_path):
    path = tmp_path / "out.ckpt"
    source = _small_state()
    save_torch(source, path)
    raw = load_pickle(path)
    assert list(raw) == ["state_dict"]
    _assert_same(raw["state_dict"], source)


# --- pickles -----------------------------------------------------------------------------------------------------

def test_lightning_ckpt_unwraps_and_drops_non_tensors(tmp_path):
    path = tmp_path / "model.ckpt"
    source = _small_state()
    torch.save({"state_dict": source, "global_step": 5, "epoch": 1}, path)
    _assert_same(read_state_dict(path), source)


def test_state_dict_nested_twice_unwraps(tmp_path):
    path = tmp_path / "nested.ckpt"
    source = _small_state()
    torch.save({"state_dict": {"state_dict": source}, "global_step": 5}, path)
    _assert_same(read_state_dict(path), source)


def test_model_wrapper_unwraps(tmp_path):
    path = tmp_path / "model.pth"
    source = _small_state()
    torch.save({"model": source, "optimizer": {"lr": 0.1}}, path)
    _assert_same(read_state_dict(path), source)


def test_top_level_tensors_win_over_wrapper_keys(tmp_path):
    path = tmp_path / "flat.ckpt"
    source = _small_state()
    torch.save(source | {"model": {"unrelated": torch.ones(1)}}, path)
    _assert_same(read_state_dict(path), source)


def test_file_without_tensors_is_an_error(tmp_path):
    path = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"global_step": 5}}, path)
    with pytest.raises(ModelFileError, match="no tensors found"):
        read_state_dict(path)


def test_legacy_format_loads(tmp_path):
    path = tmp_path / "old.ckpt"
    source = _small_state()
    torch.save({"state_dict": source, "global_step": 5}, path, _use_new_zipfile_serialization=False)
    _assert_same(read_state_dict(path), source)
    assert not any(is_file_mapped(t) for t in read_state_dict(path).values())   # read into memory, not mapped


def test_torch_zip_tensors_are_views_of_our_own_mapping_of_the_file(tmp_path):
    path = tmp_path / "model.ckpt"
    base = torch.arange(48, dtype=torch.float16).reshape(6, 8)
    source = {"plain": torch.randn(5, 7), "shared": base, "row": base[2], "transposed": base.t(),
              "ints": torch.arange(10), "empty": torch.empty(0)}
    torch.save({"state_dict": source, "global_step": 5}, path)
    tensors = read_state_dict(path)
    for name, tensor in source.items():
        assert torch.equal(tensors[name], tensor) and tensors[name].stride() == tensor.stride(), name
        assert is_file_mapped(tensors[name]) == (tensor.numel() > 0), name
    assert file_region(tensors["plain"]) is not None and file_region(tensors["transposed"]) is None
    assert tensors["row"].data_ptr() == tensors["shared"][2].data_ptr()   # views of one storage stay one


def test_tensor_infos_of_pickle(tmp_path):
    path = tmp_path / "model.ckpt"
    source = _small_state()
    torch.save({"state_dict": source}, path)
    infos, metadata = read_tensor_infos(path)
    assert metadata == {}
    assert infos == {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in source.items()}


def test_load_pickle_returns_whole_embedding_object(tmp_path):
    # A1111 .pt embedding as old versions saved it: ParameterDict, ints, strings, a numpy scalar.
    path = tmp_path / "style.pt"
    vectors = torch.randn(2, 8)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": vectors}),
                "name": "style", "step": np.int64(500)}, path)
    obj = load_pickle(path)
    assert obj["string_to_token"] == {"*": 265} and obj["name"] == "style" and obj["step"] == 500
    assert torch.equal(obj["string_to_param"]["*"], vectors)


def test_load_pickle_refuses_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(1)}, path)
    with pytest.raises(ModelFileError, match="is a safetensors file"):
        load_pickle(path)


def test_lightning_callback_reference_is_read_as_data(tmp_path, monkeypatch):
    # Old Lightning checkpoints key "callbacks" by the ModelCheckpoint class itself; pytorch_lightning is not needed.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = model_checkpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "lightning.ckpt"
    source = _small_state()
    torch.save({"state_dict": source, "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.5)}}}, path)
    _assert_same(read_state_dict(path), source)
    callbacks = load_pickle(path)["callbacks"]
    assert [key.__name__ for key in callbacks] == ["_LightningModelCheckpoint"]


def test_missing_file_is_a_model_file_error(tmp_path):
    from sdstudio.files.readers import read_state_dict

    with pytest.raises(ModelFileError, match="gone.safetensors: cannot be read: No such file"):
        read_state_dict(tmp_path / "gone.safetensors")


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_release_file_pages_drops_a_converted_tensors_pages_and_keeps_its_values(tmp_path, suffix):
    from sdstudio.files.readers import read_state_dict, release_file_pages

    g = torch.Generator().manual_seed(0)
    path = tmp_path / f"big{suffix}"
    weights = {"small": torch.randn(3, generator=g), "big": torch.randn(32, 1024, 1024, generator=g)}
    if suffix == ".ckpt":
        torch.save({"state_dict": weights}, path)
    else:
        safetensors.torch.save_file(weights, str(path))
    tensors = read_state_dict(path)
    total = float(tensors["big"].double().sum())        # reads every page: 128 MiB resident
    before = _resident_mib()
    release_file_pages(tensors["big"])
    assert before - _resident_mib() > 100
    assert float(tensors["big"].double().sum()) == total   # the file's bytes fault back in
    assert is_file_mapped(tensors["big"]) and is_file_mapped(tensors["big"][3])
    heap = torch.ones(1024, 1024)                        # not file-mapped: left alone
    release_file_pages(heap)
    assert bool((heap == 1).all()) and not is_file_mapped(heap)


@pytest.mark.parametrize("shape", [(37, 3 * CONVERSION_CHUNK // 37 + 5), (1, CONVERSION_CHUNK + 3), (5,), ()])
def test_float16_to_bfloat16_copy_has_the_bits_of_a_direct_conversion(shape):
    source = torch.randn(shape).mul(100).half()
    source.view(-1)[:4] = torch.tensor([65504.0, -6e-8, float("inf"), -0.0])[:source.numel()]
    target = torch.empty(shape, dtype=torch.bfloat16)
    copy_converting(target, source)
    assert torch.equal(target.view(torch.int16), source.to(torch.bfloat16).view(torch.int16))


def test_convolution_weight_copy_changes_layout_and_dtype_in_one_go():
    source = torch.randn(70, 64, 3, 3 * 2 * CONVERSION_CHUNK // (70 * 64 * 3)).half()
    target = torch.empty_like(source, dtype=torch.bfloat16, memory_format=torch.channels_last)
    copy_converting(target, source)
    assert target.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(target, source.to(torch.bfloat16))
