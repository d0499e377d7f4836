"""A1111 infotext: the generation-parameters text written into PNG/JPEG/WebP files, and its parser.

Layout (AUTOMATIC1111 `modules/processing.py:create_infotext`):

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>      (line left out when the negative prompt is empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, ...

PNG keeps it in a text chunk named "parameters"; JPEG and WebP in EXIF UserComment as b"UNICODE\\0" + UTF-16-BE.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import piexif
import piexif.helper
from PIL import Image, PngImagePlugin

from sdstudio.errors import InvalidRequestError

# Keys A1111 writes first, in its order; everything else follows in insertion order, then TRAILING_KEYS.
PARAM_ORDER: tuple[str, ...] = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
TRAILING_KEYS: tuple[str, ...] = ("Version", "User")

NEGATIVE_PREFIX = "Negative prompt:"
PNG_KEY = "parameters"
JPEG_QUALITY = 80  # A1111 option `jpeg_quality` default (also used for WebP, saved lossy)

# One "Key: value" pair of the last line (A1111 `infotext_utils.re_param`).
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_MIN_PARAM_MATCHES = 3  # fewer pairs on the last line: it is prompt text

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

# Values A1111's `parse_generation_parameters` fills in when a key is missing (its paste defaults).
A1111_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}


def quote(value: Any) -> str:
    """A1111 quoting: JSON-encode a value whose text holds ',', ':' or a newline; otherwise its plain text."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(value, ensure_ascii=False)
    return text


def _plain(value: Any) -> Any:
    """Numbers as the A1111 web UI writes them: whole floats without ".0" (7.0 -> 7), others unchanged."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _is_size_part(key: str, params: dict[str, Any]) -> bool:
    """True for "Size-1"/"Size-2" style keys that parse_infotext derived from a "WxH" sibling value."""
    base, dash, index = key.rpartition("-")
    return bool(dash) and index in ("1", "2") and _SIZE_RE.match(str(params.get(base, ""))) is not None


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Infotext text: prompt, optional negative line, then "Key: value" pairs (None values left out)."""
    ordered = {key: params[key] for key in PARAM_ORDER if key in params}
    for key, value in params.items():
        if key not in ordered and key not in TRAILING_KEYS and not _is_size_part(key, params):
            ordered[key] = value
    ordered.update((key, params[key]) for key in TRAILING_KEYS if key in params)

    pairs = [key if value == key else f"{key}: {quote(_plain(value))}"
             for key, value in ordered.items() if value is not None]
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


@dataclass
class Infotext:
    """A parsed infotext; params keep the raw text values, unknown keys included ("Size" plus "Size-1"/"-2")."""

    prompt: str
    negative_prompt: str
    params: dict[str, str]

    def to_a1111_dict(self) -> dict[str, Any]:
        """The dict A1111's parse_generation_parameters returns (as /sdapi/v1/png-info "parameters")."""
        result: dict[str, Any] = {"Prompt": self.prompt, "Negative prompt": self.negative_prompt}
        result.update((k, v) for k, v in self.params.items() if not _SIZE_RE.match(v))  # A1111 keeps only -1/-2
        for key, value in A1111_DEFAULTS.items():
            result.setdefault(key, value)
        if result["FP8 weight"] != "Disable":
            result.setdefault("Cache FP16 weight for LoRA", False)
        return result


def _unquote(text: str) -> str:
    """JSON-decode a quoted value; keep the text as it is when it is not valid JSON (A1111 `unquote`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_line(text: str, line: str) -> str:
    """Append a line the way A1111 does: no separator before the first non-empty text."""
    return f"{text}\n{line}" if text else line


def parse_infotext(text: str) -> Infotext:
    """Split an infotext into prompt, negative prompt and params (A1111 parse_generation_parameters rules)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM_RE.findall(last)) < _MIN_PARAM_MATCHES:
        lines.append(last)
        last = ""

    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        if in_negative:
            negative = _add_line(negative, line)
        else:
            prompt = _add_line(prompt, line)

    params: dict[str, str] = {}
    for key, value in _PARAM_RE.findall(last):
        if not value:
            continue  # A1111 skips a key with an empty value
        if value[0] == '"' and value[-1] == '"':
            value = _unquote(value)
        params[key] = value
        size = _SIZE_RE.match(value)
        if size:
            params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
    return Infotext(prompt=prompt, negative_prompt=negative, params=params)


def image_format(name: str) -> str:
    """Pillow format name for an extension or format ("png", ".JPG", "webp")."""
    fmt = _PIL_FORMATS.get(name.lower().lstrip("."))
    if fmt is None:
        raise InvalidRequestError("format", f"{name!r} is not one of {', '.join(_PIL_FORMATS)}")
    return fmt


def _exif_with_comment(infotext: str) -> bytes:
    """EXIF block holding only UserComment = b"UNICODE\\0" + UTF-16-BE text (A1111 save_image_with_geninfo)."""
    comment = piexif.helper.UserComment.dump(infotext, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def encode_image(image: Image.Image, infotext: str | None, format: str) -> bytes:
    """File bytes of image in format (png/jpg/jpeg/webp) with infotext embedded the A1111 way."""
    fmt = image_format(format)
    buffer = io.BytesIO()
    if fmt == "PNG":
        pnginfo = None
        if infotext is not None:
            pnginfo = PngImagePlugin.PngInfo()
            pnginfo.add_text(PNG_KEY, infotext)
        image.save(buffer, format=fmt, pnginfo=pnginfo)
    else:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        extra = {"exif": _exif_with_comment(infotext)} if infotext is not None else {}
        image.save(buffer, format=fmt, quality=JPEG_QUALITY, lossless=False, **extra)
    return buffer.getvalue()


def write_new_file(path: Path, data: bytes) -> None:
    """Create path (FileExistsError if it exists) holding data, flushed to disk; removed again if writing fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_image(image: Image.Image, path: str | Path, infotext: str | None, format: str | None = None) -> None:
    """Write image with its infotext to path atomically (temp file in the same folder, then rename over)."""
    path = Path(path)
    data = encode_image(image, infotext, format or path.suffix)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    write_new_file(temp, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _exif_comment(exif: bytes) -> str:
    """UserComment text of an EXIF block ("" if absent or unreadable)."""
    try:
        comment = piexif.load(exif).get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
    except (OSError, ValueError):
        return ""
    try:
        return piexif.helper.UserComment.load(comment)
    except ValueError:
        return comment.decode("utf-8", errors="ignore")


def _info_of(image: Image.Image) -> str | None:
    """Infotext from an open image's metadata (A1111 read_info_from_image: EXIF comment wins over PNG text)."""
    info = image.info or {}
    text = info.get(PNG_KEY)
    if "exif" in info:
        text = _exif_comment(info["exif"]) or text
    elif "comment" in info:  # GIF
        comment = info["comment"]
        text = comment.decode("utf-8", errors="ignore") if isinstance(comment, bytes) else comment
    return text


def read_infotext(path_or_image: str | Path | Image.Image) -> str | None:
    """Infotext stored in an image file or open image (PNG "parameters", else EXIF UserComment), None if none."""
    if isinstance(path_or_image, Image.Image):
        return _info_of(path_or_image)
    with Image.open(path_or_image) as image:
        text = _info_of(image)
        if text is None and image.format == "PNG":
            image.load()  # text chunks after the image data are read only with the pixels
            text = _info_of(image)
        return text
