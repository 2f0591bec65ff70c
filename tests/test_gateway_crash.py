"""A gateway killed mid-pull (SIGKILL of the master and every worker at once) and started again:
docs/behaviour.md, 'Gateway: process model' (records a dead worker left in any in-flight
state are re-queued or failed, never left stuck) and 'Gateway: transfer' (a reader never sees
a partial file).

Each state is held open long enough to kill the gateway inside it by honest means, no
test hook in the product: PULLING by a proxy that holds back the layer download,
CONVERSION by a big incompressible layer squashed with xz, TRANSFER by a bandwidth-limited
scp to a real sshd. After the restart, without any client asking, the record must be
re-queued and become READY; nothing partial may remain in the image dir, the expand dir,
the staging area or the layer cache; and the image must be whole.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from world.gateway import Gateway
from world.imagebuild import File, RandomData, build_layer, push_image
from world.sshd import Sshd

from imagegw.store import open_store

SYS = "testsys"


@pytest.fixture(scope="module")
def sshd():
    with Sshd() as server:
        yield server


@pytest.fixture
def gateways(tmp_path, munged, registry):
    """Factory for gateways in this test's temp dir; all stopped afterwards, even killed ones."""
    made: list[Gateway] = []

    def make(**extra: Any) -> Gateway:
        gw = Gateway(
            tmp_path / f"gw{len(made)}", munge_socket=munged.socket, registry=registry, extra=extra
        )
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


# -- helpers -------------------------------------------------------------------------------


def _queue(gw: Gateway) -> list[dict[str, Any]]:
    resp = gw.request("GET", f"/api/queue/{SYS}/")
    assert resp.status_code == 200, resp.text
    return resp.json()["list"]


def _post_pull(gw: Gateway, tag: str) -> dict[str, Any]:
    resp = gw.request("POST", f"/api/pull/{SYS}/docker/{tag}/")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _wait_state(gw: Gateway, tag: str, state: str, ready=lambda entry: True, timeout=120.0):
    """Poll the queue (no re-POST) until ``tag`` is in ``state`` and ``ready(entry)`` holds."""
    deadline = time.monotonic() + timeout
    entry = None
    while time.monotonic() < deadline:
        entry = next((q for q in _queue(gw) if q["image"] == tag), None)
        if entry is None or entry["status"] == "FAILURE":
            raise AssertionError(f"{tag} left the queue before {state}: {entry}\n{gw.log()}")
        if entry["status"] == state and ready(entry):
            return entry
        time.sleep(0.1)
    raise AssertionError(f"{tag} never reached {state} (last: {entry})\n{gw.log()}")


