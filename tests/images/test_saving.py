"""A1111 output layout, the sequence counter, and saving that never overwrites, even with concurrent writers."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from sdstudio.errors import InvalidRequestError
from sdstudio.images.infotext import read_infotext
from sdstudio.images.saving import (
    make_grid,
    next_sequence_number,
    output_dir,
    save_generated,
    save_grid,
)

DAY = datetime.date(2024, 5, 6)


def _image(color=(10, 20, 30), size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_output_dirs_match_a1111(tmp_path):
    assert output_dir(tmp_path, "txt2img") == tmp_path / "outputs" / "txt2img-images"
    assert output_dir(tmp_path, "img2img") == tmp_path / "outputs" / "img2img-images"
    assert output_dir(tmp_path, "extras") == tmp_path / "outputs" / "extras-images"
    assert output_dir(tmp_path, "txt2img-grids") == tmp_path / "outputs" / "txt2img-grids"
    assert output_dir(tmp_path, "img2img-grids") == tmp_path / "outputs" / "img2img-grids"
    with pytest.raises(InvalidRequestError, match="mode"):
        output_dir(tmp_path, "video")


def test_next_sequence_number_a1111_semantics(tmp_path):
    assert next_sequence_number(tmp_path) == 0
    _touch(tmp_path, "00002-5.png", "00007-123.png", "notes.txt", "grid-0003.png", "00004.txt", ".00099.tmp")
    assert next_sequence_number(tmp_path) == 8           # grid-*, notes, hidden reservations are not numbers
    assert next_sequence_number(tmp_path, "grid") == 4   # only "grid-" names count for grids


def test_save_generated_layout_and_counter_continues(tmp_path):
    outdir = output_dir(tmp_path, "txt2img")
    first = save_generated(_image(), outdir=outdir, seed=1234567, infotext="a\nSteps: 1, Seed: 2, Size: 8x8", date=DAY)
    assert first.path == outdir / "2024-05-06" / "00000-1234567.png" and first.number == 0
    assert read_infotext(first.path) == "a\nSteps: 1, Seed: 2, Size: 8x8"

    _touch(outdir / "2024-05-06", "00007-123.png")
    second = save_generated(_image(), outdir=outdir, seed=42, infotext=None, suffix="-before-highres-fix", date=DAY)
    assert second.path.name == "00008-42-before-highres-fix.png" and second.number == 8

    jpg = save_generated(_image(), outdir=outdir, seed=42, infotext="x", ext="jpg", date=DAY)
    assert jpg.path.name == "00009-42.jpg"
    with Image.open(jpg.path) as image:
        assert image.format == "JPEG"


def test_same_seed_twice_never_overwrites(tmp_path):
    a = save_generated(_image((255, 0, 0)), outdir=tmp_path, seed=5, infotext="a", date=DAY)
    b = save_generated(_image((0, 0, 255)), outdir=tmp_path, seed=5, infotext="b", date=DAY)
    assert (a.path.name, b.path.name) == ("00000-5.png", "00001-5.png")
    assert read_infotext(a.path) == "a" and read_infotext(b.path) == "b"


def test_stale_reservation_is_skipped(tmp_path):
    folder = tmp_path / DAY.isoformat()
    _touch(folder, "00003-1.png", ".00004.tmp")  # a writer holds (or crashed holding) number 4
    saved = save_generated(_image(), outdir=tmp_path, seed=9, infotext=None, date=DAY)
    assert saved.path.name == "00005-9.png"


def _save_many(outdir: Path, seed: int, count: int, start: threading.Barrier | None = None) -> list[int]:
    if start is not None:
        start.wait()
    return [save_generated(_image((seed * 30 % 256, i * 40, 0)), outdir=outdir, seed=seed * 100 + i,
                           infotext=f"seed {seed} image {i}", date=DAY).number for i in range(count)]


def _check_distinct(folder: Path, numbers: list[int], total: int) -> None:
    names = sorted(os.listdir(folder))
    assert len(names) == total and not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    assert sorted(numbers) == list(range(total))
    assert sorted(int(name.split("-")[0]) for name in names) == list(range(total))
    for name in names:  # every file is complete and carries its own infotext
        seed = int(name.split("-")[1].split(".")[0])
        assert read_infotext(folder / name) == f"seed {seed // 100} image {seed % 100}"


def test_concurrent_threads_get_distinct_numbers(tmp_path):
    threads, per_thread = 8, 5
    start = threading.Barrier(threads)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda s: _save_many(tmp_path, s, per_thread, start), range(threads)))
    _check_distinct(tmp_path / DAY.isoformat(), [n for r in results for n in r], threads * per_thread)


def test_concurrent_processes_get_distinct_numbers(tmp_path):
    processes, per_process = 4, 5
    # spawn: fresh interpreters (no fork of a process that may hold torch threads), as on Windows/macOS
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_save_many, tmp_path, s, per_process) for s in range(processes)]
        numbers = [n for f in futures for n in f.result()]
    _check_distinct(tmp_path / DAY.isoformat(), numbers, processes * per_process)


def test_interrupted_save_leaves_no_junk(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_generated(_image(), outdir=tmp_path, seed=1, infotext="x", date=DAY)
    assert os.listdir(tmp_path / DAY.isoformat()) == []


def test_filesystem_without_hard_links_still_saves_without_overwriting(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    a = save_generated(_image(), outdir=tmp_path, seed=1, infotext="a", date=DAY)
    b = save_generated(_image(), outdir=tmp_path, seed=1, infotext="b", date=DAY)
    assert (a.path.name, b.path.name) == ("00000-1.png", "00001-1.png")
    assert read_infotext(a.path) == "a" and sorted(os.listdir(a.path.parent)) == ["00000-1.png", "00001-1.png"]


@pytest.mark.parametrize("count, rows, cols", [(2, 1, 2), (3, 2, 2), (4, 2, 2), (5, 2, 3), (8, 3, 3), (9, 3, 3)])
def test_grid_auto_rows_rule(count, rows, cols):
    grid = make_grid([_image(size=(8, 4))] * count)
    assert grid.size == (cols * 8, rows * 4)


def test_grid_places_images_row_by_row_on_black():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = make_grid([_image(c, (4, 4)) for c in colors])  # 2 rows x 2 cols, last cell empty
    assert [grid.getpixel(xy) for xy in [(1, 1), (5, 1), (1, 5), (5, 5)]] == colors + [(0, 0, 0)]
    assert make_grid([_image()] * 4, rows=1).size == (32, 8)
    with pytest.raises(InvalidRequestError):
        make_grid([])


def test_save_grid_names_and_single_image_skip(tmp_path):
    outdir = output_dir(tmp_path, "txt2img-grids")
    assert save_grid([_image()], outdir=outdir, infotext="x", date=DAY) is None
    _touch(outdir / DAY.isoformat(), "00012-5.png")  # samples in the folder do not move the grid counter
    first = save_grid([_image()] * 2, outdir=outdir, infotext="grid info", date=DAY)
    second = save_grid([_image()] * 3, outdir=outdir, infotext=None, date=DAY)
    assert first.path == outdir / "2024-05-06" / "grid-0000.png"
    assert second.path.name == "grid-0001.png" and second.number == 1
    assert read_infotext(first.path) == "grid info"
