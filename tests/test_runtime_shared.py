"""Launches share what is already mounted (docs/behaviour.md, 'Runtime: building the
container'): a fresh launch that finds its image file already on a read-only autoclear
loop device (another launch's, or setupRoot's) mounts that device, so the kernel gives it
the same squashfs superblock and its warm page cache. Each launch still builds its own
container in its own mount namespace; the device goes with its last user.

Everything runs as the test users through the real setuid helper. Which superblock a
container got is what ``stat -c %d /bin/busybox`` prints inside it: the squashfs's device
number, i.e. the loop device's (major 7).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from world.runtime import RuntimeSite, busybox_tree, mksquashfs, module_site

ALICE = "shifter-alice"
BOB = "shifter-bob"

# Waits for one line on stdin, so the test decides how long the container lives.
HOLD = "stat -c %d /bin/busybox; id -un; cat /etc/marker; read go"


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    with module_site(tmp_path_factory, "runtime-shared") as site:
        yield site


def _image(site: RuntimeSite, work: Path, marker: str) -> tuple[str, Path]:
    tree = busybox_tree(work / "root", {"etc/marker": marker + "\n"})
    sqfs = mksquashfs(tree, work / "img.squashfs")
    image_id = site.add_image(sqfs)
    return image_id, site.image_dir / f"{image_id}.squashfs"


@pytest.fixture(scope="module")
def image(site, tmp_path_factory) -> str:
    return _image(site, tmp_path_factory.mktemp("shared-tree"), "real")[0]


@pytest.fixture(autouse=True)
def clean(site):
    site.write_conf()
    yield
    site.write_conf()
    site.assert_nothing_left()


class Holder:
    """A container started as ``user`` that reports its image's device, its user and the
    image's marker, then waits until ``release()``."""

    def __init__(self, site: RuntimeSite, user: str, *args: str, script: str = HOLD) -> None:
        self.proc = subprocess.Popen(
            [str(site.launcher), *args, "sh", "-c", script],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=site.user_env(user), cwd=str(site.base), **site.spawn_kwargs(user))

    def report(self) -> tuple[int, str, str]:
        """(image device number, user name, marker) as read inside the container."""
        lines = [self.proc.stdout.readline() for _ in range(3)]
        if not all(lines):
            self.proc.kill()
            raise AssertionError(f"launch failed: {self.proc.communicate()}")
        return int(lines[0]), lines[1].strip(), lines[2].strip()

    def release(self, stdin: str = "go\n") -> str:
        out, err = self.proc.communicate(stdin, timeout=120)
        assert self.proc.returncode == 0, err
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def loop_rdevs(site: RuntimeSite) -> dict[str, int]:
    """Loop devices backed by this site's files: device path → device number."""
    out = {}
    for line in site.our_loops():
        dev = line.split(":", 1)[0]
        out[dev] = os.stat(dev).st_rdev
    return out


def loop_major(rdev: int) -> int:
    return os.major(rdev)


# -- sharing ---------------------------------------------------------------------------


