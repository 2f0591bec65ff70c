"""A native client for the OCI Distribution protocol (Docker Registry HTTP API v2).

It fetches manifests (Docker schema 2, OCI, manifest lists and OCI indexes with platform
selection), image configs and blobs, verifying every digest while streaming. Auth is
anonymous, Bearer token (``WWW-Authenticate: Bearer realm,service,scope``) or Basic,
with credentials handed in by the caller and never logged. Transient failures (5xx, 429,
dropped connections, truncated bodies) are retried with exponential backoff.

``requests`` gives us proxies from ``http(s)_proxy``/``no_proxy`` and drops the
Authorization header when a redirect leaves the registry's host (blob storage on S3 or
a CDN must never see registry credentials).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import requests

from .errors import (
    DigestMismatch,
    ImageNotFound,
    ManifestError,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    UnsupportedMediaType,
)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
# A registry answers OCI manifests with 404 and converts Docker schema 2 to schema 1
# unless every type we take is listed.
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

CONFIG_TYPES = frozenset(
    {"application/vnd.docker.container.image.v1+json", "application/vnd.oci.image.config.v1+json"}
)
LAYER_TYPES = frozenset(
    {
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        # Not in Docker's schema 2 spec but produced and read by containerd/buildkit
        # (uncompressed and zstd layers in Docker-format manifests).
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)
# Real manifests are a few KiB; a cap keeps a hostile registry from filling memory.
MAX_MANIFEST_BYTES = 4 << 20
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}\Z")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass
class ResolvedImage:
    """A platform-specific image: its manifest, config and layers, all digest-checked."""

    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    config: dict[str, Any]
    layers: list[Descriptor] = field(default_factory=list)

    @property
    def image_id(self) -> str:
        """The image id: hex of the config digest, the same for every manifest encoding."""
        return self.config_digest.split(":", 1)[1]


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', rest))
    return scheme.lower(), params


def _hasher(digest: str) -> Any:
    algo = digest.split(":", 1)[0]
    if algo not in ("sha256", "sha512"):
        raise ValueError(algo)
    return hashlib.new(algo)


def _platform_tuple(platform: str) -> tuple[str, str, str | None]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], not '{platform}'")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


class RegistryClient:
    """One registry (a base URL), one set of credentials, one image name for messages."""

    def __init__(
        self,
        base_url: str,
        *,
        image: str,
        credentials: tuple[str, str] | None = None,
        cafile: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.image = image
        self._credentials = credentials
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._session = session or requests.Session()
        # Passed with every request rather than set on the session: requests lets
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's ``verify``, and sites
        # commonly export those, which would silently drop the location's own CA.
        # None keeps requests' default (the environment's bundle, else certifi).
        self._verify: str | None = cafile or None
        self._lock = threading.Lock()
        self._auth_header: str | None = None

    # -- requests with auth and retries -------------------------------------------------

    def _authorize(self, challenge: str, repo: str) -> None:
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if not self._credentials:
                raise RegistryAuthError(
                    self.image,
                    f"registry {self.base_url} requires a login (run 'shifterimg login')",
                )
            user, password = self._credentials
            self._auth_header = requests.auth._basic_auth_str(user, password)
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryAuthError(
                self.image, f"unsupported auth challenge from registry: {scheme}"
            )
        query = {"scope": params.get("scope") or f"repository:{repo}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        auth = self._credentials
        try:
            resp = self._session.get(
                params["realm"],
                params=query,
                auth=auth,
                timeout=self._timeout,
                verify=self._verify,
            )
        except requests.exceptions.SSLError as exc:
            raise RegistryUnreachable(
                self.image,
                f"TLS verification of token service {params['realm']} failed: {_tls_reason(exc)}",
            ) from exc
        except requests.RequestException as exc:
            raise RegistryUnreachable(
                self.image, f"token service {params['realm']} did not answer: {exc}"
            ) from exc
        if resp.status_code in (401, 403):
            raise RegistryAuthError(
                self.image,
                f"token service {params['realm']} refused the credentials"
                if auth
                else f"token service {params['realm']} refused anonymous access",
            )
        if resp.status_code != 200:
            raise RegistryAuthError(
                self.image, f"token service {params['realm']} answered HTTP {resp.status_code}"
            )
        try:
            body = resp.json()
            token = body.get("token") or body["access_token"]
        except (ValueError, KeyError, AttributeError) as exc:
            raise RegistryAuthError(self.image, "token service gave no token") from exc
        self._auth_header = f"Bearer {token}"

    def _send(self, method: str, url: str, repo: str, headers: dict[str, str], stream: bool):
        for attempt in range(2):
            hdrs = dict(headers)
            with self._lock:
                if self._auth_header:
                    hdrs["Authorization"] = self._auth_header
                sent_auth = self._auth_header
            resp = self._session.request(
                method,
                url,
                headers=hdrs,
                stream=stream,
                timeout=self._timeout,
                verify=self._verify,
            )
            if resp.status_code != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            if attempt == 1 or not challenge:
                break
            with self._lock:
                # Another thread may have refreshed the token meanwhile.
                if self._auth_header == sent_auth:
                    self._authorize(challenge, repo)
        if self._credentials:
            raise RegistryAuthError(
                self.image, f"registry {self.base_url} refused the credentials for {repo}"
            )
        raise RegistryAuthError(
            self.image,
            f"registry {self.base_url} refused anonymous access to {repo} "
            "(log in with 'shifterimg login')",
        )

    def _request(
        self,
        method: str,
        path: str,
        repo: str,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        url = f"{self.base_url}/v2/{path}"
        last: str = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff * (2 ** (attempt - 1)))
            try:
                resp = self._send(method, url, repo, headers or {}, stream)
            except requests.exceptions.SSLError as exc:
                # Not retried: a certificate problem does not go away by waiting.
                hint = (
                    f"is {self._verify} the CA that signed its certificate?"
                    if self._verify
                    else "if it uses its own CA, set that CA as the location's sslcacert"
                )
                raise RegistryUnreachable(
                    self.image,
                    f"TLS verification of registry {self.base_url} failed: "
                    f"{_tls_reason(exc)} ({hint})",
                ) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"cannot reach registry {self.base_url}: {_short(exc)}"
                continue
            if resp.status_code in _RETRY_STATUS:
                last = f"registry {self.base_url} answered HTTP {resp.status_code}"
                resp.close()
                continue
            return resp
        raise RegistryUnreachable(self.image, f"{last} (after {self._retries + 1} tries)")

    # -- manifests ---------------------------------------------------------------------

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest; returns (body, media type, digest), digest-checked."""
        resp = self._request(
            "GET",
            f"{repo}/manifests/{reference}",
            repo,
            {"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        with resp:
            if resp.status_code == 404:
                # Say whether the repository or the tag/digest is missing: it is what the
                # user got wrong. Some registries answer NAME_UNKNOWN right here;
                # distribution says MANIFEST_UNKNOWN either way, so ask its tag list.
                if "NAME_UNKNOWN" in _error_codes(resp) or self._repo_missing(repo):
                    raise ImageNotFound(
                        self.image, f"repository '{repo}' not found at {self.base_url}"
                    )
                # Tags cannot contain ':', digests always do ("sha-1234" is a tag).
                what = "digest" if ":" in reference else "tag"
                raise ImageNotFound(
                    self.image, f"{what} '{reference}' not found in {repo} at {self.base_url}"
                )
            if resp.status_code == 403:
                raise RegistryAuthError(self.image, f"access to {repo} is forbidden")
            if resp.status_code != 200:
                raise RegistryError(
                    self.image, f"manifest request answered HTTP {resp.status_code}"
                )
            length = int(resp.headers.get("Content-Length") or 0)
            if length > MAX_MANIFEST_BYTES:
                raise ManifestError(self.image, f"manifest of {length} bytes is too large")
            body = resp.raw.read(MAX_MANIFEST_BYTES + 1, decode_content=True)
            if len(body) > MAX_MANIFEST_BYTES:
                raise ManifestError(self.image, "manifest is too large")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            claimed = resp.headers.get("Docker-Content-Digest", "")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith(("sha256:", "sha512:")):
            h = _hasher(reference)
            h.update(body)
            if f"{reference.split(':')[0]}:{h.hexdigest()}" != reference:
                raise DigestMismatch(
                    self.image, f"manifest does not match the requested digest {reference}"
                )
            digest = reference
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ManifestError(self.image, f"manifest is not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise ManifestError(self.image, "manifest is not a JSON object")
        is_schema1 = media_type in SCHEMA1 or doc.get("schemaVersion") == 1
        if claimed.startswith("sha256:") and claimed != digest and not is_schema1:
            # The registry names the digest of what it meant to send: a tag pull gets the
            # same integrity check as a pull by digest. (Schema 1 digests exclude the
            # signatures, so they never match the body; those are refused later anyway.)
            raise DigestMismatch(
                self.image, f"manifest bytes do not match the registry's digest {claimed}"
            )
        media_type = doc.get("mediaType") or media_type
        return body, media_type, digest

    def _repo_missing(self, repo: str) -> bool:
        """True only if the registry says ``repo`` does not exist (any doubt: False)."""
        try:
            resp = self._request("GET", f"{repo}/tags/list?n=1", repo)
        except RegistryError:
            return False
        with resp:
            return resp.status_code == 404 and "NAME_UNKNOWN" in _error_codes(resp)

    def resolve(self, repo: str, reference: str, platform: str = "linux/amd64") -> ResolvedImage:
        """Follow manifest lists to ``platform`` and fetch the image config."""
        body, media_type, digest = self.get_manifest(repo, reference)
        doc = json.loads(body)
        if media_type in (DOCKER_LIST, OCI_INDEX) or (not media_type and "manifests" in doc):
            child = self._select_platform(doc, platform)
            body, media_type, digest = self.get_manifest(repo, child)
            doc = json.loads(body)
            if media_type in (DOCKER_LIST, OCI_INDEX):
                raise ManifestError(self.image, "manifest list points at another manifest list")
        if media_type in SCHEMA1 or doc.get("schemaVersion") == 1:
            raise UnsupportedMediaType(
                self.image,
                "registry only offers a Docker schema 1 manifest, which is obsolete; "
                "push the image again with a current client",
            )
        if media_type not in (DOCKER_MANIFEST, OCI_MANIFEST) and not (
            not media_type and "config" in doc
        ):
            raise UnsupportedMediaType(self.image, f"unsupported manifest type '{media_type}'")
        config_desc = self._descriptor(doc.get("config"), "config")
        if config_desc.media_type not in CONFIG_TYPES:
            raise UnsupportedMediaType(
                self.image,
                f"not a container image: config media type '{config_desc.media_type}'",
            )
        layers = [self._descriptor(d, "layer") for d in doc.get("layers") or []]
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise UnsupportedMediaType(
                    self.image,
                    f"layer {layer.digest} has unsupported media type '{layer.media_type}'",
                )
        config = self._fetch_config(repo, config_desc)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if isinstance(diff_ids, list) and len(diff_ids) != len(layers):
            raise ManifestError(
                self.image,
                f"manifest lists {len(layers)} layers but the config {len(diff_ids)}",
            )
        return ResolvedImage(
            manifest_digest=digest,
            manifest_media_type=media_type,
            config_digest=config_desc.digest,
            config=config,
            layers=layers,
        )

    def _descriptor(self, entry: Any, what: str) -> Descriptor:
        if not isinstance(entry, dict):
            raise ManifestError(self.image, f"manifest has no valid {what} descriptor")
        digest, size = entry.get("digest"), entry.get("size")
        media_type = entry.get("mediaType", "")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise ManifestError(self.image, f"{what} descriptor has an invalid digest {digest!r}")
        if not isinstance(size, int) or size < 0:
            raise ManifestError(self.image, f"{what} {digest} has an invalid size {size!r}")
        return Descriptor(media_type=str(media_type), digest=digest, size=size)

    def _select_platform(self, index: dict[str, Any], platform: str) -> str:
        want_os, want_arch, want_variant = _platform_tuple(platform)
        seen = []
        for entry in index.get("manifests") or []:
            plat = entry.get("platform") or {}
            name = f"{plat.get('os')}/{plat.get('architecture')}"
            if plat.get("variant"):
                name += f"/{plat['variant']}"
            seen.append(name)
            if (
                plat.get("os") == want_os
                and plat.get("architecture") == want_arch
                and (want_variant is None or plat.get("variant") == want_variant)
            ):
                digest = entry.get("digest")
                if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
                    raise ManifestError(self.image, f"manifest list entry for {name} has no digest")
                return digest
        raise ImageNotFound(
            self.image,
            f"no {platform} image in the manifest list (available: {', '.join(seen) or 'none'})",
        )

    def _fetch_config(self, repo: str, desc: Descriptor) -> dict[str, Any]:
        if desc.size > 64 << 20:
            raise ManifestError(self.image, f"image config claims {desc.size} bytes")
        buf = io.BytesIO()
        self.fetch_blob(repo, desc, buf)
        try:
            config = json.loads(buf.getvalue())
        except ValueError as exc:
            raise ManifestError(self.image, f"image config is not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise ManifestError(self.image, "image config is not a JSON object")
        return config

    # -- blobs -------------------------------------------------------------------------

    def fetch_blob(
        self,
        repo: str,
        desc: Descriptor,
        dest: BinaryIO,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a blob into ``dest`` (truncated first), verifying size and digest.

        A dropped connection or short body is retried from the start; bytes that arrive
        whole but hash wrong are a :class:`DigestMismatch`.
        """
        last = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(self._backoff * (2 ** (attempt - 1)))
            dest.seek(0)
            dest.truncate()
            resp = self._request("GET", f"{repo}/blobs/{desc.digest}", repo, stream=True)
            with resp:
                if resp.status_code == 404:
                    raise ImageNotFound(self.image, f"blob {desc.digest} missing from {repo}")
                if resp.status_code != 200:
                    raise RegistryError(
                        self.image, f"blob {desc.digest} request answered HTTP {resp.status_code}"
                    )
                hasher = _hasher(desc.digest)
                got = 0
                try:
                    for chunk in resp.iter_content(_CHUNK):
                        got += len(chunk)
                        if got > desc.size:
                            raise DigestMismatch(
                                self.image,
                                f"blob {desc.digest} is larger than the {desc.size} bytes "
                                "the manifest promised",
                            )
                        hasher.update(chunk)
                        dest.write(chunk)
                        if progress:
                            progress(len(chunk))
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                    last = f"download of blob {desc.digest} broke off: {_short(exc)}"
                    continue
            if got < desc.size:
                last = f"blob {desc.digest} ended after {got} of {desc.size} bytes"
                continue
            actual = f"{desc.digest.split(':')[0]}:{hasher.hexdigest()}"
            if actual != desc.digest:
                raise DigestMismatch(
                    self.image, f"blob {desc.digest} arrived with digest {actual}: refusing it"
                )
            return
        raise DigestMismatch(self.image, f"{last} (after {self._retries + 1} tries)")


def _error_codes(resp: requests.Response) -> set[str]:
    """The ``errors[].code`` values of a registry error body (empty if there are none)."""
    try:
        body = resp.json()
        return {str(e.get("code")) for e in body.get("errors") or [] if isinstance(e, dict)}
    except (ValueError, AttributeError, TypeError):
        return set()


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason ("certificate verify failed: self-signed certificate") alone."""
    text = str(exc)
    match = re.search(r"\[SSL(?:: [A-Z_]+)?\] ([^(')\]]+?)\s*\(_ssl", text)
    return match.group(1) if match else _short(exc)


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, without the wrapper noise."""
    text = str(exc)
    # Stop at the quote, bracket or parenthesis that closes the reason in urllib3's repr.
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1)
    return text if len(text) < 200 else text[:200] + "…"
