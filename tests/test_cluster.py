"""Shifter on a virtual four-node cluster (issue 12; tests/world/cluster.py): each node
its own network, UTS and mount namespace and slurmd, slurmctld on the login node, the
gateway on a service node, the image dir on a filesystem every node mounts. Jobs are
submitted by the unprivileged test user with real ``sbatch``/``srun``; checks are what
the user sees (job output) and what an admin sees on each node (its mounts, its slurmd
log). Every ``srun`` of an MPI program runs under ``timeout``: a rank that hangs spins.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from world import netns
from world.cluster import VirtualCluster, reap_stale_namespaces
from world.clusterworld import ALICE
from world.mpi import build_ring
from world.runtime import add_dynamic_program

NODES = ["node1", "node2", "node3", "node4"]
HOME = Path(f"/home/{ALICE}")
SITE_LIB = "/opt/udiImage/modules/mpich/lib64/libmpich.so.12.2.2"  # module mpich, copied
BIND_LIB = "/opt/site-mpich/lib64/libmpich.so.12.2.2"  # module mpichbind, through siteFs
IMAGE_LIB = "/usr/lib/x86_64-linux-gnu/libmpi.so.12.2.2"  # the image's own


@pytest.fixture(scope="module")
def v1(vcluster, tmp_path_factory) -> str:
    vcluster.push("v1", "cluster-one", tmp_path_factory.mktemp("layer"))
    return vcluster.pull("v1")


@pytest.fixture(scope="module")
def mpi_image(vcluster, tmp_path_factory) -> str:
    """busybox + ``/opt/app/ring`` on the image's own vanilla ``libmpi.so.12`` + MPICH's
    ``mpiexec`` (hydra) and its proxy, each with its whole ldd closure."""
    program, vanilla = build_ring(tmp_path_factory.mktemp("ring"))
    tree = tmp_path_factory.mktemp("mpitree") / "root"
    libs = add_dynamic_program(tree, program, "/opt/app/ring", lib_path=str(vanilla))
    assert "/usr/lib/x86_64-linux-gnu/libmpi.so.12" in libs
    add_dynamic_program(tree, Path("/usr/bin/mpiexec.hydra"), "/usr/bin/mpiexec.hydra")
    add_dynamic_program(tree, Path("/usr/bin/hydra_pmi_proxy"), "/usr/bin/hydra_pmi_proxy")
    (tree / "usr/bin/mpiexec").symlink_to("mpiexec.hydra")
    vcluster.push("mpi", "cluster-mpi", tmp_path_factory.mktemp("mpilayer"), tree=tree)
    return vcluster.pull("mpi")


@pytest.fixture(autouse=True)
def healthy_cluster(vcluster):
    """Each test ends with every node idle and nothing of ours mounted on any node."""
    yield
    c = vcluster.cluster
    try:
        c.settle(timeout=30)  # srun returns before the epilogs have run
    except TimeoutError:  # a failed test's job, held or still running
        c.admin("scancel", "--user", ALICE)
        c.settle()
    if any(not s.startswith("IDLE") for s in c.node_states().values()):
        c.resume()
    assert vcluster.leftover_mounts() == {}, "a mount of ours is left on a node"


def run_job(w, script: str, *args: str, timeout: float = 240) -> str:
    """Submit as alice, wait, return the output of a COMPLETED job."""
    res = w.sbatch(script, *args)
    assert res.returncode == 0 and res.job_id, res
    state = w.cluster.wait(res.job_id, timeout=timeout)
    assert state == "COMPLETED", (state, w.output(res.job_id), w.cluster.logs())
    return w.output(res.job_id)


def tagged(out: str, word: str) -> list[list[str]]:
    """The lines that start with ``word``, split into words (without it)."""
    return [line.split()[1:] for line in out.splitlines() if line.split()[:1] == [word]]


# -- the four-node job ---------------------------------------------------------------------

PER_NODE = "srun -N 4 --ntasks-per-node=1 shifter sh -c "
FOUR_NODE_JOB = f"""#!/bin/sh
echo "NODELIST $SLURM_JOB_NODELIST"
srun -N 4 shifter hostname | sed 's/^/NAME /'
{PER_NODE}'echo "OS $(hostname) $(grep ^ID= /etc/os-release)"'
{PER_NODE}'echo "HOSTSFILE $(hostname) $(tr "\\n" " " < /var/hostsfile)"'
{PER_NODE}'echo "ETCHOSTS $(hostname) $(grep -o "node[0-9]*" /etc/hosts | tr "\\n" " ")"'
{PER_NODE}'echo "MNTNS $(hostname) $(readlink /proc/self/ns/mnt)"'
"""


def test_a_four_node_job_runs_in_a_prepared_container_on_every_node(vcluster, v1):
    """``sbatch -N 4 --exclusive --image=…``: the prolog ran setupRoot on each of the
    four nodes with the job's node list; every task runs in its node's container, which
    carries the image and names all four nodes; after the epilog nothing is mounted."""
    w = vcluster
    out = run_job(w, FOUR_NODE_JOB, "-N", "4", "--exclusive", f"--image={w.tag('v1')}")
    assert tagged(out, "NODELIST") == [["node[1-4]"]], out
    # srun -N 4 shifter hostname: one task per node, the node's own name
    assert sorted(n for (n,) in tagged(out, "NAME")) == NODES, out
    assert sorted(tagged(out, "OS")) == [[n, "ID=cluster-one"] for n in NODES], out
    # the hosts file: the allocation exactly, each node as many times as its CPUs
    cpus = w.cluster.cpus
    want = [n for n in NODES for _ in range(cpus)]
    assert sorted(tagged(out, "HOSTSFILE")) == [[n, *want] for n in NODES], out
    assert sorted(tagged(out, "ETCHOSTS")) == [[n, *NODES] for n in NODES], out
    # four containers, one per node (each node's own mount namespace)
    namespaces = dict(tagged(out, "MNTNS"))
    assert sorted(namespaces) == NODES and len(set(namespaces.values())) == 4, out
    for node in NODES:
        log = w.cluster.slurmd_log(node)
        assert "container prepared" in log, (node, log[-2000:])
    assert w.leftover_mounts() == {}


def test_srun_with_image_on_four_nodes_outside_a_job(vcluster, v1):
    """``srun -N 4 --exclusive --image=… shifter hostname`` from the login node."""
    w = vcluster
    res = w.srun("-N", "4", "--exclusive", f"--image={w.tag('v1')}", "shifter", "sh", "-c",
                 'echo "$(hostname) $(grep ^ID= /etc/os-release)"')
    assert res.returncode == 0, res
    assert sorted(res.stdout.split("\n")[:-1]) == [f"{n} ID=cluster-one" for n in NODES], res
    w.cluster.settle()  # srun returns before the epilogs have run
    assert w.leftover_mounts() == {}


# -- MPI across nodes ----------------------------------------------------------------------

RING_JOB = """#!/bin/sh
timeout 120 srun -N 4 -n 8 --mpi=pmi2 shifter --module={module} sh -c \\
  'echo "TASK $SLURM_PROCID $(hostname) $(wc -l < /var/hostsfile)"; cd /opt/app; exec ./ring'
