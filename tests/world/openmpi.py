"""An Open MPI image for tests: Debian's Open MPI 4.1.4 (``libopenmpi3``, its external
PMIx ``libpmix2``) as the distribution installed it, with ``ring`` built by its ``mpicc``.

    tree, ring = openmpi_tree(work / "root", work / "build")   # then mksquashfs(tree, …)

The tree is what an image built ``FROM debian`` with ``apt-get install openmpi-bin``
carries for running an MPI program: every file of the Open MPI and PMIx runtime packages
(libraries, the MCA components Open MPI and PMIx load with ``dlopen``, help texts,
``/etc/openmpi``), the shared libraries all of those need (their ``ldd`` closure, glibc
included) and an ``ld.so.cache`` made for the tree by ``ldconfig -r``; busybox for a
shell. ``ring`` (``world.mpi.RING_C``) lives in ``/opt/app`` and links to
``libmpi.so.40``: Open MPI's ABI, which the MPICH module does not replace, so the
program runs on the image's own MPI and reaches Slurm's PMIx server through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .mpi import RING_C
from .runtime import busybox_tree

PACKAGES = ("libopenmpi3", "openmpi-common", "openmpi-bin", "libpmix2")
MPICC = "mpicc.openmpi"
LIBMPI = "/usr/lib/x86_64-linux-gnu/libmpi.so.40.30.4"  # Debian's, as mapped in the image
SKIP = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/lintian/", "/usr/bin/")


def _package_files(package: str) -> list[str]:
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    return [p for p in out if p.startswith("/") and not p.startswith(SKIP)]


def _place(root: Path, host: str) -> None:
    """Copy host path ``host`` (a file or a symlink, not followed) to the same path in
    ``root``; ``/lib…`` is written under ``usr/`` (merged /usr, as Debian's images)."""
    rel = host.lstrip("/")
    if rel.startswith(("lib/", "lib64/")):
        rel = "usr/" + rel
    dest = root / rel
    if dest.exists() or dest.is_symlink():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(host):
        dest.symlink_to(os.readlink(host))
    elif os.path.isfile(host):
        shutil.copyfile(host, dest)
        os.chmod(dest, os.stat(host).st_mode & 0o755)


def _place_chain(root: Path, host: str) -> None:
    """``host`` and every link on the way to its file (Debian's alternatives included:
    ``libpsm_infinipath.so.1`` -> ``/etc/alternatives/…`` -> the library)."""
    for _ in range(40):
        _place(root, host)
        if not os.path.islink(host):
            return
        host = os.path.normpath(os.path.join(os.path.dirname(host), os.readlink(host)))


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _closure(root: Path, elves: list[Path]) -> None:
    """Every library ``elves`` need (host ``ldd``), placed in ``root`` with its links."""
    seen: set[str] = set()
    todo = list(elves)
    while todo:
        elf = todo.pop()
        res = subprocess.run(["ldd", str(elf)], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"})
        for line in res.stdout.splitlines():
            parts = line.split()
            if "=>" in parts:
                path = parts[parts.index("=>") + 1]
            elif parts and parts[0].startswith("/"):
                path = parts[0]  # the ELF interpreter
            else:
                continue
            if path == "not":
                raise RuntimeError(f"ldd {elf}: {line.strip()}")
            if path in seen:
                continue
            seen.add(path)
            _place_chain(root, path)
            todo.append(Path(os.path.realpath(path)))


def openmpi_tree(root: Path, build: Path) -> tuple[Path, Path]:
    """The image tree (``root``) and the ``ring`` program built in ``build``."""
    build.mkdir(parents=True, exist_ok=True)
    (build / "ring.c").write_text(RING_C)
    subprocess.run([MPICC, "-O1", "-o", str(build / "ring"), str(build / "ring.c")],
                   check=True)
    busybox_tree(root)
    (root / "lib").symlink_to("usr/lib")
    (root / "lib64").symlink_to("usr/lib64")
    for package in PACKAGES:
        for path in _package_files(package):
            if not os.path.isdir(path) or os.path.islink(path):
                _place(root, path)
    (root / "opt/app").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(build / "ring", root / "opt/app/ring")
    os.chmod(root / "opt/app/ring", 0o755)
    elves = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
             and _is_elf(p) and p.name != "busybox"]
    _closure(root, elves)
    (root / "etc/ld.so.conf").write_text("/usr/local/lib\n/usr/lib/x86_64-linux-gnu\n")
    subprocess.run(["ldconfig", "-r", str(root)], check=True)
    return root, build / "ring"
