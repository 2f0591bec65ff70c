"""Layer flattening: apply an image's layers, oldest first, onto an empty private directory.

What a container user sees is decided here, so the rules are those of an overlay stack
(OCI image spec, "Applying Changesets"):

- ``.wh.<name>`` removes ``<name>`` (and its subtree) that LOWER layers put there;
  ``.wh..wh..opq`` hides everything lower layers put in its directory. What the same
  layer adds survives either, wherever the marker sits in the tar.
- A non-directory replaces whatever is at its path; a directory over a directory merges
  (the mode is updated); a directory over a non-directory replaces it.
- Paths are resolved the way the container will see them: symlinks in the middle of a
  member's path are followed with chroot semantics (absolute targets mean the image
  root). The last component of a member is never followed: it is replaced.

Safety does not depend on the caller: every operation is relative to a directory file
descriptor opened with ``O_NOFOLLOW`` from the root down, files are created with
``O_EXCL``, hard links never follow symlinks, and the only symlinks ever traversed are
those our own in-memory model of the tree resolved inside the root. The model is also
what makes this fast: existence checks, symlink resolution and whiteout handling need
no system calls, and directory descriptors are cached (and dropped when the directory
is removed).

The streaming conversion (imagegw.treeplan) subclasses ``_Flattener`` and replaces only
its disk operations: the rules above are this module's code on both paths.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagegw import layerio
from imagegw.tarstream import DIR, HARDLINK, REG, SPARSE, SYMLINK, Member, TarError, TarReader

log = logging.getLogger(__name__)

__all__ = [
    "FlattenResult",
    "LayerFile",
    "MalformedLayerError",
    "UnsafeLayerError",
    "flatten",
]


class UnsafeLayerError(Exception):
    """A layer cannot be applied safely: a member would write or link outside the root
    (absolute name, ``..``, escaping symlink) or, through the subclass
    :class:`MalformedLayerError`, the layer is not a valid tar/gzip/zstd stream.

    ``str()``: ``layer <digest>: member '<name>': <reason>``.
    """

    def __init__(self, layer: str, member: str | None, reason: str) -> None:
        super().__init__(layer, member, reason)
        self.layer = layer
        self.member = member
        self.reason = reason

    def __str__(self) -> str:
        if self.member is None:
            return f"layer {self.layer}: {self.reason}"
        return f"layer {self.layer}: member '{self.member}': {self.reason}"


class MalformedLayerError(UnsafeLayerError):
    """The layer is not a valid tar (or gzip/zstd) stream, or a member makes no sense.

    A subclass of UnsafeLayerError so that callers refusing unsafe layers refuse these too.
    """


@dataclass
class LayerFile:
    path: Path
    digest: str


@dataclass
class FlattenResult:
    """What was built. ``files`` counts non-directories (files, symlinks, hard link names),
    ``dirs`` the directories below the root, ``bytes`` regular-file data (each inode once).
    ``mode_fixes`` maps a path relative to the root ("." for the root itself) to the mode it
    must have in the image where it was left wider on disk (unprivileged runs only)."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    dropped: list[str] = field(default_factory=list)
    mode_fixes: dict[str, int] = field(default_factory=dict)


