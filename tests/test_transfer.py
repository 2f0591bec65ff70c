"""Placing image files into a platform's image dir (docs/behaviour.md, 'Gateway: transfer'), locally
and on a "remote host" that is a real OpenSSH server on loopback (tests/world/sshd.py).

What must hold either way: the exact ssh/scp command lines of the spec, one final file
with mode 0644 and nothing else after a commit, nothing at all after a failed one (and an
error that names the host), and a restarted gateway removing exactly the partial files
of its own dead processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from world.gateway import Gateway
from world.imagebuild import File, RandomData, build_layer, push_image
from world.sshd import Sshd

from imagegw import transfer as transfer_mod
from imagegw.transfer import (
    LocalTransfer,
    RemoteTransfer,
    TransferError,
    partial_prefix,
    transfer_for,
)

SYS = "testsys"
IMAGE = "0123456789abcdef" * 4 + ".squashfs"


@pytest.fixture(scope="module")
def sshd():
    with Sshd() as server:
        yield server


@pytest.fixture
def remote_dir(tmp_path):
    """The image dir "on the remote host" (root logs in, so any local dir will do)."""
    path = tmp_path / "remote-images"
    path.mkdir()
    return path


def _remote(sshd: Sshd, image_dir: Path, staging: Path, **kw) -> RemoteTransfer:
    return RemoteTransfer(sshd.platform(image_dir, **kw), staging)


def _files(root: Path) -> list[str]:
    """Every file under ``root``, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- command lines -------------------------------------------------------------------------


def test_ssh_and_scp_command_lines_are_the_specs(tmp_path):
    plat = {
        "accesstype": "remote",
        "host": ["dtn1.site", "dtn2.site"],
        "ssh": {
            "username": "shifter",
            "key": "/etc/shifter/id_ed25519",
            "imageDir": "/global/images",
            "sshCmdOptions": "-p 2222 -o BatchMode=yes",  # a string is split like a shell
            "scpCmdOptions": ["-P", "2222", "-l", "8000"],  # a list is taken as is
        },
    }
    t = transfer_for(plat, tmp_path)
    assert isinstance(t, RemoteTransfer)
    # host[0] only: the other hosts see the same (shared) image dir.
    assert t.ssh_argv("ls /x") == [
        *"ssh -i /etc/shifter/id_ed25519 -p 2222 -o BatchMode=yes shifter@dtn1.site".split(),
        "ls /x",
    ]
    scp = "scp -i /etc/shifter/id_ed25519 -P 2222 -l 8000 /tmp/a shifter@dtn1.site:/global/images/b"
    assert t.scp_argv("/tmp/a", "/global/images/b") == scp.split()
    bare = RemoteTransfer({"host": ["h"], "ssh": {"username": "u", "imageDir": "/i"}}, tmp_path)
    assert bare.ssh_argv("true") == ["ssh", "u@h", "true"]
    assert bare.scp_argv("/a", "/i/b") == ["scp", "/a", "u@h:/i/b"]
    for broken in ({"ssh": {"imageDir": "/i"}}, {"host": ["h"], "ssh": {}}):
        with pytest.raises(TransferError, match="host"):
            RemoteTransfer(broken, tmp_path)
    with pytest.raises(TransferError, match="accesstype"):
        transfer_for({"accesstype": "ftp"}, tmp_path)


# -- local ---------------------------------------------------------------------------------


def test_local_commit_leaves_one_final_file_0644(tmp_path):
    images = tmp_path / "images"
    t = LocalTransfer(images)
    staged = t.staging(IMAGE)
    # Built in the image dir itself, under a name no reader looks for, so placing is a rename.
    assert staged.parent == images and staged.name.startswith(partial_prefix(IMAGE))
    staged.write_bytes(b"first")
    t.commit(staged, IMAGE)
    assert _files(images) == [IMAGE]
    assert (images / IMAGE).stat().st_mode & 0o7777 == 0o644
    # A file built elsewhere (another filesystem, say) is copied in under a partial name.
    outside = tmp_path / "built.squashfs"
    outside.write_bytes(b"second")
    t.commit(outside, IMAGE)
    assert _files(images) == [IMAGE] and (images / IMAGE).read_bytes() == b"second"
    assert not outside.exists()
    t.write("x.meta", b"FORMAT: squashfs\n")
    assert _files(images) == [IMAGE, "x.meta"]
    assert (images / "x.meta").stat().st_mode & 0o7777 == 0o644


# -- remote, against a real sshd -----------------------------------------------------------


