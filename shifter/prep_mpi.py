"""``shifter-prep-mpi``: prepare a site's MPICH-ABI MPI for injection into containers as
a shifter module (docs/behaviour.md, 'Runtime: MPI').

    shifter-prep-mpi --out /opt/shifter/modules/mpich                   # from ldconfig
    shifter-prep-mpi --mpi-lib /opt/cray/pe/mpich/default/ofi/gnu/lib --out DIR
    shifter-prep-mpi --out DIR /usr/lib/x86_64-linux-gnu/libmpich.so.12  # explicit files
    shifter-prep-mpi --out /opt/shifter/modules/mpich --bind --inside /opt/site-mpich

What it writes (``<out>``, built in a temporary sibling and renamed into place, so a
failure leaves nothing half-written)::

    lib64/<real file>          the MPI libraries (``libmpi*.so.*``), copied, RUNPATH rewritten
    lib64/<soname>             -> <real file>
    lib64/libmpi.so.12         -> the MPICH-ABI alias, when the library is named otherwise
                                  (Debian's ``libmpich.so.12``; and libmpich.so.12 for an
                                  upstream ``libmpi.so.12``; likewise ``mpicxx``/``mpifort``)
    lib64/dep/<soname>         every non-system library they need, recursively
    lib64/dep/ucx/<plugin>     UCX's transport plugins (cma, ib, ...) when the MPI uses
                               UCX: UCX loads them from next to libucs, not via ldd
    bin/check-abi              the optional userhook: refuses an image whose MPI is not
                               MPICH-ABI (e.g. Open MPI's ``libmpi.so.40``)
    udiRoot.conf.lines         the configuration lines, also printed on stdout
    SOURCES                    which host file each copied file came from

Copied or bind-mounted: by default the lines use ``copyPath`` (the module is copied into
every container's ``/opt/udiImage/modules/<name>``, a private copy per job; about 50 MiB
for Debian's MPICH, which costs a fresh launch ~25 ms here); ``--bind`` prints ``siteFs``
lines instead, which bind-mount ``<out>`` read-only at ``--inside PATH`` (default: the
same path), with no copy.

RUNPATHs: each copied library gets exactly the module directories its non-system
dependencies landed in, relative to itself (``$ORIGIN``, ``$ORIGIN/dep``, ``$ORIGIN/..``),
or none at all, so inside the container (``/opt/udiImage/modules/<name>``) it finds
its dependencies in the module and never a host path.

"System" libraries are never copied: the image brings its own. By default these are
glibc's (``ld-linux*``, ``libc``, ``libm``, ``libmvec``, ``libpthread``, ``libdl``,
``librt``, ``libresolv``, ``libutil``, ``libanl``, ``libnss_*``, ``libthread_db``,
``libBrokenLocale``) and ``libgcc_s`` (GCC's unwinder, which glibc itself loads from
the image): the ABI swap only works when the image's glibc is at least as new as the
site's, and then these must be the image's, one copy per process. ``--exclude GLOB``
adds names; ``--no-default-excludes`` starts from an empty list.

Dependencies are resolved as the dynamic loader would on the host: the needing
library's own RPATH/RUNPATH (``$ORIGIN`` expanded), ``--mpi-lib`` dirs, then
``$LD_LIBRARY_PATH``, the ``ldconfig`` cache, the default directories; only ELF files of
the same class and machine as the MPI library count. Requires ``patchelf``.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_NAME = "mpich"
MODULES_IN_CONTAINER = "/opt/udiImage/modules"
ABI_VERSION = "12"  # the MPICH ABI initiative: libmpi.so.12, libmpicxx.so.12, libmpifort.so.12
# The ABI names and MPICH's own names for the same library (both ways).
ABI_ALIASES = {
    "libmpi.so.12": "libmpich.so.12",
    "libmpicxx.so.12": "libmpichcxx.so.12",
    "libmpifort.so.12": "libmpichfort.so.12",
}
CORE_SONAMES = ("libmpi.so.12", "libmpich.so.12")
DEFAULT_SYSTEM = (
    "linux-vdso.so.*", "linux-gate.so.*", "ld-linux*.so*", "ld64.so.*", "ld.so.*",
    "libc.so.*", "libm.so.*", "libmvec.so.*", "libpthread.so.*", "libdl.so.*", "librt.so.*",
    "libresolv.so.*", "libutil.so.*", "libanl.so.*", "libnss_*.so.*", "libthread_db.so.*",
    "libBrokenLocale.so.*", "libc_malloc_debug.so.*", "libgcc_s.so.*",
)
DEFAULT_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib")


class PrepError(Exception):
    """A problem with the input or the environment: one line for the user, exit 1."""


# -- ELF ----------------------------------------------------------------------------------


def elf_kind(path: str | Path) -> tuple[int, int, int] | None:
    """``(class, data, machine)`` of an ELF file, None if it is not one (or unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return head[4], head[5], int.from_bytes(head[18:20], order)


@dataclass
class Patchelf:
    exe: str

    def _run(self, *args: str) -> str:
        proc = subprocess.run([self.exe, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PrepError(f"patchelf {' '.join(args)} failed: "
                            f"{proc.stderr.strip() or f'exit {proc.returncode}'}")
        return proc.stdout

    def needed(self, path: Path) -> list[str]:
        return self._run("--print-needed", str(path)).split()

    def soname(self, path: Path) -> str:
        return self._run("--print-soname", str(path)).strip()

    def rpath(self, path: Path) -> str:
        return self._run("--print-rpath", str(path)).strip()

    def set_rpath(self, path: Path, dirs: list[str], *, force_rpath: bool = False) -> None:
        """RUNPATH (or with ``force_rpath`` the older DT_RPATH, which also covers what
        the program's libraries dlopen) to ``dirs``; none when empty."""
        if dirs:
            force = ["--force-rpath"] if force_rpath else []
            self._run(*force, "--set-rpath", ":".join(dirs), str(path))
        else:
            self._run("--remove-rpath", str(path))

    def interpreter(self, path: Path) -> str:
        return self._run("--print-interpreter", str(path)).strip()

    def set_interpreter(self, path: Path, interpreter: str) -> None:
        self._run("--set-interpreter", interpreter, str(path))


# -- finding libraries on the host --------------------------------------------------------


def ldconfig_cache() -> dict[str, list[str]]:
    """soname -> paths, from ``ldconfig -p`` (empty if there is no ldconfig)."""
    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.access(p, os.X_OK)), None)
    if exe is None:
        return {}
    proc = subprocess.run([exe, "-p"], capture_output=True, text=True)
    cache: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines()[1:]:
        name, sep, path = line.strip().partition(" => ")
        if sep:
            cache.setdefault(name.split(" (", 1)[0], []).append(path.strip())
    return cache


@dataclass
class Resolver:
    pe: Patchelf
    kind: tuple[int, int, int]
    first_dirs: list[str]
    cache: dict[str, list[str]]

    def default_dirs(self) -> list[str]:
        dirs = list(DEFAULT_DIRS)
        for pattern in ("/lib/*-linux-gnu*", "/usr/lib/*-linux-gnu*"):
            dirs += sorted(glob.glob(pattern))
        return dirs

    def find(self, name: str, needed_by: Path) -> Path | None:
        """Where the host's loader would find ``name`` for the library ``needed_by``."""
        origin = str(needed_by.parent)
        runpath = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                   for d in self.pe.rpath(needed_by).split(":") if d]
        env = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
        candidates = [os.path.join(d, name) for d in (*runpath, *self.first_dirs, *env)]
        candidates += self.cache.get(name, [])
        candidates += [os.path.join(d, name) for d in self.default_dirs()]
        for cand in candidates:
            if os.path.isfile(cand) and elf_kind(cand) == self.kind:
                return Path(cand)
        return None


