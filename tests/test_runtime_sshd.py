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

import base64
import json
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from world.runtime import (
    SETUP,
    RuntimeSite,
    busybox_tree,
    compile_static,
    mksquashfs,
    reachable_temp_dir,
)

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
    assert site.our_mounts() == []
    wait_loops_released(site)  # the kernel clears a lazily unmounted loop asynchronously
    assert site.our_loops() == []


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
                 etc / "ssh_known_hosts",
                 site.udi_mount / "var/run/shifter-sshd", site.udi_mount / "etc/passwd"):
        st = path.stat()
        assert st.st_uid == 0 and st.st_mode & 0o022 == 0, path
    st = (etc / "ssh_host_ed25519_key").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (pw.pw_uid, 0o600)
    assert "AllowUsers shifter-alice\n" in (etc / "sshd_config").read_text()
    client = (etc / "ssh_config").read_text()
    assert "StrictHostKeyChecking yes\n" in client and "StrictHostKeyChecking no" not in client
    attempts = (f"echo evil >> {etc}/authorized_keys", f"rm -f {etc}/sshd_config",
                f"echo 1 1 > {site.udi_mount}/var/run/shifter-sshd",
                f"echo '* ssh-ed25519 AAAA' >> {etc}/ssh_known_hosts",
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
        # The shell prints STARTED before its child has become sleep: give it a moment.
        deadline = time.monotonic() + 5
        while True:
            inside = in_container(site)
            sleeper = [p for p in inside
                       if open(f"/proc/{p}/cmdline").read() == "sleep\x00120\x00"]
            if sleeper or time.monotonic() > deadline:
                break
            time.sleep(0.05)
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
        # as sshd does: a connection of an earlier test may linger in TIME_WAIT on 1204
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    assert site.our_mounts() == []
    wait_loops_released(site)  # a detached root goes with its last reference, not at once
    assert site.our_loops() == []


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
    assert container_sshds() == []


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


# -- squatters (issue 10, hole 6) ------------------------------------------------------------


SQUAT = """
import socket, sys
addr = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if ":" in addr:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((addr, 1204))
s.listen()
print("LISTENING", flush=True)
sys.stdin.read()
"""


def container_sshds() -> list[int]:
    """Live processes running a container's copy of sshd in this network namespace (other
    checkouts may run their tests in their own)."""
    out = subprocess.run(["pgrep", "-f", "^/opt/udiImage/sbin/sshd"], capture_output=True,
                         text=True).stdout.split()
    ours = os.readlink("/proc/self/ns/net")
    found = []
    for pid in map(int, out):
        try:
            if os.readlink(f"/proc/{pid}/ns/net") == ours and alive(pid):
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.parametrize(("address", "shown", "other"), [
    ("0.0.0.0", "0.0.0.0:1204", ("::1", socket.AF_INET6)),
    ("::", "[::]:1204", ("127.0.0.1", socket.AF_INET)),
    ("127.0.0.1", "127.0.0.1:1204", ("::1", socket.AF_INET6)),
])
def test_setup_fails_when_another_user_holds_port_1204_on_one_family(
        site, image, keys, address, shown, other):
    """Attack: bob listens on 0.0.0.0:1204 (IPv4 only; or [::]:1204 IPv6 only, or just
    127.0.0.1:1204, which wins over a wildcard) before the prolog runs. sshd skips the
    address it cannot bind and listens on the other family, so the old start check passed,
    and bob received those ssh connections of alice's job. setupRoot must fail, name bob's
    socket, and leave nothing mounted or running."""
    bob_uid = pwd.getpwnam(BOB).pw_uid
    # An earlier test's container may still be going (its many killed processes are
    # reaped slowly here): judge only what this setupRoot attaches.
    loops_before = set(site.our_loops())
    squatter = subprocess.Popen([sys.executable, "-I", "-c", SQUAT, address],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                **site.spawn_kwargs(BOB))
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "LISTENING\n"
        res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1]))
        assert res.returncode == 1, "setupRoot accepted an sshd while bob holds part of port 1204"
        assert "Failed to start sshd in the container" in res.stderr, res.stderr
        assert shown in res.stderr and f"uid {bob_uid}" in res.stderr, res.stderr
        assert f"pid {squatter.pid}" in res.stderr, res.stderr
        assert site.our_mounts() == []
        deadline = time.monotonic() + 10  # the loop goes with the killed sshd's last reference
        while set(site.our_loops()) - loops_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(site.our_loops()) <= loops_before
        assert container_sshds() == []
        with socket.socket(other[1]) as probe:  # sshd's listener on the other family is gone
            probe.settimeout(2)
            assert probe.connect_ex((other[0], PORT)) != 0
    finally:
        squatter.kill()
        squatter.wait()
        site.root_tool("unsetupRoot")


