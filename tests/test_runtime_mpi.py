"""The MPI ABI swap end to end (behaviour spec §6.12, issue 5): Debian's real MPICH,
prepared by ``shifter-prep-mpi`` as the site's ``mpich`` module, injected into an image
whose application links to its own vanilla ``libmpi.so.12``.

The application (``ring``, built here) prints, per rank, the file its ``MPI_Init`` was
mapped from (``/proc/self/maps``): the site's copy lives under
``/opt/udiImage/modules/mpich/lib64``, the image's under ``/usr/lib/x86_64-linux-gnu``,
so the path tells which library ran even though both are Debian's MPICH 4.0.2. The
two-rank run is a real ``mpiexec`` (hydra) on the host, as the unprivileged user,
launching two ``shifter`` containers that exchange a token over MPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from world.runtime import RuntimeSite, add_dynamic_program, busybox_tree, mksquashfs

ALICE = "shifter-alice"
REPO = Path(__file__).resolve().parents[1]
PREP = REPO / ".venv" / "bin" / "shifter-prep-mpi"
MPICH_LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
MPICH_INCLUDE = "/usr/include/x86_64-linux-gnu/mpich"
MODULE = "/opt/udiImage/modules/mpich"
SITE_LIB = f"{MODULE}/lib64/libmpich.so.12.2.2"  # the site's real file, as mapped
IMAGE_LIB = "/usr/lib/x86_64-linux-gnu/libmpi.so.12.2.2"  # the image's own

RING_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* The file MPI_Init was mapped from: its /proc/self/maps line. */
static void mapped_file(void *addr, char *out, size_t n)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4608];
    snprintf(out, n, "?");
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        uintptr_t lo, hi;
        int off = 0;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &lo, &hi, &off) < 2 || off == 0)
            continue;
        if ((uintptr_t)addr >= lo && (uintptr_t)addr < hi) {
            line[strcspn(line, "\n")] = '\0';
            snprintf(out, n, "%s", line + off);
            break;
        }
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    int rank, size, token = 1;
    char lib[4096];

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    mapped_file(dlsym(RTLD_DEFAULT, "MPI_Init"), lib, sizeof lib);
    printf("rank %d of %d: libmpi %s\n", rank, size, lib);
    fflush(stdout);
    /* The token goes 0 -> 1 -> ... -> 0; rank r appends the digit r+1. */
    if (size > 1) {
        if (rank == 0) {
            MPI_Send(&token, 1, MPI_INT, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(&token, 1, MPI_INT, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(&token, 1, MPI_INT, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            token = token * 10 + rank + 1;
            MPI_Send(&token, 1, MPI_INT, (rank + 1) % size, 0, MPI_COMM_WORLD);
        }
    }
    if (rank == 0)
        printf("ring: token %d after %d ranks\n", token, size);
    MPI_Finalize();
    return 0;
}
"""


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    base = Path(tmp_path_factory.mktemp("runtime-mpi", numbered=True))
    for d in (base.parent.parent, base.parent, base):
        os.chmod(d, 0o755)
    site = RuntimeSite.create(base / "site")
    yield site
    assert site.our_mounts() == [] and site.our_loops() == []


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> tuple[Path, Path]:
    """``ring`` linked against a vanilla ``libmpi.so.12`` (MPICH's upstream name; Debian
    calls its copy ``libmpich.so.12``): (program, directory of that libmpi)."""
    build = tmp_path_factory.mktemp("ring")
    vanilla = build / "vanilla"
    vanilla.mkdir()
    shutil.copyfile(MPICH_LIBDIR / "libmpich.so.12.2.2", vanilla / "libmpi.so.12.2.2")
    subprocess.run(["patchelf", "--set-soname", "libmpi.so.12",
                    str(vanilla / "libmpi.so.12.2.2")], check=True)
    (vanilla / "libmpi.so.12").symlink_to("libmpi.so.12.2.2")
    (vanilla / "libmpi.so").symlink_to("libmpi.so.12")
    (build / "ring.c").write_text(RING_C)
    subprocess.run(["gcc", "-O1", f"-I{MPICH_INCLUDE}", "-o", str(build / "ring"),
                    str(build / "ring.c"), f"-L{vanilla}", "-lmpi"], check=True)
    needed = subprocess.run(["patchelf", "--print-needed", str(build / "ring")],
                            capture_output=True, text=True, check=True).stdout.split()
    assert "libmpi.so.12" in needed and "libmpich.so.12" not in needed
    return build / "ring", vanilla