def find_patchelf(given: str | None) -> Patchelf:
    exe = given or shutil.which("patchelf")
    if not exe or not os.access(exe, os.X_OK):
        where = f"{given} is not an executable" if given else "patchelf is not on PATH"
        raise PrepError(f"{where}: install patchelf (apt-get install patchelf) "
                        "or name it with --patchelf PATH")
    return Patchelf(exe)


def default_mpi_dir(cache: dict[str, list[str]]) -> str:
    for soname in CORE_SONAMES:
        for path in cache.get(soname, []):
            if elf_kind(path) is not None:
                return os.path.dirname(path)
    raise PrepError("no MPICH-ABI MPI found: neither libmpi.so.12 nor libmpich.so.12 is in "
                    "the ldconfig cache; name the library directory with --mpi-lib DIR")


@dataclass
class MpiLib:
    source: Path  # the real file on the host
    soname: str
    names: list[str]  # symlink names to create next to the copy (soname, ABI alias)


def mpi_libraries(pe: Patchelf, dirs: list[str], files: list[str]) -> list[MpiLib]:
    """The MPI libraries: ``libmpi*.so.<12>[...]`` in ``dirs`` plus the given ``files``."""
    found: dict[Path, str] = {}
    skipped: list[str] = []
    for d in dirs:
        if not os.path.isdir(d):
            raise PrepError(f"--mpi-lib {d}: not a directory")
        for entry in sorted(glob.glob(os.path.join(glob.escape(d), "libmpi*.so.*"))):
            real = Path(os.path.realpath(entry))
            if real in found or elf_kind(real) is None:
                continue
            soname = pe.soname(real) or os.path.basename(entry)
            if soname.rsplit(".so.", 1)[-1].split(".")[0] != ABI_VERSION:
                skipped.append(f"{os.path.basename(entry)} (soname {soname})")
                continue
            found[real] = soname
    for f in files:
        real = Path(os.path.realpath(f))
        if not real.is_file():
            raise PrepError(f"{f}: no such file")
        if elf_kind(real) is None:
            raise PrepError(f"{f}: not an ELF shared library")
        found.setdefault(real, pe.soname(real) or os.path.basename(f))
    if not any(s in CORE_SONAMES for s in found.values()):
        where = ", ".join(dirs + files)
        if skipped:
            raise PrepError(f"no MPICH-ABI libmpi in {where}: found only {', '.join(skipped)}, "
                            "not the MPICH ABI (libmpi.so.12 / libmpich.so.12); Open MPI "
                            "cannot be swapped in for MPICH")
        raise PrepError(f"no MPICH-ABI libmpi (libmpi.so.12 or libmpich.so.12) in {where}; "
                        "name the MPI library directory with --mpi-lib DIR")
    libs = []
    sonames = set(found.values())
    for real, soname in sorted(found.items(), key=lambda kv: kv[1]):
        names = [soname] if soname != real.name else []
        for a, b in ABI_ALIASES.items():
            for mine, other in ((a, b), (b, a)):
                if soname == mine and other not in sonames:
                    names.append(other)
        libs.append(MpiLib(real, soname, names))
    return libs


