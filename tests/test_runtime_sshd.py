"""The per-container sshd (behaviour spec §6.15, issue 6): ``setupRoot -s KEY`` starts
Debian's sshd (injected through optUdiImage by ``shifter-prep-udiimage``) as the user
inside the prepared container on port 1204; ``unsetupRoot`` stops it.

Everything is real: the setuid helper (ASan/UBSan build), the tree the prep tool writes,
a busybox image with no libc (the injected sshd and ssh bring their own glibc), ssh
clients run as the unprivileged test users. Checks are what a user or an admin would
look at: what a login prints and where it lands, /proc of the sshd, the port, what is
left mounted or running after unsetupRoot.

Port 1204 is fixed by the spec: these tests run one after the other (one pytest
process), and each leaves it closed.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from world.runtime import RuntimeSite, busybox_tree, compile_static, mksquashfs, reachable_temp_dir

ALICE = "shifter-alice"
BOB = "shifter-bob"
PORT = 1204
HOST = socket.gethostname()  # resolves through /etc/hosts, which the container copies
CLIENT = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
          "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
          "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


EXTRA_CONF: dict[str, str] = {}  # this module's udiRoot.conf lines (set by ``site``)


def write_conf(site: RuntimeSite, **overrides: str) -> None:
    site.write_conf(**{**EXTRA_CONF, **overrides})


def port_open() -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", PORT)) == 0


def alive(pid: int) -> bool:
    """A process that has exited may stay a zombie until its new parent reaps it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def in_container(site: RuntimeSite, sshd_only: bool = False) -> list[int]:
    """Live processes inside the prepared container (running its copy of sshd)."""
    exe = str(site.udi_mount / "opt/udiImage/sbin/sshd")
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/root") != str(site.udi_mount):
                    continue
                if (not sshd_only or os.readlink(f"/proc/{entry}/exe") == exe) \
                        and alive(int(entry)):
                    out.append(int(entry))
            except OSError:
                continue
    return out


def wait_loops_released(site: RuntimeSite) -> None:
    """A loop device goes with the last process holding the (detached) container."""
    deadline = time.monotonic() + 10
    while site.our_loops() and time.monotonic() < deadline:
        time.sleep(0.1)


