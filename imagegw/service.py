"""``shifter-imagegw``: check the configuration, then run the API under gunicorn.

``shifter-imagegw -c /etc/shifter/imagemanager.json --bind 0.0.0.0:5000`` starts a
working gateway: records go to MongoDB when ``MongoDBURI`` is set, else to an embedded
database file under ``StateDirectory`` (default ``/var/lib/shifter``), created on first
start. ``shifter-imagegw --check`` reports every problem of the file and of what it
names (directories, munge sockets, MongoDB) and exits 1 if there is any error.
"""

from __future__ import annotations

import argparse
import os
import pwd
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    GatewayConfig,
    check_config,
    config_path,
    load_config,
    read_json,
)

GUNICORN_CONF = Path(__file__).with_name("gunicorn_conf.py")
MONGO_TIMEOUT_MS = 3000
# The service writes lookups' metrics rows in batches, once a second per worker, off the
# request path (imagegw/metrics_batch.py says what that gives up).
METRICS_BATCH_SECONDS = 1.0


def load(path: str | None = None) -> GatewayConfig:
    """The service's configuration (``$GWCONFIG`` when no path), or ConfigError."""
    return load_config(path, gateway=True)


def build_manager(config: GatewayConfig, store: Any = None):
    from .manager import ImageManager
    from .store import open_store

    return ImageManager(
        config, store or open_store(config), metrics_batch_seconds=METRICS_BATCH_SECONDS
    )


# -- --check -------------------------------------------------------------------------------


def _writable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may create files in the directory ``path`` (by its mode bits)."""
    if user.pw_uid == 0:
        return True
    st = path.stat()
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    if st.st_uid == user.pw_uid:
        need = stat.S_IWUSR | stat.S_IXUSR
    elif st.st_gid in groups:
        need = stat.S_IWGRP | stat.S_IXGRP
    else:
        need = stat.S_IWOTH | stat.S_IXOTH
    return st.st_mode & need == need


def check_directory(what: str, path: Path, user: pwd.struct_passwd, create_ok: bool) -> str | None:
    """A problem with ``path`` for the service user, or None. ``create_ok``: the gateway
    makes it on first use, so a missing one is fine if its parent is writable."""
    if path.is_dir():
        if not _writable_by(path, user):
            return f"{what} {path} is not writable by the service user {user.pw_name}"
        return None
    if path.exists():
        return f"{what} {path} is not a directory"
    parent = next((p for p in path.parents if p.exists()), Path("/"))
    if create_ok and parent.is_dir() and _writable_by(parent, user):
        return None
    return (
        f"{what} {path} does not exist (create it, owned by the service user "
        f"{user.pw_name}: install -d -o {user.pw_name} {path})"
    )


def check_munge_socket(system: str, path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"Platforms.{system}.mungeSocketPath {path}: {exc.strerror} (is munged running?)"
    if not stat.S_ISSOCK(st.st_mode):
        return f"Platforms.{system}.mungeSocketPath {path} is not a socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
    except OSError as exc:
        return f"Platforms.{system}.mungeSocketPath {path}: cannot connect: {exc.strerror or exc}"
    finally:
        sock.close()
    return None


def check_mongo(uri: str) -> str | None:
    try:
        import pymongo
    except ImportError:
        return "MongoDBURI is set but pymongo is not installed (pip install 'shifter-py[gateway]')"
    client = pymongo.MongoClient(
        uri, serverSelectionTimeoutMS=MONGO_TIMEOUT_MS, connectTimeoutMS=MONGO_TIMEOUT_MS
    )
    try:
        client.admin.command("ping")
    except Exception as exc:  # noqa: BLE001 - any driver error is the admin's to read
        # pymongo appends its whole topology description: the first clause is the reason.
        first = (str(exc) or type(exc).__name__).splitlines()[0].split(" (configured")[0]
        return f"MongoDBURI: cannot reach MongoDB within {MONGO_TIMEOUT_MS} ms: {first[:200]}"
    finally:
        client.close()
    return None


def check_environment(cfg: GatewayConfig, user: pwd.struct_passwd) -> list[str]:
    """Problems with what the configuration names, beyond the file itself."""
    problems = []
    dirs: list[tuple[str, Path, bool]] = [
        ("CacheDirectory", cfg.cache_dir, True),
        ("ExpandDirectory", cfg.expand_dir, True),
    ]
    if not cfg.mongo_uri:
        dirs.append(("StateDirectory", cfg.state_dir, True))
    for name, plat in cfg.platforms.items():
        if plat.accesstype == "local" and plat.image_dir:
            dirs.append((f"Platforms.{name}.local.imageDir", Path(plat.image_dir), False))
    for what, path, create_ok in dirs:
        if str(path) in ("", "."):
            continue  # the key is missing: already an error of the file
        problem = check_directory(what, path, user, create_ok)
        if problem:
            problems.append(problem)
    if cfg.access_log and cfg.access_log != "-":
        problem = check_directory("AccessLog's directory", Path(cfg.access_log).parent, user, False)
        if problem:
            problems.append(problem)
    if cfg.authentication == "munge":
        for name, plat in cfg.platforms.items():
            problem = check_munge_socket(name, plat.munge_socket) if plat.munge_socket else None
            if problem:
                problems.append(problem)
    if cfg.mongo_uri:
        problem = check_mongo(cfg.mongo_uri)
        if problem:
            problems.append(problem)
    return problems


def run_check(path: Path, user_name: str | None) -> int:
    try:
        data = read_json(path)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    cfg, errors, warnings = check_config(data, path.parent, str(path), gateway=True)
    try:
        user = pwd.getpwnam(user_name) if user_name else pwd.getpwuid(os.geteuid())
    except KeyError:
        errors.append(f"--user {user_name}: no such user")
        user = None
    if cfg is not None and user is not None:
        errors += [f"{path}: {p}" for p in check_environment(cfg, user)]
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    for error in errors:
        print(f"ERROR: {error}", file=sys.stderr)
    if errors:
        print(f"{path}: {len(errors)} error(s), {len(warnings)} warning(s)", file=sys.stderr)
        return 1
    print(f"{path}: OK" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 0


# -- start -----------------------------------------------------------------------------------


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
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, its directories, munge sockets and MongoDB; print every "
        "problem; exit 1 if any",
    )
    parser.add_argument(
        "--user", help="with --check: the service user whose access to check (default: you)"
    )
    args = parser.parse_args(argv)
    path = config_path(args.config)
    if args.check:
        return run_check(path, args.user)
    try:
        cfg = load(str(path))
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"ERROR: {line}", file=sys.stderr)
        print(f"(shifter-imagegw --check -c {path} checks more)", file=sys.stderr)
        return 1
    for warning in cfg.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    env = dict(os.environ, GWCONFIG=str(path.resolve()), IMAGEGW_BIND=args.bind)
    if args.workers:
        env["IMAGEGW_WORKERS"] = str(args.workers)
    if args.threads:
        env["IMAGEGW_THREADS"] = str(args.threads)
    env["IMAGEGW_LOGLEVEL"] = str(cfg.log_level)
    if cfg.access_log:
        env["IMAGEGW_ACCESSLOG"] = cfg.access_log
    # Every worker's counters go to files here; the gunicorn hooks empty it at start and
    # remove it at exit. A site may point it elsewhere (a tmpfs) by setting it itself.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(cfg.state_dir / "prometheus"))
    argv_g = [sys.executable, "-m", "gunicorn", "-c", args.gunicorn_config, "imagegw.wsgi:app"]
    os.execve(sys.executable, argv_g, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
