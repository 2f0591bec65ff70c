"""Metrics rows written in batches from a background thread, off the lookup path.

Every successful lookup makes a metrics row (``Metrics: true``). Written one by one, in
the request, each row is a write transaction on the shared database: about 65 us of the
worker's CPU, a wait for the database's write lock behind every other worker's row, and
(SQLite) a commit that makes every other worker's connection drop its page cache before
its next read. Queued here and written every ``interval`` seconds (or as soon as
``max_rows`` wait) in one transaction, a row costs a list append in the request.

What that gives up (docs/admin-guide.md, the metrics table under 'Disk'): a row is in the database
up to ``interval`` seconds after its lookup answered, not before; and a worker killed
outright (SIGKILL, the OOM killer) loses the rows it had not written yet. A worker that
stops normally writes them first (``flush`` from the gunicorn ``worker_exit`` hook and
at interpreter exit).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from .store.base import RecordStore

log = logging.getLogger(__name__)

# Rows kept while the database refuses them (locked for longer than busy_timeout, MongoDB
# unreachable); beyond this the oldest are dropped, and said so, rather than let a worker
# grow without bound.
MAX_PENDING = 100_000

# This process's pid, kept by a fork hook rather than asked of the kernel on every row.
_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class MetricsBatcher:
    """Queue of metrics rows for ``store``, written by one thread per process."""

    def __init__(self, store: RecordStore, interval: float = 1.0, max_rows: int = 1000) -> None:
        self.store = store
        self.interval = interval
        self.max_rows = max_rows
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards _rows and the thread's start
        self._write_lock = threading.Lock()  # one writer at a time keeps rows in order
        self._wake = threading.Event()
        self._thread_pid = 0
        atexit.register(self.flush)

    def add(self, row: Mapping[str, Any]) -> None:
        """Queue ``row``; it reaches the store within ``interval`` seconds."""
        with self._lock:
            self._rows.append(dict(row))
            full = len(self._rows) >= self.max_rows
            if self._thread_pid != _pid[0]:
                # First row in this process (gunicorn forks workers): its own writer.
                self._thread_pid = _pid[0]
                threading.Thread(target=self._run, name="imagegw-metrics", daemon=True).start()
        if full:
            self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def flush(self) -> None:
        """Write every queued row now (in this thread)."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return
            try:
                self.store.add_metrics(rows)
            except Exception as exc:  # noqa: BLE001 - keep the rows, try again next time
                with self._lock:
                    self._rows[:0] = rows
                    dropped = len(self._rows) - MAX_PENDING
                    if dropped > 0:
                        del self._rows[:dropped]
                log.error(
                    "metrics rows not written (%d waiting%s): %s",
                    len(rows), f", {dropped} oldest dropped" if dropped > 0 else "", exc,
                )  # fmt: skip

    def _run(self) -> None:
        me = _pid[0]
        while self._thread_pid == me:
            self._wake.wait(self.interval)
            self._wake.clear()
            self.flush()