def test_two_users_share_the_device_but_not_the_container(site, image):
    """Alice and Bob run one image at once: one loop device, one superblock (the same
    device number inside both), but each sees only their own container: their own
    passwd, their own volume, their own root and mount namespace. Nothing is left after."""
    site.write_conf(populateEtcDynamically="1")
    vol = site.base / "alice-only"
    vol.mkdir(exist_ok=True)
    (vol / "secret").write_text("alice's\n")
    shutil.chown(vol, ALICE, ALICE)
    os.chmod(vol, 0o700)
    look = ("stat -c %d /bin/busybox; stat -c %d /; readlink /proc/self/ns/mnt; "
            "cut -d: -f1 /etc/passwd | tr '\\n' ' '; echo; ls /data 2>&1; read go")
    alice = Holder(site, ALICE, f"--image=id:{image}", f"--volume={vol}:/data", script=look)
    bob = None
    try:
        seen = {}
        a_lines = [alice.proc.stdout.readline() for _ in range(5)]
        assert all(a_lines), alice.proc.communicate()
        devs = loop_rdevs(site)
        assert len(devs) == 1, devs
        bob = Holder(site, BOB, f"--image=id:{image}", "--volume=/tmp:/data", script=look)
        b_lines = [bob.proc.stdout.readline() for _ in range(5)]
        assert all(b_lines), bob.proc.communicate()
        assert loop_rdevs(site) == devs, "Bob's launch attached a second device"
        for name, lines in (("alice", a_lines), ("bob", b_lines)):
            seen[name] = [line.strip() for line in lines]
        (rdev,) = devs.values()
        # One superblock: the image's files have the one device's number in both.
        assert int(seen["alice"][0]) == int(seen["bob"][0]) == rdev
        # Two containers: different roots and mount namespaces.
        assert seen["alice"][1] != seen["bob"][1]
        assert seen["alice"][2] != seen["bob"][2]
        assert seen["alice"][3].split() == [ALICE]
        assert seen["bob"][3].split() == [BOB]
        assert seen["alice"][4] == "secret"
        assert "secret" not in seen["bob"][4]
    finally:
        alice.release()
        if bob is not None:
            bob.release()


def test_the_device_lives_as_long_as_its_last_user(site, image):
    """The launch that attached the device ends first: the other one keeps reading the
    image; the device goes when the second ends."""
    first = Holder(site, ALICE, f"--image=id:{image}")
    second = None
    try:
        dev1 = first.report()[0]
        second = Holder(site, BOB, f"--image=id:{image}", script=HOLD + "; cat /etc/marker")
        assert second.report() == (dev1, BOB, "real")
        first.release()
        assert len(loop_rdevs(site)) == 1
        assert second.release() == "real\n"  # read after the first one went
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_a_burst_of_launches_shares_one_device(site, image):
    """Launches started all at once: one device, one superblock. Those that found none
    and attached one at the same moment all move to the lowest-numbered one."""
    n = 64
    holders = [Holder(site, ALICE if i % 2 else BOB, f"--image=id:{image}") for i in range(n)]
    try:
        reports = [h.report() for h in holders]
        devs = loop_rdevs(site)
        assert len(devs) == 1, f"{len(devs)} loop devices for {n} launches of one image"
        assert {r[0] for r in reports} == set(devs.values())
        assert {r[2] for r in reports} == {"real"}
    finally:
        for h in holders:
            h.kill()


def test_a_launch_its_user_stops_holds_up_no_one_else(site, image):
    """The attack: Alice stops (SIGSTOP) her own launches at moments spread over the
    helper's work, the device search included, and leaves them stopped. Bob's launches of
    the same image still run at once: the helper holds nothing across that work that
    another launch would wait for (a lock would be Alice's to keep)."""
    stopped: list[subprocess.Popen] = []
    alice_did_it = False
    try:
        for i in range(60):
            p = subprocess.Popen([str(site.launcher), f"--image=id:{image}", "true"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=site.user_env(ALICE),
                                 cwd=str(site.base), **site.spawn_kwargs(ALICE))
            stopped.append(p)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and p.poll() is None:
                try:
                    if Path(f"/proc/{p.pid}/comm").read_text().strip() == "shifter-helper":
                        break
                except OSError:
                    break
            time.sleep((i % 30) * 0.0001)
            # Never a pid we reaped (poll() below only reaps one that ended): not reused.
            if not alice_did_it and p.poll() is None:
                # Alice may do this herself: the setuid helper's real uid is hers.
                res = site.run(ALICE, ["kill", "-STOP", str(p.pid)])
                alice_did_it = res.returncode == 0
                assert alice_did_it, res.stderr
            else:
                p.send_signal(signal.SIGSTOP)  # nothing if it ended already
            try:
                res = site.shifter(BOB, f"--image=id:{image}", "cat", "/etc/marker",
                                   timeout=20)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"Bob's launch waited on Alice's stopped one ({i})") from None
            assert (res.returncode, res.stdout) == (0, "real\n"), res.stderr
        assert alice_did_it
    finally:
        for p in stopped:
            p.kill()
            p.wait()


