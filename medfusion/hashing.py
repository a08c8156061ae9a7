"""Content hashes of files: the one SHA-256 that model packages, domain sidecars and text-encoder
weights are checked with."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB: a package's weights are hashed without holding them in memory


def sha256_of(path: str | Path) -> str:
    """The SHA-256 (FIPS 180-4) of a file's bytes, as 64 lower-case hex digits.

    Args:
        path: a readable file.

    Raises:
        OSError: the file cannot be opened or read (FileNotFoundError when it does not exist).

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "empty"
        >>> _ = p.write_bytes(b"")
        >>> sha256_of(p)[:16]
        'e3b0c44298fc1c14'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
