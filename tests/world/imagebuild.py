"""Build real OCI/Docker image layers and push them to a registry over its HTTP API.

Test-world helper: it deliberately does not use the project's own code, so that a bug in
our registry client or layer flattener cannot hide itself behind the same bug here.

A layer is an ordered list of entries (``File``, ``Dir``, ``Symlink``, ``Hardlink``,
``Whiteout``, ``Opaque``, ``Device``, ``Raw``). ``build_layer`` writes them to a tar stream that
is hashed (diff_id), compressed and hashed again (digest) in one pass straight into a file
on disk, so a 100 MB layer never exists as one ``bytes`` object. Every timestamp, owner name
and compressor header field is fixed, so one entry list always gives the same digests.

Coupling to ``tests/world/registry.py`` is kept to duck typing (see ``resolve_target``):
the registry argument may be

* an object with ``.url`` (``"http://127.0.0.1:PORT"``) and optionally ``.session``
  (a ``requests.Session``, or a zero-argument callable returning one, e.g. already
  carrying Basic auth or a Bearer-token hook);
* a ``(base_url, requests.Session)`` tuple;
* a plain base URL string (anonymous).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import requests

# A fixed timestamp for every tar member, so layer digests do not depend on when we build.
DEFAULT_MTIME = 1_600_000_000
CREATED = "2020-09-13T12:26:40Z"

# Media types -------------------------------------------------------------------------
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

# Without an OCI type here the registry answers 404 for OCI manifests and silently
# downgrades schema 2 to schema 1 (see test-world.md), so always ask for all of them.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

_OCI_LAYER_TYPES = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
_DOCKER_LAYER_TYPES = {"none": DOCKER_LAYER, "gzip": DOCKER_LAYER_GZIP}


# Content generation --------------------------------------------------------------------
class RandomData:
    """Seeded pseudo-random content of ``size`` bytes, produced on demand.

    Use as ``File(path, data=RandomData(100 << 20, seed=1))``: the tar writer pulls it
    in chunks, so huge files cost no memory, and the same seed gives the same bytes.
    """

    def __init__(self, size: int, seed: int | str = 0) -> None:
        self.size = size
        self.seed = seed

    def open(self) -> BinaryIO:
        return _RandomReader(self.size, self.seed)  # type: ignore[return-value]

    def sha256(self) -> str:
        """Hex sha256 of the content (re-generates it; cheap relative to a test's pull)."""
        h = hashlib.sha256()
        r = _RandomReader(self.size, self.seed)
        while chunk := r.read(1 << 20):
            h.update(chunk)
        return h.hexdigest()


class _RandomReader(io.RawIOBase):
    def __init__(self, size: int, seed: int | str) -> None:
        self._left = size
        self._rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        n = min(n, self._left, 4 << 20)
        if n <= 0:
            return b""
        self._left -= n
        return self._rng.randbytes(n)


Content = bytes | str | RandomData


def _content_size(data: Content) -> int:
    if isinstance(data, RandomData):
        return data.size
    return len(data.encode() if isinstance(data, str) else data)


def _content_stream(data: Content) -> BinaryIO:
    if isinstance(data, RandomData):
        return data.open()
    return io.BytesIO(data.encode() if isinstance(data, str) else data)


# Layer entries -------------------------------------------------------------------------
def _norm(path: str) -> str:
    """Image paths are written relative ("etc/passwd"), like docker/buildkit layers."""
    p = str(PurePosixPath("/" + path.lstrip("/"))).lstrip("/")
    return p or "."


@dataclass
class File:
    path: str
    data: Content = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: dict[str, bytes | str] = field(default_factory=dict)


@dataclass
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: dict[str, bytes | str] = field(default_factory=dict)


@dataclass
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME


@dataclass
class Hardlink:
    """A second name for ``target`` (an image path, in this layer or a lower one)."""

    path: str
    target: str
    mtime: int = DEFAULT_MTIME


@dataclass
class Whiteout:
    """Deletes ``path`` from lower layers: emitted as ``<dir>/.wh.<name>``."""

    path: str


@dataclass
class Opaque:
    """Hides what lower layers put in ``dir``: emitted as ``<dir>/.wh..wh..opq``."""

    dir: str


@dataclass
class Device:
    path: str
    kind: str = "char"  # "char" | "block" | "fifo"
    major: int = 0
    minor: int = 0
    mode: int = 0o666


@dataclass
class Raw:
    """A tar member written exactly as given: for hostile names and links.

    No normalisation at all, so ``name="../escape"`` or ``"/abs"`` reach the tar verbatim.
    """

    tarinfo: tarfile.TarInfo
    data: bytes | None = None


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Device | Raw


def raw_file(name: str, data: bytes = b"", mode: int = 0o644) -> Raw:
    """Shorthand for a Raw regular file with an arbitrary (possibly hostile) name."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, DEFAULT_MTIME
    return Raw(ti, data)


def raw_link(name: str, target: str, hard: bool = False) -> Raw:
    """Shorthand for a Raw symlink (or hardlink) with arbitrary name and target."""
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    ti.linkname, ti.mode, ti.mtime = target, 0o777, DEFAULT_MTIME
    return Raw(ti)


def _xattr_pax(xattrs: dict[str, bytes | str]) -> dict[str, str]:
    out = {}
    for k, v in xattrs.items():
        # tarfile writes str values; surrogateescape round-trips arbitrary bytes (a binary
        # security.capability) and makes tarfile add "hdrcharset=BINARY" as POSIX asks.
        sval = v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
        out["SCHILY.xattr." + k] = sval
    return out


def _tarinfo(name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0,
             mtime: int = DEFAULT_MTIME) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type_, mode, uid, gid, mtime
    # Empty user/group names: GNU tar would otherwise map names to host ids.
    ti.uname = ti.gname = ""
    return ti


def _to_members(e: Entry) -> tuple[tarfile.TarInfo, BinaryIO | None]:
    if isinstance(e, Raw):
        return e.tarinfo, (io.BytesIO(e.data) if e.data is not None else None)
    if isinstance(e, File):
        ti = _tarinfo(_norm(e.path), tarfile.REGTYPE, e.mode, e.uid, e.gid, e.mtime)
        ti.size = _content_size(e.data)
        ti.pax_headers = _xattr_pax(e.xattrs)
        return ti, _content_stream(e.data)
    if isinstance(e, Dir):
        ti = _tarinfo(_norm(e.path), tarfile.DIRTYPE, e.mode, e.uid, e.gid, e.mtime)
        ti.pax_headers = _xattr_pax(e.xattrs)
        return ti, None
    if isinstance(e, Symlink):
        ti = _tarinfo(_norm(e.path), tarfile.SYMTYPE, 0o777, e.uid, e.gid, e.mtime)
        ti.linkname = e.target  # verbatim: relative vs absolute is what's being tested
        return ti, None
    if isinstance(e, Hardlink):
        ti = _tarinfo(_norm(e.path), tarfile.LNKTYPE, 0o644, mtime=e.mtime)
        ti.linkname = _norm(e.target)
        return ti, None
    if isinstance(e, Whiteout):
        p = PurePosixPath(_norm(e.path))
        return _tarinfo(_norm(str(p.parent / (".wh." + p.name))), tarfile.REGTYPE, 0o644), None
    if isinstance(e, Opaque):
        d = _norm(e.dir)
        name = ".wh..wh..opq" if d == "." else d + "/.wh..wh..opq"
        return _tarinfo(name, tarfile.REGTYPE, 0o644), None
    if isinstance(e, Device):
        kinds = {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
        ti = _tarinfo(_norm(e.path), kinds[e.kind], e.mode)
        ti.devmajor, ti.devminor = e.major, e.minor
        return ti, None
    raise TypeError(f"not a layer entry: {e!r}")


def _entry_path(e: Entry) -> str | None:
    if isinstance(e, Raw):
        return None
    if isinstance(e, Opaque):
        return _norm(e.dir) + "/.wh..wh..opq"
    return _norm(e.path)


def _with_parents(entries: Sequence[Entry]) -> list[Entry]:
    """Insert ``Dir`` entries (0755, root) for parents a layer uses but never declares.

    Tar does not need them, but every extractor invents its own mode for implicit
    parents; declaring them keeps the expected tree the same for all extractors.
    """
    declared = {_norm(e.path) for e in entries if isinstance(e, Dir)}
    seen: set[str] = set()
    out: list[Entry] = []
    for e in entries:
        p = _entry_path(e)
        if p is not None:
            for parent in reversed(PurePosixPath(p).parents):
                sp = str(parent)
                if sp == "." or sp in declared or sp in seen:
                    continue
                seen.add(sp)
                out.append(Dir(sp))
        if isinstance(e, Dir):
            seen.add(_norm(e.path))
        out.append(e)
    return out


# Building a layer ----------------------------------------------------------------------
class _HashWriter(io.RawIOBase):
    """Write-through file object that hashes and counts what passes."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        mv = memoryview(b)
        self.sha.update(mv)
        self._sink.write(mv)
        self.count += len(mv)
        return len(mv)

    def tell(self) -> int:
        return self.count


@dataclass
class BuiltLayer:
    path: Path  # the compressed blob on disk
    digest: str  # sha256:… of the blob as pushed
    diff_id: str  # sha256:… of the uncompressed tar
    size: int  # blob size in bytes
    media_type: str  # OCI layer media type (see media_type_for for Docker)
    compression: str = "gzip"

    def media_type_for(self, fmt: str) -> str:
        """The layer media type to put in a manifest of format ``fmt``."""
        if fmt == "oci":
            return _OCI_LAYER_TYPES[self.compression]
        if self.compression not in _DOCKER_LAYER_TYPES:
            raise ValueError("Docker schema 2 has no zstd layer type: use fmt='oci'")
        return _DOCKER_LAYER_TYPES[self.compression]


def build_layer(entries: Iterable[Entry], compression: str = "gzip",
                workdir: str | os.PathLike[str] = ".", *, level: int | None = None,
                auto_parents: bool = True, name: str | None = None) -> BuiltLayer:
    """Write ``entries`` as a PAX tar, compress it, and return its digests.

    ``compression`` is "gzip", "zstd" or "none"; ``level`` overrides the compressor level
    (use 1 for big random content). ``auto_parents`` adds undeclared parent directories.
    """
    if compression not in _OCI_LAYER_TYPES:
        raise ValueError(f"unknown compression {compression!r}")
    entries = list(entries)
    if auto_parents:
        entries = _with_parents(entries)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ext = {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}[compression]
    tmp = workdir / f".layer-{os.getpid()}-{id(entries)}{ext}.tmp"

    with open(tmp, "wb") as raw_out:
        blob = _HashWriter(raw_out)
        comp: Any
        if compression == "gzip":
            # mtime=0 and no file name: the gzip header must not vary between builds.
            comp = gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0,
                                 compresslevel=6 if level is None else level)
        elif compression == "zstd":
            import zstandard

            comp = zstandard.ZstdCompressor(level=3 if level is None else level).stream_writer(
                blob, closefd=False, write_return_read=True)
        else:
            comp = None
        tar_sink = _HashWriter(comp if comp is not None else blob)
        with tarfile.open(fileobj=tar_sink, mode="w", format=tarfile.PAX_FORMAT,
                          encoding="utf-8") as tf:
            for e in entries:
                ti, data = _to_members(e)
                tf.addfile(ti, data)
        if comp is not None:
            comp.close()
    digest = "sha256:" + blob.sha.hexdigest()
    final = workdir / (name or digest.split(":")[1] + ext)
    os.replace(tmp, final)
    return BuiltLayer(path=final, digest=digest, diff_id="sha256:" + tar_sink.sha.hexdigest(),
                      size=blob.count, media_type=_OCI_LAYER_TYPES[compression],
                      compression=compression)


