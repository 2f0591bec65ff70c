"""The WSGI entry point gunicorn loads in each worker process: ``imagegw.wsgi:app``."""

from __future__ import annotations

import logging

from .api import create_app
from .service import build_manager, load_raw

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s")
manager = build_manager(load_raw())
app = create_app(manager)
# Whatever a dead predecessor left in flight is re-queued or failed, never left stuck.
manager.recover()
