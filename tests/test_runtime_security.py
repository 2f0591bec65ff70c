"""Attacks on the runtime, each made by an unprivileged user, each of which must fail with
a clear message (behaviour spec §8). Where the front end would already refuse, the
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
    HELPER,
    TEST_CONF,
    RuntimeSite,
    busybox_tree,
    compile_static,
    mksquashfs,
    module_site,
)

ALICE = "shifter-alice"
BOB = "shifter-bob"

# Reports its ids, then tries to become root: a setuid-root copy of this in the image
# must come up with the user's ids and fail.
ESCALATE_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    uid_t r, e, s;
    getresuid(&r, &e, &s);
    printf("ids %u %u %u\n", r, e, s);
    if (setuid(0) == 0 && geteuid() == 0) { printf("ESCALATED\n"); return 0; }
    printf("denied\n");
    return 0;
}
"""

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
    assert site.our_mounts() == [] and site.our_loops() == []


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
        assert site.our_mounts() == [] and site.our_loops() == []
