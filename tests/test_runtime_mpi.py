"""The MPI ABI swap end to end (docs/behaviour.md, 'Runtime: MPI', issue 5): Debian's real MPICH,
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
from world.mpi import MPICH_LIBDIR, build_ring
from world.runtime import add_dynamic_program, busybox_tree, mksquashfs, module_site

ALICE = "shifter-alice"
REPO = Path(__file__).resolve().parents[1]
PREP = REPO / ".venv" / "bin" / "shifter-prep-mpi"
MODULE = "/opt/udiImage/modules/mpich"
SITE_LIB = f"{MODULE}/lib64/libmpich.so.12.2.2"  # the site's real file, as mapped
IMAGE_LIB = "/usr/lib/x86_64-linux-gnu/libmpi.so.12.2.2"  # the image's own
BIND_INSIDE = "/opt/site-mpich"  # where the bind-mounted variant appears


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    with module_site(tmp_path_factory, "runtime-mpi") as site:
        yield site


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> tuple[Path, Path]:
    return build_ring(tmp_path_factory.mktemp("ring"))


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


@pytest.fixture(scope="module")
def bind_module_dir(site) -> tuple[Path, str]:
    """The same, to be bind-mounted (siteFs) at /opt/site-mpich instead of copied."""
    out = site.base / "modules" / "mpich-bind"
    res = subprocess.run([str(PREP), "--out", str(out), "--bind", "--inside", BIND_INSIDE],
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
    assert set(conf) - {"module_mpich_copyPath", "module_mpich_siteFs"} == \
        {"module_mpich_siteEnvPrepend", "module_mpich_userhook"}
    return {**conf, **extra}


@pytest.fixture(autouse=True)
def clean_conf(site):
    site.write_conf()
    yield
    site.write_conf()
    site.assert_nothing_left()


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
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "--workdir=/opt/app", "./ring",
                       env={"RING_MAPS": "1"})
    assert res.returncode == 0, res.stderr
    assert libmpi_of(res.stdout) == {0: SITE_LIB}
    assert "ring: token 1 after 1 ranks" in res.stdout
    # MPI's own dependencies come from the module too (RUNPATH $ORIGIN/dep), glibc and
    # the loader from the image.
    mapped = {os.path.basename(p): p for p in
              (line.split(" ", 1)[1] for line in res.stdout.splitlines()
               if line.startswith("mapped "))}
    for name in ("libhwloc.so.15", "libucp.so.0", "libucs.so.0", "libnuma.so.1"):
        assert mapped[name] == f"{MODULE}/lib64/dep/{name}", mapped
    assert mapped["libc.so.6"] == "/usr/lib/x86_64-linux-gnu/libc.so.6", mapped
    assert mapped["ld-linux-x86-64.so.2"] == "/usr/lib64/ld-linux-x86-64.so.2", mapped
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


def test_bind_mounted_module_instead_of_a_copy(site, mpi_image, openmpi_image,
                                              bind_module_dir):
    """``shifter-prep-mpi --bind``: the module is the site's directory mounted read-only
    (no copy per launch); the application runs on it just the same."""
    out, _ = bind_module_dir
    site.write_conf(**mpich_conf(bind_module_dir, defaultModules="mpich"))
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "--workdir=/opt/app", "./ring")
    assert res.returncode == 0, res.stderr
    assert libmpi_of(res.stdout) == {0: f"{BIND_INSIDE}/lib64/libmpich.so.12.2.2"}
    res = site.shifter(ALICE, f"--image=id:{mpi_image}", "sh", "-c",
                       f"grep ' {BIND_INSIDE} ' /proc/self/mountinfo; "
                       "ls /opt/udiImage/modules; echo $LD_LIBRARY_PATH")
    assert res.returncode == 0, res.stderr
    mount, ld_path = res.stdout.splitlines()
    fields = mount.split()
    assert fields[4] == BIND_INSIDE and "ro" in fields[5].split(","), mount
    assert fields[3].endswith(f"/modules/{out.name}"), mount  # the site's dir itself
    assert ld_path == f"{BIND_INSIDE}/lib64"
    res = site.shifter(ALICE, f"--image=id:{openmpi_image}", "true")
    assert res.returncode == 1 and "Failed to setup module mpich" in res.stderr
    assert "libmpi.so.40" in res.stderr


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


def ucx_transports(log: str) -> set[str]:
    """The transports UCX chose for its endpoints, from its own report
    (``UCX_LOG_LEVEL=info``: ``ep_cfg[0]: tag(self/memory0 cma/memory) rma(...) am(...)``)."""
    used = set()
    for line in log.splitlines():
        if "ep_cfg[" in line:
            for part in line.split("ep_cfg[", 1)[1].split("(")[1:]:
                used.update(part.split(")", 1)[0].split())
    return used


def test_ranks_in_containers_use_the_same_ucx_transports_as_bare(site, mpi_image, module_dir,
                                                                  ring):
    """UCX loads its transport plugins (cma, ...) from next to libucs: the module must carry
    them, or ranks on one node fall back to TCP (issue 12: 40x slower, and from 32 nodes
    MPI_Init fails)."""
    site.write_conf(**mpich_conf(module_dir, defaultModules="mpich"))
    bare_dir = site.base / "bare-ring"  # the same program and MPI, outside shifter
    shutil.copytree(ring[1], bare_dir / "lib", symlinks=True)
    shutil.copy(ring[0], bare_dir / "ring")
    for d in (bare_dir, bare_dir / "lib"):
        os.chmod(d, 0o755)
    env = {"UCX_LOG_LEVEL": "info"}  # UCX reports each endpoint's transports
    bare = site.run(ALICE, ["mpiexec", "-n", "2", str(bare_dir / "ring")], timeout=120,
                    env={**env, "LD_LIBRARY_PATH": str(bare_dir / "lib")})
    assert bare.returncode == 0, (bare.stdout, bare.stderr)
    want = ucx_transports(bare.stdout)  # UCX logs to stdout
    assert "cma/memory" in want, bare.stdout
    argv = ["mpiexec", "-n", "2", str(site.launcher), f"--image=id:{mpi_image}",
            "--module=mpich", "--workdir=/opt/app", "./ring"]
    res = site.run(ALICE, argv, timeout=120, env=env)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert libmpi_of(res.stdout) == {0: SITE_LIB, 1: SITE_LIB}, res.stdout
    assert ucx_transports(res.stdout) == want, res.stdout


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
    site.assert_nothing_left()
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
    site.assert_nothing_left()
