"""The embedded record store: one SQLite file shared by every gateway process of a host.

Several gunicorn worker processes, each with several threads, use the same file, so:

* WAL mode: readers never block the writer nor each other (lookups are the hot path).
* One connection per thread (``threading.local``), re-created after ``fork``: SQLite
  connections must not cross threads or processes.
* Every write is a short ``BEGIN IMMEDIATE`` transaction: it takes the write lock up
  front, so compare-and-set and claims are atomic across processes and a writer waits
  (``busy_timeout``) instead of failing when it would have to upgrade a read lock.
* Records are JSON documents with indexed columns copied out of them for the queries,
  and a ``tags`` table whose primary key (system, tag) makes the database itself enforce
  "a tag names one image per system".
* ``find_tagged`` (every job launch's lookup) answers from a per-process cache while the
  records have not changed. Every write of records or tags, after its commit, adds one to
  a counter in the shared file ``<database>-gen`` (mapped into every process); a cached
  answer is used only while the counter still reads what it read before the query that
  made it. Reading the counter is a memory read, where a query pays SQLite's WAL read
  locks (fcntl calls) and, after any other process's commit, re-reads its pages.
  ``find_tagged_shared`` answers from the same cache with one read-only record object per
  cached answer, decoded once (the API keeps the lookup's JSON keyed on that object).
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import sqlite3
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import match_fields, record_doc, status_list, tag_list, update_doc
from .base import EXPIRED, READY, Record, RecordStore

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    seq      INTEGER PRIMARY KEY,      -- insertion order: "newest" means highest seq
    rid      TEXT NOT NULL UNIQUE,     -- the record's _id (uuid4 hex)
    system   TEXT,
    itype    TEXT,
    status   TEXT,
    pulltag  TEXT,
    image_id TEXT,                     -- the record's "id" field
    doc      TEXT NOT NULL             -- the record as JSON, without _id
);
CREATE INDEX IF NOT EXISTS images_pull ON images (system, itype, pulltag);
CREATE INDEX IF NOT EXISTS images_image ON images (system, image_id, status);
CREATE INDEX IF NOT EXISTS images_system_status ON images (system, status);
CREATE INDEX IF NOT EXISTS images_status ON images (status);

CREATE TABLE IF NOT EXISTS tags (
    system TEXT NOT NULL,
    tag    TEXT NOT NULL,
    seq    INTEGER NOT NULL REFERENCES images (seq) ON DELETE CASCADE,
    PRIMARY KEY (system, tag)          -- a tag names one record per system
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_record ON tags (seq);

CREATE TABLE IF NOT EXISTS claims (
    key   TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    time  REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS metrics (
    seq    INTEGER PRIMARY KEY,
    system TEXT,
    time   REAL,
    doc    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_system_time ON metrics (system, time);
CREATE INDEX IF NOT EXISTS metrics_time ON metrics (time);
"""

# Connections a forked child inherited from its parent. They are kept referenced forever:
# closing (or garbage-collecting) them in the child could disturb the parent's locks and
# WAL, and SQLite forbids using a connection in another process than its opener's.
_INHERITED: list[sqlite3.Connection] = []
_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)

_COLUMNS = ("system", "itype", "status", "pulltag", "id")
log = logging.getLogger(__name__)

# find_tagged's cache (see the module docstring). The age limit is a safety net only, for
# a change that did not move the counter: a writer killed between its commit and the
# counter's update, or someone editing the file with the sqlite3 shell.
TAGGED_CACHE_SECONDS = 5.0
TAGGED_CACHE_MAX = 4096  # entries per process; the cache restarts when full
_GEN = struct.Struct("=Q")


