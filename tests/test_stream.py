"""The streaming conversion's own mechanics (imagegw.treeplan + imagegw.sqfstream).

The flatten rules and the evil layers are tested against both paths in test_flatten.py,
whole pulls in test_pull.py; here: what only the streaming path has (the tar stream it
writes, the option translation, a layer changing between the two passes, the writer
failing, modes when the gateway is not root).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from test_flatten import (  # noqa: F401 (nobody_dir is a fixture)
    NOBODY,
    Layer,
    World,
    _as_nobody,
    compress,
    nobody_dir,
    unsquash,
)

from imagegw import sqfstream
from imagegw.flatten import LayerFile, MalformedLayerError
from imagegw.squashfs import SquashfsError
from imagegw.treeplan import scan_layers


def listing(image: Path) -> dict[str, str]:
    """name -> 'perms size' from unsquashfs -lls (owner and time left out)."""
    out = subprocess.run(
        ["unsquashfs", "-lls", "-n", str(image)], capture_output=True, text=True, check=True
    ).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("squashfs-root"):
            rows[parts[5][len("squashfs-root") :] or "/"] = f"{parts[0]} {parts[2]}"
    return rows


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, "stream")


def _pairs(args: list[str]) -> set[tuple[str, str]]:
    return set(zip(args, args[1:], strict=False))


@pytest.mark.parametrize(
    "options, expected",
    [
        ("-comp zstd -Xcompression-level 3", {("-c", "zstd"), ("-X", "level=3")}),
        (
            "-comp zstd -b 1M -no-xattrs -all-root -processors 1",
            {("-c", "zstd"), ("-b", "1048576"), ("-j", "1")},
        ),
        ("-comp gzip -Xcompression-level 6 -Xwindow-size 12", {("-X", "level=6,window=12")}),
    ],
)
def test_mksquashfs_options_translated(options: str, expected: set[tuple[str, str]]) -> None:
    args = sqfstream.tar2sqfs_args(options.split())
    assert expected <= _pairs(args)
    assert {"--no-xattr", "--no-skip", "--force"} <= set(args)


@pytest.mark.parametrize(
    "options",
    [["-pf", "x"], ["-ef", "x"], ["-sort", "x"], ["-comp"], ["-b", "lots"], ["-comp", "xz"]],
)
def test_options_only_mksquashfs_takes_are_not_translated(options: list[str]) -> None:
    with pytest.raises(sqfstream.UnsupportedOption):
        sqfstream.tar2sqfs_args(options)
    assert sqfstream.stream_unavailable(options) is not None


@pytest.mark.parametrize("codec", sorted(sqfstream.STREAM_CODECS))
def test_chosen_codec_reaches_the_image(world: World, codec: str) -> None:
    lf = world.blob(Layer().file("a", b"a" * 100_000))
    out = world.layers / "img.squashfs"
    sqfstream.build([lf], out, ["-comp", codec], warn=world.warnings.append)
    stat = subprocess.run(["unsquashfs", "-s", str(out)], capture_output=True, text=True).stdout
    assert f"Compression {codec}" in stat
    unsquash(out, world.root)  # readable by unsquashfs, which admins inspect images with
    assert (world.root / "a").read_bytes() == b"a" * 100_000


@pytest.mark.parametrize("codec", ["xz", "lz4", "lzo"])
def test_other_codecs_go_the_on_disk_way(codec: str) -> None:
    # tar2sqfs's xz and lz4 images are refused by unsquashfs 4.5 (see STREAM_CODECS).
    assert f"-comp {codec}" in (sqfstream.stream_unavailable(["-comp", codec]) or "")


def test_long_names_and_numbers_in_the_stream(world: World) -> None:
    deep = "/".join(["component-" + "x" * 90] * 4)  # > 100 bytes: GNU long name records
    target = "t" * 300  # long link target: a 'K' record
    layer = (
        Layer()
        .file(f"{deep}/file", b"deep", mtime=2**33)  # beyond 32 bits: clamped
        .file("old", b"o", mtime=-5)  # before 1970: clamped to 0
        .symlink("long-link", target)
        .hardlink("hl", f"{deep}/file")
    )
    world.flatten(layer)
    assert (world.root / deep / "file").read_bytes() == b"deep"
    assert os.readlink(world.root / "long-link") == target
    assert os.lstat(world.root / "hl").st_ino == os.lstat(world.root / deep / "file").st_ino
    assert os.lstat(world.root / deep / "file").st_mtime == 2**32 - 1
    assert os.lstat(world.root / "old").st_mtime == 0


def test_layer_changed_between_the_passes_fails(world: World) -> None:
    lf = world.blob(Layer().file("a", b"first").file("b", b"second"))
    scans = scan_layers([lf])
    lf.path.write_bytes(compress(Layer().file("x", b"other").tar_bytes(), "gzip"))
    out = world.layers / "img.squashfs"
    with pytest.raises(MalformedLayerError, match="changed while it was being converted"):
        sqfstream.build([lf], out, warn=world.warnings.append, scans=scans)


def test_writer_failure_is_reported_with_its_words(world: World) -> None:
    lf = world.blob(Layer().file("a", b"a"))
    out = world.layers / "img.squashfs"
    bad = ["-comp", "zstd", "-Xcompression-level", "99"]  # translated, refused by tar2sqfs
    with pytest.raises(SquashfsError, match="tar2sqfs failed") as info:
        sqfstream.build([lf], out, bad, warn=world.warnings.append)
    assert not info.value.no_space
    assert "level" in str(info.value)


def test_image_dir_full_is_no_space(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        (tmp_path / "w").mkdir()
        world = World(tmp_path / "w", "stream")
        lf = world.blob(Layer().file("big", os.urandom(1 << 20)))
        with pytest.raises(SquashfsError) as info:
            sqfstream.build([lf], small / "img.squashfs", warn=world.warnings.append)
        assert info.value.no_space
        assert os.listdir(small) == []  # the writer removes its output
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_exact_modes_when_the_gateway_is_not_root(nobody_dir: Path) -> None:  # noqa: F811
    # The on-disk path has to widen modes it cannot keep on disk and fix them up in
    # mksquashfs; the stream carries the layer's modes as they are, whoever runs it.
    base = nobody_dir
    layers = [
        Layer()
        .dir("locked", 0o000)
        .file("locked/secret", b"s", 0o000)
        .file("suid", b"x", 0o4755)
        .file("sgid", b"x", 0o2711)
        .dir("sticky", 0o1777)
        .file("wo", b"w", 0o200),
        Layer().file("locked/more", b"m", 0o640),
    ]
    blobs = []
    for i, layer in enumerate(layers):
        path = base / f"layer{i}"
        path.write_bytes(compress(layer.tar_bytes(), "gzip"))
        blobs.append(LayerFile(path, f"sha256:{i:064x}"))
    image = base / "img.squashfs"

    def child() -> int:
        sqfstream.build(blobs, image, warn=lambda _msg: None)
        return os.getuid()

    assert _as_nobody(child) == NOBODY
    rows = listing(image)
    assert rows["/locked"].split()[0] == "d---------"
    assert rows["/locked/secret"] == "---------- 1"
    assert rows["/locked/more"] == "-rw-r----- 1"
    assert rows["/suid"].split()[0] == "-rwsr-xr-x"
    assert rows["/sgid"].split()[0] == "-rwx--s--x"
    assert rows["/sticky"].split()[0] == "drwxrwxrwt"
    assert rows["/wo"].split()[0] == "--w-------"


def test_only_surviving_data_is_streamed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # A big file of layer 1 deleted by layer 2 is never copied to the writer.
    copied: list[bytes] = []
    original = sqfstream._TarOut.file

    def spy(self: sqfstream._TarOut, inode: sqfstream.Inode, reader: object) -> None:
        copied.append(inode.paths[0])
        original(self, inode, reader)  # type: ignore[arg-type]

    monkeypatch.setattr(sqfstream._TarOut, "file", spy)
    world.flatten(
        Layer().file("big", os.urandom(200_000)).file("keep", b"k"),
        Layer().file(".wh.big").file("new", b"n"),
    )
    assert sorted(copied) == [b"keep", b"new"]
    assert sorted(os.listdir(world.root)) == ["keep", "new"]


def test_unsquash_helper_sees_every_type(world: World) -> None:
    # The flatten suite reads streamed images back through unsquash(): make sure it keeps
    # what the suite asserts (types, modes, hard links), so those tests can fail.
    world.flatten(Layer().dir("d", 0o750).file("d/f", b"f", 0o604).symlink("s", "d/f"))
    assert oct(os.lstat(world.root / "d").st_mode & 0o7777) == oct(0o750)
    assert oct(os.lstat(world.root / "d/f").st_mode & 0o7777) == oct(0o604)
    assert os.readlink(world.root / "s") == "d/f"


# ---------------------------------------------------------------------------------------
# both paths, same result: random layer stacks


def _random_stack(rng: random.Random) -> list[Layer]:
    """Three layers of random changes over a small namespace, so that names collide:
    replacements, whiteouts, opaque dirs, symlinks (in and across dirs), hard links."""
    names = ["a", "b", "c", "d/e", "d/f", "d/g/h", "x/y", "x/z", "l"]
    layers = []
    made: list[str] = []
    for _ in range(3):
        layer = Layer()
        for _ in range(rng.randint(3, 10)):
            name = rng.choice(names)
            op = rng.random()
            if op < 0.35:
                layer.file(
                    name,
                    rng.randbytes(rng.randint(0, 3000)),
                    rng.choice([0o644, 0o755, 0o4755, 0o600]),
                )
                made.append(name)
            elif op < 0.5:
                layer.dir(name, rng.choice([0o755, 0o700, 0o1777, 0o555]))
            elif op < 0.6:
                layer.symlink(name, rng.choice(["d", "x", "/d", "../x", "a", "nowhere"]))
            elif op < 0.7 and made:
                layer.hardlink(name, rng.choice(made))
            elif op < 0.85:
                head, _, base = name.rpartition("/")
                layer.file(f"{head}/.wh.{base}" if head else f".wh.{base}")
            else:
                head = name.rpartition("/")[0]
                layer.file(f"{head}/.wh..wh..opq" if head else ".wh..wh..opq")
        layers.append(layer)
    return layers


def _inode_groups(root: Path) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not os.path.islink(path):
                groups.setdefault(st.st_ino, []).append(os.path.relpath(path, root))
    return sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("seed", range(60))
def test_random_stacks_give_the_same_tree_on_both_paths(tmp_path: Path, seed: int) -> None:
    from test_flatten import tree

    layers = _random_stack(random.Random(seed))
    outcomes = []
    for path in ("disk", "stream"):
        (tmp_path / path).mkdir()
        world = World(tmp_path / path, path)
        try:
            result = world.flatten(*layers)
        except Exception as exc:  # noqa: BLE001 (the refusal itself is compared)
            outcomes.append(("refused", type(exc).__name__, str(exc)))
            continue
        outcomes.append(
            (
                "built",
                tree(world.root),
                _inode_groups(world.root),
                result.files,
                result.dirs,
                result.bytes,
                result.dropped,
            )
        )
    assert outcomes[0] == outcomes[1]
