"""The MongoDB record store: several gateway hosts share one database.

Atomicity comes from MongoDB's single-document operations: compare-and-set is an
``update_one`` with the expected status in its filter, and a claim is one upsert on the
claim's ``_id`` (see ``claim``). Record ``_id``s are uuid4 hex strings we generate, so
callers see the same records as from the SQLite backend. A hidden ``_created`` field
orders records ("newest") and is never returned.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, MongoClient
from pymongo.errors import DuplicateKeyError

from . import DEFAULT_MONGO_DB, match_fields, record_doc, status_list, tag_list, update_doc
from .base import EXPIRED, READY, Record, RecordStore

# Never returned to callers: the store's own ordering field.
_HIDE = {"_created": 0}
NEWEST_FIRST = [("_created", DESCENDING)]

_INDEXES: dict[str, list[list[tuple[str, int]]]] = {
    "images": [
        [("system", ASCENDING), ("tag", ASCENDING)],
        [("system", ASCENDING), ("itype", ASCENDING), ("pulltag", ASCENDING)],
        [("system", ASCENDING), ("id", ASCENDING), ("status", ASCENDING)],
        [("status", ASCENDING)],
    ],
    "metrics": [
        [("time", ASCENDING)],
        [("system", ASCENDING), ("time", ASCENDING)],
    ],
}


class _Sequence:
    """Increasing numbers for ``_created``: the clock in ns, never repeating within a
    process (hosts' clocks only need to agree roughly: "newest" among a tag's records)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last


_SEQ = _Sequence()


def _ids(rid: str) -> list[Any]:
    """The ``_id`` values ``rid`` may stand for: ours are strings, but records written by
    Shifter itself have ObjectIds, which we hand out as their 24-digit hex strings."""
    if isinstance(rid, str) and len(rid) == 24 and ObjectId.is_valid(rid):
        return [rid, ObjectId(rid)]
    return [rid]


def _out(doc: Mapping[str, Any] | None) -> Record | None:
    if doc is None:
        return None
    rec = dict(doc)
    rec.pop("_created", None)
    rec["_id"] = str(rec["_id"])
    return rec


