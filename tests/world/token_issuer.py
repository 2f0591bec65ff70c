"""A small Docker/OCI token issuer (the "realm" of ``auth: token``) for tests.

It runs an HTTP server in a thread on a free 127.0.0.1 port and answers

    GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]   (Basic auth optional)
    POST /token  (OAuth2 form: grant_type=password, username, password, service, scope)

with ``{"token", "access_token", "expires_in", "issued_at"}``. Tokens are RS256 JWTs signed
with the private key of a self-signed certificate made at start; the registry trusts that
certificate through ``rootcertbundle`` (``cert_pem``).

How distribution 2.8 picks the key that verifies a token (registry/auth/token/token.go):
the JWT header's ``x5c`` chain if present, else a raw ``jwk``, else ``kid`` looked up in
the keys of the ``rootcertbundle`` certificates, indexed by their *libtrust key id*
(base32 of the first 240 bits of SHA-256 over the DER SubjectPublicKeyInfo, in 12
colon-separated groups of 4). We send ``kid`` = that id (``libtrust_key_id``): no chain
needed. ``aud`` must be a single string equal to the registry's ``service`` and ``iss``
must equal its ``issuer``.

Policy: a request with valid Basic credentials is granted the actions it asks for (or
what ``policy`` allows); an anonymous request gets a token with an empty ``access`` list,
so the registry answers 401 for any repository operation; wrong credentials get 401
here. Each request is recorded in ``requests`` so tests can count token fetches.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

# policy(user or None, resource type, resource name, requested actions) -> granted actions
Policy = Callable[[str | None, str, str, list[str]], list[str]]


@dataclass
class TokenRequest:
    """One request the issuer answered (for assertions)."""

    user: str | None
    service: str | None
    scopes: list[str]
    status: int
    access: list[dict] = field(default_factory=list)


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The libtrust fingerprint distribution uses as key id for rootcertbundle keys."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split "type:name:a,b" into (type, name, [a, b]); the name may itself hold colons."""
    typ, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name:
        return None
    return typ, name, [a for a in actions.split(",") if a]


def _default_policy(user: str | None, typ: str, name: str, actions: list[str]) -> list[str]:
    return list(actions) if user is not None else []


class TokenIssuer:
    """Token endpoint in a thread; ``start()``/``stop()`` or use as a context manager."""

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        service: str = "shifter-test-registry",
        issuer: str = "shifter-test-issuer",
        ttl: int = 300,
        policy: Policy | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.policy: Policy = policy or _default_policy
        self.requests: list[TokenRequest] = []
        self._host = host
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # 2048 bits: what the registry's libtrust accepts without complaint, and quick to make.
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self._key.public_key())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> TokenIssuer:
        issuer = self

        class Handler(_TokenHandler):
            owner = issuer

        self._server = ThreadingHTTPServer((self._host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-issuer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "issuer not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def realm(self) -> str:
        """The value for the registry's ``auth.token.realm``."""
        return f"{self.url}/token"

    # -- tokens ----------------------------------------------------------------------------

    def issue(
        self,
        user: str | None,
        access: list[dict],
        *,
        ttl: int | None = None,
        service: str | None = None,
        not_before: float | None = None,
    ) -> str:
        """Sign a token directly (tests may craft expired or wrong-audience tokens)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service or self.service,  # a string: distribution 2.8 rejects a list
            "iat": now,
            "nbf": int(not_before) if not_before is not None else now - 5,
            "exp": now + (self.ttl if ttl is None else ttl),
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.key_id})

    def grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        """The ``access`` claim for these requested scopes under ``policy``."""
        access: list[dict] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            typ, name, actions = parsed
            granted = self.policy(user, typ, name, actions)
            # Listing an entry with no actions would be harmless, but leaving it out keeps
            # an anonymous token's access list empty as documented.
            if granted:
                access.append({"type": typ, "name": name, "actions": granted})
        return access

    def check(self, user: str, password: str) -> bool:
        return user in self.users and self.users[user] == password

    def token_count(self) -> int:
        """How many tokens were handed out (successful requests)."""
        with self._lock:
            return sum(1 for r in self.requests if r.status == 200)

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)


class _TokenHandler(BaseHTTPRequestHandler):
    owner: TokenIssuer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean

    def _reply(self, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _basic(self) -> tuple[str, str] | None | bool:
        """(user, password), None when absent, False when malformed."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return (user, password) if sep else False

    def _answer(
        self, creds: tuple[str, str] | None | bool, service: str | None, scopes: list[str]
    ) -> None:
        issuer = self.owner
        if creds is False or (creds and not issuer.check(*creds)):
            issuer._record(TokenRequest(None, service, scopes, 401))
            self._reply(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                {"WWW-Authenticate": 'Basic realm="token"'},
            )
            return
        user = creds[0] if creds else None
        access = issuer.grant(user, scopes)
        token = issuer.issue(user, access)
        issuer._record(TokenRequest(user, service, scopes, 200, access))
        self._reply(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": issuer.ttl,
                "issued_at": dt.datetime.now(dt.UTC).isoformat(),
            },
        )

    @staticmethod
    def _scopes(values: list[str]) -> list[str]:
        # The spec allows repeated scope parameters and space-separated scopes in one.
        return [s for v in values for s in v.split(" ") if s]

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        self._answer(
            self._basic(), query.get("service", [None])[0], self._scopes(query.get("scope", []))
        )

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        creds: tuple[str, str] | None | bool = self._basic()
        if form.get("grant_type", [""])[0] == "password":
            creds = (form.get("username", [""])[0], form.get("password", [""])[0])
        self._answer(creds, form.get("service", [None])[0], self._scopes(form.get("scope", [])))
