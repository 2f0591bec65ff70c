"""Munge credentials, in-process through libmunge (ctypes).

The gateway authenticates every request with a munge credential (header ``authentication``,
docs/behaviour.md, 'Gateway: authentication') and must decode thousands per second, so we call
libmunge directly instead of spawning ``unmunge`` per request.

    cred = encode(b'{"authorized_locations": ...}', socket="/run/munge/munge.socket.2")
    c = decode(cred, socket=...)        # Credential(uid, gid, payload); c.user, c.group

Errors are ``MungeError`` (``.code`` is the munge error number):

- ``CredentialError``: the credential itself was refused (the client's fault, HTTP 401);
  ``ExpiredCredential`` ("Expired Credential") and ``ReplayedCredential`` ("Replayed
  Credential") are its subclasses; the rest read "authentication failed: <reason>".
- ``MungeUnavailable``: munged is not reachable or libmunge is not installed (the
  server's fault, HTTP 503).

Thread and fork safety: a munge context is not thread-safe, and libmunge says to use
separate contexts for encoding and decoding, so each (process, thread, socket) gets its
own pair, kept in a ``threading.local``. The cache is keyed on ``os.getpid()`` so a
child never reuses a context its parent created before ``fork()`` (gunicorn preload).
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import threading
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_SOCKET",
    "EXPIRED",
    "REPLAYED",
    "Credential",
    "CredentialError",
    "ExpiredCredential",
    "MungeError",
    "MungeUnavailable",
    "ReplayedCredential",
    "decode",
    "encode",
    "group_name",
    "user_name",
]

DEFAULT_SOCKET = "/run/munge/munge.socket.2"  # libmunge's compiled-in default

# munge_err_t values we act on (munge.h).
EMUNGE_SUCCESS = 0
EMUNGE_SNAFU = 1
EMUNGE_BAD_ARG = 2
EMUNGE_NO_MEMORY = 5
EMUNGE_SOCKET = 6
EMUNGE_BAD_CRED = 8
EMUNGE_CRED_EXPIRED = 15
EMUNGE_CRED_REPLAYED = 17
EXPIRED = EMUNGE_CRED_EXPIRED
REPLAYED = EMUNGE_CRED_REPLAYED

# munge_opt_t values.
MUNGE_OPT_TTL = 4
MUNGE_OPT_SOCKET = 8
MUNGE_TTL_DEFAULT = 0  # "whatever the daemon's default is" (300 s)


class MungeError(Exception):
    """A munge failure; ``.code`` is the munge error number (munge_err_t)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as cls(*args) with args == (message,): rebuild from both fields
        # so errors survive crossing processes (multiprocessing, concurrent.futures).
        return (type(self), (self.code, self.message))


class CredentialError(MungeError):
    """The credential was refused: bad, forged, expired, replayed... (HTTP 401)."""


class ExpiredCredential(CredentialError):
    def __init__(self, code: int = EMUNGE_CRED_EXPIRED, message: str = "Expired Credential"):
        super().__init__(code, message)


class ReplayedCredential(CredentialError):
    def __init__(self, code: int = EMUNGE_CRED_REPLAYED, message: str = "Replayed Credential"):
        super().__init__(code, message)


class MungeUnavailable(MungeError):
    """munged cannot be reached, or libmunge is missing: not the client's fault."""


@dataclass(frozen=True)
class Credential:
    """A decoded credential: who encoded it and what they put in it."""

    uid: int
    gid: int
    payload: bytes

    @property
    def user(self) -> str:
        return user_name(self.uid)

    @property
    def group(self) -> str:
        return group_name(self.gid)


