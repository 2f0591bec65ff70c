"""Slurm integration end to end (docs/behaviour.md, 'Runtime: reusing a prepared container',
'Runtime: setupRoot and unsetupRoot', 'Slurm plugin'): the SPANK plugin in a
real one-node Slurm (slurmctld + slurmd, PrologFlags=alloc), a real gateway and registry,
jobs submitted with real ``sbatch``/``srun`` by the unprivileged test user.

The plugin is a sanitizer build (``make -C slurm sanitize``; a finding aborts the program
that loaded it, which fails the test): ASan + UBSan in the clients (sbatch, salloc, srun,
also inside jobs), which run with libasan preloaded and their own plugstack.conf; UBSan in
slurmd's prolog and epilog, which Slurm starts with an environment of its own (no
preload, so an ASan build cannot load there). The runtime is the test site's (the
sanitized setuid helper and its root-owned udiRoot.conf). Checks are what a user or an admin looks
at: job output, exit codes, ``scontrol show job``, the node's state and slurmd log, and
what is left mounted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from world.gateway import Gateway
from world.imagebuild import File, Symlink, build_layer, push_image
from world.runtime import HELPER, TEST_CONF, RuntimeSite, reachable_temp_dir
from world.slurm import (
    NODE,
    SlurmCluster,
    asan_runtime,
    build_plugin,
    plugstack_line,
    write_launchers,
)
from world.slurmworld import SlurmWorld

from shifter.setuproot import job_host_key

ALICE = "shifter-alice"
REPO = "slurm/app"
PULL_AGAIN_AFTER = 3


class World(SlurmWorld):
    """The one-node test cluster's world; ``data`` is alice's volume source dir."""

    def __init__(self, site: RuntimeSite, cluster: SlurmCluster, gateway: Gateway,
                 registry, munge_socket: str, bindir: Path, jobdir: Path, data: Path) -> None:
        super().__init__(site, cluster, gateway, registry, munge_socket, bindir, jobdir)
        self.data = data

    def pull(self, name: str) -> str:
        """``shifterimg pull`` as the user, then the id the tag index holds."""
        res = self.site.run(ALICE, [str(self.bindir / "shifterimg"), "pull", self.tag(name)],
                            env=self.env(), timeout=120)
        assert res.returncode == 0 and "READY" in res.stdout, res
        from shifter.frontend import quote_tag

        index = self.site.image_dir / "tags" / "docker" / quote_tag(self.tag(name))
        return index.read_text().strip()

    def setuproot_argv(self) -> list[str]:
        """The argv the plugin ran setupRoot with, for the last prepared job."""
        text = (self.site.base.parent / "setupRoot.argv").read_text()
        return text.split("\0")[:-1]


def site_parts(base: Path, test_users, munged, registry,
               **gateway_extra) -> tuple[RuntimeSite, Path, Path, Path, Gateway]:
    """What every test cluster's world has: a runtime site, the launchers, alice's job and
    data dirs, a gateway that places images in the site's imagePath."""
    site = RuntimeSite.create(base / "site")
    bindir = write_launchers(base / "bin", HELPER)
    uid, gid = test_users[ALICE]
    jobdir, data = base / "jobs", base / "data"
    for d in (jobdir, data):
        d.mkdir()
        os.chown(d, uid, gid)
    gateway = Gateway(base / "gw", munge_socket=munged.socket, registry=registry,
                      extra={"Platforms": {"testsys": {
                          "mungeSocketPath": munged.socket, "accesstype": "local",
                          "admins": ["root"], "local": {"imageDir": str(site.image_dir)}}},
                          **gateway_extra})
    return site, bindir, jobdir, data, gateway


def plugin_cluster(base: Path, munged, bindir: Path, args: dict[str, str],
                   **kwargs) -> SlurmCluster:
    """A cluster whose slurmd loads the UBSan build of the plugin and whose clients load
    the ASan build, both with the plugstack arguments ``args``."""
    return SlurmCluster(
        base / "cluster", munge_socket=munged.socket,
        plugstack=plugstack_line(build_plugin("ubsan"), bindir, TEST_CONF, **args),
        client_plugstack=plugstack_line(build_plugin("asan"), bindir, TEST_CONF, **args),
        client_preload=asan_runtime(), **kwargs)


