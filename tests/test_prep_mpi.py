"""``shifter-prep-mpi`` on Debian's real MPICH (issue 5, docs/behaviour.md, 'Runtime: MPI'): what a
site admin checks of the module it writes, and how it refuses bad input.

Oracles are independent of the tool: ``ldd`` (glibc's own resolver) for which libraries
the MPI needs and where the copies find theirs, ``patchelf --print-rpath`` for the
RUNPATHs, and running a real MPI program on the result.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from world.mpi import MPICH_LIBDIR, build_ring

REPO = Path(__file__).resolve().parents[1]
PREP = REPO / ".venv" / "bin" / "shifter-prep-mpi"
# glibc's libraries and the compiler's unwinder: the image's own, never copied.
SYSTEM = {"linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libdl.so.2",
          "libpthread.so.0", "librt.so.1", "libresolv.so.2", "libgcc_s.so.1"}
MPI_REAL = ("libmpich.so.12.2.2", "libmpichcxx.so.12.2.2", "libmpichfort.so.12.2.2")
# UCX's transport plugins, which it dlopens from next to libucs (not in any ldd output).
UCX_PLUGINS = ("libuct_cma.so.0", "libuct_ib.so.0", "libuct_rdmacm.so.0")


def prep(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
    return subprocess.run([str(PREP), *args], capture_output=True, text=True,
                          env={**full, **(env or {})})


def ldd(path: Path, lib_path: str | None = None) -> dict[str, str]:
    """name -> resolved path (or "not found"), as glibc's loader resolves it here."""
    env = {"PATH": "/usr/bin:/bin"}
    if lib_path is not None:
        env["LD_LIBRARY_PATH"] = lib_path
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env,
                         check=True).stdout
    deps = {}
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            deps[parts[0]] = " ".join(parts[i + 1:i + 3]) if parts[i + 1] == "not" \
                else parts[i + 1]
    return deps