def keypair(path: Path, owner: str) -> tuple[Path, str]:
    """An ed25519 key pair owned by ``owner`` (ssh refuses a private key others can read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{owner} test",
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL)
    pw = pwd.getpwnam(owner)
    for p in (path, path.with_name(path.name + ".pub")):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chown(path.parent, pw.pw_uid, pw.pw_gid)
    return path, path.with_name(path.name + ".pub").read_text().strip()


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory, udiimage) -> Iterator[RuntimeSite]:
    base = reachable_temp_dir(tmp_path_factory, "sshd")
    site = RuntimeSite.create(base / "site")
    # Alice's login shell is bash, which the busybox image does not have.
    passwd = site.etc_dir / "passwd"
    lines = [line.rsplit(":", 1)[0] + ":/bin/bash" if line.startswith(f"{ALICE}:") else line
             for line in passwd.read_text().splitlines()]
    passwd.write_text("\n".join(lines) + "\n")
    EXTRA_CONF.update(optUdiImage=str(udiimage), siteEnvPrepend="PATH=/opt/udiImage/bin")
    write_conf(site)
    yield site
    site.root_tool("unsetupRoot")
    assert site.our_mounts() == [] and site.our_loops() == []


@pytest.fixture(scope="module")
def image(site, tmp_path_factory) -> str:
    tree = busybox_tree(tmp_path_factory.mktemp("tree") / "root",
                        {"etc/os-release": 'PRETTY_NAME="sshd test image"\nID=sshd-test\n'})
    (tree / "home" / ALICE).mkdir()  # where the job mounts alice's home
    sqfs = mksquashfs(tree, tmp_path_factory.mktemp("sqfs") / "busybox.squashfs")
    return site.add_image(sqfs, 'ENV: ["PATH=/usr/bin:/bin"]\n')


@pytest.fixture(scope="module")
def keys(site) -> dict[str, tuple[Path, str]]:
    k = site.base / "keys"
    return {
        "alice": keypair(k / "alice" / "job", ALICE),
        "alice-other": keypair(k / "alice" / "other", ALICE),
        "bob": keypair(k / "bob" / "job", BOB),
    }


@pytest.fixture(scope="module")
def alice_home(site, keys) -> Path:
    """Alice's home for the job (mounted at /home/shifter-alice): the job key where the
    container's ssh client config looks for it first, ~/.shifter/id_ed25519 (where the
    Slurm plugin makes it)."""
    home = site.base / "alice-home"
    (home / ".shifter").mkdir(parents=True, exist_ok=True)
    key = home / ".shifter" / "id_ed25519"
    key.write_bytes(keys["alice"][0].read_bytes())
    pw = pwd.getpwnam(ALICE)
    for p in (home, home / ".shifter", key):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o755)
    os.chmod(home / ".shifter", 0o700)
    os.chmod(key, 0o600)
    return home


def setup_args(image: str, key: str, *extra: str) -> list[str]:
    pw = pwd.getpwnam(ALICE)
    return ["-U", str(pw.pw_uid), "-G", str(pw.pw_gid), "-u", ALICE, "-N", f"{HOST}/2",
            *extra, "-s", key, "id", image]


def ssh(site: RuntimeSite, user: str, key: Path, command: str, login: str = ALICE,
        *options: str) -> subprocess.CompletedProcess[str]:
    return site.run(user, ["ssh", "-p", str(PORT), "-i", str(key), *CLIENT, *options,
                           f"{login}@127.0.0.1", command], timeout=60)


def recorded_pid(site: RuntimeSite) -> int:
    return int((site.udi_mount / "var/run/shifter-sshd").read_text().split()[0])


@pytest.fixture(scope="module")
def job(site, image, keys, alice_home) -> Iterator[str]:
    """One prepared job container with its sshd, as the Slurm prolog leaves it."""
    assert not port_open(), "port 1204 is taken: another sshd is running"
    res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1] + "\n",
                                                  "-v", f"{alice_home}:/home/{ALICE}"))
    assert res.returncode == 0, res.stderr
    assert f"{ALICE}'s login shell /bin/bash is not in the image" in res.stderr
    yield f"--volume={alice_home}:/home/{ALICE}"
    done = site.root_tool("unsetupRoot")
    assert done.returncode == 0, done.stderr
    assert not port_open()


# -- the job's sshd -----------------------------------------------------------------------


def test_ssh_lands_in_the_prepared_container(site, image, keys, job):
    res = ssh(site, ALICE, keys["alice"][0],
              "cat /etc/os-release; cat /var/shifterConfig.json; echo; cat /var/hostsfile; "
              "id -un; echo SHELL=$SHELL PATH=$PATH; stat -c 'ROOT %d %i' /")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert 'PRETTY_NAME="sshd test image"' in out  # the image's, not the host's
    config = json.loads(out.split("\n")[2])
    assert config["identifier"] == image and config["user"] == ALICE
    assert f"{HOST}\n{HOST}\n{ALICE}\n" in out
    assert "SHELL=/bin/sh PATH=/opt/udiImage/bin:" in out
    # The same container a task of the job enters (same root filesystem and inode).
    task = site.shifter(ALICE, f"--image=id:{image}", job, "stat", "-c", "ROOT %d %i", "/")
    assert task.returncode == 0, task.stderr
    assert task.stdout.strip() in out.splitlines()


def test_ssh_from_a_task_to_the_node_name(site, image, job):
    """A task runs `ssh <node>` with the container's client config (port 1204, the job
    key in ~/.shifter) through the injected ssh, in an image that has no ssh and no libc."""
    res = site.shifter(ALICE, f"--image=id:{image}", job, "sh", "-c",
                       f"command -v ssh; ssh {HOST} 'echo REMOTE $(id -un); "
                       "stat -c %d:%i /; wc -l < /var/hostsfile'; stat -c %d:%i /")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == "/opt/udiImage/bin/ssh"
    assert lines[1:3] == ["REMOTE", ALICE]
    assert lines[3] == lines[5], "ssh landed in another container"
    assert lines[4] == "2"


def test_sshd_runs_as_the_user_without_privileges(site, job):
    pid = recorded_pid(site)
    status = proc_status(pid)
    pw = pwd.getpwnam(ALICE)
    assert status["Uid"].split() == [str(pw.pw_uid)] * 4
    assert status["Gid"].split() == [str(pw.pw_gid)] * 4
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "1"
    assert os.readlink(f"/proc/{pid}/root") == str(site.udi_mount)
    assert os.readlink(f"/proc/{pid}/exe") == str(site.udi_mount / "opt/udiImage/sbin/sshd")
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{PORT}"], capture_output=True,
                         text=True).stdout
    assert f"pid={pid}," in out


def test_only_the_job_key_of_the_user_gets_in(site, keys, job):
    assert ssh(site, ALICE, keys["alice"][0], "true").returncode == 0
    for user, key, login in ((ALICE, "alice-other", ALICE), (BOB, "bob", BOB),
                             (BOB, "bob", ALICE), (ALICE, "alice", "root")):
        res = ssh(site, user, keys[key][0], "echo IN", login)
        assert res.returncode == 255 and "IN" not in res.stdout, (user, key, login)
        assert "Permission denied (publickey)" in res.stderr, res.stderr
    # Passwords and keyboard-interactive are not even offered.
    res = ssh(site, ALICE, keys["alice-other"][0], "echo IN", ALICE,
              "-o", "PubkeyAuthentication=no",
              "-o", "PreferredAuthentications=password,keyboard-interactive")
    assert res.returncode == 255 and "Permission denied (publickey)." in res.stderr


def test_a_fresh_task_container_leaves_the_job_sshd_alone(site, image, keys, job):
    """A task whose request does not match the prepared container builds its own (in its
    own namespace); the job's sshd keeps serving."""
    pid = recorded_pid(site)
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", "test -e /var/hostsfile "
                       "&& echo PREPARED || echo FRESH")
    assert res.stdout == "FRESH\n", res.stderr
    assert alive(pid)
    assert ssh(site, ALICE, keys["alice"][0], "true").returncode == 0