@pytest.fixture(scope="module")
def mpi_image(site, ring, tmp_path_factory) -> str:
    """busybox + /opt/app/ring + its whole ldd closure (its own libmpi.so.12, glibc...)."""
    program, vanilla = ring
    tree = busybox_tree(tmp_path_factory.mktemp("mpitree") / "root")
    libs = add_dynamic_program(tree, program, "/opt/app/ring", lib_path=str(vanilla))
    assert "/usr/lib/x86_64-linux-gnu/libmpi.so.12" in libs
    assert "/usr/lib64/ld-linux-x86-64.so.2" in libs
    sqfs = mksquashfs(tree, tmp_path_factory.mktemp("mpisqfs") / "mpi.squashfs")
    return site.add_image(sqfs, "WORKDIR: /opt/app\n")


@pytest.fixture(scope="module")
def openmpi_image(site, tmp_path_factory) -> str:
    """An image whose MPI is Open MPI's ABI: a (fake) ``libmpi.so.40`` and no .12."""
    work = tmp_path_factory.mktemp("ompi")
    tree = busybox_tree(work / "root")
    libdir = tree / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    (work / "fake.c").write_text("int ompi_fake(void) { return 40; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libmpi.so.40", "-o",
                    str(libdir / "libmpi.so.40.30.4"), str(work / "fake.c")], check=True)
    (libdir / "libmpi.so.40").symlink_to("libmpi.so.40.30.4")
    sqfs = mksquashfs(tree, work / "ompi.squashfs")
    return site.add_image(sqfs)


@pytest.fixture(scope="module")
def plain_image(site, tmp_path_factory) -> str:
    tree = busybox_tree(tmp_path_factory.mktemp("plaintree") / "root")
    return site.add_image(mksquashfs(tree, tmp_path_factory.mktemp("plainsqfs") / "p.sqfs"))