@pytest.fixture(scope="module")
def world(test_users, munged, registry, tmp_path_factory):
    base = reachable_temp_dir(tmp_path_factory, "slurm")
    # a READY tag pulled over 3 s ago pulls again (re-pull test)
    site, bindir, jobdir, data, gateway = site_parts(
        base, test_users, munged, registry, PullUpdateTimeout=PULL_AGAIN_AFTER)
    (data / "from-the-host").write_text("volume content\n")
    marker = base / "extern-setup-ran"
    extern = base / "extern_setup.sh"
    extern.write_text(f'#!/bin/sh\necho "$SLURM_JOB_ID" >> {marker}\n')
    os.chmod(extern, 0o755)
    # setupRoot as the plugin runs it, its argv kept (NUL-separated) for the tests to read
    logged = bindir / "setupRoot-logged"
    # (and the job host key it got in its environment, root's only: umask 077)
    logged.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {base}/setupRoot.argv\n'
                      f'(umask 077; printf "%s" "${{SHIFTER_SSH_HOSTKEY-}}" '
                      f'> {base}/setupRoot.hostkey)\n'
                      f'exec {bindir}/setupRoot "$@"\n')
    os.chmod(logged, 0o755)
    args = {"setuproot": str(logged), "extern_setup": str(extern)}
    cluster = plugin_cluster(base, munged, bindir, args)
    with gateway:
        site.write_conf(imageGateway=gateway.url)
        with cluster:
            yield World(site, cluster, gateway, registry, munged.socket, bindir, jobdir, data)
        site.write_conf()
    assert_nothing_left(site)


def assert_nothing_left(site: RuntimeSite, seconds: float = 5) -> None:
    """No mount and, within a few seconds, no loop device of ours. The epilog's last
    unmount is lazy (MNT_DETACH) and this kernel clears an autoclear loop device from a
    work queue after its last user goes, so a device can outlive the epilog briefly."""
    assert site.our_mounts() == []
    deadline = time.monotonic() + seconds
    while site.our_loops() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert site.our_loops() == []


@pytest.fixture(autouse=True)
def healthy_node(world):
    """Each test starts and ends with the node idle and nothing of ours mounted."""
    yield
    if not world.cluster.node_state().startswith("IDLE"):
        world.cluster.admin("scancel", "--full", "--user", ALICE)
        world.cluster.settle()
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
    assert world.setuproot_argv() == [
        "-U", str(uid), "-G", str(gid), "-u", ALICE, "-N", f"{NODE}/{world.cluster.cpus}",
        "-v", f"{world.data}:/data", "--", "id", v1]
    # extern_setup ran after setupRoot, as root, with the job's id
    assert str(res.job_id) in (world.site.base.parent / "extern-setup-ran").read_text().split()


def test_srun_with_image_outside_a_job(world, v1):
    res = world.cluster.srun(ALICE, f"--image={world.tag('v1')}", "--exclusive",
                             f"{world.bindir}/shifter", "cat", "/etc/os-release",
                             env=world.env(), cwd=world.jobdir)
    assert res.returncode == 0, res
    assert "ID=slurm-one" in res.stdout
    world.cluster.settle()  # srun returns before the epilog has run
    assert world.site.our_mounts() == []


def test_tasks_of_a_job_do_not_ask_the_gateway(world, tmp_path):
    """The tag resolves once, at submit: with the tag index unavailable the checker asks
    the gateway (one lookup); the job's six tasks run the pinned id and ask nothing."""
    world.push("gwonly", "slurm-gwonly", tmp_path)
    image_id = world.pull("gwonly")
    from shifter.frontend import quote_tag

    (world.site.image_dir / "tags" / "docker" / quote_tag(world.tag("gwonly"))).unlink()
    script = "#!/bin/sh\nfor i in 1 2 3; do srun -n2 shifter cat /etc/os-release; done\n"
    res = world.sbatch(script, f"--image={world.tag('gwonly')}", "--exclusive", "-n2")
    assert res.returncode == 0, res
    assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    assert world.output(res.job_id).count("ID=slurm-gwonly") == 6
    rows = world.gateway.request("GET", "/api/metrics/testsys/?limit=100", user="root").json()
    lookups = [r for r in rows if r.get("tag", "").endswith(f"{REPO}:gwonly")]
    assert len(lookups) == 1 and lookups[0]["id"] == image_id, rows


