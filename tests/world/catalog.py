"""The catalogue of test images: named builders that push real images into a registry.

Each builder takes the registry (anything ``imagebuild.resolve_target`` accepts: a
``Registry``, ``(url, session)`` or a URL) and a work directory for layer files, pushes the
image and returns a ``CatalogImage`` saying what a correct flattening must produce
(``files``, ``absent``, ``symlinks``, ``modes``, ``hardlinks`` ...) and the expected container
config. ``CatalogImage.check_tree(root)`` checks an extracted/mounted tree against that.

Builders (``repo:tag`` in brackets):

* ``basic``             tiny one-layer schema-2 image for tests that need any image
                        [test/basic:latest]
* ``flatten``           the layer-application exercise (see ``_flatten_layers``), in any
                        format and compression [test/flatten-<fmt>-<comp>:v1]
* ``xattrs``            SCHILY.xattr pax headers incl. a valid security.capability
                        [test/xattrs:v1]; ``malformed_cap=True`` -> [test/xattrs-badcap:v1]
* ``multiarch``         Docker manifest list / OCI index, linux/arm64 listed before
                        linux/amd64, different files and Env per platform [test/multiarch-<fmt>]
* ``hostile``           one image per attack in ``HOSTILE_KINDS`` [test/hostile-<kind>:v1]
* ``big_file``          (opt-in, slow) one 100 MB seeded random file [test/big-file:v1]
* ``many_files``        (opt-in, slow) 20,000 small files in one directory [test/many-files:v1]

What the independent reference (``reftree.reference_unpack``, skopeo + umoci 0.4.7) can
check is recorded per image in ``umoci`` / ``umoci_note``; when it cannot, ``twin`` names a
catalogue image with the same final tree that it can check:

* OK: basic, flatten with gzip or uncompressed layers (docker or oci), xattrs with a
  well-formed capability, multiarch (both formats, with a platform override), big_file,
  many_files.
* NOT: anything with a zstd layer ("blob is not correct mediatype"; twin: flatten gzip);
  xattrs-badcap ("lsetxattr: invalid argument"; twin: xattrs); hostile images (umoci
  contains them its own way, not our spec's: it clamps ``../escape`` and ``/abs`` into the
  root, resolves the escaping symlink inside the root (writes ``tmp/outside/pwned`` in the
  rootfs), fails on the outside hardlink, and in rootless mode replaces device nodes with
  empty files and keeps FIFOs, where our spec drops devices and FIFOs).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .imagebuild import (
    BuiltLayer,
    Device,
    Dir,
    Entry,
    File,
    Hardlink,
    Opaque,
    PushedImage,
    PushedIndex,
    RandomData,
    Symlink,
    Whiteout,
    build_layer,
    cap_v2,
    push_image,
    push_index,
    raw_file,
    raw_link,
    resolve_target,
)

AMD64 = ("linux", "amd64")
ARM64 = ("linux", "arm64")
CAP_NET_RAW = 13


@dataclass
class Hostile:
    """What a hostile image attempts, for tests that check it was contained.

    ``member`` is the tar member as written. ``must_not_exist(root)`` lists host paths a
    naive extraction into ``root`` would create. ``prepare(root)`` creates the directories
    an escaping symlink points at, so a naive extractor would really escape instead of
    failing with ENOENT (which would hide the bug); call it before converting.
    """

    kind: str
    member: str
    benign: str = "plain"  # a harmless file in the same image
    _outside: Sequence[str] = ()  # paths relative to root (may climb with ..) or absolute
    _prepare: Sequence[str] = ()

    def must_not_exist(self, root: str | os.PathLike[str]) -> list[Path]:
        return [Path(os.path.normpath(os.path.join(root, p))) for p in self._outside]

    def prepare(self, root: str | os.PathLike[str]) -> list[Path]:
        made = []
        for p in self._prepare:
            d = Path(os.path.normpath(os.path.join(root, p)))
            d.mkdir(parents=True, exist_ok=True)
            made.append(d)
        return made


@dataclass
class CatalogImage:
    """A pushed catalogue image and what a correct conversion of it must contain."""

    name: str
    host: str  # "127.0.0.1:PORT"
    repo: str
    tag: str
    fmt: str  # "docker" | "oci"
    pushed: PushedImage | PushedIndex
    config: dict[str, Any] = field(default_factory=dict)  # Env, Entrypoint, Cmd, ...
    files: dict[str, bytes] = field(default_factory=dict)  # path -> exact content
    file_sha256: dict[str, str] = field(default_factory=dict)  # for big content
    dirs: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> link target
    absent: list[str] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)  # path -> stat.S_IMODE
    hardlinks: list[tuple[str, ...]] = field(default_factory=list)  # names of one inode
    not_linked: list[tuple[str, str]] = field(default_factory=list)  # must be separate
    counts: dict[str, int] = field(default_factory=dict)  # dir -> number of entries
    umoci: bool = True
    umoci_note: str = ""
    twin: str | None = None
    hostile: Hostile | None = None
    platforms: dict[tuple[str, str], CatalogImage] = field(default_factory=dict)

    @property
    def manifest_digest(self) -> str:
        return self.pushed.manifest_digest

    @property
    def config_digest(self) -> str | None:
        return self.pushed.config_digest if isinstance(self.pushed, PushedImage) else None

    @property
    def is_index(self) -> bool:
        return isinstance(self.pushed, PushedIndex)

    def ref(self) -> str:
        """``host/repo:tag``, the form users type."""
        return f"{self.host}/{self.repo}:{self.tag}"

    def digest_ref(self) -> str:
        """``host/repo@sha256:…``."""
        return f"{self.host}/{self.repo}@{self.manifest_digest}"

    def check_tree(self, root: str | os.PathLike[str]) -> list[str]:
        """Differences between the tree at ``root`` and this image's expectations.

        Owners are not checked (our images are built ``-all-root``). Whiteout markers must
        never appear anywhere. Empty list = as expected.
        """
        root = Path(root)
        probs: list[str] = []

        def lst(p: str) -> os.stat_result | None:
            try:
                return os.lstat(root / p)
            except (FileNotFoundError, NotADirectoryError):
                return None

        def sha(p: str) -> str:
            h = hashlib.sha256()
            with open(root / p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            return h.hexdigest()

        want_sha = {p: hashlib.sha256(b).hexdigest() for p, b in self.files.items()}
        want_sha.update(self.file_sha256)
        for p, digest in want_sha.items():
            st = lst(p)
            if st is None:
                probs.append(f"{p}: missing (want regular file)")
            elif not stat.S_ISREG(st.st_mode):
                probs.append(f"{p}: not a regular file ({stat.filemode(st.st_mode)})")
            elif sha(p) != digest:
                got = (root / p).read_bytes()[:80] if st.st_size < 4096 else b"<big>"
                probs.append(f"{p}: content differs (got {got!r})")
        for p in self.dirs:
            st = lst(p)
            if st is None or not stat.S_ISDIR(st.st_mode):
                probs.append(f"{p}: want a directory, got {st and stat.filemode(st.st_mode)}")
        for p, target in self.symlinks.items():
            st = lst(p)
            if st is None or not stat.S_ISLNK(st.st_mode):
                got_t = st and stat.filemode(st.st_mode)
                probs.append(f"{p}: want symlink -> {target}, got {got_t}")
            elif os.readlink(root / p) != target:
                probs.append(f"{p}: symlink -> {os.readlink(root / p)}, want {target}")
        for p in self.absent:
            if lst(p) is not None:
                probs.append(f"{p}: should be absent")
        for p, mode in self.modes.items():
            st = lst(p)
            if st is not None and stat.S_IMODE(st.st_mode) != mode:
                probs.append(f"{p}: mode {stat.S_IMODE(st.st_mode):#o}, want {mode:#o}")
        for group in self.hardlinks:
            sts = [lst(p) for p in group]
            if any(s is None for s in sts):
                continue  # reported above as missing
            if len({(s.st_dev, s.st_ino) for s in sts if s}) != 1:
                probs.append(f"{group}: should be one inode (hardlinks)")
        for a, b in self.not_linked:
            sa, sb = lst(a), lst(b)
            if sa and sb and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
                probs.append(f"{a}, {b}: should no longer be hardlinked")
        for d, n in self.counts.items():
            try:
                got = len(os.listdir(root / d))
            except OSError as e:
                probs.append(f"{d}: cannot list ({e})")
                continue
            if got != n:
                probs.append(f"{d}: {got} entries, want {n}")
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                if n.startswith(".wh."):
                    probs.append(f"{Path(dirpath, n).relative_to(root)}: whiteout marker leaked")
        return probs


def _host(target: Any) -> str:
    url, _ = resolve_target(target)
    return url.split("://", 1)[1]


def _layers(specs: Sequence[Sequence[Entry]], compression: str | Sequence[str],
            workdir: str | os.PathLike[str], level: int | None = None,
            auto_parents: bool = True) -> list[BuiltLayer]:
    comps = [compression] * len(specs) if isinstance(compression, str) else list(compression)
    return [build_layer(s, c, workdir, level=level, auto_parents=auto_parents)
            for s, c in zip(specs, comps, strict=True)]


# basic ---------------------------------------------------------------------------------
BASIC_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
BASIC_GROUP = b"root:x:0:\nnogroup:x:65534:\n"


def basic(reg: Any, workdir: str | os.PathLike[str], *, repo: str = "test/basic",
          tag: str = "latest", fmt: str = "docker", marker: str = "") -> CatalogImage:
    """A tiny one-layer image (passwd, group, hosts, a script): for tests needing any image.

    A different ``marker`` changes one file, so the same repo:tag can be re-pushed with a
    new digest (tag moved upstream). The session registry is shared: pass your own
    ``repo`` when you use ``marker``, or other tests see the moved tag.
    """
    hello = b"#!/bin/sh\necho hello from basic\n"
    marker_b = f"basic {marker}\n".encode()
    entries: list[Entry] = [
        Dir("etc"), File("etc/passwd", BASIC_PASSWD), File("etc/group", BASIC_GROUP),
        File("etc/hosts", b"127.0.0.1 localhost\n"), File("etc/resolv.conf", b""),
        File("etc/os-release", b'NAME="shifter-test basic"\n'),
        Dir("bin"), File("bin/hello", hello, mode=0o755),
        Dir("usr/share/basic"), File("usr/share/basic/marker", marker_b),
        Dir("tmp", mode=0o1777),
    ]
    config = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "BASIC=1"], "Cmd": ["/bin/hello"],
              "WorkingDir": "/", "Labels": {"org.opencontainers.image.title": "basic"}}
    layers = _layers([entries], "gzip", workdir)
    pushed = push_image(reg, repo, tag, layers, config, fmt=fmt)
    return CatalogImage(
        name="basic", host=_host(reg), repo=repo, tag=tag, fmt=fmt, pushed=pushed, config=config,
        files={"etc/passwd": BASIC_PASSWD, "etc/group": BASIC_GROUP, "bin/hello": hello,
               "usr/share/basic/marker": marker_b},
        dirs=["etc", "bin", "tmp"], modes={"bin/hello": 0o755, "tmp": 0o1777})


# flatten -------------------------------------------------------------------------------
FLATTEN_CONFIG: dict[str, Any] = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "FOO=bar", "EMPTY=", "WITH_EQ=a=b=c",
            "SPACED=two words"],
    "Entrypoint": ["/bin/entry", "--flag"],
    # An element with a single quote: breaks Shifter's old str(list) .meta format.
    "Cmd": ["arg one", "it's"],
    "WorkingDir": "/srv/app",
    "Labels": {"org.example.name": "flatten", "org.example.unicode": "café"},
    "User": "0:0",
}


UNICODE_CONTENT = "naïve ☕ ok\n".encode()


def _flatten_layers() -> list[list[Entry]]:
    """Three layers covering the layer-application rules.

    Order inside a layer matters for some cases and is deliberate (commented).
    """
    l1: list[Entry] = [
        Dir("etc"), File("etc/app.conf", "v1\n"),
        File("a/x", "x as a file\n"),  # file -> dir (l2) -> file (l3)
        # d: dir -> file (l2) -> dir (l3)
        Dir("d"), File("d/child", "c\n"), Dir("d/sub"), File("d/sub/deep", "deep\n"),
        File("gone.txt", "to be whited out\n"),
        Dir("olddir"), File("olddir/a", "a\n"),
        Dir("olddir/nested"), File("olddir/nested/b", "b\n"),
        Dir("opq"), File("opq/lower1", "l1\n"), Dir("opq/sub"), File("opq/sub/deep", "deep\n"),
        File("keep/untouched", "stays\n"),
        File("hl/a", "shared inode\n"), Hardlink("hl/b", "hl/a"),  # hardlink within a layer
        File("hl/x", "old x\n"), Hardlink("hl/y", "hl/x"),  # x gets replaced in l2
        Symlink("rel-link", "etc/app.conf"), Symlink("abs-link", "/etc/app.conf"),
        Symlink("dangling", "does/not/exist"),
        Dir("lib"), File("lib/libold.so", "old lib\n"),  # dir replaced by a symlink in l2
        Dir("private"), File("private/f", "p\n"),  # dir mode changes in l2
        File("bin/su-like", "#!/bin/sh\n", mode=0o4755),
        File("bin/sg-like", "#!/bin/sh\n", mode=0o2755),
        File("bin/owned", "uid 1000\n", uid=1000, gid=1000),
        Dir("tmp", mode=0o1777), Dir("shared", mode=0o2775),
        Dir("café"), File("café/naïve.txt", UNICODE_CONTENT),
        File("café/ancien.txt", "old\n"),
        File("recreated", "before\n"),
        File("empty"),
    ]
    l2: list[Entry] = [
        File("etc/app.conf", "v2\n"),  # plain replacement
        Dir("a/x"), File("a/x/inner", "inner\n"),  # file -> dir
        File("d", "d is a file now\n"),  # dir -> file: the whole subtree goes
        Whiteout("gone.txt"),
        Whiteout("olddir"),  # whiteout of a directory removes its subtree
        Whiteout("never-existed"),  # harmless: nothing below to delete
        # The opaque marker comes *after* a file added to the same directory in this layer:
        # that file must survive (the marker only hides lower layers).
        File("opq/upper", "upper\n"), Opaque("opq"), File("opq/after", "after\n"),
        Hardlink("hl/c", "hl/a"),  # hardlink to a file of a lower layer
        File("hl/x", "new x\n"),  # replaces one name: hl/y keeps old content, unlinked
        Symlink("lib", "usr/lib"), Dir("usr/lib"), File("usr/lib/libnew.so", "new lib\n"),
        Dir("private", mode=0o700),  # re-declared: mode changes, contents stay
        Whiteout("café/ancien.txt"),
        # Whiteout and re-creation in the same layer: the whiteout hides only the lower
        # layer's file, so the new one stays.
        Whiteout("recreated"), File("recreated", "after\n"),
    ]
    l3: list[Entry] = [
        File("a/x", "x is a file again\n"),  # dir -> file
        Dir("d"), File("d/again", "again\n"),  # file -> dir
        File("srv/app/run.sh", "#!/bin/sh\n", mode=0o755),
    ]
    return [l1, l2, l3]


def _flatten_expect(img: CatalogImage) -> None:
    img.files = {
        "etc/app.conf": b"v2\n", "a/x": b"x is a file again\n", "d/again": b"again\n",
        "opq/upper": b"upper\n", "opq/after": b"after\n", "keep/untouched": b"stays\n",
        "hl/a": b"shared inode\n", "hl/b": b"shared inode\n", "hl/c": b"shared inode\n",
        "hl/x": b"new x\n", "hl/y": b"old x\n", "usr/lib/libnew.so": b"new lib\n",
        "private/f": b"p\n", "bin/su-like": b"#!/bin/sh\n", "bin/sg-like": b"#!/bin/sh\n",
        "bin/owned": b"uid 1000\n", "café/naïve.txt": UNICODE_CONTENT,
        "recreated": b"after\n", "empty": b"", "srv/app/run.sh": b"#!/bin/sh\n",
    }
    img.dirs = ["a", "d", "opq", "private", "tmp", "shared", "café", "srv/app"]
    img.symlinks = {"rel-link": "etc/app.conf", "abs-link": "/etc/app.conf",
                    "dangling": "does/not/exist", "lib": "usr/lib"}
    img.absent = ["a/x/inner", "d/child", "d/sub", "gone.txt", "olddir", "never-existed",
                  "opq/lower1", "opq/sub", "usr/lib/libold.so", "café/ancien.txt",
                  ".wh.gone.txt", "opq/.wh..wh..opq"]
    img.modes = {"bin/su-like": 0o4755, "bin/sg-like": 0o2755, "tmp": 0o1777,
                 "shared": 0o2775, "private": 0o700, "srv/app/run.sh": 0o755}
    img.hardlinks = [("hl/a", "hl/b", "hl/c")]
    img.not_linked = [("hl/x", "hl/y")]
    img.counts = {"opq": 2, "d": 1}


def flatten(reg: Any, workdir: str | os.PathLike[str], *, fmt: str = "docker",
            compression: str | Sequence[str] = "gzip", repo: str | None = None,
            tag: str = "v1") -> CatalogImage:
    """The layer-application exercise (whiteouts, opaque dirs, replacements, links, modes,
    unicode, setuid) with the full config. ``compression`` may be one per layer (3)."""
    comp_name = compression if isinstance(compression, str) else "mixed"
    repo = repo or f"test/flatten-{fmt}-{comp_name}"
    layers = _layers(_flatten_layers(), compression, workdir)
    pushed = push_image(reg, repo, tag, layers, FLATTEN_CONFIG, fmt=fmt)
    zstd = any(la.compression == "zstd" for la in layers)
    img = CatalogImage(
        name=f"flatten-{fmt}-{comp_name}", host=_host(reg), repo=repo, tag=tag, fmt=fmt,
        pushed=pushed, config=FLATTEN_CONFIG, umoci=not zstd,
        umoci_note="umoci 0.4.7 cannot read zstd layers" if zstd else "",
        twin="flatten-docker-gzip" if zstd else None)
    _flatten_expect(img)
    return img


# xattrs --------------------------------------------------------------------------------
def xattrs(reg: Any, workdir: str | os.PathLike[str], *, malformed_cap: bool = False,
           fmt: str = "oci") -> CatalogImage:
    """Files carrying SCHILY.xattr.* pax records: user.*, trusted.* and security.capability.

    Our converter must drop them all (no file capabilities reach an image). With
    ``malformed_cap`` the capability value is 3 garbage bytes, which umoci refuses.
    """
    cap = b"\x01\x02\x03" if malformed_cap else cap_v2(1 << CAP_NET_RAW)
    ping = b"#!/bin/sh\necho ping\n"
    entries: list[Entry] = [
        File("bin/ping", ping, mode=0o755, xattrs={"security.capability": cap}),
        File("etc/noted", "n\n", xattrs={"user.note": "hello", "trusted.secret": "t"}),
        Dir("data", xattrs={"user.dirnote": "d"}),
        File("plain", "plain\n"),
    ]
    repo = "test/xattrs-badcap" if malformed_cap else "test/xattrs"
    layers = _layers([entries], "gzip", workdir)
    config = {"Cmd": ["/bin/ping"]}
    pushed = push_image(reg, repo, "v1", layers, config, fmt=fmt)
    return CatalogImage(
        name=repo.split("/")[1], host=_host(reg), repo=repo, tag="v1", fmt=fmt, pushed=pushed,
        config=config, files={"bin/ping": ping, "etc/noted": b"n\n", "plain": b"plain\n"},
        dirs=["data"], modes={"bin/ping": 0o755},
        umoci=not malformed_cap,
        umoci_note="umoci refuses malformed security.capability" if malformed_cap else
        "umoci writes the xattrs (incl. the capability) into its rootfs",
        twin="xattrs" if malformed_cap else None)


# multiarch -----------------------------------------------------------------------------
def multiarch(reg: Any, workdir: str | os.PathLike[str], *, fmt: str = "docker",
              repo: str | None = None, tag: str = "latest") -> CatalogImage:
    """A manifest list (docker) or OCI index for linux/arm64 and linux/amd64.

    The arm64 entry is listed first so "take the first manifest" is caught. Both share a
    base layer; each has ``etc/arch`` with its own name and ``ARCH=`` in Env.
    """
    repo = repo or f"test/multiarch-{fmt}"
    base = build_layer([File("etc/common", "shared base\n")], "gzip", workdir)
    per: dict[tuple[str, str], CatalogImage] = {}
    pushed_images: list[tuple[tuple[str, str], PushedImage]] = []
    for plat in (ARM64, AMD64):
        arch = plat[1]
        content = f"{arch}\n".encode()
        top = build_layer([File("etc/arch", content), File(f"only-on-{arch}", "1\n")],
                          "gzip", workdir)
        cfg = {"Env": ["PATH=/usr/bin:/bin", f"ARCH={arch}"], "Cmd": ["/bin/arch"],
               "Labels": {"arch": arch}}
        img = push_image(reg, repo, None, [base, top], cfg, fmt=fmt, platform=plat)
        other = "amd64" if arch == "arm64" else "arm64"
        per[plat] = CatalogImage(
            name=f"multiarch-{fmt}-{arch}", host=_host(reg), repo=repo, tag=tag, fmt=fmt,
            pushed=img, config=cfg,
            files={"etc/arch": content, "etc/common": b"shared base\n", f"only-on-{arch}": b"1\n"},
            absent=[f"only-on-{other}"])
        pushed_images.append((plat, img))
    index = push_index(reg, repo, tag, pushed_images, fmt=fmt)
    amd = per[AMD64]
    return CatalogImage(
        name=f"multiarch-{fmt}", host=_host(reg), repo=repo, tag=tag, fmt=fmt, pushed=index,
        config=amd.config, files=amd.files, absent=amd.absent, platforms=per,
        umoci_note="pass platform= to reference_unpack to pick a member")


# hostile -------------------------------------------------------------------------------
HOSTILE_KINDS = ("dotdot", "absolute", "symlink-escape", "symlink-escape-same-layer",
                 "symlink-abs-escape", "hardlink-escape", "chardev", "devices")


def hostile(reg: Any, workdir: str | os.PathLike[str], kind: str) -> CatalogImage:
    """One hostile image per ``kind`` (see ``HOSTILE_KINDS``), each with a benign ``plain``.

    * dotdot: member ``../escape``; absolute: member ``/abs``
    * symlink-escape: ``evil -> ../../../../tmp/outside`` then ``evil/pwned`` in the next
      layer; ``-same-layer`` writes it in the same layer; symlink-abs-escape uses
      ``evil -> /tmp/outside``
    * hardlink-escape: hardlink ``passwd`` to ``../../etc/passwd``
    * chardev: ``dev/evil-mem`` char 1:1; devices: block ``dev/evil-sda`` 8:0 and a FIFO
    """
    plain = File("plain", "benign\n")
    rel_target = "../../../../tmp/outside"
    outside: list[str] = []
    prep: list[str] = []
    member: str
    specs: list[list[Entry]]
    if kind == "dotdot":
        member, specs, outside = "../escape", [[plain, raw_file("../escape", b"escaped\n")]], [
            "../escape"]
    elif kind == "absolute":
        member, specs, outside = "/abs", [[plain, raw_file("/abs", b"escaped\n")]], ["/abs"]
    elif kind in ("symlink-escape", "symlink-escape-same-layer", "symlink-abs-escape"):
        target = "/tmp/outside" if kind == "symlink-abs-escape" else rel_target
        link = Symlink("evil", target)
        write = File("evil/pwned", "pwned\n")
        specs = [[plain, link, write]] if kind.endswith("same-layer") else [[plain, link], [write]]
        member = "evil/pwned"
        outside = [target + "/pwned"]
        prep = [target]
    elif kind == "hardlink-escape":
        member = "passwd"
        specs = [[plain, raw_link("passwd", "../../etc/passwd", hard=True)]]
        outside = []  # the danger is a link to a host file: check "passwd" in the image
    elif kind == "chardev":
        member = "dev/evil-mem"
        specs = [[plain, Dir("dev"), Device("dev/evil-mem", "char", 1, 1)]]
    elif kind == "devices":
        member = "dev/evil-sda"
        specs = [[plain, Dir("dev"), Device("dev/evil-sda", "block", 8, 0),
                  Device("dev/evil-fifo", "fifo")]]
    else:
        raise ValueError(f"unknown hostile kind {kind!r}; one of {HOSTILE_KINDS}")
    repo = f"test/hostile-{kind}"
    # No invented parent directories: a Dir("evil") before "evil/pwned" would defuse the
    # symlink attack.
    layers = _layers(specs, "gzip", workdir, auto_parents=False)
    pushed = push_image(reg, repo, "v1", layers, {"Cmd": ["/plain"]}, fmt="docker")
    absent = {"chardev": ["dev/evil-mem"], "devices": ["dev/evil-sda", "dev/evil-fifo"],
              "hardlink-escape": ["passwd"]}.get(kind, [])
    return CatalogImage(
        name=f"hostile-{kind}", host=_host(reg), repo=repo, tag="v1", fmt="docker",
        pushed=pushed, config={"Cmd": ["/plain"]}, files={"plain": b"benign\n"}, absent=absent,
        umoci=False, umoci_note="umoci contains hostile members its own way (not our spec)",
        hostile=Hostile(kind=kind, member=member, _outside=outside, _prepare=prep))


# big (opt-in) --------------------------------------------------------------------------
def big_file(reg: Any, workdir: str | os.PathLike[str], *, size: int = 100 << 20,
             seed: int = 100) -> CatalogImage:
    """One layer holding ``big/blob``: ``size`` seeded random bytes (gzip level 1)."""
    data = RandomData(size, seed)
    layers = _layers([[File("big/blob", data), File("big/small", "s\n")]], "gzip", workdir,
                     level=1)
    pushed = push_image(reg, "test/big-file", "v1", layers, {"Cmd": ["/bin/true"]})
    return CatalogImage(
        name="big-file", host=_host(reg), repo="test/big-file", tag="v1", fmt="docker",
        pushed=pushed, config={"Cmd": ["/bin/true"]}, files={"big/small": b"s\n"},
        file_sha256={"big/blob": data.sha256()})


def many_files(reg: Any, workdir: str | os.PathLike[str], *, count: int = 20_000
               ) -> CatalogImage:
    """One layer with ``count`` small files ``many/fNNNNN`` (content ``"<i>\\n"``)."""
    entries = (File(f"many/f{i:05d}", f"{i}\n") for i in range(count))
    layers = _layers([[Dir("many"), *entries]], "gzip", workdir)
    pushed = push_image(reg, "test/many-files", "v1", layers, {"Cmd": ["/bin/true"]})
    samples = {f"many/f{i:05d}": f"{i}\n".encode() for i in (0, 1, count // 2, count - 1)}
    return CatalogImage(
        name="many-files", host=_host(reg), repo="test/many-files", tag="v1", fmt="docker",
        pushed=pushed, config={"Cmd": ["/bin/true"]}, files=samples, counts={"many": count})


# everything ----------------------------------------------------------------------------
def build_all(reg: Any, workdir: str | os.PathLike[str], *, include_big: bool = False,
              include_hostile: bool = True) -> dict[str, CatalogImage]:
    """Push the whole catalogue; returns images by name (index members are reachable
    through ``platforms``)."""
    out: list[CatalogImage] = [
        basic(reg, workdir),
        flatten(reg, workdir, fmt="docker", compression="gzip"),
        flatten(reg, workdir, fmt="docker", compression="none"),
        flatten(reg, workdir, fmt="oci", compression="gzip"),
        flatten(reg, workdir, fmt="oci", compression="none"),
        flatten(reg, workdir, fmt="oci", compression="zstd"),
        flatten(reg, workdir, fmt="oci", compression=("gzip", "zstd", "none")),
        xattrs(reg, workdir),
        xattrs(reg, workdir, malformed_cap=True),
        multiarch(reg, workdir, fmt="docker"),
        multiarch(reg, workdir, fmt="oci"),
    ]
    if include_hostile:
        out += [hostile(reg, workdir, k) for k in HOSTILE_KINDS]
    if include_big:
        out += [big_file(reg, workdir), many_files(reg, workdir)]
    return {img.name: img for img in out}
