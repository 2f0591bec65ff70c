"""An independent reference for image conversion, and tree comparison.

* ``reference_unpack``: skopeo + umoci (not our code) pull and flatten an image into a
  rootfs directory. umoci 0.4.7 cannot read zstd layers and refuses malformed
  ``security.capability`` xattrs; ``catalog.CatalogImage.umoci`` / ``twin`` say which
  catalogue images it can check. In ``--rootless`` mode (the default here) it does not
  chown, so owners are whoever runs it (root here: everything 0:0, like our
  ``-all-root`` squashfs), and it turns device nodes into empty files.
* ``tree_manifest``: a comparable description of a directory tree (no symlink following).
* ``squashfs_tree``: the same for a squashfs image, through a read-only loop mount that is
  always undone.
* ``diff_trees``: human-readable differences between two manifests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ToolError(RuntimeError):
    """An external tool failed; the message carries its argv and stderr."""


class ReferenceUnpackError(ToolError):
    """skopeo or umoci failed (e.g. a zstd layer or a malformed capability for umoci)."""


def _run(argv: Sequence[str], what: str, timeout: float = 600,
         exc: type[ToolError] = ToolError) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise exc(
            f"{what} failed (exit {p.returncode}): {' '.join(argv)}\n{p.stderr.strip()[-2000:]}")
    return p


def _host_of(registry: Any) -> str:
    if not isinstance(registry, str):
        host = getattr(registry, "host", None)
        registry = host if host else registry.url
    return registry.split("://", 1)[-1].rstrip("/")


def reference_unpack(registry: Any, repo: str, ref: str, dest: str | os.PathLike[str],
                     platform: Sequence[str] | None = None,
                     creds: tuple[str, str] | str | None = None,
                     rootless: bool = True) -> Path:
    """Pull ``repo:ref`` (tag or ``sha256:…``) with skopeo and unpack it with umoci.

    ``registry`` is a URL ("http://127.0.0.1:5000"), a "host:port", or a Registry object
    (its ``.host``/``.url``; its ``.credentials`` are used when ``creds`` is None).
    ``platform`` = (os, arch[, variant]) picks a member of a manifest list / index.
    Writes ``dest/oci`` (OCI layout) and ``dest/bundle``; returns ``dest/bundle/rootfs``.
    Raises ``ReferenceUnpackError`` when either tool fails.
    """
    host = _host_of(registry)
    if creds is None and not isinstance(registry, str):
        creds = getattr(registry, "credentials", None)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    layout, bundle = dest / "oci", dest / "bundle"
    src = f"docker://{host}/{repo}" + (f"@{ref}" if ref.startswith("sha256:") else f":{ref}")
    # --insecure-policy: do not depend on the host's /etc/containers/policy.json.
    argv = ["skopeo", "--insecure-policy"]
    if platform is not None:
        argv += ["--override-os", platform[0], "--override-arch", platform[1]]
        if len(platform) > 2:
            argv += ["--override-variant", platform[2]]
    argv += ["copy", "--src-tls-verify=false"]
    if creds:
        argv += ["--src-creds", creds if isinstance(creds, str) else f"{creds[0]}:{creds[1]}"]
    argv += [src, f"oci:{layout}:ref"]
    _run(argv, "skopeo copy", exc=ReferenceUnpackError)
    if bundle.exists():
        shutil.rmtree(bundle)
    _run(["umoci", "unpack", *(["--rootless"] if rootless else []), "--image", f"{layout}:ref",
          str(bundle)], "umoci unpack", exc=ReferenceUnpackError)
    return bundle / "rootfs"


@dataclass(frozen=True)
class Entry:
    """One path of a tree. Fields that do not apply to the type are None."""

    type: str  # file | dir | symlink | char | block | fifo | socket
    mode: int  # stat.S_IMODE: permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None = None  # files only
    sha256: str | None = None  # files only
    target: str | None = None  # symlinks only
    link_group: str | None = None  # non-dirs with >1 name in the tree: smallest such name
    rdev: tuple[int, int] | None = None  # device nodes: (major, minor)
    xattrs: tuple[tuple[str, bytes], ...] | None = None  # only when asked for


_TYPES = [(stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
          (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
          (stat.S_ISSOCK, "socket")]


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs_of(path: str) -> tuple[tuple[str, bytes], ...]:
    """All xattrs of ``path``; none where the filesystem keeps none (squashfs -no-xattrs)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:
            return ()
        raise
    return tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False)) for k in names))


def tree_manifest(root: str | os.PathLike[str], xattrs: bool = False) -> dict[str, Entry]:
    """Describe every path under ``root`` (``"."`` is root itself), never following symlinks.

    Hardlinks: every non-directory whose inode has more than one name inside the tree gets
    ``link_group`` = the smallest of those names, so groups compare across trees.
    ``xattrs=True`` also records extended attributes (to check that none were carried).
    """
    root = os.fspath(root)
    raw: dict[str, tuple[os.stat_result, str]] = {}

    def visit(rel: str, full: str) -> None:
        raw[rel] = (os.lstat(full), full)

    visit(".", root)
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow links
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            visit(os.path.relpath(full, root), full)

    inodes: dict[tuple[int, int], list[str]] = {}
    for rel, (st, _) in raw.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    group_of = {p: min(names) for names in inodes.values() if len(names) > 1 for p in names}

    out: dict[str, Entry] = {}
    for rel, (st, full) in raw.items():
        kind = next(name for test, name in _TYPES if test(st.st_mode))
        xa = None
        if xattrs:
            xa = _xattrs_of(full)
        out[rel] = Entry(
            type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
            size=st.st_size if kind == "file" else None,
            sha256=_file_sha(full) if kind == "file" else None,
            target=os.readlink(full) if kind == "symlink" else None,
            link_group=group_of.get(rel),
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block")
            else None,
            xattrs=xa)
    return out


def _umount(mnt: str) -> None:
    # A lingering reader (e.g. a just-closed walk) can make umount briefly EBUSY: retry,
    # then detach lazily so the loop device is still freed when the last user goes.
    for _ in range(20):
        if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
            return
        if not os.path.ismount(mnt):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", mnt], capture_output=True)


@contextlib.contextmanager
def mounted_squashfs(sqfs_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Loop-mount a squashfs read-only on a temp dir; unmount and free the loop device after.

    The loop device is attached explicitly (``losetup --find --show --read-only``) rather
    than through ``mount -o loop`` so we know exactly which device to detach, even when
    the mount itself fails.
    """
    sqfs = os.path.abspath(sqfs_path)
    mnt = tempfile.mkdtemp(prefix="sqfs-mnt-")
    loop = None
    try:
        loop = _run(["losetup", "--find", "--show", "--read-only", sqfs], "losetup").stdout.strip()
        _run(["mount", "-t", "squashfs", "-o", "ro,nosuid,nodev", loop, mnt], "mount squashfs")
        try:
            yield Path(mnt)
        finally:
            _umount(mnt)
    finally:
        if loop:
            # Normally freed right away; retry briefly in case the umount was lazy.
            for _ in range(20):
                if subprocess.run(["losetup", "-d", loop], capture_output=True).returncode == 0:
                    break
                if subprocess.run(["losetup", loop], capture_output=True).returncode != 0:
                    break  # already gone
                time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)


def squashfs_tree(sqfs_path: str | os.PathLike[str], xattrs: bool = False) -> dict[str, Entry]:
    """``tree_manifest`` of a squashfs file (loop-mounted read-only, always released)."""
    with mounted_squashfs(sqfs_path) as mnt:
        return tree_manifest(mnt, xattrs=xattrs)


def mksquashfs(src: str | os.PathLike[str], out: str | os.PathLike[str],
               *opts: str) -> Path:
    """``mksquashfs SRC OUT -all-root -no-xattrs -noappend`` (+ ``opts``), as Shifter does."""
    _run(["mksquashfs", os.fspath(src), os.fspath(out), "-all-root", "-no-xattrs", "-noappend",
          "-quiet", "-no-progress", *opts], "mksquashfs")
    return Path(out)


def diff_trees(ours: dict[str, Entry], theirs: dict[str, Entry],
               ignore_owner: bool = False, ignore: Sequence[str] = ()) -> list[str]:
    """Differences between two manifests, one human-readable line each; [] when equal.

    ``ignore_owner`` skips uid/gid; ``ignore`` lists further Entry fields to skip (e.g.
    "mode" for the root). xattrs are compared only when both sides recorded them.
    """
    skip = set(ignore) | ({"uid", "gid"} if ignore_owner else set())
    out: list[str] = []
    for p in sorted(set(ours) | set(theirs)):
        a, b = ours.get(p), theirs.get(p)
        if a is None:
            out.append(f"missing in ours: {p} ({b and b.type})")
            continue
        if b is None:
            out.append(f"extra in ours: {p} ({a.type})")
            continue
        if a.type != b.type:
            out.append(f"{p}: type ours={a.type} theirs={b.type}")
            continue
        for f in fields(Entry):
            if f.name in skip or f.name == "type":
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if f.name == "xattrs" and (va is None or vb is None):
                continue
            if va != vb:
                if f.name == "mode":
                    va, vb = oct(va), oct(vb)
                out.append(f"{p}: {f.name} ours={va} theirs={vb}")
    return out