def test_a_job_keeps_its_image_when_the_tag_is_pulled_again(world, v1, tmp_path):
    """Job A runs while the tag is re-pulled to a new image; job B waits in the queue
    meanwhile. Both run the image the tag named when they were submitted; job C,
    submitted after the pull, runs the new one."""
    world.push("moving", "slurm-before", tmp_path / "a")
    before = world.pull("moving")
    pulled_at = time.monotonic()
    go = world.jobdir / "go"
    script = (f"#!/bin/sh\nsrun shifter cat /etc/os-release\n"
              f"while [ ! -e {go} ]; do sleep 0.1; done\n"
              "srun shifter cat /etc/os-release\n")
    tag = world.tag("moving")
    a = world.sbatch(script, f"--image={tag}", "--exclusive")
    assert a.returncode == 0, a
    world.cluster.wait_until(a.job_id, lambda j: j.get("JobState") == "RUNNING")
    b = world.sbatch("#!/bin/sh\nsrun shifter cat /etc/os-release\n", f"--image={tag}",
                     "--exclusive")
    assert b.returncode == 0, b
    assert world.cluster.state(b.job_id) == "PENDING"
    try:
        world.push("moving", "slurm-after", tmp_path / "b")
        time.sleep(max(0.0, pulled_at + PULL_AGAIN_AFTER + 0.5 - time.monotonic()))
        after = world.pull("moving")
        assert after != before
    finally:
        go.write_text("")
        os.chmod(go, 0o644)
    c = world.sbatch("#!/bin/sh\nsrun shifter cat /etc/os-release\n", f"--image={tag}",
                     "--exclusive")
    for job in (a, b, c):
        assert world.cluster.wait(job.job_id) == "COMPLETED", world.output(job.job_id)
    os.unlink(go)
    assert world.output(a.job_id).count("ID=slurm-before") == 2
    assert "ID=slurm-after" not in world.output(a.job_id)
    assert "ID=slurm-before" in world.output(b.job_id)
    assert "ID=slurm-after" in world.output(c.job_id)


def test_a_job_without_the_whole_node_builds_per_task_containers(world, v1):
    """No --exclusive: nothing is prepared (another job may share the node); each task
    builds its own container (its own mount namespace), of the pinned image."""
    script = ("#!/bin/sh\nsrun shifter readlink /proc/self/ns/mnt\n"
              "srun shifter cat /etc/os-release\n")
    res = world.sbatch(script, f"--image={world.tag('v1')}", "-n1")
    assert res.returncode == 0, res
    assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    namespace, os_id = world.output(res.job_id).splitlines()[:2]
    assert namespace.startswith("mnt:[") and namespace != os.readlink("/proc/self/ns/mnt")
    assert os_id == "ID=slurm-one"
    assert f"job {res.job_id} is not exclusive" in world.cluster.slurmd_log()


def test_a_partition_of_whole_nodes_gets_prepared_containers(world, v1):
    """OverSubscribe=EXCLUSIVE on the partition counts as --exclusive."""
    res = world.sbatch("#!/bin/sh\nsrun shifter readlink /proc/self/ns/mnt\n",
                       f"--image={world.tag('v1')}", "--partition=whole")
    assert res.returncode == 0, res
    assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    assert world.output(res.job_id).strip() == os.readlink("/proc/self/ns/mnt")
    assert f"job {res.job_id}: container prepared" in world.cluster.slurmd_log()


