"""Errors raised at the input boundary: each names the file and the problem in one line."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A file or folder that cannot be read as what it claims to be.

    The message is always one line, ``"<path>: <problem>"``: a problem text from a library that
    spans several lines (decoders add hints and tracebacks) is joined with " / ".
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = " / ".join(part.strip() for part in str(problem).splitlines() if part.strip())
        super().__init__(f"{self.path}: {self.problem}")