def _wait_settled(gw: Gateway, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Poll the queue, asking nothing else, until no record is in flight; returns the
    FAILURE entries left. A restart must finish what it found by itself."""
    deadline = time.monotonic() + timeout
    inflight: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        queue = _queue(gw)
        inflight = [q for q in queue if q["status"] != "FAILURE"]
        if not inflight:
            return queue
        time.sleep(0.2)
    raise AssertionError(f"still in flight after {timeout} s: {inflight}\n{gw.log()}")


def _records(gw: Gateway) -> list[dict[str, Any]]:
    store = open_store(gw.config)
    try:
        return store.list(SYS)
    finally:
        store.close()


def _partials(root: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(root)) for p in root.rglob("*.partial.*")) if root.exists() else []
    )


def _leftovers(gw: Gateway, remote_dir: Path | None = None) -> dict[str, list[str]]:
    """Everything a half-done pull may leave, by where it is."""
    expand = Path(gw.config["ExpandDirectory"])
    staging = expand / "staging"  # RemoteTransfer's local copies, before scp
    out = {
        "image dir partials": _partials(gw.image_dir),
        "expanded trees": sorted(p.name for p in expand.iterdir() if p.name != "staging")
        if expand.exists()
        else [],
        "staged copies": sorted(p.name for p in staging.iterdir()) if staging.exists() else [],
        "cache partials": _partials(Path(gw.config["CacheDirectory"])),
    }
    if remote_dir is not None:
        out["remote partials"] = _partials(remote_dir)
    return out


def _nothing_left(gw: Gateway, remote_dir: Path | None = None) -> None:
    # A moment's grace: a live worker may be between placing a file and removing its
    # staged copy. What a crash left is removed at startup or never, so this hides nothing.
    deadline = time.monotonic() + 3
    while any((left := _leftovers(gw, remote_dir)).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(left.values()), f"{left}\n{gw.log()}"


def _sha256_in_image(sqfs: Path, path: str) -> str:
    proc = subprocess.Popen(["unsquashfs", "-cat", str(sqfs), path], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    digest = hashlib.sha256()
    while chunk := proc.stdout.read(1 << 20):
        digest.update(chunk)
    assert proc.wait() == 0, f"unsquashfs -cat {sqfs} {path} failed"
    return digest.hexdigest()


def _check_image(gw: Gateway, tag: str, image_dir: Path, content: dict[str, Any]) -> str:
    """Pulling again answers READY, lookup finds it, and the files on disk are whole."""
    rec = gw.wait_status(tag, timeout=60)
    assert rec["status"] == "READY", rec
    looked = gw.request("GET", f"/api/lookup/{SYS}/docker/{tag}/")
    assert looked.status_code == 200, looked.text
    image_id = looked.json()["id"]
    assert image_id == rec["id"]
    sqfs, meta = image_dir / f"{image_id}.squashfs", image_dir / f"{image_id}.meta"
    for path in (sqfs, meta):
        assert path.stat().st_mode & 0o7777 == 0o644, path
    assert "FORMAT: squashfs" in meta.read_text()
    # The tag index is written just after the record turns READY.
    index = image_dir / "tags" / "docker" / quote(tag, safe="")
    deadline = time.monotonic() + 15
    while not index.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert index.read_text().strip() == image_id
    listing = subprocess.run(
        ["unsquashfs", "-l", str(sqfs)], capture_output=True, text=True, check=True
    ).stdout
    for path, data in content.items():
        assert f"squashfs-root/{path}\n" in listing, listing
        want = data.sha256() if isinstance(data, RandomData) else hashlib.sha256(data).hexdigest()
        assert _sha256_in_image(sqfs, path) == want, path
    return image_id


def _push(registry, tmp_path: Path, repo: str, content: dict[str, Any], compression="gzip"):
    layer = build_layer(
        [File(p, d) for p, d in content.items()],
        compression,
        tmp_path / "layers",
        level=1 if compression == "gzip" else None,
    )
    push_image(registry, repo, "v1", [layer], {"Cmd": ["/hello"], "Env": ["A=1"]})
    return layer


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- a crash in each state -----------------------------------------------------------------


def test_crash_while_pulling_a_layer(gateways, registry, fault_proxy, tmp_path):
    content = {"hello": b"pulled\n", "data": RandomData(512 << 10, "crash-pulling")}
    layer = _push(registry, tmp_path, "crash/pulling", content)
    proxy = fault_proxy(registry)
    # The layer GET is held back: the gateway waits in PULLING with a cache file started.
    proxy.delay(re.escape(layer.digest), 30)
    tag = f"{proxy.host}/crash/pulling:v1"
    gw = gateways().start()
    _post_pull(gw, tag)

    def downloading(entry: dict[str, Any]) -> bool:
        return entry["status_message"] == f"Pulling layer {layer.digest}" and bool(
            proxy.requests_to(layer.digest)
        )

    _wait_state(gw, tag, "PULLING", downloading)
    gw.kill()

    left = _leftovers(gw)
    assert len(left["cache partials"]) == 1, left  # the download's temporary file
    (rec,) = _records(gw)
    assert rec["status"] == "PULLING" and rec["owner"].startswith(socket.gethostname() + ":")

    proxy.clear_faults()
    gw.start()
    assert _wait_settled(gw) == []
    _check_image(gw, tag, gw.image_dir, content)
    _nothing_left(gw)
    assert len(proxy.requests_to(layer.digest)) == 2  # the killed download, then one more


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "disk"])
def test_crash_while_converting(gateways, registry, tmp_path, streaming):
    # 150 MB of random bytes squashed with zstd -22: the writer runs for seconds (about 10
    # here), long enough to be killed in the middle.
    content = {"hello": b"converted\n", "big": RandomData(150 << 20, "crash-conversion")}
    _push(registry, tmp_path, "crash/conversion", content, compression="none")
    tag = f"{registry.host}/crash/conversion:v1"
    slow = "-comp zstd -Xcompression-level 22"
    gw = gateways(ConverterOptions={"squashfs": slow}, StreamConversion=streaming).start()
    _post_pull(gw, tag)
    _wait_state(gw, tag, "CONVERSION", lambda _: bool(_partials(gw.image_dir)))
    gw.kill()

    left = _leftovers(gw)
    # The writer's half-written output, under its partial name, and on the on-disk path
    # the expanded tree (the streaming conversion never writes one).
    trees = 0 if streaming else 1
    assert len(left["image dir partials"]) == 1 and len(left["expanded trees"]) == trees, left
    assert [p.name for p in gw.image_dir.iterdir()] == left["image dir partials"]
    (rec,) = _records(gw)
    assert rec["status"] == "CONVERSION"

    # The operator restarts with the default (much faster) compressor: the re-queued pull
    # must not depend on anything the killed one had set up.
    del gw.config["ConverterOptions"]
    gw.start()
    assert _wait_settled(gw) == []
    _check_image(gw, tag, gw.image_dir, content)
    _nothing_left(gw)


def test_crash_while_transferring_to_a_remote_host(gateways, registry, munged, sshd, tmp_path):
    remote = tmp_path / "remote-images"
    remote.mkdir()
    # scp at 2000 kbit/s: the 2 MB image takes about 8 s to place.
    platform = {
        "mungeSocketPath": munged.socket,
        "admins": ["root"],
        **sshd.platform(remote, scp_extra=["-l", "2000"]),
    }
    content = {"hello": b"placed\n", "data": RandomData(2 << 20, "crash-transfer")}
    _push(registry, tmp_path, "crash/transfer", content)
    tag = f"{registry.host}/crash/transfer:v1"
    gw = gateways(Platforms={SYS: platform}).start()
    _post_pull(gw, tag)

    def copying(_entry: dict[str, Any]) -> bool:
        return any(p.stat().st_size > 0 for p in remote.glob("*.squashfs.partial.*"))

    _wait_state(gw, tag, "TRANSFER", copying)
    gw.kill()

    left = _leftovers(gw, remote)
    # Half an image on the remote side, and the whole one in the local staging area.
    assert len(left["remote partials"]) == 1 and len(left["staged copies"]) == 1, left
    (rec,) = _records(gw)
    assert rec["status"] == "TRANSFER"

    platform["ssh"]["scpCmdOptions"] = sshd.scp_options  # full speed for the retry
    gw.start()
    assert _wait_settled(gw) == []
    _check_image(gw, tag, remote, content)
    _nothing_left(gw, remote)


# -- records and claims of owners that are gone ------------------------------------------


TIMEOUT = 3.0  # PullHeartbeatTimeout in the tests below


def _claim_key(tag: str) -> str:
    return f"{SYS}|docker|{tag}"  # the claim key every gateway uses for a pull


def _foreign_record(tag: str, owner: str, beat: float, status: str) -> dict[str, Any]:
    """A pull record as a gateway on another host leaves it."""
    return {
        "format": "squashfs",
        "arch": "amd64",
        "os": "linux",
        "location": tag.split("/", 1)[0],
        "remotetype": "dockerv2",
        "userACL": [],
        "groupACL": [],
        "private": False,
        "tag": [],
        "status": status,
        "status_message": "Converting to squashfs",
        "system": SYS,
        "itype": "docker",
        "pulltag": tag,
        "owner": owner,
        "last_heartbeat": beat,
    }


def test_pulls_of_a_silent_owner_on_another_host_are_taken_over(
    gateways, registry, fault_proxy, tmp_path
):
    other = "gw2.example.org:4242:0badf00d"  # its pid means nothing here: only time does
    stale_layer = _push(registry, tmp_path, "crash/foreign-stale", {"hello": b"stale\n"})
    _push(registry, tmp_path, "crash/foreign-fresh", {"hello": b"fresh\n"})
    proxy = fault_proxy(registry)
    # The taken-over pull itself runs longer than PullHeartbeatTimeout: its own heartbeat
    # must keep later requests from taking it over again.
    proxy.delay(re.escape(stale_layer.digest), 3 * TIMEOUT, times=1)
    stale_tag = f"{proxy.host}/crash/foreign-stale:v1"
    fresh_tag = f"{registry.host}/crash/foreign-fresh:v1"
    gw = gateways(PullHeartbeatTimeout=TIMEOUT)
    gw.write_config()
    store = open_store(gw.config)
    try:
        # Silent for ten minutes before this gateway even starts.
        then = time.time() - 600
        stale = store.insert(_foreign_record(stale_tag, other, then, "CONVERSION"))
        assert store.claim(_claim_key(stale_tag), other, then, TIMEOUT)
        gw.start()

        # Taken over at startup, with nobody asking.
        deadline = time.monotonic() + 15
        while store.get(stale["_id"])["owner"] == other and time.monotonic() < deadline:
            time.sleep(0.1)
        ours = store.get(stale["_id"])["owner"]
        assert ours.startswith(socket.gethostname() + ":"), (ours, gw.log())
        # A client asks again and again while the layer download is held back.
        owners = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _post_pull(gw, stale_tag)["status"] == "READY":
                break
            now_rec = store.get(stale["_id"])
            if now_rec["status"] != "READY":  # a finished record has no owner any more
                owners.add(now_rec["owner"])
            time.sleep(0.2)
        assert store.get(stale["_id"])["status"] == "READY", gw.log()
        assert owners == {ours}, "a live pull was taken over"
        assert len(proxy.requests_to(stale_layer.digest)) == 1

        # Beating (as far as the store says) when seen: left alone until it falls silent.
        start = time.time()
        fresh = store.insert(_foreign_record(fresh_tag, other, start, "PULLING"))
        assert store.claim(_claim_key(fresh_tag), other, start, TIMEOUT)
        rec = _post_pull(gw, fresh_tag)
        if time.time() - start < TIMEOUT:  # (a very slow machine cannot judge this part)
            assert rec["status"] == "PULLING" and store.get(fresh["_id"])["owner"] == other
        rec = gw.wait_status(fresh_tag, timeout=30)
        assert rec["status"] == "READY" and time.time() - start >= TIMEOUT
        assert _wait_settled(gw, timeout=10) == []
        assert store.claims() == []
    finally:
        store.close()


def test_a_claim_left_by_a_dead_process_does_not_block_pulls(gateways, registry, tmp_path):
    # A process that dies between claiming a pull and recording it (or between finishing
    # and letting go) leaves only its claim; with the default PullHeartbeatTimeout of an
    # hour it would refuse that tag for an hour.
    _push(registry, tmp_path, "crash/orphan-claim", {"hello": b"claimed\n"})
    tag = f"{registry.host}/crash/orphan-claim:v1"
    gw = gateways()
    gw.write_config()
    store = open_store(gw.config)
    try:
        dead = f"{socket.gethostname()}:{_dead_pid()}:feedface"
        assert store.claim(_claim_key(tag), dead, time.time(), 3600)
        gw.start()
        rec = gw.wait_status(tag, timeout=30)
        assert rec["status"] == "READY", rec
        assert store.claims() == []
    finally:
        store.close()