def test_enable_sshd_ssh_from_a_task_lands_in_the_jobs_container(world, v1, udiimage):
    """enable_sshd=1 (docs/behaviour.md, 'Runtime: per-container sshd'): the user's job key
    (~/.shifter/id_ed25519, made at submit if missing) goes to setupRoot -s; the container's
    sshd runs as the user on port 1204, and `ssh <node>` from a task (the injected ssh, in
    an image without one) lands in the same prepared container. The epilog stops it."""
    home = Path(f"/home/{ALICE}")
    subprocess.run(["rm", "-rf", str(home / ".shifter")], check=True)
    world.site.write_conf(imageGateway=world.gateway.url, optUdiImage=str(udiimage),
                          siteEnvPrepend="PATH=/opt/udiImage/bin")
    script = (f"#!/bin/sh\nsrun shifter readlink /proc/self/ns/mnt\n"
              f"srun shifter ssh {NODE} 'echo REMOTE $(id -un); cat /var/shifterConfig.json; "
              f"echo; readlink /proc/self/ns/mnt'\n"
              # the host key the node's sshd presents, and the one key the containers trust
              f"echo SCAN $(ssh-keyscan -p 1204 -t ed25519 {NODE} 2>/dev/null)\n"
              "srun shifter sh -c 'echo KNOWN $(grep -v ^# /opt/udiImage/etc/ssh_known_hosts);"
              " echo TASKENV $(env | grep -c SSH_HOSTKEY)'\n"
              "echo JOBENV $(env | grep -c SSH_HOSTKEY)\n")
    try:
        with world.plugstack_args("enable_sshd=1"):
            res = world.sbatch(script, f"--image={world.tag('v1')}", "--exclusive",
                               f"--volume={home}:{home}")
            assert res.returncode == 0, res
            assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    finally:
        world.site.write_conf(imageGateway=world.gateway.url)
    key = home / ".shifter" / "id_ed25519"
    st = key.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (world.site.spawn_kwargs(ALICE)["user"], 0o600)
    public = (home / ".shifter" / "id_ed25519.pub").read_text().strip()
    assert public.startswith("ssh-ed25519 ")
    argv = world.setuproot_argv()
    assert argv[argv.index("-s") + 1] == public
    lines = world.output(res.job_id).splitlines()
    task_ns = lines[0]
    assert f"REMOTE {ALICE}" in lines, world.output(res.job_id)
    config = json.loads(next(line for line in lines if line.startswith("{")))
    assert config["identifier"] == v1 and config["user"] == ALICE
    remote_ns = lines[lines.index(next(li for li in lines if li.startswith("{"))) + 1]
    assert remote_ns == task_ns  # the ssh session is in the task's (prepared) container
    # Host key checking is on and passed: the sshd presents the job's host key (made at
    # submit, given to setupRoot in its environment, not in its argv), which is the one
    # key in the containers' known_hosts; it is not in the job's or the tasks' environment.
    host_key = (world.site.base.parent / "setupRoot.hostkey").read_text()
    assert host_key and host_key not in "\0".join(argv)
    _, public = job_host_key(host_key)
    scan = next(li for li in lines if li.startswith("SCAN ")).split()
    known = next(li for li in lines if li.startswith("KNOWN ")).split()
    assert scan[2:4] == public.split() and known[2:4] == public.split(), lines
    assert "TASKENV 0" in lines and "JOBENV 0" in lines, lines
    # this cluster has no extern step: the admin is told the sshd is outside the job
    assert (f"shifter: job {res.job_id}: the container's sshd stays outside the job's cgroups"
            in world.cluster.slurmd_log())
    # The epilog's unsetupRoot stopped the job's sshd: nothing listens on 1204.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", 1204)) != 0
    # Without enable_sshd nothing is made and no key is passed.
    subprocess.run(["rm", "-rf", str(home / ".shifter")], check=True)
    res = world.sbatch("#!/bin/sh\ntrue\n", f"--image={world.tag('v1')}", "--exclusive")
    assert world.cluster.wait(res.job_id) == "COMPLETED"
    assert "-s" not in world.setuproot_argv() and not (home / ".shifter").exists()


def test_ccm_runs_the_nodes_own_root_when_enabled(world):
    """enable_ccm=1 adds --ccm: the job's container is the node's own root (local:/),
    which the site must allow (allowLocalChroot=1)."""
    res = world.sbatch("#!/bin/sh\ntrue\n", "--ccm")
    assert res.returncode != 0 and "unrecognized option '--ccm'" in res.stderr
    with world.plugstack_args("enable_ccm=1"):
        res = world.sbatch("#!/bin/sh\ntrue\n", "--ccm", f"--image={world.tag('v1')}")
        assert res.returncode != 0 and "Cannot specify --ccm mode with --image" in res.stderr
        res = world.sbatch("#!/bin/sh\ntrue\n", "--ccm")
        assert res.returncode != 0 and "allowLocalChroot is not 1" in res.stderr, res
        world.site.write_conf(imageGateway=world.gateway.url, allowLocalChroot="1")
        try:
            res = world.sbatch("#!/bin/sh\nsrun shifter cat /etc/os-release\n"
                               "echo $SHIFTER_IMAGETYPE:$SHIFTER_IMAGE\n", "--ccm", "--exclusive")
            assert res.returncode == 0, res
            assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
        finally:
            world.site.write_conf(imageGateway=world.gateway.url)
    out = world.output(res.job_id)
    assert Path("/etc/os-release").read_text().splitlines()[0] in out.splitlines()
    assert "local:/" in out.splitlines()
    assert world.setuproot_argv()[-3:] == ["--", "local", "/"]


