"""imagegw.munge: in-process munge credentials against a private munged (docs/behaviour.md,
'Gateway: authentication')."""

from __future__ import annotations

import json
import os
import pickle
import pwd
import threading
import time

import pytest
from world.munge import Munged

from imagegw import munge


def test_roundtrip_with_payload(munged: Munged) -> None:
    payload = json.dumps({"authorized_locations": {"default": "user:pass"}}).encode()
    cred = munge.encode(payload, socket=munged.socket)
    assert cred.startswith("MUNGE:") and cred.endswith(":")
    got = munge.decode(cred, socket=munged.socket)
    assert got == munge.Credential(os.getuid(), os.getgid(), payload)
    assert got.user == pwd.getpwuid(os.getuid()).pw_name


def test_empty_and_str_payloads(munged: Munged) -> None:
    assert munge.decode(munge.encode(socket=munged.socket), socket=munged.socket).payload == b""
    cred = munge.encode("héllo", socket=munged.socket)
    assert munge.decode(cred.encode(), socket=munged.socket).payload == "héllo".encode()


def test_cli_decodes_our_credentials(munged: Munged) -> None:
    # Interoperability both ways: unmunge accepts what libmunge-through-ctypes made.
    out = munged.decode_cli(munge.encode(b"interop", socket=munged.socket))
    assert out.returncode == 0, out.stderr
    assert "Success (0)" in out.stdout and out.stdout.rstrip().endswith("interop")


def test_replayed(munged: Munged) -> None:
    cred = munge.encode(b"once", socket=munged.socket)
    munge.decode(cred, socket=munged.socket)
    with pytest.raises(munge.ReplayedCredential) as exc:
        munge.decode(cred, socket=munged.socket)
    assert str(exc.value) == "Replayed Credential"
    assert exc.value.code == munge.REPLAYED == 17
    assert isinstance(exc.value, munge.CredentialError)


def test_expired_and_ttl_does_not_stick(munged: Munged) -> None:
    short = munge.encode(socket=munged.socket, ttl=1)
    # Same thread, so the same cached encode context: the ttl must be reset to the default.
    normal = munge.encode(socket=munged.socket)
    time.sleep(2.2)
    with pytest.raises(munge.ExpiredCredential) as exc:
        munge.decode(short, socket=munged.socket)
    assert str(exc.value) == "Expired Credential"
    assert exc.value.code == munge.EXPIRED == 15
    assert munge.decode(normal, socket=munged.socket).uid == os.getuid()


@pytest.mark.parametrize(
    "garbage",
    ["garbage", "", "MUNGE:", "MUNGE:AAAAAAAAAAAAAAAAAAAAAAAAAAAA:", "MUNGE:é:", "MUNGE:\0x:"],
)
def test_garbage_is_refused(munged: Munged, garbage: str) -> None:
    with pytest.raises(munge.CredentialError) as exc:
        munge.decode(garbage, socket=munged.socket)
    assert str(exc.value).startswith("authentication failed: ")
    assert not isinstance(exc.value, munge.ExpiredCredential | munge.ReplayedCredential)


def test_tampered_payload_is_refused(munged: Munged) -> None:
    cred = munge.encode(b"A" * 64, socket=munged.socket)
    body = cred[len("MUNGE:") : -1]
    i = len(body) // 2
    flipped = body[:i] + ("B" if body[i] != "B" else "C") + body[i + 1 :]
    with pytest.raises(munge.CredentialError, match="^authentication failed: "):
        munge.decode(f"MUNGE:{flipped}:", socket=munged.socket)


def test_credential_from_nobody_via_cli(munged: Munged) -> None:
    nobody = pwd.getpwnam("nobody")
    cred = munged.encode_cli(b'{"a": 1}', user="nobody")
    got = munge.decode(cred, socket=munged.socket)
    assert (got.uid, got.gid, got.payload) == (nobody.pw_uid, nobody.pw_gid, b'{"a": 1}')
    assert got.user == "nobody"


