"""Textual-inversion files: every format, width checks, duplicates, bad files, refresh, use in generation."""
from __future__ import annotations

import logging
import os
import pickle
import time

import pytest
import torch
from safetensors.torch import save_file

from sdstudio import pipeline
from sdstudio.errors import ModelFileError, UnsafeFileError
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.embeddings import EmbeddingDB, load_embedding


def a1111_pt(path, vectors, step=500):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": step,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, path)
    return path


def test_every_format_is_read(tmp_path):
    v = torch.randn(4, 64)
    assert torch.equal(load_embedding(a1111_pt(tmp_path / "a.pt", v)).vectors_for("clip_l"), v)
    torch.save({"<tok>": v[0]}, tmp_path / "b.bin")                      # diffusers learned_embeds, 1-D
    b = load_embedding(tmp_path / "b.bin")
    assert b.vectors == 1 and torch.equal(b.vectors_for("clip_l")[0], v[0])
    save_file({"emb_params": v}, tmp_path / "c.safetensors")
    assert load_embedding(tmp_path / "c.safetensors").vectors == 4
    save_file({"whatever": v[:2]}, tmp_path / "d.safetensors")
    assert load_embedding(tmp_path / "d.safetensors").vectors == 2
    save_file({"clip_l": torch.randn(3, 64), "clip_g": torch.randn(3, 64)}, tmp_path / "e.safetensors")
    e = load_embedding(tmp_path / "e.safetensors")
    assert (e.vectors, e.shape) == (3, 128) and e.vectors_for("open_clip_g").shape == (3, 64)
    a = load_embedding(tmp_path / "a.pt")
    assert a.listing() == {"step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model", "shape": 64,
                           "vectors": 4}


def test_width_mismatch_is_skipped_with_a_reason(tmp_path, sd1_model, synth_file):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    a1111_pt(folder / "fits.pt", torch.randn(2, 64))
    a1111_pt(folder / "wide.pt", torch.randn(2, 768))
    save_file({"clip_l": torch.randn(1, 64), "clip_g": torch.randn(1, 64)}, folder / "xl.safetensors")
    db = EmbeddingDB([folder])
    listing = db.listing(sd1_model)
    assert set(listing["loaded"]) == {"fits"} and set(listing["skipped"]) == {"wide", "xl"}
    assert [e.name for e in db.usable(sd1_model)] == ["fits"]
    sdxl = load_checkpoint(synth_file("sdxl", "pruned"))
    assert set(db.listing(sdxl)["loaded"]) == {"xl"}


def test_bad_files_are_listed_as_errors_and_never_run_code(tmp_path):
    folder = tmp_path / "embeddings" / "sub"
    folder.mkdir(parents=True)
    a1111_pt(folder / "good.pt", torch.randn(1, 64))
    (folder / "empty.pt").write_bytes(b"")                  # zero-byte files are skipped like A1111
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "x": Evil()}, folder / "evil.pt",
               pickle_module=pickle)
    db = EmbeddingDB([tmp_path / "embeddings"])
    assert set(db.embeddings) == {"good"}
    assert not marker.exists()
    errors = {os.path.basename(k): v for k, v in db.errors.items()}
    assert set(errors) == {"corrupt.safetensors", "evil.pt"} and "system" in errors["evil.pt"]
    with pytest.raises(UnsafeFileError):
        load_embedding(folder / "evil.pt")
    with pytest.raises(ModelFileError):
        load_embedding(folder / "corrupt.safetensors")


def test_duplicate_names_are_resolved_deterministically_with_a_warning(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a1111_pt(tmp_path / "b" / "same.pt", torch.ones(1, 64))
    a1111_pt(tmp_path / "a" / "same.pt", torch.zeros(1, 64))
    with caplog.at_level(logging.WARNING):
        db = EmbeddingDB([tmp_path])
    assert db.embeddings["same"].path == tmp_path / "a" / "same.pt"
    assert "two embeddings named 'same'" in caplog.text


def test_refresh_sees_added_changed_and_removed_files(tmp_path):
    db = EmbeddingDB([tmp_path])
    assert db.embeddings == {}
    path = a1111_pt(tmp_path / "new.pt", torch.zeros(1, 64))
    db.refresh()
    assert db.embeddings["new"].vectors == 1
    time.sleep(0.01)
    a1111_pt(path, torch.zeros(3, 64))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    db.refresh()
    assert db.embeddings["new"].vectors == 3
    path.unlink()
    db.refresh()
    assert db.embeddings == {}


def test_generation_with_an_embedding_writes_ti_hashes(tmp_path, sd1_model):
    path = a1111_pt(tmp_path / "BadDream.pt", torch.randn(2, 64) * 0.1)
    db = EmbeddingDB([tmp_path])
    kwargs = dict(prompt="a cat", seed=1, width=64, height=64, steps=2, save=False)
    with_emb = pipeline.txt2img(sd1_model, negative_prompt="baddream, ugly", embeddings=db.usable(sd1_model), **kwargs)
    without = pipeline.txt2img(sd1_model, negative_prompt="baddream, ugly", **kwargs)
    import hashlib
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "BadDream: {expected}"' in with_emb.infotexts[0]
    assert "TI hashes" not in without.infotexts[0]
    assert with_emb.images[0].tobytes() != without.images[0].tobytes()
