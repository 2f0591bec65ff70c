"""Layer flattening (imagegw.flatten) and layer decompression (imagegw.layerio).

Every test taking the ``world`` fixture runs twice: against the on-disk path (flatten into
a directory, as mksquashfs then reads it) and against the streaming path (imagegw.treeplan
+ imagegw.sqfstream: the tree worked out from the headers and streamed into tar2sqfs; the
squashfs is then unpacked with unsquashfs into the same root, so the same assertions read
what the image holds). Tests of the on-disk path's own mechanics take ``disk_world``.

Layers are built here with Python's tarfile. The attack tests check that nothing outside
the root is created or changed: the test's own directory is snapshotted around the call,
and host paths that an escape would hit carry a random name and must not appear.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from imagegw import flatten as flatten_mod
from imagegw import layerio, sqfstream, tarstream
from imagegw.flatten import (
    FlattenResult,
    LayerFile,
    MalformedLayerError,
    UnsafeLayerError,
    flatten,
)

MTIME = 1_600_000_000
NOBODY = 65534


# ---------------------------------------------------------------------------------------
# building layers


class Layer:
    """A tar layer described member by member, written with tarfile."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.fmt = fmt
        self.members: list[tuple[tarfile.TarInfo, bytes | None]] = []
        self.global_headers: dict[str, str] = {}

    def _add(
        self,
        name: str,
        type_: bytes,
        mode: int,
        data: bytes | None = None,
        mtime: float = MTIME,
        **attrs: Any,
    ) -> Layer:
        info = tarfile.TarInfo(name)
        info.type = type_
        info.mode = mode
        info.mtime = mtime
        for key, value in attrs.items():
            setattr(info, key, value)
        if data is not None:
            info.size = len(data)
        self.members.append((info, data))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Layer:
        return self._add(name, tarfile.REGTYPE, mode, data, **kw)

    def dir(self, name: str, mode: int = 0o755, **kw: Any) -> Layer:
        return self._add(name, tarfile.DIRTYPE, mode, **kw)

    def symlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.SYMTYPE, 0o777, linkname=target)

    def hardlink(self, name: str, target: str) -> Layer:
        return self._add(name, tarfile.LNKTYPE, 0o644, linkname=target)

    def device(self, name: str, type_: bytes = tarfile.CHRTYPE) -> Layer:
        return self._add(name, type_, 0o666, devmajor=1, devminor=3)

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(
            fileobj=buf,
            mode="w",
            format=self.fmt,
            encoding="utf-8",
            errors="surrogateescape",
            pax_headers=self.global_headers or None,
        ) as tf:
            for info, data in self.members:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, 6)
    if compression == "zstd":
        # with a checksum, as containerd and buildkit write them: flipped bits are caught
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return data


class World:
    """A test directory: layers/ holds blobs, sandbox/root is the flatten root.
    ``path`` is "disk" (imagegw.flatten) or "stream" (imagegw.sqfstream, unsquashed into
    the root afterwards; the squashfs itself is written in layers/)."""

    def __init__(self, base: Path, path: str = "disk") -> None:
        self.path = path
        self.base = base
        self.layers = base / "layers"
        self.layers.mkdir()
        self.sandbox = base / "sandbox"
        self.sandbox.mkdir()
        (self.sandbox / "victim").write_text("do not touch\n")
        self.root = self.sandbox / "root"
        self.root.mkdir()
        self.count = 0
        self.warnings: list[str] = []

    def blob(self, layer: Layer | bytes, compression: str = "gzip") -> LayerFile:
        self.count += 1
        raw = layer if isinstance(layer, bytes) else layer.tar_bytes()
        path = self.layers / f"layer{self.count}"
        path.write_bytes(compress(raw, compression))
        return LayerFile(path=path, digest=f"sha256:{self.count:064x}")

    def flatten(
        self, *layers: Layer | LayerFile, compression: str = "gzip", **kw: Any
    ) -> FlattenResult:
        files = [x if isinstance(x, LayerFile) else self.blob(x, compression) for x in layers]
        if self.path == "disk":
            return flatten(files, self.root, warn=self.warnings.append, **kw)
        self.count += 1
        image = self.layers / f"image{self.count}.squashfs"
        result = sqfstream.build(files, image, warn=self.warnings.append, **kw)
        unsquash(image, self.root)
        return result

    def snapshot(self) -> dict[str, tuple[int, int, int, int]]:
        """Everything under the test directory except the root, with inode facts."""
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.base):
            if Path(dirpath) == self.sandbox:
                dirnames.remove("root")
            if Path(dirpath) == self.base:
                dirnames.remove("layers")  # blobs are written there by the test
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (
                    st.st_ino,
                    st.st_mtime_ns,
                    st.st_size,
                    st.st_nlink,
                )
        return out