def test_remote_commit_runs_the_spec_commands_and_leaves_one_final_file(
    sshd, remote_dir, tmp_path, monkeypatch
):
    t = _remote(sshd, remote_dir, tmp_path / "staging")
    calls: list[list[str]] = []
    real_run = subprocess.run

    def spy(argv, *args, **kwargs):
        calls.append(list(argv))
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(transfer_mod.subprocess, "run", spy)
    staged = t.staging(IMAGE)
    staged.write_bytes(b"squashfs bytes" * 1000)
    t.commit(staged, IMAGE)

    scp, ssh = calls
    partial = scp[-1].split(":", 1)[1]
    assert scp == t.scp_argv(str(staged), partial)
    assert scp[-1].startswith(f"root@127.0.0.1:{remote_dir}/{partial_prefix(IMAGE)}")
    final = f"{remote_dir}/{IMAGE}"
    assert ssh == t.ssh_argv(f"chmod 644 {partial} && mv {partial} {final}")
    assert ssh[:3] == ["ssh", "-i", sshd.key] and ssh[-2] == "root@127.0.0.1"

    assert _files(remote_dir) == [IMAGE]
    assert (remote_dir / IMAGE).stat().st_mode & 0o7777 == 0o644
    assert (remote_dir / IMAGE).read_bytes() == b"squashfs bytes" * 1000
    assert not staged.exists()
    # Replacing it is a rename too: still one file, the new content.
    t.write(IMAGE, b"v2")
    assert _files(remote_dir) == [IMAGE] and (remote_dir / IMAGE).read_bytes() == b"v2"
    assert t.exists(IMAGE) and not t.exists("nothing.squashfs")
    t.remove(IMAGE)
    assert _files(remote_dir) == []
    assert _files(tmp_path / "staging") == []


def test_remote_write_into_a_subdirectory(sshd, remote_dir, tmp_path):
    """The tag index (``tags/<type>/<tag>``) lives in subdirectories the remote side may
    not have yet."""
    t = _remote(sshd, remote_dir, tmp_path / "staging")
    name = f"tags/docker/{quote('reg:5000/a/b:v1', safe='')}"
    t.write(name, b"abc\n")
    assert _files(remote_dir) == [name]
    assert (remote_dir / name).stat().st_mode & 0o7777 == 0o644
    assert _files(tmp_path / "staging") == []


def test_remote_image_dir_not_writable_fails_naming_the_host(sshd, tmp_path, test_users):
    # The gateway's ssh user may not write the image dir: an ordinary user, a root dir.
    # (Outside pytest's root-only tmp dir, so that the user can reach it and be refused
    # for the right reason.)
    images = Path(tempfile.mkdtemp(prefix="shifter-ro-images-"))
    try:
        images.chmod(0o755)
        t = _remote(sshd, images, tmp_path / "staging", user="shifter-alice")
        staged = t.staging(IMAGE)
        staged.write_bytes(b"x" * 4096)
        with pytest.raises(TransferError) as err:
            t.commit(staged, IMAGE)
        assert "127.0.0.1" in str(err.value) and "copy" in str(err.value)
        assert "Permission denied" in str(err.value)
        assert os.listdir(images) == []
        assert not staged.exists()
    finally:
        shutil.rmtree(images, ignore_errors=True)