class MongoStore(RecordStore):
    """Records in MongoDB database ``database``, reached by ``uri`` or an injected
    ``client`` (a ``MongoClient``, or a compatible one such as ``mongomock``'s)."""

    def __init__(
        self, uri: str | None = None, *, database: str = DEFAULT_MONGO_DB, client: Any = None
    ) -> None:
        if (uri is None) == (client is None):
            raise ValueError("give MongoStore either a uri or a client")
        self._uri = uri
        self._dbname = database
        self._client = client if client is not None else MongoClient(uri)
        self._pid = os.getpid()
        self._ensure_indexes()

    @property
    def _db(self) -> Any:
        # A MongoClient must not be used across fork (gunicorn --preload): open our own in
        # the child. The parent's is left alone; closing it here would affect the parent.
        if self._uri is not None and os.getpid() != self._pid:
            self._client = MongoClient(self._uri)
            self._pid = os.getpid()
        return self._client[self._dbname]

    @property
    def _images(self) -> Any:
        return self._db["images"]

    def _ensure_indexes(self) -> None:
        for name, indexes in _INDEXES.items():
            for keys in indexes:
                self._db[name].create_index(keys)

    def close(self) -> None:
        if self._uri is not None:
            self._client.close()

    # -- image records -----------------------------------------------------------------

    def insert(self, record: Mapping[str, Any]) -> Record:
        doc = record_doc(record)
        rid = uuid.uuid4().hex
        self._images.insert_one({"_id": rid, **doc, "_created": _SEQ.next()})
        if doc.get("tag"):
            self._take_tags_from_others(doc["system"], rid, doc["tag"])
        return {"_id": rid, **doc}

    def get(self, rid: str) -> Record | None:
        return _out(self._images.find_one({"_id": {"$in": _ids(rid)}}, _HIDE))

    def update(
        self,
        rid: str,
        fields: Mapping[str, Any],
        *,
        if_status: Iterable[str] | None = None,
        if_fields: Mapping[str, str | int | None] | None = None,
    ) -> bool:
        changes = update_doc(fields)
        query: dict[str, Any] = {"_id": {"$in": _ids(rid)}}
        allowed = status_list(if_status)
        if allowed is not None:
            query["status"] = {"$in": allowed}  # the compare of compare-and-set
        for name, value in match_fields(if_fields).items():
            query[name] = value  # scalars: {"f": None} also matches a missing field
        if not changes:
            return self._images.find_one(query, {"_id": 1}) is not None  # "$set" must not be empty
        if "tag" in changes and changes["tag"]:
            system = changes.get("system") or (self.get(rid) or {}).get("system")
            if not isinstance(system, str):
                raise ValueError("a tagged record needs a system: tags are unique per system")
        if not self._images.update_one(query, {"$set": changes}).matched_count:
            return False
        if "tag" in changes or "system" in changes:
            rec = self.get(rid) or {}
            if rec.get("tag"):
                self._take_tags_from_others(rec["system"], rid, tag_list(rec["tag"]))
        return True

    def delete(self, rid: str) -> bool:
        return self._images.delete_one({"_id": {"$in": _ids(rid)}}).deleted_count == 1

    def find_tagged(self, system: str, tag: str, status: str | None = READY) -> Record | None:
        query: dict[str, Any] = {"system": system, "tag": tag}
        if status is not None:
            query["status"] = status
        return _out(self._images.find_one(query, _HIDE))

    def find_pull(self, system: str, itype: str, pulltag: str) -> Record | None:
        query = {"system": system, "itype": itype, "pulltag": pulltag, "status": {"$ne": EXPIRED}}
        return _out(self._images.find_one(query, _HIDE, sort=NEWEST_FIRST))

    def find_image(self, system: str, image_id: str, status: str = READY) -> Record | None:
        query = {"system": system, "id": image_id, "status": status}
        return _out(self._images.find_one(query, _HIDE, sort=NEWEST_FIRST))

    def list(
        self,
        system: str | None = None,
        *,
        status: Iterable[str] | None = None,
        exclude_status: Iterable[str] = (),
    ) -> list[Record]:
        query: dict[str, Any] = {}
        if system is not None:
            query["system"] = system
        condition: dict[str, Any] = {}
        wanted = status_list(status)
        if wanted is not None:
            condition["$in"] = wanted
        unwanted = list(exclude_status)
        if unwanted:
            condition["$nin"] = unwanted
        if condition:
            query["status"] = condition
        cursor = self._images.find(query, _HIDE).sort([("_created", ASCENDING)])
        return [_out(doc) for doc in cursor]  # type: ignore[misc]

    def set_tag(self, system: str, rid: str, tag: str) -> None:
        ids = _ids(rid)
        if self._images.find_one({"_id": {"$in": ids}, "system": system}, {"_id": 1}) is None:
            raise KeyError(f"no record {rid} on system {system}")
        # Two steps, not atomic together (no multi-document transaction without a replica
        # set): two set_tag calls racing for one tag could both keep it. The pull claim on
        # (system, type, tag) is what keeps them from racing.
        self._images.update_many(
            {"system": system, "tag": tag, "_id": {"$nin": ids}}, {"$pull": {"tag": tag}}
        )
        self._images.update_one({"_id": {"$in": ids}}, {"$addToSet": {"tag": tag}})

    def _take_tags_from_others(self, system: str, rid: str, tags: list[str]) -> None:
        self._images.update_many(
            {"system": system, "tag": {"$in": tags}, "_id": {"$nin": _ids(rid)}},
            {"$pull": {"tag": {"$in": tags}}},
        )

    # -- pull claims -------------------------------------------------------------------

    def claim(self, key: str, owner: str, now: float, stale_after: float) -> bool:
        # One atomic upsert: it updates the claim if it is ours or stale; if the claim is
        # free it inserts {_id: key}; if someone else holds it live, the filter matches
        # nothing, the insert collides on _id and MongoDB refuses it. Unlike insert-then-
        # takeover, a claim released between two steps cannot be missed.
        try:
            self._db["claims"].update_one(
                {"_id": key, "$or": [{"owner": owner}, {"time": {"$lt": now - stale_after}}]},
                {"$set": {"owner": owner, "time": now}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return True

    def refresh_claim(self, key: str, owner: str, now: float) -> bool:
        result = self._db["claims"].update_one(
            {"_id": key, "owner": owner}, {"$set": {"time": now}}
        )
        return result.matched_count == 1

    def release(self, key: str, owner: str) -> None:
        self._db["claims"].delete_one({"_id": key, "owner": owner})

    def claims(self) -> list[Record]:
        cursor = self._db["claims"].find({}).sort([("_id", ASCENDING)])
        return [{"_id": c["_id"], "owner": c.get("owner"), "time": c.get("time")} for c in cursor]

    # -- metrics -----------------------------------------------------------------------

    def add_metric(self, row: Mapping[str, Any]) -> None:
        # A copy: insert_one adds an ObjectId _id to the dict it is given.
        self._db["metrics"].insert_one(dict(row))

    def add_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        docs = [dict(row) for row in rows]  # copies, as above
        if docs:
            self._db["metrics"].insert_many(docs, ordered=True)

    def trim_metrics(self, keep: int) -> int:
        # ObjectIds grow with insertion: everything at or below the first one to drop goes.
        first_dropped = list(
            self._db["metrics"]
            .find({}, {"_id": 1})
            .sort("_id", DESCENDING)
            .skip(max(0, keep))
            .limit(1)
        )
        if not first_dropped:
            return 0
        result = self._db["metrics"].delete_many({"_id": {"$lte": first_dropped[0]["_id"]}})
        return result.deleted_count

    def last_metrics(self, limit: int, system: str | None = None) -> list[Record]:
        if limit <= 0:
            return []  # limit(0) would mean "no limit" to MongoDB
        query = {} if system is None else {"system": system}
        cursor = (
            self._db["metrics"]
            .find(query, {"_id": 0})
            # ObjectIds grow with insertion: they order rows of the same time.
            .sort([("time", DESCENDING), ("_id", DESCENDING)])
            .limit(limit)
        )
        return list(cursor)[::-1]
