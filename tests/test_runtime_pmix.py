"""The Slurm step's PMIx server directory in the container (docs/behaviour.md, 'Runtime:
PMIx'), without Slurm: the directory and variables a task of ``srun --mpi=pmix`` gets,
made by the test, and ``shifter`` run by the unprivileged users as such a task runs it.
``tests/test_slurm_pmix.py`` runs Open MPI through Slurm's real PMIx server.

The directories live outside ``/tmp`` (the containers have the host's ``/tmp``), where
Slurm's spool dir is: a container has the path only when the helper mounts it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from world.runtime import SLOT, RuntimeSite, busybox_tree, mksquashfs, module_site

ALICE = "shifter-alice"
BOB = "shifter-bob"
SPOOL = Path(f"/var/spool/shifter-test{SLOT}-rtpmix")  # Slurm's spool dir, as root keeps it


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory) -> Iterator[RuntimeSite]:
    with module_site(tmp_path_factory, "runtime-pmix") as site:
        shutil.rmtree(SPOOL, ignore_errors=True)
        SPOOL.mkdir(parents=True)
        os.chmod(SPOOL, 0o755)
        try:
            yield site
        finally:
            shutil.rmtree(SPOOL, ignore_errors=True)


@pytest.fixture(scope="module")
def image(site, tmp_path_factory) -> str:
    tree = busybox_tree(tmp_path_factory.mktemp("tree") / "root")
    return site.add_image(mksquashfs(tree, tmp_path_factory.mktemp("sqfs") / "p.squashfs"))


@pytest.fixture(scope="module")
def home_to_etc_image(site, tmp_path_factory) -> str:
    """An image whose /home is a symbolic link to /etc."""
    tree = busybox_tree(tmp_path_factory.mktemp("tree") / "root")
    (tree / "home").rmdir()
    (tree / "home").symlink_to("etc")
    return site.add_image(mksquashfs(tree, tmp_path_factory.mktemp("sqfs") / "h.squashfs"))


@pytest.fixture(autouse=True)
def clean(site):
    site.write_conf()
    yield
    site.write_conf()
    # A task's private namespace holds a copy of a prepared container's mounts; the kernel
    # drops them (and frees the autoclear loop device) shortly after the task has gone.
    deadline = time.monotonic() + 5
    while site.our_loops() and time.monotonic() < deadline:
        time.sleep(0.1)
    site.assert_nothing_left()


_steps = iter(range(1, 10_000))


def step_dir(owner: str, mode: int = 0o700, parent: Path = SPOOL) -> Path:
    """A new ``pmix.<job>.0`` as slurmstepd makes it: owned by the job's user, mode 0700,
    the dstore directories inside."""
    path = parent / f"pmix.{next(_steps)}.0"
    path.mkdir()
    (path / "pmix_dstor_ds21_4242").mkdir()
    (path / "job-data").write_text("from the PMIx server\n")
    pw = pwd.getpwnam(owner)
    for p in (path, path / "pmix_dstor_ds21_4242", path / "job-data"):
        os.chown(p, pw.pw_uid, 0)
    os.chmod(path, mode)
    return path


def step_env(path: Path | str, **extra: str) -> dict[str, str]:
    """What slurmstepd's PMIx server gives each task (Slurm 22.05 with PMIx 4.2)."""
    env = {"SLURM_MPI_TYPE": "pmix", "PMIX_SERVER_TMPDIR": f"{path}/",
           "PMIX_SERVER_URI41": "pmix-server.4242;tcp4://127.0.0.1:40000",
           "PMIX_NAMESPACE": "slurm.pmix.1.0", "PMIX_RANK": "0",
           "PMIX_SECURITY_MODE": "native", "PMIX_GDS_MODULE": "ds21,ds12,hash",
           "PMIX_DSTORE_21_BASE_PATH": f"{path}//pmix_dstor_ds21_4242",
           "SLURM_PMIX_MAPPING_SERV": "(vector,(0,1,1))"}
    env.update(extra)
    return env


def mount_line(stdout: str, path: Path) -> list[str]:
    """The mountinfo fields of the mount at ``path`` among ``stdout``'s lines."""
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[4] == str(path):
            return fields
    raise AssertionError(f"no mount at {path} in:\n{stdout}")


# -- what crosses -----------------------------------------------------------------------------


