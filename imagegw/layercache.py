"""The layer cache: blobs kept in ``CacheDirectory`` by digest, shared by every image.

A blob appears under its final name only after it was downloaded whole and its digest
checked, by an atomic rename; so a crash mid-download never leaves a file that passes
as complete. A per-digest ``flock`` makes concurrent pulls (threads or processes, on
one host or several sharing the directory over a filesystem with working locks)
download a shared layer once: the others wait and then find it in place.

Pruning (``LayerCacheMaxSize``, ``LayerCacheMaxAge``) removes least recently used blobs
first, and never one a pull is using: a pull *pins* each blob it uses with a shared
``flock`` on ``<digest>.pin`` for as long as it reads it, and the pruner removes a blob
only while it holds that lock exclusively (taken without waiting: a pinned blob is
skipped). A pull that pins a blob the pruner is removing waits, then finds it gone and
downloads it again. Use is recorded in the blob's mtime (set when pinned), since
``atime`` is not updated on most mounts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"(sha256|sha512):([a-f0-9]{64,128})\Z")


@dataclass
class PruneResult:
    removed: list[str] = field(default_factory=list)  # digests, oldest use first
    freed: int = 0
    kept_in_use: list[str] = field(default_factory=list)
    total_after: int = 0


class LayerCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._pins: dict[str, int] = {}  # digest -> fd holding LOCK_SH (this instance)
        self._pins_lock = threading.Lock()  # layers are fetched by several threads

    # -- pinning -------------------------------------------------------------------

    def pin(self, digest: str) -> None:
        """Keep ``digest`` from being pruned until :meth:`unpin_all`; marks it used now."""
        final = self.path_for(digest)
        with self._pins_lock:
            if digest in self._pins:
                return
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(final.with_name(final.name + ".pin"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a pruner is removing this blob
            except BaseException:
                os.close(fd)
                raise
            self._pins[digest] = fd
        with contextlib.suppress(FileNotFoundError):
            os.utime(final)  # least recently used goes first: this one was used now

    def unpin_all(self) -> None:
        with self._pins_lock:
            for fd in self._pins.values():
                os.close(fd)
            self._pins.clear()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[LayerCache]:
        """``with cache.pinned():`` every blob :meth:`get` returns inside stays until exit."""
        try:
            yield self
        finally:
            self.unpin_all()

    # -- pruning -------------------------------------------------------------------

    def blobs(self) -> list[tuple[float, int, str, Path]]:
        """(last use, size, digest, path) of every complete blob, least recently used first."""
        out = []
        for algo_dir in self.root.glob("sha*"):
            for path in algo_dir.iterdir():
                if "." in path.name:
                    continue  # .pin, .lock, .partial.*
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, f"{algo_dir.name}:{path.name}", path))
        out.sort()
        return out

    def prune(
        self,
        max_bytes: int | None = None,
        max_age: float | None = None,
        now: float | None = None,
    ) -> PruneResult:
        """Remove blobs unused for ``max_age`` seconds, then least recently used ones until
        the total is at most ``max_bytes``; pinned blobs are kept whatever their age.
        One pruner at a time per cache (others return at once with nothing done)."""
        result = PruneResult()
        if max_bytes is None and max_age is None:
            return result
        if not self.root.is_dir():
            return result
        now = time.time() if now is None else now
        guard = os.open(self.root / ".prune.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return result
            blobs = self.blobs()
            total = sum(size for _, size, _, _ in blobs)
            for used, size, digest, path in blobs:
                too_old = max_age is not None and now - used > max_age
                too_big = max_bytes is not None and total > max_bytes
                if not (too_old or too_big):
                    continue
                if self._remove_unpinned(digest, path):
                    total -= size
                    result.removed.append(digest)
                    result.freed += size
                else:
                    result.kept_in_use.append(digest)
            result.total_after = total
            return result
        finally:
            os.close(guard)

    def _remove_unpinned(self, digest: str, path: Path) -> bool:
        if digest in self._pins:
            return False  # pinned by this very cache (its flock would refuse us anyway)
        fd = os.open(path.with_name(path.name + ".pin"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

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
        self.pin(digest)  # before looking: a pruner cannot remove it from here on
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