# -- refused at submit ---------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--volume=/tmp:/data"], "Cannot specify shifter volumes without specifying the image first!"),
    (["--image=IMAGE", "--volume=relative/path:/data"], "relative/path"),
    (["--image=IMAGE", "--volume=/tmp:/etc/x"], "/etc/x"),
    (["--image=IMAGE", "--module=nosuch"], "Unknown shifter module: nosuch"),
    # (pulled at submit, and the pull fails: the registry does not answer)
    (["--image=docker:127.0.0.1:1/no/such:image"], "could not be pulled: the job was not"),
    (["--image=id:" + "0" * 64], "FAILED to find requested image."),
    (["--image=docker:bad chars!"], "Invalid character U+0020 in docker image tag"),
])
def test_bad_submissions_are_refused_with_the_reason(world, v1, args, message):
    args = [a.replace("IMAGE", world.tag("v1")) for a in args]
    before = world.cluster.admin("squeue", "-h", "-t", "all").stdout
    res = world.sbatch("#!/bin/sh\ntrue\n", *args)
    assert res.returncode != 0 and res.job_id is None, res
    assert message in res.stderr
    assert world.cluster.admin("squeue", "-h", "-t", "all").stdout == before


def test_srun_and_salloc_refuse_bad_options_too(world, v1):
    res = world.cluster.srun(ALICE, "--volume=/tmp:/data", "true", env=world.env())
    assert res.returncode != 0
    assert "Cannot specify shifter volumes without specifying the image first!" in res.stderr
    res = world.cluster.as_user(ALICE, ["salloc", f"--image={world.tag('v1')}",
                                        "--module=nosuch", "true"], env=world.env())
    assert res.returncode != 0 and "Unknown shifter module: nosuch" in res.stderr


@pytest.mark.parametrize("arg, message", [
    ("enable_sshd=yes", "enable_sshd must be 0 or 1, not 'yes'"),
    ("extern_cgroup=2", "extern_cgroup must be 0 or 1, not '2'"),
    ("pull_timeout=10m", "pull_timeout must be 0 (never pull at submit) to 86400 seconds, "
                         "not '10m'"),
    ("pull_timeout=-1", "not '-1'"),
    # Shifter's memory cgroup mount: the job's cgroups are read from /proc instead
    ("memory_cgroup=/sys/fs/cgroup/memory", "memory_cgroup is not supported"),
])
def test_a_bad_plugstack_argument_is_named(world, tmp_path, arg, message):
    """A typo in plugstack.conf stops every submission with the argument named."""
    stack = tmp_path / "plugstack.conf"
    line = world.cluster.client_plugstack_conf.read_text().strip()
    stack.write_text(line + f" {arg}\n")
    conf = tmp_path / "slurm.conf"
    conf.write_text(world.cluster.client_conf.read_text().replace(
        str(world.cluster.client_plugstack_conf), str(stack)))
    for path in (tmp_path, stack, conf):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    res = world.cluster.sbatch(ALICE, "#!/bin/sh\ntrue\n", env=world.env(SLURM_CONF=str(conf)))
    assert res.returncode != 0 and res.job_id is None
    assert message in res.stderr, res.stderr


# -- setupRoot fails on the node -------------------------------------------------------------


@contextlib.contextmanager
def released_after(world, job_id: int, break_it) -> Iterator[None]:
    """Between submit (held, ``sbatch -H``) and the prolog: ``break_it()``, then release."""
    break_it()
    world.cluster.admin("scontrol", "release", str(job_id))
    yield


def test_a_vanished_volume_source_fails_the_job_and_keeps_the_node(world, v1):
    """A user error (the job's volume source removed between submit and prolog) must not
    drain the node: setupRoot says it is the user's (exit 2), the prolog succeeds, and the
    job fails FAILED with the reason in its output file; the node stays in service."""
    source = world.data / "vanishing"
    source.mkdir()
    os.chown(source, *alice_ids(world))
    res = world.sbatch("#!/bin/sh\necho the job ran\n", f"--image={world.tag('v1')}",
                       f"--volume={source}:/data", "--exclusive", "-H")
    assert res.returncode == 0, res  # the source exists at submit
    try:
        with released_after(world, res.job_id, source.rmdir):
            assert world.cluster.wait(res.job_id) == "FAILED", world.output(res.job_id)
        world.cluster.settle()
        out = world.output(res.job_id)
        assert "the job ran" not in out
        assert f"Cannot mount from {source} to /data: the source does not exist" in out, out
        assert f"shifter: setupRoot refused job {res.job_id}" in out, out
        assert world.cluster.node_state().startswith("IDLE"), world.cluster.node_reason()
        job = world.cluster.job(res.job_id)
        assert job["Comment"].startswith(f"shifter: setupRoot refused on {NODE}:"), job
        assert job["ExitCode"] == "1:0", job
        assert str(source) in world.cluster.slurmd_log()
        assert world.site.our_mounts() == []
    finally:
        world.cluster.admin("scancel", str(res.job_id))
    # The next job on that node runs as usual.
    res = world.sbatch("#!/bin/sh\nsrun shifter cat /etc/os-release\n",
                       f"--image={world.tag('v1')}", "--exclusive")
    assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)


