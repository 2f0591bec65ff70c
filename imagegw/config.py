"""Reading ``imagemanager.json`` as sites write it today.

Only the keys the pipeline and gateway use are interpreted; unknown keys are kept in
``raw`` so a site file with extra entries still loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/shifter/imagemanager.json"
DEFAULT_PLATFORM = "linux/amd64"


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
class GatewayConfig:
    cache_dir: Path
    expand_dir: Path
    default_location: str = "index.docker.io"
    default_format: str = "squashfs"
    locations: dict[str, Location] = field(default_factory=dict)
    converter_options: dict[str, list[str]] = field(default_factory=dict)
    platform: str = DEFAULT_PLATFORM
    raw: dict[str, Any] = field(default_factory=dict)

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


def _location_url(name: str, entry: dict[str, Any]) -> str:
    url = entry.get("url")
    if not url:
        if name in ("index.docker.io", "docker.io"):
            return "https://registry-1.docker.io"
        return f"https://{name}"
    url = str(url).rstrip("/")
    if "://" not in url:
        url = "https://" + url
    return url


def _converter_options(raw: Any) -> dict[str, list[str]]:
    """``ConverterOptions`` maps a format to args given as one string or a list."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("ConverterOptions must be an object mapping a format to arguments")
    out: dict[str, list[str]] = {}
    for fmt, args in raw.items():
        if isinstance(args, str):
            out[fmt] = args.split()
        elif isinstance(args, list) and all(isinstance(a, str) for a in args):
            out[fmt] = list(args)
        else:
            raise ConfigError(f"ConverterOptions.{fmt} must be a string or a list of strings")
    return out


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> GatewayConfig:
    """Build a :class:`GatewayConfig` from the decoded JSON of ``imagemanager.json``."""
    if not isinstance(data, dict):
        raise ConfigError("imagemanager.json must hold a JSON object")
    for key in ("CacheDirectory", "ExpandDirectory"):
        if not data.get(key):
            raise ConfigError(f"imagemanager.json: required key {key} is missing")
    locations: dict[str, Location] = {}
    for name, entry in (data.get("Locations") or {}).items():
        if not isinstance(entry, dict):
            raise ConfigError(f"Locations.{name} must be an object")
        locations[name] = Location(
            name=name,
            url=_location_url(name, entry),
            sslcacert=entry.get("sslcacert"),
            auth_method=entry.get("authMethod") or entry.get("authentication"),
            remotetype=entry.get("remotetype", "dockerv2"),
        )
    base = base_dir or Path.cwd()
    return GatewayConfig(
        cache_dir=base / data["CacheDirectory"],
        expand_dir=base / data["ExpandDirectory"],
        default_location=data.get("DefaultImageLocation", "index.docker.io"),
        default_format=data.get("DefaultImageFormat", "squashfs"),
        locations=locations,
        converter_options=_converter_options(data.get("ConverterOptions")),
        platform=data.get("ImagePlatform", DEFAULT_PLATFORM),
        raw=data,
    )


def load_config(path: str | os.PathLike[str] | None = None) -> GatewayConfig:
    """Load ``$GWCONFIG``, else the given path, else the system default."""
    cfg_path = Path(path or os.environ.get("GWCONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = cfg_path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read gateway config {cfg_path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"gateway config {cfg_path} is not valid JSON: {exc}") from exc
    return parse_config(data, base_dir=cfg_path.parent)
