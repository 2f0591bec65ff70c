"""The record-store contract (imagegw/store/base.py), run on every backend.

Backends: ``sqlite`` (a file in tmp_path), ``mongomock`` (an injected in-memory client) and
``mongodb`` (a real server, only when ``SHIFTER_TEST_MONGODB_URI`` is set; each test uses a
fresh database, dropped afterwards). Tests that need several *processes* sharing one store
run on the backends whose data lives outside the process: sqlite and mongodb.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest

from imagegw.store import open_store
from imagegw.store.base import EXPIRED, FAILURE, READY, RecordStore
from imagegw.store.mongo import MongoStore
from imagegw.store.sqlite import SQLiteStore

MONGODB_URI = os.environ.get("SHIFTER_TEST_MONGODB_URI")
# The real-server parameter exists only when a server is given: no skip noise otherwise.
BACKENDS = ["sqlite", "mongomock"] + (["mongodb"] if MONGODB_URI else [])
PROCESS_BACKENDS = ["sqlite"] + (["mongodb"] if MONGODB_URI else [])

FORK = multiprocessing.get_context("fork")


class _Serialised:
    """A mongomock object whose calls run one at a time.

    mongomock applies an update by matching the document and then changing it in Python,
    so two threads can both match the same filter (we saw 20 of 20 "win" a compare-and-set).
    A MongoDB server applies each single-document operation atomically; serialising every
    call models exactly that guarantee, which is all the store relies on.
    """

    def __init__(self, target: Any, lock: threading.Lock) -> None:
        self._target = target
        self._lock = lock

    def __getitem__(self, name: str) -> _Serialised:
        return _Serialised(self._target[name], self._lock)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


class Backend:
    """Opens stores that share one backend's data (as several gateway processes do)."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.opened: list[RecordStore] = []
        self._path = tmp_path / "state" / "shifter-imagegw.sqlite"
        self._dbname = f"shifter_test_{uuid.uuid4().hex[:12]}"
        if name == "mongomock":
            self._client = _Serialised(mongomock.MongoClient(), threading.Lock())

    def open(self) -> RecordStore:
        store: RecordStore
        if self.name == "sqlite":
            store = SQLiteStore(self._path)
        elif self.name == "mongomock":
            store = MongoStore(client=self._client, database=self._dbname)
        else:
            store = MongoStore(MONGODB_URI, database=self._dbname)
        self.opened.append(store)
        return store

    def cleanup(self) -> None:
        if self.name == "mongodb":
            import pymongo

            with pymongo.MongoClient(MONGODB_URI) as client:
                client.drop_database(self._dbname)
        for store in self.opened:
            store.close()


def _backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    backend = Backend(request.param, tmp_path)
    yield backend
    backend.cleanup()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request, tmp_path)