def squatter_sshd(site: RuntimeSite, directory: Path) -> subprocess.Popen[bytes]:
    """bob's own sshd on port 1204 (both families), with bob's own host key."""
    directory.mkdir()
    host_key, _ = keypair(directory / "host_key", BOB)
    config = directory / "sshd_config"
    config.write_text(f"Port {PORT}\nListenAddress 0.0.0.0\nListenAddress ::\n"
                      f"HostKey {host_key}\nAuthorizedKeysFile {directory}/authorized_keys\n"
                      "PidFile none\nStrictModes no\nUsePAM no\nLogLevel VERBOSE\n")
    os.chmod(directory, 0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd insists on it
    log = open(directory / "log", "wb")  # noqa: SIM115 - the child's
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            **site.spawn_kwargs(BOB))
    log.close()
    deadline = time.monotonic() + 10
    while not port_open():
        assert proc.poll() is None and time.monotonic() < deadline, \
            (directory / "log").read_text()
        time.sleep(0.05)
    return proc


def test_ssh_to_a_squatter_sshd_is_refused_by_host_key_checking(
        site, image, keys, alice_home, tmp_path_factory):
    """Attack: the job's sshd is gone from a node (it died, or never got the port) and bob
    runs his own sshd on port 1204 there. A task's `ssh <node>` used to connect with host
    key checking off and offer alice's name and key to bob's server. Now the container's
    client trusts only the job's host key and stops before authenticating."""
    bob_dir = reachable_temp_dir(tmp_path_factory, "squatter") / "bob-sshd"
    res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1],
                                                  "-v", f"{alice_home}:/home/{ALICE}"))
    squatter = None
    try:
        assert res.returncode == 0, res.stderr
        pid = recorded_pid(site)
        os.kill(pid, 9)  # alice's sshd dies in the middle of the job
        deadline = time.monotonic() + 10
        while port_open() and time.monotonic() < deadline:
            time.sleep(0.05)
        squatter = squatter_sshd(site, bob_dir)
        res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={alice_home}:/home/{ALICE}",
                           "ssh", HOST, "echo REMOTE")
        assert "REMOTE" not in res.stdout
        assert res.returncode == 255, res.stderr
        assert "Host key verification failed" in res.stderr, res.stderr
        log = (bob_dir / "log").read_text()
        assert "Connection from" in log, log  # it did reach bob's sshd ...
        assert ALICE not in log, log  # ... and never told it who it is
    finally:
        if squatter is not None:
            squatter.kill()
            squatter.wait()
        site.root_tool("unsetupRoot")
    assert site.our_mounts() == []


def openssh_private_body(path: Path) -> str:
    """The one-line form of a private key file that SHIFTER_SSH_HOSTKEY carries: the
    base64 between the BEGIN and END lines, joined."""
    lines = path.read_text().split()
    return "".join(w for w in lines if not w.startswith("-----") and w not in
                   ("BEGIN", "END", "OPENSSH", "PRIVATE", "KEY-----"))


def test_the_job_host_key_is_the_containers_and_the_only_one_trusted(
        site, image, keys, alice_home, tmp_path):
    """The Slurm plugin's job host key (SHIFTER_SSH_HOSTKEY, in setupRoot's environment:
    never in an argv) is the container's host key on every node of the job, and the one
    key the container's ssh client trusts (a root-owned known_hosts, checking on)."""
    host_key = tmp_path / "job_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "job host",
                    "-f", str(host_key)], check=True, stdin=subprocess.DEVNULL)
    public = host_key.with_name("job_host_key.pub").read_text().split()[:2]
    env = {"SHIFTER_SSH_HOSTKEY": openssh_private_body(host_key)}
    res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1],
                                                  "-v", f"{alice_home}:/home/{ALICE}"),
                         env=env)
    try:
        assert res.returncode == 0, res.stderr
        etc = site.udi_mount / "opt/udiImage/etc"
        assert (etc / "ssh_host_ed25519_key").read_text() == host_key.read_text()
        scan = subprocess.run(["ssh-keyscan", "-p", str(PORT), "-t", "ed25519", "127.0.0.1"],
                              capture_output=True, text=True, timeout=30)
        assert scan.stdout.split()[1:3] == public, scan
        known = (etc / "ssh_known_hosts").read_text().split("\n")
        entries = [line.split()[1:3] for line in known if line and not line.startswith("#")]
        assert entries == [public]
        ok = site.shifter(ALICE, f"--image=id:{image}", f"--volume={alice_home}:/home/{ALICE}",
                          "ssh", HOST, "echo REMOTE")
        assert ok.returncode == 0 and ok.stdout == "REMOTE\n", ok.stderr
    finally:
        site.root_tool("unsetupRoot")
    assert site.our_mounts() == []


