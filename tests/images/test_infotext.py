"""Infotext formatting/parsing (A1111 rules) and embedding in PNG, JPEG and WebP files."""
from __future__ import annotations

import os

import piexif
import pytest
from PIL import Image

from sdstudio.errors import InvalidRequestError
from sdstudio.images.infotext import (
    Infotext,
    encode_image,
    format_infotext,
    parse_infotext,
    quote,
    read_infotext,
    write_image,
)

# The example from A1111's parse_generation_parameters docstring (modules/infotext_utils.py).
A1111_DOC_SAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)

# The example parameter line of the fact sheet (a1111.md section 3), with a two-line prompt above it.
SHEET_SAMPLE = (
    "a cat,\n(sharp:1.2) <lora:ink:0.7>\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: \"foo: 0123456789ab\", "
    "Version: v1.10.1"
)


def test_quote_follows_a1111_rule():
    assert quote("Euler a") == "Euler a"
    assert quote(7) == "7"
    assert quote("foo: 0123456789ab") == '"foo: 0123456789ab"'
    assert quote("a, b") == '"a, b"'
    assert quote('line1\nsay "hi"') == '"line1\\nsay \\"hi\\""'
    assert quote("猫, 犬") == '"猫, 犬"'  # ensure_ascii=False


def test_format_basic_layout_and_number_style():
    text = format_infotext("a cat", "blurry", {
        "Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1234, "Size": "512x768",
        "Denoising strength": 0.75,
    })
    assert text == ("a cat\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Denoising strength: 0.75")
    assert format_infotext("p", "", {"CFG scale": 7.5, "Steps": 2, "Seed": 1}).endswith("CFG scale: 7.5, Seed: 1")


def test_format_orders_known_keys_then_extras_then_version_user():
    params = {
        "Version": "v1.10.1", "Hires upscaler": "Latent", "Seed": 5, "User": "me", "Steps": 4,
        "Lora hashes": "foo: abc", "Sampler": "Euler", "Schedule type": "Karras", "Clip skip": 2, "Size": "64x64",
    }
    line = format_infotext("p", "", params).split("\n")[-1]
    keys = [part.split(":")[0] for part in line.split(", ")]
    assert keys == ["Steps", "Sampler", "Schedule type", "Seed", "Size", "Clip skip",
                    "Hires upscaler", "Lora hashes", "Version", "User"]
    assert 'Lora hashes: "foo: abc"' in line


def test_format_skips_none_omits_empty_negative_and_writes_bare_key_when_value_equals_key():
    text = format_infotext("p", "", {"Steps": 3, "Model": None, "Seed": 9, "Sampler": "Euler", "Tiling": "Tiling"})
    assert text == "p\nSteps: 3, Sampler: Euler, Seed: 9, Tiling"


def test_parse_a1111_docstring_sample():
    info = parse_infotext(A1111_DOC_SAMPLE)
    assert info.prompt.startswith("girl with an artist's beret") and info.prompt.endswith("detailed, intricate")
    assert info.negative_prompt.startswith("ugly, fat") and info.negative_prompt.endswith("messy drawing")
    assert info.params == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512",
        "Size-1": "512", "Size-2": "512", "Model hash": "45dee52b",
    }


def test_parse_sheet_sample_with_multiline_prompt_and_quoted_value():
    info = parse_infotext(SHEET_SAMPLE)
    assert info.prompt == "a cat,\n(sharp:1.2) <lora:ink:0.7>"
    assert info.negative_prompt == "blurry"
    assert info.params == {
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "1234",
        "Size": "512x768", "Size-1": "512", "Size-2": "768", "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly", "Clip skip": "2", "Lora hashes": "foo: 0123456789ab", "Version": "v1.10.1",
    }


def test_last_line_with_fewer_than_three_pairs_stays_prompt():
    info = parse_infotext("a photo\nstyle: cinematic, mood: dark")
    assert info == Infotext(prompt="a photo\nstyle: cinematic, mood: dark", negative_prompt="", params={})
    info = parse_infotext("a photo\nNegative prompt: ugly\nSteps: 2, Seed: 3")
    assert info.negative_prompt == "ugly\nSteps: 2, Seed: 3" and info.params == {}


