"""A real registry (CNCF distribution 2.8, ``docker-registry``) for tests.

    reg = Registry()                  # open; or Registry(auth="basic") / Registry(auth="token")
    reg.start()                       # or `with Registry(...) as reg:`; pytest fixtures do this
    reg.url, reg.host                 # "http://127.0.0.1:PORT", "127.0.0.1:PORT"
    Registry(tls=True).ca_path        # https:// with a self-signed CA (see "TLS" below)
    reg.storage_dir, reg.log_path     # filesystem storage root, registry stdout+stderr
    reg.stop()                        # SIGTERM, wait, SIGKILL; removes the temp dir

Auth variants:
- ``auth=None``: anyone may pull and push.
- ``auth="basic"``: htpasswd with one bcrypt entry, ``reg.username`` / ``reg.password``.
- ``auth="token"``: ``auth: token`` with a ``TokenIssuer`` (``reg.token_issuer``) on another
  port. Valid users get what they ask for; anonymous callers get a token without access,
  so the registry refuses them with 401.

TLS: ``tls=True`` (any auth variant) makes a throw-away CA and a server certificate for
IP 127.0.0.1 at start and serves https (``http.tls.certificate/key``); ``reg.url`` is then
``https://127.0.0.1:PORT`` and ``reg.ca_path`` the CA's PEM file, which nothing on the
machine trusts by default. ``reg.session()`` and the helpers below verify with it.

Pushing/pulling as the test user, whatever the variant (no client library needed):
- ``reg.session()`` is a ``requests.Session`` whose auth (``RegistryAuth``) adds Basic
  credentials, or for token registries a Bearer token for ``repository:<name>:pull,push``
  worked out from the URL path (``/v2/<name>/blobs|manifests|tags/...``). If the registry
  still answers 401 with a Bearer challenge (e.g. a cross-repository mount), it fetches a
  token for the challenged scope and resends once (bytes/str bodies only). It works for
  any URL, so it also works through a ``FaultProxy`` in front of the registry.
- ``reg.auth_headers(scope)`` gives the ``Authorization`` header alone (``{}`` for open
  registries) for clients that are not requests.

Observing and breaking the registry:
- ``blob_gets(digest=None)`` counts successful (2xx) GETs of blobs in the access log since
  ``reset_log_mark()`` (or since start); HEADs are not counted. Both first make a marker
  request and wait for it to be logged, so earlier requests are in the log.
- ``access_log()`` parses the log lines since the mark into ``AccessEntry`` items.
- ``corrupt_blob(digest, data)`` / ``truncate_blob(digest, nbytes)`` rewrite the stored
  blob file so the registry serves bytes that do not match the digest.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal
from urllib.parse import urlsplit

import bcrypt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from requests.auth import AuthBase

from .ports import free_port
from .token_issuer import TokenIssuer

AuthKind = Literal["basic", "token"] | None

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"

# Gorilla's combined log format, as distribution writes it to stdout:
# 127.0.0.1 - - [date] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 1234 "referer" "agent"
_ACCESS_RE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')
_BLOB_PATH_RE = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})(?:\?.*)?$")
# Repository operations whose scope can be read off the path.
_REPO_PATH_RE = re.compile(r"^/v2/(.+?)/(?:blobs|manifests|tags)/")


@dataclass(frozen=True)
class AccessEntry:
    """One access-log line."""

    method: str
    path: str
    status: int
    size: int


def _bearer_params(header: str) -> dict[str, str] | None:
    """Parse ``Bearer realm="..",service="..",scope=".."`` (None if not a Bearer challenge)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}


def _scope_for_path(path: str) -> str | None:
    """``repository:<name>:pull,push`` for a repository URL path, None for others."""
    m = _REPO_PATH_RE.match(urlsplit(path).path)
    return f"repository:{m.group(1)}:pull,push" if m else None


