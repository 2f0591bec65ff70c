"""Who is calling: a munge credential in the ``authentication`` header (or mock, for tests).

The credential's uid/gid name the caller; its payload is empty, or JSON
``{"authorized_locations": {"<location>|default": "user:pass"}}`` carrying registry
credentials for private pulls. Those are handed to the pull and never logged or stored.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .acl import Caller

# Names and groups of a uid/gid, as _names found them, are kept for NAMES_TTL seconds,
# and only while /etc/passwd and /etc/group are the files they were read from. Reading
# them costs ~40 us a request (getgrouplist reads the whole of /etc/group, or asks
# sssd/LDAP), more than any other step of a lookup but the credential's decode. The
# files are looked at (two stat calls) at most every STAMP_EVERY seconds. So an edit of
# the local files (usermod, groupadd) counts within a second, and a change in a
# directory service (LDAP) up to NAMES_TTL later.
NAMES_TTL = 60.0
STAMP_EVERY = 1.0
NAMES_MAX = 4096  # distinct (uid, gid) pairs remembered; the cache restarts when full
_NAME_FILES = ("/etc/passwd", "/etc/group")
_Names = tuple[str, str, tuple[int, ...]]
_names_cache: dict[tuple[int, int], tuple[float, tuple[int, ...], _Names]] = {}
_stamp: list[Any] = [-STAMP_EVERY, ()]  # when the files were last looked at, and what they were
_callers: dict[tuple[int, int], tuple[_Names, Caller]] = {}  # see _plain_caller
_NO_LOCATIONS: Mapping[str, str] = MappingProxyType({})


def _files_stamp(now: float) -> tuple[int, ...]:
    if now - _stamp[0] < STAMP_EVERY:
        return _stamp[1]
    stamp: list[int] = []
    for path in _NAME_FILES:
        try:
            st = os.stat(path)
            stamp += (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp += (-1, -1, -1)
    _stamp[:] = [now, tuple(stamp)]
    return _stamp[1]


class AuthError(Exception):
    """The request is not authenticated; the message says why (HTTP 401)."""


class AuthUnavailable(Exception):
    """The gateway cannot check credentials (munged down): a server fault, HTTP 503."""


def _names(uid: int, gid: int) -> tuple[str, str, tuple[int, ...]]:
    """User name, group name and group list of a credential's uid/gid (cached, see
    NAMES_TTL)."""
    now = time.monotonic()
    stamp = _files_stamp(now)
    hit = _names_cache.get((uid, gid))
    if hit is not None and now - hit[0] < NAMES_TTL and hit[1] == stamp:
        return hit[2]
    names = _lookup_names(uid, gid)
    if len(_names_cache) >= NAMES_MAX:
        _names_cache.clear()
    _names_cache[(uid, gid)] = (now, stamp, names)
    return names


def _plain_caller(uid: int, gid: int) -> Caller:
    """The caller of a credential without payload (no registry credentials), kept with
    its names: the same object for as long as ``_names`` hands out the same names."""
    names = _names(uid, gid)
    hit = _callers.get((uid, gid))
    if hit is not None and hit[0] is names:
        return hit[1]
    caller = Caller(
        user=names[0],
        uid=uid,
        group=names[1],
        gid=gid,
        groups=names[2],
        authorized_locations=_NO_LOCATIONS,
    )
    if len(_callers) >= NAMES_MAX:
        _callers.clear()
    _callers[(uid, gid)] = (names, caller)
    return caller


def _lookup_names(uid: int, gid: int) -> _Names:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    try:
        groups = tuple(os.getgrouplist(user, gid)) if user != str(uid) else (gid,)
    except OSError:
        groups = (gid,)
    return user, group, groups


def _locations(payload: bytes) -> dict[str, str]:
    if not payload.strip():
        return {}
    try:
        data = json.loads(payload)
        locs = data.get("authorized_locations") or {}
    except (ValueError, AttributeError):
        raise AuthError("credential payload is not the expected JSON") from None
    if not isinstance(locs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in locs.items()
    ):
        raise AuthError("authorized_locations must map locations to 'user:pass'")
    return locs


def authenticate(header: str | None, munge_socket: str | None, method: str) -> Caller:
    """The caller of a request (credential decoded by the munged at ``munge_socket``, the
    platform's ``mungeSocketPath``), or :class:`AuthError`."""
    if not header:
        raise AuthError("no credential: send a munge credential in the 'authentication' header")
    if method == "mock":
        return _mock(header)
    if method != "munge":
        raise AuthError(f"authentication method '{method}' is not supported")
    from . import munge

    try:
        cred = munge.decode(header.strip(), socket=munge_socket)
    except munge.MungeUnavailable as exc:
        raise AuthUnavailable(str(exc)) from None
    except munge.MungeError as exc:
        raise AuthError(str(exc)) from None
    if not cred.payload.strip():
        return _plain_caller(cred.uid, cred.gid)  # every job launch's lookup
    user, group, groups = _names(cred.uid, cred.gid)
    return Caller(
        user=user,
        uid=cred.uid,
        group=group,
        gid=cred.gid,
        groups=groups,
        authorized_locations=_locations(cred.payload),
    )


def _mock(header: str) -> Caller:
    """Tests only: ``good:user:group[:token[:uid:gid]]``."""
    parts = header.split(":")
    if len(parts) < 3 or parts[0] != "good":
        raise AuthError("mock authentication failed")
    uid = int(parts[4]) if len(parts) > 5 else 1000
    gid = int(parts[5]) if len(parts) > 5 else 1000
    return Caller(user=parts[1], uid=uid, group=parts[2], gid=gid, groups=(gid,))
