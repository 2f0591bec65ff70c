"""gunicorn settings for the image gateway (``shifter-imagegw`` passes this file).

Processes, not threads, carry the concurrency by default: a lookup holds the GIL for all
but the munge round trip and the SQLite calls, and in threaded workers the hand-offs
around those calls cost more than they hide. On 2 cores (bench/gateway, 4096 clients)
6 sync workers answered 1950 authenticated lookups/s with p99 2.2 s, against 1575/s and
2.9 s for 2 gthread workers x 4 threads. ``--threads N`` (N > 1) selects gthread
workers. Pulls run in each worker's own thread pool either way. The backlog is large
so that thousands of nodes asking at once queue instead of being refused.
"""

import os

_cpus = len(os.sched_getaffinity(0))
bind = os.environ.get("IMAGEGW_BIND", "127.0.0.1:5000")
workers = int(os.environ.get("IMAGEGW_WORKERS", str(2 * _cpus + 2)))
threads = int(os.environ.get("IMAGEGW_THREADS", "1"))
worker_class = "gthread" if threads > 1 else "sync"
backlog = 8192
timeout = 120
graceful_timeout = 20
keepalive = 5
worker_connections = 8192

# What the service passes on from imagemanager.json: LogLevel, AccessLog (gunicorn's
# access log, in gunicorn's format; "-" is stderr).
loglevel = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}.get(
    int(os.environ.get("IMAGEGW_LOGLEVEL", "20")), "info"
)
accesslog = os.environ.get("IMAGEGW_ACCESSLOG") or None


def _metrics_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _remove_counts(path: str) -> None:
    # Only prometheus_client's own files: a site may point the variable at a shared dir.
    import glob

    for name in glob.glob(os.path.join(path, "*.db")):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def on_starting(server):
    """Empty the Prometheus directory: counts of a previous run must not be added in."""
    path = _metrics_dir()
    if path is None:
        return
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        _remove_counts(path)
    except OSError as exc:
        # Workers fork from this process: without the variable they count per process.
        server.log.warning("no Prometheus directory %s (%s): /metrics per worker", path, exc)
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def child_exit(server, worker):
    if _metrics_dir() is not None:
        try:
            from prometheus_client import multiprocess
        except ImportError:
            return
        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Write the worker's queued metrics rows before it goes (imagegw/metrics_batch.py)."""
    import sys

    wsgi = sys.modules.get("imagegw.wsgi")
    if wsgi is not None:
        try:
            wsgi.manager.flush_metrics()
        except Exception as exc:  # noqa: BLE001 - the worker is leaving either way
            server.log.warning("metrics rows of worker %s not written: %s", worker.pid, exc)


def on_exit(server):
    path = _metrics_dir()
    if path is not None:
        try:
            _remove_counts(path)
            os.rmdir(path)  # only if nothing else is in it
        except OSError:
            pass
