"""The image manager's rules (docs/behaviour.md, 'Gateway: records' to 'Gateway: import', and the
gateway part of 'Scenarios the tests cover'), on every record-store backend.

These are the fast, exhaustive rule tests; tests/test_gateway.py drives the same scenarios
over HTTP with a real gunicorn, munge and registry. Here:

* the store is real: SQLite in tmp_path, and MongoDB's code path through mongomock;
* the pipeline is the one thing faked (``imagegw.manager.Pipeline``): it "pulls" from a
  dict of tag → image, places a stand-in squashfs and writes the ``.meta`` file with the
  real ``Pipeline.write_meta``, so what the runtime would read is the product's text;
* worker jobs run synchronously (or are held back, to observe a pull in flight);
* time is a fixture: the manager is given a clock that moves only when the test says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mongomock
import pytest

import imagegw.manager as manager_mod
from imagegw.acl import Caller
from imagegw.config import parse_config
from imagegw.errors import ImageError, ImageNotFound
from imagegw.fasthash import fasthash
from imagegw.layercache import LayerCache
from imagegw.manager import (
    BadRequest,
    Conflict,
    Forbidden,
    GatewayError,
    ImageManager,
    NotFound,
)
from imagegw.pipeline import Pipeline as RealPipeline
from imagegw.pipeline import PullResult
from imagegw.reference import parse_reference
from imagegw.store import open_store
from imagegw.store.base import EXPIRED, FAILURE, READY, RecordStore
from imagegw.store.mongo import MongoStore
from imagegw.transfer import partial_prefix

SYS = "systema"
OTHER = "systemb"
T0 = 1_700_000_000.0
DAY = 86400.0
EXPIRATION = 90 * DAY  # the default ImageExpirationTimeout, 90:00:00:00
UPDATE = 300.0  # PullUpdateTimeout
HEARTBEAT = 3600.0  # PullHeartbeatTimeout

ALICE = Caller("alice", 1001, "alice", 1001)
BOB = Caller("bob", 1002, "bob", 1002, groups=(3000,))
CAROL = Caller("carol", 2000, "carol", 2000)
NOBODY = Caller("nobody", 65534, "nogroup", 65534)
ROOT = Caller("root", 0, "root", 0)
ROO = Caller("roo", 4242, "roo", 4242)  # a prefix of "root": must not be an admin


# -- time --------------------------------------------------------------------------------


class Clock:
    """The manager's clock (``ImageManager(config, store, clock)``): moves only when a test
    says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- the fake registry + pipeline ----------------------------------------------------------


@dataclass
class PullCall:
    """What the manager asked the pipeline for: the ACLs are what goes into the .meta."""

    tag: str
    user_acl: list[int]
    group_acl: list[int]
    credentials: dict[str, str]


@dataclass
class FakeRegistry:
    """Tag → (image id, image config) the fake pipeline resolves, or an error to raise."""

    images: dict[str, tuple[str, dict[str, Any]] | ImageError] = field(default_factory=dict)
    calls: list[PullCall] = field(default_factory=list)

    def publish(self, tag: str, image_id: str | None = None, **section: Any) -> str:
        image_id = image_id or hashlib.sha256(tag.encode()).hexdigest()
        self.images[tag] = (image_id, {"config": section})
        return image_id

    def fail(self, tag: str, cause: str = "registry unreachable") -> None:
        self.images[tag] = ImageError(tag, cause)

    def pulled(self, tag: str) -> int:
        return sum(1 for c in self.calls if c.tag == tag)


def fake_pipeline_class(registry: FakeRegistry) -> type:
    class FakePipeline:
        def __init__(self, config: Any, image_dir: Any = None, *, transfer: Any, **_: Any):
            # The real class only to write the .meta: its text is the product's, not ours.
            self.real = RealPipeline(config, transfer=transfer)
            self.transfer = transfer

        def pull(
            self,
            text: str,
            *,
            credentials: Any = None,
            user_acl: Any = (),
            group_acl: Any = (),
            on_status: Callable[[str, str], None] | None = None,
            on_progress: Any = None,
            force: bool = False,
        ) -> PullResult:
            registry.calls.append(
                PullCall(text, list(user_acl), list(group_acl), dict(credentials or {}))
            )
            status = on_status or (lambda _s, _m: None)
            status("PULLING", "Getting manifest")
            entry = registry.images.get(text)
            if entry is None:
                raise ImageNotFound(text, "manifest unknown")
            if isinstance(entry, ImageError):
                raise entry
            image_id, config = entry
            name = f"{image_id}.squashfs"
            if not self.transfer.exists(name):
                status("CONVERSION", "Converting to squashfs")
                self.transfer.write(name, f"squashfs of {text}\n".encode())
            status("TRANSFER", "Placing image")
            meta = self.real.write_meta(image_id, config, user_acl, group_acl, lambda _w: None)
            return PullResult(
                image_id,
                parse_reference(text),
                "sha256:" + hashlib.sha256(image_id.encode()).hexdigest(),
                config,
                self.transfer.image_dir / name,
                meta,
            )

    return FakePipeline


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    reg = FakeRegistry()
    monkeypatch.setattr(manager_mod, "Pipeline", fake_pipeline_class(reg))
    return reg


# -- worker jobs -------------------------------------------------------------------------