def test_a_launch_shares_the_device_of_a_prepared_container(site, image):
    """setupRoot has the image mounted in the node's namespace: a fresh launch (a request
    that does not match the signature) mounts setupRoot's device. unsetupRoot while the
    launch runs does not take the device from it; nothing is left once both are gone."""
    uid, gid = str(site_uid(ALICE)), str(site_gid(ALICE))
    res = site.root_tool("setupRoot", "-U", uid, "-G", gid, "-u", ALICE, "id", image)
    holder = None
    try:
        assert res.returncode == 0, res.stderr
        prepared = os.stat(site.loop_mount / "bin" / "busybox").st_dev
        assert loop_major(prepared) == 7
        holder = Holder(site, ALICE, f"--image=id:{image}", "--volume=/tmp:/fresh",
                        script=HOLD + "; cat /etc/marker; test -d /fresh && echo FRESH")
        assert holder.report() == (prepared, ALICE, "real")
        assert len(loop_rdevs(site)) == 1
    finally:
        done = site.root_tool("unsetupRoot")
    try:
        assert done.returncode == 0, done.stderr
        assert site.our_mounts() == []
        assert len(loop_rdevs(site)) == 1, "the running launch still holds the device"
        assert holder.release() == "real\nFRESH\n"
    finally:
        if holder is not None:
            holder.kill()


def site_uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def site_gid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


# -- devices that must not be shared ----------------------------------------------------

LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4


class LoopInfo64(ctypes.Structure):
    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
                ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
                ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_char * 64),
                ("lo_crypt_name", ctypes.c_char * 64), ("lo_encrypt_key", ctypes.c_char * 32),
                ("lo_init", ctypes.c_uint64 * 2)]


class LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


class RootLoop:
    """A loop device that root (not the helper) binds, as a site tool or admin might:
    ``flags`` (LO_FLAGS_*), ``offset``, ``sizelimit`` as given. Held open until close();
    an autoclear one is released then, any other one is cleared explicitly."""

    def __init__(self, path: Path, flags: int, offset: int = 0, sizelimit: int = 0) -> None:
        ro = flags & LO_FLAGS_READ_ONLY
        backing = os.open(path, os.O_RDONLY if ro else os.O_RDWR)
        ctl = os.open("/dev/loop-control", os.O_RDWR)
        try:
            for _ in range(32):
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                self.dev = f"/dev/loop{n}"
                self.fd = os.open(self.dev, os.O_RDONLY if ro else os.O_RDWR)
                cfg = LoopConfig(fd=backing)
                cfg.info.lo_flags = flags
                cfg.info.lo_offset = offset
                cfg.info.lo_sizelimit = sizelimit
                try:
                    fcntl.ioctl(self.fd, LOOP_CONFIGURE, bytes(cfg))
                    break
                except OSError as e:
                    os.close(self.fd)
                    if e.errno != 16:  # EBUSY: someone took it meanwhile
                        raise
            else:
                raise RuntimeError("no free loop device")
        finally:
            os.close(ctl)
            os.close(backing)
        self.flags = flags
        self.rdev = os.stat(self.dev).st_rdev

    def close(self) -> None:
        if self.fd < 0:
            return
        if not self.flags & LO_FLAGS_AUTOCLEAR:
            fcntl.ioctl(self.fd, LOOP_CLR_FD)
        os.close(self.fd)
        self.fd = -1


@pytest.mark.parametrize("decoy", ["same name elsewhere", "at an offset", "cut short",
                                   "file grown since", "no autoclear", "writable"])
