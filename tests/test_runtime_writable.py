"""Writable containers and volumes anywhere (docs/behaviour.md, 'Runtime: writable containers'):
``shifter --writable-tmpfs`` and a ``--volume`` whose mount point is missing inside an image
directory, both on an overlay over the image. Everything runs as the unprivileged test users
through the real front end and the real setuid test helper; the attacks are theirs.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import pytest
from world.runtime import (
    ESCALATE_C,
    HELPER,
    RuntimeSite,
    busybox_tree,
    compile_static,
    file_id,
    mksquashfs,
    module_site,
)

ALICE = "shifter-alice"
BOB = "shifter-bob"
EXTRA_APPLETS = ("dd", "rm", "mv", "cp", "chmod", "ln", "cmp", "mount", "umount", "unshare")


# setcap's work by hand: a VFS_CAP_REVISION_2 security.capability granting cap_setuid
# (bit 7) to the file named; prints the outcome.
SETCAP_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {
    unsigned int cap[5] = {0x02000001u, 1u << 7, 1u << 7, 0, 0}; /* effective, permitted */
    if (argc < 2) return 2;
    if (setxattr(argv[1], "security.capability", cap, sizeof cap, 0) == 0)
        printf("setcap done\n");
    else
        printf("setcap refused: %s\n", strerror(errno));
    return 0;
}
"""


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    with module_site(tmp_path_factory, "runtime-writable") as site:
        yield site


@pytest.fixture(scope="module")
def image_file(site, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("writable-tree")
    tree = busybox_tree(work / "root")
    for name in EXTRA_APPLETS:
        (tree / "bin" / name).symlink_to("busybox")
    compile_static(ESCALATE_C, tree / "bin" / "escalate")
    os.chmod(tree / "bin" / "escalate", 0o4755)  # -all-root makes it setuid root
    compile_static(SETCAP_C, tree / "bin" / "setcap-by-hand")
    (tree / "srv" / "scratch").mkdir(parents=True)
    os.chmod(tree / "srv" / "scratch", 0o777)  # what users may write in this image
    (tree / "srv" / "scratch" / "from-image").write_text("image file\n")
    os.chmod(tree / "srv" / "scratch" / "from-image", 0o666)
    (tree / "usr" / "lib").mkdir(parents=True)
    (tree / "usr" / "lib" / "libx.so").write_text("library\n")
    (tree / "usr" / "to-etc").symlink_to("/etc")  # an image link pointing at the system's
    (tree / "usr" / "to-home").symlink_to("../home")
    return mksquashfs(tree, work / "writable.squashfs")


@pytest.fixture(scope="module")
def image(site, image_file) -> str:
    return site.add_image(image_file)


@pytest.fixture(autouse=True)
def clean(site):
    site.write_conf(allowWritableTmpfs="1", writableTmpfsSizeLimit="64M")
    yield
    site.write_conf()
    site.assert_nothing_left()  # (waits for the kernel to free the overlay's image device)


def owned_dir(site: RuntimeSite, user: str, name: str) -> Path:
    pw = pwd.getpwnam(user)
    path = site.base / f"{user}-{name}"
    path.mkdir(exist_ok=True)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def helper(site: RuntimeSite, user: str, *args: str):
    """The setuid helper called directly, past every check of the front end."""
    return site.run(user, [str(HELPER), *args])


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


# -- --writable-tmpfs ---------------------------------------------------------------------------


def test_writable_tmpfs_lets_the_user_write_where_the_image_allows_and_forgets_it(site, image):
    script = ("echo mine > /srv/scratch/new && cat /srv/scratch/new && "
              "echo more >> /srv/scratch/from-image && cat /srv/scratch/from-image && "
              "rm /srv/scratch/from-image && ls /srv/scratch")
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "sh", "-c", script)
    assert (res.returncode, res.stdout) == (0, "mine\nimage file\nmore\nnew\n"), res
    # The next container starts from the image again.
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "ls", "/srv/scratch")
    assert (res.returncode, res.stdout) == (0, "from-image\n"), res
    # Without the option the image stays read-only, as always.
    res = site.shifter(ALICE, f"--image=id:{image}", "touch", "/srv/scratch/x")
    assert res.returncode == 1 and "Read-only file system" in res.stderr, res
    # Root's files in the image stay root's: the overlay changes no permission.
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "touch", "/usr/lib/x")
    assert res.returncode == 1 and "Permission denied" in res.stderr, res


