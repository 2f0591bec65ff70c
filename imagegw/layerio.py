"""Reading layer blobs: the decompressed tar stream of a gzip, zstd or plain layer.

The compression is chosen by the blob's magic bytes, never by the media type a manifest
claims (registries and tools get that wrong often enough).

Decompression runs in a background thread, so that tar parsing and file writing in the
caller's thread overlap with it: zlib, ISA-L and zstandard release the GIL while they
work. Measured on this project's 2-core VMs (5 layers, 390 MB of tar, 30,000 files, into
tmpfs): gzip layers flatten in 1.25 s with zlib (0.85 s with the optional ``isal``),
zstd in 0.67 s, plain tars in 0.64 s. A child process writing into a pipe was tried too
and was slower (1.36 s / 0.75 s); ``gzip -dc`` alone needs 1.85 s for the data, against
1.05 s for in-process zlib and 0.47 s for ISA-L.
"""

from __future__ import annotations

import io
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import zstandard

try:  # ISA-L inflates about twice as fast as zlib (0.47 s against 1.03 s for 390 MB here)
    from isal import isal_zlib as _inflate
except ImportError:  # optional: plain zlib otherwise
    _inflate = zlib  # type: ignore[no-redef]

_GZIP_ERRORS: tuple[type[Exception], ...] = (zlib.error, _inflate.error)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

CHUNK = 1 << 20  # decompressed bytes handed over at a time
_READ = 1 << 18  # compressed bytes read at a time
_QUEUE_DEPTH = 8  # chunks in flight for the thread worker


class CorruptLayerError(ValueError):
    """The layer blob is not valid gzip/zstd data (corrupt or truncated)."""