def test_the_steps_directory_is_mounted_at_its_path(site, image):
    path = step_dir(ALICE)
    script = (f"cat {path}/job-data; ls {path}; touch {path}/from-the-task; "
              "grep pmix /proc/self/mountinfo; env | grep '^PMIX_MCA_' | sort")
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", script, env=step_env(path))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == ["from the PMIx server", "job-data", "pmix_dstor_ds21_4242"]
    fields = mount_line(res.stdout, path)
    assert fields[3] == str(path)  # the step's own directory, nothing above it
    assert {"rw", "nosuid", "nodev", "noexec"} <= set(fields[5].split(",")), fields
    # The server's component names, as a PMIx of another version reads them.
    assert lines[-2:] == ["PMIX_MCA_gds=ds21,ds12,hash", "PMIX_MCA_psec=native"]
    # Shared with the server: what a task writes there, the host sees.
    assert (path / "from-the-task").stat().st_uid == pwd.getpwnam(ALICE).pw_uid


def test_no_pmix_step_no_mount(site, image):
    """Without PMIX_SERVER_TMPDIR, or in a step of another MPI type, the path does not
    exist in the container; a variable the image or --env sets is not overridden."""
    path = step_dir(ALICE)
    probe = f"test -e {path} && echo THERE || echo ABSENT; echo $PMIX_MCA_gds"
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", probe)
    assert (res.returncode, res.stdout) == (0, "ABSENT\n\n"), res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", probe,
                       env=step_env(path, SLURM_MPI_TYPE="pmi2"))
    assert (res.returncode, res.stdout) == (0, "ABSENT\n\n"), res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "--env=PMIX_MCA_gds=hash", "sh", "-c",
                       probe, env=step_env(path))
    assert (res.returncode, res.stdout) == (0, "THERE\nhash\n"), res.stderr


def test_nothing_in_the_directory_can_be_run(site, image):
    """noexec: a program the user leaves there (or the server's files) never runs."""
    path = step_dir(ALICE)
    (path / "prog").write_text("#!/bin/sh\necho ran\n")
    os.chown(path / "prog", pwd.getpwnam(ALICE).pw_uid, 0)
    os.chmod(path / "prog", 0o755)
    res = site.shifter(ALICE, f"--image=id:{image}", f"{path}/prog", env=step_env(path))
    assert (res.returncode, res.stdout) == (127, ""), res  # the helper's execvp failed
    assert f"{path}/prog: Permission denied" in res.stderr


# -- what does not ------------------------------------------------------------------------------


def refused(site: RuntimeSite, image: str, path: str, user: str = ALICE) -> str:
    res = site.shifter(user, f"--image=id:{image}", "echo", "ran", env=step_env(path))
    assert res.returncode == 1 and res.stdout == "", res
    assert site.our_mounts() == []
    return res.stderr


def test_a_directory_the_user_does_not_own_is_not_mounted(site, image):
    bob = pwd.getpwnam(BOB).pw_uid
    alice = pwd.getpwnam(ALICE).pw_uid
    # root's, readable by all: another job's data would be in such a place
    path = step_dir("root", 0o755)
    err = refused(site, image, str(path))
    assert (f"The PMIx server directory {path} (PMIX_SERVER_TMPDIR) is owned by uid 0, "
            f"not by you (uid {alice}): it is not mounted.") in err
    assert "srun --mpi=pmix" in err and "unset PMIX_SERVER_TMPDIR" in err
    # another user's step, even one left open to all
    path = step_dir(BOB, 0o755)
    assert f"is owned by uid {bob}, not by you (uid {alice})" in refused(site, image, str(path))
    # another user's step as Slurm makes it: alice cannot even look inside
    path = step_dir(BOB)
    err = refused(site, image, str(path))
    assert f"{path} (PMIX_SERVER_TMPDIR) cannot be opened: Permission denied" in err


def test_only_a_real_path_named_like_slurms_is_taken(site, image, tmp_path):
    """No symbolic link on the way, Slurm's name, never under the system's directories."""
    mine = step_dir(ALICE)
    link = SPOOL / "link"
    link.symlink_to(mine.name)
    try:
        err = refused(site, image, f"{SPOOL}/link")
        assert "its name is not Slurm's pmix.<job>.<step>" in err
        (SPOOL / "via").symlink_to(".")
        err = refused(site, image, f"{SPOOL}/via/{mine.name}")
        assert f"{SPOOL}/via/{mine.name} (PMIX_SERVER_TMPDIR) cannot be opened: its path " \
               "has a symbolic link" in err
    finally:
        link.unlink()
        (SPOOL / "via").unlink(missing_ok=True)
    other = SPOOL / "data"
    other.mkdir()
    os.chown(other, pwd.getpwnam(ALICE).pw_uid, 0)
    try:
        assert "its name is not Slurm's" in refused(site, image, str(other))
    finally:
        other.rmdir()
    assert "it is under /etc, which is the system's" in refused(site, image, "/etc/pmix.1.0")
    assert "under /opt/udiImage" in refused(site, image, "/opt/udiImage/pmix.1.0")
    assert "without \"..\"" in refused(site, image, f"{SPOOL}/../pmix.1.0")
    assert "not a canonical path" in refused(site, image, f"{SPOOL}//{mine.name}")
    assert "No such file or directory" in refused(site, image, f"{SPOOL}/pmix.999999.0")