class _Generation:
    """The change counter in ``<database>-gen``: 8 bytes, mapped shared by every process
    that opens the store. ``read()`` is None when the file cannot be used (then nothing is
    cached)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._map: mmap.mmap | None = None
        try:
            # The database file's own default mode: whoever may open the one opens the other.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.warning("lookups answered without a cache: cannot open %s: %s", path, exc)
            return
        try:
            if os.fstat(fd).st_size < _GEN.size:
                os.ftruncate(fd, _GEN.size)  # zeros; a concurrent opener truncates to the same
            self._map = mmap.mmap(fd, _GEN.size, mmap.MAP_SHARED)
        except OSError as exc:
            os.close(fd)
            log.warning("lookups answered without a cache: cannot map %s: %s", path, exc)
            return
        self._fd = fd

    def read(self) -> int | None:
        return _GEN.unpack_from(self._map)[0] if self._map is not None else None

    def bump(self) -> None:
        """Move the counter on, after a commit. Writers take turns on the file lock, so
        the counter only grows: a reader that read N before its query sees something
        else after any commit its query may have missed."""
        if self._map is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            _GEN.pack_into(self._map, 0, (_GEN.unpack_from(self._map)[0] + 1) % 2**64)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            os.close(self._fd)
            self._map, self._fd = None, -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass


# One encoder for every document: json.dumps with any non-default argument builds a new
# encoder per call, and every lookup's metrics row is encoded here.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _dumps(doc: Mapping[str, Any]) -> str:
    return _ENCODER.encode(doc)


def _record(rid: str, doc: str) -> Record:
    return {"_id": rid, **json.loads(doc)}


def _holds(doc: Mapping[str, Any], name: str, value: str | int | None) -> bool:
    """Whether ``doc[name]`` equals ``value`` as MongoDB compares them: None also matches
    a missing field, a number an equal int or float, a string only that string."""
    have = doc.get(name)
    if value is None or isinstance(value, str):
        return have == value
    return isinstance(have, int | float) and have == value


def _columns(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """The indexed copies of a document's fields; anything but a string is stored as NULL
    so that a query never matches a list or number by accident."""
    return tuple(v if isinstance(v := doc.get(name), str) else None for name in _COLUMNS)


def _metric_values(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A metrics row's (system, time, doc) columns; system and time are indexed copies."""
    doc = dict(row)
    system = doc.get("system") if isinstance(doc.get("system"), str) else None
    when = doc.get("time") if isinstance(doc.get("time"), int | float) else None
    return system, when, _dumps(doc)