class Jobs:
    """Runs submitted worker jobs at once, or holds them (``hold = True``) so a test can
    look at a pull in flight and run it later."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.submitted = 0

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.submitted += 1
        if self.hold:
            self.held.append((fn, args))
        else:
            fn(*args)  # directly, not through _guard: an unexpected error fails the test

    def run(self, index: int | None = None) -> None:
        """Run the held jobs (or only the one at ``index``, dropping the others)."""
        todo = self.held if index is None else [self.held[index]]
        self.held = []
        for fn, args in todo:
            fn(*args)


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch) -> Jobs:
    j = Jobs()
    monkeypatch.setattr(ImageManager, "_submit", lambda _self, fn, *args: j.submit(fn, *args))
    return j


# -- store, config, manager ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "mongomock"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordStore]:
    if request.param == "sqlite":
        s = open_store({"StateDirectory": str(tmp_path / "state")})
    else:
        s = MongoStore(client=mongomock.MongoClient(), database="shifter_test")
    yield s
    s.close()


def image_dir(tmp_path: Path, system: str = SYS) -> Path:
    return tmp_path / f"images-{system}"


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Any]:
    """imagemanager.json as a site writes it: two systems, each with its own image dir."""
    return {
        "CacheDirectory": str(tmp_path / "cache"),
        "ExpandDirectory": str(tmp_path / "expand"),
        "DefaultImageFormat": "squashfs",
        "PullUpdateTimeout": UPDATE,
        "ImageExpirationTimeout": "90:00:00:00",
        "Metrics": True,
        "ImportUsers": "all",
        "Authentication": "mock",
        "Platforms": {
            system: {
                "accesstype": "local",
                "admins": ["root"],
                "local": {"imageDir": str(image_dir(tmp_path, system))},
            }
            for system in (SYS, OTHER)
        },
    }


@pytest.fixture
def make_manager(
    raw: dict[str, Any], store: RecordStore, clock: Clock, registry: FakeRegistry, jobs: Jobs
) -> Iterator[Callable[..., ImageManager]]:
    """``make_manager(Key=value, …)``: a manager over the test store; a value of None
    removes the key from the config."""
    made: list[ImageManager] = []

    def make(metrics_batch_seconds: float = 0.0, **overrides: Any) -> ImageManager:
        cfg = {**raw, **overrides}
        cfg = {k: v for k, v in cfg.items() if v is not None}
        mgr = ImageManager(
            parse_config(cfg), store, clock, metrics_batch_seconds=metrics_batch_seconds
        )
        made.append(mgr)
        return mgr

    yield make
    for mgr in made:
        mgr.shutdown()


@pytest.fixture
def mgr(make_manager: Callable[..., ImageManager]) -> ImageManager:
    return make_manager()


# -- helpers -------------------------------------------------------------------------------


def pull_ready(
    mgr: ImageManager, caller: Caller, tag: str, system: str = SYS, **acl: Any
) -> dict[str, Any]:
    rec = mgr.pull(caller, system, "docker", tag, acl.get("uids"), acl.get("gids"))
    assert rec["status"] == READY, rec
    return rec


def records(store: RecordStore, system: str | None = SYS, **kw: Any) -> list[dict[str, Any]]:
    return store.list(system, **kw)


def tagged(store: RecordStore, system: str, tag: str) -> list[dict[str, Any]]:
    return [r for r in store.list(system) if tag in (r.get("tag") or [])]


def meta_lines(tmp_path: Path, image_id: str, system: str = SYS) -> list[str]:
    return (image_dir(tmp_path, system) / f"{image_id}.meta").read_text().splitlines()


def index_file(tmp_path: Path, tag: str, itype: str = "docker", system: str = SYS) -> Path:
    return image_dir(tmp_path, system) / "tags" / itype / quote(tag, safe="")


def squashfs_file(path: Path, payload: bytes = b"payload", *, xattrs: bool = False) -> Path:
    """A file the import check accepts: it reads only the 96-byte superblock (magic and
    xattr table offset), so a stand-in is enough; real squashfs imports are covered by
    tests/test_gateway.py."""
    superblock = bytearray(96)
    superblock[0:4] = b"hsqs"
    # xattr_id_table_start: all ones means "no xattrs"; any offset means it carries some.
    superblock[56:64] = (1024).to_bytes(8, "little") if xattrs else b"\xff" * 8
    path.write_bytes(bytes(superblock) + payload)
    return path


def import_body(path: Path, **extra: Any) -> dict[str, Any]:
    return {"filepath": str(path), "format": "squashfs", **extra}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def claim_key(tag: str, system: str = SYS, itype: str = "docker") -> str:
    return f"{system}|{itype}|{tag}"


# == pull, lookup, list ======================================================================


def test_pull_then_lookup(mgr, registry, tmp_path, clock):
    image_id = registry.publish(
        "ubuntu:22.04",
        Env=["PATH=/usr/bin", "A=1"],
        Entrypoint=["/entry"],
        Cmd=["run", "it"],
        WorkingDir="/work",
        Labels={"org.example.team": "hpc"},
    )
    rec = pull_ready(mgr, ALICE, "ubuntu:22.04")
    assert rec["id"] == image_id and rec["tag"] == ["ubuntu:22.04"]
    assert rec["system"] == SYS and rec["itype"] == "docker" and rec["pulltag"] == "ubuntu:22.04"
    assert rec["ENV"] == ["PATH=/usr/bin", "A=1"]
    assert rec["ENTRY"] == ["/entry"] and rec["CMD"] == ["run", "it"]
    assert rec["WORKDIR"] == "/work"
    # labels as LABELS (docs/behaviour.md, 'Scenarios the tests cover')
    assert rec["LABELS"] == {"org.example.team": "hpc"}
    assert rec["last_pull"] == T0 and rec["private"] is False
    assert rec["userACL"] == [] and rec["groupACL"] == []
    # The record fields a pull record starts with (docs/behaviour.md, 'Gateway: records').
    assert rec["format"] == "squashfs" and rec["remotetype"] == "dockerv2"
    assert (rec["os"], rec["arch"]) == ("linux", "amd64")
    assert rec["location"] == "index.docker.io"
    # Files in this system's image dir only, plus the runtime's tag index (beyond Shifter).
    assert (image_dir(tmp_path) / f"{image_id}.squashfs").is_file()
    assert (image_dir(tmp_path) / f"{image_id}.meta").is_file()
    assert index_file(tmp_path, "ubuntu:22.04").read_text() == image_id + "\n"
    assert not image_dir(tmp_path, OTHER).exists()

    found = mgr.lookup(BOB, SYS, "docker", "ubuntu:22.04")
    assert found["id"] == image_id and found["_id"] == rec["_id"]


def test_tag_without_version_gets_latest(mgr, registry):
    registry.publish("ubuntu:latest")
    rec = pull_ready(mgr, ALICE, "ubuntu")
    assert rec["tag"] == ["ubuntu:latest"] and registry.calls[0].tag == "ubuntu:latest"
    assert mgr.lookup(ALICE, SYS, "docker", "ubuntu")["_id"] == rec["_id"]
    assert mgr.lookup(ALICE, SYS, "docker", "ubuntu:latest")["_id"] == rec["_id"]


def test_bogus_lookup_is_not_found(mgr, registry):
    registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    with pytest.raises(NotFound, match="image not found"):
        mgr.lookup(ALICE, SYS, "docker", "bogus:tag")
    # The tag exists, but on the other system, or as another image type.
    with pytest.raises(NotFound):
        mgr.lookup(ALICE, OTHER, "docker", "app:1")
    with pytest.raises(NotFound):
        mgr.lookup(ALICE, SYS, "custom", "app:1")


def test_unknown_system_is_not_found_everywhere(mgr):
    for call in (
        lambda: mgr.list(ALICE, "nosuch"),
        lambda: mgr.lookup(ALICE, "nosuch", "docker", "a:1"),
        lambda: mgr.pull(ALICE, "nosuch", "docker", "a:1"),
        lambda: mgr.queue(ALICE, "nosuch"),
        lambda: mgr.expire(ROOT, "nosuch", "docker", "a:1"),
        lambda: mgr.autoexpire(ROOT, "nosuch"),
        lambda: mgr.metrics(ROOT, "nosuch"),
    ):
        with pytest.raises(NotFound, match="unknown system"):
            call()


def test_registry_credentials_reach_the_pipeline(mgr, registry):
    # From the munge payload's authorized_locations (docs/behaviour.md, 'Gateway: authentication');
    # never stored in a record.
    creds = {"index.docker.io": "alice:s3cret"}
    caller = Caller("alice", 1001, "alice", 1001, authorized_locations=creds)
    registry.publish("private/app:1")
    rec = pull_ready(mgr, caller, "private/app:1")
    assert registry.calls[-1].credentials == creds
    assert "s3cret" not in repr(rec)


def test_bad_pull_requests(mgr, registry):
    with pytest.raises(BadRequest, match="import"):
        mgr.pull(ALICE, SYS, "custom", "mine:1")
    with pytest.raises(BadRequest, match="unknown image type"):
        mgr.pull(ALICE, SYS, "rpm", "a:1")
    with pytest.raises(BadRequest, match="allowed_uids"):
        mgr.pull(ALICE, SYS, "docker", "a:1", "1,x")
    with pytest.raises(BadRequest, match="allowed_gids"):
        mgr.pull(ALICE, SYS, "docker", "a:1", None, "-5")
    assert registry.calls == []


def test_failed_pull_says_why_and_is_queued_not_listed(mgr, registry, store):
    registry.fail("broken:1", "registry refused the login")
    rec = mgr.pull(ALICE, SYS, "docker", "broken:1")
    assert rec["status"] == FAILURE
    assert "registry refused the login" in rec["status_message"]
    assert rec.get("owner") is None and store.claims() == []
    assert mgr.list(ALICE, SYS) == []
    assert mgr.queue(ALICE, SYS) == [
        {"status": FAILURE, "image": "broken:1", "status_message": rec["status_message"]}
    ]
    with pytest.raises(NotFound):
        mgr.lookup(ALICE, SYS, "docker", "broken:1")


def test_list_shows_ready_images_the_caller_may_read(mgr, registry, store):
    for tag in ("public:1", "private:1", "groupy:1", "elsewhere:1"):
        registry.publish(tag)
    registry.fail("broken:1")
    public = pull_ready(mgr, ALICE, "public:1")
    private = pull_ready(mgr, ALICE, "private:1", uids="2000")  # alice + carol
    groupy = pull_ready(mgr, ALICE, "groupy:1", gids="3000")  # alice's gid + group 3000
    pull_ready(mgr, ALICE, "elsewhere:1", system=OTHER)
    assert mgr.pull(ALICE, SYS, "docker", "broken:1")["status"] == FAILURE

    def listed(caller: Caller) -> set[str]:
        return {r["_id"] for r in mgr.list(caller, SYS)}

    assert listed(ALICE) == {public["_id"], private["_id"], groupy["_id"]}
    assert listed(CAROL) == {public["_id"], private["_id"]}
    assert listed(BOB) == {public["_id"], groupy["_id"]}  # 3000 is bob's supplementary gid
    assert listed(NOBODY) == {public["_id"]}
    assert all(r["status"] == READY for r in mgr.list(ROOT, SYS))


def test_queue_lists_what_is_neither_ready_nor_expired(mgr, registry, jobs, store):
    for tag in ("done:1", "gone:1", "busy:1"):
        registry.publish(tag)
    pull_ready(mgr, ALICE, "done:1")
    pull_ready(mgr, ALICE, "gone:1")
    assert mgr.expire(ROOT, SYS, "docker", "gone:1") is True
    jobs.hold = True
    assert mgr.pull(ALICE, SYS, "docker", "busy:1")["status"] == "PENDING"
    assert mgr.queue(ALICE, SYS) == [
        {"status": "PENDING", "image": "busy:1", "status_message": "Queued"}
    ]
    assert mgr.queue(ALICE, OTHER) == []
    jobs.run()
    assert mgr.queue(ALICE, SYS) == []


def test_pull_reports_each_step(mgr, registry, store, monkeypatch):
    registry.publish("steps:1")
    changes: list[dict[str, Any]] = []
    update = store.update

    def spy(rid: str, fields: Any, **kw: Any) -> bool:
        if "status" in fields:
            changes.append(dict(fields))
        return update(rid, fields, **kw)

    monkeypatch.setattr(store, "update", spy)
    pull_ready(mgr, ALICE, "steps:1")
    assert [c["status"] for c in changes] == ["PULLING", "CONVERSION", "TRANSFER", READY]
    assert changes[0]["status_message"] == "Getting manifest"
    # every update beats (docs/behaviour.md, 'Gateway: states')
    assert all("last_heartbeat" in c for c in changes)


# == ACLs ===================================================================================


def test_private_pull_appends_the_requester_and_writes_the_meta(mgr, registry, tmp_path):
    image_id = registry.publish("secret:1", Env=["A=1"])
    rec = pull_ready(mgr, ALICE, "secret:1", uids="2000", gids="3000, 3001")
    # Requester's uid and gid appended to non-empty lists (docs/behaviour.md, 'Gateway: pull
    # de-duplication' step 4).
    assert rec["userACL"] == [1001, 2000] and rec["groupACL"] == [1001, 3000, 3001]
    assert rec["private"] is True
    call = registry.calls[-1]
    assert (call.user_acl, call.group_acl) == ([1001, 2000], [1001, 3000, 3001])
    lines = meta_lines(tmp_path, image_id)
    assert "USERACL: 1001,2000" in lines and "GROUPACL: 1001,3000,3001" in lines
    assert "FORMAT: squashfs" in lines and "ENV: A=1" in lines
    # Readers: the uids, and the gids (primary or supplementary); nobody else.
    for caller in (ALICE, CAROL, BOB):
        assert mgr.lookup(caller, SYS, "docker", "secret:1")["id"] == image_id
    with pytest.raises(NotFound):
        mgr.lookup(NOBODY, SYS, "docker", "secret:1")


def test_only_the_non_empty_list_gets_the_requester(mgr, registry):
    registry.publish("u:1")
    registry.publish("g:1")
    rec = pull_ready(mgr, ALICE, "u:1", uids="2000")
    assert rec["userACL"] == [1001, 2000] and rec["groupACL"] == []
    rec = pull_ready(mgr, ALICE, "g:1", gids=[3000])
    assert rec["userACL"] == [] and rec["groupACL"] == [1001, 3000]
    # The requester already listed is not listed twice.
    registry.publish("dup:1")
    assert pull_ready(mgr, ALICE, "dup:1", uids="1001,2000")["userACL"] == [1001, 2000]


def test_public_pull_of_a_private_image_clears_the_acls(mgr, registry, tmp_path, clock):
    image_id = registry.publish("secret:1")
    private = pull_ready(mgr, ALICE, "secret:1", uids="2000")
    clock.advance(11)  # past the "recent" window in which READY is returned as is
    public = pull_ready(mgr, ALICE, "secret:1")
    assert public["_id"] == private["_id"]  # same image: merged into the READY record
    assert public["private"] is False
    assert public["userACL"] == [] and public["groupACL"] == []
    assert registry.calls[-1].user_acl == [] and registry.calls[-1].group_acl == []
    lines = meta_lines(tmp_path, image_id)
    assert not any(line.startswith(("USERACL", "GROUPACL")) for line in lines)
    assert mgr.lookup(NOBODY, SYS, "docker", "secret:1")["id"] == image_id


def test_acl_change_rewrites_the_meta(mgr, registry, tmp_path, clock, store):
    image_id = registry.publish("secret:1")
    pull_ready(mgr, ALICE, "secret:1", uids="2000")
    assert "USERACL: 1001,2000" in meta_lines(tmp_path, image_id)
    clock.advance(11)
    rec = pull_ready(mgr, ALICE, "secret:1", uids="1002")
    assert registry.pulled("secret:1") == 2
    assert registry.calls[-1].user_acl == [1001, 1002]
    assert rec["userACL"] == [1001, 1002]
    assert "USERACL: 1001,1002" in meta_lines(tmp_path, image_id)
    assert len(records(store)) == 1  # the re-pull record merged away
    assert mgr.lookup(BOB, SYS, "docker", "secret:1")["id"] == image_id
    with pytest.raises(NotFound):
        mgr.lookup(CAROL, SYS, "docker", "secret:1")


def test_acl_order_does_not_count_as_a_change(mgr, registry, clock):
    registry.publish("secret:1")
    pull_ready(mgr, ALICE, "secret:1", uids="2000,1500", gids="3001,3000")
    clock.advance(100)  # neither recent nor due for an update
    again = mgr.pull(ALICE, SYS, "docker", "secret:1", "1500,2000", "3000,3001")
    assert again["status"] == READY and registry.pulled("secret:1") == 1


# == the pullable truth table (docs/behaviour.md, 'Gateway: pull de-duplication', step 5) ===

NOW = T0 + DAY


def rec_(status: str, **fields: Any) -> dict[str, Any]:
    return {"status": status, "userACL": [], "groupACL": [], **fields}


# (record, requested user ACL, requested group ACL, pull again?)
TRUTH_TABLE = [
    pytest.param(None, [], [], True, id="no record"),
    pytest.param(rec_(EXPIRED, last_pull=NOW - 1), [], [], True, id="EXPIRED"),
    pytest.param(rec_(READY), [], [], True, id="READY without last_pull"),
    pytest.param(rec_(READY, last_pull=NOW - 1), [], [], False, id="READY recent"),
    pytest.param(rec_(READY, last_pull=NOW - 299), [], [], False, id="READY 299s"),
    pytest.param(rec_(READY, last_pull=NOW - 301), [], [], True, id="READY past update"),
    pytest.param(rec_(READY, last_pull=NOW - 36000), [], [], True, id="READY 36000s"),
    pytest.param(
        rec_("PULLING", last_heartbeat=NOW - 3599), [], [], False, id="in flight, beating"
    ),
    pytest.param(rec_("PULLING", last_heartbeat=NOW - 3601), [], [], True, id="in flight, silent"),
    pytest.param(rec_("PENDING"), [], [], True, id="in flight, never beat"),
    pytest.param(
        rec_("TRANSFER", last_heartbeat=NOW - 10, last_pull=NOW - 99999),
        [],
        [],
        False,
        id="in flight, old last_pull",
    ),
    # A FAILURE is returned as is for 10 s (clients poll by re-posting the pull and must
    # see it), then retried: our documented choice instead of PullUpdateTimeout.
    pytest.param(rec_(FAILURE, last_heartbeat=NOW - 5), [], [], False, id="FAILURE 5s"),
    pytest.param(rec_(FAILURE, last_heartbeat=NOW - 11), [], [], True, id="FAILURE 11s"),
    # ACL changes re-pull, unless the record is recent or not READY.
    pytest.param(rec_(READY, last_pull=NOW - 11), [5], [], True, id="ACL change"),
    pytest.param(rec_(READY, last_pull=NOW - 11), [], [7], True, id="group ACL change"),
    pytest.param(
        rec_(READY, last_pull=NOW - 11, userACL=[5]), [], [], True, id="ACL dropped (public)"
    ),
    pytest.param(rec_(READY, last_pull=NOW - 5), [5], [], False, id="ACL change, recent"),
    pytest.param(
        rec_("PULLING", last_heartbeat=NOW - 1), [5], [], False, id="ACL change, in flight"
    ),
    pytest.param(rec_(FAILURE, last_heartbeat=NOW - 1), [5], [], False, id="ACL change, FAILURE"),
    pytest.param(
        rec_(READY, last_pull=NOW - 100, userACL=[9, 5], groupACL=[8, 7]),
        [5, 9],
        [7, 8],
        False,
        id="same ACLs, other order",
    ),
]


@pytest.mark.parametrize(("rec", "uacl", "gacl", "expected"), TRUTH_TABLE)
def test_pullable_truth_table(mgr, rec, uacl, gacl, expected):
    # The requested lists reach _should_pull sorted, with the requester already appended.
    assert mgr._should_pull(rec, sorted(uacl), sorted(gacl), NOW) is expected


def test_pull_update_timeout_is_honoured(make_manager):
    # Unlike Shifter, which read the wrong key and always used 300 s.
    mgr = make_manager(PullUpdateTimeout=50)
    assert mgr._should_pull(rec_(READY, last_pull=NOW - 51), [], [], NOW) is True
    assert mgr._should_pull(rec_(READY, last_pull=NOW - 49), [], [], NOW) is False


def test_pull_heartbeat_timeout_is_configurable(make_manager):
    mgr = make_manager(PullHeartbeatTimeout=100)
    assert mgr._should_pull(rec_("PULLING", last_heartbeat=NOW - 101), [], [], NOW) is True
    assert mgr._should_pull(rec_("PULLING", last_heartbeat=NOW - 99), [], [], NOW) is False


# -- the same rules, through pull() ---------------------------------------------------------


def test_recent_ready_returns_ready_and_old_ready_re_pulls(mgr, registry, clock, store):
    registry.publish("app:1")
    first = pull_ready(mgr, ALICE, "app:1")
    clock.advance(1)
    assert mgr.pull(BOB, SYS, "docker", "app:1")["_id"] == first["_id"]
    clock.advance(UPDATE - 2)  # 299 s after the pull: not due
    assert mgr.pull(BOB, SYS, "docker", "app:1")["status"] == READY
    assert registry.pulled("app:1") == 1
    clock.advance(2)  # 301 s: re-pull to see whether the tag moved
    again = pull_ready(mgr, BOB, "app:1")
    assert registry.pulled("app:1") == 2
    assert again["_id"] == first["_id"] and again["last_pull"] == T0 + 301
    clock.advance(36000)  # Shifter's own case: a READY image 36000 s old re-pulls
    pull_ready(mgr, BOB, "app:1")
    assert registry.pulled("app:1") == 3
    assert len(records(store)) == 1


def test_acl_change_re_pulls_unless_recent_or_in_flight(mgr, registry, clock, jobs):
    registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    clock.advance(5)
    assert mgr.pull(ALICE, SYS, "docker", "app:1", "2000")["userACL"] == []  # recent
    assert registry.pulled("app:1") == 1
    clock.advance(6)
    jobs.hold = True
    inflight = mgr.pull(ALICE, SYS, "docker", "app:1", "2000")
    assert inflight["status"] == "PENDING" and inflight["userACL"] == [1001, 2000]
    # In flight: another ACL does not start another pull.
    assert mgr.pull(BOB, SYS, "docker", "app:1", "7")["_id"] == inflight["_id"]
    assert jobs.submitted == 2 and len(jobs.held) == 1
    jobs.run()
    assert mgr.lookup(CAROL, SYS, "docker", "app:1")["userACL"] == [1001, 2000]


def test_expired_image_is_pulled_again(mgr, registry, tmp_path):
    image_id = registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    mgr.expire(ROOT, SYS, "docker", "app:1")
    assert not (image_dir(tmp_path) / f"{image_id}.squashfs").exists()
    rec = pull_ready(mgr, ALICE, "app:1")
    assert registry.pulled("app:1") == 2 and rec["id"] == image_id
    assert (image_dir(tmp_path) / f"{image_id}.squashfs").exists()
    assert mgr.lookup(ALICE, SYS, "docker", "app:1")["_id"] == rec["_id"]


def test_failure_is_shown_for_ten_seconds_then_retried(mgr, registry, clock, store):
    registry.fail("app:1", "connection refused")
    failed = mgr.pull(ALICE, SYS, "docker", "app:1")
    assert failed["status"] == FAILURE
    clock.advance(5)
    again = mgr.pull(ALICE, SYS, "docker", "app:1")
    assert again["status"] == FAILURE and again["_id"] == failed["_id"]
    assert registry.pulled("app:1") == 1
    clock.advance(6)
    registry.publish("app:1")
    rec = pull_ready(mgr, ALICE, "app:1")
    assert rec["_id"] == failed["_id"]  # the failed record is reused, not piled up
    assert rec["status_message"] == "" and len(records(store)) == 1


def test_failed_re_pull_of_a_ready_image_is_shown_not_restarted(mgr, registry, clock, store):
    # Clients poll by re-posting the pull until the state is not in flight: a failed
    # re-pull of a stale READY image must be what they see for 10 s, not a fresh pull on
    # every request (which loops a polling client forever while the registry is down).
    image_id = registry.publish("app:1")
    ready = pull_ready(mgr, ALICE, "app:1")
    clock.advance(UPDATE + 1)
    registry.fail("app:1", "registry down")
    assert mgr.pull(ALICE, SYS, "docker", "app:1")["status"] == FAILURE
    clock.advance(5)
    shown = mgr.pull(ALICE, SYS, "docker", "app:1")
    assert shown["status"] == FAILURE and "registry down" in shown["status_message"]
    assert registry.pulled("app:1") == 2
    # Jobs keep running meanwhile: lookups still find the READY image.
    assert mgr.lookup(BOB, SYS, "docker", "app:1")["_id"] == ready["_id"]
    clock.advance(6)
    registry.publish("app:1", image_id)
    assert pull_ready(mgr, ALICE, "app:1")["_id"] == ready["_id"]
    assert registry.pulled("app:1") == 3
    assert [r["_id"] for r in records(store)] == [ready["_id"]]


def test_silent_in_flight_pull_is_taken_over(mgr, registry, clock, jobs, store):
    registry.publish("app:1")
    jobs.hold = True
    first = mgr.pull(ALICE, SYS, "docker", "app:1")
    clock.advance(HEARTBEAT - 1)
    assert mgr.pull(ALICE, SYS, "docker", "app:1")["_id"] == first["_id"]
    assert len(jobs.held) == 1
    clock.advance(2)  # its worker stopped beating an hour ago: pull again, same record
    second = mgr.pull(ALICE, SYS, "docker", "app:1")
    assert second["_id"] == first["_id"] and second["status"] == "PENDING"
    assert second["owner"] != first["owner"]
    assert len(jobs.held) == 2
    jobs.run(index=1)  # the silent worker never comes back
    assert mgr.lookup(ALICE, SYS, "docker", "app:1")["_id"] == first["_id"]
    assert store.claims() == [] and len(records(store)) == 1


def test_failed_records_are_aged_out(mgr, registry, clock, store):
    registry.fail("broken:1")
    registry.fail("broken:2")
    old = mgr.pull(ALICE, SYS, "docker", "broken:1")
    clock.advance(UPDATE - 10)
    young = mgr.pull(ALICE, SYS, "docker", "broken:2")
    assert store.get(old["_id"]) is not None  # 290 s: not yet
    clock.advance(11)  # broken:1 failed more than PullUpdateTimeout ago
    registry.publish("other:1")
    pull_ready(mgr, ALICE, "other:1")  # any pull on the system sweeps
    assert store.get(old["_id"]) is None
    assert store.get(young["_id"])["status"] == FAILURE


# == claims =================================================================================


def test_concurrent_pull_returns_the_in_flight_record_and_starts_nothing(
    mgr, registry, jobs, store
):
    registry.publish("app:1")
    jobs.hold = True
    first = mgr.pull(ALICE, SYS, "docker", "app:1")
    assert first["status"] == "PENDING" and first["owner"]
    assert [c["_id"] for c in store.claims()] == [claim_key("app:1")]
    second = mgr.pull(BOB, SYS, "docker", "app:1")
    assert second["_id"] == first["_id"] and second["status"] == "PENDING"
    assert jobs.submitted == 1 and len(records(store)) == 1
    jobs.run()
    assert registry.pulled("app:1") == 1
    assert store.claims() == []  # released when the job ends
    assert mgr.lookup(BOB, SYS, "docker", "app:1")["_id"] == first["_id"]


def test_a_claim_held_elsewhere_starts_nothing(mgr, registry, clock, jobs, store):
    registry.publish("app:1")
    ready = pull_ready(mgr, ALICE, "app:1")
    clock.advance(UPDATE + 1)  # due for a re-pull...
    # ...but another gateway process has just claimed it.
    assert store.claim(claim_key("app:1"), "otherhost:99:beef", clock.now, HEARTBEAT)
    rec = mgr.pull(ALICE, SYS, "docker", "app:1")
    assert rec["_id"] == ready["_id"] and rec["status"] == READY
    assert jobs.submitted == 1 and registry.pulled("app:1") == 1
    assert len(records(store)) == 1
    assert store.claims()[0]["owner"] == "otherhost:99:beef"


def test_a_job_that_cannot_be_submitted_leaves_nothing_in_flight(
    mgr, registry, store, monkeypatch, tmp_path, clock
):
    # E.g. the worker pool is shutting down. A record left PENDING with no worker would
    # make every request wait PullHeartbeatTimeout (an hour) before anyone pulls again.
    registry.publish("app:1")

    def broken(*_a: Any) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    with monkeypatch.context() as m:
        m.setattr(ImageManager, "_submit", broken)
        with pytest.raises(RuntimeError):
            mgr.pull(ALICE, SYS, "docker", "app:1")
        with pytest.raises(RuntimeError):
            path = squashfs_file(tmp_path / "img.squashfs")
            mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(path))
    assert store.claims() == []
    assert [r["status"] for r in records(store)] == [FAILURE, FAILURE]
    assert all("shutdown" in r["status_message"] for r in records(store))
    clock.advance(11)
    assert pull_ready(mgr, ALICE, "app:1")["tag"] == ["app:1"]


# == de-duplication and tags ================================================================


def test_same_image_under_two_tags_merges_on_completion(mgr, registry, tmp_path, store):
    image_id = registry.publish("app:1")
    registry.publish("app:latest", image_id)
    first = pull_ready(mgr, ALICE, "app:1")
    second = pull_ready(mgr, ALICE, "app:latest")
    # The pull record went away; the existing READY record carries both tags.
    assert second["_id"] == first["_id"]
    [rec] = records(store)
    assert sorted(rec["tag"]) == ["app:1", "app:latest"] and rec["id"] == image_id
    assert mgr.lookup(ALICE, SYS, "docker", "app:latest")["_id"] == first["_id"]
    assert index_file(tmp_path, "app:latest").read_text() == image_id + "\n"


def test_tag_moves_when_it_names_another_image(mgr, registry, clock, store):
    old_id = registry.publish("app:latest", "a" * 64)
    old = pull_ready(mgr, ALICE, "app:latest")
    clock.advance(UPDATE + 1)
    new_id = registry.publish("app:latest", "b" * 64)
    new = pull_ready(mgr, ALICE, "app:latest")
    assert new["_id"] != old["_id"] and new["id"] == new_id
    # A tag names exactly one image per system.
    assert [r["id"] for r in tagged(store, SYS, "app:latest")] == [new_id]
    assert store.get(old["_id"])["tag"] == [] and store.get(old["_id"])["id"] == old_id
    assert mgr.lookup(ALICE, SYS, "docker", "app:latest")["id"] == new_id
    # Back to the first image: the tag moves back and the pull record merges into it.
    clock.advance(UPDATE + 1)
    registry.publish("app:latest", old_id)
    assert pull_ready(mgr, ALICE, "app:latest")["_id"] == old["_id"]
    assert [r["_id"] for r in tagged(store, SYS, "app:latest")] == [old["_id"]]
    assert len(records(store)) == 2


def test_each_system_keeps_its_own_tag(mgr, registry, clock, store, tmp_path):
    first_id = registry.publish("app:1", "a" * 64)
    on_a = pull_ready(mgr, ALICE, "app:1", system=SYS)
    on_b = pull_ready(mgr, ALICE, "app:1", system=OTHER)
    assert on_a["_id"] != on_b["_id"]  # one record per system, even for the same image
    assert (image_dir(tmp_path, OTHER) / f"{first_id}.squashfs").exists()
    clock.advance(UPDATE + 1)
    second_id = registry.publish("app:1", "b" * 64)
    pull_ready(mgr, ALICE, "app:1", system=SYS)
    assert mgr.lookup(ALICE, SYS, "docker", "app:1")["id"] == second_id
    assert mgr.lookup(ALICE, OTHER, "docker", "app:1")["id"] == first_id
    assert [r["_id"] for r in tagged(store, OTHER, "app:1")] == [on_b["_id"]]
    assert len(tagged(store, SYS, "app:1")) == 1


# == lookup, expiration, metrics ============================================================


def test_lookup_sets_expiration_without_rewriting_it_every_time(
    mgr, registry, clock, store, monkeypatch
):
    registry.publish("app:1")
    rec = pull_ready(mgr, ALICE, "app:1")
    # Unlike Shifter: a pull alone gives an expiration, from the pull time.
    assert rec["expiration"] == T0 + EXPIRATION
    writes: list[dict[str, Any]] = []
    update = store.update

    def spy(rid: str, fields: Any, **kw: Any) -> bool:
        writes.append(dict(fields))
        return update(rid, fields, **kw)

    monkeypatch.setattr(store, "update", spy)
    clock.advance(30)
    assert mgr.lookup(ALICE, SYS, "docker", "app:1")["expiration"] == T0 + EXPIRATION
    assert writes == []  # moved by 30 s only: lookups are the hot path, no write
    clock.advance(DAY)
    found = mgr.lookup(ALICE, SYS, "docker", "app:1")
    assert found["expiration"] == clock.now + EXPIRATION
    assert writes == [{"expiration": clock.now + EXPIRATION}]
    assert store.get(rec["_id"])["expiration"] == clock.now + EXPIRATION


def test_expiration_timeout_is_d_h_m_s(make_manager, registry, clock):
    mgr = make_manager(ImageExpirationTimeout="1:02:03:04")
    registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    clock.advance(DAY)
    found = mgr.lookup(ALICE, SYS, "docker", "app:1")
    assert found["expiration"] == clock.now + DAY + 2 * 3600 + 3 * 60 + 4


def test_metrics_limit_and_order(mgr, registry, clock):
    registry.publish("app:1")
    registry.publish("app:2")
    pull_ready(mgr, ALICE, "app:1")
    pull_ready(mgr, ALICE, "app:2", system=OTHER)
    for _ in range(105):
        clock.advance(1)
        mgr.lookup(ALICE, SYS, "docker", "app:1")
    mgr.lookup(BOB, OTHER, "docker", "app:2")  # another system's row
    clock.advance(1)
    mgr.lookup(BOB, SYS, "docker", "app:1")
    rows = mgr.metrics(ROOT, SYS)
    assert len(rows) == 10  # the default
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert rows[-1] == {  # the last row is the newest
        "user": "bob",
        "uid": 1002,
        "system": SYS,
        "type": "docker",
        "tag": "app:1",
        "id": registry.images["app:1"][0],
        "time": clock.now,
    }
    assert len(mgr.metrics(ROOT, SYS, 5)) == 5
    assert len(mgr.metrics(ROOT, SYS, "101")) == 100  # at most 100
    assert [r["system"] for r in mgr.metrics(ROOT, OTHER, 100)] == [OTHER]
    for bad in ("x", 0, -1, None):
        with pytest.raises(BadRequest):
            mgr.metrics(ROOT, SYS, bad)
    with pytest.raises(Forbidden):
        mgr.metrics(ALICE, SYS)


def test_metrics_rows_are_capped_oldest_dropped(make_manager, registry, clock, store):
    # MetricsRetention: the table keeps the newest N rows over all systems. The trim runs
    # at most once a minute per process (lookups are the hot path), so between trims it
    # may hold a few more; the clock here moves a minute per lookup.
    mgr = make_manager(MetricsRetention=3)
    registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    for _ in range(6):
        clock.advance(61)
        mgr.lookup(ALICE, SYS, "docker", "app:1")
    rows = store.last_metrics(100)
    assert [r["time"] for r in rows] == [clock.now - 122, clock.now - 61, clock.now]
    # Within the minute no trim: one row more, cut at the next trim.
    clock.advance(1)
    mgr.lookup(ALICE, SYS, "docker", "app:1")
    assert len(store.last_metrics(100)) == 4
    clock.advance(60)
    mgr.lookup(ALICE, SYS, "docker", "app:1")
    assert [r["time"] for r in store.last_metrics(100)] == [
        clock.now - 61,
        clock.now - 60,
        clock.now,
    ]


def test_store_trims_metrics_by_insertion(store):
    for i in range(5):
        store.add_metric({"system": SYS if i % 2 else OTHER, "time": 100.0 - i, "n": i})
    assert store.trim_metrics(10) == 0
    assert store.trim_metrics(2) == 3
    assert sorted(r["n"] for r in store.last_metrics(100)) == [3, 4]  # the last two added


def test_no_metrics_rows_when_metrics_are_off(make_manager, registry, store):
    mgr = make_manager(Metrics=False)
    registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    mgr.lookup(ALICE, SYS, "docker", "app:1")
    assert store.last_metrics(100) == []


def test_a_refused_lookup_writes_no_metrics_row(mgr, registry, store):
    registry.publish("secret:1")
    pull_ready(mgr, ALICE, "secret:1", uids="2000")
    with pytest.raises(NotFound):
        mgr.lookup(NOBODY, SYS, "docker", "secret:1")
    with pytest.raises(NotFound):
        mgr.lookup(NOBODY, SYS, "docker", "bogus:1")
    assert store.last_metrics(100) == []


def test_batched_metrics_rows_reach_the_store_within_the_interval(make_manager, registry, store):
    # The service's mode: a lookup queues its row and answers; a thread writes the
    # queue every interval, in one transaction; /api/metrics writes this process's queue
    # first, so an admin reading it sees every lookup this worker answered.
    mgr = make_manager(metrics_batch_seconds=0.3)
    registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    mgr.lookup(ALICE, SYS, "docker", "app:1")
    mgr.lookup(BOB, SYS, "docker", "app:1")
    assert store.last_metrics(100) == []  # queued, not written in the request
    deadline = time.monotonic() + 5
    while len(store.last_metrics(100)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["user"] for r in store.last_metrics(100)] == ["alice", "bob"]
    mgr.lookup(BOB, SYS, "docker", "app:1")
    assert [r["user"] for r in mgr.metrics(ROOT, SYS)] == ["alice", "bob", "bob"]
    mgr.lookup(ALICE, SYS, "docker", "app:1")
    mgr.flush_metrics()  # what the gunicorn worker_exit hook calls
    assert len(store.last_metrics(100)) == 4


def test_batched_metrics_rows_survive_a_failing_store(make_manager, registry, store, monkeypatch):
    # The database refusing a batch (locked past busy_timeout, MongoDB away) must not
    # lose the rows: they are written with the next batch.
    mgr = make_manager(metrics_batch_seconds=60)
    registry.publish("app:1")
    pull_ready(mgr, ALICE, "app:1")
    mgr.lookup(ALICE, SYS, "docker", "app:1")
    real = store.add_metrics

    def refuse(rows):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(store, "add_metrics", refuse)
    mgr.flush_metrics()
    mgr.lookup(BOB, SYS, "docker", "app:1")
    monkeypatch.setattr(store, "add_metrics", real)
    mgr.flush_metrics()
    assert [r["user"] for r in store.last_metrics(100)] == ["alice", "bob"]


# == admin, expire, autoexpire ===============================================================


@pytest.mark.parametrize("admins", [["root"], "root", "root, ops"])
def test_admin_is_exact_membership(make_manager, admins, tmp_path):
    # Unlike Shifter, whose `user in admins` on a string made "roo" an admin of "root".
    raw_platforms = {
        SYS: {"admins": admins, "local": {"imageDir": str(image_dir(tmp_path))}},
        OTHER: {"local": {"imageDir": str(image_dir(tmp_path, OTHER))}},
    }
    mgr = make_manager(Platforms=raw_platforms)
    assert mgr.is_admin(ROOT, SYS)
    assert not mgr.is_admin(ROO, SYS)
    assert not mgr.is_admin(Caller("roots", 1, "x", 1), SYS)
    assert not mgr.is_admin(ROOT, OTHER)  # no admins listed there
    with pytest.raises(Forbidden):
        mgr.autoexpire(ROO, SYS)


def test_expire_is_admin_only_and_removes_the_files(mgr, registry, tmp_path, store):
    image_id = registry.publish("app:1")
    rec = pull_ready(mgr, ALICE, "app:1")
    files = [image_dir(tmp_path) / f"{image_id}.{ext}" for ext in ("squashfs", "meta")]
    for caller in (ALICE, ROO):
        with pytest.raises(Forbidden):
            mgr.expire(caller, SYS, "docker", "app:1")
    assert all(f.exists() for f in files)
    with pytest.raises(NotFound):
        mgr.expire(ROOT, SYS, "docker", "bogus:1")
    assert mgr.expire(ROOT, SYS, "docker", "app:1") is True
    assert store.get(rec["_id"])["status"] == EXPIRED
    assert not any(f.exists() for f in files)
    assert not index_file(tmp_path, "app:1").exists()
    with pytest.raises(NotFound):
        mgr.lookup(ALICE, SYS, "docker", "app:1")
    with pytest.raises(NotFound):  # already expired
        mgr.expire(ROOT, SYS, "docker", "app:1")
    assert mgr.list(ALICE, SYS) == [] and mgr.queue(ALICE, SYS) == []


# == removal by the user who pulled (docs/behaviour.md, 'Gateway: removal') ==================


def test_a_user_removes_a_private_image_they_pulled(mgr, registry, tmp_path, store):
    image_id = registry.publish("mine:1")
    rec = pull_ready(mgr, ALICE, "mine:1", uids="1002")  # alice and bob may read it
    files = [image_dir(tmp_path) / f"{image_id}.{ext}" for ext in ("squashfs", "meta")]
    assert all(f.exists() for f in files) and index_file(tmp_path, "mine:1").exists()
    with pytest.raises(Forbidden, match="mine:1 was pulled by alice: only they"):
        mgr.remove(BOB, SYS, "docker", "mine:1")  # in the ACL, but not the puller
    assert mgr.remove(ALICE, SYS, "docker", "mine:1")["id"] == image_id
    done = store.get(rec["_id"])
    assert (done["status"], done["status_message"]) == (EXPIRED, "Removed by alice")
    assert not any(f.exists() for f in files) and not index_file(tmp_path, "mine:1").exists()
    for caller in (ALICE, BOB):
        with pytest.raises(NotFound):
            mgr.lookup(caller, SYS, "docker", "mine:1")
    with pytest.raises(NotFound, match="image docker:mine:1 not found on systema"):
        mgr.remove(ALICE, SYS, "docker", "mine:1")  # already gone
    # Nothing stuck: no record in flight, and the tag can be pulled again.
    assert mgr.queue(ALICE, SYS) == [] and mgr.list(ALICE, SYS) == []
    assert pull_ready(mgr, ALICE, "mine:1")["id"] == image_id


def test_removal_refusals_say_why_and_what_to_do(mgr, registry, tmp_path, store):
    public_id = registry.publish("public:1")
    pull_ready(mgr, ALICE, "public:1")
    with pytest.raises(Forbidden) as exc:
        mgr.remove(ALICE, SYS, "docker", "public:1")  # her own pull, but public
    assert exc.value.message == (
        "docker:public:1 is a public image: only an admin of systema can remove it "
        "(they use shifterimg expire)")
    registry.publish("secret:1")
    pull_ready(mgr, ALICE, "secret:1", gids="1001")  # alice's group
    # Someone who cannot read it learns nothing: the lookup's answer.
    with pytest.raises(NotFound, match="not found"):
        mgr.remove(CAROL, SYS, "docker", "secret:1")
    with pytest.raises(Forbidden, match="pulled by alice: only they or an admin of systema"):
        mgr.remove(Caller("bob", 1002, "bob", 1001), SYS, "docker", "secret:1")  # via group
    assert mgr.lookup(ALICE, SYS, "docker", "secret:1")["status"] == READY
    # An admin removes anything, public or private.
    assert mgr.remove(ROOT, SYS, "docker", "public:1")["id"] == public_id
    assert not (image_dir(tmp_path) / f"{public_id}.squashfs").exists()
    with pytest.raises(BadRequest):
        mgr.remove(ALICE, SYS, "docker", "Bad Tag")
    with pytest.raises(NotFound):
        mgr.remove(ALICE, "nosuch", "docker", "secret:1")


def test_an_image_two_users_pulled_is_removed_by_an_admin_only(mgr, registry, clock, store):
    # Bob's pull of the same image under his own tag is merged into alice's record: the
    # record then serves both, so neither may take it away from the other.
    image_id = registry.publish("a:1")
    registry.publish("b:1", image_id)
    pull_ready(mgr, ALICE, "a:1", uids="1002")
    pull_ready(mgr, BOB, "b:1", uids="1001")
    (rec,) = [r for r in store.list(SYS) if r.get("id") == image_id]
    assert sorted(rec["tag"]) == ["a:1", "b:1"] and rec["puller_uid"] is None
    for caller, tag in ((ALICE, "a:1"), (BOB, "b:1")):
        with pytest.raises(Forbidden, match="not pulled by you alone"):
            mgr.remove(caller, SYS, "docker", tag)
    # The same user pulling it again keeps it theirs.
    registry.publish("c:1")
    pull_ready(mgr, CAROL, "c:1", uids="2000")
    clock.advance(UPDATE + 1)
    pull_ready(mgr, CAROL, "c:1", uids="2000")
    assert mgr.remove(CAROL, SYS, "docker", "c:1")["tag"] == ["c:1"]


def test_a_removal_loses_to_a_pull_merged_in_meanwhile(mgr, registry, store, tmp_path):
    # The check and the removal are one compare-and-set: a record that stopped being the
    # caller's between reading and removing stays, with its files.
    image_id = registry.publish("race:1")
    rec = pull_ready(mgr, ALICE, "race:1", uids="1001")
    real_find = store.find_tagged

    def find_then_merge(*args: Any, **kwargs: Any) -> Any:
        found = real_find(*args, **kwargs)
        store.update(rec["_id"], {"puller_uid": None})  # what _finish's merge writes
        return found

    store.find_tagged = find_then_merge  # type: ignore[method-assign]
    try:
        with pytest.raises(Conflict, match="changed while being removed"):
            mgr.remove(ALICE, SYS, "docker", "race:1")
    finally:
        store.find_tagged = real_find  # type: ignore[method-assign]
    assert store.get(rec["_id"])["status"] == READY
    assert (image_dir(tmp_path) / f"{image_id}.squashfs").exists()


def test_a_removal_that_fails_on_the_files_can_be_retried(mgr, registry, store, tmp_path):
    # The image file cannot be unlinked (here: a directory in its place): the record is
    # READY again, with the reason, not stuck EXPIRING; the next rm finishes the job.
    image_id = registry.publish("stuck:1")
    rec = pull_ready(mgr, ALICE, "stuck:1", uids="1001")
    squashfs = image_dir(tmp_path) / f"{image_id}.squashfs"
    squashfs.unlink()
    (squashfs / "in-the-way").mkdir(parents=True)
    with pytest.raises(GatewayError, match="could not remove image files"):
        mgr.remove(ALICE, SYS, "docker", "stuck:1")
    after = store.get(rec["_id"])
    assert after["status"] == READY and "failed" in after["status_message"]
    shutil.rmtree(squashfs)
    assert mgr.remove(ALICE, SYS, "docker", "stuck:1")["id"] == image_id
    assert store.get(rec["_id"])["status"] == EXPIRED
    assert not (image_dir(tmp_path) / f"{image_id}.meta").exists()
    assert not index_file(tmp_path, "stuck:1").exists()


def test_an_interrupted_removal_is_finished_by_the_next_gateway(mgr, registry, store, tmp_path):
    # The gateway died between EXPIRING and EXPIRED: the restart finishes the removal.
    image_id = registry.publish("cut:1")
    rec = pull_ready(mgr, ALICE, "cut:1", uids="1001")
    store.update(rec["_id"], {"status": "EXPIRING", "last_heartbeat": 0.0})
    assert rec["_id"] in mgr.recover()
    assert store.get(rec["_id"])["status"] == EXPIRED
    assert not (image_dir(tmp_path) / f"{image_id}.squashfs").exists()


def test_autoexpire(mgr, registry, clock, tmp_path, store):
    ids = {tag: registry.publish(tag) for tag in ("old:1", "looked:1", "fresh:1", "b:1")}
    old = pull_ready(mgr, ALICE, "old:1")  # pulled, never looked up
    looked = pull_ready(mgr, ALICE, "looked:1")
    b = pull_ready(mgr, ALICE, "b:1", system=OTHER)
    clock.advance(EXPIRATION - DAY)
    mgr.lookup(ALICE, SYS, "docker", "looked:1")  # pushes its expiration on
    fresh = pull_ready(mgr, ALICE, "fresh:1")
    now = clock.advance(DAY + 1)  # old:1 and b:1 are past their expiration
    # Records of failed and in-flight pulls, inserted as they stand: a pull() here would
    # sweep old failures itself, and autoexpire's own sweep is what is tested.

    def left(system: str, tag: str, status: str, beat: float) -> dict[str, Any]:
        fields = {"status": status, "last_heartbeat": beat, "owner": "otherhost:1:x"}
        return store.insert(mgr._new_record(system, "docker", tag) | fields)

    broken_old = left(SYS, "broken:old", FAILURE, now - UPDATE - 1)
    broken_new = left(SYS, "broken:new", FAILURE, now - 5)
    stuck = left(SYS, "stuck:1", "PULLING", now - HEARTBEAT - 1)
    busy = left(SYS, "busy:1", "CONVERSION", now - 60)
    stuck_b = left(OTHER, "stuck:1", "PULLING", now - HEARTBEAT - 1)

    with pytest.raises(Forbidden):
        mgr.autoexpire(ALICE, SYS)
    assert mgr.autoexpire(ROOT, SYS) == [ids["old:1"]]

    assert store.get(old["_id"])["status"] == EXPIRED
    for ext in ("squashfs", "meta"):
        assert not (image_dir(tmp_path) / f"{ids['old:1']}.{ext}").exists()
        assert (image_dir(tmp_path) / f"{ids['looked:1']}.{ext}").exists()
    assert not index_file(tmp_path, "old:1").exists()
    # Kept: looked up recently, pulled recently, a recent failure, a beating pull, and
    # everything of the other system (its own autoexpire decides).
    for rec in (looked, fresh, broken_new, busy, b, stuck_b):
        assert store.get(rec["_id"])["status"] == rec["status"], rec["pulltag"]
    # Removed: a failure older than PullUpdateTimeout and a pull silent for over an hour.
    assert store.get(broken_old["_id"]) is None and store.get(stuck["_id"]) is None
    assert mgr.autoexpire(ROOT, OTHER) == [ids["b:1"]]
    assert not (image_dir(tmp_path, OTHER) / f"{ids['b:1']}.squashfs").exists()
    assert store.get(stuck_b["_id"]) is None


def test_autoexpire_also_prunes_layers_unused_for_the_max_age(make_manager, clock, tmp_path):
    # The autoexpire timer is the cache's timer too: layers age out with no pull running.
    mgr = make_manager(LayerCacheMaxAge="1:00:00:00")
    cache = LayerCache(tmp_path / "cache")
    old, recent = (hashlib.sha256(x).hexdigest() for x in (b"old", b"recent"))
    for digest, data, used in (
        (old, b"old", clock.now - 2 * DAY),
        (recent, b"recent", clock.now - 3600),
    ):
        cache.get(f"sha256:{digest}", len(data), lambda f, d=data: f.write(d))
        os.utime(cache.path_for(f"sha256:{digest}"), (used, used))
    cache.unpin_all()
    mgr.autoexpire(ROOT, SYS)
    assert not cache.has(f"sha256:{old}") and cache.has(f"sha256:{recent}")


def test_autoexpire_a_record_without_expiration_goes_by_its_pull_time(mgr, clock, store):
    # Unlike Shifter: a record without an expiration (pulled, never looked up, as Shifter left them)
    # expires from its pull time instead of never.
    base = mgr._new_record(SYS, "docker", "legacy:1")
    legacy = store.insert(base | {"status": READY, "id": "c" * 64, "last_pull": T0, "tag": []})
    kept = store.insert(
        base | {"status": READY, "id": "d" * 64, "last_pull": T0 + DAY, "pulltag": "x:1"}
    )
    clock.advance(EXPIRATION + 1)
    assert mgr.autoexpire(ROOT, SYS) == ["c" * 64]
    assert store.get(legacy["_id"])["status"] == EXPIRED
    assert store.get(kept["_id"])["status"] == READY


# == import =================================================================================


@pytest.mark.parametrize("setting", [None, "None"])
def test_import_disabled(make_manager, tmp_path, setting):
    mgr = make_manager(ImportUsers=setting)
    path = squashfs_file(tmp_path / "img.squashfs")
    with pytest.raises(Forbidden) as info:
        mgr.do_import(ROOT, SYS, "custom", "mine:1", import_body(path))
    assert info.value.message == "User image import from file disabled."


@pytest.mark.parametrize(
    ("setting", "allowed", "refused"),
    [
        ("all", [ALICE, BOB, NOBODY], []),
        (["alice"], [ALICE], [BOB, Caller("alic", 1, "x", 1), Caller("alice2", 1, "x", 1)]),
        ("alice,bob", [ALICE, BOB], [NOBODY, Caller("ali", 1, "x", 1)]),
        ([], [], [ALICE, ROOT]),
    ],
)
def test_import_users(make_manager, tmp_path, setting, allowed, refused):
    mgr = make_manager(ImportUsers=setting)
    for n, caller in enumerate(allowed):
        path = squashfs_file(tmp_path / f"ok{n}.squashfs", f"ok {n}".encode())
        rec = mgr.do_import(caller, SYS, "custom", f"mine{n}:1", import_body(path))
        assert mgr.lookup(caller, SYS, "custom", f"mine{n}:1")["id"] == rec["id"]
    for caller in refused:
        path = squashfs_file(tmp_path / "no.squashfs")
        with pytest.raises(Forbidden, match=f"user {caller.user} may not import"):
            mgr.do_import(caller, SYS, "custom", "theirs:1", import_body(path))


def test_import_id_is_fasthash(mgr, tmp_path, store):
    path = squashfs_file(tmp_path / "img.squashfs", b"blah blah hash")
    content = path.read_bytes()
    rec = mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(path))
    [stored] = records(store)
    # Under 1 MiB, fasthash is the plain sha256 of the file.
    assert stored["id"] == fasthash(path) == hashlib.sha256(content).hexdigest()
    assert rec["id"] == stored["id"]
    assert stored["status"] == READY and stored["itype"] == "custom"
    assert stored["tag"] == ["mine:1"] and stored["remotetype"] == "import"
    assert (image_dir(tmp_path) / f"{stored['id']}.squashfs").read_bytes() == content
    lines = meta_lines(tmp_path, stored["id"])
    assert "FORMAT: squashfs" in lines and "USER: alice" in lines
    assert stored["expiration"] == T0 + EXPIRATION
    assert not list(image_dir(tmp_path).glob("*.partial.*"))  # a reader never sees partials
    assert store.claims() == []


def test_import_with_acls_writes_them_into_the_meta(mgr, tmp_path):
    path = squashfs_file(tmp_path / "img.squashfs")
    rec = mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(path, allowed_uids="1001,2000"))
    assert rec["private"] is True and rec["userACL"] == [1001, 2000]
    assert "USERACL: 1001,2000" in meta_lines(tmp_path, rec["id"])
    assert mgr.lookup(CAROL, SYS, "custom", "mine:1")["id"] == rec["id"]
    with pytest.raises(NotFound):
        mgr.lookup(BOB, SYS, "custom", "mine:1")


def test_importing_the_same_file_under_another_tag_merges(mgr, tmp_path, store):
    path = squashfs_file(tmp_path / "img.squashfs")
    first = mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(path))
    mgr.do_import(ALICE, SYS, "custom", "mine:2", import_body(path))
    [rec] = records(store)
    assert rec["_id"] == first["_id"] and sorted(rec["tag"]) == ["mine:1", "mine:2"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"filepath": "relative.squashfs"}, "absolute path"),
        ({"filepath": None}, "absolute path"),
        ({"filepath": "/nonexistent/x.squashfs"}, "cannot read"),
        ({"format": "ext4"}, "squashfs only"),
        ({"allowed_uids": "bob"}, "numeric"),
    ],
)
def test_bad_imports(mgr, tmp_path, store, body, words):
    path = squashfs_file(tmp_path / "img.squashfs")
    with pytest.raises(BadRequest, match=words):
        mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(path) | body)
    assert records(store) == [] and store.claims() == []


def test_import_refuses_non_squashfs_and_xattrs(mgr, tmp_path, store):
    not_sqfs = tmp_path / "text"
    not_sqfs.write_bytes(b"#!/bin/sh\n" * 20)
    with pytest.raises(BadRequest, match="not a squashfs"):
        mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(not_sqfs))
    # docs/behaviour.md, 'Security posture': file capabilities would ride in as xattrs.
    caps = squashfs_file(tmp_path / "caps.squashfs", xattrs=True)
    with pytest.raises(BadRequest, match="extended attributes"):
        mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(caps))
    assert records(store) == []


def test_import_while_another_runs_is_refused(mgr, tmp_path, jobs, store):
    path = squashfs_file(tmp_path / "img.squashfs")
    jobs.hold = True
    first = mgr.do_import(ALICE, SYS, "custom", "mine:1", import_body(path))
    assert first["status"] == "PENDING"
    with pytest.raises(GatewayError, match="already running"):
        mgr.do_import(BOB, SYS, "custom", "mine:1", import_body(path))
    jobs.run()
    assert store.get(first["_id"])["status"] == READY


def test_failures_on_a_misconfigured_platform_are_recorded(
    make_manager, raw, registry, tmp_path, store
):
    # Any failure ends FAILURE with the reason (docs/behaviour.md, 'Gateway: states'): a worker that
    # raised something unexpected must not leave the record in flight (a polling client would wait
    # for it for an hour). (A bad accesstype no longer gets this far: the config refuses it,
    # tests/test_config.py.) Here the image dir is a file: every write fails.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    platforms = dict(
        raw["Platforms"], tape={"accesstype": "local", "local": {"imageDir": str(blocker)}}
    )
    mgr = make_manager(Platforms=platforms)
    registry.publish("app:1")
    pulled = mgr.pull(ALICE, "tape", "docker", "app:1")
    assert pulled["status"] == FAILURE and "not-a-dir" in pulled["status_message"]
    path = squashfs_file(tmp_path / "img.squashfs")
    imported = mgr.do_import(ALICE, "tape", "custom", "mine:1", import_body(path))
    rec = store.get(imported["_id"])
    assert rec["status"] == FAILURE and "not-a-dir" in rec["status_message"]
    assert store.claims() == []


# == restart recovery =======================================================================


def test_recover_requeues_pulls_of_dead_workers_and_fails_their_imports(
    mgr, registry, store, clock, tmp_path
):
    host = socket.gethostname()
    dead = f"{host}:{dead_pid()}:dead"
    image_id = registry.publish("app:1")
    base = mgr._new_record(SYS, "docker", "app:1")
    orphan = store.insert(
        base | {"status": "PULLING", "owner": dead, "last_heartbeat": clock.now - 5}
    )
    store.claim(claim_key("app:1"), dead, clock.now - 5, HEARTBEAT)
    imp = store.insert(
        mgr._new_record(SYS, "custom", "mine:1")
        | {"status": "HASHING", "owner": dead, "last_heartbeat": clock.now, "remotetype": "import"}
    )
    # Left alone: a pull owned by this live process, and one beating on another host.
    mine = store.insert(
        mgr._new_record(SYS, "docker", "mine:1")
        | {"status": "PULLING", "owner": f"{host}:{os.getpid()}:live", "last_heartbeat": T0}
    )
    remote = store.insert(
        mgr._new_record(OTHER, "docker", "far:1")
        | {"status": "CONVERSION", "owner": "otherhost:1:live", "last_heartbeat": T0 - 60}
    )
    # A dead predecessor's partial file goes; a live process's stays.
    dead_pid_ = int(dead.split(":")[1])
    image_dir(tmp_path).mkdir(parents=True)
    dead_partial = image_dir(tmp_path) / (partial_prefix("x.squashfs", dead_pid_) + "ab12")
    live_partial = image_dir(tmp_path) / (partial_prefix("y.squashfs") + "cd34")
    dead_partial.write_bytes(b"half")
    live_partial.write_bytes(b"half")

    assert sorted(mgr.recover()) == sorted([orphan["_id"], imp["_id"]])

    pulled = store.get(orphan["_id"])  # re-queued, and (jobs run at once) completed
    assert pulled["status"] == READY and pulled["id"] == image_id
    assert registry.calls[-1].tag == "app:1"
    assert mgr.lookup(ALICE, SYS, "docker", "app:1")["_id"] == orphan["_id"]
    failed = store.get(imp["_id"])
    assert failed["status"] == FAILURE and "import again" in failed["status_message"]
    assert store.get(mine["_id"])["status"] == "PULLING"
    assert store.get(remote["_id"])["status"] == "CONVERSION"
    assert store.claims() == []
    assert not dead_partial.exists() and live_partial.exists()


def test_recover_keeps_private_acls_of_a_requeued_pull(mgr, registry, store, clock, tmp_path):
    dead = f"{socket.gethostname()}:{dead_pid()}:dead"
    image_id = registry.publish("secret:1")
    store.insert(
        mgr._new_record(SYS, "docker", "secret:1")
        | {
            "status": "PENDING",
            "owner": dead,
            "last_heartbeat": clock.now,
            "userACL": [1001, 2000],
            "groupACL": [],
            "private": True,
        }
    )
    mgr.recover()
    rec = mgr.lookup(CAROL, SYS, "docker", "secret:1")
    assert rec["userACL"] == [1001, 2000] and rec["private"] is True
    assert "USERACL: 1001,2000" in meta_lines(tmp_path, image_id)
    with pytest.raises(NotFound):
        mgr.lookup(BOB, SYS, "docker", "secret:1")


def test_recover_takes_over_silent_pulls_of_other_hosts(mgr, registry, store, clock):
    registry.publish("app:1")
    silent = store.insert(
        mgr._new_record(SYS, "docker", "app:1")
        | {"status": "PULLING", "owner": "otherhost:1:gone", "last_heartbeat": clock.now}
    )
    store.claim(claim_key("app:1"), "otherhost:1:gone", clock.now, HEARTBEAT)
    clock.advance(HEARTBEAT + 1)
    assert mgr.recover() == [silent["_id"]]
    assert store.get(silent["_id"])["status"] == READY


def test_recover_finishes_an_interrupted_expire(mgr, registry, store, tmp_path):
    image_id = registry.publish("app:1")
    rec = pull_ready(mgr, ALICE, "app:1")
    dead = f"{socket.gethostname()}:{dead_pid()}:dead"
    store.update(rec["_id"], {"status": "EXPIRING", "owner": dead})
    assert mgr.recover() == [rec["_id"]]
    assert store.get(rec["_id"])["status"] == EXPIRED
    assert not (image_dir(tmp_path) / f"{image_id}.squashfs").exists()
