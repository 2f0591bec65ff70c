"""The gateway's HTTP API (docs/behaviour.md, 'Gateway: HTTP API'), a thin Flask layer over the
manager.

Status codes: 400 bad body or tag, 401 no or invalid credential, 403 not allowed, 404
not found, 409 the record changed under a removal, 500 only for real faults. Error bodies:
``{"status", "error", "message"}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.routing import BaseConverter

from . import telemetry
from .auth import AuthError, AuthUnavailable, authenticate
from .manager import BadRequest, GatewayError, ImageManager
from .store.base import INFLIGHT

log = logging.getLogger(__name__)

RECORD_FIELDS = (
    "id",
    "system",
    "itype",
    "tag",
    "status",
    "userACL",
    "groupACL",
    "ENV",
    "ENTRY",
    "WORKDIR",
    "LABELS",
    "last_pull",
    "status_message",
)
ANSWERS_MAX = 4096  # lookup answers kept per process; the cache restarts when full
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    500: "Internal Server Error",
}


def render(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as clients see it; a missing field reads ``"MISSING"``."""
    out = {
        k: record.get(k, "MISSING") if record.get(k) is not None else "MISSING"
        for k in RECORD_FIELDS
    }
    if record.get("progress"):
        out["progress"] = record["progress"]  # beyond Shifter: progress for shifterimg
    return out


Image = tuple[str, str, str]  # system, image type, tag


class ImageConverter(BaseConverter):
    """``<system>/<type>/<tag>`` of the image routes, matched by one regular expression:
    none of the three empty, the tag may hold slashes (a trailing one is dropped). werkzeug
    matched the three parts one by one before, a third of a lookup's routing CPU
    (bench/README.md, `bench/gateway`); what matches, and what is a 404, is the same."""

    regex = r"[^/]+/[^/]+/[^/].*?"
    part_isolating = False

    def to_python(self, value: str) -> Image:
        system, itype, tag = value.split("/", 2)
        return system, itype, tag.rstrip("/")

    def to_url(self, value: Image) -> str:
        return "/".join(value)


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(
        {"status": status, "error": _REASONS.get(status, "Error"), "message": message}
    ), status


