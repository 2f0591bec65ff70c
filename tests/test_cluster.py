"""Shifter on a virtual four-node cluster (issue 12; tests/world/cluster.py): each node
its own network, UTS and mount namespace and slurmd, slurmctld on the login node, the
gateway on a service node, the image dir on a filesystem every node mounts. Jobs are
submitted by the unprivileged test user with real ``sbatch``/``srun``; checks are what
the user sees (job output) and what an admin sees on each node (its mounts, its slurmd
log).
"""

from __future__ import annotations

import pytest
from world.clusterworld import ALICE

NODES = ["node1", "node2", "node3", "node4"]


@pytest.fixture(scope="module")
def v1(vcluster, tmp_path_factory) -> str:
    vcluster.push("v1", "cluster-one", tmp_path_factory.mktemp("layer"))
    return vcluster.pull("v1")


@pytest.fixture(autouse=True)
def healthy_cluster(vcluster):
    """Each test ends with every node idle and nothing of ours mounted on any node."""
    yield
    vcluster.cluster.settle()
    states = vcluster.cluster.node_states()
    if any(not s.startswith("IDLE") for s in states.values()):
        vcluster.cluster.admin("scancel", "--full", "--user", ALICE)
        vcluster.cluster.settle()
        vcluster.cluster.resume()
    assert vcluster.leftover_mounts() == {}, "a mount of ours is left on a node"


FOUR_NODE_JOB = """#!/bin/sh
echo "NODELIST=$SLURM_JOB_NODELIST"
srun -N 4 --ntasks-per-node=1 shifter sh -c 'echo "HOST $(hostname) $(grep ^ID= /etc/os-release)"'
srun -N 4 --ntasks-per-node=1 shifter sh -c \
  'echo "HOSTSFILE $(hostname) $(sort -u /var/hostsfile | tr "\\n" " ")"'
srun -N 4 --ntasks-per-node=1 shifter sh -c 'echo "ETCHOSTS $(hostname) $(grep -c node /etc/hosts)"'
"""


def test_four_node_job_prepares_every_node(vcluster, v1):
    w = vcluster
    res = w.sbatch(FOUR_NODE_JOB, "-N", "4", "--exclusive", f"--image={w.tag('v1')}")
    assert res.returncode == 0 and res.job_id, res
    assert w.cluster.wait(res.job_id) == "COMPLETED", (w.output(res.job_id), w.cluster.logs())
    out = w.output(res.job_id)
    assert "NODELIST=node[1-4]" in out, out
    hosts = sorted(line.split()[1] for line in out.splitlines() if line.startswith("HOST "))
    assert hosts == NODES, out
    assert all(line.endswith("ID=cluster-one") for line in out.splitlines()
               if line.startswith("HOST ")), out
    for node in NODES:
        assert "container prepared" in w.cluster.slurmd_log(node), node
