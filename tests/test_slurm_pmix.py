"""Open MPI under Slurm's PMIx (docs/behaviour.md, 'Runtime: PMIx'): ``srun --mpi=pmix
shifter ./ring`` with Debian's Open MPI 4.1.4 in the image and Slurm 22.05's ``mpi_pmix``
plugin (PMIx 4.2) on the one-node test cluster, run by the unprivileged user.

Slurm's step daemon runs the PMIx server; each task finds it through ``PMIX_*``
variables and the server's directory (``PMIX_SERVER_TMPDIR``,
``<SlurmdSpoolDir>/pmix.<job>.<step>``, the job data the clients map from shared
memory). The cluster's spool dir is outside ``/tmp`` (the containers have the host's
``/tmp``), as a site's ``/var/spool/slurmd`` is: a container has the step's directory
only when the helper mounts it. Without it Open MPI still starts, but PMIx prints
``PMIX ERROR`` for each rank and falls back to fetching every rank's job data over the
socket (``gds`` ``hash`` instead of the shared-memory ``ds21``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_slurm import ALICE, World, assert_nothing_left, plugin_cluster, site_parts
from world.openmpi import LIBMPI, openmpi_tree
from world.runtime import SLOT, mksquashfs, reachable_temp_dir
from world.slurm import Client

SPOOL = Path(f"/var/spool/shifter-test{SLOT}-pmix")
RING = "/opt/app/ring"
TIMEOUT = 120  # a rank that never hears from the PMIx server spins: srun is killed


@pytest.fixture(scope="module")
def pworld(test_users, munged, registry, tmp_path_factory):
    base = reachable_temp_dir(tmp_path_factory, "slurmpmix")
    site, bindir, jobdir, data, gateway = site_parts(base, test_users, munged, registry)
    shutil.rmtree(SPOOL, ignore_errors=True)
    cluster = plugin_cluster(base, munged, bindir, {}, spool=SPOOL)
    try:
        with cluster:
            yield World(site, cluster, gateway, registry, munged.socket, bindir, jobdir, data)
    finally:
        shutil.rmtree(SPOOL, ignore_errors=True)
    assert_nothing_left(site)


@pytest.fixture(autouse=True)
def settled(pworld):
    """Each test ends with its jobs and epilogs done and nothing of ours mounted."""
    yield
    pworld.cluster.settle()
    assert pworld.site.our_mounts() == [], "a mount of ours is left after the job"


@pytest.fixture(scope="module")
def ompi_image(pworld, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("ompi")
    tree, _ = openmpi_tree(work / "root", work / "build")
    return pworld.site.add_image(mksquashfs(tree, work / "ompi.squashfs"))


def ranks(stdout: str) -> dict[int, str]:
    """rank -> the libmpi file it ran on, from ring's output."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("rank "):
            head, lib = line.split(": libmpi ", 1)
            out[int(head.split()[1])] = lib
    return out


def test_open_mpi_ring_through_slurms_pmix_in_per_task_containers(pworld, ompi_image):
    """Not exclusive: each task builds its own container; the ring passes its token
    through both ranks, each on the image's own Open MPI, which reads the job data from
    the server's shared-memory store (PMIx's ``gds`` ``ds21``)."""
    def ring(prefix: str = "") -> Client:
        return pworld.cluster.srun(
            ALICE, "--mpi=pmix", "-n", "2", f"--image=id:{ompi_image}", "sh", "-c",
            f"{prefix}exec timeout {TIMEOUT - 10} {pworld.bindir}/shifter {RING}",
            env=pworld.env(PMIX_MCA_gds_base_verbose="1"), cwd=pworld.jobdir,
            timeout=TIMEOUT)

    res = ring()
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert ranks(res.stdout) == {0: LIBMPI, 1: LIBMPI}
    assert "ring: token 12 after 2 ranks" in res.stdout
    assert "PMIX ERROR" not in res.stderr
    assert "FETCH KV WITH ds21" in res.stderr
    # The control: the same step without the directory (the front end leaves it out for
    # a step of another MPI type). It still runs, on the slower path, with an error.
    res = ring("SLURM_MPI_TYPE=pmi2 ")
    assert "ring: token 12 after 2 ranks" in res.stdout, (res.stdout, res.stderr)
    assert "PMIX ERROR" in res.stderr and "FETCH KV WITH ds21" not in res.stderr