def test_an_image_symlink_cannot_lead_it_into_etc(site, home_to_etc_image):
    """/home is a link to /etc in the image: the user's ~/pmix.N.0 would land in the
    container's /etc. Refused before anything is made, also in a prepared container
    (which the job's other steps share): its /etc gets nothing."""
    home = Path(pwd.getpwnam(ALICE).pw_dir)
    path = step_dir(ALICE, parent=home)
    pw = pwd.getpwnam(ALICE)
    want = (f"The PMIx server directory {path} (PMIX_SERVER_TMPDIR) is not mounted: "
            "something on its path in the image is a symbolic link or not a directory")
    try:
        assert want in refused(site, home_to_etc_image, str(path))
        res = site.root_tool("setupRoot", "-U", str(pw.pw_uid), "-G", str(pw.pw_gid), "-u",
                             ALICE, "id", home_to_etc_image)
        assert res.returncode == 0, res.stderr
        try:
            res = site.shifter(ALICE, f"--image=id:{home_to_etc_image}", "echo", "ran",
                               env=step_env(path))
            assert (res.returncode, res.stdout) == (1, ""), res
            assert want in res.stderr
            assert not (site.udi_mount / "etc" / home.name).exists()
            assert (site.udi_mount / "home").is_symlink()
        finally:
            done = site.root_tool("unsetupRoot")
        assert done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(path)


def test_a_directory_the_container_cannot_hold_is_left_out_with_a_warning(site, image):
    """The spool dir below a host directory the container has without it (here: a
    filesystem mounted inside the host's /tmp, which the container gets without the
    mounts below it). No mount point can be made there (the host's directory is never
    written): the task runs, PMIx falls back to messages, and stderr says why."""
    below = site.base / "covered"
    below.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "pmixtest", str(below)],
                   check=True)
    try:
        path = step_dir(ALICE, parent=below)
        res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c",
                           f"test -e {path} && echo THERE || echo ABSENT", env=step_env(path))
    finally:
        subprocess.run(["umount", str(below)], check=True)
    assert (res.returncode, res.stdout) == (0, "ABSENT\n"), res
    assert (f"shifter: The PMIx server directory {path} (PMIX_SERVER_TMPDIR) is not mounted "
            "in the container: it does not exist and its parent is not on the container's "
            "own filesystem, so it cannot be created.") in res.stderr
    assert list(below.iterdir()) == []  # nothing made in the host's /tmp


# -- the prepared container of a batch job ---------------------------------------------------------


def test_a_prepared_container_gets_it_in_the_tasks_namespace_only(site, image):
    """setupRoot prepared the job's container in the node's namespace; a PMIx task
    enters it in a private namespace of its own with the directory mounted, so the
    node's container (shared by every step) gets no mount of it; a task of no PMIx step
    still enters the node's namespace."""
    pw = pwd.getpwnam(ALICE)
    res = site.root_tool("setupRoot", "-U", str(pw.pw_uid), "-G", str(pw.pw_gid), "-u", ALICE,
                         "id", image)
    assert res.returncode == 0, res.stderr
    try:
        path = step_dir(ALICE)
        script = (f"readlink /proc/self/ns/mnt; cat {path}/job-data; "
                  "grep -c pmix /proc/self/mountinfo; test -w / || echo READ-ONLY")
        res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", script,
                           env=step_env(path))
        assert res.returncode == 0, res.stderr
        namespace, data, mounts, readonly = res.stdout.splitlines()
        assert namespace != os.readlink("/proc/self/ns/mnt")
        assert (data, mounts, readonly) == ("from the PMIx server", "1", "READ-ONLY")
        assert not any(path.name in m for m in site.our_mounts()), site.our_mounts()
        # The mount point is the only trace in the node's container: an empty directory.
        assert list((site.udi_mount / str(path).lstrip("/")).iterdir()) == []
        res = site.shifter(ALICE, f"--image=id:{image}", "readlink", "/proc/self/ns/mnt")
        assert res.stdout.strip() == os.readlink("/proc/self/ns/mnt"), res.stderr
        # Another step, another directory: each task sees its own.
        other = step_dir(ALICE)
        res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c",
                           f"ls {other}; test -e {path}/job-data || echo NOT-THE-OLD-ONE",
                           env=step_env(other))
        assert res.stdout == "job-data\npmix_dstor_ds21_4242\nNOT-THE-OLD-ONE\n", res.stderr
    finally:
        done = site.root_tool("unsetupRoot")
    assert done.returncode == 0, done.stderr