@pytest.fixture(params=PROCESS_BACKENDS)
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A backend several processes can share."""
    yield from _backend(request, tmp_path)


@pytest.fixture
def store(backend: Backend) -> RecordStore:
    return backend.open()


def pull_record(
    system: str = "sys", pulltag: str = "ubuntu:22.04", **fields: Any
) -> dict[str, Any]:
    """A record as the manager starts a pull (docs/behaviour.md, 'Gateway: records')."""
    return {
        "format": "squashfs",
        "arch": "amd64",
        "os": "linux",
        "location": "index.docker.io",
        "remotetype": "dockerv2",
        "userACL": [],
        "groupACL": [],
        "private": None,
        "tag": [],
        "status": "INIT",
        "system": system,
        "itype": "docker",
        "pulltag": pulltag,
        **fields,
    }


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` in ``count`` threads released together; their results in order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def run_processes(count: int, target: Callable[..., None], *args: Any) -> None:
    """``target(i, *args)`` in ``count`` forked processes; each must exit 0."""
    procs = [FORK.Process(target=target, args=(i, *args)) for i in range(count)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * count


def drain(results: Any) -> list[Any]:
    """Everything the (finished) processes put on a multiprocessing queue."""
    items = []
    while True:
        try:
            items.append(results.get(timeout=0.5))
        except queue.Empty:
            return items


# -- insert / get / update / delete -----------------------------------------------------


def test_insert_assigns_a_string_id_and_get_returns_the_record(store: RecordStore) -> None:
    given = pull_record()
    rec = store.insert(given)
    assert isinstance(rec["_id"], str) and rec["_id"]
    assert "_id" not in given, "insert must not change the caller's dict"
    assert {k: v for k, v in rec.items() if k != "_id"} == given
    assert store.get(rec["_id"]) == rec
    assert store.get(uuid.uuid4().hex) is None


def test_every_insert_is_a_new_record(store: RecordStore) -> None:
    first = store.insert(pull_record())
    again = store.insert(first)  # a record read back and inserted: its _id is not reused
    assert again["_id"] != first["_id"]
    assert len(store.list()) == 2


def test_records_round_trip_every_json_type_shifter_stores(store: RecordStore) -> None:
    fields = {
        "ENV": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
        "ENTRY": ["/bin/sh", "-c"],
        "CMD": None,
        "WORKDIR": "/",
        "LABELS": {"org.opencontainers.image.source": "https://x/y", "maintainer": "ü"},
        "userACL": [1000, 1001],
        "groupACL": [],
        "private": True,
        "last_pull": 1718000000.25,
        "last_heartbeat": 1718000001.5,
        "expiration": 1.0e10,
        "progress": {"layers": [{"digest": "sha256:ab", "done": 0.5}], "total": 3},
        "status_message": "Pulling layer sha256:ab",
        "size": 12345678901,
    }
    rec = store.insert(pull_record(**fields))
    got = store.get(rec["_id"])
    assert got == rec
    for name, value in fields.items():
        assert got[name] == value and type(got[name]) is type(value), name
    assert store.update(rec["_id"], {"LABELS": {"a.b.c": "d"}, "CMD": ["bash"], "private": False})
    got = store.get(rec["_id"])
    assert (got["LABELS"], got["CMD"], got["private"]) == ({"a.b.c": "d"}, ["bash"], False)


def test_update_sets_fields_and_keeps_the_others(store: RecordStore) -> None:
    rid = store.insert(pull_record())["_id"]
    assert store.update(rid, {"status": "PULLING", "status_message": "Getting manifest"})
    rec = store.get(rid)
    assert rec["status"] == "PULLING" and rec["status_message"] == "Getting manifest"
    assert rec["pulltag"] == "ubuntu:22.04" and rec["_id"] == rid
    assert store.update(rid, {})  # nothing to set, but the record is there
    assert not store.update(uuid.uuid4().hex, {"status": READY})


def test_update_if_status_is_a_compare_and_set(store: RecordStore) -> None:
    rid = store.insert(pull_record(status=READY))["_id"]
    assert not store.update(rid, {"status": "EXPIRING"}, if_status=["PULLING", FAILURE])
    assert store.get(rid)["status"] == READY
    assert store.update(rid, {"status": "EXPIRING"}, if_status=iter([READY]))
    assert store.get(rid)["status"] == "EXPIRING"
    assert not store.update(rid, {"status": "EXPIRING"}, if_status=[READY])
    assert not store.update(rid, {}, if_status=[READY])
    assert store.update(rid, {}, if_status=["EXPIRING"])
    assert not store.update(rid, {"status": READY}, if_status=[])


def test_update_if_fields_is_a_compare_and_set_on_those_fields(store: RecordStore) -> None:
    # What a user's removal relies on: the record is still the one they pulled when it goes.
    rid = store.insert(pull_record(status=READY) | {"puller_uid": 1001, "requester": "al"})["_id"]
    assert not store.update(rid, {"status": "EXPIRING"}, if_fields={"puller_uid": 1002})
    assert not store.update(rid, {"status": "EXPIRING"}, if_fields={"puller_uid": None})
    assert not store.update(rid, {"status": "EXPIRING"}, if_fields={"puller_uid": "1001"})
    assert not store.update(rid, {"status": "EXPIRING"},
                            if_fields={"puller_uid": 1001, "requester": "bo"})
    assert store.get(rid)["status"] == READY
    assert not store.update(rid, {"status": "EXPIRING"}, if_status=["PULLING"],
                            if_fields={"puller_uid": 1001})
    assert store.update(rid, {"status": "EXPIRING"}, if_status=[READY],
                        if_fields={"puller_uid": 1001, "requester": "al"})
    assert store.get(rid)["status"] == "EXPIRING"
    # None matches a field that is null or missing.
    other = store.insert(pull_record() | {"flag": True, "gone": None})["_id"]
    assert store.update(other, {}, if_fields={"gone": None, "never_set": None})
    assert not store.update(other, {}, if_fields={"gone": 0})
    for bad in ({"flag": True}, {"tag": ["a"]}, {"a.b": 1}):
        with pytest.raises(ValueError):
            store.update(other, {}, if_fields=bad)


@pytest.mark.parametrize("name", ["_id", "_created", "a.b", "$set", ""])
def test_field_names_the_backends_would_read_differently_are_refused(
    store: RecordStore, name: str
) -> None:
    rid = store.insert(pull_record())["_id"]
    with pytest.raises(ValueError):
        store.update(rid, {name: 1})
    if name != "_id":  # insert drops _id: the store assigns it
        with pytest.raises(ValueError):
            store.insert({**pull_record(), name: 1})
    assert store.get(rid) == {"_id": rid, **pull_record()}


def test_delete_removes_the_record_and_its_tags(store: RecordStore) -> None:
    rid = store.insert(pull_record(status=READY))["_id"]
    store.set_tag("sys", rid, "ubuntu:22.04")
    assert store.delete(rid)
    assert store.get(rid) is None
    assert store.find_tagged("sys", "ubuntu:22.04") is None
    assert not store.delete(rid)
    other = store.insert(pull_record(status=READY))["_id"]
    store.set_tag("sys", other, "ubuntu:22.04")  # the tag is free again
    assert store.find_tagged("sys", "ubuntu:22.04")["_id"] == other


def test_compare_and_set_has_one_winner_among_20_threads(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]  # two handles, as two workers would have
    rid = stores[0].insert(pull_record(status=READY))["_id"]

    def expire(i: int) -> bool:
        fields = {"status": "EXPIRING", "winner": i}
        return stores[i % 2].update(rid, fields, if_status=[READY])

    wins = run_threads(20, expire)
    assert wins.count(True) == 1
    assert stores[0].get(rid)["winner"] == wins.index(True)


def _cas_in_process(i: int, store: RecordStore, rid: str, barrier: Any, wins: Any) -> None:
    barrier.wait(timeout=30)
    if store.update(rid, {"status": "EXPIRING", "winner": i}, if_status=[READY]):
        wins.put(i)


def test_compare_and_set_has_one_winner_among_4_processes(shared_backend: Backend) -> None:
    store = shared_backend.open()
    store.get("warm-up")  # the children inherit an open connection: they must not reuse it
    rid = store.insert(pull_record(status=READY))["_id"]
    barrier, wins = FORK.Barrier(4), FORK.Queue()
    run_processes(4, _cas_in_process, store, rid, barrier, wins)
    winners = drain(wins)
    assert len(winners) == 1, winners
    assert store.get(rid)["winner"] == winners[0]
    assert store.get(rid)["status"] == "EXPIRING"


# -- tags ------------------------------------------------------------------------------


def _holders(store: RecordStore, system: str, tag: str) -> list[str]:
    return [r["_id"] for r in store.list(system) if tag in r.get("tag", [])]


def test_set_tag_moves_a_tag_and_leaves_it_on_one_record_per_system(store: RecordStore) -> None:
    old = store.insert(pull_record(status=READY, id="a" * 64))["_id"]
    new = store.insert(pull_record(status=READY, id="b" * 64))["_id"]
    there = store.insert(pull_record(system="other", status=READY, id="a" * 64))["_id"]
    store.set_tag("sys", old, "ubuntu:22.04")
    store.set_tag("sys", old, "ubuntu:latest")
    store.set_tag("other", there, "ubuntu:22.04")

    store.set_tag("sys", new, "ubuntu:22.04")

    assert store.get(new)["tag"] == ["ubuntu:22.04"]
    assert store.get(old)["tag"] == ["ubuntu:latest"]
    assert _holders(store, "sys", "ubuntu:22.04") == [new]
    assert store.find_tagged("sys", "ubuntu:22.04")["_id"] == new
    assert store.find_tagged("sys", "ubuntu:latest")["_id"] == old
    # Another system keeps its own record for the same tag.
    assert store.find_tagged("other", "ubuntu:22.04")["_id"] == there
    assert store.get(there)["tag"] == ["ubuntu:22.04"]


def test_set_tag_twice_keeps_one_copy(store: RecordStore) -> None:
    rid = store.insert(pull_record(status=READY))["_id"]
    store.set_tag("sys", rid, "t:1")
    store.set_tag("sys", rid, "t:1")
    store.set_tag("sys", rid, "t:2")
    assert store.get(rid)["tag"] == ["t:1", "t:2"]


def test_set_tag_on_a_record_without_a_tag_list(store: RecordStore) -> None:
    rec = pull_record(status=READY)
    del rec["tag"]
    rid = store.insert(rec)["_id"]
    store.set_tag("sys", rid, "t:1")
    assert store.get(rid)["tag"] == ["t:1"]


def test_set_tag_needs_a_record_of_that_system(store: RecordStore) -> None:
    holder = store.insert(pull_record(status=READY))["_id"]
    store.set_tag("sys", holder, "t:1")
    elsewhere = store.insert(pull_record(system="other", status=READY))["_id"]
    with pytest.raises(KeyError):
        store.set_tag("sys", uuid.uuid4().hex, "t:1")
    with pytest.raises(KeyError):
        store.set_tag("sys", elsewhere, "t:1")
    assert store.find_tagged("sys", "t:1")["_id"] == holder  # nothing moved


def test_tags_given_to_insert_or_update_are_taken_from_other_records(store: RecordStore) -> None:
    first = store.insert(pull_record(status=READY, tag=["t:1", "t:2"]))["_id"]
    second = store.insert(pull_record(status=READY, tag=["t:2", "t:2"]))
    assert second["tag"] == ["t:2"]
    assert store.get(first)["tag"] == ["t:1"]
    assert store.find_tagged("sys", "t:2")["_id"] == second["_id"]

    assert store.update(first, {"tag": ["t:2", "t:3"]})
    assert store.get(second["_id"])["tag"] == []
    assert store.find_tagged("sys", "t:2")["_id"] == first
    assert store.find_tagged("sys", "t:1") is None  # dropped from first's own list
    assert store.update(first, {"tag": []})
    assert store.find_tagged("sys", "t:2") is None


def test_find_tagged_filters_by_status(store: RecordStore) -> None:
    rid = store.insert(pull_record(status="PULLING"))["_id"]
    store.set_tag("sys", rid, "t:1")
    assert store.find_tagged("sys", "t:1") is None  # READY by default
    assert store.find_tagged("sys", "t:1", status=None)["_id"] == rid
    assert store.find_tagged("sys", "t:1", status="PULLING")["_id"] == rid
    store.update(rid, {"status": READY})
    assert store.find_tagged("sys", "t:1")["_id"] == rid
    assert store.find_tagged("other", "t:1") is None
    assert store.find_tagged("sys", "t:2") is None


# -- queries ---------------------------------------------------------------------------


def test_find_pull_returns_the_newest_record_not_expired(store: RecordStore) -> None:
    assert store.find_pull("sys", "docker", "ubuntu:22.04") is None
    ready = store.insert(pull_record(status=READY))["_id"]
    store.insert(pull_record(system="other", status="PULLING"))
    store.insert(pull_record(itype="custom", status="PULLING"))
    store.insert(pull_record(pulltag="debian:12", status="PULLING"))
    assert store.find_pull("sys", "docker", "ubuntu:22.04")["_id"] == ready
    pulling = store.insert(pull_record(status="PULLING"))["_id"]
    assert store.find_pull("sys", "docker", "ubuntu:22.04")["_id"] == pulling
    store.update(pulling, {"status": EXPIRED})
    assert store.find_pull("sys", "docker", "ubuntu:22.04")["_id"] == ready
    store.update(ready, {"status": EXPIRED})
    assert store.find_pull("sys", "docker", "ubuntu:22.04") is None


def test_find_image_by_id_and_status(store: RecordStore) -> None:
    image = "c" * 64
    failed = store.insert(pull_record(status=FAILURE, id=image))["_id"]
    assert store.find_image("sys", image) is None
    assert store.find_image("sys", image, FAILURE)["_id"] == failed
    ready = store.insert(pull_record(status=READY, id=image))["_id"]
    store.insert(pull_record(system="other", status=READY, id=image))
    assert store.find_image("sys", image)["_id"] == ready
    assert store.find_image("sys", "d" * 64) is None


def test_list_filters_by_system_and_status_in_insertion_order(store: RecordStore) -> None:
    ids = {}
    for name, system, status in [
        ("a", "sys", READY),
        ("b", "sys", "PULLING"),
        ("c", "other", READY),
        ("d", "sys", EXPIRED),
        ("e", "sys", FAILURE),
    ]:
        ids[name] = store.insert(pull_record(system=system, status=status, name=name))["_id"]
    nostatus = pull_record(name="f")
    del nostatus["status"]
    ids["f"] = store.insert(nostatus)["_id"]

    def names(records: list[dict[str, Any]]) -> str:
        return "".join(r["name"] for r in records)

    assert names(store.list()) == "abcdef"
    assert names(store.list("sys")) == "abdef"
    assert names(store.list("sys", status=[READY])) == "a"
    assert names(store.list(status=iter([READY]))) == "ac"
    assert names(store.list("sys", exclude_status=[READY, EXPIRED])) == "bef"
    assert names(store.list("sys", status=[READY, "PULLING"], exclude_status=[READY])) == "b"
    assert store.list("sys", status=[]) == []
    assert store.list("nowhere") == []
    assert store.list("sys", status=[READY])[0] == store.get(ids["a"])


# -- claims ----------------------------------------------------------------------------


def test_claims(store: RecordStore) -> None:
    key = "sys|docker|ubuntu:22.04"
    assert store.claims() == []
    assert store.claim(key, "w1", now=1000.0, stale_after=60)  # free: taken
    assert not store.claim(key, "w2", now=1010.0, stale_after=60)  # held: refused
    assert store.claim(key, "w1", now=1020.0, stale_after=60)  # ours: ok, refreshed
    assert store.claims() == [{"_id": key, "owner": "w1", "time": 1020.0}]
    assert not store.claim(key, "w2", now=1080.0, stale_after=60)  # exactly stale_after: live
    assert store.refresh_claim(key, "w1", now=1100.0)
    assert not store.refresh_claim(key, "w2", now=1100.0)
    assert not store.claim(key, "w2", now=1150.0, stale_after=60)
    assert store.claim(key, "w2", now=1160.5, stale_after=60)  # stale: taken over
    assert not store.refresh_claim(key, "w1", now=1161.0)  # w1 learns it lost it
    store.release(key, "w1")  # not the owner: nothing happens
    assert store.claims() == [{"_id": key, "owner": "w2", "time": 1160.5}]
    assert store.claim("other", "w1", now=1170.0, stale_after=60)
    assert [c["_id"] for c in store.claims()] == ["other", key]
    store.release(key, "w2")
    assert store.claims() == [{"_id": "other", "owner": "w1", "time": 1170.0}]
    assert store.claim(key, "w3", now=1171.0, stale_after=60)  # free again
    assert not store.refresh_claim("never", "w1", now=1172.0)


def test_one_claim_wins_among_20_threads(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]
    wins = run_threads(20, lambda i: stores[i % 2].claim("k", f"w{i}", 500.0, 60))
    assert wins.count(True) == 1
    assert stores[1].claims() == [{"_id": "k", "owner": f"w{wins.index(True)}", "time": 500.0}]


def _claim_in_threads(proc: int, store: RecordStore, barrier: Any, wins: Any) -> None:
    def attempt(i: int) -> None:
        owner = f"p{proc}-t{i}"
        barrier.wait(timeout=60)
        if store.claim("sys|docker|busy:latest", owner, 700.0, 60):
            wins.put(owner)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_one_claim_wins_among_2_processes_of_25_threads(shared_backend: Backend) -> None:
    store = shared_backend.open()
    barrier, wins = FORK.Barrier(50), FORK.Queue()
    run_processes(2, _claim_in_threads, store, barrier, wins)
    winners = drain(wins)
    assert len(winners) == 1, winners
    assert store.claims() == [{"_id": "sys|docker|busy:latest", "owner": winners[0], "time": 700.0}]


def _change_in_child(i: int, backend: Backend, change: str, rid: str) -> None:
    store = backend.open()  # the child's own store, as another gunicorn worker has
    if change == "expire":
        store.update(rid, {"status": EXPIRED})
    elif change == "ready":
        store.update(rid, {"status": READY, "LABELS": {"v": "2"}})
    elif change == "move":
        store.insert(pull_record(status=READY, tag=["t:1"], LABELS={"v": "3"}))
    elif change == "add":
        store.insert(pull_record(status=READY, tag=["t:2"]))
    elif change == "delete":
        store.delete(rid)
    store.close()


@pytest.mark.parametrize("find", ["find_tagged", "find_tagged_shared"])
def test_find_tagged_sees_at_once_what_another_process_changed(
    shared_backend: Backend, find: str
) -> None:
    # Lookups answer from a per-process cache (SQLite); a change committed by any other
    # process must show in the very next lookup, found or not found.
    store = shared_backend.open()
    reader = _Reader(store, getattr(store, find))
    rid = reader.insert(pull_record(status=READY, tag=["t:1"], LABELS={"v": "1"}))["_id"]
    assert reader.find_tagged("sys", "t:1")["_id"] == rid
    assert reader.find_tagged("sys", "t:2") is None

    def change(what: str) -> None:
        run_processes(1, _change_in_child, shared_backend, what, rid)

    change("expire")
    assert reader.find_tagged("sys", "t:1") is None
    assert reader.find_tagged("sys", "t:1", status=None)["status"] == EXPIRED
    change("ready")
    assert reader.find_tagged("sys", "t:1")["LABELS"] == {"v": "2"}
    change("move")  # a newer record takes the tag
    moved = reader.find_tagged("sys", "t:1")
    assert moved["_id"] != rid and moved["LABELS"] == {"v": "3"}
    assert reader.get(rid)["tag"] == []
    change("add")
    assert reader.find_tagged("sys", "t:2") is not None
    change("delete")
    assert reader.find_tagged("sys", "t:1")["_id"] == moved["_id"]
    assert reader.get(rid) is None


class _Reader:
    """A store whose find_tagged is the one given (find_tagged_shared: the shared answer)."""

    def __init__(self, store: RecordStore, find: Callable[..., Any]) -> None:
        self._store = store
        self.find_tagged = find

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_find_tagged_shared_is_read_only_and_the_same_while_unchanged(store: RecordStore) -> None:
    rid = store.insert(pull_record(status=READY, tag=["t:1"], userACL=[1000]))["_id"]
    first = store.find_tagged_shared("sys", "t:1")
    assert first is not None and first["_id"] == rid and first["userACL"] == [1000]
    with pytest.raises(TypeError):
        first["expiration"] = 1.0  # type: ignore[index]
    assert store.find_tagged_shared("sys", "t:2") is None
    assert store.find_tagged_shared("sys", "t:1", status="PULLING") is None
    if isinstance(store, SQLiteStore):  # from its cache: one object while unchanged
        assert store.find_tagged_shared("sys", "t:1") is first
    store.update(rid, {"LABELS": {"v": "2"}})
    again = store.find_tagged_shared("sys", "t:1")
    assert again is not first and again["LABELS"] == {"v": "2"}
    assert "LABELS" not in first  # what a caller kept is not changed under it


def test_find_tagged_answers_are_the_callers_to_change(store: RecordStore) -> None:
    # The manager sets fields on the record it is given: that must not reach the store
    # or the next caller (a cached answer is a fresh copy each time).
    store.insert(pull_record(status=READY, tag=["t:1"], userACL=[1000]))
    first = store.find_tagged("sys", "t:1")
    first["expiration"] = 1.0
    first["userACL"].append(0)
    again = store.find_tagged("sys", "t:1")
    assert "expiration" not in again and again["userACL"] == [1000]


# -- metrics ---------------------------------------------------------------------------


def _metric(i: int, system: str = "sys", when: float | None = None) -> dict[str, Any]:
    return {
        "user": f"u{i}",
        "uid": 1000 + i,
        "system": system,
        "type": "docker",
        "tag": "ubuntu:22.04",
        "id": "e" * 64,
        "time": 1000.0 + i if when is None else when,
    }


def test_metrics_last_rows_oldest_first_per_system(store: RecordStore) -> None:
    assert store.last_metrics(10) == []
    for i in range(8):
        store.add_metric(_metric(i, system="sys" if i % 2 == 0 else "other"))
    row = _metric(99)
    store.add_metric(row)
    assert "_id" not in row  # the caller's dict is left alone
    assert store.last_metrics(3) == [_metric(6), _metric(7, "other"), row]
    assert store.last_metrics(2, "sys") == [_metric(6), row]
    assert store.last_metrics(100, "other") == [_metric(i, "other") for i in (1, 3, 5, 7)]
    assert len(store.last_metrics(100)) == 9
    assert store.last_metrics(0) == []
    assert store.last_metrics(5, "nowhere") == []


def test_metrics_rows_of_the_same_time_keep_insertion_order(store: RecordStore) -> None:
    for i in range(5):
        store.add_metric(_metric(i, when=42.0))
    assert [r["user"] for r in store.last_metrics(3)] == ["u2", "u3", "u4"]


def test_metrics_rows_added_as_a_batch_keep_their_order(store: RecordStore) -> None:
    # The gateway writes a second's worth of lookups' rows at once (imagegw/metrics_batch.py).
    store.add_metric(_metric(0, when=42.0))
    rows = [_metric(i, when=42.0) for i in range(1, 6)]
    store.add_metrics(iter(rows))  # any iterable, read once
    store.add_metrics([])
    assert all("_id" not in row for row in rows)  # the caller's dicts are left alone
    assert store.last_metrics(4) == rows[-4:]
    assert [r["user"] for r in store.last_metrics(100)] == [f"u{i}" for i in range(6)]


# -- lifecycle -------------------------------------------------------------------------


def test_everything_survives_reopening(backend: Backend) -> None:
    store = backend.open()
    rid = store.insert(pull_record(status=READY, LABELS={"k": "v"}))["_id"]
    store.set_tag("sys", rid, "t:1")
    store.claim("k", "w1", 10.0, 60)
    store.add_metric(_metric(1))
    store.close()

    again = backend.open()
    assert again.get(rid)["LABELS"] == {"k": "v"}
    assert again.find_tagged("sys", "t:1")["_id"] == rid
    assert again.claims() == [{"_id": "k", "owner": "w1", "time": 10.0}]
    assert again.last_metrics(5) == [_metric(1)]


# -- backend specifics -----------------------------------------------------------------


def test_sqlite_without_its_change_counter_answers_uncached(tmp_path: Path, caplog) -> None:
    # No usable <database>-gen (here a directory stands in its way): no cache, correct
    # answers, and a warning that says which file.
    path = tmp_path / "s.sqlite"
    (tmp_path / "s.sqlite-gen").mkdir()
    reader, writer = SQLiteStore(path), SQLiteStore(path)
    assert "s.sqlite-gen" in caplog.text
    rid = writer.insert(pull_record(status=READY, tag=["t:1"]))["_id"]
    assert reader.find_tagged("sys", "t:1")["_id"] == rid
    writer.update(rid, {"status": EXPIRED})
    assert reader.find_tagged("sys", "t:1") is None


def test_sqlite_file_is_wal_and_the_database_keeps_tags_unique(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "s.sqlite"  # parents are created
    store = SQLiteStore(path)
    one = store.insert(pull_record(status=READY, tag=["t:1"]))["_id"]
    store.insert(pull_record(status=READY))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        seqs = [s for (s,) in db.execute("SELECT seq FROM images ORDER BY seq")]
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO tags (system, tag, seq) VALUES ('sys', 't:1', ?)", (seqs[1],))
        plan = " ".join(
            str(row)
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT i.rid, i.doc FROM tags t JOIN images i"
                " ON i.seq = t.seq WHERE t.system = 'sys' AND t.tag = 't:1' AND i.status = 'READY'"
            )
        )
    db.close()
    assert "SCAN" not in plan, plan  # the hot path is index lookups only
    assert store.find_tagged("sys", "t:1")["_id"] == one
    store.close()


def test_sqlite_threads_of_a_pool_do_not_leak_connections(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite")
    for _ in range(3):
        run_threads(10, lambda i: store.get("x"))
    store.get("x")
    assert len(store._conns) <= 11  # the dead threads' connections were closed
    store.close()


def test_mongo_reads_records_shifter_wrote_with_objectids() -> None:
    from bson import ObjectId

    client = mongomock.MongoClient()
    oid = ObjectId()
    client["Shifter"]["images"].insert_one(
        {"_id": oid, "system": "sys", "itype": "docker", "status": READY, "tag": ["t:1"]}
    )
    store = MongoStore(client=client)
    rec = store.find_tagged("sys", "t:1")
    assert rec["_id"] == str(oid)
    assert store.update(rec["_id"], {"expiration": 5.0})
    new = store.insert(pull_record(status=READY))["_id"]
    store.set_tag("sys", new, "t:1")
    assert store.get(str(oid))["tag"] == []
    assert store.delete(str(oid)) and store.get(str(oid)) is None


def test_open_store_uses_sqlite_under_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "shifter"
    store = open_store({"StateDirectory": str(state), "MongoDBURI": ""})
    assert isinstance(store, SQLiteStore)
    assert (state / "shifter-imagegw.sqlite").is_file()
    store.close()


def test_open_store_uses_mongodb_when_a_uri_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import imagegw.store.mongo as mongo

    made: list[str] = []

    def client(uri: str) -> Any:
        made.append(uri)
        return mongomock.MongoClient()

    monkeypatch.setattr(mongo, "MongoClient", client)
    store = open_store({"MongoDBURI": "mongodb://db.example:27017", "MongoDB": "Gw"})
    assert isinstance(store, MongoStore) and made == ["mongodb://db.example:27017"]
    assert store._dbname == "Gw"
    assert open_store({"MongoDBURI": "mongodb://x"})._dbname == "Shifter"


def test_open_store_without_mongo_does_not_import_pymongo(tmp_path: Path) -> None:
    code = (
        "import sys; from imagegw.store import open_store; "
        f"open_store({{'StateDirectory': {str(tmp_path)!r}}}).close(); "
        "assert 'pymongo' not in sys.modules, 'pymongo imported'"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_sqlite_find_tagged_rate_with_5000_records(tmp_path: Path) -> None:
    """Prints (does not assert) the hot-path lookup rate; run with -s to see it."""
    store = SQLiteStore(tmp_path / "s.sqlite")
    for i in range(5000):
        rec = pull_record(status=READY, tag=[f"repo{i}:latest"], id=f"{i:064x}")
        rec["ENV"] = [f"VAR{j}=value{j}" for j in range(10)]
        rec["LABELS"] = {f"org.label.{j}": "x" * 20 for j in range(5)}
        store.insert(rec)
    count = 20000
    start = time.perf_counter()
    for i in range(count):
        assert store.find_tagged("sys", f"repo{(i * 7919) % 5000}:latest") is not None
    elapsed = time.perf_counter() - start
    print(f"\nsqlite find_tagged, 5,000 records: {count / elapsed:,.0f} lookups/s (one thread)")
    store.close()
