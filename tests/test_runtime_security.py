"""Attacks on the runtime, each made by an unprivileged user, each of which must fail with a clear
message (docs/behaviour.md, 'Security posture'). Where the front end would already refuse, the
attack is also made on the setuid helper directly: a user can always call it by hand.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from world.runtime import (
    ESCALATE_C,
    HELPER,
    SETUP,
    TEST_CONF,
    RuntimeSite,
    busybox_tree,
    compile_static,
    mksquashfs,
    module_site,
)

ALICE = "shifter-alice"
BOB = "shifter-bob"


# A preload library that leaves a mark if the helper (or anything) ever loads it.
PRELOAD_C = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    char path[] = "MARKER";
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) close(fd);
}
"""


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    with module_site(tmp_path_factory, "runtime-sec") as site:
        yield site


@pytest.fixture(scope="module")
def image(site, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("sec-tree")
    tree = busybox_tree(work / "root")
    compile_static(ESCALATE_C, tree / "bin" / "escalate")
    os.chmod(tree / "bin" / "escalate", 0o4755)  # setuid; -all-root makes it root's
    compile_static(ESCALATE_C, tree / "bin" / "capped")
    subprocess.run(["setcap", "cap_setuid,cap_dac_override+ep", str(tree / "bin" / "capped")],
                   check=True)
    # xattrs kept on purpose: even an image that carries file capabilities grants nothing.
    sqfs = mksquashfs(tree, work / "sec.squashfs", keep_xattrs=True)
    listing = subprocess.run(["unsquashfs", "-lls", "-xattrs", str(sqfs), "bin/escalate"],
                             capture_output=True, text=True).stdout
    assert "-rwsr-xr-x root/root" in listing
    return site.add_image(sqfs)


@pytest.fixture(autouse=True)
def clean(site):
    site.write_conf()
    yield
    site.write_conf()
    site.assert_nothing_left()


def owned_dir(site: RuntimeSite, user: str, name: str, mode: int) -> Path:
    import pwd

    pw = pwd.getpwnam(user)
    path = site.base / f"{user}-{name}"
    path.mkdir(exist_ok=True)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    return path


def helper(site: RuntimeSite, user: str, *args: str, env: dict[str, str] | None = None):
    """The setuid helper called directly, bypassing every check of the front end."""
    return site.run(user, [str(HELPER), *args], env=env)


# -- volumes -------------------------------------------------------------------------------


def test_volume_source_the_user_cannot_read(site, image):
    secret = owned_dir(site, BOB, "private", 0o700)
    (secret / "bobs-secret").write_text("bob only\n")
    res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={secret}:/data",
                       "ls", "/data")
    assert res.returncode == 1, res.stdout
    assert "bobs-secret" not in res.stdout
    assert str(secret) in res.stderr and "ermission denied" in res.stderr


@pytest.mark.parametrize("target", ["/etc", "/etc/x", "/var/log", "/opt/udiImage/x", "/opt"])
def test_forbidden_volume_destinations(site, image, target):
    data = owned_dir(site, ALICE, "vol", 0o755)
    for run in (
        lambda: site.shifter(ALICE, f"--image=id:{image}", f"--volume={data}:{target}", "true"),
        lambda: helper(site, ALICE, "run", "--image-id", image, "--volume", f"{data}:{target}",
                       "--", "/bin/true"),
    ):
        res = run()
        assert res.returncode == 1
        assert target in res.stderr and "Invalid mount request" in res.stderr, res.stderr


@pytest.mark.parametrize("spec", ["{d}/../{d_name}:/data", "{d}:/data/../etc", "{d}:/data/.."])
def test_dotdot_in_volume_paths(site, image, spec):
    data = owned_dir(site, ALICE, "dots", 0o755)
    vol = spec.format(d=data, d_name=data.name)
    for res in (
        site.shifter(ALICE, f"--image=id:{image}", f"--volume={vol}", "true"),
        helper(site, ALICE, "run", "--image-id", image, "--volume", vol, "--", "/bin/true"),
    ):
        assert res.returncode == 1 and ".." in res.stderr, res.stderr


def test_volume_source_swapped_for_a_symlink_during_setup(site, image):
    """Race the check against the mount for a few seconds: every run must mount the
    user's own directory or fail; none may ever show what is in /root."""
    work = owned_dir(site, ALICE, "race", 0o755)
    real = owned_dir(site, ALICE, "race-real", 0o755)
    (real / "mine").write_text("mine\n")
    Path("/root/.shifter-race-secret").write_text("root only\n")
    os.chmod("/root/.shifter-race-secret", 0o600)
    target = work / "src"
    stop = threading.Event()

    def swapper() -> None:
        # As alice (she owns the dir): flip src between her dir and a link to /root.
        code = (
            "import os, sys, time\n"
            f"t = {str(target)!r}; real = {str(real)!r}\n"
            "end = time.monotonic() + 8\n"
            "while time.monotonic() < end:\n"
            "    for dst in (real, '/root'):\n"
            "        try: os.symlink(dst, t + '.new'); os.replace(t + '.new', t)\n"
            "        except OSError: pass\n"
        )
        site.run(ALICE, ["/usr/bin/python3", "-c", code], timeout=30)
        stop.set()

    thread = threading.Thread(target=swapper)
    thread.start()
    outcomes = {"mounted": 0, "refused": 0}
    try:
        while not stop.is_set():
            res = helper(site, ALICE, "run", "--image-id", image, "--volume", f"{target}:/data",
                         "--", "/bin/ls", "-a", "/data")
            assert ".shifter-race-secret" not in res.stdout, "mounted /root for the user"
            if res.returncode == 0:
                assert "mine" in res.stdout, res.stdout
                outcomes["mounted"] += 1
            else:
                assert res.returncode == 1 and res.stderr.strip(), res
                outcomes["refused"] += 1
    finally:
        thread.join()
        os.unlink("/root/.shifter-race-secret")
    assert sum(outcomes.values()) >= 10, outcomes


# -- the image -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "..", "a/../../b", "x\ny"])
def test_image_id_with_a_path_is_refused(site, image, bad):
    res = site.shifter(ALICE, f"--image=id:{bad}", "true")
    assert res.returncode == 1 and res.stderr.strip()
    res = helper(site, ALICE, "run", "--image-id", bad, "--", "/bin/true")
    assert res.returncode == 1 and "image" in res.stderr.lower(), res.stderr


def test_setuid_and_file_capability_binaries_in_the_image_grant_nothing(site, image):
    uid = subprocess.run(["id", "-u", ALICE], capture_output=True, text=True).stdout.strip()
    for prog in ("/bin/escalate", "/bin/capped"):
        res = site.shifter(ALICE, f"--image=id:{image}", prog)
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"ids {uid} {uid} {uid}\ndenied\n", (prog, res.stdout)


def test_private_image_acl_excludes_the_user(site, image, tmp_path):
    tree = busybox_tree(tmp_path / "priv")
    (tree / "etc" / "private").write_text("private\n")
    bob_uid = subprocess.run(["id", "-u", BOB], capture_output=True, text=True).stdout.strip()
    private = site.add_image(mksquashfs(tree, tmp_path / "priv.squashfs"),
                             f"USERACL: {bob_uid}\n")
    assert site.shifter(BOB, f"--image=id:{private}", "cat", "/etc/private").stdout == "private\n"
    res = site.shifter(ALICE, f"--image=id:{private}", "cat", "/etc/private")
    assert res.returncode == 1 and "FAILED permission denied to image" in res.stderr
    res = helper(site, ALICE, "run", "--image-id", private, "--", "/bin/cat", "/etc/private")
    assert res.returncode == 1 and "FAILED permission denied to image" in res.stderr
    assert "private" not in res.stdout


# -- the helper's own inputs ---------------------------------------------------------------


def test_ld_preload_and_library_path_never_reach_the_helper(site, image, tmp_path):
    lib_dir = owned_dir(site, ALICE, "evil", 0o755)
    marker = lib_dir / "PWNED"
    src = lib_dir / "evil.c"
    src.write_text(PRELOAD_C.replace("MARKER", str(marker)))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib_dir / "libc.so.6"), str(src)],
                   check=True)
    subprocess.run(["cp", str(lib_dir / "libc.so.6"), str(lib_dir / "evil.so")], check=True)
    os.chmod(lib_dir, 0o777)  # so that whoever loads it could write the marker
    env = {"LD_PRELOAD": str(lib_dir / "evil.so"), "LD_LIBRARY_PATH": str(lib_dir)}
    res = helper(site, ALICE, "run", "--image-id", image, "--", "/bin/true", env=env)
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), "the preload library ran in the setuid helper"
    # Through the front end (which runs as the user, so its own loader is the user's
    # business): the caller's LD_* variables do not reach the container either.
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", "echo $LD_PRELOAD",
                       env={"LD_PRELOAD": "/nonexistent/evil.so"})
    assert res.returncode == 0 and res.stdout == "\n", res


@pytest.mark.parametrize("how", ["owned by a user", "group writable", "a symlink"])
def test_untrusted_udiroot_conf_is_refused(site, image, how):
    site.write_conf()
    try:
        if how == "owned by a user":
            os.chown(TEST_CONF, 1001, 0)
        elif how == "group writable":
            os.chmod(TEST_CONF, 0o664)
        else:
            real = TEST_CONF.with_name("real.conf")
            os.replace(TEST_CONF, real)
            TEST_CONF.symlink_to(real)
        res = helper(site, ALICE, "run", "--image-id", image, "--", "/bin/true")
        assert res.returncode == 1
        assert "udiRoot" in res.stderr or str(TEST_CONF) in res.stderr, res.stderr
    finally:
        if TEST_CONF.is_symlink():
            TEST_CONF.unlink()
            os.replace(TEST_CONF.with_name("real.conf"), TEST_CONF)
        site.write_conf()


def test_running_as_root_is_refused(site, image):
    res = site.shifter("root", f"--image=id:{image}", "true")
    assert res.returncode == 1
    assert "Failed to lookup username or attempted to run as root." in res.stderr


def test_environment_records_are_checked(site, image):
    fd = os.memfd_create("bad-env", 0)
    os.write(fd, b"GOOD=1\0=novalue\0")
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        proc = subprocess.run(
            [str(HELPER), "run", "--image-id", image, "--env-fd", str(fd), "--", "/bin/env"],
            pass_fds=(fd,), capture_output=True, text=True, env=site.user_env(ALICE),
            **site.spawn_kwargs(ALICE), timeout=60,
        )
    finally:
        os.close(fd)
    assert proc.returncode == 1 and "environment" in proc.stderr.lower(), proc.stderr


def test_failed_setups_leave_no_mount_or_loop_device(site, image):
    data = owned_dir(site, ALICE, "fail", 0o755)
    attempts = [
        ("--volume", f"{data}:/etc"),
        ("--volume", "/nonexistent:/data"),
        ("--modules", "nosuch"),
    ]
    for option, value in attempts:
        before = time.monotonic()
        res = helper(site, ALICE, "run", "--image-id", image, option, value, "--", "/bin/true")
        assert res.returncode == 1 and res.stderr.strip(), (option, value)
        assert time.monotonic() - before < 30
        site.assert_nothing_left()


# -- issue 10: teardown, /proc, perNodeCache totals, root's children, --local, groups ------
#
# Mount tricks and /proc remounts happen only inside a mount (and pid) namespace the test
# creates with unshare(1): the machine is shared, and the namespace's mounts go with it.


def in_namespace(site: RuntimeSite, script: str, *, pid: bool = False, timeout: float = 240):
    """Run the Python ``script`` as root in a new mount namespace (``unshare --mount
    --fork``, propagation private; with ``pid``, a new pid namespace and its own /proc).
    The script prints one JSON object on its last line, which is returned."""
    import json

    argv = ["unshare", "--mount", "--fork", "--propagation", "private"]
    if pid:
        argv += ["--pid", "--mount-proc"]
    proc = subprocess.run([*argv, "/usr/bin/python3", "-c", script], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


NS_PRELUDE = r"""
import json, os, subprocess, sys, time
def mounted(point):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == point for line in f)
def mounts_under(*roots):
    with open("/proc/self/mountinfo") as f:
        pts = [line.split()[4] for line in f]
    return [p for p in pts if any(p == r or p.startswith(r + "/") for r in roots)]
def as_user(argv, **kw):
    return subprocess.run(argv, user=UID, group=GID, extra_groups=GROUPS, env=ENV,
                          capture_output=True, text=True, **kw)
def as_root(argv, **kw):
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, **kw)
"""


def ns_script(site: RuntimeSite, user: str, body: str, **values: object) -> str:
    import pwd

    pw = pwd.getpwnam(user)
    head = (f"UID = {pw.pw_uid}\nGID = {pw.pw_gid}\n"
            f"GROUPS = {os.getgrouplist(user, pw.pw_gid)!r}\nENV = {site.user_env(user)!r}\n"
            f"HELPER = {str(HELPER)!r}\nSETUP = {str(SETUP)!r}\n"
            f"LAUNCHER = {str(site.launcher)!r}\n")
    head += "".join(f"{k} = {v!r}\n" for k, v in values.items())
    return head + NS_PRELUDE + body


def test_teardown_never_follows_a_symlink_swapped_into_a_nested_volume(site, image):
    """Hole: unsetup read /proc/self/mountinfo and unmounted each submount by its path.
    Alice's nested volume lies under a directory she owns; she flips a middle component
    between the real directory and a symlink to the parent of a host mount (a fake /home,
    in the test's own namespace) while root sets up and tears down: the host mount must
    survive every round."""
    nest = owned_dir(site, ALICE, "nest", 0o755)
    inner_src = owned_dir(site, ALICE, "nest-inner", 0o755)
    pw_uid = os.stat(nest).st_uid
    for d in (nest / "sub", nest / "sub" / "inner"):
        d.mkdir(exist_ok=True)
        os.chown(d, pw_uid, os.stat(nest).st_gid)
    if (nest / "sub").is_symlink():  # an interrupted earlier run
        (nest / "sub").unlink()
        (nest / "sub.link").rename(nest / "sub")
    (nest / "sub.link").unlink(missing_ok=True)
    fake_parent = site.base / "fakehost" / "home"
    (fake_parent / "inner").mkdir(parents=True, exist_ok=True)
    body = r"""
subprocess.run(["mount", "--make-rshared", "/"], check=True)  # host-like propagation
subprocess.run(["mount", "-t", "tmpfs", "fakehome", FAKE + "/inner"], check=True)
open(FAKE + "/inner/host-file", "w").write("host\n")
def table():
    # The system's mounts and this test's; not other tests' under /tmp, whose mounts here
    # go when they delete their directories, nor the network namespaces other tests pin
    # under /run/netns (a virtual cluster's), which go when those tests end.
    with open("/proc/self/mountinfo") as f:
        rows = [line.split(" - ")[0].split()[3:6] for line in f]
    ours = [r for r in rows if not r[1].startswith(("/tmp/", "/run/netns/"))
            or r[1].startswith(BASE + "/")]
    return sorted(r for r in ours if r[1] not in mounts_under(UDI, LOOP))
before = table()
racer_code = (
    "import ctypes, os\n"
    f"sub = {SUB!r}; link = sub + '.link'; target = {FAKE!r}; stop = {STOP!r}\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "os.symlink(target, link)\n"
    "a, b = sub.encode(), link.encode()\n"
    "n = 0\n"
    "while n % 1000 or not os.path.exists(stop):\n"
    "    libc.renameat2(-100, a, -100, b, 2)  # RENAME_EXCHANGE: dir <-> symlink\n"
    "    n += 1\n"
    "if os.path.islink(sub): libc.renameat2(-100, a, -100, b, 2)\n"
    "os.unlink(link)\n"
)
racer = subprocess.Popen(["/usr/bin/python3", "-c", racer_code], user=UID, group=GID,
                         extra_groups=GROUPS, env=ENV)
setup = [SETUP, "setup", "--user", USER, "--uid", str(UID), "--gid", str(GID),
         "--image-id", IMAGE, "--volume", VOLUMES]
runs = built = 0
lost = False
end = time.monotonic() + 25
while time.monotonic() < end and not lost:
    res = as_root(setup)
    runs += 1
    built += res.returncode == 0
    as_root([SETUP, "unsetup"])
    lost = not mounted(FAKE + "/inner")
open(STOP, "w").close()
racer.wait()
final = as_root([SETUP, "unsetup"])
after = table()
print(json.dumps({"runs": runs, "built": built, "lost": lost, "unsetup": final.returncode,
                  "left": mounts_under(UDI, LOOP), "same": before == after,
                  "gone": [r for r in before if r not in after],
                  "new": [r for r in after if r not in before]}))
"""
    stop = site.base / "nest-stop"
    stop.unlink(missing_ok=True)
    out = in_namespace(site, ns_script(
        site, ALICE, body, USER=ALICE, IMAGE=image, FAKE=str(fake_parent),
        SUB=str(nest / "sub"), STOP=str(stop), UDI=str(site.udi_mount), BASE=str(site.base),
        LOOP=str(site.loop_mount), VOLUMES=f"{nest}:/data;{inner_src}:/data/sub/inner"))
    stop.unlink(missing_ok=True)
    assert not out["lost"], f"root detached the host mount through alice's symlink: {out}"
    assert out["runs"] >= 10 and out["built"] >= 3, out
    assert out["unsetup"] == 0 and out["left"] == [], out
    assert out["same"], f"the namespace's mount table changed: {out}"


def test_container_proc_keeps_the_hosts_hidepid(site, image):
    """Hole: the container's /proc was a fresh procfs without options. With the host's
    /proc hidepid=invisible (in the test's own pid and mount namespace), a user must not
    see root's processes from inside the container either."""
    body = r"""
subprocess.run(["mount", "-o", "remount,hidepid=invisible", "/proc"], check=True)
sleeper = subprocess.Popen(["sleep", "120"])
outside = as_user(["ls", "/proc"])
inside = as_user([LAUNCHER, "--image=id:" + IMAGE, "ls", "/proc"])
opts = as_user([LAUNCHER, "--image=id:" + IMAGE, "grep", " /proc ", "/proc/self/mountinfo"])
sleeper.kill()
print(json.dumps({"pid": sleeper.pid, "outside": outside.stdout.split(),
                  "inside": inside.stdout.split(), "rc": inside.returncode,
                  "err": inside.stderr, "opts": opts.stdout}))
"""
    out = in_namespace(site, ns_script(site, ALICE, body, IMAGE=image), pid=True)
    pid = str(out["pid"])
    assert pid not in out["outside"]  # the host's /proc hides it: the premise holds
    assert out["rc"] == 0, out["err"]
    assert any(e.isdigit() for e in out["inside"]), out  # her own processes are there
    assert pid not in out["inside"], f"root's pid {pid} is visible in the container"
    assert "hidepid=invisible" in out["opts"], out["opts"]


def test_per_node_caches_have_a_total_per_launch(site, image):
    """Hole: perNodeCacheSizeLimit held per volume only: one launch could ask for dozens of
    caches of the maximum size, written by root past the user's quotas."""
    site.write_conf(perNodeCacheSizeLimit="2G", perNodeCacheTotalSizeLimit="100M")
    vols = ";".join(f"/tmp:/c{i}:perNodeCache=size=40M" for i in range(3))
    for res in (
        site.shifter(ALICE, f"--image=id:{image}", f"--volume={vols}", "true"),
        helper(site, ALICE, "run", "--image-id", image, "--volume", vols, "--", "/bin/true"),
    ):
        assert res.returncode == 1, res
        assert "Invalid mount request" in res.stderr and "perNodeCacheTotalSizeLimit" in \
            res.stderr and "125829120" in res.stderr and "104857600" in res.stderr, res.stderr
        assert "mkfs" not in res.stderr
        site.assert_nothing_left()
    # The front end refuses on its own, before it would exec any helper.
    res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={vols}", "true",
                       env={"SHIFTER_HELPER": "/nonexistent/helper"})
    assert res.returncode == 1 and "perNodeCacheTotalSizeLimit" in res.stderr, res.stderr
    two = ";".join(f"/tmp:/c{i}:perNodeCache=size=40M" for i in range(2))
    res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={two}", "true")
    assert res.returncode == 0, res.stderr


def _inotify_events(path: Path):
    """Start watching ``path`` for created or moved-in names; returns a function that
    stops and gives the names seen."""
    import ctypes
    import select
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    in_create, in_moved_to = 0x100, 0x80
    assert libc.inotify_add_watch(fd, str(path).encode(), in_create | in_moved_to) >= 0

    def stop() -> list[str]:
        names, data = [], b""
        while select.select([fd], [], [], 0.2)[0]:
            try:
                data += os.read(fd, 65536)
            except BlockingIOError:
                break
        os.close(fd)
        while data:
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", data)
            names.append(data[16:16 + length].rstrip(b"\0").decode())
            data = data[16 + length:]
        return names

    return stop


def test_per_node_cache_backing_file_never_appears(site, image):
    """Hole: the backing file was created by name and unlinked after: a kill in between
    left it in perNodeCachePath. Created O_TMPFILE, it never has a name at all."""
    stop = _inotify_events(site.cache_dir)
    for _ in range(3):
        res = site.shifter(ALICE, f"--image=id:{image}",
                           "--volume=/tmp:/cache:perNodeCache=size=32M", "true")
        assert res.returncode == 0, res.stderr
    seen = stop()
    assert seen == [], f"backing files appeared in perNodeCachePath: {seen}"
    assert list(site.cache_dir.iterdir()) == []


