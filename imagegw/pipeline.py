"""The image pipeline: registry reference in, ``<id>.squashfs`` + ``<id>.meta`` out.

Steps and the gateway states they report (``on_status(state, message)``):
PULLING (manifest, layers into the cache, flattening), EXAMINATION (the site's
examiner, if any), CONVERSION (mksquashfs), TRANSFER (placing the files). Anything that
fails raises an :class:`~imagegw.errors.ImageError` naming the image and the cause, and
leaves no partial file in the image dir and no expanded tree behind.

Two ways from layers to squashfs, same image (docs/design/pipeline.md):
- **streaming** (the default): each layer's headers are read as soon as it is in the
  cache (imagegw.treeplan), the final tree is worked out in memory, and the surviving
  entries are streamed as one tar into ``tar2sqfs`` (imagegw.sqfstream). No tree on disk.
- **on disk**: flatten into ``ExpandDirectory``, run the examiner, ``mksquashfs``. Used
  when the site has an ``examiner`` (it needs a tree), when ``tar2sqfs`` is missing, or
  when ``ConverterOptions.squashfs`` holds an option only mksquashfs takes, or when the
  site sets ``StreamConversion: false``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GatewayConfig
from .errors import ConversionError, ImageError, LayerError, NoSpaceError
from .flatten import LayerFile, MalformedLayerError, UnsafeLayerError, flatten
from .layercache import LayerCache
from .meta import meta_from_config
from .reference import ImageRef, parse_reference
from .registry import Descriptor, RegistryClient, ResolvedImage
from .sqfstream import stream_squashfs, stream_unavailable
from .squashfs import SquashfsError, is_no_space, make_squashfs
from .transfer import LocalTransfer, Transfer, TransferError, pid_alive
from .treeplan import ScannedLayer, TreePlan, plan_tree, scan_layer

log = logging.getLogger(__name__)

StatusFn = Callable[[str, str], None]
ProgressFn = Callable[[str, int, int], None]  # (layer digest, bytes done, layer size)

# Layers fetched at once: enough to hide per-request latency of a remote registry,
# few enough not to thrash a gateway running several pulls.
DOWNLOAD_THREADS = 4


@dataclass
class PullResult:
    """What the gateway records about a finished pull."""

    image_id: str
    ref: ImageRef
    manifest_digest: str
    config: dict[str, Any]
    squashfs: Path
    meta: Path
    downloaded_bytes: int = 0
    cached_layers: int = 0
    reused: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def _section(self) -> dict[str, Any]:
        section = self.config.get("config") or {}
        return section if isinstance(section, dict) else {}

    @property
    def env(self) -> list[str]:
        return list(self._section.get("Env") or [])

    @property
    def entrypoint(self) -> list[str] | None:
        return self._section.get("Entrypoint")

    @property
    def cmd(self) -> list[str] | None:
        return self._section.get("Cmd")

    @property
    def workdir(self) -> str | None:
        return self._section.get("WorkingDir") or None

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._section.get("Labels") or {})


def pick_credentials(
    authorized_locations: Mapping[str, str] | None, location: str
) -> tuple[str, str] | None:
    """``user:pass`` for ``location``, else for ``default`` (the exact location wins)."""
    if not authorized_locations:
        return None
    value = authorized_locations.get(location) or authorized_locations.get("default")
    if not value or ":" not in value:
        return None
    user, password = value.split(":", 1)
    return user, password


def expand_prefix(image_id: str) -> str:
    """Expanded trees are named ``<id16>.<host>.<pid>.XXXX`` so that a restarted gateway
    can tell (and remove) what its dead predecessor left."""
    return f"{image_id[:16]}.{socket.gethostname()}.{os.getpid()}."


def clean_dead_expansions(expand_dir: Path) -> list[str]:
    """Remove expanded trees of dead processes of this host."""
    # The host name is matched whole: it may hold dots (gw1.example.org).
    pattern = re.compile(r"[0-9a-f]{1,16}\." + re.escape(socket.gethostname()) + r"\.(\d+)\.\w+")
    removed = []
    for path in expand_dir.iterdir() if expand_dir.exists() else []:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            pid = int(match.group(1))
            if pid != os.getpid() and not pid_alive(pid):
                _remove_tree(path)
                removed.append(path.name)
    return removed


def _remove_tree(path: Path) -> None:
    """Remove an expanded tree even where it holds directories without write permission."""

    def fix_and_retry(func: Callable[..., Any], target: str, exc_info: Any) -> None:
        if isinstance(exc_info[1], FileNotFoundError):
            return  # already gone: removed by another process, which is fine
        os.chmod(os.path.dirname(target), stat.S_IRWXU)
        func(target)

    shutil.rmtree(path, onerror=fix_and_retry)


class Pipeline:
    """Pull, flatten, convert and place images for one gateway configuration."""

    def __init__(
        self,
        config: GatewayConfig,
        image_dir: Path | None = None,
        *,
        transfer: Transfer | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if transfer is None:
            if image_dir is None:
                raise ValueError("Pipeline needs an image_dir or a transfer")
            transfer = LocalTransfer(Path(image_dir))
        self.config = config
        self.transfer = transfer
        self.image_dir = Path(transfer.image_dir)
        self.cache = LayerCache(config.cache_dir)
        # Extra RegistryClient arguments (retries, backoff, timeout), for tests and tools.
        self.client_options = dict(client_options or {})

    # -- the steps ---------------------------------------------------------------------

    def resolve(
        self, text: str, credentials: Mapping[str, str] | None = None
    ) -> tuple[ImageRef, RegistryClient, ResolvedImage]:
        ref = parse_reference(text, self.config.default_location, self.config.locations)
        loc = self.config.location(ref.location)
        client = RegistryClient(
            loc.url,
            image=text,
            credentials=pick_credentials(credentials, ref.location),
            cafile=loc.sslcacert,
            **self.client_options,
        )
        return ref, client, client.resolve(ref.repository, ref.reference, self.config.platform)

    def fetch_layers(
        self,
        text: str,
        client: RegistryClient,
        repo: str,
        layers: list[Descriptor],
        on_status: StatusFn,
        on_progress: ProgressFn | None,
        scans: list[ScannedLayer] | None = None,
    ) -> tuple[list[LayerFile], int, int]:
        """Bring every layer into the cache; returns (files, bytes downloaded, cache hits).

        With ``scans`` (an empty list), each layer's headers are also read, in the same
        worker thread right after its download (so reading one layer overlaps fetching
        the others), and the list is filled in layer order."""
        downloaded = 0
        hits = 0
        lock = threading.Lock()

        def one(desc: Descriptor) -> tuple[Path, ScannedLayer | None]:
            nonlocal downloaded, hits
            done = 0

            def progress(n: int) -> None:
                nonlocal done
                done += n
                if on_progress:
                    on_progress(desc.digest, done, desc.size)

            def fetch(f: Any) -> None:
                on_status("PULLING", f"Pulling layer {desc.digest}")
                client.fetch_blob(repo, desc, f, progress)

            try:
                path, fetched = self.cache.get(desc.digest, desc.size, fetch)
            except OSError as exc:
                if is_no_space(exc):
                    raise NoSpaceError(
                        text,
                        f"no space left in CacheDirectory {self.config.cache_dir} "
                        f"while fetching layer {desc.digest}",
                    ) from exc
                raise
            with lock:
                if fetched:
                    downloaded += desc.size
                else:
                    hits += 1
            return path, (scan_layer(path) if scans is not None else None)

        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        if on_progress:
            # Announce every layer first, so progress totals count layers not yet started.
            for desc in layers:
                cached = self.cache.has(desc.digest, desc.size)
                on_progress(desc.digest, desc.size if cached else 0, desc.size)
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_THREADS, max(1, len(layers)))) as pool:
            done = list(pool.map(one, layers))
        files = [LayerFile(path=p, digest=d.digest) for (p, _), d in zip(done, layers, strict=True)]
        if scans is not None:
            scans[:] = [scanned for _, scanned in done if scanned is not None]
        return files, downloaded, hits

    def streaming_unavailable(self) -> str | None:
        """Why this configuration needs the on-disk path (None: it can stream)."""
        if not self.config.stream_conversion:
            return "StreamConversion is false"
        if self.config.examiner:
            return "an examiner is configured (it runs on an expanded tree)"
        return stream_unavailable(self.config.converter_options.get("squashfs"))

    def plan(
        self,
        text: str,
        layers: list[LayerFile],
        scans: list[ScannedLayer],
        warn: Callable[[str], None],
    ) -> TreePlan:
        """The final tree from the scanned headers; bad layers raise LayerError."""
        try:
            return plan_tree(layers, scans, warn=warn)
        except MalformedLayerError as exc:
            raise LayerError(text, f"malformed layer: {exc}") from exc
        except UnsafeLayerError as exc:
            raise LayerError(text, f"unsafe layer refused: {exc}") from exc

    def convert_streaming(
        self, text: str, plan: TreePlan, layers: list[LayerFile], image_id: str
    ) -> Path:
        """Stream the planned tree into tar2sqfs, into a partial file; returns its path."""
        options = self.config.converter_options.get("squashfs")
        return self._write_squashfs(
            text, image_id, lambda tmp: stream_squashfs(plan, layers, tmp, options))

    def expand(self, text: str, layers: list[LayerFile], root: Path, warn: Callable[[str], None]):
        try:
            return flatten(layers, root, warn=warn)
        except MalformedLayerError as exc:
            raise LayerError(text, f"malformed layer: {exc}") from exc
        except UnsafeLayerError as exc:
            raise LayerError(text, f"unsafe layer refused: {exc}") from exc
        except OSError as exc:
            if is_no_space(exc):
                raise NoSpaceError(
                    text,
                    f"no space left in ExpandDirectory {self.config.expand_dir} while "
                    "flattening layers (free space there or point ExpandDirectory at a "
                    "larger filesystem)",
                ) from exc
            raise

    def examine(self, text: str, root: Path, image_id: str) -> None:
        examiner = self.config.examiner
        if not examiner:
            return
        proc = subprocess.run(
            [str(examiner), str(root), image_id], capture_output=True, text=True, errors="replace"
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
            raise ImageError(
                text, f"examiner {examiner} rejected the image (exit {proc.returncode}) {detail[0]}"
            )

    def convert(self, text: str, root: Path, image_id: str, mode_fixes: Mapping[str, int]) -> Path:
        """mksquashfs into a partial file in the image dir; returns its path."""
        options = self.config.converter_options.get("squashfs")
        return self._write_squashfs(
            text, image_id, lambda tmp: make_squashfs(root, tmp, options, mode_fixes))

    def _write_squashfs(self, text: str, image_id: str, write: Callable[[Path], None]) -> Path:
        """``write`` the image into a partial file in the staging dir; returns its path.
        Any failure removes the partial file and raises the pull's error for it."""
        fmt = self.config.default_format
        if fmt != "squashfs":
            raise ConversionError(text, f"image format '{fmt}' is not supported (use squashfs)")
        tmp = self.transfer.staging(f"{image_id}.squashfs")
        try:
            write(tmp)
        except SquashfsError as exc:
            tmp.unlink(missing_ok=True)
            if exc.no_space:
                raise NoSpaceError(
                    text, f"no space left in the image dir {self.image_dir} for the squashfs"
                ) from exc
            raise ConversionError(text, str(exc)) from exc
        except MalformedLayerError as exc:  # a layer read again while streaming
            tmp.unlink(missing_ok=True)
            raise LayerError(text, f"malformed layer: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def write_meta(
        self,
        image_id: str,
        config: dict[str, Any],
        user_acl: Iterable[int],
        group_acl: Iterable[int],
        warn: Callable[[str], None],
    ) -> Path:
        text = meta_from_config(
            config,
            fmt=self.config.default_format,
            user_acl=list(user_acl),
            group_acl=list(group_acl),
            warn=warn,
        )
        self.transfer.write(f"{image_id}.meta", text.encode())
        return self.image_dir / f"{image_id}.meta"

    # -- the whole pull ----------------------------------------------------------------

    def pull(
        self,
        text: str,
        *,
        credentials: Mapping[str, str] | None = None,
        user_acl: Iterable[int] = (),
        group_acl: Iterable[int] = (),
        on_status: StatusFn | None = None,
        on_progress: ProgressFn | None = None,
        force: bool = False,
    ) -> PullResult:
        """Pull ``text`` and leave ``<id>.squashfs`` and ``<id>.meta`` in the image dir.

        The layers it uses stay pinned in the cache (never pruned) until it returns."""
        with self.cache.pinned():
            return self._pull(text, credentials, user_acl, group_acl, on_status, on_progress, force)

    def _pull(
        self,
        text: str,
        credentials: Mapping[str, str] | None,
        user_acl: Iterable[int],
        group_acl: Iterable[int],
        on_status: StatusFn | None,
        on_progress: ProgressFn | None,
        force: bool,
    ) -> PullResult:
        status = on_status or (lambda _state, _msg: None)
        warnings: list[str] = []
        status("PULLING", "Getting manifest")
        ref, client, resolved = self.resolve(text, credentials)
        image_id = resolved.image_id
        sqfs = self.image_dir / f"{image_id}.squashfs"
        if self.transfer.exists(sqfs.name) and not force:
            # Same image already converted (another tag, or a re-pull): metadata only.
            status("TRANSFER", "Image already on disk: updating metadata")
            meta = self.write_meta(image_id, resolved.config, user_acl, group_acl, warnings.append)
            return PullResult(
                image_id,
                ref,
                resolved.manifest_digest,
                resolved.config,
                sqfs,
                meta,
                reused=True,
                warnings=warnings,
            )
        on_disk = self.streaming_unavailable()
        if on_disk:
            log.info("converting on disk: %s image=%s", on_disk, text)
        scans: list[ScannedLayer] | None = None if on_disk else []
        layers, downloaded, hits = self.fetch_layers(
            text, client, ref.repository, resolved.layers, status, on_progress, scans
        )
        root: Path | None = None
        tmp_sqfs: Path | None = None
        try:
            if scans is not None:
                status("PULLING", "Working out the final tree from the layer headers")
                plan = self.plan(text, layers, scans, warnings.append)
                status("CONVERSION", "Streaming the layers into squashfs")
                tmp_sqfs = self.convert_streaming(text, plan, layers, image_id)
            else:
                self.config.expand_dir.mkdir(parents=True, exist_ok=True)
                root = Path(
                    tempfile.mkdtemp(prefix=expand_prefix(image_id), dir=self.config.expand_dir)
                )
                status("PULLING", "Expanding layers")
                result = self.expand(text, layers, root, warnings.append)
                status("EXAMINATION", "Examining image")
                self.examine(text, root, image_id)
                status("CONVERSION", "Converting to squashfs")
                tmp_sqfs = self.convert(text, root, image_id, result.mode_fixes)
                _remove_tree(root)
            status("TRANSFER", "Placing image")
            try:
                self.transfer.commit(tmp_sqfs, sqfs.name, 0o644)
            except TransferError as exc:
                raise ConversionError(text, str(exc)) from exc
            tmp_sqfs = None
            meta = self.write_meta(image_id, resolved.config, user_acl, group_acl, warnings.append)
        except OSError as exc:
            if is_no_space(exc):
                raise NoSpaceError(text, f"no space left while placing the image: {exc}") from exc
            raise ImageError(text, f"{exc.strerror or exc}: {exc.filename or ''}") from exc
        finally:
            if tmp_sqfs is not None:
                tmp_sqfs.unlink(missing_ok=True)
            if root is not None and root.exists():
                _remove_tree(root)
        return PullResult(
            image_id,
            ref,
            resolved.manifest_digest,
            resolved.config,
            sqfs,
            meta,
            downloaded_bytes=downloaded,
            cached_layers=hits,
            warnings=warnings,
        )