def unsquash(image: Path, root: Path) -> None:
    """Unpack a squashfs into the (empty) root, modes, times and hard links included."""
    proc = subprocess.run(
        ["unsquashfs", "-f", "-n", "-no-xattrs", "-d", str(root), str(image)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(params=["disk", "stream"])
def world(tmp_path: Path, request: pytest.FixtureRequest) -> World:
    return World(tmp_path, request.param)


@pytest.fixture
def disk_world(tmp_path: Path) -> World:
    return World(tmp_path, "disk")


@pytest.fixture
def outside() -> Iterator[str]:
    """A host path that escapes would create: must never exist."""
    path = f"/tmp/flatten-outside-{uuid.uuid4().hex}"
    yield path
    leaked = os.path.lexists(path)
    if leaked:
        shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"{path} was created outside the root"


def tree(root: Path) -> dict[str, tuple]:
    """relpath -> ('d', mode) | ('f', mode, data) | ('l', target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), Path(path).read_bytes())
    return out


COMPRESSIONS = ["gzip", "zstd", "none"]


# ---------------------------------------------------------------------------------------
# basic application


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_files_dirs_symlinks_modes_mtimes(world: World, compression: str) -> None:
    layer = (
        Layer()
        .dir("./etc", 0o755)
        .file("./etc/hostname", b"box\n", 0o644)
        .dir("usr/bin", 0o711)
        .file("usr/bin/tool", b"#!/bin/sh\n", 0o755, mtime=MTIME + 7)
        .symlink("bin", "usr/bin")
        .symlink("etc/abs", "/usr/bin/tool")
        .file("deep/implicit/parents/f", b"x")
    )
    result = world.flatten(layer, compression=compression)
    t = tree(world.root)
    assert t["etc"] == ("d", 0o755)
    assert t["etc/hostname"] == ("f", 0o644, b"box\n")
    assert t["usr/bin"] == ("d", 0o711)
    assert t["usr/bin/tool"] == ("f", 0o755, b"#!/bin/sh\n")
    assert t["bin"] == ("l", "usr/bin")
    assert t["etc/abs"] == ("l", "/usr/bin/tool")
    assert t["deep/implicit/parents"] == ("d", 0o755)
    assert os.lstat(world.root / "usr/bin/tool").st_mtime == MTIME + 7
    assert os.lstat(world.root / "etc").st_mtime == MTIME
    assert os.lstat(world.root / "bin").st_mtime == MTIME
    assert stat.S_IMODE(os.lstat(world.root).st_mode) == 0o755
    assert result.files == 5 and result.dirs == 6
    assert result.bytes == len(b"box\n#!/bin/sh\nx")
    assert result.dropped == [] and result.mode_fixes == {}


def test_root_entry_sets_root_mode(world: World) -> None:
    world.flatten(Layer().dir("./", 0o750, mtime=MTIME + 1).file("./a", b"a"))
    st = os.lstat(world.root)
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_mtime == MTIME + 1


def test_directory_mtime_survives_later_entries(world: World) -> None:
    world.flatten(Layer().dir("d", mtime=MTIME + 5), Layer().file("d/new", b"n"))
    assert os.lstat(world.root / "d").st_mtime == MTIME + 5


def test_special_bits_kept(world: World) -> None:
    world.flatten(
        Layer()
        .file("suid", b"x", 0o4755)
        .file("sgid", b"x", 0o2711)
        .dir("tmp", 0o1777)
        .dir("shared", 0o2775)
    )
    t = tree(world.root)
    assert t["suid"][1] == 0o4755 and t["sgid"][1] == 0o2711
    assert t["tmp"] == ("d", 0o1777) and t["shared"] == ("d", 0o2775)


def test_not_empty_root_refused(disk_world: World) -> None:
    (disk_world.root / "junk").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        disk_world.flatten(Layer().file("a"))


def test_empty_layer_list_gives_empty_root(world: World) -> None:
    result = world.flatten()
    assert result.files == 0 and result.dirs == 0 and list(world.root.iterdir()) == []


def test_tar_without_end_marker_is_accepted(world: World) -> None:
    raw = Layer(tarfile.GNU_FORMAT).file("a", b"hello").tar_bytes()
    end = raw.rindex(b"hello") + 512
    world.flatten(world.blob(raw[:end], "none"))
    assert (world.root / "a").read_bytes() == b"hello"


# ---------------------------------------------------------------------------------------
# replacement rules


def test_non_directory_replaces_directory_and_subtree(world: World) -> None:
    lower = Layer().dir("a").dir("a/b").file("a/b/c", b"c").file("a/d", b"d").file("f", b"f")
    upper = Layer().file("a", b"now a file").dir("f", 0o700).file("f/inside", b"i")
    world.flatten(lower, upper)
    t = tree(world.root)
    assert t == {
        "a": ("f", 0o644, b"now a file"),
        "f": ("d", 0o700),
        "f/inside": ("f", 0o644, b"i"),
    }


def test_directory_over_directory_merges_and_updates_mode(world: World) -> None:
    world.flatten(
        Layer().dir("d", 0o755).file("d/old", b"o"), Layer().dir("d", 0o700).file("d/new", b"n")
    )
    t = tree(world.root)
    assert t["d"] == ("d", 0o700)
    assert set(t) == {"d", "d/old", "d/new"}


def test_symlink_replaces_directory_then_path_goes_through_it(world: World) -> None:
    # cached directory descriptors of the old 'lib' must not be used any more
    world.flatten(
        Layer().dir("lib").dir("lib/sub").file("lib/sub/a", b"a").dir("usr/lib"),
        Layer().symlink("lib", "usr/lib").file("lib/sub/b", b"b"),
    )
    t = tree(world.root)
    assert t["lib"] == ("l", "usr/lib")
    assert t["usr/lib/sub/b"] == ("f", 0o644, b"b")
    assert "lib/sub/a" not in t and "usr/lib/sub/a" not in t


def test_file_replaced_by_directory_replaced_by_file(world: World) -> None:
    world.flatten(
        Layer().dir("a").dir("a/b").file("a/b/c", b"1"),
        Layer().file("a", b"2"),
        Layer().dir("a").file("a/x", b"3"),
    )
    assert tree(world.root) == {"a": ("d", 0o755), "a/x": ("f", 0o644, b"3")}


def test_fd_cache_eviction(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flatten_mod, "_FD_CACHE", 3)
    lower = Layer()
    for i in range(12):
        lower.file(f"d{i}/e/f/file", str(i).encode())
    upper = Layer()
    for i in range(12):
        upper.hardlink(f"d{11 - i}/e/link", f"d{i}/e/f/file").file(f"d{i}/e/f/g", b"g")
    upper.file("d3", b"replaced").file("d4/e/f/again", b"a")
    world.flatten(lower, upper)
    t = tree(world.root)
    assert t["d3"] == ("f", 0o644, b"replaced")
    assert t["d4/e/f/again"] == ("f", 0o644, b"a")
    assert t["d0/e/link"] == ("f", 0o644, b"11")
    assert os.lstat(world.root / "d0/e/link").st_ino == os.lstat(world.root / "d11/e/f/file").st_ino


def test_deep_tree(world: World) -> None:
    deep = "/".join(["d"] * 400)
    world.flatten(Layer().file(f"{deep}/f", b"deep"), Layer().file("d", b"flat"))
    assert tree(world.root) == {"d": ("f", 0o644, b"flat")}


# ---------------------------------------------------------------------------------------
# whiteouts


def test_whiteout_removes_file_and_directory(world: World) -> None:
    lower = Layer().file("etc/a", b"a").file("etc/b", b"b").dir("opt/x").file("opt/x/y")
    upper = Layer().file("etc/.wh.a").file("opt/.wh.x").file(".wh.missing")
    world.flatten(lower, upper)
    t = tree(world.root)
    assert set(t) == {"etc", "etc/b", "opt"}


def test_opaque_directory_keeps_same_layer_entries(world: World) -> None:
    lower = (
        Layer()
        .dir("d")
        .file("d/a", b"a")
        .dir("d/sub")
        .file("d/sub/old", b"o")
        .file("d/keep-not", b"k")
        .file("other", b"o")
    )
    upper = (
        Layer()
        .file("d/before", b"1")
        .dir("d/sub")
        .file("d/.wh..wh..opq")
        .file("d/after", b"2")
        .file("d/sub/new", b"3")
    )
    world.flatten(lower, upper)
    t = tree(world.root)
    assert set(t) == {"d", "d/before", "d/after", "d/sub", "d/sub/new", "other"}


def test_opaque_nested_lower_content_gone_even_when_directory_reappears(world: World) -> None:
    lower = Layer().dir("d").dir("d/sub").file("d/sub/old").dir("d/sub/deeper").file("d/x")
    upper = Layer().file("d/sub/new", b"n").file("d/.wh..wh..opq")
    world.flatten(lower, upper)
    assert set(tree(world.root)) == {"d", "d/sub", "d/sub/new"}


def test_opaque_marker_at_root(world: World) -> None:
    world.flatten(Layer().file("a").dir("b"), Layer().file("c").file(".wh..wh..opq"))
    assert set(tree(world.root)) == {"c"}


def test_whiteout_does_not_remove_same_layer_entry(world: World) -> None:
    lower = Layer().file("x", b"lower").dir("y").file("y/lower")
    upper = Layer().file("x", b"upper").file(".wh.x").dir("y").file("y/upper").file(".wh.y")
    world.flatten(lower, upper)
    t = tree(world.root)
    assert t["x"] == ("f", 0o644, b"upper")
    assert set(t) == {"x", "y", "y/upper"}


def test_whiteout_then_readd_in_same_layer(world: World) -> None:
    world.flatten(Layer().dir("x").file("x/old"), Layer().file(".wh.x").dir("x").file("x/n"))
    assert set(tree(world.root)) == {"x", "x/n"}


def test_opaque_marker_does_not_follow_a_lower_symlink(world: World) -> None:
    lower = Layer().dir("real").file("real/keep", b"k").symlink("d", "real")
    upper = Layer().file("d/.wh..wh..opq").dir("d").file("d/new")
    world.flatten(lower, upper)
    t = tree(world.root)
    assert t["real/keep"] == ("f", 0o644, b"k")
    assert t["d"] == ("d", 0o755) and "d/new" in t


def test_whiteout_through_symlinked_parent(world: World) -> None:
    world.flatten(
        Layer().file("usr/lib/a").file("usr/lib/b").symlink("lib", "usr/lib"),
        Layer().file("lib/.wh.a"),
    )
    assert set(tree(world.root)) == {"usr", "usr/lib", "usr/lib/b", "lib"}


def test_aufs_metadata_ignored(world: World) -> None:
    world.flatten(Layer().file("a"), Layer().file(".wh..wh.plnk/1234.5").file(".wh..wh.aufs"))
    assert set(tree(world.root)) == {"a"}


# ---------------------------------------------------------------------------------------
# hard links


def test_hardlinks_share_inode_across_layers(world: World) -> None:
    result = world.flatten(
        Layer().file("bin/a", b"same", 0o755),
        Layer().hardlink("bin/b", "bin/a").hardlink("./c", "./bin/a").hardlink("bin/a", "bin/a"),
    )
    ino = {os.lstat(world.root / p).st_ino for p in ("bin/a", "bin/b", "c")}
    assert len(ino) == 1
    assert os.lstat(world.root / "c").st_nlink == 3
    assert result.bytes == 4 and result.files == 3


def test_hardlink_replacing_its_name_and_later_overwrite(world: World) -> None:
    world.flatten(
        Layer().file("a", b"A").file("b", b"B"),
        Layer().hardlink("b", "a"),
        Layer().file("a", b"new A"),
    )
    assert (world.root / "b").read_bytes() == b"A"
    assert (world.root / "a").read_bytes() == b"new A"


def test_hardlink_target_through_symlinked_directory(world: World) -> None:
    world.flatten(Layer().file("usr/lib/x", b"x").symlink("lib", "usr/lib").hardlink("y", "lib/x"))
    assert os.lstat(world.root / "y").st_ino == os.lstat(world.root / "usr/lib/x").st_ino


@pytest.mark.parametrize(
    "target, reason",
    [
        ("../../etc/passwd", "'..'"),
        ("/etc/passwd", "absolute"),
        ("missing", "does not exist"),
        ("dir", "directory"),
    ],
)
def test_bad_hardlinks(world: World, target: str, reason: str) -> None:
    before = world.snapshot()
    passwd = os.stat("/etc/passwd")
    with pytest.raises(UnsafeLayerError, match=reason) as info:
        world.flatten(Layer().dir("dir").hardlink("evil", target))
    assert "member 'evil'" in str(info.value)
    assert world.snapshot() == before
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert not os.path.lexists(world.root / "evil")


def test_hardlink_to_symlink_links_the_symlink_itself(world: World, outside: str) -> None:
    passwd = os.stat("/etc/passwd")
    before = world.snapshot()
    world.flatten(
        Layer()
        .symlink("evil", "/etc/passwd")
        .symlink("rel", "../../../victim")
        .hardlink("x", "evil")
        .hardlink("y", "rel")
        .symlink("out", outside)
        .hardlink("z", "out")
    )
    assert os.readlink(world.root / "x") == "/etc/passwd"
    assert os.readlink(world.root / "y") == "../../../victim"
    assert os.lstat(world.root / "x").st_ino == os.lstat(world.root / "evil").st_ino
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert world.snapshot() == before


def test_hardlink_through_escaping_symlink_refused(world: World) -> None:
    before = world.snapshot()
    with pytest.raises(UnsafeLayerError, match="climbs above"):
        world.flatten(Layer().symlink("up", "../..").hardlink("x", "up/victim"))
    assert world.snapshot() == before


# ---------------------------------------------------------------------------------------
# symlink resolution and attacks


def test_path_through_symlinks_chroot_semantics(world: World) -> None:
    layer = (
        Layer()
        .dir("usr/lib")
        .symlink("lib", "usr/lib")
        .symlink("lib64", "/usr/lib")
        .symlink("usr/lib/up", "../../../..//usr/./lib/..")  # '/..' stays at '/'
        .file("lib/a.so", b"a")
        .file("lib64/b.so", b"b")
    )
    world.flatten(layer, Layer().file("lib/c.so", b"c").file("lib64/sub/d.so", b"d"))
    t = tree(world.root)
    for name in ("a", "b", "c"):
        assert t[f"usr/lib/{name}.so"][2] == name.encode()
    assert t["usr/lib/sub/d.so"][2] == b"d"
    assert t["lib"] == ("l", "usr/lib") and t["lib64"] == ("l", "/usr/lib")


def test_absolute_symlink_stays_in_image_root(world: World, outside: str) -> None:
    before = world.snapshot()
    world.flatten(
        Layer().symlink("evil2", outside).file("evil2/pwned", b"gotcha"),
        Layer().symlink("etc", "/").file("etc/rooted", b"r"),
    )
    inside = world.root / outside.lstrip("/") / "pwned"
    assert inside.read_bytes() == b"gotcha"
    assert (world.root / "rooted").read_bytes() == b"r"
    assert world.snapshot() == before


def test_dangling_symlink_target_is_created_inside(world: World) -> None:
    world.flatten(Layer().symlink("lib", "usr/lib64").file("lib/x.so", b"x"))
    assert (world.root / "usr/lib64/x.so").read_bytes() == b"x"


@pytest.mark.parametrize(
    "layers",
    [
        [Layer().file("../escape", b"x")],
        [Layer().file("a/../../escape", b"x")],
        [Layer().file("/abs", b"x")],
        [Layer().symlink("evil", "../../../../tmp/OUTSIDE").file("evil/pwned", b"x")],
        [Layer().symlink("evil", "../victim-dir"), Layer().file("evil/pwned", b"x")],
        [Layer().dir("a").symlink("a/up", "../../x").file("a/up/pwned", b"x")],
        [Layer().dir("d").file("d/f"), Layer().symlink("d", "../..").file("d/pwned", b"x")],
        [Layer().symlink("evil", "..").file("evil/.wh.victim")],
        [Layer().symlink("evil", "..").dir("evil/newdir")],
    ],
)
def test_escapes_refused(world: World, layers: list[Layer], outside: str) -> None:
    for layer in layers:  # aim the relative escape at our random host name too
        for info, _ in layer.members:
            info.linkname = info.linkname.replace("/tmp/OUTSIDE", outside)
    before = world.snapshot()
    with pytest.raises(UnsafeLayerError) as info:
        world.flatten(*layers)
    assert str(info.value).startswith("layer sha256:")
    assert "member '" in str(info.value)
    assert world.snapshot() == before
    assert not (world.sandbox / "escape").exists() and not (world.base / "escape").exists()


def test_directory_replaced_by_absolute_symlink_then_written_through(
    world: World, outside: str
) -> None:
    before = world.snapshot()
    world.flatten(
        Layer().dir("d").file("d/f", b"f"), Layer().symlink("d", outside).file("d/pwned", b"p")
    )
    assert (world.root / outside.lstrip("/") / "pwned").read_bytes() == b"p"
    assert os.readlink(world.root / "d") == outside
    assert world.snapshot() == before


def test_symlink_loop_is_malformed(world: World) -> None:
    with pytest.raises(MalformedLayerError, match="too many levels"):
        world.flatten(Layer().symlink("a", "b").symlink("b", "a").file("a/x"))


def test_symlink_bomb_is_cut_short(world: World) -> None:
    # each link goes through the previous one twice: 2**30 steps without a total limit
    layer = Layer().dir("d").symlink("l0", "d")
    for i in range(1, 31):
        layer.symlink(f"l{i}", f"l{i - 1}/../l{i - 1}")
    with pytest.raises(MalformedLayerError, match="too many levels"):
        world.flatten(layer.file("l30/x"))


def test_deep_opaque_prune(world: World) -> None:
    deep = "/".join(["d"] * 1500)
    try:
        world.flatten(Layer().file(f"{deep}/old"), Layer().file(f"{deep}/new").file(".wh..wh..opq"))
        assert os.listdir(world.root / deep) == ["new"]
    finally:  # shutil.rmtree (pytest's clean-up too) recurses and fails on 1500 levels
        subprocess.run(["rm", "-rf", str(world.root / "d")], check=True)


def test_path_through_file_is_malformed(world: World) -> None:
    with pytest.raises(MalformedLayerError, match="not a directory"):
        world.flatten(Layer().file("a", b"x").file("a/b"))


def test_host_symlink_planted_in_root_is_not_followed(disk_world: World, outside: str) -> None:
    # Safety must not depend on the model matching the disk: if something swaps a
    # directory for a symlink behind our back, O_NOFOLLOW refuses to go through it.
    os.mkdir(outside)
    try:
        lf1 = disk_world.blob(Layer().dir("d").file("d/a"))
        lf2 = disk_world.blob(Layer().file("d/b", b"b"))
        orig = flatten_mod._Flattener.apply_layer

        def swap(self: Any, index: int, layer: LayerFile, stream: Any) -> None:
            if index == 2:
                for d in list(self._lru):  # drop cached descriptors, then swap on disk
                    self._drop_fd(d)
                shutil.rmtree(disk_world.root / "d")
                os.symlink(outside, disk_world.root / "d")
            orig(self, index, layer, stream)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(flatten_mod._Flattener, "apply_layer", swap)
            with pytest.raises(OSError) as info:
                flatten([lf1, lf2], disk_world.root)
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
        assert os.listdir(outside) == []
    finally:
        shutil.rmtree(outside)


# ---------------------------------------------------------------------------------------
# dropped and filtered content


def test_devices_and_fifos_dropped_with_warning(world: World) -> None:
    lower = Layer().file("dev/null", b"lower file").file("keep")
    upper = (
        Layer()
        .dir("dev")
        .device("dev/null")
        .device("dev/sda", tarfile.BLKTYPE)
        .device("run/fifo", tarfile.FIFOTYPE)
    )
    result = world.flatten(lower, upper)
    t = tree(world.root)
    assert set(t) == {"dev", "run", "keep"}
    assert result.dropped == ["dev/null", "dev/sda", "run/fifo"]
    assert len(world.warnings) == 3
    assert "dev/sda" in world.warnings[1] and "block device" in world.warnings[1]


def test_hardlink_to_dropped_device_is_dropped_too(world: World) -> None:
    result = world.flatten(Layer().device("dev/console").hardlink("dev/tty0", "dev/console"))
    assert result.dropped == ["dev/console", "dev/tty0"]
    assert os.listdir(world.root / "dev") == []


def test_modes_exact_under_a_default_acl(disk_world: World) -> None:
    # A default ACL replaces the umask: u::rwx,g::r-x,o::--- (the kernel's xattr format,
    # as setfacl -d writes it) would turn a 0604 file into 0600 if we relied on the umask.
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 7), (4, 5), (0x20, 0))
    )
    try:
        os.setxattr(disk_world.root, "system.posix_acl_default", acl)
    except OSError:
        pytest.fail("no POSIX ACLs on the test filesystem: the default-ACL case cannot be checked")
    disk_world.flatten(Layer().file("a", b"a", 0o640).file("d/b", b"b", 0o604).dir("e", 0o751))
    modes = _disk_modes(disk_world.root)
    assert (modes["a"], modes["d/b"], modes["e"]) == (0o640, 0o604, 0o751)


def test_xattrs_and_capabilities_never_written(world: World) -> None:
    layer = Layer()
    layer.file(
        "bin/ping",
        b"elf",
        0o755,
        pax_headers={
            "SCHILY.xattr.security.capability": "\x01\x00\x00\x02" + "\x00" * 16,
            "SCHILY.xattr.user.comment": "hello",
        },
    )
    world.flatten(layer)
    assert os.listxattr(world.root / "bin/ping") == []
    assert (world.root / "bin/ping").read_bytes() == b"elf"


# ---------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_unicode_and_long_names_byte_for_byte(world: World, fmt: int) -> None:
    long_dir = "/".join(["segment-" + "x" * 40] * 3)  # > 100 bytes: prefix/longname/pax
    layer = Layer(fmt).file("café/naïve.txt", b"u").file(f"{long_dir}/file", b"l")
    if fmt != tarfile.USTAR_FORMAT:
        layer.file("raw-\udcff\udcfe.bin", b"r").symlink("long-link", "t" * 300)
    world.flatten(layer)
    names = set(os.listdir(bytes(world.root)))
    assert "café".encode() in names
    assert os.listdir(world.root / "café") == ["naïve.txt"]
    assert (world.root / long_dir / "file").read_bytes() == b"l"
    if fmt != tarfile.USTAR_FORMAT:
        assert b"raw-\xff\xfe.bin" in names
        assert os.readlink(world.root / "long-link") == "t" * 300


def test_pax_global_header(world: World) -> None:
    layer = Layer().file("a", b"a")
    layer.global_headers = {"comment": "git archive style"}
    world.flatten(layer)
    assert (world.root / "a").read_bytes() == b"a"


# ---------------------------------------------------------------------------------------
# modes when unprivileged


def _mode_layers() -> list[Layer]:
    return [
        Layer()
        .dir("ro", 0o555)
        .file("ro/a", b"a")
        .dir("locked", 0o000)
        .file("locked/secret", b"s", 0o000)
        .file("zero", b"z", 0o000)
        .file("wo", b"w", 0o200)
        .file("suid", b"x", 0o4755)
        .dir("sticky", 0o1777),
        Layer().file("ro/b", b"b").file("locked/more", b"m", 0o640).hardlink("zlink", "zero"),
    ]


EXPECTED_MODES = {
    "ro": 0o555,
    "ro/a": 0o644,
    "ro/b": 0o644,
    "locked": 0o000,
    "locked/secret": 0o000,
    "locked/more": 0o640,
    "zero": 0o000,
    "zlink": 0o000,
    "wo": 0o200,
    "suid": 0o4755,
    "sticky": 0o1777,
}


def _disk_modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_exact_modes_as_root(world: World) -> None:
    if os.geteuid() != 0:
        pytest.fail("the suite runs as root (sudo make test)")
    result = world.flatten(*_mode_layers())
    assert result.mode_fixes == {}
    assert _disk_modes(world.root) == EXPECTED_MODES


def _as_nobody(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with uid/gid nobody; return its JSON-able result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            payload = {"ok": fn()}
        except BaseException:
            payload = {"error": traceback.format_exc()}
        with os.fdopen(write_fd, "w") as fh:
            json.dump(payload, fh)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    payload = json.loads(data)
    assert "error" not in payload, payload.get("error")
    return payload["ok"]


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the suite runs as root (sudo make test): it switches to nobody here")
    base = Path(tempfile.mkdtemp(prefix="flatten-nobody-"))
    os.chown(base, NOBODY, NOBODY)
    yield base
    shutil.rmtree(base)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_unprivileged_modes_widened_and_recorded(nobody_dir: Path, compression: str) -> None:
    blobs = []
    for i, layer in enumerate(_mode_layers()):
        path = nobody_dir / f"layer{i}"
        path.write_bytes(compress(layer.tar_bytes(), compression))
        blobs.append(LayerFile(path, f"sha256:{i:064x}"))
    root = nobody_dir / "root"

    def child() -> Any:
        root.mkdir()
        result = flatten(blobs, root)
        modes = _disk_modes(root)
        shutil.rmtree(root)  # the caller must be able to remove the tree
        return {"fixes": result.mode_fixes, "modes": modes, "removed": not root.exists()}

    out = _as_nobody(child)
    assert out["fixes"] == {
        "ro": 0o555,
        "locked": 0o000,
        "locked/secret": 0o000,
        "zero": 0o000,
        "zlink": 0o000,
        "wo": 0o200,
    }
    widened = dict(
        EXPECTED_MODES,
        ro=0o755,
        locked=0o700,
        **{"locked/secret": 0o400},
        zero=0o400,
        zlink=0o400,
        wo=0o600,
    )
    assert out["modes"] == widened
    assert out["removed"]


# ---------------------------------------------------------------------------------------
# sparse files (GNU tar writes them; python's tarfile cannot)


@pytest.mark.parametrize(
    "options",
    [
        ["--format=gnu"],
        ["--format=posix", "--sparse-version=0.0"],
        ["--format=posix", "--sparse-version=0.1"],
        ["--format=posix", "--sparse-version=1.0"],
    ],
)
def test_sparse_members(world: World, tmp_path: Path, options: list[str]) -> None:
    if not shutil.which("tar"):
        pytest.fail("GNU tar is missing: make setup installs it")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.img", "wb") as fh:
        fh.seek(1 << 20)
        fh.write(b"middle")
        fh.seek(3 << 20)
        fh.write(b"end")
        fh.truncate(4 << 20)
    expected = (src / "sparse.img").read_bytes()
    tar = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", "--sparse", *options, "-cf", str(tar), "-C", str(src), "sparse.img"], check=True
    )
    result = world.flatten(world.blob(tar.read_bytes(), "gzip"))
    assert (world.root / "sparse.img").read_bytes() == expected
    assert result.bytes == 4 << 20


# ---------------------------------------------------------------------------------------
# errors: corrupt data, disk full, reporting


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_compressed_layer(world: World, compression: str, damage: str) -> None:
    layer = Layer()
    for i in range(50):
        layer.file(f"f{i}", os.urandom(2000) + bytes(20000))
    data = compress(layer.tar_bytes(), compression)
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0x55 for b in data[mid : mid + 64]) + data[mid + 64 :]
    with pytest.raises(MalformedLayerError) as info:
        world.flatten(world.blob(data, "none"))
    assert str(info.value).startswith("layer sha256:")
    assert isinstance(info.value, UnsafeLayerError)


def test_garbage_plain_layer(world: World) -> None:
    with pytest.raises(MalformedLayerError, match="checksum"):
        world.flatten(world.blob(os.urandom(4096), "none"))


def test_truncated_plain_tar(world: World) -> None:
    raw = Layer().file("big", os.urandom(100_000)).tar_bytes()
    with pytest.raises(MalformedLayerError, match="truncated") as info:
        world.flatten(world.blob(raw[:50_000], "none"))
    assert "member 'big'" in str(info.value)


def test_write_errors_propagate_with_errno(
    disk_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: memoryview) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(tarstream, "_write_all", full)
    with pytest.raises(OSError) as info:
        disk_world.flatten(Layer().file("a", b"data"))
    assert info.value.errno == errno.EDQUOT
    assert not isinstance(info.value, UnsafeLayerError)


def test_enospc_on_a_small_filesystem(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.fail("cannot mount a tmpfs: the suite runs as root (sudo make test)")
    try:
        blob = tmp_path / "layer"
        blob.write_bytes(gzip.compress(Layer().file("big", os.urandom(1 << 20)).tar_bytes()))
        (small / "root").mkdir()
        with pytest.raises(OSError) as info:
            flatten([LayerFile(blob, "sha256:" + "0" * 64)], small / "root")
        assert info.value.errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_progress_reports_compressed_bytes(disk_world: World) -> None:
    seen: list[int] = []
    layers = [disk_world.blob(Layer().file(f"f{i}", os.urandom(300_000)), "gzip") for i in range(3)]
    disk_world.flatten(*layers, progress=seen.append)
    total = sum(lf.path.stat().st_size for lf in layers)
    assert seen == sorted(seen) and seen[-1] == total


def test_error_message_names_layer_and_member(world: World) -> None:
    lf = world.blob(Layer().file("ok").file("../etc/shadow", b"x"))
    with pytest.raises(UnsafeLayerError) as info:
        world.flatten(lf)
    assert str(info.value) == (f"layer {lf.digest}: member '../etc/shadow': '..' in member name")
    assert info.value.layer == lf.digest and info.value.member == "../etc/shadow"


# ---------------------------------------------------------------------------------------
# layerio


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_open_layer_by_magic(tmp_path: Path, compression: str) -> None:
    raw = b"plain" + os.urandom(100_000) * 30
    path = tmp_path / "blob.tar+zstd"  # the name (like a media type) must not matter
    path.write_bytes(compress(raw, compression))
    with layerio.open_layer(path) as stream:
        assert stream.compression == {"none": "tar"}.get(compression, compression)
        assert stream.read(10) == raw[:10]
        assert stream.read() == raw[10:]
        assert stream.compressed_read == path.stat().st_size


def test_open_layer_concatenated_members_and_frames(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(b"one ") + gzip.compress(b"two"))
    with layerio.open_layer(path) as stream:
        assert stream.read() == b"one two"
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    path.write_bytes(cctx.compress(b"one ") + cctx.compress(b"two"))
    with layerio.open_layer(path) as stream:
        assert stream.read() == b"one two"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_open_layer_truncated(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "blob"
    path.write_bytes(compress(os.urandom(300_000), compression)[:-10])
    with layerio.open_layer(path) as stream:
        with pytest.raises(layerio.CorruptLayerError, match=f"corrupt {compression} data"):
            stream.read()


def test_open_layer_closed_early_stops_worker(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(bytes(50 << 20), 1))
    stream = layerio.open_layer(path)
    assert stream.read(5) == bytes(5)
    stream.close()
    assert stream.closed
    assert not stream._source._thread.is_alive()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# names longer than a filesystem holds


@pytest.mark.parametrize(
    "layer, reason",
    [
        (Layer().file("d/" + "n" * 256, b"x"), "longer than 255 bytes"),
        (Layer().symlink("l", "t/" + "n" * 256).file("l/f", b"x"), "longer than 255 bytes"),
        (Layer().symlink("l", "t" * 4096), "longer than 4095 bytes"),
    ],
    ids=["member", "through-symlink", "symlink-target"],
)
def test_overlong_names_refused(world: World, layer: Layer, reason: str) -> None:
    # Written to disk these fail with ENAMETOOLONG; streamed, tar2sqfs would store them
    # and make a squashfs that unsquashfs and the kernel call corrupt.
    with pytest.raises(MalformedLayerError, match=reason):
        world.flatten(layer)


def test_longest_names_accepted(world: World) -> None:
    name = "n" * 255
    world.flatten(Layer().file(f"d/{name}", b"x").symlink("l", "t" * 4095))
    assert (world.root / "d" / name).read_bytes() == b"x"
    assert os.readlink(world.root / "l") == "t" * 4095
