"""Streaming the planned tree, as one tar stream, into ``tar2sqfs`` (squashfs-tools-ng).

Second half of the streaming conversion (the first is imagegw.treeplan): the layers are
read again, oldest first, and only members that survive in the final tree are copied,
under their final names, into the writer's stdin. Nothing of the tree is written to
disk; decompression (a thread per layer, imagegw.layerio), this loop and the writer's
compressor threads run at the same time.

What the stream holds, in this order: the root (``./``, its mode), every directory with
its final mode and mtime (parents first), every symlink (then the hard links to
symlinks), the regular files in layer order (each inode's data once, under its first
surviving name), then the other names of hard-linked files as hard links to that name.
All owned by root (uid/gid 0, as ``mksquashfs -all-root``), no xattrs, no device nodes
(never in a plan). Headers are GNU tar: long names and link targets in ``L``/``K``
records, byte for byte; numbers too large for octal in base-256; mtimes clamped to what
squashfs keeps (0 .. 2**32-1 s). Sparse members are expanded with zeros: the writer
stores all-zero blocks as holes again.

The site's ``ConverterOptions.squashfs`` are mksquashfs options; :func:`tar2sqfs_args`
translates those it knows. Any other one makes :func:`stream_unavailable` say why, and
the pipeline then uses the on-disk path (flatten + mksquashfs), as it does when
``tar2sqfs`` is not installed or an examiner needs a tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from imagegw import layerio
from imagegw.flatten import FlattenResult, LayerFile, MalformedLayerError
from imagegw.squashfs import SquashfsError, with_default_compression
from imagegw.tarstream import TarError, TarReader
from imagegw.treeplan import Inode, ScannedLayer, TreePlan, plan_tree, scan_layers

__all__ = ["TAR2SQFS", "build", "stream_squashfs", "stream_unavailable", "tar2sqfs_args"]

TAR2SQFS = "tar2sqfs"

# mksquashfs options that change nothing here: we always stream root-owned entries
# without xattrs into a new file, quietly.
_NO_OPS = frozenset(
    ("-all-root", "-root-owned", "-noappend", "-no-progress", "-quiet", "-no-xattrs", "-xattrs")
)
# mksquashfs compressor option -> tar2sqfs -X key (None: a flag without value)
_COMP_KEYS = {
    "-Xcompression-level": "level",
    "-Xwindow-size": "window",
    "-Xdict-size": "dictsize",
    "-Xalgorithm": "algorithm",
    "-Xhc": None,
}
_DEFAULT_COMP = "gzip"  # mksquashfs's default: the same image whichever path built it
# Codecs streamed. tar2sqfs 1.2's xz and lz4 (without -Xhc) images mount, but
# unsquashfs 4.5 calls them corrupt ("failed to read id table block"): admins inspect
# images with it, so those codecs take the on-disk path (mksquashfs).
STREAM_CODECS = frozenset(("gzip", "zstd"))


class UnsupportedOption(ValueError):
    pass


def _jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _block_size(text: str) -> str:
    scale = {"K": 1 << 10, "k": 1 << 10, "M": 1 << 20, "m": 1 << 20}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise UnsupportedOption(f"-b {text}")
    return str(int(digits) * scale)


def tar2sqfs_args(options: Sequence[str] | None) -> list[str]:
    """tar2sqfs options for the site's mksquashfs ``options``; raises UnsupportedOption
    for one it cannot translate."""
    opts = with_default_compression(options)
    comp = _DEFAULT_COMP
    extra: list[str] = []
    args: list[str] = []
    jobs = str(_jobs())
    i = 0

    def value() -> str:
        if i + 1 >= len(opts):
            raise UnsupportedOption(f"{opts[i]} without a value")
        return opts[i + 1]

    while i < len(opts):
        opt = opts[i]
        if opt in _NO_OPS:
            i += 1
            continue
        if opt == "-comp":
            comp = value()
            i += 2
        elif opt in _COMP_KEYS:
            key = _COMP_KEYS[opt]
            if key is None:
                extra.append(opt[2:])
                i += 1
            else:
                extra.append(f"{key}={value()}")
                i += 2
        elif opt == "-b":
            args += ["-b", _block_size(value())]
            i += 2
        elif opt == "-processors":
            jobs = value()
            i += 2
        elif opt == "-exports":
            args.append("-e")
            i += 1
        else:
            raise UnsupportedOption(opt)
    if comp not in STREAM_CODECS:
        raise UnsupportedOption(f"-comp {comp}")
    args = ["-c", comp, *(["-X", ",".join(extra)] if extra else []), "-j", jobs, *args]
    # --no-skip: a record it cannot read fails the conversion instead of vanishing
    return args + ["--no-xattr", "--no-skip", "--quiet", "--force"]


def stream_unavailable(options: Sequence[str] | None) -> str | None:
    """Why the streaming path cannot build this site's images (None: it can)."""
    if shutil.which(TAR2SQFS) is None:
        return f"{TAR2SQFS} is not installed (Debian package squashfs-tools-ng)"
    try:
        tar2sqfs_args(options)
    except UnsupportedOption as exc:
        return f"ConverterOptions.squashfs has '{exc}', which only the on-disk path takes"
    return None