# Pushing -------------------------------------------------------------------------------
def resolve_target(target: Any) -> tuple[str, requests.Session]:
    """Turn a Registry object, ``(base_url, session)`` or URL into ``(base_url, session)``."""
    if isinstance(target, tuple):
        url, sess = target
    elif isinstance(target, str):
        url, sess = target, None
    else:
        url = target.url
        sess = getattr(target, "session", None)
        if sess is not None and not isinstance(sess, requests.Session) and callable(sess):
            sess = sess()
    if sess is None:
        sess = requests.Session()
    url = str(url).rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url, sess


def _check(r: requests.Response, what: str) -> None:
    if r.status_code >= 300:
        raise RuntimeError(f"{what}: HTTP {r.status_code} {r.text[:500]}")


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def push_blob(target: Any, repo: str, digest: str, data: bytes | Path) -> None:
    """Upload one blob (monolithic POST + PUT) unless the registry already has it."""
    base, s = resolve_target(target)
    if s.head(f"{base}/v2/{repo}/blobs/{digest}").status_code == 200:
        return
    r = s.post(f"{base}/v2/{repo}/blobs/uploads/")
    _check(r, f"start upload to {repo}")
    loc = r.headers["Location"]
    if loc.startswith("/"):
        loc = base + loc
    loc += ("&" if "?" in loc else "?") + "digest=" + digest
    headers = {"Content-Type": "application/octet-stream"}
    if isinstance(data, Path):
        headers["Content-Length"] = str(data.stat().st_size)
        with open(data, "rb") as f:  # streamed: big layers are not read into memory
            r = s.put(loc, data=f, headers=headers)
    else:
        r = s.put(loc, data=data, headers=headers)
    _check(r, f"upload {digest} to {repo}")