def flatten(
    layers: Sequence[LayerFile],
    root: Path,
    *,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> FlattenResult:
    """Apply ``layers`` (oldest first) onto the empty directory ``root``.

    ``progress`` is called with the cumulative number of compressed layer bytes read so
    far (compare it with the sum of the layer sizes). Layer problems raise
    :class:`UnsafeLayerError` (or its subclass
    :class:`MalformedLayerError`); disk errors (ENOSPC, EDQUOT, ...) propagate as
    ``OSError`` with their errno. On error the partial tree is left for the caller.
    """
    flattener = _Flattener(root, warn or log.warning, progress)
    try:
        for index, layer in enumerate(layers):
            with layerio.open_layer(Path(layer.path)) as stream:
                flattener.apply_layer(index + 1, layer, stream)
        return flattener.finish()
    finally:
        flattener.close()


# ---------------------------------------------------------------------------------------
# In-memory model of the tree on disk. Non-directories have no parent pointer: a hard
# linked file may sit in several directories.


class _Dir:
    __slots__ = ("parent", "name", "children", "mode", "mtime", "added", "touched", "fd")

    def __init__(self, parent: _Dir | None, name: bytes, layer: int) -> None:
        self.parent = parent
        self.name = name
        self.children: dict[bytes, _Dir | _File | _Link] = {}
        self.mode: int | None = None  # None: implicit directory, 0755 in the image
        self.mtime: int | None = None
        self.added = layer  # layer that created it or last had an entry for it
        self.touched = layer  # last layer that added something below it
        self.fd = -1


class _File:
    __slots__ = ("added", "size", "fix", "ino")

    def __init__(self, added: int, size: int, fix: int, ino: int) -> None:
        self.added = added
        self.size = size
        self.fix = fix  # mode the image needs when the disk holds a wider one, else -1
        self.ino = ino  # shared by hard links: counts their data once


class _Link:
    __slots__ = ("added", "target", "mtime", "ino")

    def __init__(self, added: int, target: bytes, mtime: int = 0, ino: int = 0) -> None:
        self.added = added
        self.target = target
        # Only the streaming path (imagegw.treeplan) uses these: the mtime in nanoseconds,
        # and an inode number shared by hard links to one symlink.
        self.mtime = mtime
        self.ino = ino


# ---------------------------------------------------------------------------------------
# Applying members.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 256  # open directory descriptors kept (the fd limit may be 1024)
_MAX_SYMLINKS = 40  # as the kernel's ELOOP limit
_NAME_MAX = 255  # bytes in one name: what Linux and squashfs directories hold
_SYMLINK_MAX = 4095  # bytes in a symlink target (PATH_MAX less the NUL)
_DEFAULT_DIR_MODE = 0o755


def _read_umask() -> int | None:
    """The process umask without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _has_default_acl(fd: int) -> bool:
    try:
        os.getxattr(fd, "system.posix_acl_default")
    except OSError:
        return False  # ENODATA: none; ENOTSUP: no ACLs on this filesystem
    return True


class _Flattener:
    """Applies members to the in-memory model and, through the methods that touch the
    disk (``_mkdir``, ``_remove``, ``_write_file``, ``_symlink``, ``_link``, ``finish``),
    to the tree under ``root``. With ``root=None`` nothing is opened: a subclass
    (imagegw.treeplan) overrides those methods to build the model alone."""

    def __init__(
        self,
        root: Path | None,
        warn: Callable[[str], None],
        progress: Callable[[int], None] | None,
    ) -> None:
        self._warn = warn
        self._progress = progress
        self._privileged = os.geteuid() == 0
        self._umask: int | None = None  # known only once the root is open, below
        self._done = 0  # compressed bytes of the layers already applied
        self._stream: layerio.LayerStream | None = None
        self._lru: OrderedDict[_Dir, None] = OrderedDict()
        self._resolved: dict[bytes, _Dir] = {}  # parent path -> directory, see _forget
        self._ino = 0
        self._hops = 0  # symlinks followed by the current lookup
        self._layer = 0
        self._digest = ""
        self._member_name: bytes | None = None
        self._ordinal = 0  # members of the current layer handed to _apply so far
        self.dropped: list[str] = []
        self._dropped_paths: set[bytes] = set()  # archive paths of dropped members
        self.root = _Dir(None, b"", 0)
        if root is None:
            return
        self.root.fd = os.open(root, _DIR_FLAGS)
        try:
            if os.listdir(self.root.fd):
                raise ValueError(f"flatten: {root} is not empty")
        except BaseException:
            os.close(self.root.fd)
            raise
        # Files are created with their final mode when the umask cannot alter it. A
        # default ACL on the root would (it replaces the umask): then always chmod.
        if not _has_default_acl(self.root.fd):
            self._umask = _read_umask()

    # -- errors ---------------------------------------------------------------------------

    def _unsafe(self, reason: str) -> UnsafeLayerError:
        return UnsafeLayerError(self._digest, self._shown(self._member_name), reason)

    def _malformed(self, reason: str) -> MalformedLayerError:
        return MalformedLayerError(self._digest, self._shown(self._member_name), reason)

    @staticmethod
    def _shown(name: bytes | None) -> str | None:
        return None if name is None else name.decode("utf-8", "backslashreplace")

    # -- directory descriptors ------------------------------------------------------------

    def _dirfd(self, d: _Dir) -> int:
        """An open descriptor of ``d``, valid until the next call that opens directories."""
        if d.fd >= 0:
            if d.parent is not None:
                self._lru.move_to_end(d)
            return d.fd
        chain = [d]
        while chain[-1].parent is not None and chain[-1].parent.fd < 0:
            chain.append(chain[-1].parent)  # type: ignore[arg-type]
        for node in reversed(chain):
            assert node.parent is not None
            pfd = self._dirfd(node.parent)
            node.fd = os.open(node.name, _DIR_FLAGS, dir_fd=pfd)
            self._lru[node] = None
            if len(self._lru) > _FD_CACHE:
                old, _ = self._lru.popitem(last=False)
                os.close(old.fd)
                old.fd = -1
        return d.fd

    def _drop_fd(self, d: _Dir) -> None:
        if d.fd >= 0 and d.parent is not None:
            del self._lru[d]
            os.close(d.fd)
            d.fd = -1

    def close(self) -> None:
        for d in self._lru:
            os.close(d.fd)
            d.fd = -1
        self._lru.clear()
        if self.root.fd >= 0:
            os.close(self.root.fd)
            self.root.fd = -1

    # -- layers ---------------------------------------------------------------------------

    def apply_layer(self, index: int, layer: LayerFile, stream: layerio.LayerStream) -> None:
        self._layer = index
        self._digest = layer.digest
        self._member_name = None
        self._ordinal = 0
        self._stream = stream
        reader = TarReader(stream, self._report if self._progress else None)
        try:
            for member in reader.members():
                self._member_name = member.name
                self._ordinal += 1
                self._apply(member, reader)
                self._member_name = None
            # Read past the end-of-archive marker to the end of the blob, so that the
            # decompressor checks the gzip CRC / zstd checksum that follow the data.
            while stream.read1():
                pass
        except TarError as exc:
            raise self._malformed(str(exc)) from None
        except layerio.CorruptLayerError as exc:
            raise self._malformed(str(exc)) from exc
        finally:
            self._stream = None
        self._done += os.stat(layer.path).st_size
        if self._progress is not None:
            self._progress(self._done)

    def _report(self) -> None:
        assert self._progress is not None and self._stream is not None
        self._progress(self._done + self._stream.compressed_read)

    def _apply(self, m: Member, reader: TarReader) -> None:
        parts = self._split(m.name)
        if not parts:
            if m.kind is not DIR:
                raise self._unsafe("a non-directory cannot replace the image root")
            self._set_dir(self.root, m)
            return
        base = parts[-1]
        if base.startswith(b".wh."):
            self._whiteout(parts)
            return
        if parts[0].startswith(b".wh..wh."):
            return  # AUFS metadata directories (.wh..wh.plnk/...) are not content
        parent = self._parent(parts)
        existing = parent.children.get(base)
        kind = m.kind
        if kind is DIR:
            if type(existing) is not _Dir:
                if existing is not None:
                    self._remove(parent, base, existing)
                existing = self._mkdir(parent, base)
            self._set_dir(existing, m)
        elif kind is REG or kind is SPARSE:
            if existing is not None:
                self._remove(parent, base, existing)
            self._write_file(parent, base, m, reader)
        elif kind is SYMLINK:
            if len(m.linkname) > _SYMLINK_MAX:
                raise self._malformed(f"symlink target longer than {_SYMLINK_MAX} bytes")
            if existing is not None:
                self._remove(parent, base, existing)
            self._symlink(parent, base, m)
        elif kind is HARDLINK:
            self._hardlink(parent, base, existing, m)
        else:
            self._drop(parent, base, existing, m, parts)
        self._touch(parent)

    def _split(self, name: bytes) -> list[bytes]:
        """Archive name to path components; rejects absolute names and ``..``."""
        if name.startswith(b"/"):
            raise self._unsafe("absolute member name")
        if b"\0" in name:
            raise self._unsafe("NUL byte in member name")
        parts = [p for p in name.split(b"/") if p and p != b"."]
        if b".." in parts:
            raise self._unsafe("'..' in member name")
        self._check_names(parts)
        return parts

    def _check_names(self, parts: Sequence[bytes]) -> None:
        # On disk such a name fails with ENAMETOOLONG; a squashfs writer reading a tar
        # would store it and make a filesystem the kernel calls corrupt. Refused on both.
        for part in parts:
            if len(part) > _NAME_MAX:
                raise self._malformed(f"a name in the path is longer than {_NAME_MAX} bytes")

    def _parent(self, parts: list[bytes]) -> _Dir:
        """The directory that will hold the member (created as needed, symlinks resolved)."""
        if len(parts) == 1:
            return self.root
        key = b"/".join(parts[:-1])
        d = self._resolved.get(key)
        if d is None:
            d = self._resolve(parts[:-1], create=True)
            assert d is not None
            self._resolved[key] = d
        return d

    def _touch(self, d: _Dir | None) -> None:
        """Record that this layer added something below ``d`` (for opaque directories)."""
        layer = self._layer
        while d is not None and d.touched != layer:
            d.touched = layer
            d = d.parent

    # -- path resolution ------------------------------------------------------------------

    def _resolve(self, parts: Sequence[bytes], *, create: bool) -> _Dir | None:
        """The directory at ``parts`` from the root, followed as the container would; None
        if missing and not ``create``. Missing directories are created, also at a
        symlink's target."""
        self._hops = 0
        return self._walk(self.root, parts, create)

    def _walk(self, d: _Dir, parts: Sequence[bytes], create: bool) -> _Dir | None:
        for name in parts:
            child = d.children.get(name)
            if type(child) is _Dir:
                d = child
            elif child is None:
                if not create:
                    return None
                self._check_names((name,))  # a directory made where a symlink points
                d = self._mkdir(d, name)
            elif type(child) is _Link:
                nxt = self._follow(d, child, create)
                if nxt is None:
                    return None
                d = nxt
            else:
                raise self._malformed(f"'{self._shown(name)}' in its path is not a directory")
        return d

    def _follow(self, d: _Dir, link: _Link, create: bool) -> _Dir | None:
        # Like the kernel, count every symlink of one lookup: a nesting limit alone would
        # let links that each go through two others cost 2**depth steps.
        self._hops += 1
        if self._hops > _MAX_SYMLINKS:
            raise self._malformed("too many levels of symbolic links")
        target = link.target
        absolute = target.startswith(b"/")
        if absolute:
            d = self.root  # chroot semantics: the image root, never the host's
        for name in target.split(b"/"):
            if name == b"" or name == b".":
                continue
            if name == b"..":
                if d.parent is not None:
                    d = d.parent
                elif not absolute:
                    raise self._unsafe(
                        f"path goes through symlink -> '{self._shown(target)}', "
                        "which climbs above the image root"
                    )
                continue  # '/..' is '/', as in the container
            nxt = self._walk(d, (name,), create)
            if nxt is None:
                return None
            d = nxt
        return d

    # -- tree changes ---------------------------------------------------------------------

    def _mkdir(self, parent: _Dir, name: bytes) -> _Dir:
        # Owner rwx while extracting, whatever the image says: later members must be able
        # to write here even unprivileged. Real modes are applied in finish().
        pfd = self._dirfd(parent)
        os.mkdir(name, 0o700, dir_fd=pfd)
        if self._umask is None or self._umask & 0o700:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        d = _Dir(parent, name, self._layer)
        parent.children[name] = d
        return d

    def _set_dir(self, d: _Dir, m: Member) -> None:
        d.mode = m.mode
        d.mtime = m.mtime
        d.added = self._layer

    def _remove(self, parent: _Dir, name: bytes, node: _Dir | _File | _Link) -> None:
        if type(node) is _Dir:
            self._rmtree(node)
            os.rmdir(name, dir_fd=self._dirfd(parent))
            self._forget()
        else:
            os.unlink(name, dir_fd=self._dirfd(parent))
            if type(node) is _Link:
                self._forget()
        del parent.children[name]

    def _forget(self) -> None:
        """A directory or symlink went away: cached path resolutions may now be wrong."""
        self._resolved.clear()

    def _rmtree(self, top: _Dir) -> None:
        """Empty ``top`` on disk (iteratively: image trees can be deep)."""
        stack = [(top, iter(list(top.children.items())))]
        while stack:
            d, entries = stack[-1]
            for name, child in entries:
                if type(child) is _Dir:
                    stack.append((child, iter(list(child.children.items()))))
                    break
                os.unlink(name, dir_fd=self._dirfd(d))
            else:
                stack.pop()
                self._drop_fd(d)
                if stack:
                    os.rmdir(d.name, dir_fd=self._dirfd(stack[-1][0]))
        top.children.clear()

    def _disk_mode(self, mode: int) -> tuple[int, int]:
        """(mode to put on disk, mode to record in mode_fixes or -1) for a file."""
        if self._privileged or mode & 0o400:
            return mode, -1
        return mode | 0o400, mode  # mksquashfs must be able to read it

    def _write_file(self, parent: _Dir, name: bytes, m: Member, reader: TarReader) -> None:
        disk, fix = self._disk_mode(m.mode)
        umask = self._umask
        # Create with the final mode when the umask cannot change it: saves an fchmod.
        # Special bits are set after writing (a write by an unprivileged process drops them).
        direct = umask is not None and not disk & 0o7000 and not disk & umask
        fd = os.open(name, _FILE_FLAGS, disk if direct else 0o600, dir_fd=self._dirfd(parent))
        try:
            if m.sparse is not None:
                self._write_sparse(fd, m, reader)
            elif m.size:
                reader.copy_to(fd, m.size)
            if not direct:
                os.fchmod(fd, disk)
                if disk & 0o7000 and not self._privileged:
                    if stat.S_IMODE(os.fstat(fd).st_mode) != disk:
                        fix = m.mode  # e.g. setgid for a group we are not in
            os.utime(fd, ns=(m.mtime, m.mtime))
        finally:
            os.close(fd)
        self._ino += 1
        size = m.realsize if m.sparse is not None else m.size
        parent.children[name] = _File(self._layer, size, fix, self._ino)

    def _write_sparse(self, fd: int, m: Member, reader: TarReader) -> None:
        assert m.sparse is not None
        for offset, length in m.sparse:
            if offset < 0 or length < 0 or length > reader.left or offset + length > m.realsize:
                raise self._malformed("sparse map does not match the data")
            os.lseek(fd, offset, os.SEEK_SET)
            reader.copy_to(fd, length)
        os.ftruncate(fd, m.realsize)

    def _symlink(self, parent: _Dir, name: bytes, m: Member) -> None:
        if not m.linkname or b"\0" in m.linkname:
            raise self._malformed("symlink with an empty or invalid target")
        pfd = self._dirfd(parent)
        os.symlink(m.linkname, name, dir_fd=pfd)
        os.utime(name, ns=(m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
        parent.children[name] = _Link(self._layer, m.linkname)

    def _hardlink(
        self, parent: _Dir, name: bytes, existing: _Dir | _File | _Link | None, m: Member
    ) -> None:
        """Link to an archive path of this or an earlier layer. A symlink target is linked
        itself (never followed), as GNU tar does."""
        if m.linkname.startswith(b"/"):
            raise self._unsafe(f"hard link to absolute path '{self._shown(m.linkname)}'")
        tparts = self._split_link(m.linkname)
        tdir = self._resolve(tparts[:-1], create=False)
        target = None if tdir is None else tdir.children.get(tparts[-1])
        if target is None:
            if b"/".join(tparts) in self._dropped_paths:  # e.g. hard linked device nodes
                self._drop(parent, name, existing, m, self._split(m.name))
                return
            raise self._unsafe(f"hard link target '{self._shown(m.linkname)}' does not exist")
        if type(target) is _Dir:
            raise self._unsafe(f"hard link target '{self._shown(m.linkname)}' is a directory")
        assert tdir is not None
        if existing is target:
            target.added = self._layer  # a link to itself
            return
        if existing is not None:
            if type(existing) is _Dir and _is_below(tdir, existing):
                raise self._malformed("hard link target is inside the directory it replaces")
            self._remove(parent, name, existing)
        self._link(tdir, tparts[-1], parent, name)
        if type(target) is _File:
            node: _File | _Link = _File(self._layer, target.size, target.fix, target.ino)
        else:
            node = _Link(self._layer, target.target, target.mtime, target.ino)
        parent.children[name] = node

    def _link(self, tdir: _Dir, tname: bytes, parent: _Dir, name: bytes) -> None:
        src_fd = os.dup(self._dirfd(tdir))  # the next _dirfd may evict tdir's descriptor
        try:
            os.link(
                tname,
                name,
                src_dir_fd=src_fd,
                dst_dir_fd=self._dirfd(parent),
                follow_symlinks=False,
            )
        finally:
            os.close(src_fd)

    def _split_link(self, linkname: bytes) -> list[bytes]:
        if b"\0" in linkname:
            raise self._unsafe("NUL byte in hard link target")
        parts = [p for p in linkname.split(b"/") if p and p != b"."]
        if b".." in parts:
            raise self._unsafe(f"hard link target '{self._shown(linkname)}' has '..'")
        if not parts:
            raise self._unsafe("hard link to the image root")
        return parts

    def _drop(
        self,
        parent: _Dir,
        name: bytes,
        existing: _Dir | _File | _Link | None,
        m: Member,
        parts: list[bytes],
    ) -> None:
        """Device nodes and FIFOs never reach an image. Like any non-directory they still
        replace what lower layers had at their path."""
        if existing is not None:
            self._remove(parent, name, existing)
        path = b"/".join(parts)
        self._dropped_paths.add(path)
        self.dropped.append(os.fsdecode(path))
        self._warn(f"layer {self._digest}: dropped {m.kind} '{self._shown(m.name)}'")

    def _whiteout(self, parts: list[bytes]) -> None:
        target = parts[-1][4:]
        if target == b".wh..opq":
            d = self._resolve(parts[:-2], create=False)
            if d is not None and len(parts) > 1:
                child = d.children.get(parts[-2])
                d = child if type(child) is _Dir else None  # a non-dir will be replaced
            if d is not None:
                for cname, child in list(d.children.items()):
                    self._prune(d, cname, child)  # the directory itself stays
            return
        if target.startswith(b".wh."):
            return  # other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not content
        if target in (b"", b".", b".."):
            raise self._unsafe("whiteout of an invalid name")
        d = self._resolve(parts[:-1], create=False)
        node = None if d is None else d.children.get(target)
        if node is not None:
            assert d is not None
            self._prune(d, target, node)

    def _prune(self, parent: _Dir, name: bytes, node: _Dir | _File | _Link) -> None:
        """Remove what lower layers put at parent/name, keeping what this layer added."""
        layer = self._layer
        stack = [(parent, name, node)]
        while stack:
            parent, name, node = stack.pop()
            if type(node) is _Dir and (node.added == layer or node.touched == layer):
                stack.extend((node, cname, child) for cname, child in node.children.items())
            elif node.added != layer:
                self._remove(parent, name, node)

    # -- the end --------------------------------------------------------------------------

    def finish(self) -> FlattenResult:
        """Apply directory modes and mtimes (deepest first) and describe the tree."""
        result = FlattenResult(dropped=self.dropped)
        seen_inodes: set[int] = set()
        stack: list[tuple[_Dir, bytes, bool]] = [(self.root, b"", False)]
        while stack:
            d, path, expanded = stack.pop()
            if expanded:
                self._finish_dir(d, path, result)
                continue
            stack.append((d, path, True))
            prefix = path + b"/" if path else b""
            for name, child in d.children.items():
                if type(child) is _Dir:
                    stack.append((child, prefix + name, False))
                    result.dirs += 1
                    continue
                result.files += 1
                if type(child) is _File:
                    if child.ino not in seen_inodes:
                        seen_inodes.add(child.ino)
                        result.bytes += child.size
                    if child.fix >= 0:
                        result.mode_fixes[os.fsdecode(prefix + name)] = child.fix
        return result

    def _finish_dir(self, d: _Dir, path: bytes, result: FlattenResult) -> None:
        mode = _DEFAULT_DIR_MODE if d.mode is None else d.mode
        disk = mode
        if not self._privileged and mode & 0o700 != 0o700:
            # Unprivileged, a directory without owner rwx could not be read by mksquashfs
            # nor removed afterwards: keep it open on disk, give the real mode to mksquashfs.
            disk = mode | 0o700
        fd = self._dirfd(d)
        os.fchmod(fd, disk)
        if disk & 0o7000 and not self._privileged:
            disk = stat.S_IMODE(os.fstat(fd).st_mode)  # setgid may be refused silently
        if disk != mode:
            result.mode_fixes[os.fsdecode(path) if path else "."] = mode
        if d.mtime is not None:
            os.utime(fd, ns=(d.mtime, d.mtime))


def _is_below(d: _Dir | None, top: _Dir) -> bool:
    while d is not None:
        if d is top:
            return True
        d = d.parent
    return False
