"""The image manager: pull, lookup, list, import, expire, metrics over the record store.

Rules of docs/behaviour.md, 'Gateway: records' to 'Gateway: import', including where we
differ from Shifter. Work runs in a pool of ``WorkerThreads`` threads per process; several
processes (gunicorn workers, gateway hosts) share one store, and a pull is *claimed* in the
store before it starts, so however many processes see the request, one pulls. Every
in-flight record names its owner (``host:pid:token``) and carries a heartbeat: a restarted
gateway re-queues what its dead predecessor left, and anything whose owner stopped beating
is taken over.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from . import telemetry
from .acl import AclError, Caller, can_read, parse_ids
from .config import GatewayConfig, Platform, parse_duration
from .errors import ImageError, InvalidReference
from .fasthash import fasthash
from .layercache import LayerCache
from .metrics_batch import MetricsBatcher
from .pipeline import Pipeline, PullResult, clean_dead_expansions
from .reference import parse_reference
from .store.base import EXPIRED, FAILURE, INFLIGHT, READY, Record, RecordStore
from .transfer import Transfer, TransferError, pid_alive, transfer_for

log = logging.getLogger(__name__)

__all__ = ["ImageManager", "parse_duration", "normalize_tag", "check_squashfs"]

# A READY record pulled this recently is returned as is
# (docs/behaviour.md, 'Gateway: pull de-duplication').
RECENT = 10.0
HEARTBEAT_EVERY = 5.0
PULL_STATES = ("INIT", "PENDING", "PULLING", "EXAMINATION", "CONVERSION", "TRANSFER")
_CUSTOM_TAG = re.compile(r"[A-Za-z0-9_:.+@/-]+\Z")
SQUASHFS_MAGIC = b"hsqs"


class GatewayError(Exception):
    """An error the API turns into an HTTP status with a message a person can act on."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(GatewayError):
    status = 400


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


def normalize_tag(itype: str, tag: str) -> str:
    """Validate a tag; docker and custom tags without a tag part get ``:latest``."""
    if not tag or len(tag) > 512:
        raise BadRequest("image tag is empty or too long")
    if itype == "docker":
        try:
            ref = parse_reference(tag)
        except InvalidReference as exc:
            raise BadRequest(f"malformed image tag '{tag}': {exc.cause}") from None
        if ref.digest:
            return tag
    elif itype == "custom":
        if not _CUSTOM_TAG.match(tag):
            raise BadRequest(f"malformed image tag '{tag}': only [A-Za-z0-9_:.+@/-] allowed")
    else:
        raise BadRequest(f"unknown image type '{itype}' (docker or custom)")
    last = tag.rsplit("/", 1)[-1]
    return tag if ":" in last else f"{tag}:latest"


# Every lookup normalises the tag it was asked for, and nodes ask for few distinct tags.
# A bad tag raises, and exceptions are not cached.
_normalized = functools.lru_cache(maxsize=4096)(normalize_tag)


def _queued(
    owner: str, now: float, uacl: list[int], gacl: list[int], caller: Caller
) -> dict[str, Any]:
    """Fields of a record just claimed by ``owner`` for ``caller``, waiting for a worker."""
    return {
        "requester": caller.user,  # for the log lines of a pull re-queued after a restart
        # Who may remove the image besides admins (docs/behaviour.md, 'Gateway: removal').
        "puller_uid": caller.uid,
        "status": "PENDING",
        "status_message": "Queued",
        "last_heartbeat": now,
        "owner": owner,
        "userACL": uacl,
        "groupACL": gacl,
        "private": bool(uacl or gacl),
    }


def _not_removable_by(rec: Record, caller: Caller, name: str, system: str) -> str | None:
    """Why ``caller`` (no admin) may not remove ``rec``, or None if they may."""
    if not (rec.get("private") and (rec.get("userACL") or rec.get("groupACL"))):
        return (
            f"{name} is a public image: only an admin of {system} can remove it "
            "(they use shifterimg expire)"
        )
    puller = rec.get("puller_uid")
    if puller is None:
        return (
            f"{name} was not pulled by you alone (pulled by several users, or before "
            f"users could remove images): ask an admin of {system} to remove it"
        )
    if puller != caller.uid:
        who = rec.get("requester") or f"uid {puller}"
        return f"{name} was pulled by {who}: only they or an admin of {system} can remove it"
    return None


def _host_pid(owner: str | None) -> tuple[str, int] | None:
    if not owner:
        return None
    parts = owner.split(":")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