# Shell builtins only: the hook reads its own state (dash blocks every signal while it
# waits for a child, so a cat of /proc/$$ would show the shell waiting, not the hook).
HOOK_STATE = r"""#!/bin/sh
out=OUT
save() { while IFS= read -r line; do printf '%s\n' "$line"; done < /proc/$$/$1 > $out.$1; }
save status
save limits
save stat
echo "$(readlink /proc/$$/fd/0)" > $out.stdin
"""


# Alice's launcher wrapper: small limits (argv[1]: "soft", or "hard" to lower the hard
# file size limit too), signals ignored and blocked, a terminal of hers as the
# controlling tty and stdin; then the real front end.
HOSTILE_CALLER = r"""
import fcntl, os, resource, signal, sys, termios
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1] if sys.argv[1] == "soft" else 1 << 20
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGHUP})
# glibc's own real-time signals (32, 33) can be ignored only through the raw system call,
# and glibc's sigaction() will not reset them: the helper must ask the kernel itself.
import ctypes
class KSA(ctypes.Structure):
    _fields_ = [("h", ctypes.c_void_p), ("f", ctypes.c_ulong), ("r", ctypes.c_void_p),
                ("m", ctypes.c_ulong)]
libc = ctypes.CDLL(None, use_errno=True)
for sig in (32, 33):
    assert libc.syscall(13, sig, ctypes.byref(KSA(1, 0, None, 0)), None, 8) == 0  # x86_64
master, slave = os.openpty()
os.set_inheritable(master, True)
os.setsid()
fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
os.dup2(slave, 0)
os.execv(sys.argv[2], sys.argv[2:])
"""


