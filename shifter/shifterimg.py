"""``shifterimg``: the image gateway's command-line client (behaviour spec §5).

    shifterimg [-v] [-u users] [-g groups] pull docker:ubuntu:22.04
    shifterimg lookup ubuntu:22.04
    shifterimg images
    shifterimg login [location]
    shifterimg expire docker:ubuntu:22.04        (admins)
    shifterimg autoexpire                        (admins)
    shifterimg import /path/image.squashfs custom:mytag

Gateways, system and timeout come from ``udiRoot.conf`` (``imageGateway``, ``system``,
``gatewayTimeout``). Requests carry a munge credential; registry logins from
``~/.udiRoot/.cred`` ride in its payload, so they cross the network encrypted.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import grp
import io
import json
import os
import pwd
import random
import sys
import time
from pathlib import Path
from typing import Any

import requests

IN_FLIGHT = ("INIT", "PENDING", "PULLING", "EXAMINATION", "CONVERSION", "TRANSFER")
IMAGE_TYPES = ("docker", "custom")


class ClientError(Exception):
    """Printed as ``ERROR: <message>``, exit status 1."""


def split_descriptor(text: str, default_type: str = "docker") -> tuple[str, str]:
    """``docker:ubuntu:22.04`` → (docker, ubuntu:22.04); a bare tag gets the default type."""
    head, sep, rest = text.partition(":")
    if sep and head in IMAGE_TYPES:
        itype, tag = head, rest
    else:
        itype, tag = default_type, text
    if not tag:
        raise ClientError(f"no image tag in '{text}'")
    return itype, tag


def _ids(text: str | None, kind: str) -> str | None:
    """Comma list of names or ids → comma list of ids."""
    if not text:
        return None
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item.isdigit():
            out.append(item)
            continue
        try:
            out.append(
                str(pwd.getpwnam(item).pw_uid if kind == "user" else grp.getgrnam(item).gr_gid)
            )
        except KeyError:
            raise ClientError(f"unknown {kind} '{item}'") from None
    return ",".join(out)


# -- stored registry logins ---------------------------------------------------------------


def cred_path() -> Path:
    return Path.home() / ".udiRoot" / ".cred"


def read_logins(system: str) -> dict[str, str]:
    """``{location: "user:pass"}`` stored for ``system``."""
    path = cred_path()
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        sys_name, _, location = key.partition(":")
        if sep and sys_name == system and location:
            try:
                out[location] = base64.b64decode(value).decode()
            except (ValueError, UnicodeDecodeError):
                continue
    return out


def store_login(system: str, location: str, user: str, password: str) -> None:
    """Replace the line for (system, location) in ``~/.udiRoot/.cred`` (dir 0700, file 0600).

    Stored base64-encoded, as docker stores logins: a munge credential would expire
    within munged's maximum TTL (an hour by default), long before the login should.
    """
    path = cred_path()
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    keep = []
    if path.exists():
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.partition("=")[0] != f"{system}:{location}"
        ]
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    keep.append(f"{system}:{location}={value}")
    tmp = path.with_name(".cred.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(keep) + "\n")
    os.replace(tmp, path)


# -- talking to the gateway -------------------------------------------------------------


class Gateway:
    def __init__(
        self,
        urls: list[str],
        system: str,
        timeout: float,
        munge_socket: str | None = None,
        verbose: bool = False,
    ) -> None:
        if not urls:
            raise ClientError("no image gateway configured (imageGateway in udiRoot.conf)")
        self.urls = list(urls)
        random.shuffle(self.urls)  # spread the nodes of a job over every gateway
        self.system = system
        self.timeout = timeout
        self.munge_socket = munge_socket
        self.verbose = verbose
        self.session = requests.Session()

    def _credential(self, logins: dict[str, str] | None) -> str:
        from imagegw import munge

        payload = json.dumps({"authorized_locations": logins}).encode() if logins else b""
        try:
            return munge.encode(payload, socket=self.munge_socket)
        except munge.MungeError as exc:
            raise ClientError(str(exc)) from None

    def call(
        self, method: str, path: str, *, body: Any = None, logins: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        unavailable: tuple[int, Any] | None = None
        for url in self.urls:
            headers = {"authentication": self._credential(logins)}  # one use each
            try:
                resp = self.session.request(
                    method,
                    f"{url.rstrip('/')}{path}",
                    json=body,
                    headers=headers,
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                if self.verbose:
                    print(f"gateway {url}: {exc}", file=sys.stderr)
                continue
            answer = resp.status_code, _body(resp)
            if resp.status_code in (502, 503, 504):
                # Another gateway may do better; if none does, this one's own words
                # (say, its munged is down) beat "failed to contact".
                if self.verbose:
                    print(f"gateway {url}: {_message(answer[1])}", file=sys.stderr)
                unavailable = unavailable or answer
                continue
            return answer
        if unavailable is not None:
            return unavailable
        raise ClientError("failed to contact the image gateway.")


def _body(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        text = " ".join(resp.text.split())[:200]
        return {"message": f"image gateway answered HTTP {resp.status_code} {resp.reason}: {text}"}


def _message(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data)
    return str(data)


def _stamp(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- modes ------------------------------------------------------------------------------


def do_lookup(gw: Gateway, itype: str, tag: str) -> int:
    status, data = gw.call("GET", f"/api/lookup/{gw.system}/{itype}/{tag}/")
    if status == 200 and isinstance(data, dict) and data.get("id") not in (None, "MISSING"):
        print(data["id"])
        return 0
    if status != 404:
        print(f"ERROR: {_message(data)}", file=sys.stderr)
    return 1


def do_pull(
    gw: Gateway,
    itype: str,
    tag: str,
    users: str | None,
    groups: str | None,
    verbose: bool,
    location_logins: dict[str, str],
) -> int:
    body: dict[str, str] = {}
    if users:
        body["allowed_uids"] = users
    if groups:
        body["allowed_gids"] = groups
    in_place = sys.stdout.isatty() and not verbose
    last = ""
    while True:
        status_code, data = gw.call(
            "POST", f"/api/pull/{gw.system}/{itype}/{tag}/", body=body, logins=location_logins
        )
        if status_code != 200 or not isinstance(data, dict):
            if in_place and last:
                print()
            print(f"ERROR: {_message(data)}", file=sys.stderr)
            return 1
        state = str(data.get("status"))
        line = f"{_stamp()} Pulling Image: {itype}:{tag}, status: {state}"
        progress = data.get("progress")
        if in_place and isinstance(progress, dict) and state == "PULLING":
            line += (
                f" ({progress.get('layers_done', 0)} layers, "
                f"{_human(progress.get('bytes_done', 0))} of "
                f"{_human(progress.get('bytes_total', 0))})"
            )
        if in_place:
            print("\r" + line.ljust(len(last)), end="", flush=True)
        elif line.rsplit(" ", 1)[-1] != last.rsplit(" ", 1)[-1] or verbose:
            print(line, flush=True)
        last = line
        if state not in IN_FLIGHT:
            break
        time.sleep(0.5)
    if in_place:
        print()
    if state == "FAILURE":
        print(f"ERROR: pull failed: {data.get('status_message')}", file=sys.stderr)
        return 1
    return 0 if state == "READY" else 1


def do_images(gw: Gateway) -> int:
    status, data = gw.call("GET", f"/api/list/{gw.system}/")
    if status != 200:
        print(f"ERROR: {_message(data)}", file=sys.stderr)
        return 1
    rows = []
    for rec in data.get("list", []):
        tags = rec.get("tag") if isinstance(rec.get("tag"), list) else [rec.get("tag")]
        for tag in tags:
            rows.append((str(tag), rec))
    for tag, rec in sorted(rows, key=lambda r: r[0]):
        when = rec.get("last_pull")
        stamp = _stamp(float(when)) if isinstance(when, int | float) else "MISSING"
        print(
            "%-10s %-10s %-8s %-.10s   %s %-30s"  # noqa: UP031 - Shifter's exact layout
            % (rec.get("system"), rec.get("itype"), rec.get("status"), rec.get("id"), stamp, tag)
        )
    return 0


def do_admin(gw: Gateway, mode: str, itype: str = "", tag: str = "") -> int:
    path = (
        f"/api/expire/{gw.system}/{itype}/{tag}/"
        if mode == "expire"
        else f"/api/autoexpire/{gw.system}/"
    )
    status, data = gw.call("GET", path)
    if status != 200:
        print(f"ERROR: {_message(data)}", file=sys.stderr)
        return 1
    if mode == "autoexpire":
        for image_id in data.get("status") or []:
            print(f"expired {image_id}")
    return 0


def do_import(
    gw: Gateway, path: str, itype: str, tag: str, users: str | None, groups: str | None
) -> int:
    body = {"filepath": os.path.abspath(path), "format": "squashfs"}
    # The importer can always read what they import, as a private pull's requester can
    # (the gateway appends the caller to a pull's ACL, not to an import's): without this,
    # `-u someone import ...` succeeds yet its own lookup, and so this client, says failed.
    if users:
        body["allowed_uids"] = _with_own_id(users, os.getuid())
    if groups:
        body["allowed_gids"] = _with_own_id(groups, os.getgid())
    # FAILURE records of earlier imports of this tag linger in the queue for a while;
    # only one more than now is this import's.
    failures_before = len(_import_entries(gw, tag, "FAILURE"))
    status, data = gw.call("POST", f"/api/doimport/{gw.system}/{itype}/{tag}/", body=body)
    if status != 200 or not isinstance(data, dict):
        print(f"ERROR: {_message(data)}", file=sys.stderr)
        return 1
    while data.get("status") not in ("READY", "FAILURE"):
        time.sleep(0.5)
        data = _poll_import(gw, itype, tag, failures_before) or data
    if data.get("status") != "READY":
        print(f"ERROR: import failed: {data.get('status_message')}", file=sys.stderr)
        return 1
    print(data.get("id"))
    return 0


def _with_own_id(ids: str, own: int) -> str:
    return ids if str(own) in ids.split(",") else f"{ids},{own}"


def _import_entries(gw: Gateway, tag: str, status: str | None = None) -> list[dict[str, Any]]:
    """Queue entries (records neither READY nor EXPIRED) of ``tag``, oldest first."""
    full = tag if ":" in tag.rsplit("/", 1)[-1] else f"{tag}:latest"
    code, data = gw.call("GET", f"/api/queue/{gw.system}/")
    if code != 200 or not isinstance(data, dict):
        raise ClientError(f"cannot follow the import: {_message(data)}")
    return [
        e
        for e in data.get("list") or []
        if isinstance(e, dict)
        and e.get("image") == full
        and (status is None or e.get("status") == status)
    ]


def _poll_import(gw: Gateway, itype: str, tag: str, failures_before: int) -> dict[str, Any] | None:
    """The import's record once it ended, None while it runs."""
    entries = _import_entries(gw, tag)
    if any(e.get("status") != "FAILURE" for e in entries):
        return None  # still running
    failures = [e for e in entries if e.get("status") == "FAILURE"]
    if len(failures) > failures_before:
        return failures[-1]
    # Done and not failed: the tag now names the imported image.
    status, data = gw.call("GET", f"/api/lookup/{gw.system}/{itype}/{tag}/")
    if status == 200 and isinstance(data, dict):
        return data
    return {"status": "FAILURE", "status_message": _message(data)}


