"""The gateway's record store: MongoDB when ``MongoDBURI`` is set, else an embedded SQLite file.

``open_store(config)`` picks the backend from ``imagemanager.json``. The helpers below are
shared by both backends so that they accept and return records the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..config import DEFAULT_MONGO_DB, DEFAULT_STATE_DIR, GatewayConfig, store_settings
from .base import RecordStore

SQLITE_NAME = "shifter-imagegw.sqlite"

__all__ = ["RecordStore", "open_store", "DEFAULT_MONGO_DB", "DEFAULT_STATE_DIR", "SQLITE_NAME"]


def open_store(config: GatewayConfig | Mapping[str, Any]) -> RecordStore:
    """The store ``config`` asks for (a :class:`GatewayConfig`, or a mapping of the store
    keys alone, as tests and tools write it).

    ``MongoDBURI`` set: MongoDB, database ``MongoDB`` (default ``Shifter``). Otherwise the
    SQLite file ``<StateDirectory>/shifter-imagegw.sqlite`` (default ``/var/lib/shifter``),
    created with its directory on first start.
    """
    uri, database, state = store_settings(config)
    if uri:
        # Imported here: a site without MongoDB need not have pymongo installed.
        from .mongo import MongoStore

        return MongoStore(uri, database=database)
    from .sqlite import SQLiteStore

    return SQLiteStore(state / SQLITE_NAME)


# -- shared by the backends ------------------------------------------------------------


def check_field_names(fields: Mapping[str, Any]) -> None:
    """Refuse names the backends would treat differently: MongoDB reads ``a.b`` as a path
    and ``$x`` as an operator, and names starting with ``_`` are the store's own."""
    for name in fields:
        if not isinstance(name, str) or not name:
            raise ValueError(f"record field names must be non-empty strings, not {name!r}")
        if name.startswith(("_", "$")) or "." in name:
            raise ValueError(f"record field name {name!r} is reserved or not a plain name")


def tag_list(tags: Any) -> list[str]:
    """A record's ``tag`` value as a list without repeats (order kept); a lone string,
    as very old records hold, becomes a one-element list."""
    if tags is None:
        return []
    if isinstance(tags, str):
        return [tags]
    return list(dict.fromkeys(tags))


def record_doc(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a backend stores for a new record: a copy without ``_id`` (the store assigns
    one, so a record read back can be inserted again as a new one)."""
    doc = {k: v for k, v in record.items() if k != "_id"}
    check_field_names(doc)
    if "tag" in doc:
        doc["tag"] = tag_list(doc["tag"])
        if doc["tag"] and not isinstance(doc.get("system"), str):
            raise ValueError("a tagged record needs a system: tags are unique per system")
    return doc


def update_doc(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an ``update`` as they will be stored (``tag`` normalised)."""
    doc = dict(fields)
    check_field_names(doc)
    if "tag" in doc:
        doc["tag"] = tag_list(doc["tag"])
    return doc


def status_list(statuses: Iterable[str] | None) -> list[str] | None:
    """A status filter as a list (it may be a one-shot iterator), None meaning no filter."""
    return None if statuses is None else list(statuses)


def match_fields(conditions: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``if_fields`` of an ``update``, checked: plain names, scalar values only (a
    list or a bool would compare differently in MongoDB and in Python)."""
    out = dict(conditions or {})
    check_field_names(out)
    for name, value in out.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            raise ValueError(f"if_fields: {name} must be compared with a string, int or None")
    return out