def root_may_raise_limits() -> bool:
    """CAP_SYS_RESOURCE in the bounding set (some nodes, like containers, lack it)."""
    bnd = next(line for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("CapBnd:"))
    return bool(int(bnd.split()[1], 16) >> 24 & 1)


def hostile_launch(site: RuntimeSite, image: str, limits: str, *args: str):
    return site.run(ALICE, ["/usr/bin/python3", "-c", HOSTILE_CALLER, limits,
                            str(site.launcher), f"--image=id:{image}", *args])


def test_root_hooks_and_mkfs_do_not_inherit_the_callers_state(site, image):
    """Hole: site hooks and mkfs.xfs ran as root with the user's rlimits, signal mask and
    dispositions, session, terminal and stdin. The hook records its own state; the launch
    also makes a perNodeCache, which the user's 1 MiB file size limit broke."""
    out = site.base / "hookstate"
    hook = site.base / "state-hook.sh"
    hook.write_text(HOOK_STATE.replace("OUT", str(out)))
    os.chmod(hook, 0o755)
    site.write_conf(sitePreMountHook=str(hook))
    res = hostile_launch(site, image, "soft", "--volume=/tmp:/cache:perNodeCache=size=64M",
                         "sh", "-c", "grep -c ' /cache ' /proc/mounts")
    assert res.returncode == 0 and res.stdout.strip() == "1", res
    status = dict(line.split(":\t", 1) for line in
                  Path(f"{out}.status").read_text().splitlines() if ":\t" in line)
    assert int(status["SigBlk"], 16) == 0, status["SigBlk"]
    assert int(status["SigIgn"], 16) == 0, status["SigIgn"]
    limits = Path(f"{out}.limits").read_text()
    files = next(line for line in limits.splitlines() if line.startswith("Max file size"))
    assert files.split()[3:5] == ["unlimited", "unlimited"], files
    nofile = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert nofile.split()[3:5] == ["1024", "4096"], nofile
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    stat = Path(f"{out}.stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    pid = stat.split()[0]
    assert fields[3] == pid, f"the hook is not the leader of its own session: {stat}"
    assert fields[4] == "0", f"the hook has a controlling terminal: {stat}"
    assert Path(f"{out}.stdin").read_text().strip() == "/dev/null"


def test_a_hard_limit_root_cannot_raise_is_named(site, image):
    """A hard file size limit of 1 MiB: where root may raise it (CAP_SYS_RESOURCE), the
    hook and the cache work; where it may not, the launch stops with a message that names
    the limit, before root's program runs, and nothing is left."""
    out = site.base / "hookstate-hard"
    Path(f"{out}.limits").unlink(missing_ok=True)
    hook = site.base / "state-hook-hard.sh"
    hook.write_text(HOOK_STATE.replace("OUT", str(out)))
    os.chmod(hook, 0o755)
    site.write_conf(sitePreMountHook=str(hook))
    res = hostile_launch(site, image, "hard", "true")
    if root_may_raise_limits():
        assert res.returncode == 0, res
        files = next(line for line in Path(f"{out}.limits").read_text().splitlines()
                     if line.startswith("Max file size"))
        assert files.split()[3:5] == ["unlimited", "unlimited"], files
    else:
        assert res.returncode == 1, res
        assert "file size (ulimit -f)" in res.stderr and "ulimit -H" in res.stderr, res.stderr
        assert not Path(f"{out}.limits").exists(), "the hook ran with the user's limit"
    site.write_conf()
    res = hostile_launch(site, image, "hard", "--volume=/tmp:/cache:perNodeCache=size=64M",
                         "true")
    if root_may_raise_limits():
        assert res.returncode == 0, res
    else:
        assert res.returncode == 1, res
        assert "Cannot create a perNodeCache of 67108864 bytes" in res.stderr, res.stderr
    site.assert_nothing_left()


LOCAL_ROOT_FILES = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"}


def test_local_root_shows_what_is_mounted_in_it_and_keeps_host_mounts(site, tmp_path):
    """Hole: --local bound the directory non-recursively, so a file hidden under a mount
    point of the host showed through. The tree must come recursively, nosuid and nodev all
    the way down, and tearing it down must not take the host's mount with it (the test's
    namespace has / shared, so a peer would pass the unmount on)."""
    root = busybox_tree(site.base / "localroot", LOCAL_ROOT_FILES)
    data = root / "srv" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "hidden-under-mount").write_text("hidden\n")
    for d in (root, *root.rglob("*")):
        if d.is_dir() and not d.is_symlink():
            os.chmod(d, 0o755)
    site.write_conf(allowLocalChroot="1")
    body = r"""
subprocess.run(["mount", "--make-rshared", "/"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "suid,dev", "hostdata", DATA], check=True)
open(DATA + "/mounted-content", "w").write("host\n")
ls = as_user([LAUNCHER, "--image=local:" + ROOT, "ls", "/srv/data"])
mi = as_user([LAUNCHER, "--image=local:" + ROOT, "grep", " /srv/data ", "/proc/self/mountinfo"])
setup = as_root([SETUP, "setup", "--user", USER, "--uid", str(UID), "--gid", str(GID),
                 "--local", ROOT])
unsetup = as_root([SETUP, "unsetup"])
print(json.dumps({"ls": ls.stdout.split(), "err": ls.stderr, "mi": mi.stdout,
                  "setup": [setup.returncode, setup.stderr], "unsetup": unsetup.returncode,
                  "kept": mounted(DATA), "left": mounts_under(UDI, LOOP)}))
"""
    out = in_namespace(site, ns_script(site, ALICE, body, USER=ALICE, ROOT=str(root),
                                       DATA=str(data), UDI=str(site.udi_mount),
                                       LOOP=str(site.loop_mount)))
    assert out["ls"] == ["mounted-content"], out
    line = out["mi"].strip()
    assert line and "nosuid" in line.split()[5] and "nodev" in line.split()[5], line
    assert out["setup"][0] == 0, out["setup"]
    assert out["unsetup"] == 0 and out["left"] == []
    assert out["kept"], "tearing down the --local container unmounted the host's mount"


