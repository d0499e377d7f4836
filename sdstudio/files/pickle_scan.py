"""Static safety scan of torch pickle files: list every global a pickle imports without running any of it.

The A1111-equivalent allow-list (modules/safe.py) is checked here by reading opcodes with `pickletools.genops`;
`readers.load_pickle` then still loads with `torch.load(weights_only=True)` as a second, independent layer.
"""
from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path
from typing import IO

import torch

from sdstudio.errors import ModelFileError, UnsafeFileError

# torch's legacy (pre-1.6) stream starts with this number pickled on its own (torch/serialization.py MAGIC_NUMBER).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
# Legacy stream: magic number, protocol version, sys info, the object, storage keys -> then raw storage bytes.
LEGACY_PICKLE_COUNT = 5

# Member names torch.save writes into its zip (A1111's pattern plus what current torch adds).
_ZIP_MEMBER_RE = re.compile(
    r"^[^/]+/(data\.pkl|version|byteorder|\.format_version|\.storage_alignment|data/\d+"
    r"|\.data/serialization_id|\.data/version)$"
)

# (module, name) exactly as spelled in the pickle; A1111 safe.py plus what current torch.save writes.
_ALLOWED_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch.storage", "UntypedStorage"),
    ("torch", "Size"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("pytorch_lightning.callbacks", "model_checkpoint"),
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
})
_STORAGE_NAME_RE = re.compile(r"^[A-Za-z0-9_]+Storage$")

_STRING_OPS = frozenset({
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_MARK = object()  # a MARK on the simulated stack
_UNKNOWN = object()  # any value the scan does not need to know


class PickleScanError(ValueError):
    """The opcode stream is malformed or cannot be followed statically."""


def is_allowed_global(module: str, name: str) -> bool:
    """True when a pickle may import `module.name` (tensor rebuild helpers, storages, dtypes, plain containers)."""
    if (module, name) in _ALLOWED_GLOBALS:
        return True
    if module != "torch":
        return False
    attr = getattr(torch, name, None)
    return isinstance(attr, torch.dtype) or (bool(_STORAGE_NAME_RE.match(name)) and isinstance(attr, type))


def pickle_globals(data: bytes | IO[bytes]) -> list[tuple[str, str]]:
    """Every (module, name) one pickle imports (GLOBAL, INST, STACK_GLOBAL), read statically up to its STOP.

    STACK_GLOBAL operands are found by simulating the unpickler's stack and memo, so strings fetched from the
    memo or hidden behind pushes and pops resolve exactly as the real unpickler would see them.
    A file object is left positioned just after the STOP opcode. Raises PickleScanError on a malformed stream.
    """
    stack: list[object] = []
    memo: dict[int, object] = {}
    found: list[tuple[str, str]] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            kind = op.name
            if kind in _STRING_OPS:
                stack.append(arg)
            elif kind in _GET_OPS:
                if arg not in memo:
                    raise PickleScanError(f"{kind} of memo slot {arg} that was never stored")
                stack.append(memo[arg])
            elif kind in _PUT_OPS:
                memo[arg] = _top(stack, kind)
            elif kind == "MEMOIZE":
                memo[len(memo)] = _top(stack, kind)
            elif kind == "DUP":
                stack.append(_top(stack, kind))
            elif kind == "STACK_GLOBAL":
                name, module = _pop(stack, kind), _pop(stack, kind)
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise PickleScanError("STACK_GLOBAL with a module or name that is not a plain string")
                found.append((module, name))
                stack.append(_UNKNOWN)
            else:
                if kind in ("GLOBAL", "INST"):
                    module, _, name = arg.partition(" ")
                    found.append((module, name))
                elif kind in _EXT_OPS:
                    found.append(("copyreg", f"extension code {arg}"))
                _apply_stack_effect(stack, op)
    except ValueError as exc:  # genops: unknown opcode or data ends before STOP
        raise PickleScanError(str(exc)) from exc
    return found


def refusal(forbidden: list[str]) -> str:
    """The message for a file refused because its pickle imports `forbidden` (names as the pickle spells them)."""
    names = ", ".join(f"'{name}'" for name in dict.fromkeys(forbidden))
    noun = "global" if len(set(forbidden)) == 1 else "globals"
    return (f"refused: the pickle imports forbidden {noun} {names}; no code from the file was run. "
            "Convert it to .safetensors with a trusted tool.")


def scan_torch_zip(path: str | Path) -> None:
    """Check a torch zip checkpoint's member names and its data.pkl; raise UnsafeFileError / ModelFileError."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for member in names:
                if not _ZIP_MEMBER_RE.match(member):
                    raise _invalid(path, f"unexpected zip member '{member}'")
            pickles = [member for member in names if member.endswith("/data.pkl")]
            if not pickles:
                raise _invalid(path, "zip has no data.pkl")
            if len(pickles) > 1:
                raise _invalid(path, f"zip has {len(pickles)} data.pkl files")
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise _invalid(path, f"damaged or truncated zip ({exc})") from exc
    _check_globals(path, _scan_one(path, data))


def scan_torch_legacy(path: str | Path) -> None:
    """Check each pickle of a pre-1.6 torch stream up to where the raw storage bytes start."""
    with open(path, "rb") as stream:
        for index in range(LEGACY_PICKLE_COUNT):
            start = stream.tell()
            _check_globals(path, _scan_one(path, stream))
            if index == 0:
                stream.seek(start)
                if not _is_magic_number(stream):
                    raise _invalid(path, "pickle stream does not start with torch's magic number")


def _scan_one(path: str | Path, data: bytes | IO[bytes]) -> list[tuple[str, str]]:
    try:
        return pickle_globals(data)
    except PickleScanError as exc:
        raise _invalid(path, f"corrupt pickle ({exc})") from exc


def _check_globals(path: str | Path, found: list[tuple[str, str]]) -> None:
    forbidden = [f"{module}.{name}" for module, name in found if not is_allowed_global(module, name)]
    if forbidden:
        raise UnsafeFileError(path, refusal(forbidden))


def _is_magic_number(stream: IO[bytes]) -> bool:
    """True when the next pickle in `stream` is exactly torch's magic number."""
    ops = [(op.name, arg) for op, arg, _pos in pickletools.genops(stream) if op.name not in ("PROTO", "FRAME")]
    return ops == [("LONG1", LEGACY_MAGIC_NUMBER), ("STOP", None)]


def _invalid(path: str | Path, problem: str) -> ModelFileError:
    return ModelFileError(path, f"not a valid torch checkpoint: {problem}")


def _top(stack: list[object], kind: str) -> object:
    if not stack:
        raise PickleScanError(f"{kind} on an empty stack")
    return stack[-1]


def _pop(stack: list[object], kind: str) -> object:
    if not stack:
        raise PickleScanError(f"{kind} on an empty stack")
    return stack.pop()


def _apply_stack_effect(stack: list[object], op: pickletools.OpcodeInfo) -> None:
    """Pop and push as `op` does, using pickletools' stack descriptions; pushed values are unknown."""
    before = op.stack_before
    if pickletools.markobject in before:
        while _pop(stack, op.name) is not _MARK:
            pass
        extra = before.index(pickletools.markobject)
    else:
        extra = len(before)
    for _ in range(extra):
        _pop(stack, op.name)
    stack.extend(_MARK if item is pickletools.markobject else _UNKNOWN for item in op.stack_after)
