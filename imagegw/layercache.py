"""The layer cache: blobs kept in ``CacheDirectory`` by digest, shared by every image.

A blob appears under its final name only after it was downloaded whole and its digest
checked, by an atomic rename; so a crash mid-download never leaves a file that passes
as complete. A per-digest ``flock`` makes concurrent pulls (threads or processes, on
one host or several sharing the directory over a filesystem with working locks)
download a shared layer once: the others wait and then find it in place.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_DIGEST = re.compile(r"(sha256|sha512):([a-f0-9]{64,128})\Z")


class LayerCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        """Where the verified blob of ``digest`` lives (whether or not it is there yet)."""
        match = _DIGEST.match(digest)
        if not match:
            # The digest comes from a registry: never let it steer a path.
            raise ValueError(f"not a valid digest: {digest!r}")
        algo, hexdigest = match.groups()
        return self.root / algo / hexdigest

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path_for(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def get(self, digest: str, size: int, fetch: Callable[[BinaryIO], None]) -> tuple[Path, bool]:
        """Return (path of the blob, whether this call downloaded it).

        ``fetch(file)`` must write the whole blob to ``file`` and raise if its bytes do
        not match ``digest``; nothing it wrote is kept when it raises.
        """
        final = self.path_for(digest)
        if self.has(digest, size):
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(final.with_name(final.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if self.has(digest, size):
                return final, False
            # We hold the lock: any partial file of this digest is a dead writer's.
            for stale in final.parent.glob(final.name + ".partial.*"):
                stale.unlink(missing_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=final.name + ".partial.", dir=final.parent)
            try:
                with os.fdopen(fd, "w+b") as tmp:
                    fetch(tmp)
                    tmp.flush()
                    if tmp.tell() != size:
                        raise OSError(f"blob {digest}: wrote {tmp.tell()} of {size} bytes")
                os.rename(tmp_name, final)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            return final, True
        finally:
            os.close(lock_fd)
