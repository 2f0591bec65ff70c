"""Free-port helpers for services the tests start on loopback.

``free_port()`` asks the kernel for an unused port by binding port 0 and closing the
socket again. Another process may grab the port before our service binds it, so
callers that start external processes retry on a bind failure (see ``Registry``).
"""

from __future__ import annotations

import functools
import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@functools.cache
def second_loopback() -> str:
    """A loopback address other than 127.0.0.1 for "another host" in redirect tests.

    Linux routes all of 127.0.0.0/8 to lo, so 127.0.0.2 normally binds; if it does not,
    "localhost" is still a different host *name* from "127.0.0.1" for a client that
    compares URL hosts.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "localhost"


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port}") from None
            time.sleep(0.02)