def test_what_sshd_trusts_is_root_s(site, image, job):
    """Who may log in (authorized_keys, sshd_config) and which process unsetupRoot stops
    (var/run/shifter-sshd) are root's files on the container's read-only root: alice can
    change none of them, from the host or from inside. The host key is alice's own (a
    non-root sshd must read it), 0600, and cannot be replaced either."""
    etc = site.udi_mount / "opt/udiImage/etc"
    pw = pwd.getpwnam(ALICE)
    for path in (etc / "sshd_config", etc / "authorized_keys", etc / "ssh_config",
                 site.udi_mount / "var/run/shifter-sshd", site.udi_mount / "etc/passwd"):
        st = path.stat()
        assert st.st_uid == 0 and st.st_mode & 0o022 == 0, path
    st = (etc / "ssh_host_ed25519_key").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (pw.pw_uid, 0o600)
    assert "AllowUsers shifter-alice\n" in (etc / "sshd_config").read_text()
    attempts = (f"echo evil >> {etc}/authorized_keys", f"rm -f {etc}/sshd_config",
                f"echo 1 1 > {site.udi_mount}/var/run/shifter-sshd",
                f"mv {etc}/ssh_host_ed25519_key {etc}/x",
                f"chmod 644 {etc}/ssh_host_ed25519_key", f"touch {etc}/new")
    for cmd in attempts:
        res = site.run(ALICE, ["sh", "-c", cmd])
        assert res.returncode != 0, cmd
        inside = cmd.replace(str(site.udi_mount), "")
        res = site.shifter(ALICE, f"--image=id:{image}", job, "sh", "-c", inside)
        assert res.returncode != 0, inside
    assert (site.udi_mount / "etc/passwd").read_text().count(":/bin/sh\n") >= 1
    assert f"{ALICE}:" in (site.udi_mount / "etc/passwd").read_text()