@pytest.fixture(scope="module")
def module_dir(site) -> tuple[Path, str]:
    """The site's MPI prepared the way an admin does it: (module dir, printed conf lines)."""
    out = site.base / "modules" / "mpich"
    out.parent.mkdir()
    os.chmod(out.parent, 0o755)
    res = subprocess.run([str(PREP), "--mpi-lib", str(MPICH_LIBDIR), "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out, res.stdout


def mpich_conf(module_dir: tuple[Path, str], **extra: str) -> dict[str, str]:
    """The printed ``module_mpich_*`` lines, as keyword arguments for ``write_conf``."""
    conf = {}
    for line in module_dir[1].splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            conf[key] = value
    assert set(conf) == {"module_mpich_copyPath", "module_mpich_siteEnvPrepend",
                         "module_mpich_userhook"}
    return {**conf, **extra}


@pytest.fixture(autouse=True)
def clean_conf(site):
    site.write_conf()
    yield
    site.write_conf()
    assert site.our_mounts() == [], "a mount of ours is left in the root namespace"
    assert site.our_loops() == [], "a loop device of ours is left"


def libmpi_of(stdout: str) -> dict[int, str]:
    """rank -> the libmpi file it ran on, from ring's output."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("rank "):
            head, lib = line.split(": libmpi ", 1)
            out[int(head.split()[1])] = lib
    return out


# -- one rank: which library the application runs on ----------------------------------------


def test_default_module_runs_the_application_on_the_sites_mpi(site, mpi_image, module_dir):
    site.write_conf(**mpich_conf(module_dir, defaultModules="mpich"))
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "--workdir=/opt/app", "./ring")
    assert res.returncode == 0, res.stderr
    assert libmpi_of(res.stdout) == {0: SITE_LIB}
    assert "ring: token 1 after 1 ranks" in res.stdout
    # What the module put in place, seen from inside: the ABI name is a link to the
    # site's file, and its dependencies come from the module too.
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "sh", "-c",
                       f"readlink {MODULE}/lib64/libmpi.so.12; echo $LD_LIBRARY_PATH; "
                       f"ls {MODULE}/lib64/dep")
    assert res.returncode == 0, res.stderr
    link, ld_path, *deps = res.stdout.split()
    assert (link, ld_path) == ("libmpich.so.12.2.2", f"{MODULE}/lib64")
    assert {"libhwloc.so.15", "libucp.so.0", "libucs.so.0"} <= set(deps)


def test_without_the_module_the_application_runs_on_the_images_mpi(site, mpi_image,
                                                                   module_dir):
    site.write_conf(**mpich_conf(module_dir, defaultModules="mpich"))
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "--module=none", "--workdir=/opt/app",
                       "./ring")
    assert res.returncode == 0, res.stderr
    assert libmpi_of(res.stdout) == {0: IMAGE_LIB}
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "--module=none", "sh", "-c",
                       "echo LD=$LD_LIBRARY_PATH; ls /opt/udiImage/modules")
    assert res.stdout == "LD=\n", res.stderr
    # Configured but not a default module: only who asks for it gets it.
    site.write_conf(**mpich_conf(module_dir))
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "--workdir=/opt/app", "./ring")
    assert libmpi_of(res.stdout) == {0: IMAGE_LIB}, res.stderr
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "--module=mpich",
                       "--workdir=/opt/app", "./ring")
    assert libmpi_of(res.stdout) == {0: SITE_LIB}, res.stderr


# -- two ranks: mpiexec on the host, each rank a container ----------------------------------


@pytest.mark.parametrize("modules, lib", [("mpich", SITE_LIB), ("none", IMAGE_LIB)])
def test_two_ranks_exchange_messages_through_mpiexec(site, mpi_image, module_dir,
                                                     modules, lib):
    site.write_conf(**mpich_conf(module_dir, defaultModules="mpich"))
    argv = ["mpiexec", "-n", "2", str(site.launcher), f"--image=id:{mpi_image}",
            f"--module={modules}", "--workdir=/opt/app", "./ring"]
    res = site.run(ALICE, argv, timeout=120)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert libmpi_of(res.stdout) == {0: lib, 1: lib}
    assert "rank 0 of 2" in res.stdout and "rank 1 of 2" in res.stdout
    # 1 from rank 0, passed to rank 1 which appends 2, back to rank 0: both directions.
    assert "ring: token 12 after 2 ranks" in res.stdout


# -- the ABI check ---------------------------------------------------------------------------


def test_userhook_refuses_an_image_with_another_mpi_abi(site, openmpi_image, plain_image,
                                                        module_dir):
    site.write_conf(**mpich_conf(module_dir, defaultModules="mpich"))
    res = site.shifter(ALICE, f"--image=id:{openmpi_image}", "echo", "ran")
    assert res.returncode == 1 and res.stdout == ""
    assert "Failed to setup module mpich" in res.stderr
    assert ("this image's MPI is not MPICH-ABI compatible: it has "
            "/usr/lib/x86_64-linux-gnu/libmpi.so.40, the module provides libmpi.so.12") \
        in res.stderr
    assert "--module=none" in res.stderr
    assert site.our_mounts() == [] and site.our_loops() == []
    # The user's way out, and an image without any MPI is not refused.
    res = site.shifter(ALICE, f"--image=id:{openmpi_image}", "--module=none", "echo", "ran")
    assert (res.returncode, res.stdout) == (0, "ran\n"), res.stderr
    res = site.shifter(ALICE, f"--image=id:{plain_image}", "echo", "ran")
    assert (res.returncode, res.stdout) == (0, "ran\n"), res.stderr


def test_missing_module_copy_path_is_a_clear_error(site, mpi_image, module_dir):
    site.write_conf(**mpich_conf(module_dir, defaultModules="mpich",
                                 module_mpich_copyPath=str(site.base / "no-such-module")))
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "true")
    assert res.returncode == 1
    assert "copyPath" in res.stderr and "no-such-module" in res.stderr
    assert site.our_mounts() == [] and site.our_loops() == []