def rpath(path: Path) -> str:
    return subprocess.run(["patchelf", "--print-rpath", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary trees the tool may have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def debian_module(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("prep") / "mpich"
    res = prep("--mpi-lib", str(MPICH_LIBDIR), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out, res


def test_layout_libraries_and_abi_names(debian_module):
    out, _ = debian_module
    lib64 = out / "lib64"
    for real in MPI_REAL:
        assert (lib64 / real).is_file() and not (lib64 / real).is_symlink()
    # Sonames point at the copies; the MPICH-ABI names too (Debian calls them libmpich*).
    links = {p.name: os.readlink(p) for p in lib64.iterdir() if p.is_symlink()}
    assert links == {
        "libmpich.so.12": "libmpich.so.12.2.2", "libmpi.so.12": "libmpich.so.12.2.2",
        "libmpichcxx.so.12": "libmpichcxx.so.12.2.2", "libmpicxx.so.12": "libmpichcxx.so.12.2.2",
        "libmpichfort.so.12": "libmpichfort.so.12.2.2",
        "libmpifort.so.12": "libmpichfort.so.12.2.2",
    }
    # The copy is the site's library, byte for byte but for the RUNPATH patchelf wrote.
    assert (lib64 / "libmpich.so.12.2.2").stat().st_size >= \
        (MPICH_LIBDIR / "libmpich.so.12.2.2").stat().st_size


def test_dependencies_are_the_non_system_closure(debian_module):
    """lib64/dep holds exactly what ldd says the MPI libraries need, minus glibc."""
    out, _ = debian_module
    expected: set[str] = set()
    for real in MPI_REAL:
        expected |= set(ldd(MPICH_LIBDIR / real))
    for plugin in UCX_PLUGINS:
        expected |= set(ldd(MPICH_LIBDIR / "ucx" / plugin))
    expected -= SYSTEM | {"libmpich.so.12", *UCX_PLUGINS}
    assert {"libhwloc.so.15", "libucp.so.0", "libucs.so.0", "libuct.so.0"} <= expected
    assert {p.name for p in (out / "lib64" / "dep").iterdir()} == expected | {"ucx"}


def test_ucx_transport_plugins_sit_next_to_libucs(debian_module):
    """UCX looks for its plugins in ``ucx/`` beside the libucs it was loaded from: without
    them, ranks on one node lose cross-memory attach and talk over TCP (issue 12)."""
    out, _ = debian_module
    plugins = out / "lib64" / "dep" / "ucx"
    assert sorted(p.name for p in plugins.iterdir()) == sorted(UCX_PLUGINS)
    assert rpath(plugins / "libuct_cma.so.0") == "$ORIGIN/.."  # libucs, libuct
    assert rpath(plugins / "libuct_rdmacm.so.0") == "$ORIGIN:$ORIGIN/.."  # + libuct_ib


def test_runpaths_point_inside_the_module(debian_module):
    out, _ = debian_module
    lib64 = out / "lib64"
    assert rpath(lib64 / "libmpich.so.12.2.2") == "$ORIGIN/dep"
    assert rpath(lib64 / "libmpichfort.so.12.2.2") == "$ORIGIN:$ORIGIN/dep"  # + libmpich
    assert rpath(lib64 / "dep" / "libucp.so.0") == "$ORIGIN"
    assert rpath(lib64 / "dep" / "libnuma.so.1") == ""  # needs nothing but glibc
    for path in [*lib64.glob("*.so.*.*"), *(lib64 / "dep").glob("*.so.*"),
                 *(lib64 / "dep" / "ucx").iterdir()]:
        assert not any(d.startswith("/") for d in rpath(path).split(":")), path


def test_every_dependency_resolves_inside_the_module_or_to_glibc(debian_module):
    out, _ = debian_module
    for path in [*(out / "lib64").glob("*.so.*.*"), *(out / "lib64" / "dep").glob("*.so.*"),
                 *(out / "lib64" / "dep" / "ucx").iterdir()]:
        for name, where in ldd(path, lib_path="").items():
            assert where != "not found", (path, name)
            if name in SYSTEM:
                continue
            assert where.startswith(f"{out}/lib64/"), (path, name, where)


def test_a_program_runs_on_the_module(debian_module, tmp_path):
    """ring (linked to a vanilla libmpi.so.12) with only the module's lib64 on
    LD_LIBRARY_PATH: it runs on the module's copy, whose dependencies come from dep/."""
    out, _ = debian_module
    ring, _ = build_ring(tmp_path)
    lib64 = str(out / "lib64")
    res = subprocess.run([str(ring)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": lib64})
    assert res.returncode == 0, res.stderr
    assert f"rank 0 of 1: libmpi {lib64}/libmpich.so.12.2.2\n" in res.stdout
    deps = ldd(ring, lib_path=lib64)
    assert deps["libmpi.so.12"] == f"{lib64}/libmpi.so.12"
    assert deps["libhwloc.so.15"] == f"{lib64}/dep/libhwloc.so.15"


def test_prints_the_conf_lines_and_keeps_them(debian_module):
    out, res = debian_module
    lines = [
        f"# shifter module mpich: site MPI from {MPICH_LIBDIR} (written by shifter-prep-mpi)",
        f"module_mpich_copyPath={out}",
        "module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64",
        "module_mpich_userhook=/opt/udiImage/modules/mpich/bin/check-abi",
        "# load it for every job (users opt out with --module=none):",
        "#defaultModules=mpich",
    ]
    assert res.stdout.splitlines() == lines
    assert (out / "udiRoot.conf.lines").read_text() == res.stdout
    assert os.access(out / "bin" / "check-abi", os.X_OK)
    sources = dict(line.split(" ", 1) for line in (out / "SOURCES").read_text().splitlines())
    assert sources["lib64/libmpich.so.12.2.2"] == f"{MPICH_LIBDIR}/libmpich.so.12.2.2"
    assert sources["lib64/dep/libhwloc.so.15"].endswith("/libhwloc.so.15")
    assert leftovers(out.parent, "mpich") == []


def test_found_through_ldconfig_without_mpi_lib(tmp_path):
    res = prep("--out", str(tmp_path / "m"), "--name", "site-mpi", "--no-userhook",
               "--exclude", "libstdc++.so.*", "--exclude", "libgfortran.so.*")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "lib64" / "libmpi.so.12").is_symlink()
    dep = {p.name for p in (tmp_path / "m" / "lib64" / "dep").iterdir()}
    assert "libhwloc.so.15" in dep and "libstdc++.so.6" not in dep
    assert "libgfortran.so.5" not in dep and "libquadmath.so.0" not in dep  # its only user
    assert not (tmp_path / "m" / "bin").exists()
    assert "module_site-mpi_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/site-mpi/" \
        "lib64" in res.stdout.splitlines()
    assert "userhook" not in res.stdout


def test_one_library_file_and_upstream_names(tmp_path):
    """A library named the upstream way (libmpi.so.12) gets Debian's name as the alias;
    a single file given takes only that library and its closure."""
    _, vanilla = build_ring(tmp_path / "build")
    res = prep("--out", str(tmp_path / "m"), str(vanilla / "libmpi.so.12"))
    assert res.returncode == 0, res.stderr
    lib64 = tmp_path / "m" / "lib64"
    assert sorted(p.name for p in lib64.iterdir()) == \
        ["dep", "libmpi.so.12", "libmpi.so.12.2.2", "libmpich.so.12"]
    assert os.readlink(lib64 / "libmpich.so.12") == "libmpi.so.12.2.2"
    assert "libstdc++.so.6" not in {p.name for p in (lib64 / "dep").iterdir()}


# -- bad input: one clear line, exit 1, nothing written -------------------------------------


def assert_refused(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 1, res
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shifter-prep-mpi: error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_no_mpi_in_the_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = prep("--mpi-lib", str(empty), "--out", str(tmp_path / "m"))
    assert_refused(res, "no MPICH-ABI libmpi", str(empty), "--mpi-lib")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []
    res = prep("--mpi-lib", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"))
    assert_refused(res, str(tmp_path / "nowhere"), "not a directory")


def test_open_mpi_is_refused(tmp_path):
    ompi = tmp_path / "openmpi"
    ompi.mkdir()
    (tmp_path / "f.c").write_text("int f(void) { return 40; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libmpi.so.40", "-o",
                    str(ompi / "libmpi.so.40.30.4"), str(tmp_path / "f.c")], check=True)
    (ompi / "libmpi.so.40").symlink_to("libmpi.so.40.30.4")
    res = prep("--mpi-lib", str(ompi), "--out", str(tmp_path / "m"))
    assert_refused(res, "libmpi.so.40", "not the MPICH ABI", "Open MPI")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []


def test_patchelf_missing(tmp_path):
    res = prep("--out", str(tmp_path / "m"), env={"PATH": str(tmp_path)})
    assert_refused(res, "patchelf is not on PATH", "apt-get install patchelf", "--patchelf")
    res = prep("--out", str(tmp_path / "m"), "--patchelf", str(tmp_path / "nope"))
    assert_refused(res, str(tmp_path / "nope"), "not an executable")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []


def test_output_exists_needs_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old-file").write_text("keep me\n")
    res = prep("--out", str(out))
    assert_refused(res, str(out), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["old-file"]
    res = prep("--out", str(out), "--force")
    assert res.returncode == 0, res.stderr
    assert not (out / "old-file").exists() and (out / "lib64" / "libmpi.so.12").exists()
    assert leftovers(tmp_path, "m") == []
    # An empty directory (made by the admin beforehand) is fine without --force.
    (tmp_path / "e").mkdir()
    assert prep("--out", str(tmp_path / "e")).returncode == 0
    res = prep("--out", str(tmp_path / "no" / "parent"))
    assert_refused(res, str(tmp_path / "no"), "does not exist")


def test_unresolvable_dependency(tmp_path):
    """A libmpi.so.12 needing a library found nowhere: named, with what to do."""
    lib = tmp_path / "mpi"
    lib.mkdir()
    (tmp_path / "gone.c").write_text("int gone(void) { return 1; }\n")
    (tmp_path / "mpi.c").write_text("int gone(void);\nint MPI_Init(void) { return gone(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libgone.so.1", "-o",
                    str(tmp_path / "libgone.so"), str(tmp_path / "gone.c")], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libmpi.so.12", "-o",
                    str(lib / "libmpi.so.12"), str(tmp_path / "mpi.c"), f"-L{tmp_path}",
                    "-lgone"], check=True)
    (tmp_path / "libgone.so").unlink()
    res = prep("--mpi-lib", str(lib), "--out", str(tmp_path / "m"))
    assert_refused(res, "cannot find libgone.so.1", f"needed by {lib}/libmpi.so.12",
                   "--mpi-lib", "--exclude")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []
    # Declared a system library (the image provides it): the module is written.
    res = prep("--mpi-lib", str(lib), "--out", str(tmp_path / "m"), "--exclude", "libgone.*")
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / "m" / "lib64" / "dep").iterdir()) == []


def test_not_an_elf_file(tmp_path):
    text = tmp_path / "libmpi.so.12"
    text.write_text("not a library\n")
    res = prep("--out", str(tmp_path / "m"), str(text))
    assert_refused(res, str(text), "not an ELF shared library")


def test_the_example_configuration_of_the_module(debian_module):
    """etc/udiRoot.conf.example's mpich lines, uncommented, are a valid configuration
    naming what the tool writes, loaded by default and dropped by --module=none."""
    from udiroot.config import parse_text
    from udiroot.modules import select_modules

    out, res = debian_module
    text = (REPO / "etc" / "udiRoot.conf.example").read_text()
    mine = [line[1:] for line in text.splitlines()
            if line.startswith(("#module_mpich_", "#defaultModules="))]
    assert "defaultModules=mpich" in mine
    cfg = parse_text(text + "\n".join(mine) + "\n")
    (module,) = select_modules(cfg)
    assert module.name == "mpich"
    printed = dict(line.split("=", 1) for line in res.stdout.splitlines()
                   if line.startswith("module_"))
    for key in ("siteEnvPrepend", "userhook"):
        assert module.values[key] == printed[f"module_mpich_{key}"]
    assert select_modules(cfg, "none") == []


def test_bind_variant_prints_site_fs_lines(tmp_path):
    out = tmp_path / "m"
    res = prep("--out", str(out), "--bind", "--inside", "/opt/site-mpich")
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stdout.splitlines() if not line.startswith("#")] == [
        f"module_mpich_siteFs={out}:/opt/site-mpich:ro",
        "module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/site-mpich/lib64",
        "module_mpich_userhook=/opt/site-mpich/bin/check-abi",
    ]
    # Default: the same path inside (under /tmp: a path under /var would be refused as a
    # siteFs destination, whatever pytest's basetemp is).
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        n = Path(tmp) / "n"
        res = prep("--out", str(n), "--bind")
        assert f"module_mpich_siteFs={n}:{n}:ro" in res.stdout


@pytest.mark.parametrize("args, words", [
    (["--inside", "/opt/x"], ["--inside is for --bind"]),
    (["--bind", "--inside", "/opt/udiImage/mpich"], ["not under /opt/udiImage"]),
    (["--bind", "--inside", "/etc/mpich"], ["not under /etc"]),
    (["--bind", "--inside", "/opt"], ["a directory of its own"]),
    (["--bind", "--inside", "relative/dir"], ["normalised absolute path"]),
    (["--bind", "--inside", "/opt/a:b"], ["cannot hold ':'"]),
])
def test_bind_destination_is_checked(tmp_path, args, words):
    res = prep("--out", str(tmp_path / "m"), *args)
    assert_refused(res, *words)
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []
