"""``shifter-convert``: pull one image reference into an image dir, by hand.

The gateway runs the same :class:`~imagegw.pipeline.Pipeline`; this command is for
admins (and the README's first command) to convert an image without the service.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import DEFAULT_CONFIG_PATH, ConfigError, GatewayConfig, load_config, parse_config
from .errors import ImageError


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/shifter")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "shifter"


def _parse_ids(text: str | None, what: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"ERROR: {what} must be a comma-separated list of numeric ids") from None


def _load(args: argparse.Namespace) -> tuple[GatewayConfig, Path | None]:
    path = args.config or os.environ.get("GWCONFIG")
    if path or Path(DEFAULT_CONFIG_PATH).exists():
        cfg = load_config(path or DEFAULT_CONFIG_PATH)
    else:
        state = Path(args.state_dir or _default_state_dir())
        cfg = parse_config(
            {"CacheDirectory": str(state / "cache"), "ExpandDirectory": str(state / "expand")}
        )
    if args.cache_dir:
        cfg.cache_dir = Path(args.cache_dir)
    if args.expand_dir:
        cfg.expand_dir = Path(args.expand_dir)
    if args.platform:
        cfg.platform = args.platform
    image_dir: Path | None = Path(args.image_dir) if args.image_dir else None
    if image_dir is None:
        platforms = cfg.platforms
        name = args.system or (next(iter(platforms)) if len(platforms) == 1 else None)
        plat = platforms.get(name) if name else None
        if plat is not None and plat.accesstype == "local" and plat.image_dir:
            image_dir = Path(plat.image_dir)
    return cfg, image_dir


def _credentials(path: str | None) -> dict[str, str] | None:
    """Registry credentials, ``{"<location>|default": "user:pass"}`` as in the munge payload."""
    raw = Path(path).read_text() if path else os.environ.get("SHIFTER_REGISTRY_CREDENTIALS")
    if not raw:
        return None
    try:
        creds = json.loads(raw)
    except ValueError:
        raise SystemExit(
            "ERROR: registry credentials must be JSON like "
            '{"registry.example.org": "user:password"}'
        ) from None
    if not isinstance(creds, dict) or not all(isinstance(v, str) for v in creds.values()):
        raise SystemExit("ERROR: registry credentials must map locations to 'user:password'")
    return creds


def main(argv: list[str] | None = None) -> int:
    from imagegw import __version__

    parser = argparse.ArgumentParser(
        prog="shifter-convert",
        description="Pull an image from a registry and convert it to <id>.squashfs + <id>.meta.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "reference",
        help="image reference, e.g. ubuntu:22.04 or registry.example.org:5000/team/app@sha256:...",
    )
    parser.add_argument(
        "-c",
        "--config",
        help=f"imagemanager.json (default: $GWCONFIG, else {DEFAULT_CONFIG_PATH} if present)",
    )
    parser.add_argument("--system", help="platform of imagemanager.json whose imageDir to use")
    parser.add_argument("--image-dir", help="where <id>.squashfs and <id>.meta go")
    parser.add_argument("--state-dir", help="cache and expand dirs when there is no config")
    parser.add_argument("--cache-dir", help="layer cache (overrides CacheDirectory)")
    parser.add_argument("--expand-dir", help="flattening dir (overrides ExpandDirectory)")
    parser.add_argument("--platform", help="os/arch[/variant] to pick from manifest lists")
    parser.add_argument(
        "--credentials",
        help="JSON file {location|default: 'user:pass'} (or $SHIFTER_REGISTRY_CREDENTIALS)",
    )
    parser.add_argument("-u", "--user-acl", help="comma-separated uids: makes the image private")
    parser.add_argument("-g", "--group-acl", help="comma-separated gids: makes the image private")
    parser.add_argument("--force", action="store_true", help="convert even if the image exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    args = parser.parse_args(argv)

    from .pipeline import Pipeline  # after argument errors: keeps --help fast

    try:
        cfg, image_dir = _load(args)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    if image_dir is None:
        print(
            "ERROR: no image dir: give --image-dir, or a config whose platform has "
            "local.imageDir (and --system when there are several)",
            file=sys.stderr,
        )
        return 1

    def status(state: str, message: str) -> None:
        if not args.quiet:
            print(f"{state}: {message}", file=sys.stderr)

    try:
        result = Pipeline(cfg, image_dir).pull(
            args.reference,
            credentials=_credentials(args.credentials),
            user_acl=_parse_ids(args.user_acl, "--user-acl"),
            group_acl=_parse_ids(args.group_acl, "--group-acl"),
            on_status=status,
            force=args.force,
        )
    except ImageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if not args.quiet:
        print(
            f"READY: {result.squashfs} ({result.downloaded_bytes} layer bytes downloaded, "
            f"{result.cached_layers} layers from cache)",
            file=sys.stderr,
        )
    print(result.image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
