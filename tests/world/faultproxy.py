"""An HTTP proxy in front of a registry that records requests and injects faults.

    proxy = FaultProxy(registry.url).start()     # or `with FaultProxy(...) as proxy:`
    client talks to proxy.url ("http://127.0.0.1:PORT") instead of registry.url
    proxy.fail(r"/manifests/", status=503, times=2)       # 503 twice, then pass through
    proxy.drop_after(r"/blobs/sha256:", nbytes=1000)      # send headers + 1000 bytes, hang up
    proxy.replace_body(r"/manifests/", b"garbage", content_type="application/json")
    proxy.redirect(r"/blobs/sha256:", other_proxy)        # 307 to another host, same path
    proxy.delay(r"/blobs/", seconds=2)                    # answer late (client timeouts)
    proxy.requests                                        # [RecordedRequest(method, path, ...)]
    proxy.stop()

Every fault is keyed by a regex searched in the request target (path + query) and an
optional method; ``times`` is how many requests it hits (None: all). The first live
matching fault, in the order added, applies; one fault per request. Requests are
recorded before faults apply, including the ones a fault answers.

Requests are forwarded with the client's ``Host`` header, so the registry builds upload
``Location`` URLs that point back at the proxy. Bodies are streamed both ways in
``chunk_size`` pieces (a 100 MB blob is never held in memory); keep-alive works.

Cross-host redirects: start a second proxy on another loopback address
(``ports.second_loopback()``, normally 127.0.0.2) in front of the same registry and
redirect blob GETs to it; its ``requests`` show the headers the client sent there (an
``Authorization`` header must not be among them). Real redirect targets (object stores)
need no registry credentials, so such a target can be given ``upstream_headers``:
a function of the request path returning headers that replace the client's on the way
upstream, e.g. ``registry.auth_headers_for_path``.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO, Literal
from urllib.parse import urlsplit

from requests.structures import CaseInsensitiveDict

# Per-connection headers a proxy must not forward (RFC 9110 §7.6.1).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}

FaultKind = Literal["status", "drop", "body", "redirect", "delay"]


@dataclass
class RecordedRequest:
    """What the proxy received (``status`` is what it answered, None if it hung up first)."""

    method: str
    path: str
    headers: CaseInsensitiveDict
    status: int | None = None
    fault: FaultKind | None = None
    client: tuple[str, int] | None = None  # peer address: same port = same kept-alive connection


@dataclass
class Fault:
    """One injected fault; ``hits`` counts the requests it took."""

    kind: FaultKind
    pattern: re.Pattern[str]
    method: str | None = None
    times: int | None = None
    status: int | None = None
    nbytes: int = 0
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    location: str = ""
    seconds: float = 0.0
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.pattern.search(target) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


class FaultProxy:
    """Recording, fault-injecting HTTP proxy to one upstream (see module doc)."""

    def __init__(
        self,
        upstream_url: str,
        *,
        bind: str = "127.0.0.1",
        upstream_headers: Callable[[str], dict[str, str]] | None = None,
        chunk_size: int = 256 * 1024,
        idle_timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http:// upstream, got {upstream_url!r}")
        self.upstream_url = upstream_url.rstrip("/")
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self.bind = bind
        self.upstream_headers = upstream_headers
        self.chunk_size = chunk_size
        self.idle_timeout = idle_timeout
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy
            timeout = proxy.idle_timeout  # idle keep-alive connections end by themselves

        # Port 0: the kernel picks a free port atomically, no race.
        self._server = ThreadingHTTPServer((self.bind, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultproxy-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut open connections (keep-alive clients), join the thread."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._stopped_port = server.server_address[1]

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            return getattr(self, "_stopped_port", 0)
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- faults ----------------------------------------------------------------------------

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail(
        self,
        pattern: str,
        status: int = 503,
        times: int | None = 1,
        *,
        method: str | None = None,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """Answer ``status`` (without asking upstream) ``times`` times, then pass through."""
        return self._add(
            Fault(
                "status",
                re.compile(pattern),
                method,
                times,
                status=status,
                body=body,
                headers=dict(headers or {}),
            )
        )

    def drop_after(
        self, pattern: str, nbytes: int, times: int | None = 1, *, method: str | None = "GET"
    ) -> Fault:
        """Forward, send the real headers and ``nbytes`` of the body, then close the socket."""
        return self._add(Fault("drop", re.compile(pattern), method, times, nbytes=nbytes))

    def replace_body(
        self,
        pattern: str,
        data: bytes,
        *,
        content_type: str | None = None,
        status: int | None = None,
        times: int | None = None,
        method: str | None = "GET",
    ) -> Fault:
        """Forward, then send ``data`` instead of the upstream body.

        Upstream headers are kept (``Docker-Content-Digest`` too, which then lies) except
        Content-Length, and Content-Type when ``content_type`` is given.
        """
        return self._add(
            Fault(
                "body",
                re.compile(pattern),
                method,
                times,
                status=status,
                body=data,
                content_type=content_type,
            )
        )

    def redirect(
        self,
        pattern: str,
        target: str | FaultProxy,
        *,
        status: int = 307,
        times: int | None = None,
        method: str | None = "GET",
    ) -> Fault:
        """Answer ``status`` with ``Location: <target base URL><same path and query>``."""
        base = target.url if isinstance(target, FaultProxy) else target.rstrip("/")
        return self._add(
            Fault("redirect", re.compile(pattern), method, times, status=status, location=base)
        )

    def delay(
        self, pattern: str, seconds: float, times: int | None = None, *, method: str | None = None
    ) -> Fault:
        """Wait ``seconds`` before forwarding."""
        return self._add(Fault("delay", re.compile(pattern), method, times, seconds=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, target):
                    f.hits += 1
                    return f
        return None

    # -- records ---------------------------------------------------------------------------

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def requests_to(self, pattern: str, method: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose target matches ``pattern`` (and ``method`` if given)."""
        rx = re.compile(pattern)
        with self._lock:
            return [
                r
                for r in self.requests
                if rx.search(r.path) and (method is None or r.method == method)
            ]

    def clear(self) -> None:
        """Forget recorded requests (faults stay)."""
        with self._lock:
            self.requests.clear()


