"""A TLS-terminating proxy in front of a plain-HTTP server, as nginx would be at a site.

    ca, cert, key = make_tls_files(tmp_dir)            # world.registry: a CA and a leaf
    with TlsProxy("127.0.0.1", gw.port, cert, key) as proxy:
        proxy.url                                       # "https://127.0.0.1:PORT"
        proxy.handshakes, proxy.refused                 # TLS handshakes done / failed

Each accepted connection is handshaken in its own thread (a client that refuses the
certificate costs that thread only), then bytes are copied both ways until either side
closes. Nothing of HTTP is parsed: what the client sends is what the server gets.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path


class TlsProxy:
    def __init__(
        self, upstream_host: str, upstream_port: int, cert: Path, key: Path,
        bind: str = "127.0.0.1",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.bind = bind
        self.handshakes = 0
        self.refused = 0
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> TlsProxy:
        listener = socket.create_server((self.bind, 0))
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://{self.bind}:{self.port}"

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            with self._lock:
                self.refused += 1
            conn.close()
            return
        with self._lock:
            self.handshakes += 1
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            tls.close()
            return
        done = threading.Event()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            done.set()

        threading.Thread(target=pump, args=(upstream, tls), daemon=True).start()
        threading.Thread(target=pump, args=(tls, upstream), daemon=True).start()
        done.wait()
        # Either side closed: the other is done with this connection too.
        for s in (tls, upstream):
            try:
                s.close()
            except OSError:
                pass
