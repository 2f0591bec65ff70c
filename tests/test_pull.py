"""The whole pipeline against a real registry: registry image in, squashfs + .meta out.

Correctness is checked against an independent implementation (skopeo + umoci) and the
catalogue's own expectations, for both ways to a squashfs (``both_sites``: the default
streaming conversion and the on-disk fallback, ``StreamConversion: false``); bad input
must give a clear error naming the image and the cause, and leave no partial image, no
expanded tree and no unverified cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from world import catalog
from world.imagebuild import File, build_layer, push_image
from world.ports import free_port
from world.reftree import (
    diff_trees,
    mounted_squashfs,
    reference_unpack,
    squashfs_tree,
    tree_manifest,
)

from imagegw.config import parse_config
from imagegw.errors import (
    DigestMismatch,
    ImageNotFound,
    LayerError,
    ManifestError,
    NoSpaceError,
    RegistryAuthError,
    RegistryUnreachable,
    UnsupportedMediaType,
)
from imagegw.pipeline import Pipeline

CONVERT = [sys.executable, "-m", "imagegw.convert_cli"]


class Site:
    """A gateway's directories for one test: cache, expand dir, image dir."""

    def __init__(self, root: Path, **overrides: object) -> None:
        self.root = root
        self.cache = root / "cache"
        self.expand = Path(str(overrides.pop("expand", root / "expand")))
        self.images = Path(str(overrides.pop("images", root / "images")))
        data = {"CacheDirectory": str(self.cache), "ExpandDirectory": str(self.expand)}
        data.update(overrides)  # type: ignore[arg-type]
        self.config = parse_config(data)

    def pipeline(self) -> Pipeline:
        return Pipeline(self.config, self.images)

    def pull(self, ref: str, **kwargs: object):
        return self.pipeline().pull(ref, **kwargs)  # type: ignore[arg-type]

    def assert_clean(self) -> None:
        """Nothing half-done is left: no image files, no tree, only verified blobs."""
        leftovers = sorted(p.name for p in self.images.glob("*")) if self.images.exists() else []
        assert leftovers == [], f"image dir holds {leftovers}"
        if self.expand.exists():
            assert list(self.expand.iterdir()) == [], "an expanded tree was left behind"
        for blob in self.cache.glob("sha256/*"):
            if blob.suffix in (".lock", ".pin"):  # the download and pin locks
                continue
            assert ".partial." not in blob.name, f"partial download {blob.name} left"
            digest = hashlib.sha256(blob.read_bytes()).hexdigest()
            assert digest == blob.name, f"cache entry {blob.name} does not match its bytes"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture(params=["stream", "disk"])
def both_sites(tmp_path: Path, request: pytest.FixtureRequest) -> Site:
    """A site converting by streaming (the default), then one flattening to disk."""
    if request.param == "disk":
        return Site(tmp_path, StreamConversion=False)
    return Site(tmp_path)


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory) -> dict[str, catalog.CatalogImage]:
    work = tmp_path_factory.mktemp("catalog")
    return catalog.build_all(registry, work, include_big=True)


def _umoci_images() -> list[str]:
    return [
        "basic",
        "flatten-docker-gzip",
        "flatten-docker-none",
        "flatten-oci-gzip",
        "flatten-oci-none",
        "xattrs",
        "big-file",
        "many-files",
    ]


# -- correctness -------------------------------------------------------------------------


@pytest.mark.parametrize("name", _umoci_images())
def test_squashfs_tree_equals_umoci_reference(name, images, both_sites, registry, tmp_path):
    img = images[name]
    result = both_sites.pull(img.ref())
    with mounted_squashfs(result.squashfs) as mnt:
        ours = tree_manifest(mnt)
        assert img.check_tree(mnt) == []
    theirs = tree_manifest(reference_unpack(registry, img.repo, img.tag, tmp_path / "ref"))
    # umoci --rootless run as root owns everything by 0:0, as our -all-root image does.
    assert diff_trees(ours, theirs) == []


