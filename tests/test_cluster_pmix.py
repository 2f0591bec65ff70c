"""Open MPI under Slurm's PMIx across the nodes of the virtual cluster (docs/behaviour.md,
'Runtime: PMIx'; tests/world/cluster.py): ``srun -N 4 -n 8 --mpi=pmix shifter ./ring``
with Debian's Open MPI 4.1.4 in the image. Each node's slurmstepd runs a PMIx server for
its ranks; the servers exchange the job's data over the cluster network, each rank reads
it from its own node's server directory, mounted in its container, and the ranks talk to
each other over TCP between the nodes (shared memory within one).
"""

from __future__ import annotations

import os
import shutil

import pytest
from world.openmpi import LIBMPI, openmpi_tree
from world.runtime import file_id, mksquashfs

NODES = ["node1", "node2", "node3", "node4"]


@pytest.fixture(scope="module")
def ompi_image(vcluster, tmp_path_factory) -> str:
    """The Open MPI image placed in the shared image dir, as the gateway places one."""
    work = tmp_path_factory.mktemp("ompi-cluster")
    tree, _ = openmpi_tree(work / "root", work / "build")
    sqfs = mksquashfs(tree, work / "ompi.squashfs")
    image_id = file_id(sqfs)
    shutil.copyfile(sqfs, vcluster.export / f"{image_id}.squashfs")
    (vcluster.export / f"{image_id}.meta").write_text("FORMAT: squashfs\n")
    for suffix in ("squashfs", "meta"):
        os.chmod(vcluster.export / f"{image_id}.{suffix}", 0o644)
    yield image_id
    for suffix in ("squashfs", "meta"):
        (vcluster.export / f"{image_id}.{suffix}").unlink()


RING_JOB = """#!/bin/sh
timeout 150 srun -N 4 -n 8 --mpi=pmix shifter sh -c \\
  'd=${PMIX_SERVER_TMPDIR%/}; echo "TASK $SLURM_PROCID $SLURMD_NODENAME $d \
$(grep -c " $d " /proc/self/mountinfo)"; exec /opt/app/ring'
echo "SRUN $?"
"""


def test_open_mpi_ring_across_four_nodes_through_slurms_pmix(vcluster, ompi_image):
    w = vcluster
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
        assert f"/nodes/{node}/spool/" in path and mounted == "1", (node, path, mounted)
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
