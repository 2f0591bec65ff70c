"""The registry side of the test world works: registries, token issuer, fault proxy.

Only plain requests here, so a failure points at the world, not at our client.
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
import uuid
from collections.abc import Callable, Iterator

import pytest
import requests
from world.faultproxy import FaultProxy
from world.ports import second_loopback
from world.registry import Registry
from world.token_issuer import libtrust_key_id, parse_scope

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# Without the OCI types the registry 404s OCI manifests and downgrades schema 2 to schema 1.
ACCEPT = ", ".join(
    [
        SCHEMA2,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique_repo(prefix: str = "world") -> str:
    # Registries are session-wide: every test pushes to its own repository.
    return f"{prefix}/t{uuid.uuid4().hex[:10]}"


def push_blob(s: requests.Session, base: str, repo: str, data: bytes) -> str:
    digest = sha(data)
    r = s.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    loc = r.headers["Location"]
    r = s.put(
        loc,
        params={"digest": digest},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    return digest


def push_image(s: requests.Session, base: str, repo: str, tag: str = "v1") -> dict:
    """A one-layer schema-2 image: returns its parts for checks."""
    layer = os.urandom(4096)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(layer)]},
        }
    ).encode()
    layer_digest = push_blob(s, base, repo, layer)
    config_digest = push_blob(s, base, repo, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": SCHEMA2,
            "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": config_digest},
            "layers": [{"mediaType": DOCKER_LAYER, "size": len(layer), "digest": layer_digest}],
        }
    ).encode()
    r = s.put(f"{base}/v2/{repo}/manifests/{tag}", data=manifest, headers={"Content-Type": SCHEMA2})
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha(manifest)
    return {
        "repo": repo,
        "tag": tag,
        "manifest": manifest,
        "layer": layer,
        "layer_digest": layer_digest,
        "config": config,
        "config_digest": config_digest,
    }


def check_pull(s: requests.Session, base: str, img: dict) -> None:
    r = s.get(f"{base}/v2/{img['repo']}/manifests/{img['tag']}", headers={"Accept": ACCEPT})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == SCHEMA2
    assert r.content == img["manifest"]
    r = s.get(f"{base}/v2/{img['repo']}/blobs/{img['layer_digest']}")
    assert r.status_code == 200
    assert r.content == img["layer"]


# -- registries ----------------------------------------------------------------------------


def test_open_registry_push_and_pull(registry: Registry) -> None:
    assert registry.url == f"http://{registry.host}"
    assert requests.get(f"{registry.url}/v2/", timeout=5).status_code == 200
    s = requests.Session()
    img = push_image(s, registry.url, unique_repo())
    check_pull(s, registry.url, img)
    assert registry.blob_path(img["layer_digest"]).read_bytes() == img["layer"]
    assert registry.storage_dir.is_dir() and registry.log_path.is_file()
    assert registry.session().auth is None and registry.auth_headers() == {}


def test_basic_registry(basic_registry: Registry) -> None:
    reg = basic_registry
    assert reg.username and reg.password
    img = push_image(reg.session(), reg.url, unique_repo())
    url = f"{reg.url}/v2/{img['repo']}/manifests/v1"
    assert requests.get(url, headers={"Accept": ACCEPT}).status_code == 401
    wrong = requests.get(url, headers={"Accept": ACCEPT}, auth=(reg.username, "nope"))
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"].startswith("Basic ")
    s = requests.Session()
    s.auth = (reg.username, reg.password)
    check_pull(s, reg.url, img)
    r = requests.get(url, headers={"Accept": ACCEPT, **reg.auth_headers()})
    assert r.status_code == 200


def _challenge(resp: requests.Response) -> dict[str, str]:
    scheme, _, rest = resp.headers["WWW-Authenticate"].partition(" ")
    assert scheme == "Bearer"
    return dict(part.split("=", 1) for part in rest.replace('"', "").split(","))


def test_token_registry_refuses_anonymous_and_accepts_token(token_registry: Registry) -> None:
    reg = token_registry
    issuer = reg.token_issuer
    assert issuer is not None and reg.username and reg.password
    img = push_image(reg.session(), reg.url, unique_repo())
    url = f"{reg.url}/v2/{img['repo']}/manifests/v1"

    # The client dance: 401 + challenge -> token from realm -> retry with Bearer.
    r = requests.get(url, headers={"Accept": ACCEPT})
    assert r.status_code == 401
    ch = _challenge(r)
    assert ch["realm"] == issuer.realm and ch["service"] == issuer.service
    assert ch["scope"] == f"repository:{img['repo']}:pull"
    params = {"service": ch["service"], "scope": ch["scope"]}

    anon = requests.get(ch["realm"], params=params).json()["token"]
    r = requests.get(url, headers={"Accept": ACCEPT, "Authorization": f"Bearer {anon}"})
    assert r.status_code == 401, "an anonymous token must not pull"

    assert requests.get(ch["realm"], params=params, auth=(reg.username, "bad")).status_code == 401

    before = issuer.token_count()
    tok = requests.get(ch["realm"], params=params, auth=(reg.username, reg.password)).json()
    assert tok["token"] == tok["access_token"] and tok["expires_in"] > 0
    assert issuer.token_count() == before + 1
    assert issuer.requests[-1].access == [
        {"type": "repository", "name": img["repo"], "actions": ["pull"]}
    ]
    r = requests.get(url, headers={"Accept": ACCEPT, "Authorization": f"Bearer {tok['token']}"})
    assert r.status_code == 200 and r.content == img["manifest"]

    # A pull-only token cannot push.
    r = requests.post(
        f"{reg.url}/v2/{img['repo']}/blobs/uploads/",
        headers={"Authorization": f"Bearer {tok['token']}"},
    )
    assert r.status_code == 401

    check_pull(reg.session(), reg.url, img)


def test_token_registry_rejects_untrusted_or_expired_tokens(token_registry: Registry) -> None:
    reg = token_registry
    issuer = reg.token_issuer
    assert issuer is not None
    repo = unique_repo()
    access = [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
    start = f"{reg.url}/v2/{repo}/blobs/uploads/"

    def post(token: str) -> int:
        return requests.post(start, headers={"Authorization": f"Bearer {token}"}).status_code

    assert post(issuer.issue(reg.username, access)) == 202
    assert post(issuer.issue(reg.username, access, ttl=-120)) == 401  # beyond the leeway
    assert post(issuer.issue(reg.username, access, service="other-service")) == 401


def test_session_follows_bearer_challenge_for_other_scopes(token_registry: Registry) -> None:
    # /v2/_catalog is not a repository path: the session gets a scope-less token first,
    # then answers the registry's challenge (registry:catalog:*) and retries.
    s = token_registry.session()
    push_blob(s, token_registry.url, unique_repo(), b"x")
    r = s.get(f"{token_registry.url}/v2/_catalog")
    assert r.status_code == 200, r.text
    assert r.history and r.history[0].status_code == 401
    assert "repositories" in r.json()


def test_libtrust_key_id_and_scope_parsing(token_registry: Registry) -> None:
    issuer = token_registry.token_issuer
    assert issuer is not None
    kid = issuer.key_id
    assert len(kid.split(":")) == 12 and all(len(g) == 4 for g in kid.split(":"))
    assert libtrust_key_id(issuer._key.public_key()) == kid
    assert parse_scope("repository:a/b:pull,push") == ("repository", "a/b", ["pull", "push"])
    assert parse_scope("repository:host:5000/a:pull") == ("repository", "host:5000/a", ["pull"])
    assert parse_scope("registry:catalog:*") == ("registry", "catalog", ["*"])
    assert parse_scope("garbage") is None


# -- log and storage -----------------------------------------------------------------------


def test_blob_gets_counts_successful_gets_only(registry: Registry) -> None:
    s = requests.Session()
    repo = unique_repo()
    d1 = push_blob(s, registry.url, repo, b"one")
    d2 = push_blob(s, registry.url, repo, b"two")
    registry.reset_log_mark()
    assert registry.blob_gets() == 0
    for _ in range(2):
        assert s.get(f"{registry.url}/v2/{repo}/blobs/{d1}").content == b"one"
    assert s.head(f"{registry.url}/v2/{repo}/blobs/{d2}").status_code == 200
    assert s.get(f"{registry.url}/v2/{repo}/blobs/{sha(b'missing')}").status_code == 404
    assert registry.blob_gets(d1) == 2
    assert registry.blob_gets(d2) == 0
    assert registry.blob_gets() == 2
    registry.reset_log_mark()
    s.get(f"{registry.url}/v2/{repo}/blobs/{d2}")
    assert (registry.blob_gets(), registry.blob_gets(d2)) == (1, 1)
    assert [e.method for e in registry.access_log()] == ["GET"]


def test_corrupt_and_truncate_blob(registry: Registry) -> None:
    s = requests.Session()
    repo = unique_repo()
    data = os.urandom(10000)
    d = push_blob(s, registry.url, repo, data)
    registry.corrupt_blob(d, b"evil" + data[4:])
    r = s.get(f"{registry.url}/v2/{repo}/blobs/{d}")
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == d
    assert sha(r.content) != d and len(r.content) == len(data)

    d2 = push_blob(s, registry.url, repo, data[::-1])
    registry.truncate_blob(d2, 100)
    try:
        body = s.get(f"{registry.url}/v2/{repo}/blobs/{d2}").content
    except requests.RequestException:
        body = b""  # a registry that trusts a cached size hangs up early: also a mismatch
    assert sha(body) != d2 and len(body) <= 100
    with pytest.raises(FileNotFoundError):
        registry.corrupt_blob(sha(b"never pushed"), b"")


def test_registry_stop_is_idempotent_and_frees_the_port() -> None:
    reg = Registry().start()
    url, workdir = reg.url, reg.workdir
    assert reg.running
    reg.stop()
    reg.stop()
    assert not reg.running and not workdir.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/", timeout=2)


# -- fault proxy ---------------------------------------------------------------------------

MakeProxy = Callable[..., FaultProxy]


@pytest.fixture
def pushed(registry: Registry) -> dict:
    return push_image(requests.Session(), registry.url, unique_repo("proxy"))


def test_proxy_passes_through_and_keeps_alive(
    registry: Registry, fault_proxy: MakeProxy, pushed: dict
) -> None:
    proxy = fault_proxy(registry)
    s = requests.Session()
    check_pull(s, proxy.url, pushed)
    check_pull(s, proxy.url, pushed)
    clients = {r.client for r in proxy.requests}
    assert len(proxy.requests) == 4 and len(clients) == 1, "one kept-alive connection"
    # The Host header goes through, so the registry sends uploads back to the proxy.
    r = s.post(f"{proxy.url}/v2/{unique_repo()}/blobs/uploads/")
    assert r.status_code == 202 and r.headers["Location"].startswith(proxy.url + "/")
    assert proxy.requests_to(r"/manifests/", "GET")[0].headers["Accept"] == ACCEPT


def test_proxy_status_fault_then_pass(
    registry: Registry, fault_proxy: MakeProxy, pushed: dict
) -> None:
    proxy = fault_proxy(registry)
    fault = proxy.fail(r"/manifests/", status=503, times=2)
    url = f"{proxy.url}/v2/{pushed['repo']}/manifests/v1"
    s = requests.Session()
    codes = [s.get(url, headers={"Accept": ACCEPT}).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert fault.hits == 2 and fault.exhausted
    assert [r.fault for r in proxy.requests] == ["status", "status", None]
    # A failed PUT with a body keeps the connection usable (the body is drained).
    proxy.fail(r"/blobs/uploads/", status=500, method="PUT")
    loc = s.post(f"{proxy.url}/v2/{pushed['repo']}/blobs/uploads/").headers["Location"]
    assert s.put(loc, params={"digest": sha(b"z" * 5000)}, data=b"z" * 5000).status_code == 500
    assert s.get(url, headers={"Accept": ACCEPT}).status_code == 200


def test_proxy_drops_connection_mid_body(
    registry: Registry, fault_proxy: MakeProxy, pushed: dict
) -> None:
    proxy = fault_proxy(registry)
    proxy.drop_after(r"/blobs/sha256:", nbytes=1000)
    url = f"{proxy.url}/v2/{pushed['repo']}/blobs/{pushed['layer_digest']}"
    got = bytearray()
    with pytest.raises(requests.RequestException):
        with requests.get(url, stream=True, timeout=5) as r:
            assert r.status_code == 200
            assert int(r.headers["Content-Length"]) == len(pushed["layer"])
            # urllib3 drops a partly filled read buffer when the stream breaks: read in
            # pieces that divide 1000 to see every byte the proxy sent.
            for chunk in r.iter_content(100):
                got += chunk
    assert bytes(got) == pushed["layer"][:1000]
    # times=1: the next request passes.
    assert requests.get(url, timeout=5).content == pushed["layer"]


def test_proxy_replaces_body(registry: Registry, fault_proxy: MakeProxy, pushed: dict) -> None:
    proxy = fault_proxy(registry)
    proxy.replace_body(r"/manifests/", b"{not json", content_type="text/plain", times=1)
    url = f"{proxy.url}/v2/{pushed['repo']}/manifests/v1"
    r = requests.get(url, headers={"Accept": ACCEPT})
    assert r.status_code == 200 and r.content == b"{not json"
    assert r.headers["Content-Type"] == "text/plain"
    assert r.headers["Docker-Content-Digest"] == sha(pushed["manifest"])  # now a lie
    proxy.replace_body(r"/manifests/", b"[]")  # keeps the upstream Content-Type
    r = requests.get(url, headers={"Accept": ACCEPT})
    assert r.content == b"[]" and r.headers["Content-Type"] == SCHEMA2


def test_proxy_cross_host_redirect_records_dropped_authorization(
    token_registry: Registry, fault_proxy: MakeProxy
) -> None:
    reg = token_registry
    img = push_image(reg.session(), reg.url, unique_repo("redir"))
    # The "object store": another host, reaching the registry with its own credentials.
    store = fault_proxy(reg, bind=second_loopback(), upstream_headers=reg.auth_headers_for_path)
    front = fault_proxy(reg)
    front.redirect(r"/blobs/sha256:", store)
    assert store.host.split(":")[0] != front.host.split(":")[0]

    s = reg.session()
    r = s.get(f"{front.url}/v2/{img['repo']}/blobs/{img['layer_digest']}")
    assert r.status_code == 200 and r.content == img["layer"]
    assert r.history[0].status_code == 307
    assert "Authorization" in front.requests_to(r"/blobs/")[0].headers
    seen = store.requests_to(r"/blobs/")
    assert len(seen) == 1 and "Authorization" not in seen[0].headers

    # A client that carries the header along would be caught.
    hdrs = reg.auth_headers(f"repository:{img['repo']}:pull")
    r = requests.get(
        f"{front.url}/v2/{img['repo']}/blobs/{img['layer_digest']}",
        headers=hdrs,
        allow_redirects=False,
    )
    assert r.status_code == 307
    requests.get(r.headers["Location"], headers=hdrs)
    assert "Authorization" in store.requests_to(r"/blobs/")[-1].headers


def test_proxy_delay(registry: Registry, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(registry)
    proxy.delay(r"^/v2/$", seconds=0.5, times=1)
    with pytest.raises(requests.Timeout):
        requests.get(f"{proxy.url}/v2/", timeout=0.1)
    assert requests.get(f"{proxy.url}/v2/", timeout=5).status_code == 200


def test_proxy_streams_large_bodies(registry: Registry, fault_proxy: MakeProxy) -> None:
    proxy = fault_proxy(registry)
    repo = unique_repo("big")
    size, block = 48 * 1024 * 1024, os.urandom(1024 * 1024)
    h = hashlib.sha256()
    for _ in range(size // len(block)):
        h.update(block)
    digest = "sha256:" + h.hexdigest()

    def body() -> Iterator[bytes]:  # a generator: requests sends it chunked
        for _ in range(size // len(block)):
            yield block

    s = requests.Session()
    tracemalloc.start()
    try:
        loc = s.post(f"{proxy.url}/v2/{repo}/blobs/uploads/").headers["Location"]
        assert s.put(loc, params={"digest": digest}, data=body()).status_code == 201
        got = hashlib.sha256()
        n = 0
        with s.get(f"{proxy.url}/v2/{repo}/blobs/{digest}", stream=True) as r:
            for chunk in r.iter_content(1024 * 1024):
                got.update(chunk)
                n += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == size and "sha256:" + got.hexdigest() == digest
    # Client and proxy run in this process: neither may hold the blob in memory.
    assert peak < 16 * 1024 * 1024, f"peak {peak} bytes"


def test_proxy_stop_cuts_kept_alive_connections(registry: Registry) -> None:
    proxy = FaultProxy(registry.url).start()
    try:
        s = requests.Session()
        assert s.get(f"{proxy.url}/v2/").status_code == 200
    finally:
        proxy.stop()
    with pytest.raises(requests.ConnectionError):
        s.get(f"{proxy.url}/v2/", timeout=2)