@pytest.mark.parametrize(
    "name",
    [
        "flatten-docker-gzip",
        "flatten-oci-zstd",
        "flatten-oci-mixed",
        "xattrs-badcap",
        "symlink-abs",
        "chardev",
        "devices",
    ],
)
def test_squashfs_tree_meets_the_catalogue_expectations(name, images, both_sites, tmp_path):
    aliases = {
        "symlink-abs": "hostile-symlink-abs-escape",
        "chardev": "hostile-chardev",
        "devices": "hostile-devices",
    }
    img = images[aliases.get(name, name)]
    result = both_sites.pull(img.ref())
    with mounted_squashfs(result.squashfs) as mnt:
        assert img.check_tree(mnt) == []


def test_zstd_and_mixed_layers_give_the_same_tree_as_their_gzip_twin(images, both_sites):
    gzip_tree = squashfs_tree(both_sites.pull(images["flatten-docker-gzip"].ref()).squashfs)
    for name in ("flatten-oci-zstd", "flatten-oci-mixed"):
        assert (
            diff_trees(squashfs_tree(both_sites.pull(images[name].ref()).squashfs), gzip_tree) == []
        )


@pytest.mark.parametrize("options, codec", [(None, "zstd"), ("-comp gzip", "gzip")])
def test_default_codec_and_the_switch_back_to_gzip(images, tmp_path, options, codec):
    # zstd by default on both paths; "-comp gzip" is the admin guide's switch for nodes
    # whose kernels cannot mount zstd squashfs.
    for streaming in (True, False):
        extra = {"ConverterOptions": {"squashfs": options}} if options else {}
        site = Site(tmp_path / f"{codec}-{streaming}", StreamConversion=streaming, **extra)
        image = site.pull(images["basic"].ref()).squashfs
        stat = subprocess.run(["unsquashfs", "-s", str(image)], capture_output=True, text=True)
        assert f"Compression {codec}" in stat.stdout, stat.stdout


def test_no_xattr_or_file_capability_reaches_the_image(images, both_sites):
    tree = squashfs_tree(both_sites.pull(images["xattrs"].ref()).squashfs, xattrs=True)
    carrying = {path: e.xattrs for path, e in tree.items() if e.xattrs}
    assert carrying == {}


