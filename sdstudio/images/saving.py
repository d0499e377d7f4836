"""A1111's output layout: outputs/txt2img-images/YYYY-MM-DD/00007-1234.png, grids as grid-0003.png.

Numbering follows A1111 `modules/images.py:get_next_sequence_number` (largest numeric prefix in the folder + 1),
but unlike A1111 it is safe with several writers (threads or processes) saving into one folder at once:

1. the image is encoded in memory;
2. the number N is reserved by creating the hidden file `.NNNNN.tmp` with O_EXCL (only one writer can);
3. the folder is scanned again; if a file numbered N appeared meanwhile, the reservation is dropped and N + 1
   tried (a writer that finished N unlinks its reservation only after its image is in place, so a later holder
   of `.NNNNN.tmp` always sees it);
4. the image bytes go into the reservation file, which is then hard-linked to its final name (link fails
   instead of overwriting) and unlinked. The final name therefore appears complete or not at all.
"""
from __future__ import annotations

import datetime
import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from sdstudio.errors import InvalidRequestError
from sdstudio.images.infotext import encode_image, write_new_file

# Folder under <data dir>/outputs for each mode (A1111 `outdir_*` option defaults).
OUTPUT_DIRS: dict[str, str] = {
    "txt2img": "txt2img-images",
    "img2img": "img2img-images",
    "extras": "extras-images",
    "txt2img-grids": "txt2img-grids",
    "img2img-grids": "img2img-grids",
    "init-images": "init-images",
}
GRID_BASENAME = "grid"


@dataclass
class SavedImage:
    """Where an image was saved and the sequence number in its name."""

    path: Path
    number: int


def output_dir(data_dir: Path, mode: str) -> Path:
    """<data_dir>/outputs/<folder> for a mode: txt2img, img2img, extras, txt2img-grids, img2img-grids, init-images."""
    folder = OUTPUT_DIRS.get(mode)
    if folder is None:
        raise InvalidRequestError("mode", f"{mode!r} is not one of {', '.join(OUTPUT_DIRS)}")
    return Path(data_dir) / "outputs" / folder


def _used_numbers(folder: Path, basename: str) -> set[int]:
    """Integers before the first '-' of the names in folder that start with "<basename>-" (all names if none)."""
    prefix = f"{basename}-" if basename else ""
    numbers = set()
    for name in os.listdir(folder):
        if name.startswith(prefix):
            try:
                numbers.add(int(os.path.splitext(name[len(prefix):])[0].split("-")[0]))
            except ValueError:
                pass
    return numbers


def next_sequence_number(folder: Path, basename: str = "") -> int:
    """A1111 get_next_sequence_number: 1 + the largest number used in folder (0 if none)."""
    return max(_used_numbers(folder, basename), default=-1) + 1


def _numbered_stem(basename: str, number: int) -> str:
    """"00007" without a basename, "grid-0007" with one (A1111 widths)."""
    return f"{basename}-{number:04}" if basename else f"{number:05}"


def _link_into_place(source: Path, target: Path) -> None:
    """Give source's content the name target without ever replacing an existing target (FileExistsError)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as error:
        # No hard links on this filesystem (FAT/exFAT, some network shares): the reservation already guards
        # the number, so a plain rename is safe unless a foreign writer put a file there.
        if target.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(target)) from error
        os.rename(source, target)


def _try_publish(folder: Path, basename: str, number: int, final: Path, data: bytes) -> bool:
    """Reserve number, check nobody used it, and put data at final; False if the number was taken."""
    reservation = folder / f".{_numbered_stem(basename, number)}.tmp"
    try:
        write_new_file(reservation, data)
    except FileExistsError:
        return False
    try:
        if number in _used_numbers(folder, basename):
            return False
        _link_into_place(reservation, final)
        return True
    except FileExistsError:
        return False
    finally:
        reservation.unlink(missing_ok=True)


def save_numbered(folder: Path, basename: str, decoration: str, ext: str, data: bytes) -> SavedImage:
    """Save data as <number><decoration>.<ext> in folder with the next free A1111 number; never overwrites."""
    folder.mkdir(parents=True, exist_ok=True)
    number = next_sequence_number(folder, basename)
    while True:
        final = folder / f"{_numbered_stem(basename, number)}{decoration}.{ext}"
        if _try_publish(folder, basename, number, final, data):
            return SavedImage(path=final, number=number)
        number += 1


def _dated(outdir: Path, date: datetime.date | None) -> Path:
    """The YYYY-MM-DD subfolder (A1111 save_to_dirs with pattern [date])."""
    return Path(outdir) / (date or datetime.date.today()).isoformat()


def save_generated(image: Image.Image, *, outdir: Path, seed: int, infotext: str | None, ext: str = "png",
                   suffix: str = "", date: datetime.date | None = None) -> SavedImage:
    """Save a generated image as <outdir>/YYYY-MM-DD/NNNNN-<seed><suffix>.<ext> with its infotext embedded."""
    data = encode_image(image, infotext, ext)
    return save_numbered(_dated(outdir, date), "", f"-{seed}{suffix}", ext.lower(), data)


def grid_rows(count: int) -> int:
    """A1111's automatic grid rows (n_rows = -1): round(sqrt(count)), at most count."""
    return min(count, round(math.sqrt(count)))


def make_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """Paste images row by row onto a black RGB grid; cells are the first image's size (A1111 image_grid)."""
    if not images:
        raise InvalidRequestError("images", "a grid needs at least one image")
    rows = min(len(images), rows or grid_rows(len(images)))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for index, image in enumerate(images):
        grid.paste(image, (index % cols * width, index // cols * height))
    return grid


def save_grid(images: Sequence[Image.Image], *, outdir: Path, infotext: str | None, ext: str = "png",
              rows: int | None = None, date: datetime.date | None = None) -> SavedImage | None:
    """Save a grid of 2+ images as <outdir>/YYYY-MM-DD/grid-NNNN.<ext>; None for fewer (grid_only_if_multiple)."""
    if len(images) < 2:
        return None
    data = encode_image(make_grid(images, rows), infotext, ext)
    return save_numbered(_dated(outdir, date), GRID_BASENAME, "", ext.lower(), data)