def create_app(manager: ImageManager, *, auth_method: str | None = None) -> Flask:
    app = Flask("imagegw")
    app.url_map.converters["image"] = ImageConverter
    method = auth_method or manager.gw.authentication

    def caller(system: str):
        platform = manager.platform(system)  # unknown system: 404 before auth says more
        return authenticate(request.headers.get("authentication"), platform.munge_socket, method)

    def peer() -> str:
        # Behind a proxy (TLS in front of the gateway) the client is the one it names.
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        addr = request.remote_addr or "-"
        return f"{addr} (for {forwarded})" if forwarded else addr

    def queue_depth() -> dict[str, int]:
        depth: dict[str, int] = {}
        for rec in manager.store.list(status=list(INFLIGHT)):
            depth[str(rec.get("status"))] = depth.get(str(rec.get("status")), 0) + 1
        return depth

    def body() -> dict[str, Any]:
        if not request.get_data():
            return {}
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        return data

    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError):
        return _error(exc.status, exc.message)

    @app.errorhandler(AuthError)
    def auth_error(exc: AuthError):
        # munge's own messages already start "authentication failed: ": said once.
        reason = str(exc).removeprefix("authentication failed: ")
        telemetry.AUTH_FAILURES.inc()
        log.warning(
            "credential refused reason=%s peer=%s request=%s %s",
            reason, peer(), request.method, request.path,
        )  # fmt: skip
        return _error(401, f"authentication failed: {reason}")

    @app.errorhandler(AuthUnavailable)
    def auth_unavailable(exc: AuthUnavailable):
        log.error("cannot check credentials: %s peer=%s", exc, peer())
        return _error(503, f"cannot check credentials: {exc}")

    @app.errorhandler(404)
    def no_route(_exc: Exception):
        return _error(404, f"no such API path: {request.path}")

    @app.errorhandler(405)
    def bad_method(_exc: Exception):
        return _error(405, f"{request.method} is not allowed on {request.path}")

    @app.errorhandler(Exception)
    def fault(exc: Exception):
        log.exception("request %s failed", request.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/")
    def root():
        return jsonify({"service": "shifter image gateway", "version": "0.1.0"})

    @app.get("/metrics")
    def prometheus():
        # Unauthenticated, as Prometheus scrapes: counts only, no names or tags.
        if not telemetry.AVAILABLE:
            return _error(404, "metrics need prometheus_client (pip install 'shifter-py[gateway]')")
        return Response(telemetry.render(queue_depth), content_type=telemetry.CONTENT_TYPE)

    @app.get("/healthz")
    def health():
        return jsonify({"status": "ok", "pid": os.getpid()})

    @app.get("/api/list/<system>/", strict_slashes=False)
    def list_images(system: str):
        who = caller(system)
        return jsonify({"list": [render(r) for r in manager.list(who, system)]})

    # The JSON of a lookup's answer, per (system, type, tag as asked), with the record it
    # was made from. The store hands out the same read-only record object while the
    # record is unchanged (find_tagged_shared), so "is" tells whether the bytes still say
    # what the record says. The caller's checks (credential, ACL) and the metrics row
    # stay per request.
    answers: dict[tuple[str, str, str], tuple[Mapping[str, Any], bytes]] = {}

    @app.get("/api/lookup/<image:image>", strict_slashes=False)
    def lookup(image: Image):
        system, itype, tag = image
        who = caller(system)
        rec = manager.lookup(who, system, itype, tag)
        key = (system, itype, tag)
        hit = answers.get(key)
        if hit is None or hit[0] is not rec:
            if len(answers) >= ANSWERS_MAX:
                answers.clear()
            answers[key] = hit = (rec, jsonify(render(rec)).get_data())
        return app.response_class(hit[1], mimetype=app.json.mimetype)  # type: ignore[attr-defined]

    @app.post("/api/pull/<image:image>", strict_slashes=False)
    def pull(image: Image):
        system, itype, tag = image
        who = caller(system)
        data = body()
        rec = manager.pull(
            who, system, itype, tag, data.get("allowed_uids"), data.get("allowed_gids")
        )
        return jsonify(render(rec))

    @app.post("/api/doimport/<image:image>", strict_slashes=False)
    def do_import(image: Image):
        system, itype, tag = image
        who = caller(system)
        return jsonify(render(manager.do_import(who, system, itype, tag, body())))

    @app.get("/api/expire/<image:image>", strict_slashes=False)
    def expire(image: Image):
        system, itype, tag = image
        who = caller(system)
        return jsonify({"status": manager.expire(who, system, itype, tag)})

    @app.post("/api/remove/<image:image>", strict_slashes=False)
    def remove(image: Image):
        # Beyond Shifter: a user removes a private image they pulled (Shifter #233).
        system, itype, tag = image
        who = caller(system)
        rec = manager.remove(who, system, itype, tag)
        return jsonify({"status": True, "id": rec.get("id"), "tag": rec.get("tag") or []})

    @app.get("/api/autoexpire/<system>/", strict_slashes=False)
    def autoexpire(system: str):
        who = caller(system)
        return jsonify({"status": manager.autoexpire(who, system)})

    @app.get("/api/queue/<system>/", strict_slashes=False)
    def queue(system: str):
        who = caller(system)
        return jsonify({"list": manager.queue(who, system)})

    @app.get("/api/metrics/<system>/", strict_slashes=False)
    def metrics(system: str):
        who = caller(system)
        rows = manager.metrics(who, system, request.args.get("limit", 10))
        return jsonify([{k: v for k, v in row.items() if k != "_id"} for row in rows])

    return app
