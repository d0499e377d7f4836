"""Static pickle scanning and the refusal of pickles that would run code (A1111 safe.py behaviour, stricter)."""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from sdstudio.errors import ModelFileError, UnsafeFileError
from sdstudio.files import pickle_scan
from sdstudio.files.readers import load_pickle, read_state_dict, read_tensor_infos, translate_torch_error


class Custom:
    """A class no allow-list knows: a checkpoint holding one must be refused."""


class RunsCommand:
    """Pickles as a call of os.system(command) (spelled posix.system on Linux)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _unicode(text: str) -> bytes:
    """BINUNICODE opcode pushing `text`."""
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _global_payload(command: str) -> bytes:
    """Hand-written protocol-2 pickle: GLOBAL 'os system', the command string, TUPLE1, REDUCE."""
    return b"\x80\x02cos\nsystem\n" + _unicode(command) + b"\x85R."


def _memo_stack_global_payload(command: str) -> bytes:
    """Protocol 4: 'posix'/'system' memoized, popped, a decoy pushed and popped, then fetched back for STACK_GLOBAL."""
    return (b"\x80\x04" + _unicode("posix") + b"\x94" + _unicode("system") + b"\x94" + b"00"
            + _unicode("collections") + _unicode("OrderedDict") + b"00"
            + b"h\x00h\x01\x93" + _unicode(command) + b"\x85R.")


def _torch_zip_with(path: Path, data_pkl: bytes) -> Path:
    """A real torch.save zip whose data.pkl is replaced by `data_pkl`."""
    original = path.with_suffix(".orig")
    torch.save({"w": torch.ones(2)}, original)
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w") as dst:
        for member in src.namelist():
            dst.writestr(member, data_pkl if member.endswith("/data.pkl") else src.read(member))
    original.unlink()
    return path


def _legacy_stream_with(path: Path, object_pickle: bytes) -> Path:
    """A pre-1.6 torch stream (magic, protocol, sys info) whose object pickle is `object_pickle`."""
    sys_info = {"protocol_version": torch.serialization.PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    header = b"".join(pickle.dumps(obj, protocol=2)
                      for obj in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info))
    path.write_bytes(header + object_pickle)
    return path


def _assert_refused(path: Path, marker: Path, global_name: str) -> None:
    for reader in (read_state_dict, read_tensor_infos, load_pickle):
        with pytest.raises(UnsafeFileError) as info:
            reader(path)
        assert f"forbidden global '{global_name}'" in str(info.value)
        assert "no code from the file was run" in str(info.value)
        assert str(path) in str(info.value)
    assert not marker.exists()


def test_hand_written_reduce_in_torch_zip_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = _torch_zip_with(tmp_path / "evil.ckpt", _global_payload(f"touch {marker}"))
    _assert_refused(path, marker, "os.system")


def test_reduce_class_in_legacy_stream_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(RunsCommand(f"touch {marker}"), protocol=2)
    path = _legacy_stream_with(tmp_path / "evil.pt", payload)
    _assert_refused(path, marker, f"{os.system.__module__}.system")


def test_stack_global_protocol_4_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(RunsCommand(f"touch {marker}"), protocol=4)
    assert b"\x93" in payload  # really a STACK_GLOBAL pickle
    path = _torch_zip_with(tmp_path / "evil.ckpt", payload)
    _assert_refused(path, marker, f"{os.system.__module__}.system")


def test_stack_global_operands_come_from_memo_not_from_decoys(tmp_path):
    marker = tmp_path / "MARKER"
    payload = _memo_stack_global_payload(f"touch {marker}")
    assert pickle_scan.pickle_globals(payload) == [("posix", "system")]
    path = _legacy_stream_with(tmp_path / "evil.pt", payload)
    _assert_refused(path, marker, "posix.system")


def test_stack_global_with_computed_operand_is_corrupt():
    # STACK_GLOBAL whose module is the result of a call cannot be checked statically: refuse it.
    payload = b"\x80\x04" + b"ccollections\nOrderedDict\n)R" + _unicode("system") + b"\x93."
    with pytest.raises(pickle_scan.PickleScanError, match="not a plain string"):
        pickle_scan.pickle_globals(payload)


def test_extension_registry_opcode_is_refused(tmp_path):
    path = _torch_zip_with(tmp_path / "ext.ckpt", b"\x80\x02\x82\x01.")
    with pytest.raises(UnsafeFileError, match="copyreg.extension code 1"):
        read_state_dict(path)


def test_custom_class_instance_is_refused_by_name(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({"w": torch.ones(2), "extra": Custom()}, path)
    with pytest.raises(UnsafeFileError, match=f"forbidden global '{Custom.__module__}.Custom'"):
        read_state_dict(path)


def test_torch_save_output_uses_only_allowed_globals():
    state = {
        "f16": torch.ones(2, dtype=torch.float16), "bf16": torch.ones(2, dtype=torch.bfloat16),
        "f8": torch.zeros(2, dtype=torch.float8_e4m3fn), "i64": torch.arange(3), "b": torch.ones(1, dtype=torch.bool),
        "param": torch.nn.Parameter(torch.ones(1)), "dtype": torch.float16, "size": torch.Size([1, 2]), "set": {1},
    }
    found = _zip_globals(state)
    assert ("torch._utils", "_rebuild_tensor_v2") in found
    assert all(pickle_scan.is_allowed_global(module, name) for module, name in found), found


def _zip_globals(obj: object) -> list[tuple[str, str]]:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    return pickle_scan.pickle_globals(data)


@pytest.mark.parametrize("module, name, allowed", [
    ("torch", "float16", True), ("torch", "HalfStorage", True), ("collections", "OrderedDict", True),
    ("torch", "load", False), ("torch", "_C", False), ("builtins", "eval", False), ("os", "system", False),
    ("torch._utils", "_rebuild_tensor_v2.__globals__", False),
])
def test_allow_list(module, name, allowed):
    assert pickle_scan.is_allowed_global(module, name) is allowed


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "nodata.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/version", "3\n")
    with pytest.raises(ModelFileError, match="not a valid torch checkpoint: zip has no data.pkl"):
        read_state_dict(path)


def test_zip_with_two_data_pkl(tmp_path):
    path = tmp_path / "two.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("b/data.pkl", pickle.dumps({}, protocol=2))
    with pytest.raises(ModelFileError, match="2 data.pkl"):
        read_state_dict(path)


def test_zip_with_unexpected_member(tmp_path):
    path = tmp_path / "extra.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("extra/payload.py", "print('hi')")
    with pytest.raises(ModelFileError, match="unexpected zip member 'extra/payload.py'"):
        read_state_dict(path)


def test_truncated_zip(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="damaged or truncated zip"):
        read_state_dict(path)


def test_corrupt_pickle(tmp_path):
    path = _torch_zip_with(tmp_path / "garbage.ckpt", b"\x80\x02\xff\xfe garbage")
    with pytest.raises(ModelFileError, match="corrupt pickle") as info:
        read_state_dict(path)
    assert not isinstance(info.value, UnsafeFileError)


def test_legacy_stream_without_magic_number(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(ModelFileError, match="magic number"):
        read_state_dict(path)


def test_torch_refusal_is_translated(tmp_path):
    marker = tmp_path / "MARKER"
    path = _torch_zip_with(tmp_path / "evil.ckpt", _global_payload(f"touch {marker}"))
    with pytest.raises(Exception) as info:  # torch's own weights_only layer, without our scan in front
        torch.load(path, weights_only=True)
    error = translate_torch_error(path, info.value)
    assert isinstance(error, UnsafeFileError)
    assert "forbidden global 'os.system'" in str(error)
    assert not marker.exists()