def make_tls_files(directory: Path, ip: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """Write ``ca.pem``, ``server.pem`` and ``server-key.pem`` for a server at ``ip``.

    A separate CA (not a self-signed leaf) is what a site with its own PKI has, and the
    shape a client's ``cafile`` option is for. Go and Python both insist on the SAN (no CN
    fallback); Python's strict X.509 checks also want key ids and key usage, so all are set.
    """
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shifter test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class RegistryAuth(AuthBase):
    """requests auth that logs in to one test registry as its test user (see module doc)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        reg = self.registry
        if reg.auth == "basic":
            r.headers["Authorization"] = reg._basic_header()
        elif reg.auth == "token":
            scope = _scope_for_path(urlsplit(r.url or "").path)
            r.headers["Authorization"] = f"Bearer {reg.token(scope)}"
            r.register_hook("response", self._retry_on_challenge)
        return r

    def _retry_on_challenge(self, resp: requests.Response, **kwargs: object) -> requests.Response:
        if resp.status_code != 401 or getattr(resp.request, "_world_retried", False):
            return resp
        params = _bearer_params(resp.headers.get("WWW-Authenticate", ""))
        body = resp.request.body
        # A streamed body was consumed by the first attempt and cannot be sent again.
        if params is None or not (body is None or isinstance(body, bytes | str)):
            return resp
        # requests strips Authorization on a cross-host redirect: do not put it back there.
        if "Authorization" not in resp.request.headers:
            return resp
        token = self.registry.token(params.get("scope"))
        resp.content  # noqa: B018 - drain so the connection can go back to the pool
        resp.close()
        prep = resp.request.copy()
        prep.headers["Authorization"] = f"Bearer {token}"
        prep._world_retried = True  # type: ignore[attr-defined]
        new = resp.connection.send(prep, **kwargs)  # type: ignore[attr-defined]
        new.history.append(resp)
        new.request = prep
        return new


class Registry:
    """A ``docker-registry serve`` process on a free 127.0.0.1 port (see module doc)."""

    def __init__(
        self,
        auth: AuthKind = None,
        *,
        username: str = "shifter",
        password: str | None = None,
        token_ttl: int = 300,
        tls: bool = False,
    ) -> None:
        if auth not in (None, "basic", "token"):
            raise ValueError(f"unknown auth kind {auth!r}")
        self.auth: AuthKind = auth
        self.tls = tls
        self.username: str | None = username if auth else None
        self.password: str | None = (password or secrets.token_urlsafe(12)) if auth else None
        self.token_issuer: TokenIssuer | None = None
        self._token_ttl = token_ttl
        self._tokens: dict[str | None, tuple[str, float]] = {}
        self._token_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._workdir: Path | None = None
        self._port = 0
        self._mark = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Registry:
        self._workdir = Path(tempfile.mkdtemp(prefix="world-registry-"))
        try:
            if self.tls:
                make_tls_files(self._workdir)
            if self.auth == "token":
                assert self.username and self.password
                self.token_issuer = TokenIssuer(
                    {self.username: self.password}, ttl=self._token_ttl
                ).start()
            # free_port() races with other processes: retry with a new port on a bind failure.
            for attempt in range(3):
                self._port = free_port()
                if self._spawn(timeout):
                    return self
                self._kill()
                if "address already in use" not in self._log_text() or attempt == 2:
                    raise RuntimeError(f"registry did not start:\n{self._log_text()[-4000:]}")
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def _spawn(self, timeout: float) -> bool:
        """Start the process with a fresh config; True once GET /v2/ answers."""
        assert self._workdir is not None
        config = self._write_config()
        # REGISTRY_* variables override the config file: do not inherit any.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        log = open(self.log_path, "ab")  # closed in _kill(): it lives as long as the process
        self._log_file = log
        self._proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C to pytest should not hit it before stop()
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                r = requests.get(f"{self.url}/v2/", timeout=1, verify=self.verify)
                if r.status_code in (200, 401):
                    self._mark = self.log_path.stat().st_size
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.03)
        return False

    def _write_config(self) -> Path:
        assert self._workdir is not None
        storage = self.storage_dir
        storage.mkdir(parents=True, exist_ok=True)
        config: dict = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(storage)},
                "delete": {"enabled": True},
                # No blob descriptor cache: a corrupted/truncated blob file is seen as it is.
                # Upload purging is a background job tests do not need.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self._port}", "secret": secrets.token_hex(16)},
        }
        if self.tls:
            config["http"]["tls"] = {
                "certificate": str(self.workdir / "server.pem"),
                "key": str(self.workdir / "server-key.pem"),
            }
        if self.auth == "basic":
            assert self.username and self.password
            # bcrypt is required (MD5 entries get 401). A low cost keeps every request fast:
            # the registry re-checks the hash on each request.
            hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
            htpasswd = self._workdir / "htpasswd"
            htpasswd.write_text(f"{self.username}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "shifter-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            issuer = self.token_issuer
            assert issuer is not None
            bundle = self._workdir / "token-cert.pem"
            bundle.write_bytes(issuer.cert_pem)
            config["auth"] = {
                "token": {
                    "realm": issuer.realm,
                    "service": issuer.service,
                    "issuer": issuer.issuer,
                    "rootcertbundle": str(bundle),
                }
            }
        path = self._workdir / "config.yml"
        # JSON is YAML: no YAML library needed.
        path.write_text(json.dumps(config, indent=2))
        return path

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, keep_files: bool = False) -> None:
        """Stop the registry (and token issuer); remove its temp dir unless ``keep_files``."""
        self._kill()
        if self.token_issuer is not None:
            self.token_issuer.stop()
        if self._workdir is not None and not keep_files:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def ca_path(self) -> Path | None:
        """PEM of the CA that signed the server certificate (None without ``tls``)."""
        return self.workdir / "ca.pem" if self.tls else None

    @property
    def verify(self) -> str | bool:
        """``verify=`` for requests: the test CA for TLS registries."""
        return str(self.ca_path) if self.tls else True

    @property
    def workdir(self) -> Path:
        assert self._workdir is not None, "registry not started"
        return self._workdir

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    # -- credentials -----------------------------------------------------------------------

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.username is None or self.password is None:
            return None
        return self.username, self.password

    def _basic_header(self) -> str:
        creds = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(creds).decode()

    def token(self, scope: str | None = None) -> str:
        """A Bearer token for the test user and ``scope`` (cached until shortly before expiry)."""
        assert self.token_issuer is not None, "not a token registry"
        now = time.monotonic()
        with self._token_lock:
            cached = self._tokens.get(scope)
            if cached and cached[1] > now:
                return cached[0]
        params: dict[str, str] = {"service": self.token_issuer.service}
        if scope:
            params["scope"] = scope
        r = requests.get(self.token_issuer.realm, params=params, auth=self.credentials, timeout=10)
        r.raise_for_status()
        body = r.json()
        token = body.get("token") or body["access_token"]
        ttl = float(body.get("expires_in", 60))
        with self._token_lock:
            self._tokens[scope] = (token, now + max(ttl - 30, ttl / 2))
        return token

    def auth_headers(self, scope: str | None = None) -> dict[str, str]:
        """``{"Authorization": ...}`` for the test user; ``{}`` on an open registry.

        ``scope`` (e.g. ``repository:foo:pull,push``) matters only for token registries.
        """
        if self.auth == "basic":
            return {"Authorization": self._basic_header()}
        if self.auth == "token":
            return {"Authorization": f"Bearer {self.token(scope)}"}
        return {}

    def auth_headers_for_path(self, path: str) -> dict[str, str]:
        """``auth_headers`` with the pull,push scope of the repository named in ``path``.

        Fits ``FaultProxy(upstream_headers=...)`` for a redirect target that must reach
        the registry without the client's credentials.
        """
        return self.auth_headers(_scope_for_path(path))

    def session(self) -> requests.Session:
        """A requests.Session allowed to pull and push as the test user (see module doc)."""
        s = requests.Session()
        if self.tls:
            # requests lets REQUESTS_CA_BUNDLE (set on these machines) override a session's
            # verify: ignore the environment so the test CA is what gets used.
            s.verify = self.verify
            s.trust_env = False
        if self.auth:
            s.auth = RegistryAuth(self)
        return s

    # -- access log ------------------------------------------------------------------------

    def _log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except (OSError, AssertionError):
            return ""

    def _sync_log(self, timeout: float = 5.0) -> None:
        """Make a marker request and wait until it is logged.

        The registry logs a request after its handler returns, a moment after the client
        got the last byte; a request made later and seen in the log means the earlier
        ones are (practically) there too.
        """
        marker = uuid.uuid4().hex
        try:
            requests.get(f"{self.url}/v2/?world-mark={marker}", timeout=5, verify=self.verify)
        except requests.RequestException:
            return  # registry gone: count what is there
        # Match the access-log line itself: the app's own "response completed" line, which
        # also names the URI, is written before it.
        needle = f"world-mark={marker} HTTP/"
        deadline = time.monotonic() + timeout
        while needle not in self._log_text(self._mark):
            if time.monotonic() > deadline:
                raise TimeoutError("registry access log did not show the marker request")
            time.sleep(0.005)

    def reset_log_mark(self) -> None:
        """Count only requests made after this call in ``blob_gets``/``access_log``."""
        self._sync_log()
        self._mark = self.log_path.stat().st_size

    def access_log(self) -> list[AccessEntry]:
        """Access-log entries since the mark, without the marker requests."""
        self._sync_log()
        text = self._log_text(self._mark)
        entries = []
        for m in _ACCESS_RE.finditer(text):
            method, path, status, size = m.groups()
            if "world-mark=" in path:
                continue
            entries.append(AccessEntry(method, path, int(status), 0 if size == "-" else int(size)))
        return entries

    def blob_gets(self, digest: str | None = None) -> int:
        """Successful GETs of blobs (any, or this digest) since the mark; HEADs not counted."""
        n = 0
        for e in self.access_log():
            if e.method != "GET" or not 200 <= e.status < 300:
                continue
            m = _BLOB_PATH_RE.match(e.path)
            if m and (digest is None or m.group(2) == digest):
                n += 1
        return n

    # -- storage tampering -----------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where filesystem storage keeps this blob's bytes."""
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def corrupt_blob(self, digest: str, data: bytes) -> None:
        """Replace the stored bytes of ``digest`` with ``data`` (served as if they matched)."""
        path = self.blob_path(digest)
        if not path.exists():
            raise FileNotFoundError(f"blob {digest} not in registry storage")
        path.write_bytes(data)

    def truncate_blob(self, digest: str, nbytes: int) -> None:
        """Cut the stored blob ``digest`` down to its first ``nbytes`` bytes."""
        path = self.blob_path(digest)
        if not path.exists():
            raise FileNotFoundError(f"blob {digest} not in registry storage")
        os.truncate(path, nbytes)
