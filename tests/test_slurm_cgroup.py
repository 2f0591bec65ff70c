"""The per-container sshd inside the job's cgroup (issue 10, hole 4), with a real one-node
Slurm 22.05 that tracks processes with cgroups: ``ProctrackType=proctrack/cgroup``,
``TaskPlugin=task/cgroup,task/affinity``, ``PrologFlags=alloc,contain`` (the extern step)
and ``cgroup.conf`` with ``CgroupPlugin=cgroup/v1`` and ``ConstrainRAMSpace=yes`` (this
machine mounts the v1 controllers, with a v2 hierarchy beside them, and runs no systemd).

A cluster of its own (``tests/test_slurm.py`` keeps the simpler linuxproc one): the
prolog starts the container's sshd outside any job (slurmd's cgroup and rlimits); the
plugin's ``extern_cgroup=1`` moves it into the job's extern step, so that what runs over
``ssh`` is held to the job's memory limit and killed with the job.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_slurm import ALICE, World, assert_nothing_left, plugin_cluster, site_parts
from world.runtime import reachable_temp_dir
from world.slurm import NODE

MEM_MB = 300


@pytest.fixture(scope="module")
def cworld(test_users, munged, registry, udiimage, tmp_path_factory):
    base = reachable_temp_dir(tmp_path_factory, "slurmcg")
    site, bindir, jobdir, data, gateway = site_parts(base, test_users, munged, registry)
    args = {"enable_sshd": "1", "extern_cgroup": "1"}
    cluster = plugin_cluster(base, munged, bindir, args, cgroup=True)
    conf = {"optUdiImage": str(udiimage), "siteEnvPrepend": "PATH=/opt/udiImage/bin"}
    with gateway:
        site.write_conf(imageGateway=gateway.url, **conf)
        with cluster:
            yield World(site, cluster, gateway, registry, munged.socket, bindir, jobdir, data)
        site.write_conf()
    assert_nothing_left(site)


@pytest.fixture(scope="module")
def image(cworld, tmp_path_factory) -> str:
    cworld.push("cg", "slurm-cgroup", tmp_path_factory.mktemp("layer"))
    return cworld.pull("cg")


def _cgroups(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` lines → {controller: path} (v1 controllers only)."""
    out = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(","):
            if name:
                out[name] = path
    return out


PROBE = """#!/bin/sh
cat /proc/self/cgroup
p=$(busybox grep :memory: /proc/self/cgroup | busybox cut -d: -f3)
echo "MEMLIMIT $(cat /sys/fs/cgroup/memory${p%%/step_*}/memory.limit_in_bytes)"
"""


def probe_job(cworld) -> tuple[dict[str, str], str, dict[str, str], str, str]:
    """A job with --mem runs PROBE in a task and over ``ssh <node>``: (the task's cgroups,
    its output, the session's cgroups, its output, the job's cgroup dir)."""
    home = Path(f"/home/{ALICE}")
    subprocess.run(["rm", "-rf", str(home / ".shifter")], check=True)
    probe = home / "cgprobe.sh"
    probe.write_text(PROBE)
    ids = cworld.site.spawn_kwargs(ALICE)
    os.chown(probe, ids["user"], ids["group"])
    script = (f"#!/bin/sh\nsrun shifter sh {probe}\necho SSH\n"
              f"srun shifter ssh {NODE} sh {probe}\n")
    res = cworld.sbatch(script, f"--image={cworld.tag('cg')}", "--exclusive",
                        f"--mem={MEM_MB}M", f"--volume={home}:{home}")
    try:
        assert res.returncode == 0, res
        assert cworld.cluster.wait(res.job_id) == "COMPLETED", cworld.output(res.job_id)
    finally:
        probe.unlink()
    task_out, ssh_out = cworld.output(res.job_id).split("\nSSH\n", 1)
    task = _cgroups(task_out.split("MEMLIMIT")[0])
    # Slurm's own placement of a task: /slurm_<node>/uid_<uid>/job_<id>/step_0/task_0
    job = f"/uid_{ids['user']}/job_{res.job_id}/"
    assert job in task["memory"], task
    job_dir = task["memory"][:task["memory"].index(job) + len(job)]
    return task, task_out, _cgroups(ssh_out.split("MEMLIMIT")[0]), ssh_out, job_dir


def test_ssh_sessions_run_in_the_jobs_cgroup_with_its_memory_limit(cworld, image):
    """A job with --mem: what runs over ssh in the job's container is in the job's own
    cgroup (the extern step's), under the job's memory limit; not in slurmd's, where the
    prolog started the container's sshd."""
    task, task_out, session, ssh_out, job_dir = probe_job(cworld)
    assert session["memory"] == f"{job_dir}step_extern", (session, ssh_out)
    # every hierarchy Slurm tracks the job in (here memory and freezer)
    tracked = [name for name, path in task.items() if path.startswith(job_dir)]
    assert "freezer" in tracked, task
    for controller in tracked:
        assert session[controller].startswith(job_dir), (controller, session)
    assert f"MEMLIMIT {MEM_MB << 20}" in task_out, task_out
    assert f"MEMLIMIT {MEM_MB << 20}" in ssh_out, ssh_out  # the job's limit holds the session


def test_extern_cgroup_0_leaves_the_sshd_where_the_prolog_started_it(cworld, image):
    """The switch: with extern_cgroup=0 the session stays in slurmd's cgroup (the state
    the default fixes), outside the job."""
    with cworld.plugstack_args("extern_cgroup=0"):
        _, _, session, ssh_out, job_dir = probe_job(cworld)
    assert not session["memory"].startswith(job_dir), ssh_out
    assert session["memory"] == _cgroups(Path("/proc/self/cgroup").read_text())["memory"]
