"""A streaming tar reader for image layers.

Headers are parsed by hand: ``tarfile`` costs about 17 us per member before any file is
written, and it cannot hand out file data without copying it. It understands ustar,
pax (including global headers), GNU long names and the GNU sparse formats; it yields one
:class:`Member` at a time and the caller consumes (or skips) its data before the next.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

REG, HARDLINK, SYMLINK, _CHR, _BLK, DIR, _FIFO, SPARSE = (
    "file",
    "hardlink",
    "symlink",
    "character device",
    "block device",
    "directory",
    "fifo",
    "sparse",
)
_TYPES = {
    b"0": REG,
    b"\0": REG,
    b"7": REG,
    b"1": HARDLINK,
    b"2": SYMLINK,
    b"3": _CHR,
    b"4": _BLK,
    b"5": DIR,
    b"6": _FIFO,
    b"S": SPARSE,
    b"D": DIR,
}
_ZERO_BLOCK = bytes(512)
# name, mode, size, mtime, typeflag, linkname, magic, prefix (uid/gid/owner names unused)
_HEADER = struct.Struct("100s8s16x12s12s8xc100s6s82x155s12x")
_META_TYPES = frozenset((b"x", b"g", b"L", b"K", b"V", b"N", b"M"))
_PAX_SPARSE_KEYS = (
    b"GNU.sparse.major",
    b"GNU.sparse.map",
    b"GNU.sparse.size",
    b"GNU.sparse.realsize",
)


class TarError(Exception):
    pass


@dataclass(slots=True)
class Member:
    kind: str
    name: bytes
    linkname: bytes
    mode: int
    mtime: int  # nanoseconds
    size: int  # data bytes in the archive
    sparse: list[tuple[int, int]] | None = None
    realsize: int = 0


class TarReader:
    """Members of a tar stream; the caller consumes (or not) each member's data before
    asking for the next one."""

    def __init__(self, stream: BinaryIO, on_chunk: Callable[[], None] | None) -> None:
        self._read1 = stream.read1  # type: ignore[attr-defined]
        self._on_chunk = on_chunk
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._pos = 0
        self.left = 0  # unread data bytes of the current member

    def _refill(self) -> bool:
        chunk = self._read1()
        if not chunk:
            return False
        self._buf = chunk
        self._mv = memoryview(chunk)
        self._pos = 0
        if self._on_chunk is not None:
            self._on_chunk()
        return True

    def _read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (fewer only at the end of the stream)."""
        pos = self._pos
        if len(self._buf) - pos >= n:
            self._pos = pos + n
            return self._buf[pos : pos + n]
        parts = [self._buf[pos:]]
        got = len(parts[0])
        self._pos = len(self._buf)
        while got < n and self._refill():
            take = min(n - got, len(self._buf))
            parts.append(self._buf[:take])
            self._pos = take
            got += take
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._refill():
                    raise TarError("unexpected end of data (truncated layer)")
                continue
            k = min(avail, n)
            self._pos += k
            n -= k

    def read_data(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) < n:
            raise TarError("unexpected end of data (truncated layer)")
        self.left -= n
        return data

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next ``n`` data bytes of the member to ``fd`` without copying them."""
        self.left -= n
        while n:
            pos = self._pos
            avail = len(self._buf) - pos
            if not avail:
                if not self._refill():
                    raise TarError("unexpected end of data (truncated layer)")
                continue
            k = avail if avail < n else n
            _write_all(fd, self._mv[pos : pos + k])
            self._pos = pos + k
            n -= k

    def members(self) -> Iterator[Member]:
        pax_global: dict[bytes, bytes] = {}
        while True:
            member = self._next_member(pax_global)
            if member is None:
                return
            yield member
            self._skip(self.left + (-member.size % 512))
            self.left = 0

    def next_member(self, pax_global: dict[bytes, bytes]) -> Member | None:
        """The next member, for callers that walk the archive themselves: after it they
        call :meth:`skip_data` (or consume ``left`` bytes), then :meth:`skip_padding`.
        ``pax_global`` carries global pax headers from one call to the next."""
        return self._next_member(pax_global)

    def skip_data(self) -> None:
        """Skip the unread data bytes of the current member."""
        self._skip(self.left)
        self.left = 0

    def skip_padding(self, member: Member) -> None:
        """Skip the zero padding after ``member``'s data (all of it read or skipped)."""
        self._skip(-member.size % 512)

    def _header(self) -> bytes | None:
        hdr = self._read(512)
        if not hdr or hdr == _ZERO_BLOCK:
            return None  # end of archive (a missing end marker is tolerated, like GNU tar)
        if len(hdr) < 512:
            raise TarError("unexpected end of data in a tar header (truncated layer)")
        _check_header(hdr)
        return hdr

    def _next_member(self, pax_global: dict[bytes, bytes]) -> Member | None:
        pax: dict[bytes, bytes] = {}
        sparse00: list[int] = []
        longname = longlink = None
        while True:
            hdr = self._header()
            if hdr is None:
                if pax or longname is not None or longlink is not None:
                    raise TarError("extended header at the end of the archive")
                return None
            name, mode, size_field, mtime, flag, linkname, magic, prefix = _HEADER.unpack(hdr)
            size = _number(size_field)
            if size < 0:
                raise TarError("negative size in a tar header")
            if flag in _META_TYPES:
                data = self._read(size)
                if len(data) < size:
                    raise TarError("unexpected end of data (truncated layer)")
                self._skip(-size % 512)
                if flag == b"x":
                    _parse_pax(data, pax, sparse00)
                elif flag == b"g":
                    _parse_pax(data, pax_global, [])
                elif flag == b"L":
                    longname = _cstr(data)
                elif flag == b"K":
                    longlink = _cstr(data)
                elif flag == b"M":
                    raise TarError("multi-volume archive members are not supported")
                continue  # volume labels and old GNU rename lists carry no content
            if longname is None:
                name = _cstr(name)
                if magic == b"ustar\0" and prefix[0]:  # POSIX only: GNU keeps other data here
                    name = _cstr(prefix) + b"/" + name
            else:
                name = longname
            linkname = _cstr(linkname) if longlink is None else longlink
            mtime_ns = _number(mtime) * 1_000_000_000
            if pax or pax_global:
                if b"mtime" in pax_global:
                    mtime_ns = _pax_time(pax_global[b"mtime"])
                name = pax.get(b"path", name)
                linkname = pax.get(b"linkpath", linkname)
                if b"size" in pax:
                    size = _pax_int(pax[b"size"])
                if b"mtime" in pax:
                    mtime_ns = _pax_time(pax[b"mtime"])
            return self._member(
                hdr, flag, name, linkname, _number(mode) & 0o7777, mtime_ns, size, pax, sparse00
            )

    def _member(
        self,
        hdr: bytes,
        flag: bytes,
        name: bytes,
        linkname: bytes,
        mode: int,
        mtime: int,
        size: int,
        pax: dict[bytes, bytes],
        sparse00: list[int],
    ) -> Member:
        kind = _TYPES.get(flag, REG)  # POSIX: unknown types are read as regular files
        if kind is REG and flag == b"\0" and name.endswith(b"/"):
            kind = DIR  # pre-POSIX archives mark directories by a trailing slash
        member = Member(kind, name, linkname, mode, mtime, size)
        self.left = size
        if kind is SPARSE:
            self._old_gnu_sparse(hdr, member)
        elif pax and (sparse00 or any(k in pax for k in _PAX_SPARSE_KEYS)):
            self._pax_sparse(pax, sparse00, member)
        return member

    def _old_gnu_sparse(self, hdr: bytes, member: Member) -> None:
        """Old GNU sparse member ('S'): the map is in the header and extension blocks."""
        entries = [hdr[386 + 24 * i : 410 + 24 * i] for i in range(4)]
        extended = hdr[482]
        member.realsize = _number(hdr[483:495])
        while extended:
            ext = self._read(512)
            if len(ext) < 512:
                raise TarError("unexpected end of data (truncated layer)")
            entries += [ext[24 * i : 24 * i + 24] for i in range(21)]
            extended = ext[504]
        member.sparse = [(_number(e[:12]), _number(e[12:])) for e in entries if e.strip(b"\0")]

    def _pax_sparse(self, pax: dict[bytes, bytes], sparse00: list[int], member: Member) -> None:
        """PAX sparse formats 0.0, 0.1 (map in the header) and 1.0 (map in the data)."""
        member.name = pax.get(b"GNU.sparse.name", member.name)
        realsize = pax.get(b"GNU.sparse.realsize", pax.get(b"GNU.sparse.size"))
        if realsize is None:
            raise TarError("sparse member without a real size")
        member.realsize = _pax_int(realsize)
        if pax.get(b"GNU.sparse.major") == b"1":
            numbers = self._sparse_map_1_0()
        elif b"GNU.sparse.map" in pax:
            numbers = [_pax_int(x) for x in pax[b"GNU.sparse.map"].split(b",") if x]
        else:
            numbers = sparse00
        if len(numbers) % 2:
            raise TarError("malformed sparse map")
        member.kind = SPARSE
        member.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))

    def _sparse_map_1_0(self) -> list[int]:
        """Read the decimal sparse map that starts the data of a PAX 1.0 sparse member."""
        text = b""
        lines: list[bytes] = []
        while True:
            if self.left < 512:
                raise TarError("malformed sparse map")
            text += self.read_data(512)
            lines = text.split(b"\n")
            if len(lines) > 1:
                count = _pax_int(lines[0])
                if len(lines) - 1 >= 1 + 2 * count:
                    return [_pax_int(x) for x in lines[1 : 1 + 2 * count]]


