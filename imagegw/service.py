"""``shifter-imagegw``: check the configuration, then run the API under gunicorn.

``shifter-imagegw -c /etc/shifter/imagemanager.json --bind 0.0.0.0:5000`` starts a
working gateway: records go to MongoDB when ``MongoDBURI`` is set, else to an embedded
database file under ``StateDirectory`` (default ``/var/lib/shifter``), created on first
start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONFIG_PATH, ConfigError

GUNICORN_CONF = Path(__file__).with_name("gunicorn_conf.py")


def load_raw(path: str | None = None) -> dict[str, Any]:
    path = path or os.environ.get("GWCONFIG") or DEFAULT_CONFIG_PATH
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read gateway config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"gateway config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"gateway config {path} must hold a JSON object")
    validate(data)
    return data


def validate(raw: dict[str, Any]) -> None:
    """Every key a working gateway needs, named when missing or malformed."""
    for key in ("CacheDirectory", "ExpandDirectory", "Platforms"):
        if not raw.get(key):
            raise ConfigError(f"imagemanager.json: required key {key} is missing")
    auth = raw.get("Authentication", "munge")
    if auth not in ("munge", "mock"):
        raise ConfigError(f"imagemanager.json: Authentication must be munge or mock, not {auth}")
    if not isinstance(raw["Platforms"], dict):
        raise ConfigError("imagemanager.json: Platforms must be an object")
    for name, plat in raw["Platforms"].items():
        where = f"imagemanager.json: Platforms.{name}"
        if not isinstance(plat, dict):
            raise ConfigError(f"{where} must be an object")
        access = plat.get("accesstype", "local")
        if access == "local" and not (plat.get("local") or {}).get("imageDir"):
            raise ConfigError(f"{where}: required key local.imageDir is missing")
        if access == "remote":
            if not plat.get("host"):
                raise ConfigError(f"{where}: required key host is missing")
            if not (plat.get("ssh") or {}).get("imageDir"):
                raise ConfigError(f"{where}: required key ssh.imageDir is missing")
        if access not in ("local", "remote"):
            raise ConfigError(f"{where}: accesstype must be local or remote")
        if auth == "munge" and not plat.get("mungeSocketPath"):
            raise ConfigError(f"{where}: required key mungeSocketPath is missing")
    from .manager import parse_duration

    try:
        parse_duration(raw.get("ImageExpirationTimeout", "90:00:00:00"))
    except ValueError:
        raise ConfigError("imagemanager.json: ImageExpirationTimeout must be D:H:M:S") from None


def build_manager(raw: dict[str, Any], store: Any = None):
    from .manager import ImageManager
    from .store import open_store

    return ImageManager(raw, store or open_store(raw))


def main(argv: list[str] | None = None) -> int:
    from imagegw import __version__

    parser = argparse.ArgumentParser(prog="shifter-imagegw", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-c", "--config", help=f"imagemanager.json (default $GWCONFIG, else {DEFAULT_CONFIG_PATH})"
    )
    parser.add_argument("--bind", default=os.environ.get("IMAGEGW_BIND", "127.0.0.1:5000"))
    parser.add_argument("--workers", type=int, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, help="request threads per worker")
    parser.add_argument("--gunicorn-config", default=str(GUNICORN_CONF))
    parser.add_argument("--check", action="store_true", help="check the config and exit")
    args = parser.parse_args(argv)
    path = args.config or os.environ.get("GWCONFIG") or DEFAULT_CONFIG_PATH
    try:
        load_raw(path)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    if args.check:
        print(f"{path}: OK")
        return 0
    env = dict(os.environ, GWCONFIG=str(Path(path).resolve()), IMAGEGW_BIND=args.bind)
    if args.workers:
        env["IMAGEGW_WORKERS"] = str(args.workers)
    if args.threads:
        env["IMAGEGW_THREADS"] = str(args.threads)
    argv_g = [sys.executable, "-m", "gunicorn", "-c", args.gunicorn_config, "imagegw.wsgi:app"]
    os.execve(sys.executable, argv_g, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
