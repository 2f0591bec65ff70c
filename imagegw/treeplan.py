"""An image's final tree, worked out from its layers' tar headers alone.

The streaming conversion (imagegw.sqfstream) never writes the flattened tree to disk: it
first reads every layer once for its headers (``scan_layer``, one thread per layer,
overlapping the downloads), applies them here to the in-memory model of
imagegw.flatten, then reads the layers a second time and streams only the data that
survives into the squashfs writer.

The rules are flatten.py's own code: :class:`_Planner` subclasses its ``_Flattener`` and
replaces only the methods that touch the disk. Path resolution through symlinks (chroot
semantics), whiteouts, opaque directories, replacement, hard link checks, dropped device
nodes and every refusal and its message are shared, so both paths refuse the same layers
with the same words. What comes out is a :class:`TreePlan`: directories with their final
modes, symlinks, and per regular-file inode the layer member that holds its data and the
names that survive for it. Every path in the plan is a real directory chain in the
model: the writer never goes through a symlink.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imagegw import layerio
from imagegw.flatten import (
    _DEFAULT_DIR_MODE,
    FlattenResult,
    LayerFile,
    _Dir,
    _File,
    _Flattener,
    _Link,
)
from imagegw.tarstream import Member, TarError, TarReader

__all__ = ["Inode", "ScannedLayer", "TreePlan", "plan_tree", "scan_layer", "scan_layers"]


@dataclass(slots=True)
class Inode:
    """A regular file of the final tree: where its data is and which names it has."""

    layer: int  # 1-based index of the layer holding the data
    ordinal: int  # 1-based number of the member in that layer
    name: bytes  # the member's archive name (checked again when the data is read)
    size: int  # data bytes in the archive
    realsize: int  # file size (larger than size for sparse members)
    sparse: list[tuple[int, int]] | None
    mode: int
    mtime: int  # nanoseconds
    paths: list[bytes] = field(default_factory=list)  # the first one carries the data


@dataclass
class TreePlan:
    """What the squashfs writer must receive. ``mtime`` None: an implicit directory."""

    root_mode: int
    root_mtime: int | None
    dirs: list[tuple[bytes, int, int | None]]  # parents before children
    symlinks: list[tuple[bytes, bytes, int, bytes]]  # path, target, mtime, hard link to
    inodes: list[Inode]  # in (layer, ordinal) order
    result: FlattenResult


@dataclass
class ScannedLayer:
    """The members of one layer, read without their data. ``error`` (with the member it
    concerns, if any) is a tar or decompression failure found after the last member."""

    members: list[tuple[Member, int]]  # member, its data bytes still unread (sparse maps)
    error: str | None = None
    error_member: bytes | None = None


def scan_layer(path: Path) -> ScannedLayer:
    """Read a layer blob to its end (so gzip CRCs and zstd checksums are checked) and keep
    its members' headers. Layer problems are returned, not raised: they are reported in
    layer order by :func:`plan_tree`, after the members before them were applied."""
    scanned = ScannedLayer([])
    current: bytes | None = None
    try:
        with layerio.open_layer(path) as stream:
            reader = TarReader(stream, None)
            pax_global: dict[bytes, bytes] = {}
            while True:
                current = None
                member = reader.next_member(pax_global)
                if member is None:
                    break
                scanned.members.append((member, reader.left))
                current = member.name  # a failure in its data names it, as flatten does
                reader.skip_data()
                current = None
                reader.skip_padding(member)
            while stream.read1():
                pass
    except (TarError, layerio.CorruptLayerError) as exc:
        scanned.error = str(exc)
        scanned.error_member = current
    return scanned


def scan_layers(layers: Sequence[LayerFile], threads: int = 4) -> list[ScannedLayer]:
    """:func:`scan_layer` of every layer, ``threads`` at a time (decompression releases
    the GIL, so layers are read side by side on several cores)."""
    if len(layers) <= 1:
        return [scan_layer(Path(lf.path)) for lf in layers]
    with ThreadPoolExecutor(max_workers=min(threads, len(layers))) as pool:
        return list(pool.map(lambda lf: scan_layer(Path(lf.path)), layers))


def plan_tree(
    layers: Sequence[LayerFile],
    scans: Sequence[ScannedLayer],
    *,
    warn: Callable[[str], None],
) -> TreePlan:
    """Apply the scanned layers (oldest first) to an empty model. Raises
    UnsafeLayerError / MalformedLayerError exactly where imagegw.flatten would."""
    planner = _Planner(warn)
    for index, (layer, scanned) in enumerate(zip(layers, scans, strict=True)):
        planner.apply_scanned(index + 1, layer, scanned)
    return planner.plan()


class _Left:
    """Stands in for the TarReader: the model only needs the unread data count."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = 0


