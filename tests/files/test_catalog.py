"""The catalog over an A1111-layout folder built in a temp dir: listing, names, hashes, metadata, lookup, refresh."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import InvalidRequestError, SDStudioError
from sdstudio.files import hashing
from sdstudio.files.catalog import Catalog, CatalogEntry
from sdstudio.files.hashing import HashCache


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put_safetensors(path: Path, metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}, str(path), metadata=metadata)
    return path


def put_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def count_hashing(monkeypatch):
    """Record "kind:file name" for each call of the real hash functions (the wrappers still run them)."""
    calls: list[str] = []
    for kind, attr in (("sha256", "sha256_file"), ("addnet", "addnet_hash")):
        def counting(path, progress=None, kind=kind, real=getattr(hashing, attr)):
            calls.append(f"{kind}:{Path(path).name}")
            return real(path, progress)

        monkeypatch.setattr(hashing, attr, counting)
    return calls


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "webui"
    sd = d / "models" / "Stable-diffusion"
    put_safetensors(sd / "base.safetensors", {"json": '{"a": [1, 2]}', "broken": "{oops", "plain": "hi",
                                                          "list": "[1, 2]", "num": "5"})
    put_bytes(sd / "base.png", b"png")
    put_bytes(sd / "base.json", json.dumps({"vae": "kl-f8.pt", "notes": "n"}).encode())
    put_bytes(sd / "sub" / "Other.ckpt", os.urandom(0x100000 + 0x10000 + 1000))
    put_bytes(sd / "sub" / "Other.preview.jpg", b"jpg")
    put_safetensors(sd / "alpha.safetensors", seed=1)
    put_safetensors(sd / "base.vae.safetensors", seed=2)
    put_bytes(sd / "broken.safetensors", struct.pack("<Q", 40) + b"this is not json at all")
    put_bytes(sd / "notes.txt", b"not a model")
    put_safetensors(sd / ".hidden" / "secret.safetensors", seed=3)
    put_bytes(sd / ".dotfile.ckpt", b"x" * 10)
    put_bytes(d / "models" / "VAE" / "kl-f8.pt", os.urandom(2000))
    put_safetensors(d / "models" / "VAE" / "sdxl" / "xl_vae.safetensors", seed=4)
    put_safetensors(d / "models" / "Lora" / "ink.safetensors", {"ss_output_name": "inkstyle"}, seed=5)
    put_safetensors(d / "models" / "Lora" / "styles" / "a.safetensors", {"ss_output_name": "dup"}, seed=6)
    put_safetensors(d / "models" / "Lora" / "b.safetensors", {"ss_output_name": "dup"}, seed=7)
    put_safetensors(d / "models" / "Lora" / "c.safetensors", {"ss_output_name": "none"}, seed=8)
    put_safetensors(d / "models" / "Lora" / "trained.safetensors", {"sshs_model_hash": "f" * 64}, seed=9)
    put_bytes(d / "models" / "LyCORIS" / "loha.pt", os.urandom(500))
    put_safetensors(d / "models" / "embeddings" / "EasyNegative.safetensors", seed=10)
    put_bytes(d / "embeddings" / "old.pt", os.urandom(300))
    put_bytes(d / "embeddings" / "empty.pt", b"")
    put_bytes(d / "embeddings" / "old.preview.png", b"png")
    return d


@pytest.fixture
def catalog(data_dir, tmp_path) -> Catalog:
    return Catalog(data_dir, HashCache(tmp_path / "hashes.json"))


def names(entries: list[CatalogEntry]) -> list[str]:
    return [e.name for e in entries]


def test_lists_each_kind_from_a1111_folders(catalog):
    assert names(catalog.checkpoints()) == ["alpha.safetensors", "base.safetensors", "broken.safetensors",
                                            "sub/Other.ckpt"]
    assert names(catalog.vaes()) == ["base.vae.safetensors", "kl-f8.pt", "sdxl/xl_vae.safetensors"]
    assert names(catalog.loras()) == ["b.safetensors", "c.safetensors", "ink.safetensors", "loha.pt",
                                      "styles/a.safetensors", "trained.safetensors"]
    assert names(catalog.embeddings()) == ["EasyNegative.safetensors", "old.pt"]
    assert {e.kind for e in catalog.vaes()} == {"vae"}


def test_sorting_is_case_insensitive(data_dir, tmp_path):
    put_safetensors(data_dir / "models" / "Stable-diffusion" / "Zeta.safetensors")
    put_safetensors(data_dir / "models" / "Stable-diffusion" / "beta.safetensors")
    got = names(Catalog(data_dir, HashCache(tmp_path / "h.json")).checkpoints())
    assert got.index("beta.safetensors") < got.index("broken.safetensors") < got.index("Zeta.safetensors")


def test_names_hashes_and_titles(catalog, data_dir):
    other = catalog.find_checkpoint("sub/Other.ckpt")
    path = data_dir / "models" / "Stable-diffusion" / "sub" / "Other.ckpt"
    assert other.path == path
    assert (other.stem, other.model_name) == ("Other", "sub_Other")
    assert other.size == path.stat().st_size and other.mtime == path.stat().st_mtime
    assert other.sha256 == sha(path)
    assert other.short_hash == sha(path)[:10]
    assert other.title == f"sub/Other.ckpt [{sha(path)[:10]}]"
    data = path.read_bytes()
    assert other.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert all(e.sha256 == sha(e.path) for kind in ("checkpoints", "vaes", "loras", "embeddings")
               for e in getattr(catalog, kind)())


def test_safetensors_metadata_is_json_decoded_like_a1111(catalog):
    base = catalog.find_checkpoint("base")
    # only values starting with "{" are decoded, and only when they parse
    assert base.metadata == {"json": {"a": [1, 2]}, "broken": "{oops", "plain": "hi", "list": "[1, 2]", "num": "5"}
    assert catalog.find_checkpoint("sub/Other.ckpt").metadata == {}


def test_previews_and_user_metadata(catalog):
    assert catalog.find_checkpoint("base").preview.name == "base.png"
    assert catalog.find_checkpoint("Other").preview.name == "Other.preview.jpg"
    assert catalog.find_checkpoint("alpha").preview is None
    assert catalog.find_checkpoint("base").user_metadata == {"vae": "kl-f8.pt", "notes": "n"}
    assert catalog.find_checkpoint("alpha").user_metadata == {}


def test_checkpoint_lookup_by_every_a1111_key(catalog):
    other = catalog.find_checkpoint("sub/Other.ckpt")
    full = other.sha256
    for query in (other.title, "sub/Other.ckpt", "sub_Other", "Other", other.legacy_hash, full[:10], full,
                  full.upper(), f"sub/Other.ckpt [{other.legacy_hash}]", "sub/Other.ckpt [0000000000]"):
        assert catalog.find_checkpoint(query) is other, query


def test_checkpoint_lookup_prefers_exact_names_over_substrings(catalog):
    assert catalog.find_checkpoint("base").name == "base.safetensors"
    assert catalog.find_checkpoint("alp").name == "alpha.safetensors"  # A1111: shortest title containing it


def test_unknown_names_raise_with_close_names(catalog):
    with pytest.raises(InvalidRequestError, match="did you mean: .*base") as err:
        catalog.find_checkpoint("bsae")
    assert isinstance(err.value, SDStudioError) and err.value.field == "checkpoint"
    with pytest.raises(InvalidRequestError, match="known: .*kl-f8"):
        catalog.find_vae("zzzzzz")


def test_vae_lookup_and_vae_files_are_not_checkpoints(catalog):
    assert catalog.find_vae("kl-f8.pt").name == "kl-f8.pt"
    assert catalog.find_vae("xl_vae.safetensors").name == "sdxl/xl_vae.safetensors"
    assert catalog.find_vae("base.vae.safetensors").path.parent.name == "Stable-diffusion"
    with pytest.raises(InvalidRequestError):
        catalog.find_checkpoint("base.vae.safetensors")


def test_lora_aliases_follow_a1111_rules(catalog):
    aliases = {e.name: e.alias for e in catalog.loras()}
    assert aliases == {"ink.safetensors": "inkstyle", "styles/a.safetensors": "a", "b.safetensors": "b",
                       "c.safetensors": "c", "loha.pt": "loha", "trained.safetensors": "trained"}
    assert catalog.find_lora("inkstyle") is catalog.find_lora("ink")
    with pytest.raises(InvalidRequestError):
        catalog.find_lora("dup")


def test_lora_alias_equal_to_another_stem_falls_back(data_dir, tmp_path):
    put_safetensors(data_dir / "models" / "Lora" / "x.safetensors", {"ss_output_name": "ink"})
    cat = Catalog(data_dir, HashCache(tmp_path / "h.json"))
    assert {e.name: e.alias for e in cat.loras()}["x.safetensors"] == "x"


def test_lora_addnet_hash(catalog, data_dir):
    ink = catalog.find_lora("ink")
    raw = ink.path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert ink.addnet_hash == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert catalog.find_lora(ink.addnet_hash[:12]) is ink
    assert catalog.find_lora("loha").addnet_hash == sha(data_dir / "models" / "LyCORIS" / "loha.pt")
    assert catalog.find_lora("trained").addnet_hash == "f" * 64  # sshs_model_hash is preferred, as in A1111


def test_embeddings_skip_empty_files_and_look_up_by_stem_or_ti_hash(catalog):
    neg = catalog.find_embedding("EasyNegative")
    assert neg.name == "EasyNegative.safetensors"
    assert catalog.find_embedding(neg.sha256[:12]) is neg
    with pytest.raises(InvalidRequestError):
        catalog.find_embedding("empty")


def test_corrupt_model_file_is_listed_with_its_error(catalog):
    broken = catalog.find_checkpoint("broken")
    assert broken.error and "broken.safetensors" in broken.error
    assert broken.metadata == {}
    assert broken.sha256 == sha(broken.path)
    assert catalog.find_checkpoint("base").error is None


def test_refresh_detects_added_changed_removed_and_keeps_unchanged_objects(catalog, data_dir, count_hashing):
    sd = data_dir / "models" / "Stable-diffusion"
    before = {e.name: e for e in catalog.checkpoints()}
    assert not catalog.refresh()
    assert count_hashing == []

    put_safetensors(sd / "new.safetensors", seed=20)
    st = (sd / "alpha.safetensors").stat()
    put_safetensors(sd / "alpha.safetensors", seed=21)
    os.utime(sd / "alpha.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 3_000_000_000))
    (sd / "sub" / "Other.ckpt").unlink()
    put_bytes(sd / "broken.preview.webp", b"webp")  # preview and user metadata of an unchanged file are re-read
    put_bytes(sd / "broken.json", b'{"notes": "bad file"}')
    changes = catalog.refresh()
    assert changes.added["checkpoint"] == ["new.safetensors"]
    assert changes.changed["checkpoint"] == ["alpha.safetensors"]
    assert changes.removed["checkpoint"] == ["sub/Other.ckpt"]
    assert changes.added["lora"] == changes.changed["vae"] == changes.removed["embedding"] == []
    assert sorted(count_hashing) == ["sha256:alpha.safetensors", "sha256:new.safetensors"]

    after = {e.name: e for e in catalog.checkpoints()}
    assert after["base.safetensors"] is before["base.safetensors"]
    assert after["alpha.safetensors"] is not before["alpha.safetensors"]
    assert after["alpha.safetensors"].sha256 == sha(sd / "alpha.safetensors") != before["alpha.safetensors"].sha256
    assert after["broken.safetensors"] is before["broken.safetensors"]
    assert after["broken.safetensors"].preview == sd / "broken.preview.webp"
    assert after["broken.safetensors"].user_metadata == {"notes": "bad file"}
    with pytest.raises(InvalidRequestError):
        catalog.find_checkpoint("Other")


def test_second_catalog_with_same_cache_rehashes_nothing(data_dir, tmp_path, count_hashing):
    first = Catalog(data_dir, HashCache(tmp_path / "hashes.json"))
    entries = first.checkpoints() + first.vaes() + first.loras() + first.embeddings()
    # every file once for sha256, plus the addnet hash of the LoRA .safetensors without an sshs_model_hash
    assert sorted(count_hashing) == sorted([f"sha256:{e.path.name}" for e in entries] + [
        f"addnet:{n}.safetensors" for n in ("ink", "a", "b", "c")])
    hashed_once = list(count_hashing)
    second = Catalog(data_dir, HashCache(tmp_path / "hashes.json"))
    assert count_hashing == hashed_once
    assert [e.title for e in second.checkpoints()] == [e.title for e in first.checkpoints()]
    assert [e.addnet_hash for e in second.loras()] == [e.addnet_hash for e in first.loras()]


def test_lazy_hashing_hashes_on_demand(data_dir, tmp_path, count_hashing):
    cat = Catalog(data_dir, HashCache(tmp_path / "h.json"), hash_on_scan=False)
    assert count_hashing == []
    base = cat.find_checkpoint("base")
    assert base.sha256 is None and base.title == "base.safetensors" and base.short_hash is None
    assert cat.find_checkpoint(sha(base.path)[:10]) is base  # a hash query hashes what is missing
    assert base.title == f"base.safetensors [{sha(base.path)[:10]}]"
    warm = Catalog(data_dir, HashCache(tmp_path / "h.json"), hash_on_scan=False)
    assert warm.find_checkpoint("base").sha256 == sha(base.path)  # filled from the cache without hashing
    assert cat.ensure_hashes(cat.find_lora("ink")).addnet_hash is not None


def test_missing_folders_give_an_empty_catalog(tmp_path):
    cat = Catalog(tmp_path / "nothing", HashCache(tmp_path / "h.json"))
    assert cat.checkpoints() == cat.vaes() == cat.loras() == cat.embeddings() == []
    with pytest.raises(InvalidRequestError, match="none found"):
        cat.find_checkpoint("x")