# -- GNU tar headers -------------------------------------------------------------------------

_REG, _LNK, _SYM, _DIR = b"0", b"1", b"2", b"5"
_MAX_OCTAL = 8**11  # 11 octal digits + NUL in a 12-byte field
_MAX_MTIME = 2**32 - 1  # squashfs keeps 32-bit unsigned seconds
_MAGIC = b"ustar  \0"  # GNU
_ZEROS = bytes(1 << 20)


def _number12(n: int) -> bytes:
    if 0 <= n < _MAX_OCTAL:
        return b"%011o\0" % n
    return b"\x80" + n.to_bytes(11, "big")  # GNU base-256, positive


def _raw_header(name: bytes, flag: bytes, mode: int, mtime: int, size: int, link: bytes) -> bytes:
    hdr = bytearray(512)
    hdr[0 : len(name)] = name
    hdr[100:108] = b"%07o\0" % (mode & 0o7777)
    hdr[108:116] = b"0000000\0"  # uid 0
    hdr[116:124] = b"0000000\0"  # gid 0
    hdr[124:136] = _number12(size)
    hdr[136:148] = _number12(mtime)
    hdr[148:156] = b"        "
    hdr[156:157] = flag
    hdr[157 : 157 + len(link)] = link
    hdr[257:265] = _MAGIC
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _long(flag: bytes, value: bytes) -> bytes:
    data = value + b"\0"
    return (
        _raw_header(b"././@LongLink", flag, 0, 0, len(data), b"") + data + bytes(-len(data) % 512)
    )


