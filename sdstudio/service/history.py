"""Generation history in SQLite (`<data>/history.sqlite`): one row per image, searchable by text, re-runnable."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    mode TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    params TEXT NOT NULL,          -- JSON of the GenerationRequest fields (images excluded)
    seed INTEGER NOT NULL,
    model TEXT,
    model_hash TEXT,
    vae TEXT,
    loras TEXT,                    -- the infotext's "Lora hashes" value
    path TEXT,
    infotext TEXT NOT NULL,
    seconds REAL
);
CREATE INDEX IF NOT EXISTS images_created ON images(created);
"""


class History:
    """Thread-safe append and search over the history table."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(SCHEMA)

    def add(self, *, mode: str, prompt: str, negative_prompt: str, params: dict[str, Any], seed: int,
            model: str | None, model_hash: str | None, vae: str | None, loras: str | None, path: str | None,
            infotext: str, seconds: float | None) -> int:
        """Store one generated image; returns its id."""
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT INTO images (created, mode, prompt, negative_prompt, params, seed, model, model_hash, vae,"
                " loras, path, infotext, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), mode, prompt, negative_prompt, json.dumps(params), seed, model, model_hash, vae, loras,
                 path, infotext, seconds))
            return int(cursor.lastrowid)

    def search(self, text: str = "", limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Newest first; `text` matches prompt, negative prompt, model or infotext (case-insensitive)."""
        where, args = "", []
        if text:
            where = ("WHERE prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\' "
                     "OR model LIKE ? ESCAPE '\\' OR infotext LIKE ? ESCAPE '\\'")
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            args = [pattern] * 4
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM images {where}", args).fetchone()[0]
            rows = self._db.execute(f"SELECT * FROM images {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                                    args + [limit, offset]).fetchall()
        return [self._row(r) for r in rows], int(total)

    def get(self, image_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return self._row(row) if row else None

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        item = dict(row)
        item["params"] = json.loads(item["params"])
        return item
