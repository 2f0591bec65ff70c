"""The WSGI entry point gunicorn loads in each worker process: ``imagegw.wsgi:app``."""

from __future__ import annotations

import logging

from .api import create_app
from .service import build_manager, load

config = load()
# LogLevel (Shifter's key) decides what the gateway logs; gunicorn's own lines follow it too.
logging.basicConfig(
    level=config.log_level, format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"
)
logging.getLogger().setLevel(config.log_level)
manager = build_manager(config)
app = create_app(manager)
# Whatever a dead predecessor left in flight is re-queued or failed, never left stuck.
# Never fatal: gunicorn stops the whole gateway when a worker fails to boot, and a stale
# record is also taken over by the next pull request that finds it silent.
try:
    manager.recover()
except Exception:
    logging.getLogger("imagegw").exception("restart recovery failed; serving anyway")