def test_missing_socket(tmp_path: os.PathLike[str]) -> None:
    sock = os.path.join(tmp_path, "no-such.sock")
    want = f"munge daemon not reachable at {sock}: start munged"
    with pytest.raises(munge.MungeUnavailable) as exc:
        munge.decode("MUNGE:whatever:", socket=sock)
    assert str(exc.value).startswith(want)
    assert not isinstance(exc.value, munge.CredentialError)  # the server's problem, not a 401
    with pytest.raises(munge.MungeUnavailable, match="not reachable"):
        munge.encode(socket=sock)


def test_other_key_is_refused(munged: Munged) -> None:
    with Munged() as other:
        cred = munge.encode(b"elsewhere", socket=other.socket)
        with pytest.raises(munge.CredentialError, match="^authentication failed: "):
            munge.decode(cred, socket=munged.socket)
        # Refusing it did not consume it: its own daemon still accepts it.
        assert munge.decode(cred, socket=other.socket).payload == b"elsewhere"


def test_library_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lib(name: str, *args: object, **kwargs: object) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(munge, "_lib", None)
    monkeypatch.setattr(munge.ctypes, "CDLL", no_lib)
    monkeypatch.setattr(munge, "_local", munge._Local())  # this thread's contexts: none yet
    with pytest.raises(munge.MungeUnavailable, match="libmunge not installed: apt-get install"):
        munge.encode(socket="/nowhere")


def test_threads(munged: Munged) -> None:
    errors: list[str] = []
    counts: list[int] = []

    def work(t: int) -> None:
        ok = 0
        try:
            for i in range(500):
                payload = f"{t}:{i}".encode()
                got = munge.decode(munge.encode(payload, socket=munged.socket), munged.socket)
                if got.payload != payload or got.uid != os.getuid() or got.gid != os.getgid():
                    errors.append(f"thread {t} item {i}: {got}")
                else:
                    ok += 1
        except Exception as exc:  # report in the main thread, not as a thread traceback
            errors.append(f"thread {t}: {exc!r}")
        counts.append(ok)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert sum(counts) == 8 * 500


def test_forked_child(munged: Munged) -> None:
    # The parent uses (and so caches) its contexts before forking, as a gunicorn master
    # with preload would.
    assert munge.decode(munge.encode(b"parent", socket=munged.socket), munged.socket)
    parent_ctxs = munge._contexts(munged.socket)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(r)
            got = munge.decode(munge.encode(b"child", socket=munged.socket), munged.socket)
            fresh = munge._contexts(munged.socket) is not parent_ctxs
            os.write(w, json.dumps([got.payload.decode(), got.uid, fresh]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(data) == ["child", os.getuid(), True]
    # The parent's cached contexts still work after the child used its own.
    assert munge._contexts(munged.socket) is parent_ctxs
    assert munge.decode(munge.encode(b"again", socket=munged.socket), munged.socket)


def test_names() -> None:
    assert munge.user_name(0) == "root" and munge.group_name(0) == "root"
    assert munge.user_name(4_000_000_000) == "4000000000"
    assert munge.group_name(4_000_000_000) == "4000000000"


def test_rates(munged: Munged) -> None:
    """Informational (run with -s): in-process encode and decode rates, one thread."""
    n = 5000
    t0 = time.perf_counter()
    creds = [munge.encode(socket=munged.socket) for _ in range(n)]
    t1 = time.perf_counter()
    for cred in creds:
        munge.decode(cred, socket=munged.socket)
    t2 = time.perf_counter()
    print(f"\nmunge in-process: encode {n / (t1 - t0):,.0f}/s, decode {n / (t2 - t1):,.0f}/s")


def test_errors_pickle() -> None:
    for err in (
        munge.ExpiredCredential(),
        munge.ReplayedCredential(),
        munge.CredentialError(8, "authentication failed: x"),
        munge.MungeUnavailable(6, "munge daemon not reachable at /s: start munged"),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), back.code, str(back)) == (type(err), err.code, str(err))
