"""Prompt styles kept in an AUTOMATIC1111 `styles.csv` (columns name, prompt, negative_prompt)."""
from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sdstudio.errors import InvalidRequestError

log = logging.getLogger(__name__)

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class PromptStyle:
    """One named style: text merged into the prompt and into the negative prompt."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111 merge: `{prompt}` in the style is replaced by the prompt, else the two are joined by ", " (blanks dropped)."""
    if PLACEHOLDER in style_prompt:
        return style_prompt.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def _unmerge(style_text: str, prompt: str) -> str | None:
    """The prompt before `merge_prompts(style_text, ·)`, or None where the style text is not in it (A1111 rules)."""
    prompt, style_text = prompt.strip(), style_text.strip()
    if PLACEHOLDER in style_text:
        left, _, right = style_text.partition(PLACEHOLDER)  # A1111 raises on a second placeholder
        if prompt.startswith(left) and prompt.endswith(right):
            return prompt[len(left):len(prompt) - len(right)]
        return None
    if not prompt.endswith(style_text):
        return None
    rest = prompt[:len(prompt) - len(style_text)]
    return rest[:-2] if rest.endswith(", ") else rest


class StyleDB:
    """The styles of one `styles.csv`, in file order; edits are written back atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.styles: dict[str, PromptStyle] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again (missing file: no styles). Tolerates a BOM, quoting, extra columns, `#` comment rows."""
        self.styles.clear()
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, skipinitialspace=True)
            if "name" not in (reader.fieldnames or []):
                log.warning("%s: no 'name' column, no styles loaded", self.path)
                return
            for row in reader:
                name = row.get("name") or ""
                if not name or name.startswith("#"):
                    continue
                prompt = row.get("prompt") if "prompt" in row else row.get("text")  # old files: name, text
                self.styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")

    def names(self) -> list[str]:
        """Style names in file order."""
        return list(self.styles)

    def apply_styles(self, prompt: str, negative: str, names: list[str]) -> tuple[str, str]:
        """Merge the named styles in order into (prompt, negative); an unknown name merges empty text (as A1111)."""
        for name in names:
            style = self.styles.get(name, PromptStyle(name))
            prompt = merge_prompts(style.prompt, prompt)
            negative = merge_prompts(style.negative_prompt, negative)
        return prompt, negative

    def extract_styles_from_prompt(self, prompt: str, negative: str) -> tuple[list[str], str, str]:
        """Undo `apply_styles` where the texts allow it: (style names in apply order, prompt, negative)."""
        extracted: list[str] = []
        candidates = list(self.styles.values())
        while True:
            for style in candidates:
                if not style.prompt and not style.negative_prompt:
                    continue
                new_prompt = _unmerge(style.prompt, prompt)
                new_negative = _unmerge(style.negative_prompt, negative) if new_prompt is not None else None
                if new_negative is not None:
                    prompt, negative = new_prompt, new_negative
                    candidates.remove(style)
                    extracted.append(style.name)
                    break
            else:
                return extracted[::-1], prompt, negative

    def add(self, style: PromptStyle) -> None:
        """Add a style, or replace the one with the same name, and save."""
        if not style.name or style.name.startswith("#"):
            raise InvalidRequestError("name", f"style name {style.name!r} must be non-empty and not start with '#'")
        self.styles[style.name] = style
        self.save()

    def delete(self, name: str) -> None:
        """Remove a style and save."""
        if name not in self.styles:
            raise InvalidRequestError("name", f"no style named {name!r} in {self.path}")
        del self.styles[name]
        self.save()

    def save(self) -> None:
        """Write all styles (UTF-8 with BOM, as A1111) via a temporary file; the previous file is kept as `.bak`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".csv", prefix=".styles-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8-sig", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=[f.name for f in fields(PromptStyle)])
                writer.writeheader()
                writer.writerows(asdict(style) for style in self.styles.values())
            if self.path.exists():
                shutil.copy2(self.path, self.path.with_name(self.path.name + ".bak"))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
