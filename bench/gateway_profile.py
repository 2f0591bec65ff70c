"""gunicorn config for ``bench/gateway --profile``: the gateway's own settings, plus CPU
accounting per step of a request in every worker.

Each step is wrapped with ``time.thread_time()`` (CPU of the calling thread, not wall
time), keyed by the route of the request being handled. At exit each worker writes its
totals to ``$BENCH_GATEWAY_PROFILE_DIR/<pid>.json``; bench/gateway adds them up and prints
CPU per request and step. The wrappers themselves cost ~1 us per call, so every figure
is a little high; compare steps of one run, not figures of runs with and without it.
Sync workers only (the steps of one request run in one thread).
"""

import json
import os
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REAL = os.path.join(_HERE, "..", "imagegw", "gunicorn_conf.py")
with open(_REAL) as _f:
    exec(compile(_f.read(), _REAL, "exec"))  # noqa: S102 - the gateway's own settings

_totals: dict[tuple[str, str], list[float]] = {}  # (route, step) -> [calls, cpu seconds]
_route = ["-"]
_real_worker_exit = worker_exit  # noqa: F821 - defined by the exec above


def _add(step: str, cpu: float, route: str | None = None) -> None:
    entry = _totals.setdefault((route or _route[0], step), [0, 0.0])
    entry[0] += 1
    entry[1] += cpu


def _wrap(owner, name: str, step: str, route: str | None = None) -> None:
    """``route``: charge the step to that route, whatever request is being handled (the
    metrics thread writes lookups' rows between requests)."""
    real = getattr(owner, name, None)
    if real is None:  # an older gateway (profiling the code before a change)
        return

    def timed(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return real(*args, **kwargs)
        finally:
            _add(step, time.thread_time() - t0, route)

    setattr(owner, name, timed)


def post_fork(server, worker):
    import flask
    from gunicorn.workers import sync

    import imagegw.api
    import imagegw.auth
    import imagegw.manager
    import imagegw.munge
    from imagegw.store.sqlite import SQLiteStore

    real_handle = sync.SyncWorker.handle

    def handle(self, listener, client, addr):
        _route[0] = "?"
        t0 = time.thread_time()
        try:
            return real_handle(self, listener, client, addr)
        finally:
            _add("whole request (gunicorn handle)", time.thread_time() - t0)

    sync.SyncWorker.handle = handle
    real_wsgi = flask.Flask.wsgi_app

    def wsgi_app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        _route[0] = "lookup" if path.startswith("/api/lookup/") else path.strip("/") or "/"
        t0 = time.thread_time()
        try:
            return real_wsgi(self, environ, start_response)
        finally:
            _add("flask wsgi_app", time.thread_time() - t0)

    flask.Flask.wsgi_app = wsgi_app
    _wrap(imagegw.munge, "decode", "munge.decode")
    _wrap(imagegw.api, "authenticate", "auth.authenticate (decode, names)")
    from werkzeug.routing import MapAdapter

    _wrap(MapAdapter, "match", "routing (werkzeug match)")
    _wrap(flask.Flask, "finalize_request", "flask finalize_request")
    _wrap(imagegw.auth, "_names", "auth._names")
    _wrap(imagegw.manager.ImageManager, "lookup", "manager.lookup (all)")
    _wrap(SQLiteStore, "find_tagged", "store.find_tagged")
    _wrap(SQLiteStore, "find_tagged_shared", "store.find_tagged_shared")
    _wrap(SQLiteStore, "add_metric", "store.add_metric")
    _wrap(SQLiteStore, "add_metrics", "store.add_metrics (metrics thread)", "lookup")
    _wrap(imagegw.api, "render", "api.render")
    _wrap(imagegw.api, "jsonify", "api.jsonify")


def worker_exit(server, worker):
    _real_worker_exit(server, worker)
    out = os.environ.get("BENCH_GATEWAY_PROFILE_DIR")
    if out:
        with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
            json.dump([[route, step, n, cpu] for (route, step), (n, cpu) in _totals.items()], f)
