"""Named network namespaces (``ip netns``) for the virtual cluster, and calls made from
inside one by the test process itself.

    add("sc-123-ctl"); path("sc-123-ctl")    # /run/netns/sc-123-ctl
    in_netns("sc-123-svc", requests.get, url)   # the call runs in that namespace
    delete("sc-123-ctl")                     # the namespace and its /run/netns bind mount

``in_netns`` runs the function in a short-lived thread that has joined the namespace:
``setns(CLONE_NEWNET)`` changes only the calling thread, and a socket keeps the
namespace it was created in, so a listening socket made there can be served from any
thread (``Relay``). The test process's own network is never changed.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> Path:
    return NETNS_DIR / name


def add(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    ip(name, "link", "set", "lo", "up")


def delete(name: str) -> None:
    """``ip netns del`` (it unmounts the bind mount and removes the file); a leftover
    bind mount (a failed ``del``) is detached and the file removed all the same."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    p = path(name)
    if p.exists():
        subprocess.run(["umount", "-l", str(p)], capture_output=True)
        try:
            p.unlink()
        except OSError:
            pass


def dir_is_mounted() -> bool:
    """Whether /run/netns is a mount point (``ip netns add`` makes it one, shared, the
    first time, so that the namespaces' bind mounts propagate)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(NETNS_DIR) for line in f)


def release_dir() -> None:
    """Undo that mount when no namespace is left in it (a plain umount: it fails, and
    changes nothing, if another cluster added one meanwhile)."""
    if not names("") and dir_is_mounted():
        subprocess.run(["umount", str(NETNS_DIR)], capture_output=True)


def names(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def ip(name: str, *args: str) -> None:
    res = subprocess.run(["ip", "-n", name, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip -n {name} {' '.join(args)}: {res.stderr.strip()}")


def in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the network namespace ``name``; returns its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path(name), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class Relay:
    """TCP from ``listen`` inside namespace ``name`` to ``target`` in the test process's
    own network, or in namespace ``connect_ns`` when given (sockets keep the namespace
    they were made in): how a node namespace reaches a service of the test world (the
    registry on the root namespace's loopback), or one cluster's node another's, without
    any route between the networks."""

    def __init__(self, name: str, listen: tuple[str, int], target: tuple[str, int],
                 connect_ns: str | None = None) -> None:
        self.target = target
        self.connect_ns = connect_ns
        self._server = in_netns(name, socket.create_server, listen)
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = (socket.create_connection(self.target, timeout=10)
                            if self.connect_ns is None else
                            in_netns(self.connect_ns, socket.create_connection, self.target,
                                     timeout=10))
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            pair = _Pair(conn, upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=pair.pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._server.close()


class _Pair:
    """Two connected sockets; each direction ends with a half-close, and the pair is
    closed when both have ended."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks = (a, b)
        self.open = 2
        self.lock = threading.Lock()

    def pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self.lock:
            self.open -= 1
            done = self.open == 0
        if done:
            for s in self.socks:
                s.close()