def test_a_denied_image_fails_the_job_and_keeps_the_node(world, v1):
    """The image's ACL changed after submit so that the user may no longer use it."""
    meta = world.site.image_dir / f"{v1}.meta"
    saved = meta.read_text()
    res = world.sbatch("#!/bin/sh\necho the job ran\n", f"--image={world.tag('v1')}",
                       "--exclusive", "-H")
    assert res.returncode == 0, res
    try:
        with released_after(world, res.job_id,
                            lambda: meta.write_text(saved + "USERACL: 4294967000\n")):
            assert world.cluster.wait(res.job_id) == "FAILED", world.output(res.job_id)
        world.cluster.settle()
        assert "FAILED permission denied to image" in world.output(res.job_id)
        assert world.cluster.node_state().startswith("IDLE"), world.cluster.node_reason()
    finally:
        meta.write_text(saved)
        world.cluster.admin("scancel", str(res.job_id))


def test_a_node_fault_still_drains_the_node_and_holds_the_job(world, v1):
    """What only root can break (here the site's udiRoot.conf made group-writable, which
    the helper refuses) is the node's fault: the prolog fails, Slurm drains the node and
    requeues the job held, and the user is told why in the output file."""
    res = world.sbatch("#!/bin/sh\necho the job ran\n", f"--image={world.tag('v1')}",
                       "--exclusive", "-H")
    assert res.returncode == 0, res
    try:
        with released_after(world, res.job_id, lambda: os.chmod(TEST_CONF, 0o664)):
            assert world.cluster.wait(res.job_id) == "HELD"
        out = world.output(res.job_id)
        assert "the job ran" not in out
        assert "setupRoot failed" in out and "FAILED to parse udiRoot configuration" in out, out
        job = world.cluster.job(res.job_id)
        assert job["Comment"].startswith(f"shifter: setupRoot failed on {NODE}:"), job
        assert "FAILED to parse udiRoot configuration" in world.cluster.slurmd_log()
        assert world.cluster.node_state().startswith("DRAIN")  # Slurm's rule for a failed prolog
        assert world.site.our_mounts() == []
    finally:
        os.chmod(TEST_CONF, 0o644)
        world.cluster.admin("scancel", str(res.job_id))
        world.cluster.resume()
    assert world.cluster.node_state().startswith("IDLE")


def test_a_fifo_as_the_output_file_does_not_block_the_prolog(world, v1):
    """The prolog's failure note goes only into a regular file: a FIFO with no reader as
    the job's output file must not hang the prolog (its timeout is unlimited by default)."""
    fifo = world.jobdir / "fifo.out"
    os.mkfifo(fifo)
    os.chown(fifo, *alice_ids(world))
    res = world.cluster.sbatch(ALICE, "#!/bin/sh\necho the job ran\n", f"--output={fifo}",
                               f"--image={world.tag('v1')}", "--exclusive", "-H",
                               env=world.env(), cwd=world.jobdir)
    assert res.returncode == 0, res
    try:
        with released_after(world, res.job_id, lambda: os.chmod(TEST_CONF, 0o664)):
            assert world.cluster.wait(res.job_id, timeout=30) == "HELD"
        deadline = time.monotonic() + 30
        while not world.cluster.node_state().startswith("DRAIN"):
            assert time.monotonic() < deadline, world.cluster.node_state()
            time.sleep(0.2)
        assert "could not write the failure" in world.cluster.slurmd_log()
    finally:
        os.chmod(TEST_CONF, 0o644)
        # unblock a prolog stuck in open() (today's code), so the cluster can go on
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        world.cluster.admin("scancel", str(res.job_id))
        world.cluster.settle()
        world.cluster.resume()
        fifo.unlink()


def alice_ids(world) -> tuple[int, int]:
    kw = world.site.spawn_kwargs(ALICE)
    return kw["user"], kw["group"]


def test_srun_shows_why_its_allocation_failed(world, v1):
    res = world.cluster.srun(ALICE, f"--image={world.tag('v1')}", "--exclusive",
                             "--volume=/nonexistent-source:/data", "true", env=world.env(),
                             cwd=world.jobdir)
    try:
        assert res.returncode != 0
        assert "shifter: setupRoot refused" in res.stderr and "/nonexistent-source" in res.stderr
        world.cluster.settle()
        assert world.cluster.node_state().startswith("IDLE"), world.cluster.node_reason()
    finally:
        world.cluster.settle()
        world.cluster.resume()