def _children(name: str) -> list[int]:
    """Pids of our direct children named ``name``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if comm == name and ppid == os.getpid():
            pids.append(int(entry))
    return pids


def test_remote_scp_killed_mid_copy_leaves_nothing(sshd, remote_dir, tmp_path):
    # 250 kB/s for 2 MB: about 8 s of copying, time enough to kill it half way.
    t = _remote(sshd, remote_dir, tmp_path / "staging", scp_extra=["-l", "2000"])
    staged = t.staging(IMAGE)
    staged.write_bytes(os.urandom(2 << 20))
    outcome: list[BaseException] = []

    def commit() -> None:
        try:
            t.commit(staged, IMAGE)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=commit)
    worker.start()
    deadline = time.monotonic() + 15
    partials: list[Path] = []
    while time.monotonic() < deadline:
        partials = [p for p in remote_dir.glob(f"{IMAGE}.partial.*") if p.stat().st_size > 0]
        if partials:
            break
        time.sleep(0.05)
    assert partials, f"scp never started writing:\n{sshd.log()}"
    scps = _children("scp")
    assert len(scps) == 1
    os.kill(scps[0], signal.SIGKILL)
    worker.join(30)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], TransferError), outcome
    assert "127.0.0.1" in str(outcome[0])
    assert _files(remote_dir) == []  # neither the partial nor a final file
    assert not staged.exists()


# -- cleaning up after a dead gateway ------------------------------------------------------


@pytest.fixture
def fqdn(monkeypatch):
    # Gateway hosts are often named with their domain: the dots must not confuse the
    # parsing of "<name>.partial.<host>.<pid>.<random>".
    monkeypatch.setattr(transfer_mod.socket, "gethostname", lambda: "gw1.example.org")
    return "gw1.example.org"


def _plant_partials(image_dir: Path, dead: int, live: int) -> tuple[list[str], list[str]]:
    """Partial files of this host's dead and live processes and of other hosts; returns
    (names that must go, names that must stay)."""
    index = f"tags/docker/{quote('r/a:v1', safe='')}"
    gone = [
        partial_prefix(IMAGE, dead) + "a1b2c3d4",
        partial_prefix("x.meta", dead) + "q_9Zk3xw",
        partial_prefix(index, dead) + "00ff00ff",
    ]
    kept = [
        IMAGE,
        "x.meta",
        index,
        partial_prefix(IMAGE, live) + "a1b2c3d4",  # a live process is still writing
        f"{IMAGE}.partial.gw2.example.org.{dead}.a1b2c3d4",  # another host's
        f"{IMAGE}.partial.gw1.{dead}.a1b2c3d4",  # "gw1" is another host than gw1.example.org
    ]
    for name in gone + kept:
        (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (image_dir / name).write_bytes(b"p")
    return gone, kept


def test_local_clean_dead_partials(tmp_path, fqdn):
    images = tmp_path / "images"
    images.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        gone, kept = _plant_partials(images, _dead_pid(), sleeper.pid)
        removed = LocalTransfer(images).clean_dead_partials()
        assert sorted(removed) == sorted(gone)
        assert _files(images) == sorted(kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_remote_clean_dead_partials(sshd, remote_dir, tmp_path, fqdn):
    staging = tmp_path / "staging"
    t = _remote(sshd, remote_dir, staging)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = _dead_pid()
        gone, kept = _plant_partials(remote_dir, dead, sleeper.pid)
        # The local staging copies (the whole squashfs, before scp) are cleaned too.
        staging.mkdir()
        (staging / (partial_prefix(IMAGE, dead) + "zzzzzzzz")).write_bytes(b"s")
        live_staged = staging / (partial_prefix(IMAGE, sleeper.pid) + "yyyyyyyy")
        live_staged.write_bytes(b"s")
        removed = t.clean_dead_partials()
        assert len(removed) == len(gone) + 1
        assert _files(remote_dir) == sorted(kept)
        assert _files(staging) == [live_staged.name]
    finally:
        sleeper.kill()
        sleeper.wait()


# -- a gateway whose images go to a remote host --------------------------------------------


def test_gateway_with_a_remote_platform_places_images_over_ssh(
    sshd, remote_dir, tmp_path, munged, registry, test_users
):
    layer = build_layer(
        [File("hello", "over ssh\n"), File("blob", RandomData(300_000, 7))],
        "gzip",
        tmp_path / "layers",
    )
    push_image(registry, "xfer/remote", "v1", [layer], {"Cmd": ["/hello"]})
    tag = f"{registry.host}/xfer/remote:v1"
    platform = {"mungeSocketPath": munged.socket, "admins": ["root"], **sshd.platform(remote_dir)}
    logins_before = sshd.log().count("Accepted publickey")
    gw = Gateway(
        tmp_path / "gw",
        munge_socket=munged.socket,
        registry=registry,
        extra={"Platforms": {SYS: platform}},
    )
    with gw:
        rec = gw.wait_status(tag, timeout=60)
        assert rec["status"] == "READY", rec
        image_id = rec["id"]
        looked = gw.request("GET", f"/api/lookup/{SYS}/docker/{tag}/")
        assert looked.status_code == 200 and looked.json()["id"] == image_id
        # The tag index is written just after the record turns READY.
        index = f"tags/docker/{quote(tag, safe='')}"
        deadline = time.monotonic() + 15
        while not (remote_dir / index).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (remote_dir / index).exists(), gw.log()
    assert _files(remote_dir) == sorted([f"{image_id}.meta", f"{image_id}.squashfs", index])
    for name in (f"{image_id}.meta", f"{image_id}.squashfs", index):
        assert (remote_dir / name).stat().st_mode & 0o7777 == 0o644, name
    assert (remote_dir / index).read_text().strip() == image_id
    assert "FORMAT: squashfs" in (remote_dir / f"{image_id}.meta").read_text()
    out = subprocess.run(
        ["unsquashfs", "-cat", str(remote_dir / f"{image_id}.squashfs"), "hello"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "over ssh\n"
    # It went over ssh (the "remote" dir is local only because the sshd is), and the
    # gateway's local staging area is empty again.
    assert sshd.log().count("Accepted publickey") > logins_before
    assert not gw.image_dir.exists() or _files(gw.image_dir) == []
    assert _files(tmp_path / "gw" / "expand") == []
