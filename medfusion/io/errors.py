"""Errors raised at the input boundary: each names the file and the problem in one line."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A file or folder that cannot be read as what it claims to be."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