def detect_compression(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"tar"`` for a blob starting with ``head``."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


def open_layer(path: Path) -> LayerStream:
    """Open a layer blob and return its decompressed tar stream (a binary file object).

    Corrupt or truncated compressed data raises :class:`CorruptLayerError` from a read.
    Close the stream (or use it as a context manager) to stop the worker thread.
    """
    fh = open(path, "rb", buffering=0)  # closed by the returned stream
    try:
        kind = detect_compression(fh.read(4))
        fh.seek(0)
        source: _Source
        if kind == "tar":
            source = _FileSource(fh)
        else:
            source = _ThreadSource(fh, kind, str(path))
    except BaseException:
        fh.close()
        raise
    return LayerStream(source, kind, str(path))


class _Source(Protocol):
    def next_chunk(self) -> bytes: ...  # b"" at the end

    def compressed_read(self) -> int: ...

    def close(self) -> None: ...


class LayerStream(io.BufferedIOBase):
    """Decompressed layer data. ``read1()`` hands out whole chunks without copying.

    ``compressed_read`` is how many bytes of the blob have been consumed so far.
    """

    def __init__(self, source: _Source, compression: str, name: str) -> None:
        super().__init__()
        self.compression = compression
        self.name = name
        self._source = source
        self._buf = b""
        self._pos = 0
        self._eof = False

    @property
    def compressed_read(self) -> int:
        return self._source.compressed_read()

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        if self._pos >= len(self._buf):
            if self._eof:
                return b""
            self._buf = self._source.next_chunk()
            self._pos = 0
            if not self._buf:
                self._eof = True
                return b""
        start = self._pos
        end = len(self._buf) if size is None or size < 0 else min(len(self._buf), start + size)
        self._pos = end
        if start == 0 and end == len(self._buf):
            return self._buf
        return self._buf[start:end]

    def read(self, size: int | None = -1) -> bytes:
        parts = []
        remaining = -1 if size is None or size < 0 else size
        while remaining:
            chunk = self.read1(remaining)
            if not chunk:
                break
            parts.append(chunk)
            if remaining > 0:
                remaining -= len(chunk)
        return b"".join(parts)

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


class _FileSource:
    def __init__(self, fh: io.FileIO) -> None:
        self._fh = fh

    def next_chunk(self) -> bytes:
        return self._fh.read(CHUNK)

    def compressed_read(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()


# -- thread worker -----------------------------------------------------------------------


class _ThreadSource:
    """Decompression in a thread, handing chunks over through a bounded queue."""

    def __init__(self, fh: io.FileIO, kind: str, name: str) -> None:
        self._fh = fh
        self._kind = kind
        self._name = name
        self._read = 0
        self._done = False
        self._stop = threading.Event()
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._produce, name=f"unpack {name}", daemon=True)
        self._thread.start()

    def _count(self, n: int) -> None:
        self._read += n

    def _produce(self) -> None:
        chunks = (
            _gunzip(self._fh, self._count)
            if self._kind == "gzip"
            else _unzstd(self._fh, self._count)
        )
        item: bytes | BaseException | None
        try:
            for item in chunks:
                if not self._put(item):
                    return
            item = None
        except (*_GZIP_ERRORS, zstandard.ZstdError) as exc:
            item = CorruptLayerError(f"{self._name}: corrupt {self._kind} data: {exc}")
        except BaseException as exc:  # handed to the reader, which re-raises it
            item = exc
        self._put(item)

    def _put(self, item: bytes | BaseException | None) -> bool:
        """Queue ``item``; False once the reader has closed the stream."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next_chunk(self) -> bytes:
        if self._done:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is None:
            self._done = True
            return b""
        return item

    def compressed_read(self) -> int:
        return self._read

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._fh.close()


# -- decompressors -----------------------------------------------------------------------


def _gunzip(fh: io.RawIOBase, count: Callable[[int], None]) -> Iterator[bytes]:
    """Inflate gzip data, including concatenated members (``gzip`` allows them)."""
    dec = _inflate.decompressobj(31)
    data = b""
    while True:
        if dec.eof:
            data = dec.unused_data + data
            while len(data) < 2 and (more := fh.read(_READ)):
                count(len(more))
                data += more
            if not data.startswith(GZIP_MAGIC):
                # End of data, or padding after the last member (gzip(1) ignores it too).
                return
            dec = _inflate.decompressobj(31)
        if not data:
            data = fh.read(_READ)
            if not data:
                break
            count(len(data))
        # max_length bounds the memory a highly compressed chunk can expand into.
        out = dec.decompress(data, 4 * CHUNK)
        data = dec.unconsumed_tail
        if out:
            yield out
    raise zlib.error("truncated gzip data (unexpected end of file)")


def _unzstd(fh: io.RawIOBase, count: Callable[[int], None]) -> Iterator[bytes]:
    """Decompress zstd frames after checking that every frame is complete.

    python-zstandard's readers return a short result instead of failing on a truncated
    frame, and its ``decompressobj`` cannot bound its output; so the frame structure is
    walked first (a few small preads per MB), then the data is streamed with bounded reads.
    """
    _check_zstd_frames(fh.fileno())
    reader = zstandard.ZstdDecompressor().stream_reader(
        _CountingReader(fh, count), read_size=_READ, read_across_frames=True
    )
    while out := reader.read(CHUNK):
        yield out


class _CountingReader:
    def __init__(self, fh: io.RawIOBase, count: Callable[[int], None]) -> None:
        self._fh = fh
        self._count = count

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n) or b""
        self._count(len(data))
        return data


_ZSTD_SKIPPABLE = 0x184D2A50


def _check_zstd_frames(fd: int) -> None:
    """Walk zstd frame and block headers (with pread: the file offset stays where it is);
    raise ZstdError if the data is cut short."""
    end = os.fstat(fd).st_size
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    while pos < end:
        head = os.pread(fd, 18, pos)
        if len(head) < 5:
            raise zstandard.ZstdError("truncated zstd frame header")
        (magic,) = struct.unpack_from("<I", head)
        if magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
            if len(head) < 8:
                raise zstandard.ZstdError("truncated skippable frame")
            pos += 8 + struct.unpack_from("<I", head, 4)[0]
            continue
        if head[:4] != ZSTD_MAGIC:
            raise zstandard.ZstdError(f"unknown frame magic at offset {pos}")
        pos = _walk_zstd_blocks(fd, pos, head[4], end)
    if pos > end:
        raise zstandard.ZstdError("truncated zstd data (unexpected end of file)")


def _walk_zstd_blocks(fd: int, pos: int, descriptor: int, end: int) -> int:
    """Offset just after the frame at ``pos``, whose header descriptor byte is given."""
    single_segment = descriptor & 0x20
    fcs_size = (0, 2, 4, 8)[descriptor >> 6] or (1 if single_segment else 0)
    pos += 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs_size
    while True:
        block = os.pread(fd, 3, pos)
        if len(block) < 3:
            raise zstandard.ZstdError("truncated zstd data (unexpected end of file)")
        value = int.from_bytes(block, "little")
        block_type = (value >> 1) & 3
        if block_type == 3:
            raise zstandard.ZstdError(f"reserved zstd block type at offset {pos}")
        pos += 3 + (1 if block_type == 1 else value >> 3)
        if pos > end:
            raise zstandard.ZstdError("truncated zstd data (unexpected end of file)")
        if value & 1:  # the last block of the frame
            return pos + (4 if descriptor & 0x04 else 0)