def test_unsetup_stops_sshd_and_its_sessions(site, image, keys, job):
    """Runs last of the job's tests: it ends the job the way the epilog does. What ran
    through ssh is not in the job's cgroup (the prolog started sshd): unsetupRoot ends it
    too, with every other process of the user still inside the container."""
    pid = recorded_pid(site)
    session = subprocess.Popen(
        ["ssh", "-p", str(PORT), "-i", str(keys["alice"][0]), *CLIENT, f"{ALICE}@127.0.0.1",
         "echo STARTED; sleep 120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **site.spawn_kwargs(ALICE))
    try:
        assert session.stdout is not None and session.stdout.readline() == "STARTED\n"
        per_connection = [p for p in in_container(site, sshd_only=True) if p != pid]
        assert per_connection, "no per-connection sshd found"
        inside = in_container(site)
        sleeper = [p for p in inside if open(f"/proc/{p}/cmdline").read() == "sleep\x00120\x00"]
        assert len(sleeper) == 1, "the session's command is not running in the container"
        res = site.root_tool("unsetupRoot")
        assert res.returncode == 0, res.stderr
        assert not alive(pid) and not any(alive(p) for p in per_connection + sleeper)
        assert not port_open()
        assert site.our_mounts() == []
        assert session.wait(timeout=30) != 0  # the connection is gone
        wait_loops_released(site)
        assert site.our_loops() == []
    finally:
        session.kill()
        session.wait()


# -- lifecycle and failures ---------------------------------------------------------------


def test_bad_keys_are_refused_with_a_clear_message(site, image, keys):
    good = keys["alice"][1]
    kind, blob = good.split()[:2]
    rsa_named = f"ssh-rsa {blob}"  # an ed25519 blob under another type name
    for key in ("", "not a key", f"{kind}", f"{kind} AAAA", f"{kind} {blob[:-3]}",
                f'command="/bin/sh" {good}', f"ssh-dss {blob}", rsa_named,
                f"{good}\nssh-ed25519 {blob} second", f"{kind}  {blob}", f"{kind} {blob}\x07"):
        res = site.root_tool("setupRoot", *setup_args(image, key))
        assert res.returncode == 2, key  # the user's key: the job fails, not the node
        assert "Invalid ssh public key" in res.stderr, (key, res.stderr)
        assert site.our_mounts() == [] and not port_open()


def test_setup_fails_cleanly_when_port_1204_is_taken(site, image, keys):
    blockers = []
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, PORT))
        s.listen()
        blockers.append(s)
    try:
        res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1]))
    finally:
        for s in blockers:
            s.close()
    assert res.returncode == 1
    assert "Failed to start sshd in the container" in res.stderr
    assert "Address already in use" in res.stderr, res.stderr
    assert site.our_mounts() == [] and site.our_loops() == []


def test_setup_that_fails_after_starting_sshd_stops_it(site, image, keys, tmp_path):
    """An sshd that runs but never listens: setupRoot gives up after 10 s, stops it and
    unmounts everything."""
    tree = tmp_path / "udiImage"
    subprocess.run(["cp", "-a", str(site.conf["optUdiImage"]), str(tree)], check=True)
    fake = compile_static("#include <unistd.h>\nint main(void){for(;;)pause();}\n",
                          tmp_path / "fake-sshd")
    os.replace(fake, tree / "sbin/sshd")
    os.chmod(tmp_path, 0o755)
    write_conf(site, optUdiImage=str(tree))
    try:
        res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1]), timeout=60)
    finally:
        write_conf(site)
    assert res.returncode == 1
    assert "did not listen on port 1204" in res.stderr, res.stderr
    assert site.our_mounts() == []
    leftovers = subprocess.run(["pgrep", "-f", "^/opt/udiImage/sbin/sshd"],
                               capture_output=True, text=True).stdout.split()
    assert [p for p in leftovers if alive(int(p))] == []