def test_writable_tmpfs_is_the_sites_to_allow(site, image):
    site.write_conf()  # allowWritableTmpfs unset: off
    want = "--writable-tmpfs is not allowed on this system (allowWritableTmpfs=0)"
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "true")
    assert (res.returncode, res.stdout) == (1, "") and want in res.stderr, res
    res = helper(site, ALICE, "run", "--image-id", image, "--writable-tmpfs", "1048576",
                 "--", "/bin/true")
    assert res.returncode == 1 and want in res.stderr, res


def test_a_size_over_the_site_limit_is_refused_before_anything_is_built(site, image):
    want = ("--writable-tmpfs of 134217728 bytes is over the site limit of 67108864 bytes "
            "(writableTmpfsSizeLimit)")
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs=128M", "true")
    assert (res.returncode, res.stdout) == (1, "") and want in res.stderr, res
    res = helper(site, ALICE, "run", "--image-id", image, "--writable-tmpfs", "128M",
                 "--", "/bin/true")
    assert res.returncode == 1 and want in res.stderr, res
    for bad in ("0", "lots", "-1"):
        res = helper(site, ALICE, "run", "--image-id", image, "--writable-tmpfs", bad,
                     "--", "/bin/true")
        assert res.returncode == 1 and "Invalid --writable-tmpfs size" in res.stderr, res


def test_writes_past_the_size_fail_with_enospc(site, image):
    """The layer is a tmpfs of the size granted: a user filling it gets ENOSPC, never
    the node's memory."""
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs=8M", "sh", "-c",
                       "dd if=/dev/zero of=/srv/scratch/fill bs=1M count=32; "
                       "echo status $?; ls -l /srv/scratch/fill")
    assert "No space left on device" in res.stderr, res
    assert "status 1" in res.stdout, res
    size = int(res.stdout.split()[-5])
    assert size <= 8 * 1024 * 1024, res.stdout
    # Bare: the site's whole limit (64M here), no more.
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "sh", "-c",
                       "dd if=/dev/zero of=/srv/scratch/fill bs=1M count=100 2>&1 | "
                       "grep -c 'No space'; ls -l /srv/scratch/fill")
    assert res.stdout.startswith("1\n"), res
    assert 32 * 1024 * 1024 < int(res.stdout.split()[-5]) <= 64 * 1024 * 1024, res.stdout


def test_writable_tmpfs_with_local_is_refused(site, tmp_path):
    site.write_conf(allowWritableTmpfs="1", allowLocalChroot="1")
    res = site.shifter(ALICE, "--image=local:/", "--writable-tmpfs", "true")
    assert res.returncode == 1, res
    assert "--writable-tmpfs works with images only, not with --local" in res.stderr


# -- attacks on the writable layer ----------------------------------------------------------------