def tar_header(
    name: bytes, flag: bytes, mode: int, mtime_ns: int, size: int = 0, link: bytes = b""
) -> bytes:
    """One member's header(s); names and link targets of any length, byte for byte."""
    out = b""
    if len(name) > 100:
        out += _long(b"L", name)
        name = name[:100]
    if len(link) > 100:
        out += _long(b"K", link)
        link = link[:100]
    mtime = min(max(mtime_ns // 1_000_000_000, 0), _MAX_MTIME)
    return out + _raw_header(name, flag, mode, mtime, size, link)


# -- the stream ---------------------------------------------------------------------------------

_SMALL = 64 << 10  # member data up to this size is buffered with the headers
_FLUSH = 1 << 20


class _TarOut:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()

    def add(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            _write_all(self._fd, memoryview(self._buf))
            self._buf = bytearray()

    def data(self, reader: TarReader, n: int) -> None:
        if n <= _SMALL:
            self.add(reader.read_data(n))
        else:
            self.flush()
            reader.copy_to(self._fd, n)

    def zeros(self, n: int) -> None:
        while n:
            k = min(n, len(_ZEROS))
            self.add(_ZEROS[:k])
            n -= k

    def file(self, inode: Inode, reader: TarReader) -> None:
        self.add(tar_header(inode.paths[0], _REG, inode.mode, inode.mtime, inode.realsize))
        if inode.sparse is None:
            self.data(reader, inode.size)
        else:
            pos = 0
            for offset, length in inode.sparse:
                if offset < pos:
                    raise TarError("sparse map out of order")
                self.zeros(offset - pos)
                self.data(reader, length)
                pos = offset + length
            self.zeros(inode.realsize - pos)
        self.add(bytes(-inode.realsize % 512))


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def write_stream(out: _TarOut, plan: TreePlan, layers: Sequence[LayerFile], now: int) -> None:
    """Everything the writer needs, as one tar stream (see the module text for the order)."""
    out.add(tar_header(b"./", _DIR, plan.root_mode, _mtime(plan.root_mtime, now)))
    for path, mode, mtime in plan.dirs:
        out.add(tar_header(path + b"/", _DIR, mode, _mtime(mtime, now)))
    later = []
    for path, target, mtime, first in plan.symlinks:
        if first:
            later.append(tar_header(path, _LNK, 0o777, mtime, 0, first))
        else:
            out.add(tar_header(path, _SYM, 0o777, mtime, 0, target))
    for header in later:  # hard links to symlinks, once every symlink is there
        out.add(header)
    by_layer: dict[int, list[Inode]] = {}
    for inode in plan.inodes:
        by_layer.setdefault(inode.layer, []).append(inode)
    for index, layer in enumerate(layers, 1):
        wanted = by_layer.get(index)
        if wanted:
            _copy_layer(out, layer, wanted)
    for inode in plan.inodes:
        for path in inode.paths[1:]:
            out.add(tar_header(path, _LNK, inode.mode, inode.mtime, 0, inode.paths[0]))
    out.add(bytes(1024))
    out.flush()


def _mtime(mtime: int | None, now: int) -> int:
    return now if mtime is None else mtime  # implicit directories: made now, as on disk


def _copy_layer(out: _TarOut, layer: LayerFile, wanted: list[Inode]) -> None:
    """Copy the data of ``wanted`` (in member order) from the layer; stop after the last."""
    try:
        with layerio.open_layer(Path(layer.path)) as stream:
            reader = TarReader(stream, None)
            pax_global: dict[bytes, bytes] = {}
            ordinal = 0
            for inode in wanted:
                while True:
                    member = reader.next_member(pax_global)
                    if member is None:
                        raise TarError("the layer ended early")
                    ordinal += 1
                    if ordinal == inode.ordinal:
                        break
                    reader.skip_data()
                    reader.skip_padding(member)
                if member.name != inode.name or member.size != inode.size:
                    raise TarError(f"member {ordinal} is not '{os.fsdecode(inode.name)}'")
                out.file(inode, reader)
                reader.skip_data()
                reader.skip_padding(member)
    except (TarError, layerio.CorruptLayerError) as exc:
        # The blob was read whole and checked moments ago: it changed under us.
        raise MalformedLayerError(
            layer.digest, None, f"changed while it was being converted: {exc}"
        ) from None


def stream_squashfs(
    plan: TreePlan,
    layers: Sequence[LayerFile],
    out: Path,
    options: Sequence[str] | None = None,
) -> None:
    """Build ``out`` from the plan with tar2sqfs. Raises SquashfsError when the writer
    fails (``no_space`` set for a full filesystem); the caller removes ``out``."""
    cmd = [TAR2SQFS, *tar2sqfs_args(options), str(out)]
    now = int(time.time()) * 1_000_000_000
    # tar2sqfs deletes its output when it fails; held open, the file keeps its blocks, so
    # a full filesystem can still be recognised afterwards.
    with tempfile.TemporaryFile() as errors, open(out, "ab") as held:
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors
            )
        except FileNotFoundError as exc:
            raise SquashfsError(f"{TAR2SQFS} is not installed (squashfs-tools-ng)") from exc
        assert proc.stdin is not None
        broken = False
        try:
            write_stream(_TarOut(proc.stdin.fileno()), plan, layers, now)
        except BrokenPipeError:
            broken = True  # the writer died: its own message says why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                broken = True
        code = proc.wait()
        errors.seek(0)
        text = errors.read().decode("utf-8", "replace")
        full = (code != 0 or broken) and _nearly_full(held.fileno())
    if code != 0 or broken:
        lines = text.strip().splitlines()
        tail = " | ".join(lines[-3:]) or f"exit status {code}"
        raise SquashfsError(f"{TAR2SQFS} failed: {tail}", no_space="No space left" in text or full)


def _nearly_full(fd: int) -> bool:
    """tar2sqfs reports a failed write as a bare "I/O error": look at the filesystem."""
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def build(
    layers: Sequence[LayerFile],
    out: Path,
    options: Sequence[str] | None = None,
    *,
    warn: Callable[[str], None],
    scans: Sequence[ScannedLayer] | None = None,
) -> FlattenResult:
    """The whole streaming conversion: scan (unless ``scans`` are given), plan, stream.
    Layer problems raise UnsafeLayerError / MalformedLayerError before the writer starts."""
    if scans is None:
        scans = scan_layers(layers)
    plan = plan_tree(layers, scans, warn=warn)
    stream_squashfs(plan, layers, out, options)
    return plan.result