def test_a_device_that_is_not_exactly_the_image_is_not_shared(site, image, tmp_path, decoy):
    """Loop devices that root bound (a site tool, an admin) and that look like the image
    but are not exactly it: another file of the same name, the image at an offset or cut
    short, the image file changed in place since (same inode, another size), the image
    without autoclear (it would outlive its users) or writable. A launch uses none of
    them: it attaches its own device, sees the image, and leaves nothing."""
    real = site.image_dir / f"{image}.squashfs"
    ro_ac = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
    image_id = image
    if decoy == "same name elsewhere":
        decoy_sqfs = mksquashfs(busybox_tree(tmp_path / "root", {"etc/marker": "decoy\n"}),
                                tmp_path / "decoy.squashfs")
        (tmp_path / "elsewhere").mkdir()
        path = tmp_path / "elsewhere" / real.name
        shutil.copyfile(decoy_sqfs, path)
        held = RootLoop(path, ro_ac)
    elif decoy in ("file grown since", "at an offset"):
        # A copy under another id, 100 bytes longer than the image: a device at offset 100
        # is as long as the file (both are whole 512-byte sectors), only shifted.
        image_id = hashlib.sha256(decoy.encode() + image.encode()).hexdigest()
        path = site.image_dir / f"{image_id}.squashfs"
        shutil.copyfile(real, path)
        shutil.copyfile(site.image_dir / f"{image}.meta", site.image_dir / f"{image_id}.meta")
        with open(path, "ab") as f:
            f.write(bytes(100))
        if decoy == "at an offset":
            held = RootLoop(path, ro_ac, offset=100)
        else:  # 512 bytes more: the file's size in KiB is the device's still
            held = RootLoop(path, ro_ac)
            with open(path, "ab") as f:
                f.write(bytes(512))
    else:
        flags = {"no autoclear": LO_FLAGS_READ_ONLY, "writable": LO_FLAGS_AUTOCLEAR}
        held = RootLoop(real, flags.get(decoy, ro_ac),
                        sizelimit=real.stat().st_size - 4096 if decoy == "cut short" else 0)
    try:
        res = site.shifter(ALICE, f"--image=id:{image_id}", "sh", "-c", HOLD, input="go\n")
        assert res.returncode == 0, res.stderr
        dev, user, marker = res.stdout.split()
        assert (user, marker) == (ALICE, "real")
        assert int(dev) != held.rdev, "the launch mounted the decoy device"
        assert loop_major(int(dev)) == 7
    finally:
        held.close()
        for suffix in ("squashfs", "meta"):
            if image_id != image:
                site.image_dir.joinpath(f"{image_id}.{suffix}").unlink()


def test_a_device_rebound_between_scan_and_open_is_not_used(site, image, tmp_path):
    """The race: a device holding the image is released and its number bound again to
    another file of the same name, over and over, while launches run. Whatever the
    helper's scan saw, it checks the device it opened (and holds), so every launch sees
    the image, never the other file."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "t").mkdir()
    decoy_sqfs = mksquashfs(busybox_tree(tmp_path / "t" / "root", {"etc/marker": "decoy\n"}),
                            tmp_path / "t" / "decoy.squashfs")
    same_name = tmp_path / "elsewhere" / f"{image}.squashfs"
    shutil.copyfile(decoy_sqfs, same_name)
    real = site.image_dir / f"{image}.squashfs"
    ro_ac = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR
    stop = threading.Event()
    flips = [0]
    errors: list[BaseException] = []

    def racer() -> None:
        try:
            while not stop.is_set():
                for path in (real, same_name):
                    dev = RootLoop(path, ro_ac)
                    time.sleep(0.0005)
                    dev.close()  # autoclear: the number is free again, and taken next
                    flips[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    thread = threading.Thread(target=racer)
    thread.start()
    try:
        markers = []
        for _ in range(30):
            res = site.shifter(ALICE, f"--image=id:{image}", "cat", "/etc/marker")
            assert res.returncode == 0, res.stderr
            markers.append(res.stdout.strip())
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert flips[0] > 30
    assert set(markers) == {"real"}
