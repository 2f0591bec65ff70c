"""Slurm integration end to end (behaviour spec §6.5, §6.14, §7): the SPANK plugin in a
real one-node Slurm (slurmctld + slurmd, PrologFlags=alloc), a real gateway and registry,
jobs submitted with real ``sbatch``/``srun`` by the unprivileged test user.

The plugin is the UBSan build (``make -C slurm sanitize``; a finding aborts the program
that loaded it, which fails the test); the runtime is the test site's (the sanitized
setuid helper and its root-owned udiRoot.conf). Checks are what a user or an admin looks
at: job output, exit codes, ``scontrol show job``, the node's state and slurmd log, and
what is left mounted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from world.gateway import Gateway
from world.imagebuild import File, Symlink, build_layer, push_image
from world.runtime import HELPER, TEST_CONF, RuntimeSite
from world.slurm import NODE, SlurmCluster, build_plugin, plugstack_line, write_launchers

ALICE = "shifter-alice"
REPO = "slurm/app"


class World:
    def __init__(self, site: RuntimeSite, cluster: SlurmCluster, gateway: Gateway,
                 registry, munge_socket: str, bindir: Path, jobdir: Path, data: Path) -> None:
        self.site = site
        self.cluster = cluster
        self.gateway = gateway
        self.registry = registry
        self.munge_socket = munge_socket
        self.bindir = bindir
        self.jobdir = jobdir
        self.data = data

    def env(self, **extra: str) -> dict[str, str]:
        """The user's login environment: shifter on PATH, the test helper and config."""
        env = {"PATH": f"{self.bindir}:/usr/local/bin:/usr/bin:/bin",
               "HOME": f"/home/{ALICE}", "USER": ALICE,
               "SHIFTER_HELPER": str(HELPER), "SHIFTER_UDIROOT_CONF": str(TEST_CONF),
               "MUNGE_SOCKET": self.munge_socket}
        env.update(extra)
        return env

    def tag(self, name: str) -> str:
        return f"{self.registry.host}/{REPO}:{name}"

    def push(self, name: str, os_id: str, tmp: Path) -> None:
        entries = [File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)]
        entries += [Symlink(f"bin/{n}", "busybox")
                    for n in ("sh", "cat", "id", "ls", "echo", "readlink", "true", "test",
                              "sleep")]
        entries += [File("etc/os-release", f'ID={os_id}\nPRETTY_NAME="{os_id} image"\n')]
        push_image(self.registry, REPO, name, [build_layer(entries, "gzip", tmp)],
                   {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})

    def pull(self, name: str) -> str:
        """``shifterimg pull`` as the user, then the id the tag index holds."""
        res = self.site.run(ALICE, [str(self.bindir / "shifterimg"), "pull", self.tag(name)],
                            env=self.env(), timeout=120)
        assert res.returncode == 0 and "READY" in res.stdout, res
        from shifter.frontend import quote_tag

        index = self.site.image_dir / "tags" / "docker" / quote_tag(self.tag(name))
        return index.read_text().strip()

    def sbatch(self, script: str, *args: str):
        return self.cluster.sbatch(ALICE, script, f"--output={self.jobdir}/%j.out", *args,
                                   env=self.env(), cwd=self.jobdir)

    def output(self, job_id: int) -> str:
        try:
            return (self.jobdir / f"{job_id}.out").read_text()
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="module")
def world(test_users, munged, registry, tmp_path_factory):
    base = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    for d in (base.parent, base.parent.parent, base):
        os.chmod(d, 0o755)
    site = RuntimeSite.create(base / "site")
    bindir = write_launchers(base / "bin", HELPER)
    uid, gid = test_users[ALICE]
    jobdir, data = base / "jobs", base / "data"
    for d in (jobdir, data):
        d.mkdir()
        os.chown(d, uid, gid)
    (data / "from-the-host").write_text("volume content\n")
    marker = base / "extern-setup-ran"
    extern = base / "extern_setup.sh"
    extern.write_text(f'#!/bin/sh\necho "$SLURM_JOB_ID" >> {marker}\n')
    os.chmod(extern, 0o755)
    gateway = Gateway(base / "gw", munge_socket=munged.socket, registry=registry,
                      extra={"Platforms": {"testsys": {
                          "mungeSocketPath": munged.socket, "accesstype": "local",
                          "admins": ["root"], "local": {"imageDir": str(site.image_dir)}}}})
    plugin = build_plugin("ubsan")
    cluster = SlurmCluster(base / "cluster", munge_socket=munged.socket,
                           plugstack=plugstack_line(plugin, bindir, TEST_CONF,
                                                    extern_setup=str(extern)))
    with gateway:
        site.write_conf(imageGateway=gateway.url)
        with cluster:
            yield World(site, cluster, gateway, registry, munged.socket, bindir, jobdir, data)
        site.write_conf()
    assert site.our_mounts() == [] and site.our_loops() == []


