"""Open MPI under Slurm's PMIx across the nodes of the virtual cluster (docs/behaviour.md,
'Runtime: PMIx'; tests/world/cluster.py): ``srun -N 4 -n 8 --mpi=pmix shifter ./ring``
with Debian's Open MPI 4.1.4 in the image. Each node's slurmstepd runs a PMIx server for
its ranks; the servers exchange the job's data over the cluster network, each rank reads
it from its own node's server directory, mounted in its container, and the ranks talk to
each other over TCP between the nodes (shared memory within one).

A cluster of its own, not the shared ``vcluster``: that one lives in the test world's
temp dir, so its nodes' spool dirs are below ``/tmp``, which the containers have without
the mounts below it (the directory is then left out: tests/test_runtime_pmix.py). Here
everything is outside ``/tmp``, as a site's ``/var/spool/slurmd`` is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from world.clusterworld import cluster_world
from world.openmpi import LIBMPI, openmpi_tree
from world.runtime import SLOT, TEST_CONF, file_id, mksquashfs

NODES = ["node1", "node2", "node3", "node4"]
BASE = Path(f"/var/spool/shifter-test{SLOT}-vcpmix")


@pytest.fixture(scope="module")
def pcluster(test_users, munged, registry, tmp_path_factory):
    """Four nodes, everything below BASE; the slot's udiRoot.conf as it was afterwards
    (the session's ``vcluster`` may be running with its own)."""
    saved = TEST_CONF.read_text() if TEST_CONF.exists() else None
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    os.chmod(BASE, 0o755)
    try:
        with cluster_world(BASE, munged=munged, registry=registry, test_users=test_users,
                           nodes=4, keep_tmp=(tmp_path_factory.getbasetemp(),)) as world:
            yield world
        assert world.cluster.leftovers() == []
    finally:
        if saved is not None:
            TEST_CONF.write_text(saved)
        shutil.rmtree(BASE, ignore_errors=True)


@pytest.fixture(scope="module")
def ompi_image(pcluster, tmp_path_factory) -> str:
    """The Open MPI image placed in the shared image dir, as the gateway places one."""
    work = tmp_path_factory.mktemp("ompi-cluster")
    tree, _ = openmpi_tree(work / "root", work / "build")
    sqfs = mksquashfs(tree, work / "ompi.squashfs")
    image_id = file_id(sqfs)
    shutil.copyfile(sqfs, pcluster.export / f"{image_id}.squashfs")
    (pcluster.export / f"{image_id}.meta").write_text("FORMAT: squashfs\n")
    for suffix in ("squashfs", "meta"):
        os.chmod(pcluster.export / f"{image_id}.{suffix}", 0o644)
    return image_id


RING_JOB = """#!/bin/sh
timeout 150 srun -N 4 -n 8 --mpi=pmix shifter sh -c \\
  'd=${PMIX_SERVER_TMPDIR%/}; echo "TASK $SLURM_PROCID $SLURMD_NODENAME $d \
$(grep -c " $d " /proc/self/mountinfo)"; exec /opt/app/ring'
echo "SRUN $?"
"""


def test_open_mpi_ring_across_four_nodes_through_slurms_pmix(pcluster, ompi_image):
    w = pcluster
    res = w.sbatch(RING_JOB, "-N", "4", "-n", "8", "--exclusive", f"--image=id:{ompi_image}")
    assert res.returncode == 0 and res.job_id, res
    state = w.cluster.wait(res.job_id, timeout=240)
    out = w.output(res.job_id)
    assert state == "COMPLETED", (state, out, w.cluster.logs())
    assert "SRUN 0" in out, out
    tasks = {int(f[1]): f[2:] for f in (line.split() for line in out.splitlines())
             if f[:1] == ["TASK"]}
    assert sorted(tasks) == list(range(8)), out
    # two ranks on each node, each with its node's own PMIx directory mounted once
    assert sorted(node for node, _, _ in tasks.values()) == sorted(NODES * 2), out
    for node, path, mounted in tasks.values():
        assert os.path.basename(path).startswith(f"pmix.{res.job_id}."), path
        assert path.startswith(f"{BASE}/cluster/nodes/{node}/spool/"), (node, path)
        assert mounted == "1", (node, path, mounted)
    libs = {}
    for line in out.splitlines():
        if line.startswith("rank "):
            head, lib = line.split(": libmpi ", 1)
            libs[int(head.split()[1])] = lib
    assert libs == {r: LIBMPI for r in range(8)}, out
    # the token went 0 -> 1 -> ... -> 7 -> 0: across every node and back
    assert "ring: token 12345678 after 8 ranks" in out, out
    assert "PMIX ERROR" not in out
    assert w.leftover_mounts() == {}