def test_nothing_written_through_the_overlay_gains_set_id_or_capabilities(site, image):
    """The user copies the image's setuid-root program into the writable layer and
    makes it setuid (theirs, then: chmod on their own copy), tries to give it file
    capabilities with a hand-made security.capability xattr, and runs the image's own
    setuid-root copy: every run has the user's ids and setuid(0) fails."""
    uid = uid_of(ALICE)
    script = ("cp /bin/escalate /srv/scratch/e && chmod 6755 /srv/scratch/e && "
              "stat -c '%A %u' /srv/scratch/e && /srv/scratch/e && "
              "cp /bin/escalate /srv/scratch/c && /bin/setcap-by-hand /srv/scratch/c && "
              "/srv/scratch/c && /bin/escalate && "
              "grep -E ' / | /srv | /usr ' /proc/self/mountinfo")
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "sh", "-c", script)
    assert res.returncode == 0, res
    lines = res.stdout.splitlines()
    assert lines[0] == f"-rwsr-sr-x {uid}", lines  # set-id, but the user's own
    assert lines.count(f"ids {uid} {uid} {uid}") == 3 and lines.count("denied") == 3, lines
    assert "ESCALATED" not in res.stdout
    assert any(line.startswith("setcap refused: Operation not permitted") for line in lines)
    mounts = [line for line in lines if " - overlay " in line]
    assert {line.split()[4] for line in mounts} >= {"/srv", "/usr"}, lines
    for line in mounts:
        opts = line.split()[5].split(",")
        assert "nosuid" in opts and "nodev" in opts and "rw" in opts, line


def test_the_image_file_is_never_modified(site, image, image_file):
    placed = site.image_dir / f"{image}.squashfs"
    before = file_id(placed)
    script = ("echo x > /srv/scratch/new; rm -f /srv/scratch/from-image; "
              "dd if=/dev/zero of=/srv/scratch/fill bs=1M count=4 2>/dev/null; "
              "mv /srv/scratch/new /srv/scratch/renamed; sync")
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "sh", "-c", script)
    assert res.returncode == 0, res
    assert file_id(placed) == before == file_id(image_file)
    res = site.shifter(BOB, f"--image=id:{image}", "cat", "/srv/scratch/from-image")
    assert (res.returncode, res.stdout) == (0, "image file\n"), res


def test_the_overlay_cannot_hide_or_replace_site_mounts_or_the_helpers_etc_files(site, image):
    """/etc/passwd, /etc/group, the other /etc files and a siteFs mount are the site's
    and on the container's own read-only root, not on the overlay: removing, renaming or
    overwriting them fails; the user cannot mount over them either: no capability and
    no_new_privs in the container's mount namespace, and no user namespace of their own
    (the kernel refuses one to a chrooted process)."""
    sitefs = site.base / "writable-sitefs"
    sitefs.mkdir(exist_ok=True)
    (sitefs / "site-file").write_text("site\n")
    site.write_conf(allowWritableTmpfs="1", writableTmpfsSizeLimit="64M",
                    siteFs=f"{sitefs}:/site")
    attacks = ["rm -f /etc/passwd", "mv /etc/passwd /etc/passwd.old",
               "echo 'root::0:0::/:/bin/sh' > /etc/passwd", "rm -f /etc/group",
               "echo 127.0.0.1 evil > /etc/hosts", "rm -rf /site",
               "rm -f /site/site-file", "mv /site /srv/scratch/site",
               "mount --bind /srv/scratch /site",
               "mount --bind /srv/scratch/from-image /etc/passwd", "umount /site",
               "umount -l /etc", "unshare -r -m mount --bind /srv/scratch /site"]
    script = "; ".join(f"{a} 2>/dev/null && echo DID: {a}" for a in attacks)
    script += "; grep -c '^shifter-alice:' /etc/passwd; cat /site/site-file; ls /site"
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "sh", "-c", script)
    assert "DID:" not in res.stdout, res.stdout
    # (mv across mounts copies before it fails to remove: the user may read /site anyway)
    assert res.stdout.endswith("1\nsite\nsite-file\n"), res
    assert (sitefs / "site-file").read_text() == "site\n"
    res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "unshare", "-r", "-m",
                       "true")
    assert res.returncode != 0 and "Operation not permitted" in res.stderr, res


