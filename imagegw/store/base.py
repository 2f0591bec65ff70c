"""The record-store contract: what the gateway needs from its database.

Two backends implement it: MongoDB (``MongoDBURI`` set; several gateway hosts share it)
and an embedded SQLite file (the default; several gunicorn workers on one host share it).
Methods are semantic (what the image manager asks), not a query language, so each
backend can answer with its own indexes and atomic operations. The contract tests in
``tests/test_store_contract.py`` run on every backend.

Records are plain dicts with the fields of docs/behaviour.md, 'Gateway: records'; ``_id`` is a
string the store assigns. ``tag`` is a list: a tag names exactly one record per system.

Field names are plain top-level names: not empty, no ``.``, not starting with ``$`` or
``_`` (MongoDB would read those as paths or operators; ``_`` names are the store's own).
Both backends refuse them with ValueError. Values are anything JSON holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

Record = dict[str, Any]

READY = "READY"
FAILURE = "FAILURE"
EXPIRED = "EXPIRED"
# States a record passes through while a worker owns it.
INFLIGHT = (
    "INIT",
    "PENDING",
    "PULLING",
    "EXAMINATION",
    "CONVERSION",
    "TRANSFER",
    "HASHING",
    "EXPIRING",
)


class RecordStore(ABC):
    """Image records, pull claims and metrics rows."""

    # -- image records ---------------------------------------------------------------

    @abstractmethod
    def insert(self, record: Mapping[str, Any]) -> Record:
        """Store a new record; returns it with its new string ``_id``.

        An ``_id`` in ``record`` is ignored (a record read back can be inserted as a new
        one); ``record`` itself is not changed. Tags it carries are taken off every other
        record of its system, as ``set_tag`` does, and repeats are dropped."""

    @abstractmethod
    def get(self, rid: str) -> Record | None:
        """The record with ``_id`` ``rid``."""

    @abstractmethod
    def update(
        self,
        rid: str,
        fields: Mapping[str, Any],
        *,
        if_status: Iterable[str] | None = None,
        if_fields: Mapping[str, str | int | None] | None = None,
    ) -> bool:
        """Set ``fields`` on record ``rid``. With ``if_status``, only when its current status
        is one of them; with ``if_fields``, only when each of those fields currently holds
        that value (a string, a whole number, or None, which also matches a missing field).
        Both are checked and the fields set in one atomic step (compare-and-set). Returns
        whether the record exists and matched (True even if the values were already those);
        an empty ``fields`` only asks that. Setting ``tag`` replaces the list and takes those tags
        off every other record of the system."""

    @abstractmethod
    def delete(self, rid: str) -> bool:
        """Remove record ``rid``; whether it existed."""

    @abstractmethod
    def find_tagged(self, system: str, tag: str, status: str | None = READY) -> Record | None:
        """The record of ``system`` whose ``tag`` list holds ``tag`` (and has ``status``,
        unless ``status`` is None)."""

    def find_tagged_shared(
        self, system: str, tag: str, status: str | None = READY
    ) -> Mapping[str, Any] | None:
        """As ``find_tagged``, read-only: a backend may hand every caller the same object
        for as long as the record is unchanged (the SQLite store does, from its cache), so
        that a caller can keep what it made from a record keyed on the object itself
        (the API keeps a lookup's JSON so). Not to be changed, nested lists included."""
        rec = self.find_tagged(system, tag, status)
        return MappingProxyType(rec) if rec is not None else None

    @abstractmethod
    def find_pull(self, system: str, itype: str, pulltag: str) -> Record | None:
        """The newest (most recently inserted) record of (system, itype) with this
        ``pulltag`` that is not EXPIRED."""

    @abstractmethod
    def find_image(self, system: str, image_id: str, status: str = READY) -> Record | None:
        """A record of ``system`` for image ``id`` in ``status`` (the newest if several)."""

    @abstractmethod
    def list(
        self,
        system: str | None = None,
        *,
        status: Iterable[str] | None = None,
        exclude_status: Iterable[str] = (),
    ) -> list[Record]:
        """Records of ``system`` (all systems if None), oldest first: those whose status is
        in ``status`` (any if None) and not in ``exclude_status`` (a record without a
        status is not excluded)."""

    @abstractmethod
    def set_tag(self, system: str, rid: str, tag: str) -> None:
        """Add ``tag`` to record ``rid`` after removing it from every other record of
        ``system``, so that a tag names one image per system. Adding a tag the record has
        is a no-op. KeyError (and nothing changed) if ``rid`` is not a record of
        ``system``."""

    # -- pull claims: one worker per (system, type, tag) across every process and host ---

    @abstractmethod
    def claim(self, key: str, owner: str, now: float, stale_after: float) -> bool:
        """Take the claim ``key`` for ``owner``, atomically. True if it was free, already
        ours, or held by someone whose last refresh is older than ``now - stale_after``
        (taken over); its time becomes ``now``. False if someone else holds it live."""

    @abstractmethod
    def refresh_claim(self, key: str, owner: str, now: float) -> bool:
        """Mark a claim we hold as alive; False if it is no longer ours."""

    @abstractmethod
    def release(self, key: str, owner: str) -> None:
        """Give up claim ``key`` if ``owner`` holds it."""

    @abstractmethod
    def claims(self) -> list[Record]:
        """Every claim: ``{"_id": key, "owner": …, "time": …}``, by key."""

    # -- metrics ---------------------------------------------------------------------

    @abstractmethod
    def add_metric(self, row: Mapping[str, Any]) -> None:
        """Append a metrics row ``{user, uid, system, type, tag, id, time}``."""

    def add_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows`` in their order, as ``add_metric`` would one by one; a backend
        writes them in one transaction or batch where it can (the gateway queues a
        second's worth of rows per process and writes them at once)."""
        for row in rows:
            self.add_metric(row)

    @abstractmethod
    def last_metrics(self, limit: int, system: str | None = None) -> list[Record]:
        """The newest ``limit`` rows (by ``time``, then insertion) of ``system`` (all if
        None), returned oldest first, as they were added (no ``_id``)."""

    @abstractmethod
    def trim_metrics(self, keep: int) -> int:
        """Drop the oldest rows (by insertion) so that at most ``keep`` remain, over every
        system; returns how many were dropped."""

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release this process's connections. Not a way to pause: open a new store."""