def push_manifest(target: Any, repo: str, ref: str, body: bytes, media_type: str) -> str:
    """PUT a manifest/index under a tag or digest; returns its digest."""
    base, s = resolve_target(target)
    r = s.put(f"{base}/v2/{repo}/manifests/{ref}", data=body,
              headers={"Content-Type": media_type})
    _check(r, f"push manifest {repo}:{ref}")
    digest = _sha(body)
    got = r.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise RuntimeError(f"registry stored {repo}:{ref} as {got}, we computed {digest}")
    return digest


@dataclass
class PushedImage:
    repo: str
    tag: str | None
    manifest_digest: str
    config_digest: str
    manifest_bytes: bytes
    manifest_media_type: str
    config_bytes: bytes
    config_json: dict[str, Any]
    layers: list[BuiltLayer]
    platform: tuple[str, ...]
    fmt: str


@dataclass
class PushedIndex:
    repo: str
    tag: str
    digest: str  # digest of the list/index itself
    index_bytes: bytes
    media_type: str
    images: dict[tuple[str, ...], PushedImage]  # platform -> per-platform image
    fmt: str

    @property
    def manifest_digest(self) -> str:
        return self.digest


def make_config(config: dict[str, Any], layers: Sequence[BuiltLayer],
                platform: Sequence[str] = ("linux", "amd64")) -> dict[str, Any]:
    """The image config JSON: ``config`` is the container part (Env, Cmd, ...)."""
    cfg: dict[str, Any] = {
        "architecture": platform[1],
        "os": platform[0],
        "created": CREATED,
        "config": dict(config),
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "history": [{"created": CREATED, "created_by": f"imagebuild layer {i}"}
                    for i in range(len(layers))],
    }
    if len(platform) > 2:
        cfg["variant"] = platform[2]
    return cfg


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def push_image(target: Any, repo: str, tag: str | None, layers: Sequence[BuiltLayer],
               config: dict[str, Any], fmt: str = "docker",
               platform: Sequence[str] = ("linux", "amd64")) -> PushedImage:
    """Push layers, config and a schema-2 (fmt="docker") or OCI manifest.

    ``tag=None`` pushes the manifest by digest only (for index members).
    """
    if fmt not in ("docker", "oci"):
        raise ValueError(fmt)
    layer_types = [la.media_type_for(fmt) for la in layers]  # fails early on docker+zstd
    for la in layers:
        push_blob(target, repo, la.digest, la.path)
    cfg = make_config(config, layers, platform)
    cfg_bytes = _dump(cfg)
    cfg_digest = _sha(cfg_bytes)
    push_blob(target, repo, cfg_digest, cfg_bytes)
    mtype = DOCKER_MANIFEST if fmt == "docker" else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": {"mediaType": DOCKER_CONFIG if fmt == "docker" else OCI_CONFIG,
                   "size": len(cfg_bytes), "digest": cfg_digest},
        "layers": [{"mediaType": t, "size": la.size, "digest": la.digest}
                   for t, la in zip(layer_types, layers, strict=True)],
    }
    body = _dump(manifest)
    digest = push_manifest(target, repo, tag or _sha(body), body, mtype)
    return PushedImage(repo=repo, tag=tag, manifest_digest=digest, config_digest=cfg_digest,
                       manifest_bytes=body, manifest_media_type=mtype, config_bytes=cfg_bytes,
                       config_json=cfg, layers=list(layers), platform=tuple(platform), fmt=fmt)