class ImageManager:
    """Everything the HTTP API does, minus HTTP."""

    def __init__(
        self,
        config: GatewayConfig,
        store: RecordStore,
        clock: Callable[[], float] = time.time,
        *,
        client_options: Mapping[str, Any] | None = None,
        metrics_batch_seconds: float = 0.0,
    ) -> None:
        """``clock()`` answers the time (seconds since the epoch) for every rule; tests
        hand in one that moves only when they say so. ``metrics_batch_seconds`` > 0:
        lookups queue their metrics rows and a thread writes them that often (the
        service's setting, see imagegw/metrics_batch.py); 0: each row is written before
        the lookup answers."""
        self.gw = config
        self.store = store
        self.clock = clock
        self.platforms: dict[str, Platform] = dict(config.platforms)
        self.pull_update_timeout = config.pull_update_timeout
        self.expiration = config.image_expiration
        self.heartbeat_timeout = config.pull_heartbeat_timeout
        self.workers = config.worker_threads
        self.metrics_on = config.metrics
        self.client_options = dict(client_options or {})
        self._last_trim: float | None = None
        self._batch = (
            MetricsBatcher(store, metrics_batch_seconds)
            if self.metrics_on and metrics_batch_seconds > 0
            else None
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}

    # -- plumbing --------------------------------------------------------------------

    def _new_owner(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            # A pool made before a fork has no threads in the child: make one per process.
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(max(1, self.workers), "imagegw-worker")
                self._pool_pid = os.getpid()
            self._pool.submit(self._guard, fn, *args)

    @staticmethod
    def _guard(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a worker must never die silently
            log.exception("worker job failed")

    def shutdown(self, wait: bool = True) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=wait)

    def platform(self, system: str) -> Platform:
        if system not in self.platforms:
            raise NotFound(f"unknown system '{system}'")
        return self.platforms[system]

    def transfer(self, system: str) -> Transfer:
        if system not in self._transfers:
            try:
                self._transfers[system] = transfer_for(
                    self.platform(system).entry, self.gw.expand_dir / "staging"
                )
            except TransferError as exc:
                raise GatewayError(f"platform {system}: {exc}") from None
        return self._transfers[system]

    def is_admin(self, caller: Caller, system: str) -> bool:
        return caller.user in self.platform(system).admins  # exact membership (unlike Shifter)

    def _require_admin(self, caller: Caller, system: str, action: str) -> None:
        if not self.is_admin(caller, system):
            log.warning("admin refused action=%s user=%s system=%s", action, caller.user, system)
            raise Forbidden(f"user {caller.user} is not an admin of system {system}")

    # -- reading -------------------------------------------------------------------------

    def lookup(self, caller: Caller, system: str, itype: str, tag: str) -> Mapping[str, Any]:
        """The READY record ``tag`` names, if ``caller`` may read it: read-only, and the
        same object for later lookups while the record is unchanged (the store's
        ``find_tagged_shared``)."""
        self.platform(system)
        tag = _normalized(itype, tag)
        rec = self.store.find_tagged_shared(system, tag, READY)
        if rec is None or rec.get("itype") != itype or not can_read(rec, caller):
            telemetry.LOOKUPS_NOT_FOUND.inc()
            log.debug("lookup not found user=%s system=%s tag=%s", caller.user, system, tag)
            raise NotFound("image not found")
        telemetry.LOOKUPS_FOUND.inc()
        log.debug("lookup user=%s system=%s tag=%s id=%s", caller.user, system, tag, rec.get("id"))
        now = self.clock()
        # Extend the expiration, but write only when it moved noticeably: lookups are the
        # hot path, and a write per lookup would serialise every node on the database.
        # The write moves the store's change counter: the next lookup reads the record anew.
        if float(rec.get("expiration") or 0) < now + self.expiration - 60:
            rec = MappingProxyType({**rec, "expiration": now + self.expiration})
            self.store.update(rec["_id"], {"expiration": rec["expiration"]})
        if self.metrics_on:
            row = {
                "user": caller.user,
                "uid": caller.uid,
                "system": system,
                "type": itype,
                "tag": tag,
                "id": rec.get("id"),
                "time": now,
            }
            if self._batch is not None:
                self._batch.add(row)
            else:
                self.store.add_metric(row)
            self._trim_metrics(now)
        return rec

    def _trim_metrics(self, now: float) -> None:
        """Keep at most ``MetricsRetention`` rows, dropping the oldest. At most once a
        minute per process: the trim is cheap, but lookups are the hot path."""
        keep = self.gw.metrics_retention
        if keep is None or (self._last_trim is not None and now - self._last_trim < 60):
            return
        self._last_trim = now
        dropped = self.store.trim_metrics(keep)
        if dropped:
            log.info("metrics rows trimmed dropped=%d kept=%d", dropped, keep)

    def list(self, caller: Caller, system: str) -> list[Record]:
        self.platform(system)
        return [r for r in self.store.list(system, status=[READY]) if can_read(r, caller)]

    def queue(self, caller: Caller, system: str) -> list[dict[str, Any]]:
        self.platform(system)
        records = self.store.list(system, exclude_status=[READY, EXPIRED])
        # Beyond Shifter: the message too, so a client can say why an import or pull failed.
        return [
            {
                "status": r.get("status"),
                "image": r.get("pulltag"),
                "status_message": r.get("status_message", ""),
            }
            for r in records
        ]

    def metrics(self, caller: Caller, system: str, limit: Any = 10) -> list[Record]:
        self.platform(system)
        self._require_admin(caller, system, "metrics")
        try:
            count = int(limit)
        except (TypeError, ValueError):
            raise BadRequest(f"limit must be a whole number, not '{limit}'") from None
        if count < 1:
            raise BadRequest("limit must be at least 1")
        self.flush_metrics()  # this process's queued rows; other workers' follow within a second
        return self.store.last_metrics(min(count, 100), system)

    def flush_metrics(self) -> None:
        """Write this process's queued metrics rows now (batched mode; else nothing)."""
        if self._batch is not None:
            self._batch.flush()

    # -- pulling ---------------------------------------------------------------------

    def _current(self, system: str, itype: str, tag: str) -> Record | None:
        pulled = self.store.find_pull(system, itype, tag)
        # A FAILURE counts as "in flight" here, as in Shifter (docs/behaviour.md,
        # 'Gateway: pull de-duplication', step 2): a failed re-pull hidden behind the READY
        # record would be restarted on every request, and a client polling the pull would loop
        # while the registry is down.
        if pulled is not None and pulled.get("status") != READY:
            return pulled
        ready = self.store.find_tagged(system, tag, READY)
        if ready is not None and ready.get("itype") == itype:
            return ready
        return pulled

    def _should_pull(
        self, rec: Record | None, uacl: list[int], gacl: list[int], now: float
    ) -> bool:
        if rec is None:
            return True
        status = rec.get("status")
        last_pull = rec.get("last_pull")
        inflight = status != READY
        recent = status == READY and last_pull is not None and now - float(last_pull) < RECENT
        acl_changed = (
            sorted(rec.get("userACL") or []) != uacl or sorted(rec.get("groupACL") or []) != gacl
        )
        if not recent and not inflight and acl_changed:
            return True
        if status == EXPIRED:
            return True
        if status == FAILURE:
            # A failure is shown for RECENT seconds (clients poll by re-posting the pull and
            # must see it), then a new request retries: Shifter made users wait
            # PullUpdateTimeout before a retry after, say, fixing their registry login.
            beat = float(rec.get("last_heartbeat") or 0)
            return now - beat > RECENT
        if status == READY and (
            last_pull is None or float(last_pull) < now - self.pull_update_timeout
        ):
            return True
        if inflight:
            beat = float(rec.get("last_heartbeat") or 0)
            return now - beat > self.heartbeat_timeout
        return False

    def _drop_old_failures(self, system: str, now: float) -> None:
        for rec in self.store.list(system, status=[FAILURE]):
            when = float(rec.get("last_heartbeat") or rec.get("last_pull") or 0)
            if when < now - self.pull_update_timeout:
                self.store.delete(rec["_id"])

    def pull(
        self,
        caller: Caller,
        system: str,
        itype: str,
        tag: str,
        user_acl: Any = None,
        group_acl: Any = None,
    ) -> Record:
        self.platform(system)
        if itype == "custom":
            raise BadRequest("custom images cannot be pulled from a registry; use import")
        if itype != "docker":
            raise BadRequest(f"unknown image type '{itype}' (docker or custom)")
        tag = normalize_tag(itype, tag)
        try:
            uacl, gacl = parse_ids(user_acl, "allowed_uids"), parse_ids(group_acl, "allowed_gids")
        except AclError as exc:
            raise BadRequest(str(exc)) from None
        if uacl:
            uacl = sorted({*uacl, caller.uid})
        if gacl:
            gacl = sorted({*gacl, caller.gid})
        now = self.clock()
        self._drop_old_failures(system, now)
        rec = self._current(system, itype, tag)
        if self._should_pull(rec, uacl, gacl, now):
            started = self._start(caller, system, itype, tag, rec, uacl, gacl, now)
            if started is not None:
                return started
            rec = self._current(system, itype, tag)
        if rec is None:
            raise GatewayError("pull record vanished; try again")
        return rec

    def _claim_key(self, system: str, itype: str, tag: str) -> str:
        return f"{system}|{itype}|{tag}"

    def _start(
        self,
        caller: Caller,
        system: str,
        itype: str,
        tag: str,
        rec: Record | None,
        uacl: list[int],
        gacl: list[int],
        now: float,
    ) -> Record | None:
        key = self._claim_key(system, itype, tag)
        owner = self._new_owner()
        if not self.store.claim(key, owner, now, self.heartbeat_timeout):
            return None
        rid = None
        try:
            fields = _queued(owner, now, uacl, gacl, caller)
            if (
                rec is not None
                and rec.get("status") in (*INFLIGHT, FAILURE)
                and rec.get("pulltag") == tag
            ):
                self.store.update(rec["_id"], fields)
                rid = rec["_id"]
            else:
                rid = self.store.insert(self._new_record(system, itype, tag) | fields)["_id"]
            creds = dict(caller.authorized_locations)
            log.info(
                "pull start user=%s system=%s tag=%s record=%s private=%s",
                caller.user, system, tag, rid, bool(uacl or gacl),
            )  # fmt: skip
            telemetry.PULLS_STARTED.inc()
            self._submit(
                self._run_pull, rid, key, owner, system, tag, uacl, gacl, creds, caller.user
            )
        except BaseException as exc:
            # No worker will run it: not left in flight for PullHeartbeatTimeout.
            if rid is not None:
                self._fail(rid, f"{tag}: could not start the pull: {exc}")
                log.error(
                    "pull failed user=%s system=%s tag=%s record=%s duration=0.0s reason=%s",
                    caller.user, system, tag, rid, f"could not start: {exc}",
                )  # fmt: skip
            self.store.release(key, owner)
            raise
        return self.store.get(rid)

    def _new_record(self, system: str, itype: str, tag: str) -> Record:
        ref = (
            parse_reference(tag, self.gw.default_location, self.gw.locations)
            if itype == "docker"
            else None
        )
        return {
            "format": self.gw.default_format,
            "arch": self.gw.platform.split("/")[1],
            "os": self.gw.platform.split("/")[0],
            "location": ref.location if ref else "",
            "remotetype": "dockerv2",
            "userACL": [],
            "groupACL": [],
            "private": None,
            "tag": [],
            "status": "INIT",
            "system": system,
            "itype": itype,
            "pulltag": tag,
        }

    def _heartbeat(self, rid: str, key: str, owner: str, stop: threading.Event) -> None:
        # Beat well within PullHeartbeatTimeout, whatever a site sets it to: a pull whose
        # beat is older than that is taken over by the next request, though still running.
        every = min(HEARTBEAT_EVERY, self.heartbeat_timeout / 3)
        while not stop.wait(every):
            now = self.clock()
            self.store.refresh_claim(key, owner, now)
            self.store.update(rid, {"last_heartbeat": now})

    def _run_pull(
        self,
        rid: str,
        key: str,
        owner: str,
        system: str,
        tag: str,
        uacl: list[int],
        gacl: list[int],
        creds: dict[str, str],
        user: str = "-",
    ) -> None:
        started = time.monotonic()
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(rid, key, owner, stop), daemon=True)
        beat.start()
        progress: dict[str, Any] = {"layers": {}, "sent": 0.0}

        def on_status(state: str, message: str) -> None:
            self.store.update(
                rid, {"status": state, "status_message": message, "last_heartbeat": self.clock()}
            )

        def on_progress(digest: str, done: int, size: int) -> None:
            layers = progress["layers"]
            layers[digest] = (done, size)
            now = self.clock()
            if now - progress["sent"] < 0.5 and done < size:
                return
            progress["sent"] = now
            self.store.update(
                rid,
                {
                    "progress": {
                        "layers_done": sum(1 for d, s in layers.values() if d >= s),
                        "bytes_done": sum(d for d, _ in layers.values()),
                        "bytes_total": sum(s for _, s in layers.values()),
                    }
                },
            )

        try:
            pipeline = Pipeline(
                self.gw, transfer=self.transfer(system), client_options=self.client_options
            )
            result = pipeline.pull(
                tag,
                credentials=creds,
                user_acl=uacl,
                group_acl=gacl,
                on_status=on_status,
                on_progress=on_progress,
            )
            self._complete(rid, system, tag, result, uacl, gacl)
        except ImageError as exc:
            self._fail(rid, str(exc))
            self._log_failure(user, system, tag, rid, started, str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded for the user, logged for the admin
            self._fail(rid, f"{tag}: internal error: {exc}")
            self._log_failure(user, system, tag, rid, started, f"internal error: {exc}", True)
        else:
            took = time.monotonic() - started
            telemetry.PULLS.labels(READY).inc()
            telemetry.PULL_SECONDS.labels(READY).observe(took)
            log.info(
                "pull done user=%s system=%s tag=%s id=%s duration=%.1fs layers_cached=%d "
                "downloaded_bytes=%d",
                user, system, tag, result.image_id, took, result.cached_layers,
                result.downloaded_bytes,
            )  # fmt: skip
        finally:
            stop.set()
            self.store.release(key, owner)
        self.prune_cache()

    @staticmethod
    def _log_failure(
        user: str,
        system: str,
        tag: str,
        rid: str,
        started: float,
        reason: str,
        internal: bool = False,
    ) -> None:
        """One line per failed pull, whatever the cause; a traceback only for our faults."""
        took = time.monotonic() - started
        telemetry.PULLS.labels(FAILURE).inc()
        telemetry.PULL_SECONDS.labels(FAILURE).observe(took)
        log.log(
            logging.ERROR if internal else logging.WARNING,
            "pull failed user=%s system=%s tag=%s record=%s duration=%.1fs reason=%s",
            user, system, tag, rid, took, reason,
            exc_info=internal,
        )  # fmt: skip

    def prune_cache(self) -> None:
        """Apply ``LayerCacheMaxSize`` and ``LayerCacheMaxAge`` (run after every pull)."""
        size, age = self.gw.layer_cache_max_size, self.gw.layer_cache_max_age
        if size is None and age is None:
            return
        try:
            result = LayerCache(self.gw.cache_dir).prune(size, age, now=self.clock())
        except OSError as exc:
            log.warning("layer cache prune failed: %s", exc)
            return
        if result.removed:
            telemetry.PRUNED_BYTES.inc(result.freed)
            log.info(
                "layer cache pruned removed=%d freed_bytes=%d total_bytes=%d kept_in_use=%d",
                len(result.removed), result.freed, result.total_after, len(result.kept_in_use),
            )  # fmt: skip

    def _fail(self, rid: str, message: str) -> None:
        self.store.update(
            rid,
            {
                "status": FAILURE,
                "status_message": message,
                "last_heartbeat": self.clock(),
                "owner": None,
            },
        )

    def _complete(
        self, rid: str, system: str, tag: str, result: PullResult, uacl: list[int], gacl: list[int]
    ) -> None:
        now = self.clock()
        fields = {
            "id": result.image_id,
            "status": READY,
            "status_message": "",
            "last_pull": now,
            "last_heartbeat": now,
            "expiration": now + self.expiration,
            "ENV": result.env,
            "ENTRY": result.entrypoint,
            "CMD": result.cmd,
            "WORKDIR": result.workdir,
            "LABELS": result.labels,
            "userACL": uacl,
            "groupACL": gacl,
            "private": bool(uacl or gacl),
            "owner": None,
            "progress": None,
        }
        self._finish(rid, system, "docker", tag, result.image_id, fields)

    def _finish(
        self,
        rid: str,
        system: str,
        itype: str,
        tag: str,
        image_id: str,
        fields: dict[str, Any],
    ) -> None:
        """Mark READY, or merge into the READY record of the same image (docs/behaviour.md,
        'Gateway: states'). The tag index is written first: a client told READY may submit
        at once, and on a remote system the index is a few ssh round trips away."""
        self._write_index(system, itype, tag, image_id)
        existing = self.store.find_image(system, image_id, READY)
        if existing is not None and existing["_id"] != rid:
            merged = {k: v for k, v in fields.items() if k not in ("status", "id")}
            puller = (self.store.get(rid) or {}).get("puller_uid")
            if existing.get("puller_uid") != puller:
                # Pulled by two users: neither may remove it alone, only an admin.
                merged["puller_uid"] = None
            self.store.update(existing["_id"], merged)
            self.store.set_tag(system, existing["_id"], tag)
            self.store.delete(rid)
        else:
            self.store.update(rid, fields)
            self.store.set_tag(system, rid, tag)

    def _write_index(self, system: str, itype: str, tag: str, image_id: str | None) -> None:
        """Beyond Shifter: ``<imageDir>/tags/<type>/<tag>`` holds the id, so the runtime can start
        an image without asking the gateway (and while it is down)."""
        name = f"tags/{itype}/{quote(tag, safe='')}"
        transfer = self.transfer(system)
        try:
            if image_id is None:
                transfer.remove(name)
            else:
                if hasattr(transfer, "image_dir") and isinstance(transfer.image_dir, Path):
                    (transfer.image_dir / "tags" / itype).mkdir(parents=True, exist_ok=True)
                transfer.write(name, (image_id + "\n").encode())
        except (OSError, TransferError) as exc:
            log.warning("could not update the tag index %s: %s", name, exc)

    # -- import ------------------------------------------------------------------------

    def _import_allowed(self, caller: Caller) -> bool:
        users = self.gw.import_users
        if users is None:
            raise Forbidden("User image import from file disabled.")
        if users == "all":
            return True
        return caller.user in users

    def do_import(
        self, caller: Caller, system: str, itype: str, tag: str, body: Mapping[str, Any]
    ) -> Record:
        self.platform(system)
        if not self._import_allowed(caller):
            log.warning("import refused user=%s system=%s tag=%s", caller.user, system, tag)
            raise Forbidden(f"user {caller.user} may not import images (ImportUsers)")
        tag = normalize_tag(itype, tag)
        path = body.get("filepath")
        fmt = body.get("format", "squashfs")
        if not isinstance(path, str) or not path.startswith("/"):
            raise BadRequest("filepath must be an absolute path to a squashfs file")
        if fmt != "squashfs":
            raise BadRequest(f"format '{fmt}' cannot be imported (squashfs only)")
        check_squashfs(path)
        try:
            uacl = parse_ids(body.get("allowed_uids"), "allowed_uids")
            gacl = parse_ids(body.get("allowed_gids"), "allowed_gids")
        except AclError as exc:
            raise BadRequest(str(exc)) from None
        key = self._claim_key(system, itype, tag)
        owner = self._new_owner()
        now = self.clock()
        if not self.store.claim(key, owner, now, self.heartbeat_timeout):
            raise GatewayError(f"an import or pull of {tag} is already running; try later")
        rec = None
        try:
            rec = self.store.insert(
                self._new_record(system, itype, tag)
                | _queued(owner, now, uacl, gacl, caller)
                | {"remotetype": "import", "filepath": path}
            )
            log.info(
                "import start user=%s system=%s tag=%s record=%s file=%s",
                caller.user, system, tag, rec["_id"], path,
            )  # fmt: skip
            telemetry.ADMIN_ACTIONS.labels("import").inc()
            self._submit(
                self._run_import,
                rec["_id"],
                key,
                owner,
                system,
                itype,
                tag,
                path,
                uacl,
                gacl,
                caller.user,
            )
        except BaseException as exc:
            if rec is not None:  # no worker will run it: not left in flight
                self._fail(rec["_id"], f"import of {path} could not start: {exc}")
            self.store.release(key, owner)
            raise
        return self.store.get(rec["_id"]) or rec

    def _run_import(
        self,
        rid: str,
        key: str,
        owner: str,
        system: str,
        itype: str,
        tag: str,
        path: str,
        uacl: list[int],
        gacl: list[int],
        user: str,
    ) -> None:
        from .meta import render_meta

        started = time.monotonic()
        try:
            self.store.update(
                rid,
                {"status": "HASHING", "status_message": "Hashing", "last_heartbeat": self.clock()},
            )
            image_id = fasthash(path)
            self.store.update(
                rid,
                {
                    "status": "TRANSFER",
                    "status_message": "Copying",
                    "last_heartbeat": self.clock(),
                },
            )
            transfer = self.transfer(system)
            staged = transfer.staging(f"{image_id}.squashfs")
            try:
                shutil.copyfile(path, staged)
                transfer.commit(staged, f"{image_id}.squashfs")
            finally:
                staged.unlink(missing_ok=True)
            meta = render_meta(user_acl=uacl, group_acl=gacl, user=user)
            transfer.write(f"{image_id}.meta", meta.encode())
            now = self.clock()
            self._finish(
                rid,
                system,
                itype,
                tag,
                image_id,
                {
                    "id": image_id,
                    "status": READY,
                    "status_message": "",
                    "last_pull": now,
                    "last_heartbeat": now,
                    "expiration": now + self.expiration,
                    "ENV": [],
                    "ENTRY": None,
                    "CMD": None,
                    "WORKDIR": None,
                    "LABELS": {},
                    "userACL": uacl,
                    "groupACL": gacl,
                    "private": bool(uacl or gacl),
                    "owner": None,
                },
            )
        except (OSError, TransferError) as exc:
            self._fail(rid, f"import of {path} failed: {exc}")
            log.warning(
                "import failed user=%s system=%s tag=%s record=%s duration=%.1fs reason=%s",
                user, system, tag, rid, time.monotonic() - started, exc,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - recorded for the user, logged for the admin
            # As for pulls: any failure ends FAILURE, never a record stuck in flight.
            self._fail(rid, f"import of {path} failed: internal error: {exc}")
            log.error(
                "import failed user=%s system=%s tag=%s record=%s duration=%.1fs reason=%s",
                user, system, tag, rid, time.monotonic() - started, f"internal error: {exc}",
                exc_info=True,
            )  # fmt: skip
        else:
            log.info(
                "import done user=%s system=%s tag=%s id=%s duration=%.1fs",
                user, system, tag, image_id, time.monotonic() - started,
            )  # fmt: skip
        finally:
            self.store.release(key, owner)

    # -- expiry ----------------------------------------------------------------------

    def _expire(
        self,
        rec: Record,
        message: str = "Expired",
        if_fields: dict[str, str | int | None] | None = None,
    ) -> bool:
        """READY → EXPIRING → EXPIRED, files and tag index removed; False if the record was
        no longer READY (or no longer matched ``if_fields``) when the expiry began."""
        if not self.store.update(
            rec["_id"], {"status": "EXPIRING"}, if_status=[READY], if_fields=if_fields
        ):
            return False
        transfer = self.transfer(rec["system"])
        image_id = rec.get("id")
        try:
            if image_id:
                transfer.remove(f"{image_id}.meta")
                transfer.remove(f"{image_id}.{rec.get('format') or 'squashfs'}")
            for tag in rec.get("tag") or []:
                self._write_index(rec["system"], rec.get("itype", "docker"), tag, None)
        except (OSError, TransferError) as exc:
            self.store.update(
                rec["_id"], {"status": READY, "status_message": f"expire failed: {exc}"}
            )
            raise GatewayError(f"could not remove image files: {exc}") from None
        # Compare-and-set: a pull that took over this record meanwhile keeps it.
        self.store.update(
            rec["_id"], {"status": EXPIRED, "status_message": message}, if_status=["EXPIRING"]
        )
        return True

    def remove(self, caller: Caller, system: str, itype: str, tag: str) -> Record:
        """A user removes a private image they pulled; an admin any image
        (docs/behaviour.md, 'Gateway: removal'). Returns the record as it was."""
        self.platform(system)
        tag = normalize_tag(itype, tag)
        rec = self.store.find_tagged(system, tag, READY)
        # An image the caller cannot read answers as lookup does: not found, so that
        # nobody learns which private images others have.
        if rec is None or rec.get("itype") != itype or not can_read(rec, caller):
            raise NotFound(f"image {itype}:{tag} not found on {system}")
        guard: dict[str, str | int | None] | None = None
        if not self.is_admin(caller, system):
            refusal = _not_removable_by(rec, caller, f"{itype}:{tag}", system)
            if refusal:
                log.warning(
                    "remove refused user=%s system=%s tag=%s id=%s",
                    caller.user, system, tag, rec.get("id"),
                )  # fmt: skip
                raise Forbidden(refusal)
            # Still theirs when it goes: a pull by someone else merged in meanwhile wins.
            guard = {"puller_uid": caller.uid, "id": rec.get("id")}
        if not self._expire(rec, f"Removed by {caller.user}", guard):
            raise Conflict(
                f"{itype}:{tag} changed while being removed (pulled again, or removed by "
                "someone else): look it up and try again"
            )
        log.info(
            "remove user=%s system=%s tag=%s id=%s tags=%s",
            caller.user, system, tag, rec.get("id"), ",".join(rec.get("tag") or []),
        )  # fmt: skip
        return rec

    def expire(self, caller: Caller, system: str, itype: str, tag: str) -> bool:
        self.platform(system)
        self._require_admin(caller, system, "expire")
        rec = self.store.find_tagged(system, normalize_tag(itype, tag), READY)
        if rec is None or rec.get("itype") != itype:
            raise NotFound("image not found")
        done = self._expire(rec)
        telemetry.ADMIN_ACTIONS.labels("expire").inc()
        log.info(
            "expire user=%s system=%s tag=%s id=%s expired=%s",
            caller.user, system, tag, rec.get("id"), done,
        )  # fmt: skip
        return done

    def autoexpire(self, caller: Caller, system: str) -> list[str]:
        self.platform(system)
        self._require_admin(caller, system, "autoexpire")
        now = self.clock()
        expired = []
        for rec in self.store.list(system):
            status = rec.get("status")
            if status == READY:
                # Unlike Shifter: an image pulled but never looked up expires from its pull time.
                when = rec.get("expiration") or float(rec.get("last_pull") or now) + self.expiration
                if float(when) < now and self._expire(rec):
                    expired.append(rec.get("id"))
            elif status in INFLIGHT:
                if now - float(rec.get("last_heartbeat") or 0) > self.heartbeat_timeout:
                    self.store.delete(rec["_id"])
            elif status == FAILURE:
                if now - float(rec.get("last_heartbeat") or 0) > self.pull_update_timeout:
                    self.store.delete(rec["_id"])
        telemetry.ADMIN_ACTIONS.labels("autoexpire").inc()
        self.prune_cache()  # the autoexpire timer prunes by age even when nothing is pulled
        log.info(
            "autoexpire user=%s system=%s expired=%d ids=%s",
            caller.user, system, len(expired), ",".join(str(i) for i in expired) or "-",
        )  # fmt: skip
        return expired

    # -- restart recovery --------------------------------------------------------------

    def recover(self) -> list[str]:
        """Re-queue or fail what dead processes of this host (or silent ones anywhere) left
        in flight, and remove their partial files. Returns the record ids handled.

        Every gunicorn worker calls this as it boots, all at once: a host-wide lock makes
        them take turns, so two workers never remove the same tree or re-queue the same
        record (one of them would fail to boot, and gunicorn stops when a worker does)."""
        self.gw.expand_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.gw.expand_dir, os.O_RDONLY | os.O_DIRECTORY)  # flock on the dir
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._recover_locked()
        finally:
            os.close(fd)

    def _recover_locked(self) -> list[str]:
        host = socket.gethostname()
        now = self.clock()
        handled = []
        clean_dead_expansions(self.gw.expand_dir)
        for system in self.platforms:
            try:
                self.transfer(system).clean_dead_partials()
            except (GatewayError, OSError, TransferError) as exc:
                # Never fatal: this runs while a worker boots, and a remote host that is
                # down must not keep the gateway from starting.
                log.warning("could not clean partial files of %s: %s", system, exc)
        for rec in self.store.list(status=list(INFLIGHT)):
            hp = _host_pid(rec.get("owner"))
            dead = (
                hp is not None and hp[0] == host and hp[1] != os.getpid() and not pid_alive(hp[1])
            )
            silent = now - float(rec.get("last_heartbeat") or 0) > self.heartbeat_timeout
            if not (dead or silent):
                continue
            handled.append(rec["_id"])
            key = self._claim_key(rec["system"], rec["itype"], rec.get("pulltag", ""))
            if rec.get("owner"):
                self.store.release(key, rec["owner"])
            if rec.get("status") == "EXPIRING":
                self.store.update(rec["_id"], {"status": READY})
                self._expire(self.store.get(rec["_id"]) or rec)
            elif rec.get("remotetype") == "import" or rec.get("status") == "HASHING":
                self._fail(rec["_id"], "the gateway stopped during the import; import again")
            else:
                self._requeue(rec, key)
        # A claim whose owner died without a record in flight (between claiming and
        # inserting, or after finishing and before releasing) would block pulls of its
        # tag for PullHeartbeatTimeout; a dead process of this host claims nothing.
        for claim in self.store.claims():
            hp = _host_pid(claim.get("owner"))
            if hp is not None and hp[0] == host and hp[1] != os.getpid() and not pid_alive(hp[1]):
                self.store.release(claim["_id"], claim["owner"])
        return handled

    def _requeue(self, rec: Record, key: str) -> None:
        owner = self._new_owner()
        if not self.store.claim(key, owner, self.clock(), self.heartbeat_timeout):
            return  # someone alive already took it over
        if not self.store.update(
            rec["_id"],
            {
                "status": "PENDING",
                "owner": owner,
                "last_heartbeat": self.clock(),
                "status_message": "Re-queued after a gateway restart",
            },
            if_status=list(INFLIGHT),
        ):
            self.store.release(key, owner)
            return
        self._submit(
            self._run_pull,
            rec["_id"],
            key,
            owner,
            rec["system"],
            rec["pulltag"],
            rec.get("userACL") or [],
            rec.get("groupACL") or [],
            {},
            str(rec.get("requester") or "-"),
        )
        log.info(
            "pull requeued system=%s tag=%s record=%s", rec["system"], rec["pulltag"], rec["_id"]
        )


def check_squashfs(path: str) -> None:
    """An importable file: a readable squashfs without xattrs (no file capabilities can
    ride in; setuid bits and device nodes are neutered by the runtime's nosuid,nodev)."""
    try:
        with open(path, "rb") as f:
            superblock = f.read(96)
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror}") from None
    if len(superblock) < 96 or superblock[:4] != SQUASHFS_MAGIC:
        raise BadRequest(f"{path} is not a squashfs image")
    xattr_table = int.from_bytes(superblock[56:64], "little")  # xattr_id_table_start
    if xattr_table != 0xFFFFFFFFFFFFFFFF:
        raise BadRequest(
            f"{path} carries extended attributes (e.g. file capabilities); rebuild it with "
            "mksquashfs -no-xattrs"
        )
