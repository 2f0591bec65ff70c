"""The image side of the test world works: layer builder, pushes, catalogue, reference.

These tests check the tools other tests trust, using only plain requests, tarfile,
skopeo + umoci and the kernel's squashfs, never our own pull/convert code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from world import catalog, reftree
from world.catalog import AMD64, ARM64, CatalogImage
from world.imagebuild import (
    Device,
    Dir,
    File,
    Hardlink,
    Opaque,
    RandomData,
    Symlink,
    Whiteout,
    build_layer,
    cap_v2,
    get_blob,
    get_manifest,
    raw_file,
    raw_link,
    resolve_target,
)


def _scratch(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temp dir removed after the test, pass or fail (unpacked rootfs can be big)."""
    yield from _scratch("world-img-")


@pytest.fixture(scope="module")
def layer_dir() -> Iterator[Path]:
    yield from _scratch("world-layers-")


@pytest.fixture(scope="module")
def cat(registry: Any, layer_dir: Path) -> dict[str, CatalogImage]:
    return catalog.build_all(registry, layer_dir)


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _file_sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _decompress(blob: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(blob)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


# Layer builder ------------------------------------------------------------------------
SAMPLE = [
    File("café/naïve.txt", "naïve\n"),
    File("bin/ping", b"p", mode=0o4755,
         xattrs={"security.capability": cap_v2(1 << 13), "user.note": "hi"}),
    Hardlink("bin/ping2", "bin/ping"),
    Symlink("rel", "bin/ping"), Symlink("abs", "/bin/ping"),
    Whiteout("old/thing"), Opaque("opq"), File("opq/new", "n"),
    Device("dev/null", "char", 1, 3), Device("fifo", "fifo"),
    raw_file("../escape", b"x"), raw_file("/abs-member", b"y"),
    raw_link("hl-out", "../../etc/passwd", hard=True),
]


def test_layer_digests_are_deterministic_and_correct(tmp_path: Path) -> None:
    built = {c: build_layer(SAMPLE, c, tmp_path / c) for c in ("gzip", "zstd", "none")}
    again = build_layer(SAMPLE, "gzip", tmp_path / "again")
    assert again.digest == built["gzip"].digest  # no timestamps leak into the blob
    diff_ids = {b.diff_id for b in built.values()}
    assert len(diff_ids) == 1  # same tar whatever the compression
    assert built["none"].digest == built["none"].diff_id
    for c, b in built.items():
        blob = b.path.read_bytes()
        assert _sha(blob) == b.digest and len(blob) == b.size
        assert _sha(_decompress(blob, c)) == b.diff_id
    assert built["gzip"].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert built["zstd"].media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert built["none"].media_type == "application/vnd.oci.image.layer.v1.tar"
    assert (built["gzip"].media_type_for("docker")
            == "application/vnd.docker.image.rootfs.diff.tar.gzip")
    with pytest.raises(ValueError):
        built["zstd"].media_type_for("docker")


def test_layer_members_are_written_as_described(tmp_path: Path) -> None:
    b = build_layer(SAMPLE, "none", tmp_path)
    raw = b.path.read_bytes()
    # The unicode name travels as a UTF-8 pax "path" record.
    assert "path=café/naïve.txt\n".encode() in raw
    with tarfile.open(b.path, encoding="utf-8") as tf:
        members = {m.name: m for m in tf.getmembers()}
    names = list(members)
    # Undeclared parents are declared (before their children), hostile names untouched.
    assert names.index("café") < names.index("café/naïve.txt")
    assert {"../escape", "/abs-member", "hl-out"} <= set(names)
    assert members["hl-out"].islnk() and members["hl-out"].linkname == "../../etc/passwd"
    ping = members["bin/ping"]
    assert ping.mode == 0o4755
    cap = ping.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
    assert cap == cap_v2(1 << 13) and len(cap) == 20
    assert ping.pax_headers["SCHILY.xattr.user.note"] == "hi"
    assert members["bin/ping2"].islnk() and members["bin/ping2"].linkname == "bin/ping"
    assert members["rel"].linkname == "bin/ping" and members["abs"].linkname == "/bin/ping"
    assert "old/.wh.thing" in members and "opq/.wh..wh..opq" in members
    assert members["dev/null"].ischr() and (members["dev/null"].devmajor,
                                             members["dev/null"].devminor) == (1, 3)
    assert members["fifo"].isfifo()
    assert all(m.mtime == members["rel"].mtime and m.uname == "" for m in members.values()
               if not m.name.startswith(("../", "/", "hl-out")))


def test_big_content_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    size = 48 << 20
    tracemalloc.start()
    try:
        b = build_layer([File("big", RandomData(size, seed=7))], "gzip", tmp_path, level=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes: content was buffered"
    assert b.size > size  # random data does not compress
    assert RandomData(size, seed=7).sha256() == RandomData(size, seed=7).sha256()
    assert RandomData(1000, seed=7).sha256() != RandomData(1000, seed=8).sha256()


# Pushing and reading back -------------------------------------------------------------
@pytest.mark.parametrize("name", ["basic", "flatten-oci-gzip", "flatten-oci-zstd",
                                  "flatten-docker-none", "flatten-oci-mixed"])
def test_pushed_images_read_back(registry: Any, cat: dict[str, CatalogImage], name: str) -> None:
    img = cat[name]
    pushed = img.pushed
    r = get_manifest(registry, img.repo, img.tag)
    assert r.headers["Content-Type"] == pushed.manifest_media_type
    assert r.headers["Docker-Content-Digest"] == img.manifest_digest
    assert r.content == pushed.manifest_bytes and _sha(r.content) == img.manifest_digest
    by_digest = get_manifest(registry, img.repo, img.manifest_digest)
    assert by_digest.content == pushed.manifest_bytes
    manifest = r.json()
    cfg_bytes = get_blob(registry, img.repo, manifest["config"]["digest"])
    assert _sha(cfg_bytes) == img.config_digest
    cfg = json.loads(cfg_bytes)
    assert (cfg["os"], cfg["architecture"]) == ("linux", "amd64")
    for key, value in img.config.items():
        assert cfg["config"][key] == value
    assert len(cfg["rootfs"]["diff_ids"]) == len(manifest["layers"])
    for desc, diff_id, built in zip(manifest["layers"], cfg["rootfs"]["diff_ids"],
                                    pushed.layers, strict=True):
        blob = get_blob(registry, img.repo, desc["digest"])
        assert _sha(blob) == desc["digest"] and len(blob) == desc["size"]
        assert desc["mediaType"] == built.media_type_for(img.fmt)
        assert _sha(_decompress(blob, built.compression)) == diff_id


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_index_read_back(registry: Any, cat: dict[str, CatalogImage], fmt: str) -> None:
    img = cat[f"multiarch-{fmt}"]
    r = get_manifest(registry, img.repo, img.tag)
    want_type = {"docker": "application/vnd.docker.distribution.manifest.list.v2+json",
                 "oci": "application/vnd.oci.image.index.v1+json"}[fmt]
    assert r.headers["Content-Type"] == want_type
    assert _sha(r.content) == img.manifest_digest
    entries = r.json()["manifests"]
    assert [(e["platform"]["os"], e["platform"]["architecture"]) for e in entries] == [
        ARM64, AMD64]  # arm64 first on purpose
    for e in entries:
        plat = (e["platform"]["os"], e["platform"]["architecture"])
        m = get_manifest(registry, img.repo, e["digest"])
        assert _sha(m.content) == e["digest"] == img.platforms[plat].manifest_digest
        cfg = json.loads(get_blob(registry, img.repo, m.json()["config"]["digest"]))
        assert cfg["architecture"] == plat[1]
        assert f"ARCH={plat[1]}" in cfg["config"]["Env"]


def test_twins_share_their_trees(cat: dict[str, CatalogImage]) -> None:
    """The zstd images umoci cannot read carry exactly the tars of their gzip twin."""
    for img in cat.values():
        if img.twin and img.twin.startswith("flatten"):
            twin = cat[img.twin]
            assert img.pushed.config_json["rootfs"] == twin.pushed.config_json["rootfs"]


def test_resolve_target_forms(registry: Any) -> None:
    url, sess = resolve_target(registry)
    assert url == registry.url
    assert resolve_target(registry.host)[0] == registry.url
    assert resolve_target((registry.url + "/", sess)) == (registry.url, sess)


# The reference (skopeo + umoci) -------------------------------------------------------
UMOCI_OK = ["basic", "flatten-docker-gzip", "flatten-docker-none", "flatten-oci-gzip",
            "flatten-oci-none", "xattrs"]


@pytest.mark.parametrize("name", UMOCI_OK)
def test_reference_unpack_meets_expectations(registry: Any, cat: dict[str, CatalogImage],
                                             scratch: Path, name: str) -> None:
    img = cat[name]
    assert img.umoci
    rootfs = reftree.reference_unpack(registry, img.repo, img.tag, scratch)
    assert img.check_tree(rootfs) == []
    tree = reftree.tree_manifest(rootfs)
    assert not [p for p in tree if os.path.basename(p).startswith(".wh.")]
    if name.startswith("flatten"):
        # Whiteouts, opaque dir and replacements as umoci applied them.
        assert "gone.txt" not in tree and "olddir" not in tree
        assert sorted(p for p in tree if p.startswith("opq/")) == ["opq/after", "opq/upper"]
        assert tree["a/x"].type == "file" and tree["d"].type == "dir"
        assert tree["lib"] == reftree.Entry("symlink", 0o777, 0, 0, target="usr/lib")
        assert {tree[p].link_group for p in ("hl/a", "hl/b", "hl/c")} == {"hl/a"}
        assert tree["hl/x"].link_group is None and tree["hl/y"].link_group is None
        assert tree["bin/su-like"].mode == 0o4755 and tree["tmp"].mode == 0o1777
        assert tree["café/naïve.txt"].sha256 == hashlib.sha256(
            catalog.UNICODE_CONTENT).hexdigest()
        # by digest gives the same tree
        again = reftree.reference_unpack(registry, img.repo, img.manifest_digest,
                                         scratch / "bydigest")
        assert reftree.diff_trees(reftree.tree_manifest(again), tree) == []


def test_reference_limits_are_as_documented(registry: Any, cat: dict[str, CatalogImage],
                                            scratch: Path) -> None:
    """umoci 0.4.7 cannot check zstd or a malformed capability; if that changes, the
    catalogue's ``umoci`` flags and notes need updating."""
    for name in ("flatten-oci-zstd", "flatten-oci-mixed", "xattrs-badcap"):
        img = cat[name]
        assert not img.umoci and img.twin in cat
        with pytest.raises(reftree.ReferenceUnpackError) as err:
            reftree.reference_unpack(registry, img.repo, img.tag, scratch / name)
        assert ("zstd" in str(err.value)) or ("lsetxattr" in str(err.value))


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_reference_selects_platform(registry: Any, cat: dict[str, CatalogImage],
                                    scratch: Path, fmt: str) -> None:
    img = cat[f"multiarch-{fmt}"]
    for plat in (ARM64, AMD64):
        rootfs = reftree.reference_unpack(registry, img.repo, img.tag, scratch / plat[1],
                                          platform=plat)
        assert (rootfs / "etc/arch").read_text() == plat[1] + "\n"
        assert img.platforms[plat].check_tree(rootfs) == []
    # A member by digest, without a platform override.
    arm = img.platforms[ARM64]
    rootfs = reftree.reference_unpack(registry, img.repo, arm.manifest_digest, scratch / "dig")
    assert (rootfs / "etc/arch").read_text() == "arm64\n"


@pytest.mark.parametrize("which", ["basic_registry", "token_registry"])
def test_push_and_reference_with_auth(request: pytest.FixtureRequest, layer_dir: Path,
                                      scratch: Path, which: str) -> None:
    """Registry objects with auth: pushes use ``.session()``, skopeo gets ``.credentials``."""
    reg = request.getfixturevalue(which)
    img = catalog.basic(reg, layer_dir, repo="test/basic-auth")
    assert get_manifest(reg, img.repo, img.tag).content == img.pushed.manifest_bytes
    rootfs = reftree.reference_unpack(reg, img.repo, img.tag, scratch)
    assert img.check_tree(rootfs) == []


# Hostile images -----------------------------------------------------------------------
def _layer_members(registry: Any, img: CatalogImage) -> list[tarfile.TarInfo]:
    out: list[tarfile.TarInfo] = []
    for built in img.pushed.layers:
        blob = get_blob(registry, img.repo, built.digest)
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
            out += tf.getmembers()
    return out


def test_hostile_images_carry_their_attack(registry: Any, cat: dict[str, CatalogImage],
                                           scratch: Path) -> None:
    kinds = set()
    for img in cat.values():
        if img.hostile is None:
            continue
        kinds.add(img.hostile.kind)
        members = {m.name: m for m in _layer_members(registry, img)}
        assert "plain" in members
        m = members[img.hostile.member]
        kind = img.hostile.kind
        if kind.startswith("symlink"):
            link = members["evil"]
            assert link.issym()
            assert link.linkname.startswith(("../", "/"))  # climbs out or is absolute
            assert "evil" not in [n for n in members if members[n].isdir()]  # not defused
        elif kind == "hardlink-escape":
            assert m.islnk() and m.linkname == "../../etc/passwd"
        elif kind == "chardev":
            assert m.ischr() and (m.devmajor, m.devminor) == (1, 1)
        elif kind == "devices":
            assert m.isblk() and members["dev/evil-fifo"].isfifo()
        else:
            assert m.isfile() and m.name in ("../escape", "/abs")
    assert kinds == set(catalog.HOSTILE_KINDS)
    # Where the escapes would land, for a root at some depth.
    root = scratch / "a" / "root"
    sym = cat["hostile-symlink-escape"].hostile
    assert sym is not None
    made = sym.prepare(root)
    assert made and made[0].is_dir() and not made[0].is_relative_to(root)
    assert sym.must_not_exist(root) == [made[0] / "pwned"]
    dotdot = cat["hostile-dotdot"].hostile
    assert dotdot is not None and dotdot.must_not_exist(root) == [scratch / "a" / "escape"]
    shutil.rmtree(made[0])


# Trees and squashfs -------------------------------------------------------------------
def _make_sample_tree(root: Path) -> None:
    (root / "d/sub").mkdir(parents=True)
    (root / "d/file").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    (root / "café").mkdir()
    (root / "café/naïve.txt").write_text("naïve\n")
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    (root / "sgid").write_bytes(b"")
    os.chmod(root / "sgid", 0o2711)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "private").mkdir(mode=0o700)
    os.chmod(root / "private", 0o700)
    os.symlink("d/file", root / "rel")
    os.symlink("/etc/passwd", root / "abs")
    os.symlink("nowhere", root / "dangling")
    os.link(root / "d/file", root / "d/sub/hard")
    os.mkfifo(root / "fifo")
    (root / "owned").write_bytes(b"1000")
    os.chown(root / "owned", 1000, 1000)
    with open(root / "blob", "wb") as f:
        f.write(os.urandom(300_000))


def _loops_for(path: Path) -> str:
    return subprocess.run(["losetup", "-j", str(path)], capture_output=True,
                          text=True).stdout.strip()


def _mounts_with(fragment: str) -> list[str]:
    return [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if fragment in ln]


def test_squashfs_tree_equals_tree_manifest(scratch: Path) -> None:
    src = scratch / "src"
    src.mkdir()
    _make_sample_tree(src)
    sqfs = reftree.mksquashfs(src, scratch / "out.sqfs")
    ours = reftree.squashfs_tree(sqfs)
    theirs = reftree.tree_manifest(src)
    assert reftree.diff_trees(ours, theirs, ignore_owner=True) == []
    # -all-root really made everything root-owned, and the comparison sees owners.
    assert ours["owned"].uid == 0
    assert reftree.diff_trees(ours, theirs) == ["owned: uid ours=0 theirs=1000",
                                                "owned: gid ours=0 theirs=1000"]
    assert ours["d/file"].link_group == ours["d/sub/hard"].link_group == "d/file"
    assert ours["suid"].mode == 0o4755 and ours["tmp"].mode == 0o1777
    assert ours["rel"].target == "d/file" and ours["fifo"].type == "fifo"
    assert _loops_for(sqfs) == "" and _mounts_with("sqfs-mnt-") == []


def test_squashfs_of_reference_rootfs(registry: Any, cat: dict[str, CatalogImage],
                                      scratch: Path) -> None:
    """The whole reference chain our converter is compared with: umoci tree -> squashfs."""
    img = cat["flatten-docker-gzip"]
    rootfs = reftree.reference_unpack(registry, img.repo, img.tag, scratch / "ref")
    sqfs = reftree.mksquashfs(rootfs, scratch / "img.sqfs")
    assert reftree.diff_trees(reftree.squashfs_tree(sqfs), reftree.tree_manifest(rootfs),
                              ignore_owner=True) == []
    with reftree.mounted_squashfs(sqfs) as mnt:
        assert img.check_tree(mnt) == []
    assert _loops_for(sqfs) == ""


def test_squashfs_tree_releases_mount_on_error(scratch: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = scratch / "src"
    src.mkdir()
    (src / "f").write_text("x")
    sqfs = reftree.mksquashfs(src, scratch / "x.sqfs")

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(reftree, "tree_manifest", boom)
    with pytest.raises(RuntimeError, match="boom"):
        reftree.squashfs_tree(sqfs)
    assert _loops_for(sqfs) == "" and _mounts_with("sqfs-mnt-") == []
    bad = scratch / "garbage.sqfs"
    bad.write_bytes(b"\0" * 8192)
    with pytest.raises(reftree.ToolError):
        reftree.squashfs_tree(bad)
    assert _loops_for(bad) == "" and _mounts_with("sqfs-mnt-") == []


def test_diff_trees_reports() -> None:
    E = reftree.Entry
    a = {".": E("dir", 0o755, 0, 0), "f": E("file", 0o644, 0, 0, 1, "aa"),
         "l": E("symlink", 0o777, 0, 0, target="x"), "only-ours": E("dir", 0o755, 0, 0),
         "t": E("file", 0o644, 0, 0, 0, "e")}
    b = {".": E("dir", 0o700, 0, 0), "f": E("file", 0o644, 5, 5, 1, "bb"),
         "l": E("symlink", 0o777, 0, 0, target="y"), "only-theirs": E("file", 0o644, 0, 0),
         "t": E("dir", 0o755, 0, 0)}
    assert reftree.diff_trees(a, b, ignore_owner=True) == [
        ".: mode ours=0o755 theirs=0o700",
        "f: sha256 ours=aa theirs=bb",
        "l: target ours=x theirs=y",
        "extra in ours: only-ours (dir)",
        "missing in ours: only-theirs (file)",
        "t: type ours=file theirs=dir",
    ]
    assert "f: uid ours=0 theirs=5" in reftree.diff_trees(a, b)
    assert reftree.diff_trees(a, a) == []
    assert reftree.diff_trees(a, b, ignore_owner=True, ignore=["mode", "sha256", "target"]
                              )[:1] == ["extra in ours: only-ours (dir)"]


def test_tree_manifest_xattrs(scratch: Path) -> None:
    (scratch / "f").write_text("x")
    os.setxattr(scratch / "f", "user.k", b"v")
    tree = reftree.tree_manifest(scratch, xattrs=True)
    assert tree["f"].xattrs == (("user.k", b"v"),)
    assert reftree.tree_manifest(scratch)["f"].xattrs is None


# Big images (opt-in) ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("builder", ["big_file", "many_files"])
def test_big_images(registry: Any, layer_dir: Path, scratch: Path, builder: str) -> None:
    img = getattr(catalog, builder)(registry, layer_dir)
    r = get_manifest(registry, img.repo, img.tag)
    assert r.content == img.pushed.manifest_bytes
    layer = img.pushed.layers[0]
    assert _file_sha(layer.path) == layer.digest
    rootfs = reftree.reference_unpack(registry, img.repo, img.tag, scratch)
    assert img.check_tree(rootfs) == []


def test_dir_entry_modes_survive_auto_parents(tmp_path: Path) -> None:
    """An explicit Dir later in the list wins over an invented parent (no 0755 override)."""
    b = build_layer([File("p/f"), Dir("p", mode=0o700)], "none", tmp_path)
    with tarfile.open(b.path) as tf:
        ps = [m for m in tf.getmembers() if m.name == "p"]
    assert [m.mode for m in ps] == [0o700]