echo "SRUN $?"
"""


def ring_result(out: str) -> tuple[dict[int, str], dict[int, str]]:
    """(rank -> node it ran on, rank -> the libmpi file it ran on) from the job's output."""
    hosts = {int(fields[0]): fields[1] for fields in tagged(out, "TASK")}
    libs = {}
    for line in out.splitlines():
        if line.startswith("rank "):
            head, lib = line.split(": libmpi ", 1)
            libs[int(head.split()[1])] = lib
    return hosts, libs


@pytest.mark.parametrize("module, lib", [("mpich", SITE_LIB), ("mpichbind", BIND_LIB)])
def test_mpi_ring_across_four_nodes_on_the_sites_mpich(vcluster, mpi_image, module, lib):
    """``srun -N 4 -n 8 --mpi=pmi2 shifter --module=… ./ring``: the image's MPICH-ABI
    program runs on the site's MPICH (copied into the container, or bind-mounted through
    siteFs), two ranks per node, and the token passes through all eight ranks."""
    w = vcluster
    out = run_job(w, RING_JOB.format(module=module), "-N", "4", "--exclusive",
                  f"--image={w.tag('mpi')}", f"--module={module}")
    assert tagged(out, "SRUN") == [["0"]], out
    hosts, libs = ring_result(out)
    assert hosts == {r: NODES[r // 2] for r in range(8)}, out
    assert libs == {r: lib for r in range(8)}, out
    assert "ring: token 12345678 after 8 ranks" in out, out
    # every task ran in the prepared container (it has the job's hosts file)
    assert all(count == "8" for _, _, count in tagged(out, "TASK")), out


# -- ssh between the job's containers -------------------------------------------------------

SSH_JOB = """#!/bin/sh
srun -N 1 -n 1 -w node3 shifter readlink /proc/self/ns/mnt | sed 's/^/NODE3NS /'
srun -N 1 -n 1 -w node1 shifter sh -c 'echo "FROM $(hostname)"; \\
  ssh -v node3 "echo LANDED \\$(hostname) \\$(readlink /proc/self/ns/mnt) \\
    \\$(grep ^ID= /etc/os-release)"' 2> {err}
echo "SSH $?"
"""


def test_ssh_from_one_node_lands_in_the_container_of_another(vcluster, v1, tmp_path):
    """With ``enable_sshd``: ``ssh node3 …`` from a task on node 1 is served by the
    container on node 3 (its hostname, its mount namespace, the image), authenticated
    with the job's key from ``~/.shifter``."""
    w = vcluster
    err = w.jobdir / "ssh.err"
    out = run_job(w, SSH_JOB.format(err=err), "-N", "4", "--exclusive",
                  f"--image={w.tag('v1')}", f"--volume={HOME}:{HOME}")
    assert tagged(out, "SSH") == [["0"]], (out, err.read_text())
    assert tagged(out, "FROM") == [["node1"]], out
    (ns,) = tagged(out, "NODE3NS")[0]
    assert tagged(out, "LANDED") == [["node3", ns, "ID=cluster-one"]], out
    log = err.read_text()
    assert f"Server accepts key: {HOME}/.shifter/id_ed25519" in log, log
    err.unlink()


CCM_JOB = """#!/bin/sh
srun -N 1 -n 1 -w node1 shifter sh -c 'cd /opt/app; timeout 120 mpiexec -launcher ssh \\
  -f /var/hostsfile -n 8 sh -c "echo TASK \\$PMI_RANK \\$(hostname) \\
  \\$(grep ^ID= /etc/os-release) \\$(readlink /proc/self/ns/mnt); exec ./ring"'
echo "MPIEXEC $?"
"""


def test_mpiexec_launches_ranks_over_ssh_in_the_jobs_containers(vcluster, mpi_image):
    """The CCM-style use: one task runs the image's ``mpiexec`` with ssh as its launcher
    and the container's hosts file; its proxies land in the job's containers on all
    four nodes and the ranks (on the image's own MPI) pass the token round."""
    w = vcluster
    out = run_job(w, CCM_JOB, "-N", "4", "--exclusive", f"--image={w.tag('mpi')}",
                  f"--volume={HOME}:{HOME}")
    assert tagged(out, "MPIEXEC") == [["0"]], out
    hosts, libs = ring_result(out)
    assert sorted(set(hosts.values())) == NODES, out
    # the ranks ran in the image, one container (mount namespace) per node
    tasks = tagged(out, "TASK")
    assert {fields[2] for fields in tasks} == {"ID=cluster-mpi"}, out
    assert len({(fields[1], fields[3]) for fields in tasks}) == 4, out
    assert len({fields[3] for fields in tasks}) == 4, out
    assert libs == {r: IMAGE_LIB for r in range(8)}, out
    assert "ring: token 12345678 after 8 ranks" in out, out


def test_nodes_are_separate_hosts(vcluster):
    """What makes them nodes: each its own hostname, address and mount namespace; no
    interface of the machine's own network in theirs."""
    c = vcluster.cluster
    seen = set()
    for node in NODES:
        res = c.on_node(node, ["sh", "-c", "hostname; ip -o -4 addr show; "
                               "readlink /proc/self/ns/mnt /proc/self/ns/net"])
        assert res.returncode == 0, res
        lines = res.stdout.splitlines()
        assert lines[0] == node
        addrs = [line.split()[3] for line in lines if " inet " in line]
        assert sorted(addrs) == sorted(["127.0.0.1/8", f"{c.address(node)}/16"]), res.stdout
        seen.add(tuple(lines[-2:]))
    assert len(seen) == 4
    own = (os.readlink("/proc/self/ns/mnt"), os.readlink("/proc/self/ns/net"))
    assert own not in seen


def test_the_image_dir_is_one_filesystem_that_every_node_mounts(vcluster, v1):
    """The gateway (on the service node) wrote the image to its own disk; every node and
    the login node see it at the site's imagePath, through a network mount of that disk."""
    w = vcluster
    image_dir = str(w.site.image_dir)
    for node in NODES:
        res = w.cluster.on_node(node, ["sh", "-c", f"ls {image_dir}; "
                                       f"grep ' {image_dir} ' /proc/self/mountinfo"])
        assert res.returncode == 0, res
        assert f"{v1}.squashfs" in res.stdout.split(), res
        # one mount there: the service node's disk, over the cluster network (SFTP)
        (mount,) = [line for line in res.stdout.splitlines() if " - " in line]
        source = f"root@10.251.0.2:{w.export}"
        assert mount.split(" - ")[1].split()[:2] == ["fuse.sshfs", source], mount
    res = w.cluster.as_user(ALICE, ["ls", image_dir])
    assert f"{v1}.meta" in res.stdout.split(), res
    assert (w.export / f"{v1}.squashfs").is_file()
    # the gateway is on the service node's network: its health check answers there
    assert w.gateway.url == "http://10.251.0.2:8080"
    assert w.gateway.request("GET", "/healthz", auth=False).status_code == 200


def test_the_cluster_network_has_no_way_out(vcluster):
    """The bridge links only the cluster's namespaces: a node has no route but the
    cluster's /16, and the machine's own network is unreachable from it."""
    c = vcluster.cluster
    for node in NODES:
        res = c.on_node(node, ["ip", "-4", "route"])
        assert res.stdout.split("\n")[:-1] == [
            f"10.251.0.0/16 dev eth0 proto kernel scope link src {c.address(node)} "], res
    res = c.on_node("node1", ["ip", "route", "get", "192.0.2.1"])
    assert res.returncode != 0 and "unreachable" in res.stderr, res
    # and nothing of the cluster's network is in the machine's namespace
    res = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True)
    assert "10.251." not in res.stdout


def test_a_cluster_that_cannot_start_leaves_nothing_behind(tmp_path):
    """A cluster whose daemons cannot authenticate (no munged at that socket) fails to
    start with their logs, and its namespaces and daemons are gone."""
    vc = VirtualCluster(tmp_path / "vc", nodes=2, munge_socket=str(tmp_path / "no-munged"))
    with pytest.raises(RuntimeError) as failed:
        vc.start(timeout=10)
    assert "Munge encode failed" in str(failed.value)  # the daemons' logs say why
    assert vc.leftovers() == []


def test_namespaces_of_a_killed_run_are_deleted_with_what_runs_in_them():
    """A run killed outright (SIGKILL: no teardown) leaves its namespaces and whatever
    outlived its daemons; the next cluster's start deletes them and kills those."""
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    name = f"sc{dead.pid}-1-node9"
    netns.add(name)
    orphan = subprocess.Popen(["nsenter", f"--net={netns.path(name)}", "sleep", "300"])
    try:
        time.sleep(0.2)
        assert name in reap_stale_namespaces()
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert netns.names(name) == []
    finally:
        if orphan.poll() is None:
            orphan.kill()
        netns.delete(name)
        netns.release_dir()