def do_login(system: str, location: str | None, default_location: str) -> int:
    loc = location or default_location
    try:
        # Unbuffered raw I/O, as getpass does: open("/dev/tty", "r+") wants a seekable
        # file and fails on every real terminal.
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        raise ClientError("login needs a terminal to ask for the username") from None
    with io.TextIOWrapper(io.FileIO(fd, "r+"), write_through=True) as tty:
        tty.write(f"{loc} username: ")
        user = tty.readline().strip()
    if not user:
        raise ClientError("no username given")
    if ":" in user:
        # The gateway splits "user:pass" at the first colon.
        raise ClientError("a username cannot contain ':'")
    password = getpass.getpass(f"{loc} password: ")
    store_login(system, loc, user, password)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shifterimg", description="Shifter image gateway client")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-u", "--user", help="users (names or ids) allowed a private image")
    parser.add_argument("-g", "--group", help="groups (names or ids) allowed a private image")
    parser.add_argument(
        "mode", choices=("lookup", "pull", "images", "login", "expire", "autoexpire", "import")
    )
    parser.add_argument("args", nargs="*")
    args = parser.parse_args(argv)
    from udiroot.config import load_or_exit

    cfg = load_or_exit(trusted=False)
    system = cfg.system
    try:
        if not system:
            raise ClientError("no system configured (system in udiRoot.conf)")
        if args.mode == "login":
            return do_login(
                system,
                args.args[0] if args.args else None,
                os.environ.get("SHIFTER_DEFAULT_LOCATION", "index.docker.io"),
            )
        gw = Gateway(
            cfg.gateways, system, cfg.gateway_timeout, os.environ.get("MUNGE_SOCKET"), args.verbose
        )
        default_type = cfg.get("defaultImageType") or "docker"
        if args.mode == "images":
            return do_images(gw)
        if args.mode == "autoexpire":
            return do_admin(gw, "autoexpire")
        if args.mode == "import":
            if len(args.args) != 2:
                raise ClientError("usage: shifterimg import <file.squashfs> [custom:]<tag>")
            itype, tag = split_descriptor(args.args[1], "custom")
            return do_import(
                gw, args.args[0], itype, tag, _ids(args.user, "user"), _ids(args.group, "group")
            )
        if len(args.args) != 1:
            raise ClientError(f"usage: shifterimg {args.mode} [type:]tag")
        itype, tag = split_descriptor(args.args[0], default_type)
        if args.mode == "lookup":
            return do_lookup(gw, itype, tag)
        if args.mode == "expire":
            return do_admin(gw, "expire", itype, tag)
        return do_pull(
            gw,
            itype,
            tag,
            _ids(args.user, "user"),
            _ids(args.group, "group"),
            args.verbose,
            read_logins(system),
        )
    except ClientError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