def user_name(uid: int) -> str:
    """The login name for ``uid``, or the number as text if it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group name for ``gid``, or the number as text if it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --------------------------------------------------------------------------- library


class _Lib:
    """The libmunge and libc entry points, with prototypes."""

    def __init__(self) -> None:
        try:
            munge = ctypes.CDLL("libmunge.so.2")
        except OSError as exc:
            raise MungeUnavailable(
                EMUNGE_SNAFU, f"libmunge not installed: apt-get install libmunge2 ({exc})"
            ) from None
        # Buffers from munge_encode/munge_decode are malloc()ed by libmunge: free them with
        # the same libc free(), not anything Python owns.
        libc = ctypes.CDLL("libc.so.6")
        vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int

        def proto(name: str, restype: Any, *argtypes: Any) -> Any:
            fn = getattr(munge, name)
            fn.restype = restype
            fn.argtypes = list(argtypes)
            return fn

        self.ctx_create = proto("munge_ctx_create", vp)
        self.ctx_destroy = proto("munge_ctx_destroy", None, vp)
        self.ctx_strerror = proto("munge_ctx_strerror", cp, vp)
        self.strerror = proto("munge_strerror", cp, ci)
        # char **cred: a void** so we keep the raw pointer to free (c_char_p would copy it
        # into a Python bytes and lose the address).
        self.encode = proto("munge_encode", ci, ctypes.POINTER(vp), vp, cp, ci)
        uid_p = ctypes.POINTER(ctypes.c_uint32)  # uid_t/gid_t are 32-bit unsigned on Linux
        self.decode = proto(
            "munge_decode", ci, cp, vp, ctypes.POINTER(vp), ctypes.POINTER(ci), uid_p, uid_p
        )
        # munge_ctx_set is variadic: bind one fixed prototype per value type. On the Linux
        # ABIs we run on (x86-64 SysV, AArch64) int/pointer variadic arguments travel
        # exactly like fixed ones, and libffi sets %al on x86-64 regardless.
        addr = ctypes.cast(munge.munge_ctx_set, vp).value
        self.ctx_set_str = ctypes.CFUNCTYPE(ci, vp, ci, cp)(addr)
        self.ctx_set_int = ctypes.CFUNCTYPE(ci, vp, ci, ci)(addr)
        self.free = libc.free
        self.free.restype = None
        self.free.argtypes = [vp]


_lib: _Lib | None = None
_lib_lock = threading.Lock()


def _load() -> _Lib:
    # Lazy so that importing the gateway (and its tests) works without libmunge.
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                _lib = _Lib()
    return _lib


# --------------------------------------------------------------------------- contexts


class _Contexts:
    """One encode and one decode context for one (process, thread, socket)."""

    def __init__(self, lib: _Lib, socket: str | None) -> None:
        self.lib = lib
        self.pid = os.getpid()
        self.socket = socket or DEFAULT_SOCKET
        self.enc = self.dec = None
        self.ttl = MUNGE_TTL_DEFAULT  # what self.enc is set to, to skip redundant sets
        self.enc = self._create(socket)
        self.dec = self._create(socket)

    def _create(self, socket: str | None) -> int:
        ctx = self.lib.ctx_create()
        if not ctx:
            raise MungeError(EMUNGE_NO_MEMORY, "munge_ctx_create failed: out of memory")
        if socket is not None:
            err = self.lib.ctx_set_str(ctx, MUNGE_OPT_SOCKET, os.fsencode(socket))
            if err != EMUNGE_SUCCESS:
                self.lib.ctx_destroy(ctx)
                raise MungeError(err, f"munge_ctx_set(socket): {_strerror(self.lib, err)}")
        return ctx

    def __del__(self) -> None:
        # Runs when the owning thread ends (threading.local is dropped). A context
        # inherited across fork() is left alone: it belongs to the parent's bookkeeping.
        if self.pid != os.getpid():
            return
        try:
            for ctx in (self.enc, self.dec):
                if ctx:
                    self.lib.ctx_destroy(ctx)
        except Exception:  # interpreter shutdown: nothing useful to do
            pass
        self.enc = self.dec = None


# This process's pid, kept by a fork hook rather than asked of the kernel (a system call)
# on every decode: the gateway decodes a credential per request.
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class _Local(threading.local):
    pid: int = -1
    by_socket: dict[str | None, _Contexts]


_local = _Local()


def _contexts(socket: str | None) -> _Contexts:
    local = _local
    pid = _pid[0]
    if local.pid != pid:
        # First use in this thread, or we are a forked child that inherited the parent's
        # thread-local dict: start afresh (the inherited objects skip destroy, see __del__).
        local.pid = pid
        local.by_socket = {}
    ctxs = local.by_socket.get(socket)
    if ctxs is None:
        ctxs = local.by_socket[socket] = _Contexts(_load(), socket)
    return ctxs


def _strerror(lib: _Lib, code: int, ctx: int | None = None) -> str:
    # The context's message is more precise (e.g. names the socket and errno).
    msg = lib.ctx_strerror(ctx) if ctx else None
    if not msg:
        msg = lib.strerror(code)
    return msg.decode("utf-8", "replace") if msg else f"munge error {code}"


def _unreachable(code: int, ctxs: _Contexts, ctx: int) -> MungeUnavailable:
    detail = _strerror(ctxs.lib, code, ctx)
    return MungeUnavailable(
        code, f"munge daemon not reachable at {ctxs.socket}: start munged ({detail})"
    )


# --------------------------------------------------------------------------- API


def encode(payload: bytes | str = b"", socket: str | None = None, ttl: int | None = None) -> str:
    """A credential for the calling process's uid/gid carrying ``payload``.

    ``socket`` is munged's socket (default: libmunge's), ``ttl`` seconds of validity
    (default: the daemon's, 300 s; -1 for the daemon's maximum).
    """
    if isinstance(payload, str):
        payload = payload.encode()
    ctxs = _contexts(socket)
    lib = ctxs.lib
    want_ttl = MUNGE_TTL_DEFAULT if ttl is None else int(ttl)
    if want_ttl != ctxs.ttl:
        err = lib.ctx_set_int(ctxs.enc, MUNGE_OPT_TTL, want_ttl)
        if err != EMUNGE_SUCCESS:
            raise MungeError(err, f"munge_ctx_set(ttl={ttl}): {_strerror(lib, err, ctxs.enc)}")
        ctxs.ttl = want_ttl
    out = ctypes.c_void_p()
    err = lib.encode(ctypes.byref(out), ctxs.enc, payload, len(payload))
    try:
        if err == EMUNGE_SOCKET:
            raise _unreachable(err, ctxs, ctxs.enc)
        if err != EMUNGE_SUCCESS:
            raise MungeError(err, f"munge encode failed: {_strerror(lib, err, ctxs.enc)}")
        return ctypes.string_at(out.value).decode("ascii")
    finally:
        if out.value:
            lib.free(out)


def decode(cred: str | bytes, socket: str | None = None) -> Credential:
    """Validate ``cred`` with munged at ``socket``: who made it and its payload.

    Raises ``ExpiredCredential``, ``ReplayedCredential``, ``CredentialError`` for any
    other refusal, ``MungeUnavailable`` if munged cannot be reached.
    """
    if isinstance(cred, str):
        try:
            cred = cred.encode("ascii")
        except UnicodeEncodeError:
            cred = b"\0"  # not base64: refused below like any other garbage
    if b"\0" in cred:
        # ctypes would silently cut the string at the NUL and munge might accept the
        # prefix: refuse it ourselves.
        raise CredentialError(EMUNGE_BAD_CRED, "authentication failed: Invalid credential format")
    ctxs = _contexts(socket)
    lib = ctxs.lib
    buf = ctypes.c_void_p()
    length = ctypes.c_int()
    uid = ctypes.c_uint32()
    gid = ctypes.c_uint32()
    err = lib.decode(
        cred,
        ctxs.dec,
        ctypes.byref(buf),
        ctypes.byref(length),
        ctypes.byref(uid),
        ctypes.byref(gid),
    )
    # Free the payload whatever happened: libmunge allocates it even for expired,
    # rewound and replayed credentials.
    try:
        payload = ctypes.string_at(buf.value, length.value) if buf.value else b""
    finally:
        if buf.value:
            lib.free(buf)
    if err == EMUNGE_SUCCESS:
        return Credential(uid.value, gid.value, payload)
    if err == EMUNGE_CRED_EXPIRED:
        raise ExpiredCredential()
    if err == EMUNGE_CRED_REPLAYED:
        raise ReplayedCredential()
    if err == EMUNGE_SOCKET:
        raise _unreachable(err, ctxs, ctxs.dec)
    reason = _strerror(lib, err, ctxs.dec)
    if err in (EMUNGE_SNAFU, EMUNGE_NO_MEMORY):
        # munged's own trouble, not the credential's.
        raise MungeError(err, f"authentication failed: {reason}")
    plain = _PLAIN_REASONS.get(err)
    if plain:
        reason = f"{plain} (munge: {reason})"
    raise CredentialError(err, f"authentication failed: {reason}")


# What munge's terse reasons mean for whoever reads them: the client's user or an admin.
_PLAIN_REASONS = {
    EMUNGE_BAD_CRED: "the request did not carry a munge credential",
    9: "the credential is damaged (cut or altered on the way)",  # EMUNGE_BAD_VERSION
    11: "the credential was made with another munge key: the node and the gateway host "
    "need the same /etc/munge/munge.key",  # EMUNGE_BAD_MAC
    13: "the credential was made in another munge realm",  # EMUNGE_BAD_REALM
    14: "the credential was made with another munge key: the node and the gateway host "
    "need the same /etc/munge/munge.key",  # EMUNGE_CRED_INVALID
    16: "the credential comes from the future: the node's and the gateway's clocks differ",
}