def test_a_bad_job_host_key_is_refused_with_a_clear_message(site, image, keys, tmp_path):
    """The job host key comes from the user's submission: a bad one is the user's error
    (status 2: the job fails, the node stays in service), found before anything is built,
    also when only its private part is damaged (sshd could not load it)."""
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, stdin=subprocess.DEVNULL)
    good = openssh_private_body(other)
    # openssh-key-v1: magic, cipher, kdf, kdf options, key count, public key, then the
    # private section, which opens with two equal check words: make them differ.
    raw = bytearray(base64.b64decode(good))
    at = len(b"openssh-key-v1\0")
    for _ in range(3):
        at += 4 + int.from_bytes(raw[at:at + 4], "big")
    at += 4
    at += 4 + int.from_bytes(raw[at:at + 4], "big")
    raw[at + 4] ^= 0xFF
    damaged = base64.b64encode(bytes(raw)).decode()
    for bad in ("", "not base64!", "AAAA", "b3BlbnNzaC1rZXktdjEAAAAA", damaged):
        res = site.root_tool("setupRoot", *setup_args(image, keys["alice"][1]),
                             env={"SHIFTER_SSH_HOSTKEY": bad})
        assert res.returncode == 2, (bad, res.stderr)
        assert "SHIFTER_SSH_HOSTKEY" in res.stderr, (bad, res.stderr)
        assert site.our_mounts() == [] and not port_open()


def test_the_helper_checks_the_job_host_key_it_is_given(site, image, keys, tmp_path):
    """The helper's own checks of --ssh-hostkey-fd/--ssh-host-pubkey (setupRoot checks
    first; the helper trusts no front end): each refusal names the problem, builds nothing."""
    host_key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True, stdin=subprocess.DEVNULL)
    good, public = host_key.read_bytes(), host_key.with_name("key.pub").read_text().strip()
    pw = pwd.getpwnam(ALICE)
    base = [str(SETUP), "setup", "--user", ALICE, "--uid", str(pw.pw_uid), "--gid",
            str(pw.pw_gid), "--image-id", image, "--modules", "none",
            "--ssh-pubkey", keys["alice"][1]]
    # The key's content is the user's (status 2); how the front end passes it is not (1).
    cases = [
        (good.replace(b"-----END", b"ju!k\n-----END"), public, "Invalid job ssh host key", 2),
        (good.replace(b"\n-----END", b"-----END"), public, "Invalid job ssh host key", 2),
        (b"ssh-ed25519 AAAA\n", public, "Invalid job ssh host key", 2),
        (good, "ssh-ed25519 AAAA", "Invalid ssh public key", 2),
        (good, None, "--ssh-hostkey-fd and --ssh-host-pubkey go together", 1),
        (None, public, "--ssh-hostkey-fd and --ssh-host-pubkey go together", 1),
        (b"pipe", public, "must be a regular file (memfd)", 1),
    ]
    for content, pub, message, status in cases:
        argv, fds = list(base), []
        if content == b"pipe":
            r, w = os.pipe()
            os.write(w, good)
            os.close(w)
            fds.append(r)
        elif content is not None:
            fds.append(os.memfd_create("key", 0))
            os.write(fds[0], content)
        if fds:
            argv += ["--ssh-hostkey-fd", str(fds[0])]
        if pub is not None:
            argv += ["--ssh-host-pubkey", pub]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                 env=site.user_env("root"), pass_fds=fds,
                                 stdin=subprocess.DEVNULL)
        finally:
            for fd in fds:
                os.close(fd)
        assert res.returncode == status and message in res.stderr, (message, res.stderr)
        assert site.our_mounts() == [] and not port_open()