def test_what_crosses_into_the_container(pworld, ompi_image):
    """The step's own directory at its path, the user's, nosuid, nodev, noexec; the
    server's variables and their MCA names."""
    script = ('d=${PMIX_SERVER_TMPDIR%/}; echo "$d"; ls "$d"; '
              'grep " $d " /proc/self/mountinfo; stat -c %U "$d"; '
              "env | grep -E '^(PMIX_MCA_|PMIX_NAMESPACE|SLURM_PMIX_MAPPING_SERV)' | sort")
    res = pworld.cluster.srun(
        ALICE, "--mpi=pmix", "-n", "1", f"--image=id:{ompi_image}",
        f"{pworld.bindir}/shifter", "sh", "-c", script,
        env=pworld.env(), cwd=pworld.jobdir, timeout=TIMEOUT)
    assert res.returncode == 0, (res.stdout, res.stderr)
    lines = res.stdout.splitlines()
    path = lines[0]
    assert os.path.dirname(path) == str(SPOOL) and path.startswith(f"{SPOOL}/pmix.")
    assert any(n.startswith("pmix_dstor_ds21_") for n in lines[1:3]), lines
    mount = next(line.split() for line in lines if f" {path} " in line)
    assert mount[3] == mount[4] == path
    assert {"nosuid", "nodev", "noexec"} <= set(mount[5].split(",")), mount
    assert ALICE.startswith(lines[-5]) or lines[-5] == ALICE, lines  # busybox cuts at 8
    assert lines[-4:-1] == ["PMIX_MCA_gds=ds21,ds12,hash", "PMIX_MCA_psec=native",
                            f"PMIX_NAMESPACE=slurm.pmix.{path.rsplit('.', 2)[1]}.0"]
    assert lines[-1].startswith("SLURM_PMIX_MAPPING_SERV=")


def test_open_mpi_ring_in_a_batch_jobs_prepared_container(pworld, ompi_image):
    """--exclusive: the prolog prepared the job's container in the node's namespace;
    each PMIx task enters it in a private namespace of its own with its step's directory,
    so the node's container never holds a mount of it. Four ranks on two CPUs."""
    udi = pworld.site.udi_mount
    script = (f"#!/bin/sh\nsrun --mpi=pmix -n 4 --overcommit timeout {TIMEOUT - 20} "
              f"shifter {RING}\n"
              f"echo node mounts: $(grep ' {udi}/' /proc/self/mountinfo | grep -c /pmix[.])\n"
              "srun -n 1 shifter readlink /proc/self/ns/mnt\n")
    res = pworld.sbatch(script, f"--image=id:{ompi_image}", "--exclusive", "-n", "4",
                        "--overcommit")
    assert res.returncode == 0 and res.job_id, res
    assert pworld.cluster.wait(res.job_id, timeout=TIMEOUT) == "COMPLETED", \
        pworld.output(res.job_id)
    out = pworld.output(res.job_id)
    assert ranks(out) == {0: LIBMPI, 1: LIBMPI, 2: LIBMPI, 3: LIBMPI}, out
    assert "ring: token 1234 after 4 ranks" in out
    assert "node mounts: 0" in out
    # a task of no PMIx step still runs in the node's prepared container
    assert os.readlink("/proc/self/ns/mnt") in out.splitlines()
    assert "container prepared" in pworld.cluster.slurmd_log()
    assert "PMIX ERROR" not in out and "unable to open" not in out


def test_a_pmix_directory_not_the_users_is_refused(pworld, ompi_image):
    """A task that names another directory (here root's, open to all) gets a message
    naming it and why, exit 1, and nothing mounted."""
    other = SPOOL / "pmix.4242.0"
    other.mkdir()
    os.chmod(other, 0o755)
    try:
        res = pworld.cluster.srun(
            ALICE, "--mpi=pmix", "-n", "1", f"--image=id:{ompi_image}", "sh", "-c",
            f"PMIX_SERVER_TMPDIR={other}/ exec {pworld.bindir}/shifter echo ran",
            env=pworld.env(), cwd=pworld.jobdir, timeout=TIMEOUT)
    finally:
        other.rmdir()
    assert res.returncode == 1 and "ran" not in res.stdout, res
    uid = pworld.site.spawn_kwargs(ALICE)["user"]
    assert (f"The PMIx server directory {other} (PMIX_SERVER_TMPDIR) is owned by uid 0, "
            f"not by you (uid {uid}): it is not mounted.") in res.stderr
    assert pworld.site.our_mounts() == []
