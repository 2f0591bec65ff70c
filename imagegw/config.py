"""``imagemanager.json``, read once: every key typed, with its default, checked in one pass.

This module is the only reader of the file: the rest of the gateway gets a
:class:`GatewayConfig` and never looks a key up by name. Shifter's own files load as they
are; a key this gateway does not know is kept out of the way and named in a warning
(with the nearest known key, for typos), never refused. ``shifter-imagegw --check``
prints every error and warning at once; starting the service refuses a file with errors.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/shifter/imagemanager.json"
DEFAULT_PLATFORM = "linux/amd64"
DEFAULT_STATE_DIR = "/var/lib/shifter"
DEFAULT_MONGO_DB = "Shifter"
DEFAULT_METRICS_RETENTION = 1_000_000

# Shifter's LogLevel values (it upper-cases what the file says); WARN is Python's alias.
LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}

TOP_KEYS = (
    "WorkerThreads", "LogLevel", "DefaultImageLocation", "DefaultImageFormat",
    "PullUpdateTimeout", "PullHeartbeatTimeout", "ImageExpirationTimeout", "MongoDBURI",
    "MongoDB", "StateDirectory", "CacheDirectory", "ExpandDirectory", "Metrics",
    "MetricsRetention", "Authentication", "ImportUsers", "examiner", "ConverterOptions",
    "ImagePlatform", "Locations", "Platforms", "AccessLog", "LayerCacheMaxSize",
    "LayerCacheMaxAge", "StreamConversion",
)  # fmt: skip
LOCATION_KEYS = ("remotetype", "url", "sslcacert", "authMethod", "authentication")
PLATFORM_KEYS = ("mungeSocketPath", "accesstype", "admins", "local", "host", "ssh")
LOCAL_KEYS = ("imageDir",)
SSH_KEYS = ("username", "key", "imageDir", "sshCmdOptions", "scpCmdOptions")

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)i?B?\s*\Z", re.IGNORECASE)


class ConfigError(ValueError):
    """The gateway configuration is missing a key or has a value of the wrong shape."""


@dataclass
class Location:
    """One entry of ``Locations``: where a registry lives and how to reach it."""

    name: str
    url: str
    sslcacert: str | None = None
    auth_method: str | None = None
    remotetype: str = "dockerv2"


@dataclass
class Platform:
    """One entry of ``Platforms``: a system the gateway serves."""

    name: str
    accesstype: str = "local"
    munge_socket: str | None = None
    admins: tuple[str, ...] = ()
    image_dir: str | None = None  # local.imageDir, or ssh.imageDir for remote
    hosts: tuple[str, ...] = ()
    # The validated entry as written, for the transfer (ssh/scp options are its business).
    entry: dict[str, Any] = field(default_factory=dict)


@dataclass
class GatewayConfig:
    cache_dir: Path
    expand_dir: Path
    default_location: str = "index.docker.io"
    default_format: str = "squashfs"
    locations: dict[str, Location] = field(default_factory=dict)
    converter_options: dict[str, list[str]] = field(default_factory=dict)
    platform: str = DEFAULT_PLATFORM
    platforms: dict[str, Platform] = field(default_factory=dict)
    worker_threads: int = 1
    log_level: int = logging.INFO
    pull_update_timeout: float = 300.0
    pull_heartbeat_timeout: float = 3600.0
    image_expiration: float = 90 * 86400.0
    mongo_uri: str | None = None
    mongo_db: str = DEFAULT_MONGO_DB
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    metrics: bool = False
    metrics_retention: int | None = DEFAULT_METRICS_RETENTION
    authentication: str = "munge"
    # None: import disabled; "all": everybody; else the user names allowed.
    import_users: str | tuple[str, ...] | None = None
    examiner: str | None = None
    # False: always flatten to ExpandDirectory and run mksquashfs (imagegw.pipeline).
    stream_conversion: bool = True
    access_log: str | None = None
    layer_cache_max_size: int | None = None
    layer_cache_max_age: float | None = None
    warnings: list[str] = field(default_factory=list)

    def location(self, name: str) -> Location:
        """The configured location, or an https one named after the host itself."""
        if name in self.locations:
            return self.locations[name]
        if name in ("index.docker.io", "docker.io", "registry-1.docker.io"):
            return Location(name=name, url="https://registry-1.docker.io")
        # As docker does, a registry on the loopback interface may speak plain http.
        host = name.rsplit(":", 1)[0] if not name.endswith("]") else name
        if host in ("localhost", "[::1]") or host.startswith("127."):
            return Location(name=name, url=f"http://{name}")
        return Location(name=name, url=f"https://{name}")


def parse_duration(text: Any) -> float:
    """``"D:H:M:S"`` (fewer fields allowed, from the right) → seconds."""
    parts = [int(p) for p in str(text).split(":")]
    if not 1 <= len(parts) <= 4 or any(p < 0 for p in parts):
        raise ValueError(text)
    seconds = 0
    for unit, value in zip((1, 60, 3600, 86400), reversed(parts), strict=False):
        seconds += unit * value
    return float(seconds)


def parse_size(value: Any) -> int:
    """Bytes, as a number or ``"500M"``, ``"20G"``, ``"1.5TiB"`` (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(value)
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(value)
    number, unit = match.groups()
    return int(float(number) * 1024 ** " KMGTP".index(unit.upper() or " "))


def _location_url(name: str, url: Any) -> str:
    if not url:
        if name in ("index.docker.io", "docker.io"):
            return "https://registry-1.docker.io"
        return f"https://{name}"
    url = str(url).rstrip("/")
    if "://" not in url:
        url = "https://" + url
    return url


class _Reader:
    """Collects every problem of one file instead of stopping at the first."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.data = data
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> None:
        self.errors.append(f"{self.source}: {message}")

    def unknown(self, entry: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
        for key in entry:
            if key in known:
                continue
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else " (ignored)"
            self.warnings.append(f"{self.source}: unknown key {where}{key}{hint}")

    def number(self, key: str, default: float, *, minimum: float = 0) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            # Shifter's files sometimes quote numbers: accept "300", refuse anything else.
            try:
                value = float(str(value))
                if value < minimum:
                    raise ValueError(value)
            except ValueError:
                self.error(f"{key} must be a number of at least {minimum:g}, not {value!r}")
                return default
        return float(value)

    def duration(self, key: str, default: float | None) -> float | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
        try:
            return parse_duration(value)
        except ValueError:
            self.error(f"{key} must be D:H:M:S (e.g. 90:00:00:00) or seconds, not {value!r}")
            return default

    def string(self, key: str, default: str | None) -> str | None:
        value = self.data.get(key, default)
        if value is None or isinstance(value, str):
            return value
        self.error(f"{key} must be a string, not {value!r}")
        return default

    def path(self, key: str, default: str | None, base: Path) -> Path | None:
        value = self.string(key, default)
        return base / value if value else None


def _converter_options(r: _Reader) -> dict[str, list[str]]:
    """``ConverterOptions`` maps a format to args given as one string or a list."""
    raw = r.data.get("ConverterOptions")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        r.error("ConverterOptions must be an object mapping a format to arguments")
        return {}
    out: dict[str, list[str]] = {}
    for fmt, args in raw.items():
        if isinstance(args, str):
            out[fmt] = args.split()
        elif isinstance(args, list) and all(isinstance(a, str) for a in args):
            out[fmt] = list(args)
        else:
            r.error(f"ConverterOptions.{fmt} must be a string or a list of strings")
    return out


def _locations(r: _Reader) -> dict[str, Location]:
    raw = r.data.get("Locations") or {}
    if not isinstance(raw, dict):
        r.error("Locations must be an object")
        return {}
    out: dict[str, Location] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            r.error(f"Locations.{name} must be an object")
            continue
        r.unknown(entry, LOCATION_KEYS, f"Locations.{name}.")
        out[name] = Location(
            name=name,
            url=_location_url(name, entry.get("url")),
            sslcacert=entry.get("sslcacert"),
            auth_method=entry.get("authMethod") or entry.get("authentication"),
            remotetype=entry.get("remotetype", "dockerv2"),
        )
    return out


def _platform(r: _Reader, name: str, entry: Any, auth: str) -> Platform | None:
    where = f"Platforms.{name}"
    if not isinstance(entry, dict):
        r.error(f"{where} must be an object")
        return None
    r.unknown(entry, PLATFORM_KEYS, f"{where}.")
    access = entry.get("accesstype", "local")
    image_dir = None
    hosts: list[str] = []
    if access == "local":
        local = entry.get("local") or {}
        if isinstance(local, dict):
            r.unknown(local, LOCAL_KEYS, f"{where}.local.")
            image_dir = local.get("imageDir")
        if not image_dir:
            r.error(f"{where}: required key local.imageDir is missing")
    elif access == "remote":
        raw_hosts = entry.get("host") or []
        hosts = [raw_hosts] if isinstance(raw_hosts, str) else list(raw_hosts)
        ssh = entry.get("ssh") or {}
        if isinstance(ssh, dict):
            r.unknown(ssh, SSH_KEYS, f"{where}.ssh.")
            image_dir = ssh.get("imageDir")
        if not hosts:
            r.error(f"{where}: required key host is missing")
        if not image_dir:
            r.error(f"{where}: required key ssh.imageDir is missing")
    else:
        r.error(f"{where}: accesstype must be local or remote, not {access!r}")
    socket = entry.get("mungeSocketPath")
    if auth == "munge" and not socket:
        r.error(f"{where}: required key mungeSocketPath is missing")
    admins = entry.get("admins") or []
    if isinstance(admins, str):
        admins = admins.split(",")
    if not isinstance(admins, list) or not all(isinstance(a, str) for a in admins):
        r.error(f"{where}.admins must be a list of user names")
        admins = []
    return Platform(
        name=name,
        accesstype=str(access),
        munge_socket=socket,
        admins=tuple(a.strip() for a in admins if a.strip()),
        image_dir=str(image_dir) if image_dir else None,
        hosts=tuple(str(h) for h in hosts),
        entry=dict(entry),
    )


def _import_users(r: _Reader) -> str | tuple[str, ...] | None:
    users = r.data.get("ImportUsers")
    if users is None or users == "None":
        return None
    if users == "all":
        return "all"
    if isinstance(users, str):
        return tuple(n.strip() for n in users.split(",") if n.strip())
    if isinstance(users, list) and all(isinstance(n, str) for n in users):
        return tuple(n.strip() for n in users)
    r.error(f'ImportUsers must be "all", "None" or user names, not {users!r}')
    return None


def check_config(
    data: Any,
    base_dir: Path | None = None,
    source: str = "imagemanager.json",
    *,
    gateway: bool = False,
) -> tuple[GatewayConfig | None, list[str], list[str]]:
    """(the config, every error, every warning) of the decoded JSON; the config is None
    only when the JSON is not an object, and usable only when there is no error. ``gateway``
    True: the service's file, which must name its ``Platforms``; a tool converting
    images by hand needs none."""
    if not isinstance(data, dict):
        return None, [f"{source} must hold a JSON object"], []
    r = _Reader(data, source)
    r.unknown(data, TOP_KEYS, "")
    base = base_dir or Path.cwd()
    cache = r.path("CacheDirectory", None, base)
    expand = r.path("ExpandDirectory", None, base)
    for key, value in (("CacheDirectory", cache), ("ExpandDirectory", expand)):
        if value is None:
            r.error(f"required key {key} is missing")
    auth = r.string("Authentication", "munge")
    if auth not in ("munge", "mock"):
        r.error(f"Authentication must be munge or mock, not {auth!r}")
    level = str(data.get("LogLevel", "INFO")).upper()
    if level not in LOG_LEVELS:
        r.error(f"LogLevel must be one of {', '.join(LOG_LEVELS)}, not {data['LogLevel']!r}")
    platforms: dict[str, Platform] = {}
    raw_platforms = data.get("Platforms")
    if not raw_platforms:
        if gateway:
            r.error("required key Platforms is missing or empty")
    elif not isinstance(raw_platforms, dict):
        r.error("Platforms must be an object")
    else:
        for name, entry in raw_platforms.items():
            plat = _platform(r, name, entry, auth or "munge")
            if plat is not None:
                platforms[name] = plat
    metrics = data.get("Metrics", False)
    if not isinstance(metrics, bool):
        r.error(f"Metrics must be true or false, not {metrics!r}")
    retention = data.get("MetricsRetention", DEFAULT_METRICS_RETENTION)
    if retention is not None and (
        isinstance(retention, bool) or not isinstance(retention, int) or retention < 1
    ):
        r.error(f"MetricsRetention must be a whole number of rows (or null), not {retention!r}")
        retention = DEFAULT_METRICS_RETENTION
    stream = data.get("StreamConversion", True)
    if not isinstance(stream, bool):
        r.error(f"StreamConversion must be true or false, not {stream!r}")
    max_size = data.get("LayerCacheMaxSize")
    if max_size is not None:
        try:
            max_size = parse_size(max_size)
        except ValueError:
            r.error(f'LayerCacheMaxSize must be bytes or a size like "50G", not {max_size!r}')
            max_size = None
    cfg = GatewayConfig(
        cache_dir=cache or Path(),
        expand_dir=expand or Path(),
        default_location=r.string("DefaultImageLocation", "index.docker.io") or "",
        default_format=r.string("DefaultImageFormat", "squashfs") or "squashfs",
        locations=_locations(r),
        converter_options=_converter_options(r),
        platform=r.string("ImagePlatform", DEFAULT_PLATFORM) or DEFAULT_PLATFORM,
        platforms=platforms,
        worker_threads=int(r.number("WorkerThreads", 1, minimum=1)),
        log_level=LOG_LEVELS.get(level, logging.INFO),
        pull_update_timeout=r.number("PullUpdateTimeout", 300),
        pull_heartbeat_timeout=r.number("PullHeartbeatTimeout", 3600, minimum=1),
        image_expiration=r.duration("ImageExpirationTimeout", 90 * 86400.0) or 0.0,
        mongo_uri=r.string("MongoDBURI", None) or None,
        mongo_db=r.string("MongoDB", DEFAULT_MONGO_DB) or DEFAULT_MONGO_DB,
        state_dir=r.path("StateDirectory", DEFAULT_STATE_DIR, base) or Path(DEFAULT_STATE_DIR),
        metrics=bool(metrics),
        metrics_retention=retention,
        authentication=auth or "munge",
        import_users=_import_users(r),
        examiner=r.string("examiner", None) or None,
        stream_conversion=stream is not False,
        access_log=r.string("AccessLog", None) or None,
        layer_cache_max_size=max_size,
        layer_cache_max_age=r.duration("LayerCacheMaxAge", None),
        warnings=r.warnings,
    )
    # With errors too: --check goes on to look at the directories and sockets it names.
    return cfg, r.errors, r.warnings


def parse_config(
    data: Any,
    base_dir: Path | None = None,
    source: str = "imagemanager.json",
    *,
    gateway: bool = False,
) -> GatewayConfig:
    """A :class:`GatewayConfig` from the decoded JSON, or ConfigError naming every error."""
    cfg, errors, _warnings = check_config(data, base_dir, source, gateway=gateway)
    if errors or cfg is None:
        raise ConfigError("\n".join(errors))
    return cfg


def read_json(path: str | os.PathLike[str]) -> Any:
    """The decoded file, or ConfigError saying why it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read gateway config {path}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"gateway config {path} is not valid JSON: {exc}") from exc


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The given path, else ``$GWCONFIG``, else the system default."""
    return Path(path or os.environ.get("GWCONFIG") or DEFAULT_CONFIG_PATH)


def load_config(
    path: str | os.PathLike[str] | None = None, *, gateway: bool = False
) -> GatewayConfig:
    """Load the given path, else ``$GWCONFIG``, else the system default."""
    cfg_path = config_path(path)
    return parse_config(
        read_json(cfg_path), base_dir=cfg_path.parent, source=str(cfg_path), gateway=gateway
    )


def store_settings(config: GatewayConfig | Mapping[str, Any]) -> tuple[str | None, str, Path]:
    """(MongoDB URI or None, database name, state directory) of a config, or of the store
    keys alone (tests and tools open a store without a whole gateway file)."""
    if isinstance(config, GatewayConfig):
        return config.mongo_uri, config.mongo_db, config.state_dir
    r = _Reader(config, "imagemanager.json")
    state = r.string("StateDirectory", DEFAULT_STATE_DIR) or DEFAULT_STATE_DIR
    uri = r.string("MongoDBURI", None) or None
    db = r.string("MongoDB", DEFAULT_MONGO_DB) or DEFAULT_MONGO_DB
    if r.errors:
        raise ConfigError("\n".join(r.errors))
    return uri, db, Path(state)
