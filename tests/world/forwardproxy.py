"""A plain forward HTTP proxy (what ``http_proxy`` points at) that records what it relays.

    with ForwardProxy() as proxy:                       # a free 127.0.0.1 port
        monkeypatch.setenv("http_proxy", proxy.url)     # "http://127.0.0.1:PORT"
        ... client talks to http://registry ...
        proxy.requests                                  # [ProxiedRequest(method, url, headers)]

A client sends ``GET http://host:port/path HTTP/1.1`` (absolute URI) to a proxy; this one
opens a connection to that host, forwards the request (minus hop-by-hop headers) and
streams the answer back. Only ``http://`` targets are relayed: ``CONNECT`` (https through
a proxy) and origin-form requests are recorded and answered 501/400, so a client that
wrongly used the proxy for https is visible rather than silently working.

Unlike ``FaultProxy`` (which stands in for one registry at its own address) this proxy
serves any upstream, and the client keeps using the registry's real URL.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


@dataclass
class ProxiedRequest:
    """One request as the proxy received it (``url`` is the absolute request target)."""

    method: str
    url: str
    headers: CaseInsensitiveDict
    status: int | None = None


class ForwardProxy:
    """Forward proxy in a thread (see module doc)."""

    def __init__(self, bind: str = "127.0.0.1", chunk_size: int = 256 * 1024) -> None:
        self.bind = bind
        self.chunk_size = chunk_size
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ForwardProxy:
        owner = self

        class Handler(_ForwardHandler):
            proxy = owner
            timeout = 30  # idle keep-alive connections end by themselves

        self._server = ThreadingHTTPServer((self.bind, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="forward-proxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}"

    def requests_to(self, needle: str) -> list[ProxiedRequest]:
        """Recorded requests whose absolute URL contains ``needle``."""
        with self._lock:
            return [r for r in self.requests if needle in r.url]


class _ForwardHandler(BaseHTTPRequestHandler):
    proxy: ForwardProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are recorded instead

    def _reply(self, rec: ProxiedRequest, status: int, text: str) -> None:
        body = text.encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True
        rec.status = status

    def _handle(self) -> None:
        rec = ProxiedRequest(self.command, self.path, CaseInsensitiveDict(self.headers.items()))
        with self.proxy._lock:
            self.proxy.requests.append(rec)
        if self.command == "CONNECT":
            self._reply(rec, 501, "this test proxy does not tunnel (CONNECT)")
            return
        target = urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self._reply(rec, 400, "a proxy request needs an absolute http:// URI")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None  # pulls send small bodies only
        path = target.path or "/"
        if target.query:
            path += "?" + target.query
        conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        try:
            try:
                conn.request(self.command, path, body=body, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self._reply(rec, 502, f"upstream {target.netloc}: {e}")
                return
            rec.status = resp.status
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            no_body = self.command == "HEAD" or resp.status in (204, 304)
            # Without a length upstream, re-chunk so the client still sees where the body ends.
            rechunk = resp.getheader("Content-Length") is None and not no_body
            if rechunk:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while not no_body and (data := resp.read(self.proxy.chunk_size)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if rechunk else data)
            if rechunk:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away mid-answer
        finally:
            conn.close()

    # Every method goes the same way.
    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_CONNECT = _handle