def _cstr(field: bytes) -> bytes:
    return field.partition(b"\0")[0]


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 binary."""
    try:
        return int(field.rstrip(b"\0 "), 8)  # the common case; int() ignores spaces
    except ValueError:
        return _number_slow(field)


def _number_slow(field: bytes) -> int:
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = _cstr(field).strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"bad number {field!r} in a tar header") from None


def _check_header(hdr: bytes) -> None:
    try:
        claimed = _number(hdr[148:156])
    except TarError:
        claimed = -1
    # The checksum is the byte sum of the header with its own field read as spaces. The low
    # half of adler32 is 1 + that byte sum modulo 65521: a C-speed test that is exact for
    # any mismatch it reports, instead of a 512-step Python sum per header.
    expected = claimed - 256 + sum(hdr[148:156]) + 1
    if zlib.adler32(hdr) & 0xFFFF != expected % 65521 and claimed != _signed_sum(hdr):
        raise TarError("bad tar header checksum (not a tar stream, or corrupt)")


def _signed_sum(hdr: bytes) -> int:
    """Old tars summed the header as signed chars."""
    signed = sum(b - 256 if b > 127 else b for b in hdr)
    chk = hdr[148:156]
    return signed - sum(b - 256 if b > 127 else b for b in chk) + 256


def _parse_pax(data: bytes, out: dict[bytes, bytes], sparse00: list[int]) -> None:
    """``<len> <key>=<value>\\n`` records. Values stay bytes: names survive byte for byte."""
    pos = 0
    while pos < len(data):
        if data[pos : pos + 1] in (b"\0", b"\n"):
            return  # padding some writers leave after the last record
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n"):
            raise TarError("malformed pax header")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise TarError("malformed pax header")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            sparse00.append(_pax_int(value))  # sparse 0.0 repeats these keys in map order
        else:
            out[key] = value
        pos += length


def _pax_int(value: bytes) -> int:
    if not value.isdigit():
        raise TarError(f"bad pax number {value!r}")
    return int(value)


def _pax_time(value: bytes) -> int:
    """pax decimal seconds (``-12.5``, ``1700000000.123456789``) to nanoseconds."""
    negative = value.startswith(b"-")
    seconds, _, fraction = value.lstrip(b"-").partition(b".")
    try:
        ns = int(seconds or b"0") * 1_000_000_000 + int(fraction[:9].ljust(9, b"0"))
    except ValueError:
        raise TarError(f"bad pax time {value!r}") from None
    return -ns if negative else ns


def _write_all(fd: int, data: memoryview) -> None:
    written = os.write(fd, data)
    while written < len(data):  # short writes happen just before ENOSPC
        data = data[written:]
        written = os.write(fd, data)