def push_index(target: Any, repo: str, tag: str,
               images: Sequence[tuple[Sequence[str], PushedImage]],
               fmt: str = "docker") -> PushedIndex:
    """Push a Docker manifest list or OCI index over images already pushed to ``repo``.

    The member manifests are (re)pushed by digest so they exist even if they were
    pushed untagged or under another tag.
    """
    mtype = DOCKER_LIST if fmt == "docker" else OCI_INDEX
    entries = []
    by_platform: dict[tuple[str, ...], PushedImage] = {}
    for plat, img in images:
        if img.repo != repo:
            raise ValueError(f"index member {img.repo} is not in {repo}")
        push_manifest(target, repo, img.manifest_digest, img.manifest_bytes,
                      img.manifest_media_type)
        p: dict[str, str] = {"architecture": plat[1], "os": plat[0]}
        if len(plat) > 2:
            p["variant"] = plat[2]
        entries.append({"mediaType": img.manifest_media_type, "size": len(img.manifest_bytes),
                        "digest": img.manifest_digest, "platform": p})
        by_platform[tuple(plat)] = img
    body = _dump({"schemaVersion": 2, "mediaType": mtype, "manifests": entries})
    digest = push_manifest(target, repo, tag, body, mtype)
    return PushedIndex(repo=repo, tag=tag, digest=digest, index_bytes=body, media_type=mtype,
                       images=by_platform, fmt=fmt)


def get_manifest(target: Any, repo: str, ref: str) -> requests.Response:
    """GET a manifest with the full Accept list (raises on HTTP errors)."""
    base, s = resolve_target(target)
    r = s.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})
    _check(r, f"get manifest {repo}:{ref}")
    return r


def get_blob(target: Any, repo: str, digest: str) -> bytes:
    """GET a (small) blob's bytes."""
    base, s = resolve_target(target)
    r = s.get(f"{base}/v2/{repo}/blobs/{digest}")
    _check(r, f"get blob {repo}@{digest}")
    return r.content


def cap_v2(permitted: int, effective: bool = True, inheritable: int = 0) -> bytes:
    """A well-formed ``security.capability`` value (VFS_CAP_REVISION_2, 20 bytes)."""
    magic = 0x02000000 | (1 if effective else 0)
    vals = [magic, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF,
            permitted >> 32, inheritable >> 32]
    return b"".join(v.to_bytes(4, "little") for v in vals)
