"""Who may read an image record (docs/behaviour.md, 'Gateway: read ACL'), and parsing requested
ACLs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Caller:
    """The authenticated requester: from a munge credential (or mock auth in tests)."""

    user: str
    uid: int
    group: str
    gid: int
    groups: tuple[int, ...] = ()
    authorized_locations: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def all_gids(self) -> set[int]:
        return {self.gid, *self.groups}


def can_read(record: Mapping[str, Any], caller: Caller) -> bool:
    """Public images, and private ones listing the caller's uid, gid or a supplementary gid."""
    if not record.get("private"):
        return True
    users = {int(u) for u in record.get("userACL") or []}
    groups = {int(g) for g in record.get("groupACL") or []}
    if not users and not groups:
        return True
    return caller.uid in users or bool(caller.all_gids & groups)


class AclError(ValueError):
    """A requested ACL list is not a list of numeric ids."""


def parse_ids(raw: Any, what: str) -> list[int]:
    """``"1,2"`` or ``[1, "2"]`` or an int → sorted unique ids; anything else is an error."""
    if raw is None or raw == "":
        return []
    items: Iterable[Any]
    if isinstance(raw, str):
        items = [x for x in raw.replace(" ", "").split(",") if x != ""]
    elif isinstance(raw, int) and not isinstance(raw, bool):
        items = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise AclError(f"{what} must be a comma-separated list of numeric ids")
    out = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise AclError(f"{what}: '{item}' is not a numeric id")
        try:
            value = int(item)
        except ValueError:
            raise AclError(f"{what}: '{item}' is not a numeric id") from None
        if value < 0 or value > 0xFFFFFFFE:
            raise AclError(f"{what}: {value} is out of range")
        out.add(value)
    return sorted(out)