def test_multiline_negative_and_unknown_keys_round_trip():
    params = {"Steps": 30, "Sampler": "DPM++ 2M SDE", "CFG scale": 6.5, "Seed": 42, "Size": "832x1216",
              "My extension": "x: 1, y: 2", "Note": "two\nlines", "Quote value": 'say "hi"', "Flag": True}
    text = format_infotext("first line\nsecond: line, with comma", "neg one\nneg two", params)
    info = parse_infotext(text)
    assert info.prompt == "first line\nsecond: line, with comma"
    assert info.negative_prompt == "neg one\nneg two"
    assert info.params["My extension"] == "x: 1, y: 2"
    assert info.params["Note"] == "two\nlines"
    assert info.params["Flag"] == "True" and info.params["Quote value"] == 'say "hi"'
    assert info.params["CFG scale"] == "6.5"
    assert (info.params["Size-1"], info.params["Size-2"]) == ("832", "1216")
    # formatting the parsed result again gives the same text (Size-1/-2 are not written back)
    assert format_infotext(info.prompt, info.negative_prompt, info.params) == text


def test_to_a1111_dict_drops_wxh_keys_and_fills_defaults():
    result = parse_infotext(SHEET_SAMPLE).to_a1111_dict()
    assert result["Prompt"] == "a cat,\n(sharp:1.2) <lora:ink:0.7>"
    assert result["Negative prompt"] == "blurry"
    assert "Size" not in result and (result["Size-1"], result["Size-2"]) == ("512", "768")
    assert result["Clip skip"] == "2"  # present, not defaulted
    assert result["RNG"] == "GPU" and result["Masked area padding"] == 32 and result["Schedule type"] == "Karras"
    assert "Cache FP16 weight for LoRA" not in result
    assert parse_infotext("p\nSteps: 1, Seed: 2, Sampler: Euler").to_a1111_dict()["Clip skip"] == "1"


def _image(mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (16, 8), (200, 30, 60, 255)[: len(mode)])
    image.putpixel((3, 3), (0, 255, 0, 128)[: len(mode)])
    return image


INFOTEXT = "café, 猫\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 16x8"


def test_png_text_chunk_readable_by_plain_pillow(tmp_path):
    path = tmp_path / "a.png"
    write_image(_image(), path, INFOTEXT)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.info["parameters"] == INFOTEXT
        assert image.getpixel((3, 3)) == (0, 255, 0)
    assert read_infotext(path) == INFOTEXT


@pytest.mark.parametrize("ext, pil_format", [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_exif_user_comment_is_unicode_prefix_plus_utf16_be(tmp_path, ext, pil_format):
    path = tmp_path / f"a.{ext}"
    write_image(_image("RGBA"), path, INFOTEXT)  # RGBA is converted for these formats
    with Image.open(path) as image:
        assert image.format == pil_format and image.mode == "RGB"
        comment = piexif.load(image.info["exif"])["Exif"][piexif.ExifIFD.UserComment]
    assert comment == b"UNICODE\0" + INFOTEXT.encode("utf-16-be")
    assert read_infotext(path) == INFOTEXT
    with Image.open(path) as image:
        assert read_infotext(image) == INFOTEXT


def test_no_infotext_reads_none_and_format_can_override_suffix(tmp_path):
    path = tmp_path / "plain.png"
    write_image(_image(), path, None)
    assert read_infotext(path) is None
    odd = tmp_path / "image.bin"
    write_image(_image(), odd, "x", format="jpg")
    with Image.open(odd) as image:
        assert image.format == "JPEG"


def test_write_image_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a.png"
    write_image(_image(), path, "old")
    write_image(_image(), path, "new")
    assert read_infotext(path) == "new"
    assert os.listdir(tmp_path) == ["a.png"]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(_image(), tmp_path / "a.png", "x")
    assert os.listdir(tmp_path) == []


def test_unknown_format_is_a_request_error(tmp_path):
    with pytest.raises(InvalidRequestError, match="format"):
        encode_image(_image(), "x", "bmp")
    with pytest.raises(InvalidRequestError):
        write_image(_image(), tmp_path / "a.tga", "x")
    assert os.listdir(tmp_path) == []