class _BodyReader:
    """File-like view of exactly ``length`` bytes of a request body (for http.client)."""

    def __init__(self, rfile: BinaryIO, length: int) -> None:
        self._rfile = rfile
        self._left = length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if size is None or size < 0 else min(size, self._left)
        data = self._rfile.read(n)
        if not data:
            raise ConnectionError("client closed during the request body")
        self._left -= len(data)
        return data


def _read_chunked(rfile: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    """Decode a chunked request body (requests uses it for generator bodies)."""
    while True:
        line = rfile.readline(65537)
        if not line:
            raise ConnectionError("client closed during a chunked body")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers: dropped
            return
        left = size
        while left:
            data = rfile.read(min(left, chunk_size))
            if not data:
                raise ConnectionError("client closed during a chunked body")
            left -= len(data)
            yield data
        rfile.readline()  # the CRLF after the chunk


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive for requests' connection pool

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are recorded instead

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the client or stop() already cut the socket

    # -- request side ----------------------------------------------------------------------

    def _request_body(self) -> tuple[object | None, bool]:
        """(body for http.client, chunked?) streaming from the client socket."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(self.rfile, self.owner.chunk_size), True
        length = int(self.headers.get("Content-Length") or 0)
        return (_BodyReader(self.rfile, length) if length else None), False

    def _drain_request_body(self) -> None:
        """Read and drop the body so the keep-alive connection stays in step."""
        body, _ = self._request_body()
        if isinstance(body, _BodyReader):
            while body.read(self.owner.chunk_size):
                pass
        elif body is not None:
            for _ in body:  # type: ignore[attr-defined]
                pass

    # -- response helpers ------------------------------------------------------------------

    def _simple(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response_only(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- main ------------------------------------------------------------------------------

    def _handle(self) -> None:
        owner = self.owner
        rec = RecordedRequest(
            self.command,
            self.path,
            CaseInsensitiveDict(self.headers.items()),
            client=self.client_address[:2],
        )
        owner._record(rec)
        fault = owner._take_fault(self.command, self.path)
        rec.fault = fault.kind if fault else None
        try:
            if fault is not None and fault.kind == "status":
                self._drain_request_body()
                headers = {"Content-Type": "application/json"} if fault.body else {}
                headers.update(fault.headers)
                assert fault.status is not None
                self._simple(fault.status, fault.body, headers)
                rec.status = fault.status
                return
            if fault is not None and fault.kind == "redirect":
                self._drain_request_body()
                assert fault.status is not None
                self._simple(fault.status, b"", {"Location": fault.location + self.path})
                rec.status = fault.status
                return
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            self._forward(rec, fault)
        except (ConnectionError, TimeoutError, OSError):
            # Client went away or the stream broke: nothing sensible to send any more.
            self.close_connection = True

    # BaseHTTPRequestHandler dispatches on do_<METHOD>: every method goes the same way.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _forward(self, rec: RecordedRequest, fault: Fault | None) -> None:
        owner = self.owner
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        body, chunked = self._request_body()
        if chunked:
            headers.pop("Content-Length", None)
        if owner.upstream_headers is not None:
            extra = owner.upstream_headers(self.path)
            lowered = {k.lower() for k in extra}
            headers = {k: v for k, v in headers.items() if k.lower() not in lowered}
            headers.update(extra)
        conn = http.client.HTTPConnection(
            owner._up_host, owner._up_port, timeout=60, blocksize=owner.chunk_size
        )
        try:
            try:
                conn.request(
                    self.command,
                    self.path,
                    body=body,
                    headers=headers,  # type: ignore[arg-type]
                    encode_chunked=chunked,
                )
                resp = conn.getresponse()
            except (TimeoutError, ConnectionRefusedError, http.client.HTTPException) as e:
                self._simple(502, f"upstream: {e}".encode(), {"Content-Type": "text/plain"})
                rec.status = 502
                self.close_connection = True  # the request body may be half read
                return
            self._relay(rec, resp, fault)
        finally:
            conn.close()

    def _relay(
        self, rec: RecordedRequest, resp: http.client.HTTPResponse, fault: Fault | None
    ) -> None:
        owner = self.owner
        up_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]

        if fault is not None and fault.kind == "body":
            resp.read()  # upstream body is dropped; small (manifests, errors) in practice
            status = fault.status or resp.status
            self.send_response_only(status, resp.reason if status == resp.status else None)
            for k, v in up_headers:
                low = k.lower()
                if low == "content-length" or (fault.content_type and low == "content-type"):
                    continue
                self.send_header(k, v)
            if fault.content_type:
                self.send_header("Content-Type", fault.content_type)
            self.send_header("Content-Length", str(len(fault.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(fault.body)
            self.wfile.flush()
            rec.status = status
            return

        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        # Without a length upstream (Go streams some bodies chunked) re-chunk to the client.
        rechunk = length is None and not no_body
        self.send_response_only(resp.status, resp.reason)
        for k, v in up_headers:
            self.send_header(k, v)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        rec.status = resp.status
        if no_body:
            self.wfile.flush()
            return

        limit = fault.nbytes if fault is not None and fault.kind == "drop" else None
        sent = 0
        while True:
            want = owner.chunk_size if limit is None else min(owner.chunk_size, limit - sent)
            data = resp.read(want) if want > 0 else b""
            if not data:
                break
            if rechunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
            sent += len(data)
        if limit is not None:
            self._hang_up()  # the client sees fewer bytes than announced
            return
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
