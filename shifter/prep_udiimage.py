"""``shifter-prep-udiimage``: build the site's ``optUdiImage`` tree, the directory the
runtime copies into every container as ``/opt/udiImage`` (behaviour spec §6.6 step 5.9),
with the OpenSSH programs of the per-container sshd (§6.15).

    shifter-prep-udiimage --out /opt/shifter/udiImage          # make install runs this
    shifter-prep-udiimage --out DIR --force                    # replace an existing tree

What it writes (built in a temporary sibling and renamed into place, so a failure leaves
nothing half-written; ``--force`` replaces a whole existing tree)::

    sbin/sshd          the host's sshd (Debian's openssh-server), patched (below)
    libexec/ssh        the host's ssh client, patched
    bin/ssh            #!/bin/sh wrapper: libexec/ssh -F /opt/udiImage/etc/ssh_config
    lib/<soname>       every library they load, glibc and its loader included, plus
                       glibc's NSS modules files, compat, dns (dlopen'ed for getpwnam)
    SOURCES            which host file each copied file came from

The programs must run in any image, even one without a libc (a static busybox): each
gets ``/opt/udiImage/lib/ld-linux-x86-64.so.2`` as its ELF interpreter and
``/opt/udiImage/lib`` as its DT_RPATH (``patchelf --force-rpath``; unlike RUNPATH it
also applies to what the libraries load themselves, e.g. glibc's NSS modules), so
nothing of the image's own libraries is ever mixed in. The libraries are copied
unchanged. ``etc/`` is filled per container by ``setupRoot -s`` (host keys,
``sshd_config``, ``authorized_keys``, ``ssh_config``); ``ssh-keygen`` runs on the host.

Dependencies are found as the host's loader finds them (``shifter.prep_mpi``'s
resolver: RUNPATH, ``ldconfig`` cache, default directories). Requires ``patchelf``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from shifter.prep_mpi import (
    Patchelf,
    PrepError,
    Resolver,
    check_out,
    elf_kind,
    find_patchelf,
    install,
    ldconfig_cache,
    make_tree_readable,
)

INSIDE = "/opt/udiImage"  # where the tree appears in every container
LIB = f"{INSIDE}/lib"
SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
# glibc's NSS modules a getpwnam in an image may dlopen (nsswitch "files", "compat",
# "dns"); libnss_files is a stub since glibc 2.34 but an old nsswitch.conf names it.
NSS_MODULES = ("libnss_files.so.2", "libnss_compat.so.2", "libnss_dns.so.2")
SSH_WRAPPER = f"""#!/bin/sh
# ssh with the container's client configuration (written by shifter-prep-udiimage):
# port 1204, the per-container sshd of every node of the job (setupRoot -s).
exec {INSIDE}/libexec/ssh -F {INSIDE}/etc/ssh_config "$@"
"""


class Tree:
    """The tree being built at ``root``: programs and the library closure."""

    def __init__(self, root: Path, pe: Patchelf, resolver: Resolver) -> None:
        self.root = root
        self.pe = pe
        self.resolver = resolver
        self.libs: dict[str, Path] = {}  # soname -> host file it came from
        self.sources: list[tuple[str, Path]] = []
        (root / "lib").mkdir(parents=True)

    def add_program(self, source: Path, rel: str) -> None:
        interp = self.pe.interpreter(source)
        if not interp:
            raise PrepError(f"{source} has no ELF interpreter (a static program needs no "
                            "preparation)")
        self._copy(Path(interp), f"lib/{os.path.basename(interp)}", lib_name=True)
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dst)
        os.chmod(dst, 0o755)
        self.sources.append((rel, source))
        self._closure(source, dst)
        self.pe.set_interpreter(dst, f"{LIB}/{os.path.basename(interp)}")
        self.pe.set_rpath(dst, [LIB], force_rpath=True)
        if self.pe.interpreter(dst) != f"{LIB}/{os.path.basename(interp)}" or \
                self.pe.rpath(dst) != LIB:
            raise PrepError(f"patchelf did not set the interpreter and RPATH of {rel}")

    def add_library(self, soname: str, needed_by: Path, optional: bool = False) -> None:
        if soname in self.libs:
            return
        found = self.resolver.find(soname, needed_by)
        if found is None:
            if optional:
                return
            raise PrepError(f"cannot find {soname}, needed by {needed_by}")
        real = Path(os.path.realpath(found))
        self._copy(real, f"lib/{soname}", lib_name=True)
        self.libs[soname] = real
        self._closure(real, self.root / "lib" / soname)

    def _copy(self, source: Path, rel: str, lib_name: bool = False) -> None:
        dst = self.root / rel
        if dst.exists():
            return
        shutil.copyfile(os.path.realpath(source), dst)
        os.chmod(dst, 0o755)
        self.sources.append((rel, source))
        if lib_name:
            self.libs.setdefault(os.path.basename(rel), source)

    def _closure(self, source: Path, copy: Path) -> None:
        for name in self.pe.needed(copy):
            self.add_library(name, source)
        if self.pe.rpath(copy):
            self.pe.set_rpath(copy, [])  # a host path must never be searched in an image


def prepare(out: Path, *, sshd: str = SSHD, ssh: str = SSH, force: bool = False,
            patchelf: str | None = None, log: bool = True) -> None:
    out = Path(os.path.abspath(out))
    check_out(out, force)
    for prog in (sshd, ssh):
        if not os.path.isfile(prog) or not os.access(prog, os.X_OK):
            raise PrepError(f"{prog} is missing: apt-get install openssh-server "
                            "openssh-client")
    kind = elf_kind(sshd)
    if kind is None:
        raise PrepError(f"{sshd} is not an ELF program")
    pe = find_patchelf(patchelf)
    resolver = Resolver(pe, kind, [], ldconfig_cache())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tree = Tree(tmp, pe, resolver)
        tree.add_program(Path(sshd), "sbin/sshd")
        tree.add_program(Path(ssh), "libexec/ssh")
        for name in NSS_MODULES:
            tree.add_library(name, Path(sshd), optional=True)
        (tmp / "bin").mkdir()
        (tmp / "bin" / "ssh").write_text(SSH_WRAPPER)
        (tmp / "SOURCES").write_text("".join(f"{rel} {src}\n" for rel, src in tree.sources))
        make_tree_readable(tmp)
        os.chmod(tmp / "bin" / "ssh", 0o755)
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"shifter-prep-udiimage: {out}: sshd, ssh and {len(tree.libs)} libraries "
              f"({size / 1e6:.1f} MB)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from shifter import __version__

    ap = argparse.ArgumentParser(
        prog="shifter-prep-udiimage",
        description="Build the optUdiImage tree (copied into every container as "
                    "/opt/udiImage) with the host's sshd and ssh, runnable in any image.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("-o", "--out", required=True,
                    help="the tree to write (udiRoot.conf's optUdiImage)")
    ap.add_argument("--sshd", default=SSHD, help=f"sshd to inject (default {SSHD})")
    ap.add_argument("--ssh", default=SSH, help=f"ssh client to inject (default {SSH})")
    ap.add_argument("--force", action="store_true",
                    help="replace --out if it exists and is not empty")
    ap.add_argument("--patchelf", default=None, help="patchelf to use (default: from PATH)")
    args = ap.parse_args(argv)
    try:
        prepare(Path(args.out), sshd=args.sshd, ssh=args.ssh, force=args.force,
                patchelf=args.patchelf)
    except (PrepError, OSError) as e:
        print(f"shifter-prep-udiimage: error: {e}", file=sys.stderr)
        return 1
    print(f"optUdiImage={os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
