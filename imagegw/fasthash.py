"""Shifter's ``fasthash``: an image id for imported files without reading all of them.

SHA-256 over the first 1 MiB, then over 1 MiB read at each 512 MiB step (offsets 0,
512 MiB, 1 GiB, …) until a read returns nothing. For a file under 1 MiB it equals the
plain SHA-256 of the file.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20
STEP = 512 << 20


def fasthash(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            data = f.read(CHUNK)
            if not data:
                break
            digest.update(data)
            offset += STEP
    return digest.hexdigest()
