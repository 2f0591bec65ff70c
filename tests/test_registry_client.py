"""Our OCI Distribution client (imagegw.registry) against real registries.

Everything here talks to a real CNCF distribution registry (tests/world): images are
built and pushed by the world's own code, faults come from a FaultProxy in front of the
registry or from tampering with its storage. Backoff is tiny so retry paths stay fast.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest
from world.faultproxy import FaultProxy
from world.forwardproxy import ForwardProxy
from world.imagebuild import (
    OCI_MANIFEST,
    BuiltLayer,
    Dir,
    File,
    PushedImage,
    PushedIndex,
    RandomData,
    build_layer,
    push_blob,
    push_image,
    push_index,
    push_manifest,
)
from world.ports import free_port, second_loopback
from world.registry import Registry

from imagegw.errors import (
    DigestMismatch,
    ImageNotFound,
    ManifestError,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    UnsupportedMediaType,
)
from imagegw.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    Descriptor,
    RegistryClient,
    ResolvedImage,
)

IMAGE = "test/image:v1"  # the name errors must carry; not parsed by the client
CONTAINER_CONFIG: dict[str, Any] = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo hello"],
    "WorkingDir": "/data",
    "Labels": {"org.example.team": "hpc", "org.example.version": "1.2"},
}
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

RegistryTarget = Registry | FaultProxy | str


# -- helpers ------------------------------------------------------------------------------


def unique_repo(prefix: str = "client") -> str:
    # Registries live for the whole session: each test pushes to its own repository.
    return f"{prefix}/t{uuid.uuid4().hex[:10]}"


def make_client(
    target: RegistryTarget,
    credentials: tuple[str, str] | None = None,
    **kwargs: Any,
) -> RegistryClient:
    """A client with a tiny backoff (retry tests stay fast) and a short timeout."""
    url = target if isinstance(target, str) else target.url
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("timeout", 10)
    return RegistryClient(url, image=IMAGE, credentials=credentials, **kwargs)


def build_layers(workdir: Path, seed: str, big: int = 64 << 10) -> list[BuiltLayer]:
    """Two layers whose bytes are unique to ``seed``.

    Unique content matters: the registry stores blobs by digest across repositories, so
    a test that corrupts a blob must not share it with any other test.
    """
    return [
        build_layer([File("etc/hello", f"hello from {seed}\n"), Dir("data")], "gzip", workdir),
        build_layer([File("data/blob.bin", RandomData(big, seed=seed))], "gzip", workdir, level=1),
    ]


def push_test_image(
    target: Any,
    workdir: Path,
    repo: str,
    *,
    fmt: str = "docker",
    tag: str | None = "v1",
    platform: tuple[str, ...] = ("linux", "amd64"),
    layers: list[BuiltLayer] | None = None,
) -> PushedImage:
    layers = layers if layers is not None else build_layers(workdir, f"{repo}/{platform}")
    return push_image(target, repo, tag, layers, CONTAINER_CONFIG, fmt=fmt, platform=platform)


def fetch_all(client: RegistryClient, repo: str, resolved: ResolvedImage) -> dict[str, bytes]:
    """Every layer of ``resolved`` by digest, fetched (and verified) by the client."""
    out = {}
    for desc in resolved.layers:
        buf = io.BytesIO()
        client.fetch_blob(repo, desc, buf)
        out[desc.digest] = buf.getvalue()
    return out


def expected_layers(img: PushedImage) -> dict[str, bytes]:
    return {la.digest: la.path.read_bytes() for la in img.layers}


def desc_of(layer: BuiltLayer) -> Descriptor:
    return Descriptor(layer.media_type, layer.digest, layer.size)


def assert_is_image(resolved: ResolvedImage, img: PushedImage) -> None:
    """``resolved`` is exactly the pushed image: digests, layers and container config."""
    assert resolved.manifest_digest == img.manifest_digest
    assert resolved.manifest_media_type == img.manifest_media_type
    assert resolved.config_digest == img.config_digest
    assert resolved.config == img.config_json
    assert [(d.digest, d.size, d.media_type) for d in resolved.layers] == [
        (la.digest, la.size, la.media_type_for(img.fmt)) for la in img.layers
    ]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "layers"


@pytest.fixture(scope="module")
def tls_registry() -> Iterator[Registry]:
    """An https registry whose certificate comes from a CA nobody trusts by default."""
    with Registry(tls=True) as reg:
        yield reg


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variables from the machine: each proxy test sets exactly what it needs."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


# -- manifests ----------------------------------------------------------------------------


def test_schema2_image_resolves_with_config_and_verified_layers(
    registry: Registry, workdir: Path
) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo, fmt="docker")
    client = make_client(registry)

    resolved = client.resolve(repo, "v1")

    assert_is_image(resolved, img)
    assert resolved.manifest_media_type == DOCKER_MANIFEST
    # The progress callback sees every byte exactly once.
    seen: list[int] = []
    for la in img.layers:
        buf = io.BytesIO()
        client.fetch_blob(repo, desc_of(la), buf, progress=seen.append)
        assert buf.getvalue() == la.path.read_bytes()
    assert sum(seen) == sum(la.size for la in img.layers)


def test_oci_manifest_with_gzip_zstd_and_plain_layers(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    layers = [
        build_layer([File("a", f"gzip {repo}")], "gzip", workdir),
        build_layer([File("b", f"zstd {repo}")], "zstd", workdir),
        build_layer([File("c", f"plain {repo}")], "none", workdir),
    ]
    img = push_test_image(registry, workdir, repo, fmt="oci", layers=layers)
    client = make_client(registry)

    resolved = client.resolve(repo, "v1")

    assert_is_image(resolved, img)
    assert resolved.manifest_media_type == OCI_MANIFEST
    assert [d.media_type for d in resolved.layers] == [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar",
    ]
    assert fetch_all(client, repo, resolved) == expected_layers(img)


def test_schema2_with_uncompressed_layer(registry: Registry, workdir: Path) -> None:
    # containerd/buildkit write ".diff.tar" layers into Docker manifests: not a reason to fail.
    repo = unique_repo()
    layers = [build_layer([File("plain", f"plain {repo}")], "none", workdir)]
    img = push_test_image(registry, workdir, repo, fmt="docker", layers=layers)
    client = make_client(registry)

    resolved = client.resolve(repo, "v1")

    assert_is_image(resolved, img)
    assert resolved.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar"
    assert fetch_all(client, repo, resolved) == expected_layers(img)


def test_container_config_fields_come_through(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    push_test_image(registry, workdir, repo)

    cfg = make_client(registry).resolve(repo, "v1").config["config"]

    assert cfg["Env"] == CONTAINER_CONFIG["Env"]
    assert cfg["Entrypoint"] == ["/bin/sh", "-c"]
    assert cfg["Cmd"] == ["echo hello"]
    assert cfg["WorkingDir"] == "/data"
    assert cfg["Labels"] == {"org.example.team": "hpc", "org.example.version": "1.2"}


def test_image_id_is_config_digest_whatever_the_manifest_format(
    registry: Registry, workdir: Path
) -> None:
    # The same layers and config pushed as schema 2 and as OCI: two manifests, one image.
    repo = unique_repo()
    layers = build_layers(workdir, repo)
    docker = push_test_image(registry, workdir, repo, fmt="docker", tag="docker", layers=layers)
    oci = push_test_image(registry, workdir, repo, fmt="oci", tag="oci", layers=layers)
    assert docker.manifest_digest != oci.manifest_digest
    client = make_client(registry)

    a, b = client.resolve(repo, "docker"), client.resolve(repo, "oci")

    assert a.image_id == b.image_id == docker.config_digest.split(":", 1)[1]
    assert re.fullmatch(r"[0-9a-f]{64}", a.image_id)


def push_two_platforms(reg: Any, workdir: Path, repo: str, fmt: str) -> PushedIndex:
    amd = push_test_image(reg, workdir, repo, fmt=fmt, tag=None, platform=("linux", "amd64"))
    arm = push_test_image(reg, workdir, repo, fmt=fmt, tag=None, platform=("linux", "arm64"))
    return push_index(reg, repo, "multi", [(amd.platform, amd), (arm.platform, arm)], fmt=fmt)


@pytest.mark.parametrize(("fmt", "list_type"), [("docker", DOCKER_LIST), ("oci", OCI_INDEX)])
def test_manifest_list_selects_platform(
    registry: Registry, workdir: Path, fmt: str, list_type: str
) -> None:
    repo = unique_repo()
    index = push_two_platforms(registry, workdir, repo, fmt)
    assert index.media_type == list_type
    client = make_client(registry)

    default = client.resolve(repo, "multi")
    arm = client.resolve(repo, "multi", platform="linux/arm64")

    assert_is_image(default, index.images[("linux", "amd64")])
    assert default.config["architecture"] == "amd64"
    assert_is_image(arm, index.images[("linux", "arm64")])
    assert arm.config["architecture"] == "arm64"
    assert fetch_all(client, repo, arm) == expected_layers(index.images[("linux", "arm64")])


def test_unknown_platform_error_lists_what_is_available(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    push_two_platforms(registry, workdir, repo, "oci")

    with pytest.raises(ImageNotFound) as exc:
        make_client(registry).resolve(repo, "multi", platform="linux/s390x")

    msg = str(exc.value)
    assert msg.startswith(f"{IMAGE}: ")
    assert "linux/s390x" in msg
    assert "linux/amd64" in msg and "linux/arm64" in msg


def test_pull_by_digest(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    index = push_two_platforms(registry, workdir, repo, "docker")
    client = make_client(registry)

    by_digest = client.resolve(repo, img.manifest_digest)
    # A digest of a list still selects the platform, and the child is checked too.
    from_index = client.resolve(repo, index.digest, platform="linux/arm64")

    assert_is_image(by_digest, img)
    assert_is_image(from_index, index.images[("linux", "arm64")])


def test_unknown_digest_is_not_found(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    push_test_image(registry, workdir, repo)
    missing = "sha256:" + "0" * 64

    with pytest.raises(ImageNotFound) as exc:
        make_client(registry).resolve(repo, missing)

    assert missing in str(exc.value)


def test_manifest_not_matching_requested_digest_is_refused(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    other = push_test_image(registry, workdir, repo, tag="other", fmt="oci")
    proxy = fault_proxy(registry)
    # A well-formed manifest, just not the one whose digest was asked for.
    proxy.replace_body(r"/manifests/sha256:", other.manifest_bytes, content_type=OCI_MANIFEST)

    with pytest.raises(DigestMismatch) as exc:
        make_client(proxy).resolve(repo, img.manifest_digest)

    assert img.manifest_digest in str(exc.value)


def test_tag_pull_refuses_a_manifest_not_matching_the_registry_digest(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    push_test_image(registry, workdir, repo)
    other = push_test_image(registry, workdir, repo, tag="other", fmt="oci")
    proxy = fault_proxy(registry)
    # Swapped in transit: the registry's Docker-Content-Digest header still names the real one.
    proxy.replace_body(r"/manifests/v1", other.manifest_bytes, content_type=OCI_MANIFEST)

    with pytest.raises(DigestMismatch) as exc:
        make_client(proxy).resolve(repo, "v1")

    assert "registry's digest" in str(exc.value)


# -- auth ---------------------------------------------------------------------------------


def test_anonymous_pull_from_open_registry_sends_no_credentials(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    proxy = fault_proxy(registry)
    client = make_client(proxy)

    resolved = client.resolve(repo, "v1")

    assert fetch_all(client, repo, resolved) == expected_layers(img)
    assert proxy.requests and all("Authorization" not in r.headers for r in proxy.requests)


def test_basic_auth_with_right_credentials(basic_registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    img = push_test_image(basic_registry, workdir, repo)
    client = make_client(basic_registry, basic_registry.credentials)

    resolved = client.resolve(repo, "v1")

    assert_is_image(resolved, img)
    assert fetch_all(client, repo, resolved) == expected_layers(img)


def test_basic_auth_wrong_password_is_refused(basic_registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    push_test_image(basic_registry, workdir, repo)

    with pytest.raises(RegistryAuthError) as exc:
        make_client(basic_registry, ("shifter", "not-the-password")).resolve(repo, "v1")

    assert "refused the credentials" in str(exc.value)
    assert basic_registry.url in str(exc.value)


def test_basic_auth_without_credentials_says_to_log_in(
    basic_registry: Registry, workdir: Path
) -> None:
    repo = unique_repo()
    push_test_image(basic_registry, workdir, repo)

    with pytest.raises(RegistryAuthError) as exc:
        make_client(basic_registry).resolve(repo, "v1")

    assert "login" in str(exc.value)
    assert basic_registry.url in str(exc.value)


def test_token_auth_fetches_one_token_for_manifest_config_and_layers(
    token_registry: Registry, workdir: Path
) -> None:
    repo = unique_repo()
    img = push_test_image(token_registry, workdir, repo)
    issuer = token_registry.token_issuer
    assert issuer is not None
    before = len(issuer.requests)
    client = make_client(token_registry, token_registry.credentials)

    resolved = client.resolve(repo, "v1")
    layers = fetch_all(client, repo, resolved)

    assert_is_image(resolved, img)
    assert layers == expected_layers(img)
    # One token for the manifest, the config and both layers; asked for pull only.
    fetched = issuer.requests[before:]
    assert len(fetched) == 1
    assert fetched[0].user == "shifter" and fetched[0].status == 200
    assert fetched[0].scopes == [f"repository:{repo}:pull"]


def test_token_auth_anonymous_is_refused_with_a_clear_message(
    token_registry: Registry, workdir: Path
) -> None:
    repo = unique_repo()
    push_test_image(token_registry, workdir, repo)

    with pytest.raises(RegistryAuthError) as exc:
        make_client(token_registry).resolve(repo, "v1")

    msg = str(exc.value)
    assert "refused anonymous access" in msg and repo in msg and "shifterimg login" in msg


def test_token_auth_wrong_password_is_refused(token_registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    push_test_image(token_registry, workdir, repo)

    with pytest.raises(RegistryAuthError) as exc:
        make_client(token_registry, ("shifter", "not-the-password")).resolve(repo, "v1")

    assert "refused the credentials" in str(exc.value)


def test_credentials_never_reach_errors_or_logs(
    basic_registry: Registry,
    token_registry: Registry,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 logs every request at DEBUG
    wrong = ("shifter", "Wr0ng-Secret-xyzzy")
    secrets: list[str] = [wrong[1]]
    texts: list[str] = []
    for reg in (basic_registry, token_registry):
        assert reg.credentials is not None
        user, password = reg.credentials
        secrets += [password, base64.b64encode(f"{user}:{password}".encode()).decode()]
        repo = unique_repo()
        img = push_test_image(reg, workdir / str(reg.auth), repo)
        client = make_client(reg, reg.credentials)
        fetch_all(client, repo, client.resolve(repo, "v1"))
        # Failures carry the most context: each must still keep secrets out.
        for creds in (wrong, None):
            with pytest.raises(RegistryAuthError) as exc:
                make_client(reg, creds).resolve(repo, "v1")
            texts.append(str(exc.value))
        reg.corrupt_blob(img.layers[0].digest, b"x" * img.layers[0].size)
        with pytest.raises(DigestMismatch) as mismatch:
            client.fetch_blob(repo, desc_of(img.layers[0]), io.BytesIO())
        texts.append(str(mismatch.value))

    texts += [r.getMessage() for r in caplog.records]
    texts += [caplog.text]
    assert len(caplog.records) > 10  # DEBUG capture really worked
    for secret in secrets:
        leaks = [t for t in texts if secret in t]
        assert not leaks, f"a credential appears in: {leaks[0][:200]}"
    assert not [t for t in texts if "Bearer " in t or "Basic " in t]


# -- retries ------------------------------------------------------------------------------


def test_503_twice_then_success(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    proxy = fault_proxy(registry)
    proxy.fail(r"/manifests/", status=503, times=2)
    proxy.fail(r"/blobs/", status=503, times=2)
    client = make_client(proxy)

    resolved = client.resolve(repo, "v1")

    assert_is_image(resolved, img)
    assert fetch_all(client, repo, resolved) == expected_layers(img)
    assert [r.status for r in proxy.requests_to("/manifests/")] == [503, 503, 200]


def test_503_forever_gives_up_naming_the_registry(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    push_test_image(registry, workdir, repo)
    proxy = fault_proxy(registry)
    proxy.fail(r"/manifests/", status=503, times=None)

    with pytest.raises(RegistryUnreachable) as exc:
        make_client(proxy, retries=3).resolve(repo, "v1")

    msg = str(exc.value)
    assert proxy.url in msg and "503" in msg
    assert len(proxy.requests_to("/manifests/")) == 4  # the first try and 3 retries


def test_connection_dropped_mid_blob_is_retried(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo, layers=build_layers(workdir, repo, big=1 << 20))
    big = max(img.layers, key=lambda la: la.size)
    assert big.size > 300_000
    proxy = fault_proxy(registry)
    # Headers announce the full length; the body stops after 100 kB and the socket closes.
    proxy.drop_after(re.escape(big.digest), nbytes=100_000, times=1)
    out = workdir / "big.blob"

    with open(out, "w+b") as f:
        make_client(proxy).fetch_blob(repo, desc_of(big), f)

    assert out.read_bytes() == big.path.read_bytes()
    assert [r.fault for r in proxy.requests_to(re.escape(big.digest))] == ["drop", None]


def test_registry_down_is_unreachable_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    start = time.monotonic()
    with pytest.raises(RegistryUnreachable) as exc:
        make_client(url).resolve("some/repo", "latest")

    assert time.monotonic() - start < 3
    assert url in str(exc.value)
    assert "Connection refused (after 5 tries)" in str(exc.value)


# -- integrity ----------------------------------------------------------------------------


def test_corrupted_blob_is_refused_naming_its_digest(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    layer = img.layers[1]
    # Same size, other bytes: only the digest check can catch it.
    registry.corrupt_blob(layer.digest, b"\0" * layer.size)
    client = make_client(registry)

    with pytest.raises(DigestMismatch) as exc:
        client.fetch_blob(repo, desc_of(layer), io.BytesIO())

    assert layer.digest in str(exc.value)


def test_corrupted_config_is_refused(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    registry.corrupt_blob(img.config_digest, b" " * len(img.config_bytes))

    with pytest.raises(DigestMismatch) as exc:
        make_client(registry).resolve(repo, "v1")

    assert img.config_digest in str(exc.value)


def test_truncated_blob_is_an_error(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    layer = img.layers[1]
    registry.truncate_blob(layer.digest, layer.size // 2)

    with pytest.raises(RegistryError) as exc:
        make_client(registry, retries=1).fetch_blob(repo, desc_of(layer), io.BytesIO())

    assert layer.digest in str(exc.value)


def test_garbage_manifest_is_a_manifest_error(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    push_test_image(registry, workdir, repo)
    proxy = fault_proxy(registry)
    proxy.replace_body(r"/manifests/", b"<html>502 Bad Gateway</html>")

    with pytest.raises(ManifestError) as exc:
        make_client(proxy).resolve(repo, "v1")

    assert "not valid JSON" in str(exc.value)


def test_schema1_manifest_is_unsupported(
    registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    push_test_image(registry, workdir, repo)
    schema1 = {
        "schemaVersion": 1,
        "name": repo,
        "tag": "v1",
        "architecture": "amd64",
        "fsLayers": [{"blobSum": "sha256:" + "a" * 64}],
        "history": [{"v1Compatibility": "{}"}],
        "signatures": [],
    }
    proxy = fault_proxy(registry)
    # What an old registry answers: a signed schema 1 manifest, whatever we accept.
    proxy.replace_body(r"/manifests/", json.dumps(schema1).encode(), content_type=SCHEMA1_SIGNED)

    with pytest.raises(UnsupportedMediaType) as exc:
        make_client(proxy).resolve(repo, "v1")

    assert "schema 1" in str(exc.value)


def test_helm_chart_is_not_a_container_image(registry: Registry) -> None:
    # An OCI artifact: a valid OCI manifest whose config says "Helm chart".
    repo = unique_repo("charts")
    config = b'{"name": "mychart", "version": "0.1.0", "apiVersion": "v2"}'
    chart = f"not really a chart {repo}".encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    chart_digest = "sha256:" + hashlib.sha256(chart).hexdigest()
    push_blob(registry, repo, config_digest, config)
    push_blob(registry, repo, chart_digest, chart)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": HELM_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": HELM_LAYER, "digest": chart_digest, "size": len(chart)}],
    }
    push_manifest(registry, repo, "0.1.0", json.dumps(manifest).encode(), OCI_MANIFEST)

    with pytest.raises(UnsupportedMediaType) as exc:
        make_client(registry).resolve(repo, "0.1.0")

    assert "not a container image" in str(exc.value)
    assert HELM_CONFIG in str(exc.value)


def test_unknown_tag_is_not_found_naming_the_tag(registry: Registry, workdir: Path) -> None:
    repo = unique_repo()
    push_test_image(registry, workdir, repo)

    with pytest.raises(ImageNotFound) as exc:
        make_client(registry).resolve(repo, "no-such-tag")

    assert "tag 'no-such-tag'" in str(exc.value)
    assert repo in str(exc.value)


def test_unknown_repository_is_not_found_naming_it(registry: Registry) -> None:
    repo = unique_repo("never-pushed")

    with pytest.raises(ImageNotFound) as exc:
        make_client(registry).resolve(repo, "latest")

    assert f"repository '{repo}'" in str(exc.value)


def test_tag_that_looks_like_a_digest_prefix_is_called_a_tag(
    registry: Registry, workdir: Path
) -> None:
    # "sha-1234" is a common CI tag; it must not be reported as a missing digest.
    repo = unique_repo()
    push_test_image(registry, workdir, repo)

    with pytest.raises(ImageNotFound) as exc:
        make_client(registry).resolve(repo, "sha-1234")

    assert "tag 'sha-1234'" in str(exc.value)


# -- redirects ----------------------------------------------------------------------------


def test_cross_host_blob_redirect_drops_authorization(
    token_registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    img = push_test_image(token_registry, workdir, repo)
    front = fault_proxy(token_registry)
    # "Blob storage" on another host: like S3 it needs no registry credentials, so it
    # reaches the registry with its own (the test user's), never the client's.
    storage = fault_proxy(
        token_registry,
        bind=second_loopback(),
        upstream_headers=token_registry.auth_headers_for_path,
    )
    front.redirect(r"/blobs/sha256:", storage, status=307)
    client = make_client(front, token_registry.credentials)

    resolved = client.resolve(repo, "v1")
    layers = fetch_all(client, repo, resolved)

    assert layers == expected_layers(img)
    assert resolved.config == img.config_json
    redirected = front.requests_to("/blobs/sha256:")
    assert redirected and all(r.status == 307 for r in redirected)
    # The registry host did get the token; the other host never saw it.
    assert all(r.headers.get("Authorization", "").startswith("Bearer ") for r in redirected)
    assert len(storage.requests) == len(redirected)
    assert all("Authorization" not in r.headers for r in storage.requests)


def test_same_host_blob_redirect_keeps_working(
    token_registry: Registry, workdir: Path, fault_proxy: Callable[..., FaultProxy]
) -> None:
    repo = unique_repo()
    img = push_test_image(token_registry, workdir, repo)
    proxy = fault_proxy(token_registry)
    # Each blob GET is redirected once to the same URL on the same host; the token must
    # still be sent there or the registry would answer 401.
    for digest in [img.config_digest] + [la.digest for la in img.layers]:
        proxy.redirect(re.escape(digest), proxy, times=1)
    client = make_client(proxy, token_registry.credentials)

    resolved = client.resolve(repo, "v1")

    assert fetch_all(client, repo, resolved) == expected_layers(img)
    blob_requests = proxy.requests_to("/blobs/sha256:")
    assert [r.status for r in blob_requests] == [307, 200] * 3
    assert all("Authorization" in r.headers for r in blob_requests)


# -- proxies ------------------------------------------------------------------------------


def test_http_proxy_from_environment_is_used(
    registry: Registry, workdir: Path, no_proxy_env: pytest.MonkeyPatch
) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    with ForwardProxy() as fwd:
        no_proxy_env.setenv("http_proxy", fwd.url)
        client = make_client(registry)

        resolved = client.resolve(repo, "v1")
        layers = fetch_all(client, repo, resolved)

    assert layers == expected_layers(img)
    seen = [r.url for r in fwd.requests_to(f"{registry.url}/v2/{repo}/")]
    assert f"{registry.url}/v2/{repo}/manifests/v1" in seen
    for la in img.layers:
        assert f"{registry.url}/v2/{repo}/blobs/{la.digest}" in seen


def test_no_proxy_covering_the_registry_bypasses_the_proxy(
    registry: Registry, workdir: Path, no_proxy_env: pytest.MonkeyPatch
) -> None:
    repo = unique_repo()
    img = push_test_image(registry, workdir, repo)
    with ForwardProxy() as fwd:
        no_proxy_env.setenv("http_proxy", fwd.url)
        no_proxy_env.setenv("no_proxy", "localhost,127.0.0.1")
        client = make_client(registry)

        resolved = client.resolve(repo, "v1")
        layers = fetch_all(client, repo, resolved)

    assert layers == expected_layers(img)
    assert fwd.requests == []


# -- custom CA ----------------------------------------------------------------------------


def test_https_registry_with_own_ca_works_with_cafile(
    tls_registry: Registry, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_registry.url.startswith("https://") and tls_registry.ca_path is not None
    repo = unique_repo()
    img = push_test_image(tls_registry, workdir, repo)
    # Sites often export REQUESTS_CA_BUNDLE (these machines do): the location's own CA
    # must still be the one used for this registry.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    client = make_client(tls_registry, cafile=str(tls_registry.ca_path))

    resolved = client.resolve(repo, "v1")

    assert_is_image(resolved, img)
    assert fetch_all(client, repo, resolved) == expected_layers(img)


def test_https_registry_without_its_ca_fails_with_tls_error(
    tls_registry: Registry, workdir: Path
) -> None:
    repo = unique_repo()
    push_test_image(tls_registry, workdir, repo)

    start = time.monotonic()
    with pytest.raises(RegistryUnreachable) as exc:
        make_client(tls_registry, backoff=1.0).resolve(repo, "v1")

    msg = str(exc.value)
    assert "TLS" in msg and tls_registry.url in msg
    assert "certificate verify failed" in msg
    assert time.monotonic() - start < 1  # not retried: a bad certificate does not heal