def test_the_layer_is_gone_when_the_container_ends(site, image, tmp_path):
    """200 MiB written to the layer are memory while the container runs and are given
    back when it ends: no tmpfs, no mount is left anywhere."""
    site.write_conf(allowWritableTmpfs="1", writableTmpfsSizeLimit="256M")
    marker = Path("/tmp") / f"shifter-writable-{os.getpid()}"
    marker.unlink(missing_ok=True)

    def shmem_kib() -> int:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))

    before = shmem_kib()
    # df of an overlay reports its upper layer: the tmpfs holding what was written.
    script = (f"dd if=/dev/zero of=/srv/scratch/big bs=1M count=200 2>/dev/null && "
              f"df -k /srv/scratch > {marker}.df && touch {marker} && exec sleep 60")
    proc = subprocess.Popen([str(site.launcher), f"--image=id:{image}", "--writable-tmpfs",
                             "sh", "-c", script], env=site.user_env(ALICE),
                            cwd=str(site.base), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **site.spawn_kwargs(ALICE))
    try:
        deadline = time.monotonic() + 120  # a loaded machine is slow to launch
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()
        during = shmem_kib()
        df = Path(f"{marker}.df").read_text().split()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        marker.unlink(missing_ok=True)
        Path(f"{marker}.df").unlink(missing_ok=True)
    size_kib, used_kib = int(df[-5]), int(df[-4])
    assert size_kib == 256 * 1024 and used_kib >= 200 * 1024, df
    # The namespace dies with its last process; the kernel frees its mounts right after.
    deadline = time.monotonic() + 30
    while (site.our_loops() or shmem_kib() > during - 150 * 1024) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    after = shmem_kib()
    # The node's shared memory: 200 MiB more while it ran, given back after (other
    # sessions' tmpfs use moves it a little; the margin is 50 MiB).
    assert during - after > 150 * 1024, (before, during, after)
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            text = mountinfo.read_text()
        except OSError:
            continue
        assert "shifter-writable" not in text, mountinfo


def test_a_prepared_container_is_never_entered_writable(site, image):
    pw = pwd.getpwnam(ALICE)
    res = site.root_tool("setupRoot", "-U", str(pw.pw_uid), "-G", str(pw.pw_gid), "-u", ALICE,
                         "id", image)
    assert res.returncode == 0, res.stderr
    try:
        host_ns = os.readlink("/proc/self/ns/mnt")
        res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "sh", "-c",
                           "readlink /proc/self/ns/mnt; echo x > /srv/scratch/x && echo WROTE")
        assert res.returncode == 0, res
        ns, wrote = res.stdout.split()
        assert ns != host_ns and wrote == "WROTE", res
        assert not (site.udi_mount / "srv" / "scratch" / "x").exists()
    finally:
        done = site.root_tool("unsetupRoot")
    assert done.returncode == 0, done.stderr


# -- volumes inside image directories (Shifter #231) ---------------------------------------------


def test_a_volume_inside_an_image_directory_gets_its_mount_point(site, image):
    data = owned_dir(site, ALICE, "vol")
    (data / "input").write_text("data\n")
    for args in ([], ["--writable-tmpfs"]):
        res = site.shifter(ALICE, f"--image=id:{image}", *args,
                           f"--volume={data}:/usr/share/data", f"--volume={data}:/opt/app/in",
                           "sh", "-c", "cat /usr/share/data/input /opt/app/in/input; "
                           "ls /usr; touch /usr/new 2>&1; true")
        assert res.returncode == 0, res
        out = res.stdout.splitlines()
        assert out[:2] == ["data", "data"] and out[2:6] == ["bin", "lib", "share", "to-etc"], res
        if not args:  # the image stays read-only; only the mount points were added
            assert "Read-only file system" in res.stdout, res
        else:
            assert "Permission denied" in res.stdout, res  # /usr is root's
    # A perNodeCache gets its mount point the same way.
    res = site.shifter(ALICE, f"--image=id:{image}", "--volume=/x:/usr/cache:perNodeCache=size=64M",
                       "sh", "-c", "touch /usr/cache/mine && stat -c %u /usr/cache/mine")
    assert (res.returncode, res.stdout) == (0, f"{uid_of(ALICE)}\n"), res
    # The helper does the same for a caller bypassing the front end.
    res = helper(site, ALICE, "run", "--image-id", image, "--volume",
                 f"{data}:/usr/lib/deep/er/data", "--", "/bin/cat", "/usr/lib/deep/er/data/input")
    assert (res.returncode, res.stdout) == (0, "data\n"), res