# -- building the module ------------------------------------------------------------------


@dataclass
class Module:
    root: Path  # where it is being built
    sources: list[tuple[str, Path]] = field(default_factory=list)  # (rel, host file)
    deps: dict[str, str] = field(default_factory=dict)  # soname -> rel path in the module
    needs: dict[str, list[str]] = field(default_factory=dict)  # rel -> non-system needed


def is_system(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def build(root: Path, libs: list[MpiLib], pe: Patchelf, resolver: Resolver,
          system: list[str]) -> Module:
    mod = Module(root)
    (root / "lib64" / "dep").mkdir(parents=True)
    queue: list[tuple[str, Path]] = []  # (rel path of the copy, host file it came from)
    for lib in libs:
        rel = f"lib64/{lib.source.name}"
        copy_lib(lib.source, root / rel)
        mod.sources.append((rel, lib.source))
        mod.deps[lib.source.name] = rel
        for name in lib.names:
            (root / "lib64" / name).symlink_to(lib.source.name)
            mod.deps[name] = rel
        queue.append((rel, lib.source))
    while queue:
        rel, source = queue.pop(0)
        mine: list[str] = []
        for name in pe.needed(root / rel):
            if is_system(name, system):
                continue
            mine.append(name)
            if name in mod.deps:
                continue
            found = resolver.find(name, source)
            if found is None:
                raise PrepError(f"cannot find {name}, needed by {source}: add its directory "
                                "with --mpi-lib DIR or LD_LIBRARY_PATH, or treat it as a "
                                f"system library with --exclude '{name}'")
            dep_rel = f"lib64/dep/{name}"
            copy_lib(Path(os.path.realpath(found)), root / dep_rel)
            mod.sources.append((dep_rel, found))
            mod.deps[name] = dep_rel
            queue.append((dep_rel, Path(os.path.realpath(found))))
            if fnmatch.fnmatchcase(name, "libucs.so.*"):
                queue += ucx_plugins(root, found, mod)
        mod.needs[rel] = mine
    for rel, names in mod.needs.items():
        here = (root / rel).parent
        dirs: list[str] = []
        for name in names:
            there = (root / mod.deps[name]).parent
            rp = os.path.relpath(there, here)
            d = "$ORIGIN" if rp == "." else f"$ORIGIN/{rp}"
            if d not in dirs:
                dirs.append(d)
        order = {"$ORIGIN": 0, "$ORIGIN/dep": 1, "$ORIGIN/..": 2}
        dirs.sort(key=lambda d: order.get(d, 3))
        pe.set_rpath(root / rel, dirs)
        if pe.rpath(root / rel) != ":".join(dirs):
            raise PrepError(f"patchelf did not set the RUNPATH of {rel}")
    return mod


def ucx_plugins(root: Path, libucs: Path, mod: Module) -> list[tuple[str, Path]]:
    """Copy UCX's transport plugins (``libuct_cma.so.0``, ...) into ``lib64/dep/ucx``.

    UCX dlopens them at run time from the directory ``ucx`` next to the ``libucs`` it was
    loaded from (and from its compiled-in module dir, a host path that the image does not
    have). Without them UCX inside the container has only its built-in transports:
    no cross-memory attach, so ranks on one node talk through TCP (much slower than bare,
    and with many ranks per node it runs out of connections). Returns the copies, to be
    scanned for their own dependencies like any other library."""
    plugin_dir = libucs.parent / "ucx"
    copied: list[tuple[str, Path]] = []
    if not plugin_dir.is_dir():
        return copied
    (root / "lib64" / "dep" / "ucx").mkdir(exist_ok=True)
    for entry in sorted(plugin_dir.glob("lib*.so.*")):
        real = Path(os.path.realpath(entry))
        # The loader opens lib<name>.so.<major>: take each once, by that name.
        if entry.name.count(".so.") != 1 or "." in entry.name.split(".so.", 1)[1]:
            continue
        if not real.is_file() or elf_kind(real) != elf_kind(libucs):
            continue
        rel = f"lib64/dep/ucx/{entry.name}"
        copy_lib(real, root / rel)
        mod.sources.append((rel, entry))
        mod.deps[entry.name] = rel  # one plugin may need another (rdmacm needs ib)
        copied.append((rel, real))
    return copied


def copy_lib(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o755)


CHECK_ABI = r"""#!/bin/sh
# check-abi: the userhook of the shifter module "@NAME@" (written by shifter-prep-mpi).
# It runs as the user inside the container, before the command. The module puts the
# site's MPICH-ABI libmpi.so.12 first on LD_LIBRARY_PATH; an image whose own MPI has
# another ABI (Open MPI's libmpi.so.40, ...) cannot run on it, so refuse that image here
# with a clear message instead of letting the application crash. An image without any
# MPI library passes (the module does no harm to it).
good=""
bad=""
dirs="/lib /lib64 /usr/lib /usr/lib64 /usr/local/lib /usr/local/lib64"
for d in /lib/*-linux-gnu* /usr/lib/*-linux-gnu* /usr/local/lib/*-linux-gnu*; do
    dirs="$dirs $d"
done
for f in /etc/ld.so.conf /etc/ld.so.conf.d/*.conf; do
    [ -r "$f" ] || continue
    while read -r line rest; do
        case "$line" in /*) dirs="$dirs $line" ;; esac
    done < "$f"
done
oldifs=$IFS
IFS=:
for d in $LD_LIBRARY_PATH; do
    dirs="$dirs $d"
done
IFS=$oldifs
for d in $dirs; do
    case "$d" in @INSIDE@ | @INSIDE@/*) continue ;; esac
    [ -d "$d" ] || continue
    for f in "$d"/libmpi.so.* "$d"/libmpich.so.*; do
        [ -e "$f" ] || continue
        case "${f##*/}" in
            libmpi.so.12 | libmpi.so.12.* | libmpich.so.12 | libmpich.so.12.*) good=$f ;;
            *.so.*.*) [ -n "$bad" ] || bad=$f ;;  # a fully versioned name: its soname link
            *) case "$bad" in "" | *.so.*.*) bad=$f ;; esac ;;  # is the better one to name
        esac
    done
done
if [ -n "$bad" ] && [ -z "$good" ]; then
    echo "shifter module @NAME@: this image's MPI is not MPICH-ABI compatible: it has" \
        "$bad, the module provides libmpi.so.12; run with --module=none to use the" \
        "image's own MPI" >&2
    exit 1
fi
exit 0
"""


def conf_lines(name: str, out: Path, inside: str | None, userhook: bool, origin: str) -> str:
    """The module's udiRoot.conf lines: copied (copyPath) when ``inside`` is None, else
    bind-mounted read-only at ``inside`` (siteFs)."""
    lines = [f"# shifter module {name}: site MPI from {origin} (written by shifter-prep-mpi)"]
    if inside is None:
        inside = f"{MODULES_IN_CONTAINER}/{name}"
        lines.append(f"module_{name}_copyPath={out}")
    else:
        lines.append(f"module_{name}_siteFs={out}:{inside}:ro")
    lines.append(f"module_{name}_siteEnvPrepend=LD_LIBRARY_PATH={inside}/lib64")
    if userhook:
        lines.append(f"module_{name}_userhook={inside}/bin/check-abi")
    lines.append("# load it for every job (users opt out with --module=none):")
    lines.append(f"#defaultModules={name}")
    return "\n".join(lines) + "\n"


def make_tree_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode & 0o777 | 0o444)