# -- images on demand: a tag the system lacks is pulled at submit ---------------------------


def pulls_started(world, tag: str) -> int:
    """How many pulls of ``tag`` the gateway started (its log)."""
    log = (world.gateway.workdir / "gateway.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines() if "pull start" in line and f"tag={tag} " in line)


def test_a_tag_never_pulled_is_pulled_at_submit_and_the_job_runs(world, tmp_path):
    world.push("ondemand", "slurm-ondemand", tmp_path)
    tag = world.tag("ondemand")
    res = world.sbatch("#!/bin/sh\nsrun shifter cat /etc/os-release\n"
                       "echo SHIFTER_IMAGE=$SHIFTER_IMAGE\n", f"--image={tag}", "--exclusive")
    assert res.returncode == 0 and res.job_id, res
    # The submitter saw the pull on their terminal (sbatch's stderr), ending READY.
    lines = res.stderr.splitlines()
    assert lines[0] == (f"shifter: docker:{tag} is not on this system yet: pulling it now "
                        "(up to 600 s)"), res.stderr
    assert lines[-1].endswith(f"Pulling Image: docker:{tag}, status: READY"), res.stderr
    assert pulls_started(world, tag) == 1
    from shifter.frontend import quote_tag

    pulled = (world.site.image_dir / "tags" / "docker" / quote_tag(tag)).read_text().strip()
    assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    out = world.output(res.job_id).splitlines()
    assert "ID=slurm-ondemand" in out and f"SHIFTER_IMAGE={pulled}" in out, out
    # Now on the system: the next submission pulls nothing and says nothing.
    again = world.sbatch("#!/bin/sh\ntrue\n", f"--image={tag}")
    assert (again.returncode, again.stderr) == (0, ""), again
    assert world.cluster.wait(again.job_id) == "COMPLETED"
    assert pulls_started(world, tag) == 1


def test_a_tag_that_does_not_exist_fails_at_submit_with_the_gateways_reason(world, v1):
    tag = world.tag("no-such-tag")  # in a repository that exists (v1)
    before = world.cluster.admin("squeue", "-h", "-t", "all").stdout
    res = world.sbatch("#!/bin/sh\ntrue\n", f"--image={tag}")
    assert res.returncode != 0 and res.job_id is None, res
    # Ours, then sbatch's own two lines ("spank: required plugin ... failed").
    lines = res.stderr.splitlines()[:-2]
    assert lines[-3].endswith(f"Pulling Image: docker:{tag}, status: FAILURE"), res.stderr
    # shifterimg's line carries the registry's answer, as the gateway recorded it.
    assert lines[-2] == (f"shifterimg: error: pull of docker:{tag} failed: {tag}: tag "
                         f"'no-such-tag' not found in {REPO} at {world.registry.url}"), lines
    assert lines[-1] == f"shifter: docker:{tag} could not be pulled: the job was not submitted"
    assert world.cluster.admin("squeue", "-h", "-t", "all").stdout == before


def test_a_pull_longer_than_pull_timeout_stops_the_submission(world, tmp_path, fault_proxy):
    """pull_timeout=2: the submission stops after 2 s and says how to go on; the gateway
    finishes the pull, and the same submission then goes through with no pull."""
    world.push("slowpull", "slurm-slow", tmp_path)
    proxy = fault_proxy(world.registry)
    proxy.delay(r"/blobs/sha256:", 6.0, times=1)
    tag = f"{proxy.host}/{REPO}:slowpull"
    with world.plugstack_args("pull_timeout=2"):
        started = time.monotonic()
        res = world.sbatch("#!/bin/sh\ntrue\n", f"--image={tag}")
        took = time.monotonic() - started
        assert res.returncode != 0 and res.job_id is None, res
        assert res.stderr.splitlines()[-3] == (
            f"shifter: the pull of docker:{tag} did not finish within 2 s (pull_timeout in "
            f"plugstack.conf); the gateway goes on with it: submit again once "
            f"`shifterimg lookup docker:{tag}` prints its id"), res.stderr
        assert took < 6, took
        assert world.gateway.wait_status(tag, timeout=60)["status"] == "READY"
        res = world.sbatch("#!/bin/sh\nsrun shifter cat /etc/os-release\n", f"--image={tag}")
        assert (res.returncode, res.stderr) == (0, ""), res
        assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    assert "ID=slurm-slow" in world.output(res.job_id)


def test_nothing_is_pulled_inside_a_job_or_with_pull_timeout_0(world, v1, tmp_path):
    """Compute nodes never pull: a batch script's srun (on the compute node, inside the
    job) with a tag the system lacks is refused as before. pull_timeout=0 turns pulls at
    submit off."""
    world.push("notinjob", "slurm-notinjob", tmp_path)
    tag = world.tag("notinjob")
    script = (f"#!/bin/sh\nsrun --image={tag} shifter true\necho srun-status=$?\n")
    res = world.sbatch(script, f"--image={world.tag('v1')}", "--exclusive")
    assert res.returncode == 0, res
    assert world.cluster.wait(res.job_id) == "COMPLETED", world.output(res.job_id)
    out = world.output(res.job_id)
    assert f"shifter: pull it first: shifterimg pull docker:{tag}" in out, out
    assert "pulling it now" not in out and "srun-status=0" not in out
    with world.plugstack_args("pull_timeout=0"):
        res = world.sbatch("#!/bin/sh\ntrue\n", f"--image={tag}")
        assert res.returncode != 0 and res.job_id is None, res
        assert f"shifter: pull it first: shifterimg pull docker:{tag}" in res.stderr
        assert "pulling it now" not in res.stderr
    assert pulls_started(world, tag) == 0


def test_a_gateway_that_does_not_answer_is_not_taken_for_a_missing_image(world, tmp_path):
    """Only a tag the gateway says it lacks is pulled: with the gateway unreachable the
    submission stops with its reasons, once, and nothing is pulled."""
    world.push("gwdown", "slurm-gwdown", tmp_path)
    tag = world.tag("gwdown")
    world.site.write_conf(imageGateway="http://127.0.0.1:1")
    try:
        res = world.sbatch("#!/bin/sh\ntrue\n", f"--image={tag}")
    finally:
        world.site.write_conf(imageGateway=world.gateway.url)
    assert res.returncode != 0 and res.job_id is None, res
    assert res.stderr.count("ERROR: failed to contact the image gateway.") == 1, res.stderr
    assert "http://127.0.0.1:1: Connection refused" in res.stderr
    assert f"FAILED to lookup docker image {tag}\nFAILED to find requested image.\n" in res.stderr
    assert "pulling it now" not in res.stderr and "pull it first" not in res.stderr
    assert pulls_started(world, tag) == 0


def test_on_a_terminal_the_submitter_sees_the_pull_progress(world, tmp_path, fault_proxy):
    """sbatch on a terminal: shifterimg's line is rewritten in place with layers and
    bytes done while the pull runs (the checker's stderr is sbatch's, the terminal)."""
    import pty
    import re
    import select
    import termios

    small = build_layer([File("small", os.urandom(64).hex())], "gzip", tmp_path / "a")
    big = build_layer([File("big", os.urandom(300_000))], "none", tmp_path / "b")
    busybox = build_layer([File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
                           Symlink("bin/sh", "busybox"), Symlink("bin/true", "busybox")],
                          "gzip", tmp_path / "c")
    push_image(world.registry, REPO, "tty", [busybox, small, big], {"Env": ["PATH=/bin"]})
    proxy = fault_proxy(world.registry)
    proxy.delay(re.escape(big.digest), 3.0)  # PULLING lasts, with layers already done
    tag = f"{proxy.host}/{REPO}:tty"
    script = world.jobdir / "tty.sh"
    script.write_text("#!/bin/sh\nsrun shifter true\n")
    os.chmod(script, 0o755)
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # a bare "\r" in the output is a line rewritten in place
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    env = world.cluster.client_env(world.env())
    proc = subprocess.Popen(
        ["runuser", "-u", ALICE, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()],
         "sbatch", "--parsable", f"--output={world.jobdir}/%j.out", f"--image={tag}",
         str(script)], stdin=slave, stdout=slave, stderr=slave, cwd=world.jobdir,
        start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.2)[0]:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: sbatch and its children closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        proc.wait(timeout=30)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    frames = [f.strip() for f in re.split(r"[\r\n]", text) if f.strip()]
    progress = [f for f in frames if re.search(
        rf"Pulling Image: docker:{re.escape(tag)}, status: PULLING \(\d+ layers, "
        r"[\d.]+ \w?i?B of [\d.]+ \w?i?B\)$", f)]
    assert progress, frames
    assert "\r" in text  # rewritten in place, not a line per update
    job_id = int(frames[-1])
    assert world.cluster.wait(job_id) == "COMPLETED", world.output(job_id)