def test_meta_carries_the_image_config(images, site):
    img = images["flatten-docker-gzip"]
    result = site.pull(img.ref())
    meta = result.meta.read_text().splitlines()
    assert meta[0] == "FORMAT: squashfs"
    fields: dict[str, list[str]] = {}
    for line in meta:
        key, value = line.split(": ", 1)
        fields.setdefault(key, []).append(value)
    assert json.loads(fields["ENTRY"][0]) == img.config["Entrypoint"]
    assert json.loads(fields["CMD"][0]) == img.config["Cmd"]
    assert fields["WORKDIR"] == [img.config["WorkingDir"]]
    assert fields["ENV"] == img.config["Env"]
    assert result.labels == img.config["Labels"]
    assert result.image_id == img.config_digest.split(":")[1]
    assert oct(result.squashfs.stat().st_mode & 0o777) == "0o644"
    assert oct(result.meta.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_manifest_list_selects_the_configured_platform(fmt, images, tmp_path):
    img = images[f"multiarch-{fmt}"]
    for arch in ("amd64", "arm64"):
        site = Site(tmp_path / arch, ImagePlatform=f"linux/{arch}")
        result = site.pull(img.ref())
        member = img.platforms[("linux", arch)]
        assert result.image_id == member.config_digest.split(":")[1]
        with mounted_squashfs(result.squashfs) as mnt:
            assert member.check_tree(mnt) == []


def test_pull_by_digest(images, site):
    img = images["basic"]
    result = site.pull(img.digest_ref())
    assert result.manifest_digest == img.manifest_digest


def test_private_pull_writes_acls(images, site):
    result = site.pull(images["basic"].ref(), user_acl=[1000, 1001], group_acl=[50])
    text = result.meta.read_text()
    assert "USERACL: 1000,1001\n" in text and "GROUPACL: 50\n" in text


# -- the layer cache through the pipeline --------------------------------------------------


def _shared_layers(registry, tmp_path, repo):
    """Push ``repo:a`` and ``repo:b``, two images sharing a 2 MiB base layer."""
    base = build_layer([File("shared/big", os.urandom(2 << 20))], "gzip", tmp_path)
    top1 = build_layer([File("one", "1\n")], "gzip", tmp_path)
    top2 = build_layer([File("two", "2\n")], "gzip", tmp_path)
    push_image(registry, repo, "a", [base, top1], {"Cmd": ["/one"]})
    push_image(registry, repo, "b", [base, top2], {"Cmd": ["/two"]})
    return base, top1


def test_shared_layer_downloaded_once_by_concurrent_pulls(registry, tmp_path):
    repo = "pull/shared-concurrent"
    base, _ = _shared_layers(registry, tmp_path, repo)
    registry.reset_log_mark()
    errors: list[BaseException] = []

    def run(tag: str) -> None:
        try:
            # Two gateways' worth of pipelines sharing one cache directory.
            Site(tmp_path, images=tmp_path / tag).pull(f"{registry.host}/{repo}:{tag}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert registry.blob_gets(base.digest) == 1


def test_warm_pull_of_cached_layers_downloads_nothing(registry, site, tmp_path):
    repo = "pull/warm"
    base, top1 = _shared_layers(registry, tmp_path, repo)
    first = site.pull(f"{registry.host}/{repo}:a")
    assert first.downloaded_bytes == base.size + top1.size
    # The same layers under a new image id: only the manifest and the config are fetched.
    other = push_image(registry, repo, "c", [base, top1], {"Cmd": ["/other"]})
    registry.reset_log_mark()
    again = site.pull(f"{registry.host}/{repo}:c")
    assert again.image_id == other.config_digest.split(":")[1] != first.image_id
    assert (again.downloaded_bytes, again.cached_layers) == (0, 2)
    assert registry.blob_gets() == 1  # the config blob


def test_repull_of_an_image_on_disk_only_rewrites_metadata(registry, site, tmp_path):
    repo = "pull/again"
    _shared_layers(registry, tmp_path, repo)
    first = site.pull(f"{registry.host}/{repo}:a")
    inode = first.squashfs.stat().st_ino
    registry.reset_log_mark()
    again = site.pull(f"{registry.host}/{repo}:a", user_acl=[1234])
    assert again.reused and again.squashfs.stat().st_ino == inode
    assert "USERACL: 1234" in again.meta.read_text()
    assert registry.blob_gets() == 1  # the config blob: no layer


# -- bad input: a clear error naming the image and the cause, nothing half-written ----------

FAST = {"backoff": 0.01}


def _pull_fails(site: Site, ref: str, error: type[Exception], *words: str, **kwargs: object):
    with pytest.raises(error) as caught:
        Pipeline(site.config, site.images, client_options=FAST).pull(ref, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith(ref + ": "), message
    for word in words:
        assert word in message, message
    site.assert_clean()
    return message


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("dotdot", ["../escape", "unsafe layer"]),
        ("absolute", ["/abs", "unsafe layer"]),
        ("symlink-escape", ["evil", "unsafe layer"]),
        ("symlink-escape-same-layer", ["evil", "unsafe layer"]),
        ("hardlink-escape", ["passwd", "unsafe layer"]),
    ],
)
def test_hostile_layers_are_refused_and_nothing_escapes(kind, words, images, both_sites):
    img = images[f"hostile-{kind}"]
    assert img.hostile is not None
    # The tree is flattened in a fresh dir directly under ExpandDirectory: a stand-in at
    # the same depth says where a naive extractor's escapes would land.
    same_depth = both_sites.expand / "root"
    made = img.hostile.prepare(same_depth)
    try:
        _pull_fails(both_sites, img.ref(), LayerError, *words)
        escaped = [p for p in img.hostile.must_not_exist(same_depth) if os.path.lexists(p)]
        assert escaped == []
    finally:
        for path in made:
            path.rmdir()


def test_absolute_symlink_write_lands_inside_the_image(images, both_sites):
    img = images["hostile-symlink-abs-escape"]
    result = both_sites.pull(img.ref())
    with mounted_squashfs(result.squashfs) as mnt:
        assert (mnt / "tmp/outside/pwned").read_text() == "pwned\n"
    assert not Path("/tmp/outside/pwned").exists()


def test_device_nodes_are_dropped_with_a_warning(images, both_sites):
    result = both_sites.pull(images["hostile-devices"].ref())
    assert any("dev/evil-sda" in w for w in result.warnings)
    with mounted_squashfs(result.squashfs) as mnt:
        assert not (mnt / "dev/evil-sda").exists() and not (mnt / "dev/evil-fifo").exists()
        assert (mnt / "plain").read_text() == "benign\n"


def test_registry_down(site):
    ref = f"127.0.0.1:{free_port()}/nobody/home:1"
    _pull_fails(site, ref, RegistryUnreachable, "cannot reach registry")


def test_unknown_tag(images, site):
    img = images["basic"]
    ref = f"{img.host}/{img.repo}:no-such-tag"
    _pull_fails(site, ref, ImageNotFound, "no-such-tag", "not found")


def test_wrong_credentials_are_refused_and_not_echoed(basic_registry, site, tmp_path):
    layer = build_layer([File("x", "x\n")], "gzip", tmp_path)
    push_image(basic_registry, "auth/app", "v1", [layer], {"Cmd": ["/x"]})
    ref = f"{basic_registry.host}/auth/app:v1"
    message = _pull_fails(
        site, ref, RegistryAuthError, "refused", credentials={"default": "shifter:wrong-pw"}
    )
    assert "wrong-pw" not in message
    _pull_fails(site, ref, RegistryAuthError, "shifterimg login")
    good = f"{basic_registry.username}:{basic_registry.password}"
    assert site.pull(ref, credentials={basic_registry.host: good}).squashfs.exists()


def test_token_registry_pull_with_credentials(token_registry, site, tmp_path):
    layer = build_layer([File("x", "tok\n")], "gzip", tmp_path)
    push_image(token_registry, "tok/app", "v1", [layer], {"Cmd": ["/x"]})
    ref = f"{token_registry.host}/tok/app:v1"
    _pull_fails(site, ref, RegistryAuthError, "anonymous")
    creds = {"default": f"{token_registry.username}:{token_registry.password}"}
    assert site.pull(ref, credentials=creds).squashfs.exists()


def _unique_image(registry, tmp_path, repo):
    layer = build_layer([File("data", os.urandom(64 << 10))], "gzip", tmp_path)
    push_image(registry, repo, "v1", [layer], {"Cmd": ["/data"]})
    return layer, f"{registry.host}/{repo}:v1"


def test_blob_not_matching_its_digest(registry, site, tmp_path):
    layer, ref = _unique_image(registry, tmp_path, "bad/corrupt")
    registry.corrupt_blob(layer.digest, b"\x1f\x8b not the layer you are looking for")
    _pull_fails(site, ref, DigestMismatch, layer.digest)


def test_truncated_blob(registry, site, tmp_path):
    layer, ref = _unique_image(registry, tmp_path, "bad/truncated")
    registry.truncate_blob(layer.digest, layer.size // 2)
    _pull_fails(site, ref, DigestMismatch, layer.digest)


def test_garbage_manifest(registry, site, tmp_path, fault_proxy):
    _unique_image(registry, tmp_path, "bad/garbage")
    proxy = fault_proxy(registry)
    proxy.replace_body(r"/manifests/", b"<html>garbage</html>")
    _pull_fails(site, f"{proxy.host}/bad/garbage:v1", ManifestError, "not valid JSON")


def test_unsupported_media_type(registry, site, tmp_path):
    from world.imagebuild import push_blob, push_manifest

    config = b'{"name": "chart"}'
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    push_blob(registry, "bad/helm", config_digest, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.cncf.helm.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [],
    }
    push_manifest(
        registry,
        "bad/helm",
        "v1",
        json.dumps(manifest).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    _pull_fails(
        site, f"{registry.host}/bad/helm:v1", UnsupportedMediaType, "not a container image", "helm"
    )


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB ext4 filesystem on a loop device, unmounted and detached after."""
    backing, mnt = tmp_path / "small.img", tmp_path / "small"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True)
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_expand_dir_running_out_of_space(images, tmp_path, small_fs):
    site = Site(tmp_path, expand=small_fs / "expand", StreamConversion=False)
    _pull_fails(site, images["big-file"].ref(), NoSpaceError, "ExpandDirectory")
    assert list((small_fs / "expand").iterdir()) == []


def test_streaming_never_writes_the_tree_to_disk(images, tmp_path, small_fs):
    # The image is larger than this whole filesystem: had its tree been expanded in
    # ExpandDirectory, the pull would fail as in the test above.
    site = Site(tmp_path, expand=small_fs / "expand")
    result = site.pull(images["big-file"].ref())
    with mounted_squashfs(result.squashfs) as mnt:
        assert images["big-file"].check_tree(mnt) == []
    expand = small_fs / "expand"
    assert not expand.exists() or list(expand.iterdir()) == []


def test_an_examiner_gets_a_tree_on_disk(images, tmp_path):
    # The examiner needs a tree: a site that has one is converted the on-disk way.
    seen = tmp_path / "seen"
    examiner = tmp_path / "examiner"
    examiner.write_text(f'#!/bin/sh\nls "$1" > {seen}\n')
    examiner.chmod(0o755)
    site = Site(tmp_path, examiner=str(examiner))
    assert site.pipeline().streaming_unavailable() is not None
    site.pull(images["basic"].ref())
    assert seen.read_text().split(), "the examiner saw an empty tree"
    assert list(site.expand.iterdir()) == [], "the expanded tree was left behind"


def test_streaming_is_chosen_only_where_it_can_build_the_image(tmp_path, monkeypatch):
    from imagegw import sqfstream

    assert Site(tmp_path).pipeline().streaming_unavailable() is None
    opts = {"squashfs": "-comp zstd -Xcompression-level 3 -b 256K -no-xattrs"}
    assert Site(tmp_path, ConverterOptions=opts).pipeline().streaming_unavailable() is None
    pf = Site(tmp_path, ConverterOptions={"squashfs": "-pf /etc/pseudo"}).pipeline()
    assert "-pf" in (pf.streaming_unavailable() or "")
    monkeypatch.setattr(sqfstream, "TAR2SQFS", "tar2sqfs-not-installed")
    assert "squashfs-tools-ng" in (Site(tmp_path).pipeline().streaming_unavailable() or "")


def test_image_dir_running_out_of_space(images, tmp_path, small_fs):
    site = Site(tmp_path, images=small_fs / "images")
    _pull_fails(site, images["big-file"].ref(), NoSpaceError, "image dir")


# -- the admin command ---------------------------------------------------------------------


def test_convert_command_prints_the_id_and_places_the_files(images, tmp_path):
    img = images["basic"]
    out = subprocess.run(
        [
            *CONVERT,
            "--image-dir",
            str(tmp_path / "img"),
            "--state-dir",
            str(tmp_path / "st"),
            img.ref(),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GWCONFIG": ""},
    )
    image_id = out.stdout.strip()
    assert image_id == img.config_digest.split(":")[1]
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        f"{image_id}.meta",
        f"{image_id}.squashfs",
    ]
    assert "READY" in out.stderr and "Pulling layer" in out.stderr


def test_convert_command_error_is_one_clear_line(images, tmp_path):
    img = images["basic"]
    ref = f"{img.host}/{img.repo}:missing"
    out = subprocess.run(
        [
            *CONVERT,
            "--image-dir",
            str(tmp_path / "img"),
            "--state-dir",
            str(tmp_path / "st"),
            "-q",
            ref,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "GWCONFIG": ""},
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"ERROR: {ref}: tag 'missing' not found in {img.repo} at http://{img.host}"
    ]
    assert out.stdout == ""


def test_layer_that_is_not_a_tar(registry, both_sites, tmp_path):
    from world.imagebuild import BuiltLayer

    # A blob whose digest is right but whose bytes are a broken gzip stream.
    blob = tmp_path / "broken.gz"
    blob.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4096))
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    layer = BuiltLayer(
        path=blob,
        digest=digest,
        diff_id=digest,
        size=blob.stat().st_size,
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        compression="gzip",
    )
    push_image(registry, "bad/notatar", "v1", [layer], {"Cmd": ["/x"]})
    _pull_fails(
        both_sites, f"{registry.host}/bad/notatar:v1", LayerError, "malformed layer", digest
    )