@pytest.mark.parametrize("victim_user", [ALICE, "root"])
def test_a_forged_record_cannot_make_unsetup_kill_another_process(
        site, image, keys, victim_user):
    """Even with var/run/shifter-sshd naming another process (exact start time and all),
    unsetupRoot kills only the user's processes inside the container. The record cannot
    be forged by the user (test above); here root does it, on a writable container root,
    to show the check does not rest on that alone."""
    write_conf(site, mountUdiRootWritable="1")
    res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1]))
    victim = None
    try:
        assert res.returncode == 0, res.stderr
        sshd = recorded_pid(site)
        kwargs = {} if victim_user == "root" else site.spawn_kwargs(ALICE)
        victim = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, cwd=site.base,
                                  **kwargs)
        record = site.udi_mount / "var/run/shifter-sshd"
        record.write_text(f"{victim.pid} {start_time(victim.pid)}\n")
        done = site.root_tool("unsetupRoot")
        assert done.returncode == 0, done.stderr
        assert f"not stopping process {victim.pid}" in done.stderr
        assert victim.poll() is None and alive(victim.pid), "unsetupRoot killed the victim"
        assert not alive(sshd) and not port_open()
        assert site.our_mounts() == []
    finally:
        write_conf(site)
        if victim is not None:
            victim.kill()
            victim.wait()
        site.root_tool("unsetupRoot")


# Many session processes at once; each ends by itself after argv[1] seconds.
CROWD = r"""
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    int n = atoi(argv[2]);
    for (int i = 0; i < n; i++) {
        if (fork() == 0) {
            alarm((unsigned)atoi(argv[1]));
            for (;;)
                pause();
        }
    }
    alarm((unsigned)atoi(argv[1]));
    for (;;)
        pause();
}
"""


def count_procs(uid: int, argv0: str) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0] != argv0.encode():
                    continue
            if proc_status(int(entry))["Uid"].split()[0] == str(uid) and alive(int(entry)):
                n += 1
        except (OSError, KeyError):
            continue
    return n


def test_unsetup_stops_more_session_processes_than_it_can_track_at_once(
        site, image, keys, alice_home, tmp_path):
    """Attack: alice starts 1500 processes through the container's sshd. unsetupRoot kept
    a pidfd for each process it killed, in a table of 1024, and stopped scanning when it
    was full: the rest outlived the job (they are not in the job's cgroup)."""
    uid = pwd.getpwnam(ALICE).pw_uid
    crowd = alice_home / "crowd"
    compile_static(CROWD, tmp_path / "crowd")
    crowd.write_bytes((tmp_path / "crowd").read_bytes())
    os.chown(crowd, uid, pwd.getpwnam(ALICE).pw_gid)
    os.chmod(crowd, 0o755)
    argv0 = f"/home/{ALICE}/crowd"
    lifetime, count = 60, 1500
    res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1],
                                                  "-v", f"{alice_home}:/home/{ALICE}"))
    try:
        assert res.returncode == 0, res.stderr
        started = ssh(site, ALICE, keys["alice"][0],
                      f"{argv0} {lifetime} {count} </dev/null >/dev/null 2>&1 &")
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 20
        while count_procs(uid, argv0) <= count and time.monotonic() < deadline:
            time.sleep(0.2)
        assert count_procs(uid, argv0) == count + 1, "the processes did not start"
        done = site.root_tool("unsetupRoot", timeout=120)
        assert done.returncode == 0, done.stderr
        time.sleep(0.5)
        left = count_procs(uid, argv0)
        assert left == 0, f"{left} session processes outlived unsetupRoot"
        assert not port_open()
    finally:
        site.root_tool("unsetupRoot", timeout=120)
        # They end by themselves (alarm): wait for them rather than signal anything.
        deadline = time.monotonic() + lifetime + 5
        while count_procs(uid, argv0) and time.monotonic() < deadline:
            time.sleep(0.5)
        crowd.unlink()