class _Planner(_Flattener):
    def __init__(self, warn: Callable[[str], None]) -> None:
        super().__init__(None, warn, None)
        self._inodes: dict[int, Inode] = {}

    def apply_scanned(self, index: int, layer: LayerFile, scanned: ScannedLayer) -> None:
        self._layer = index
        self._digest = layer.digest
        self._ordinal = 0
        holder = _Left()
        for member, left in scanned.members:
            self._member_name = member.name
            self._ordinal += 1
            holder.left = left
            self._apply(member, holder)  # type: ignore[arg-type]
        self._member_name = None
        if scanned.error is not None:
            self._member_name = scanned.error_member
            raise self._malformed(scanned.error)

    # -- the model alone: the disk is never touched ----------------------------------------

    def _mkdir(self, parent: _Dir, name: bytes) -> _Dir:
        d = _Dir(parent, name, self._layer)
        parent.children[name] = d
        return d

    def _remove(self, parent: _Dir, name: bytes, node: _Dir | _File | _Link) -> None:
        if type(node) is not _File:
            self._forget()
        del parent.children[name]

    def _write_file(self, parent: _Dir, name: bytes, m: Member, reader: TarReader) -> None:
        if m.sparse is not None:
            left = reader.left
            for offset, length in m.sparse:
                if offset < 0 or length < 0 or length > left or offset + length > m.realsize:
                    raise self._malformed("sparse map does not match the data")
                left -= length
        self._ino += 1
        size = m.realsize if m.sparse is not None else m.size
        self._inodes[self._ino] = Inode(
            self._layer, self._ordinal, m.name, m.size, size, m.sparse, m.mode, m.mtime
        )
        parent.children[name] = _File(self._layer, size, -1, self._ino)

    def _symlink(self, parent: _Dir, name: bytes, m: Member) -> None:
        if not m.linkname or b"\0" in m.linkname:
            raise self._malformed("symlink with an empty or invalid target")
        self._ino += 1
        parent.children[name] = _Link(self._layer, m.linkname, m.mtime, self._ino)

    def _link(self, tdir: _Dir, tname: bytes, parent: _Dir, name: bytes) -> None:
        pass  # the model records the new name; the writer emits it as a hard link

    # -- the result ------------------------------------------------------------------------

    def plan(self) -> TreePlan:
        result = FlattenResult(dropped=self.dropped)
        dirs: list[tuple[bytes, int, int | None]] = []
        symlinks: list[tuple[bytes, bytes, int, bytes]] = []
        first_link: dict[int, bytes] = {}  # symlink inode -> its first name
        used: dict[int, Inode] = {}
        stack: list[tuple[_Dir, bytes]] = [(self.root, b"")]
        while stack:
            d, path = stack.pop()
            prefix = path + b"/" if path else b""
            for name, child in d.children.items():
                p = prefix + name
                if type(child) is _Dir:
                    mode = _DEFAULT_DIR_MODE if child.mode is None else child.mode
                    dirs.append((p, mode, child.mtime))
                    stack.append((child, p))
                    result.dirs += 1
                    continue
                result.files += 1
                if type(child) is _File:
                    inode = self._inodes[child.ino]
                    if not inode.paths:
                        used[child.ino] = inode
                        result.bytes += child.size
                    inode.paths.append(p)
                else:
                    assert type(child) is _Link
                    first = first_link.setdefault(child.ino, p)
                    symlinks.append((p, child.target, child.mtime, b"" if first == p else first))
        root = self.root
        return TreePlan(
            _DEFAULT_DIR_MODE if root.mode is None else root.mode,
            root.mtime,
            dirs,
            symlinks,
            [used[ino] for ino in sorted(used)],
            result,
        )