class SQLiteStore(RecordStore):
    """Records in the SQLite file ``path`` (created, with its directory, if missing)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout * 1000)
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every connection this store opened: (pid, thread, connection), so close() and
        # the pruning of dead threads' connections can reach them.
        self._conns: list[tuple[int, threading.Thread, sqlite3.Connection]] = []
        self._gen = _Generation(self.path.with_name(self.path.name + "-gen"))
        # (system, tag, status) -> [counter, time, rid, doc, shared] (see _tagged_entry)
        self._tagged: dict[tuple[str, str, str | None], list[Any]] = {}
        _STORES.add(self)
        self._init_schema()

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False
        # only so close() may close other threads' connections; each is used by one thread.
        conn = sqlite3.connect(
            self.path, timeout=self._busy_ms / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        conn.execute("PRAGMA foreign_keys = ON")  # tags follow their record on delete
        # NORMAL is safe in WAL mode (no corruption; a power cut may lose the last commits)
        # and avoids an fsync per lookup that writes an expiration or a metrics row.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        # The pid check backs up the fork hook (which a raw fork syscall would not run).
        if getattr(local, "pid", None) == os.getpid():
            return local.conn
        conn = self._connect()
        with self._lock:
            self._prune_dead_threads()
            self._conns.append((os.getpid(), threading.current_thread(), conn))
        local.pid, local.conn = os.getpid(), conn
        return conn

    def _forget_parent(self) -> None:
        """In a forked child: drop (never close) the parent's connections, and its lock,
        which another parent thread may have held at the fork."""
        self._lock = threading.Lock()
        # Our own open file for the counter: flock() excludes other open files only, and
        # the parent's is shared with us across fork.
        self._gen.close()
        self._gen = _Generation(self._gen.path)
        _INHERITED.extend(conn for _, _, conn in self._conns)
        self._conns = []
        self._local = threading.local()

    def _prune_dead_threads(self) -> None:
        # A thread's connection outlives the thread in self._conns; close those of dead
        # threads so that a pool which replaces its threads does not leak file handles.
        alive = []
        for entry in self._conns:
            if entry[0] == os.getpid() and not entry[1].is_alive():
                entry[2].close()
            else:
                alive.append(entry)
        self._conns = alive

    @contextmanager
    def _write(self, records: bool = True) -> Iterator[sqlite3.Connection]:
        """A short write transaction holding the database's write lock from its start.
        ``records``: it may change records or tags, so the change counter moves after the
        commit (claims and metrics rows leave it alone)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            # Also after a failed commit or a rollback: moving the counter for nothing
            # costs one cache miss, missing a change would serve it stale.
            if records:
                self._gen.bump()

    def _init_schema(self) -> None:
        # Every gunicorn worker opens the store as it boots, all at the same moment, and
        # switching a new file to WAL needs the file to itself: SQLite answers "database
        # is locked" there without waiting on busy_timeout, and a worker that fails to
        # boot makes gunicorn stop the whole gateway. So the openers take turns.
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._init_schema_locked()
        finally:
            os.close(fd)

    def _init_schema_locked(self) -> None:
        conn = self._conn()
        # WAL is a property of the file; switching needs no transaction open. It fails on
        # file systems without shared memory (NFS): say so rather than run slowly or wrongly.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot use WAL mode (got {mode}); use a local disk")
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema {version}, newer than this gateway's "
                    f"{SCHEMA_VERSION}: upgrade the gateway"
                )
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._tagged.clear()
        pid = os.getpid()
        with self._lock:
            for p, _, conn in self._conns:
                if p == pid:
                    conn.close()
                else:
                    _INHERITED.append(conn)
            self._conns = []
        self._local = threading.local()

    # -- image records -----------------------------------------------------------------

    def insert(self, record: Mapping[str, Any]) -> Record:
        doc = record_doc(record)
        rid = uuid.uuid4().hex
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO images (rid, system, itype, status, pulltag, image_id, doc)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rid, *_columns(doc), _dumps(doc)),
            )
            if doc.get("tag"):
                self._claim_tags(conn, cur.lastrowid, doc["system"], doc["tag"])
        return {"_id": rid, **doc}

    def get(self, rid: str) -> Record | None:
        row = self._conn().execute("SELECT rid, doc FROM images WHERE rid = ?", (rid,)).fetchone()
        return _record(*row) if row else None

    def update(
        self,
        rid: str,
        fields: Mapping[str, Any],
        *,
        if_status: Iterable[str] | None = None,
        if_fields: Mapping[str, str | int | None] | None = None,
    ) -> bool:
        changes = update_doc(fields)
        allowed = status_list(if_status)
        conditions = match_fields(if_fields)
        with self._write() as conn:
            row = conn.execute(
                "SELECT seq, status, doc FROM images WHERE rid = ?", (rid,)
            ).fetchone()
            if row is None or (allowed is not None and row[1] not in allowed):
                return False
            seq, doc = row[0], json.loads(row[2])
            if not all(_holds(doc, name, value) for name, value in conditions.items()):
                return False
            old_system = doc.get("system")
            doc.update(changes)
            self._write_doc(conn, seq, doc)
            if "tag" in changes or doc.get("system") != old_system:
                conn.execute("DELETE FROM tags WHERE seq = ?", (seq,))
                self._claim_tags(conn, seq, doc.get("system"), tag_list(doc.get("tag")))
        return True

    def delete(self, rid: str) -> bool:
        with self._write() as conn:
            # The record's tags rows go with it (ON DELETE CASCADE).
            return conn.execute("DELETE FROM images WHERE rid = ?", (rid,)).rowcount == 1

    def find_tagged(self, system: str, tag: str, status: str | None = READY) -> Record | None:
        entry = self._tagged_entry(system, tag, status)
        return _record(entry[2], entry[3]) if entry[2] is not None else None

    def find_tagged_shared(
        self, system: str, tag: str, status: str | None = READY
    ) -> Mapping[str, Any] | None:
        # The same object while the cached answer holds: decoded once, not per lookup.
        entry = self._tagged_entry(system, tag, status)
        if entry[2] is None:
            return None
        if entry[4] is None:
            entry[4] = MappingProxyType(_record(entry[2], entry[3]))
        return entry[4]

    def _tagged_entry(self, system: str, tag: str, status: str | None) -> list[Any]:
        """``[counter, time, rid, doc, shared record or None]`` for the tag (rid and doc
        None if no record has it). The hot path (every job launch): from the cache while
        the change counter has not moved, else one lookup in the tags primary key and one
        by rowid."""
        key = (system, tag, status)
        gen = self._gen.read()  # before the query: any commit the query misses moves it
        now = time.monotonic()
        hit = self._tagged.get(key)
        if hit is not None and gen is not None and hit[0] == gen:
            if now - hit[1] < TAGGED_CACHE_SECONDS:
                return hit
        sql = (
            "SELECT i.rid, i.doc FROM tags t JOIN images i ON i.seq = t.seq"
            " WHERE t.system = ? AND t.tag = ?"
        )
        args: tuple[Any, ...] = (system, tag)
        if status is not None:
            sql += " AND i.status = ?"
            args += (status,)
        row = self._conn().execute(sql, args).fetchone()
        entry = [gen, now, *row, None] if row else [gen, now, None, None, None]
        if gen is not None:
            if len(self._tagged) >= TAGGED_CACHE_MAX:
                self._tagged.clear()
            self._tagged[key] = entry
        return entry

    def find_pull(self, system: str, itype: str, pulltag: str) -> Record | None:
        row = (
            self._conn()
            .execute(
                "SELECT rid, doc FROM images WHERE system = ? AND itype = ? AND pulltag = ?"
                " AND status IS NOT ? ORDER BY seq DESC LIMIT 1",
                (system, itype, pulltag, EXPIRED),
            )
            .fetchone()
        )
        return _record(*row) if row else None

    def find_image(self, system: str, image_id: str, status: str = READY) -> Record | None:
        row = (
            self._conn()
            .execute(
                "SELECT rid, doc FROM images WHERE system = ? AND image_id = ? AND status = ?"
                " ORDER BY seq DESC LIMIT 1",
                (system, image_id, status),
            )
            .fetchone()
        )
        return _record(*row) if row else None

    def list(
        self,
        system: str | None = None,
        *,
        status: Iterable[str] | None = None,
        exclude_status: Iterable[str] = (),
    ) -> list[Record]:
        where, args = ["1"], []
        if system is not None:
            where.append("system = ?")
            args.append(system)
        wanted = status_list(status)
        if wanted is not None:
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        unwanted = list(exclude_status)
        if unwanted:
            # NULL NOT IN (...) is NULL in SQL: keep records without a status, as MongoDB does.
            where.append(f"(status IS NULL OR status NOT IN ({', '.join('?' * len(unwanted))}))")
            args.extend(unwanted)
        sql = f"SELECT rid, doc FROM images WHERE {' AND '.join(where)} ORDER BY seq"
        return [_record(*row) for row in self._conn().execute(sql, args)]

    def set_tag(self, system: str, rid: str, tag: str) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT seq, doc FROM images WHERE rid = ? AND system = ?", (rid, system)
            ).fetchone()
            if row is None:
                raise KeyError(f"no record {rid} on system {system}")
            seq, doc = row[0], json.loads(row[1])
            tags = tag_list(doc.get("tag"))
            if tag not in tags:
                doc["tag"] = [*tags, tag]
                self._write_doc(conn, seq, doc)
            self._claim_tags(conn, seq, system, [tag])

    def _write_doc(self, conn: sqlite3.Connection, seq: int, doc: Mapping[str, Any]) -> None:
        conn.execute(
            "UPDATE images SET system = ?, itype = ?, status = ?, pulltag = ?, image_id = ?,"
            " doc = ? WHERE seq = ?",
            (*_columns(doc), _dumps(doc), seq),
        )

    def _claim_tags(self, conn: sqlite3.Connection, seq: int, system: Any, tags: list[str]) -> None:
        """Point (system, tag) at record ``seq`` for each tag, taking it off whichever
        record held it (that record's document loses the tag too)."""
        if tags and not isinstance(system, str):
            raise ValueError("a tagged record needs a system: tags are unique per system")
        for tag in tags:
            holder = conn.execute(
                "SELECT seq FROM tags WHERE system = ? AND tag = ?", (system, tag)
            ).fetchone()
            if holder is not None and holder[0] == seq:
                continue
            if holder is not None:
                self._drop_tag(conn, holder[0], system, tag)
            conn.execute("INSERT INTO tags (system, tag, seq) VALUES (?, ?, ?)", (system, tag, seq))

    def _drop_tag(self, conn: sqlite3.Connection, seq: int, system: str, tag: str) -> None:
        conn.execute("DELETE FROM tags WHERE system = ? AND tag = ?", (system, tag))
        row = conn.execute("SELECT doc FROM images WHERE seq = ?", (seq,)).fetchone()
        doc = json.loads(row[0])
        doc["tag"] = [t for t in tag_list(doc.get("tag")) if t != tag]
        self._write_doc(conn, seq, doc)

    # -- pull claims -------------------------------------------------------------------

    def claim(self, key: str, owner: str, now: float, stale_after: float) -> bool:
        with self._write(records=False) as conn:
            # One statement decides: insert if free, else take it only if it is ours or
            # stale. rowcount is 0 exactly when the conflict's WHERE refused the update.
            cur = conn.execute(
                "INSERT INTO claims (key, owner, time) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, time = excluded.time"
                " WHERE claims.owner = excluded.owner OR claims.time < ?",
                (key, owner, now, now - stale_after),
            )
            return cur.rowcount == 1

    def refresh_claim(self, key: str, owner: str, now: float) -> bool:
        with self._write(records=False) as conn:
            cur = conn.execute(
                "UPDATE claims SET time = ? WHERE key = ? AND owner = ?", (now, key, owner)
            )
            return cur.rowcount == 1

    def release(self, key: str, owner: str) -> None:
        with self._write(records=False) as conn:
            conn.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def claims(self) -> list[Record]:
        rows = self._conn().execute("SELECT key, owner, time FROM claims ORDER BY key")
        return [{"_id": key, "owner": owner, "time": time} for key, owner, time in rows]

    # -- metrics -----------------------------------------------------------------------

    def add_metric(self, row: Mapping[str, Any]) -> None:
        # One statement in autocommit mode, not BEGIN IMMEDIATE/INSERT/COMMIT: every
        # lookup writes a row, and between those three calls the thread holds the
        # database's write lock while it waits for the GIL (up to the 5 ms switch
        # interval on a busy worker). Every other writer then falls into SQLite's busy
        # handler, which sleeps 1, 2, 5, 10 ... ms. A lone INSERT takes and releases the
        # lock inside one sqlite3_step with the GIL released, and is just as atomic.
        self._conn().execute(
            "INSERT INTO metrics (system, time, doc) VALUES (?, ?, ?)", _metric_values(row)
        )

    def add_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        values = [_metric_values(row) for row in rows]
        if values:
            with self._write(records=False) as conn:
                conn.executemany("INSERT INTO metrics (system, time, doc) VALUES (?, ?, ?)", values)

    def trim_metrics(self, keep: int) -> int:
        # seq grows with insertion: the row ``keep`` places below the newest is the
        # newest to drop; the primary key index finds it without a scan of the table.
        cur = self._conn().execute(
            "DELETE FROM metrics WHERE seq <= "
            "(SELECT seq FROM metrics ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (max(0, keep),),
        )
        return cur.rowcount

    def last_metrics(self, limit: int, system: str | None = None) -> list[Record]:
        if limit <= 0:
            return []
        sql, args = "SELECT doc FROM metrics", []
        if system is not None:
            sql += " WHERE system = ?"
            args.append(system)
        sql += " ORDER BY time DESC, seq DESC LIMIT ?"
        rows = self._conn().execute(sql, [*args, limit]).fetchall()
        return [json.loads(doc) for (doc,) in reversed(rows)]