def test_a_volume_through_an_image_link_is_not_made(site, image):
    """No mount point is ever made through a symbolic link of the image: /usr/to-etc/x
    would be /etc/x, /usr/to-home/x is /home/x, below an image directory reached by a
    link; both are refused as before, and nothing is made in the image."""
    data = owned_dir(site, ALICE, "vol")
    for target, why in (("/usr/to-etc/x", "reserved for the system"),
                        ("/usr/to-home/x", "cannot be created")):
        res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={data}:{target}",
                           "--volume", f"{data}:/usr/share/data", "true")
        assert res.returncode == 1 and "Invalid mount request" in res.stderr, res
        assert why in res.stderr, res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "ls", "/home", "/etc")
    assert res.returncode == 0 and "\nx\n" not in res.stdout, res


def test_a_prepared_container_gets_the_mount_point_too_and_unsetup_removes_it_all(site, image):
    """setupRoot (the batch job's container, in the node's namespace) with a volume inside
    an image directory: the overlay is made at loopMount, a task enters it and sees the
    volume; unsetupRoot leaves nothing mounted."""
    data = owned_dir(site, ALICE, "vol")
    (data / "input").write_text("data\n")
    pw = pwd.getpwnam(ALICE)
    res = site.root_tool("setupRoot", "-U", str(pw.pw_uid), "-G", str(pw.pw_gid), "-u", ALICE,
                         "-v", f"{data}:/usr/share/data", "id", image)
    assert res.returncode == 0, res.stderr
    try:
        res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={data}:/usr/share/data",
                           "sh", "-c", "readlink /proc/self/ns/mnt; cat /usr/share/data/input; "
                           "touch /usr/share/x 2>&1; true")
        assert res.returncode == 0, res
        ns, out = res.stdout.split("\n", 1)
        assert ns == os.readlink("/proc/self/ns/mnt"), res  # entered, not built again
        assert out.startswith("data\n") and "Read-only file system" in out, res
    finally:
        done = site.root_tool("unsetupRoot")
    assert done.returncode == 0, done.stderr
    assert site.our_mounts() == []


def test_a_writable_launch_beside_others_of_the_image_changes_nothing_for_them(site, image):
    """Launches of one image share its loop device and superblock: what alice writes
    through her layer is hers alone; bob, running the image meanwhile, and the launches
    after, see the image as it is."""
    marker = Path("/tmp") / f"shifter-writable-bob-{os.getpid()}"
    marker.unlink(missing_ok=True)
    script = (f"touch {marker}; while test -e {marker}; do sleep 0.1; done; "
              "ls /srv/scratch; cat /srv/scratch/from-image")
    bob = subprocess.Popen([str(site.launcher), f"--image=id:{image}", "sh", "-c", script],
                           env=site.user_env(BOB), cwd=str(site.base), text=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, **site.spawn_kwargs(BOB))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and bob.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), bob.communicate()
        res = site.shifter(ALICE, f"--image=id:{image}", "--writable-tmpfs", "sh", "-c",
                           "echo alice > /srv/scratch/from-image && echo x > /srv/scratch/new "
                           "&& cat /srv/scratch/from-image")
        assert (res.returncode, res.stdout) == (0, "alice\n"), res
    finally:
        marker.unlink(missing_ok=True)
        out, err = bob.communicate(timeout=60)
    assert (bob.returncode, out) == (0, "from-image\nimage file\n"), (out, err)