STALE_GROUP = "shifter-stale"


def test_setup_takes_groups_from_the_host_not_a_stale_etc_copy(site, image):
    """Hole: setup took the user's supplementary groups from etcPath's copy of group. Alice
    was removed from a group on the host, but the copy still lists her: the group's data
    must stay closed to her."""
    import grp
    import pwd

    try:
        gid = grp.getgrnam(STALE_GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", STALE_GROUP], check=True)
        gid = grp.getgrnam(STALE_GROUP).gr_gid
    assert ALICE not in grp.getgrnam(STALE_GROUP).gr_mem
    secret = site.base / "stale-group-data"
    secret.mkdir(exist_ok=True)
    os.chown(secret, 0, gid)
    os.chmod(secret, 0o750)
    group_copy = site.etc_dir / "group"
    saved = group_copy.read_text()
    lines = [ln for ln in saved.splitlines() if not ln.startswith(STALE_GROUP + ":")]
    group_copy.write_text("\n".join([*lines, f"{STALE_GROUP}:x:{gid}:{ALICE}"]) + "\n")
    pw = pwd.getpwnam(ALICE)
    try:
        res = site.run("root", [str(SETUP), "setup", "--user", ALICE, "--uid",
                                str(pw.pw_uid), "--gid", str(pw.pw_gid), "--image-id", image,
                                "--volume", f"{secret}:/data"])
        # refused as the user's error (2: the prolog fails the job, not the node)
        assert res.returncode == 2, "setup used the stale group copy to mount the data"
        assert "you cannot access the source" in res.stderr, res.stderr
    finally:
        group_copy.write_text(saved)
        site.run("root", [str(SETUP), "unsetup"])
