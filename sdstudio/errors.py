"""Errors every layer raises: each names the file or field and what is wrong."""
from __future__ import annotations

from pathlib import Path


class SDStudioError(Exception):
    """Base class: a problem the user can act on, printed as one line by the CLI and API."""


class ModelFileError(SDStudioError):
    """A model file (checkpoint, VAE, LoRA, embedding) cannot be used; names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafeFileError(ModelFileError):
    """A pickle-based file asked to import or call something outside the tensor allow-list."""


class InvalidRequestError(SDStudioError):
    """A generation request has a bad field (name, value, what is allowed)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")