@pytest.fixture(autouse=True)
def healthy_node(world):
    """Each test starts and ends with the node idle and nothing of ours mounted."""
    yield
    if not world.cluster.node_state().startswith("IDLE"):
        world.cluster.admin("scancel", "--full", "--user", ALICE)
        world.cluster.resume()
    assert world.site.our_mounts() == [], "a mount of ours is left after the job"


@pytest.fixture(scope="module")
def v1(world, tmp_path_factory) -> str:
    world.push("v1", "slurm-one", tmp_path_factory.mktemp("layer"))
    return world.pull("v1")


# -- the main job --------------------------------------------------------------------------

JOB = """#!/bin/sh
srun shifter cat /etc/os-release
srun shifter id
srun shifter ls /data
srun shifter cat /var/shifterConfig.json; echo
srun shifter readlink /proc/self/ns/mnt
echo "SHIFTER_IMAGE=$SHIFTER_IMAGE SHIFTER_IMAGETYPE=$SHIFTER_IMAGETYPE"
echo "SHIFTER_IMAGEREQUEST=$SHIFTER_IMAGEREQUEST"
"""


def test_batch_job_runs_its_tasks_in_the_pinned_prepared_container(world, v1):
    res = world.sbatch(JOB, f"--image={world.tag('v1')}", f"--volume={world.data}:/data",
                       "--exclusive")
    assert res.returncode == 0 and res.job_id, res
    assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    lines = world.output(res.job_id).splitlines()
    assert "ID=slurm-one" in lines
    uid, gid = world.site.spawn_kwargs(ALICE)["user"], world.site.spawn_kwargs(ALICE)["group"]
    assert any(line.startswith(f"uid={uid}({ALICE}) gid={gid}({ALICE})") for line in lines)
    assert "from-the-host" in lines
    config = json.loads(next(line for line in lines if line.startswith("{")))
    assert config == {"identifier": v1, "user": ALICE, "volMap": f"{world.data}:/data",
                      "modules": ""}
    # The tasks entered the container setupRoot built in the node's own namespace.
    assert os.readlink("/proc/self/ns/mnt") in lines
    assert f"SHIFTER_IMAGE={v1} SHIFTER_IMAGETYPE=id" in lines
    assert f"SHIFTER_IMAGEREQUEST={world.tag('v1')}" in lines
    assert world.site.our_mounts() == []  # the epilog ran unsetupRoot
    assert "container prepared" in world.cluster.slurmd_log()


def test_srun_with_image_outside_a_job(world, v1):
    res = world.cluster.srun(ALICE, f"--image={world.tag('v1')}", "--exclusive",
                             f"{world.bindir}/shifter", "cat", "/etc/os-release",
                             env=world.env(), cwd=world.jobdir)
    assert res.returncode == 0, res
    assert "ID=slurm-one" in res.stdout
    world.cluster.settle()  # srun returns before the epilog has run
    assert world.site.our_mounts() == []