def check_inside(inside: str, out: Path) -> str:
    """Where a bind-mounted module appears in the container: a siteFs destination."""
    if any(c in f"{out}{inside}" for c in ":;\"") or any(c.isspace() for c in f"{out}{inside}"):
        raise PrepError(f"--bind: {out} -> {inside}: a siteFs path cannot hold ':', ';', '\"' "
                        "or blanks; pick other paths")
    norm = os.path.normpath(inside)
    if not inside.startswith("/") or ".." in inside.split("/") or norm != inside.rstrip("/"):
        raise PrepError(f"--inside {inside}: must be a normalised absolute path")
    for top in ("/opt/udiImage", "/etc", "/var", "/proc", "/sys", "/dev"):
        if norm == top or norm.startswith(top + "/"):
            raise PrepError(f"--inside {inside}: not under {top} (the runtime owns it); "
                            "pick e.g. /opt/site-mpich")
    if norm in ("/", "/opt", "/tmp"):
        raise PrepError(f"--inside {inside}: pick a directory of its own, e.g. /opt/site-mpich")
    return norm


def check_out(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PrepError(f"{out} exists and is not a directory: pick another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PrepError(f"{out} exists and is not empty: pick a new directory or pass "
                        "--force to replace it")
    if not out.parent.is_dir():
        raise PrepError(f"{out.parent} does not exist: create it first")


def install(tmp: Path, out: Path) -> None:
    """Put the finished tree at ``out`` by rename; an old one is replaced, then removed."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "tree")
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(out: Path, *, name: str = DEFAULT_NAME, mpi_dirs: list[str] | None = None,
            files: list[str] | None = None, system: list[str] | None = None,
            userhook: bool = True, force: bool = False, patchelf: str | None = None,
            bind: bool = False, inside: str | None = None, log: bool = True) -> str:
    """Build the module directory ``out``; returns the udiRoot.conf lines. ``bind``: the
    module is to be bind-mounted (siteFs) at ``inside`` (default: ``out``'s own path)
    rather than copied into every container."""
    if not name or any(not (c.isalnum() or c in "_.+-") for c in name) or len(name) > 64:
        raise PrepError(f"--name {name!r}: module names are [A-Za-z0-9_.+-], at most 64 bytes")
    out = Path(os.path.abspath(out))
    if inside is not None and not bind:
        raise PrepError("--inside is for --bind: a copied module is always at "
                        f"{MODULES_IN_CONTAINER}/<name>")
    if bind:
        inside = check_inside(inside or str(out), out)
    check_out(out, force)
    pe = find_patchelf(patchelf)
    resolver = Resolver(pe, (0, 0, 0), [], ldconfig_cache())
    dirs = list(mpi_dirs or [])
    if not dirs and not files:
        dirs = [default_mpi_dir(resolver.cache)]
    libs = mpi_libraries(pe, dirs, list(files or []))
    core = next(lib for lib in libs if lib.soname in CORE_SONAMES)
    kind = elf_kind(core.source)
    assert kind is not None
    resolver.kind = kind
    resolver.first_dirs = dirs + sorted({str(lib.source.parent) for lib in libs})
    patterns = list(DEFAULT_SYSTEM if system is None else system)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        mod = build(tmp, libs, pe, resolver, patterns)
        text = conf_lines(name, out, inside, userhook, str(core.source.parent))
        if userhook:
            (tmp / "bin").mkdir()
            hook = tmp / "bin" / "check-abi"
            hook.write_text(CHECK_ABI.replace("@NAME@", name)
                            .replace("@INSIDE@", inside or f"{MODULES_IN_CONTAINER}/{name}"))
            os.chmod(hook, 0o755)
        (tmp / "udiRoot.conf.lines").write_text(text)
        (tmp / "SOURCES").write_text("".join(f"{rel} {src}\n" for rel, src in mod.sources))
        make_tree_readable(tmp)
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        n_dep = sum(1 for rel, _ in mod.sources if rel.startswith("lib64/dep/"))
        print(f"shifter-prep-mpi: {out}: {len(libs)} MPI libraries "
              f"({', '.join(lib.soname for lib in libs)}), {n_dep} dependencies in lib64/dep",
              file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> int:
    from shifter import __version__

    ap = argparse.ArgumentParser(
        prog="shifter-prep-mpi",
        description="Prepare a site's MPICH-ABI MPI (libmpi.so.12) as a shifter module: "
                    "copy the libraries and their non-system dependencies, rewrite their "
                    "RUNPATHs, print the udiRoot.conf lines.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("libraries", nargs="*", metavar="LIBRARY",
                    help="MPI library files to take (in addition to --mpi-lib dirs)")
    ap.add_argument("-o", "--out", required=True,
                    help="module directory to write (the module's copyPath)")
    ap.add_argument("--mpi-lib", action="append", default=[], metavar="DIR",
                    help="directory holding libmpi*.so.12 (repeatable; default: where the "
                         "ldconfig cache has libmpi.so.12 or libmpich.so.12)")
    ap.add_argument("--name", default=DEFAULT_NAME,
                    help=f"module name, for the conf lines and paths (default {DEFAULT_NAME})")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="also treat libraries matching GLOB (a soname, e.g. 'libstdc++.so.*')"
                         " as system libraries the image provides; repeatable")
    ap.add_argument("--no-default-excludes", action="store_true",
                    help="do not treat glibc's libraries and libgcc_s as system libraries")
    ap.add_argument("--no-userhook", action="store_true",
                    help="do not write the bin/check-abi userhook")
    ap.add_argument("--bind", action="store_true",
                    help="print siteFs lines that bind-mount the module read-only into the "
                         "container instead of copyPath (no copy per launch)")
    ap.add_argument("--inside", metavar="PATH",
                    help="with --bind: where the module appears in the container "
                         "(default: --out's own path)")
    ap.add_argument("--force", action="store_true",
                    help="replace --out if it exists and is not empty")
    ap.add_argument("--patchelf", default=None, help="patchelf to use (default: from PATH)")
    args = ap.parse_args(argv)
    system = ([] if args.no_default_excludes else list(DEFAULT_SYSTEM)) + args.exclude
    try:
        text = prepare(Path(args.out), name=args.name, mpi_dirs=args.mpi_lib,
                       files=args.libraries, system=system, userhook=not args.no_userhook,
                       force=args.force, patchelf=args.patchelf, bind=args.bind,
                       inside=args.inside)
    except PrepError as e:
        print(f"shifter-prep-mpi: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"shifter-prep-mpi: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
