"""``shifterimg``: the image gateway's command-line client (docs/behaviour.md, 'shifterimg').

    shifterimg [-v] [-u users] [-g groups] pull docker:ubuntu:22.04
    shifterimg pullnb docker:ubuntu:22.04       (ask for the pull, do not wait)
    shifterimg [--json] lookup ubuntu:22.04
    shifterimg [--json] images
    shifterimg login [location]
    shifterimg rm docker:me/app:1                (a private image you pulled)
    shifterimg expire docker:ubuntu:22.04        (admins)
    shifterimg autoexpire                        (admins)
    shifterimg import /path/image.squashfs custom:mytag

Gateways, system and timeout come from ``udiRoot.conf`` (``imageGateway``, ``system``,
``gatewayTimeout``). Requests carry a munge credential; registry logins from
``~/.udiRoot/.cred`` ride in its payload, so they cross the network encrypted.
An ``https://`` gateway's certificate is checked against ``imageGatewayCAFile`` when
set, else the node's system CA store (see :func:`ca_trust`), not requests' certifi copy.

Errors are one line ``shifterimg: error: <what> ; <what to do>`` and exit status 1; a
mistake on the command line exits 2. Shifter's own wording is kept where scripts match
it (``ERROR: failed to contact the image gateway.``), with the details on the next lines.
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


PROG = "shifterimg"
ERROR = f"{PROG}: error: "
NOT_CONTACTED = "ERROR: failed to contact the image gateway."  # Shifter's words, kept


class ClientError(Exception):
    """Printed as ``shifterimg: error: <message>``, exit status 1."""


class UsageError(ClientError):
    """A command-line mistake: exit status 2, with the usage line."""


class Unreachable(ClientError):
    """No gateway answered: Shifter's line, then why for each URL (already prefixed)."""


def error(message: str) -> None:
    print(ERROR + message, file=sys.stderr)


def split_descriptor(text: str, default_type: str = "docker") -> tuple[str, str]:
    """``docker:ubuntu:22.04`` → (docker, ubuntu:22.04); a bare tag gets the default type."""
    head, sep, rest = text.partition(":")
    if sep and head in IMAGE_TYPES:
        itype, tag = head, rest
    else:
        itype, tag = default_type, text
    if not tag:
        raise UsageError(f"no image tag in '{text}' (write TYPE:TAG, e.g. docker:ubuntu:22.04)")
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
        conf_path: str = "udiRoot.conf",
        ca_file: str | None = None,
    ) -> None:
        if not urls:
            raise ClientError(
                f"no image gateway configured: set imageGateway in {conf_path} "
                "(e.g. imageGateway=https://gateway.example.org:7777)"
            )
        self.conf_path = conf_path
        self.urls = list(urls)
        random.shuffle(self.urls)  # spread the nodes of a job over every gateway
        self.system = system
        self.timeout = timeout
        self.munge_socket = munge_socket
        self.verbose = verbose
        self.ca_file = ca_file
        # Checked now, before any request: a broken key is the admin's to fix, not a
        # gateway that "failed to answer".
        self.verify, self.trusted = ca_trust(ca_file, conf_path)
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
        failures: list[str] = []
        untrusted = False  # some gateway's certificate failed verification
        for url in self.urls:
            headers = {"authentication": self._credential(logins)}  # one use each
            try:
                resp = self.session.request(
                    method,
                    f"{url.rstrip('/')}{path}",
                    json=body,
                    headers=headers,
                    timeout=self.timeout,
                    verify=self.verify,
                )
            except requests.RequestException as exc:
                reason = request_failure(exc, self.timeout, self.trusted)
                # (A host name mismatch is the URL's fault, not the CA's.)
                untrusted = untrusted or (
                    reason.startswith(VERIFY_FAILED) and "mismatch" not in reason
                )
                if self.verbose:
                    print(f"gateway {url}: {reason}", file=sys.stderr)
                failures.append(f"{ERROR}{url}: {reason}")
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
        if untrusted and self.ca_file:
            hint = (
                f"{PROG}: check that imageGatewayCAFile={self.ca_file} in {self.conf_path} "
                "is the CA that signed the gateway's certificate"
            )
        elif untrusted:
            hint = (
                f"{PROG}: if the gateway's certificate is signed by a site CA, add that CA to "
                "the system CA store (update-ca-certificates) or name its PEM file with "
                f"imageGatewayCAFile in {self.conf_path}"
            )
        else:
            hint = (
                f"{PROG}: check imageGateway in {self.conf_path} and that shifter-imagegw "
                "runs there"
            )
        raise Unreachable("\n".join([NOT_CONTACTED, *failures, hint]))


# -- which CAs an https gateway's certificate is checked against -------------------------

# The system CA store: the bundle that each distribution's ca-certificates tooling
# (update-ca-certificates, update-ca-trust) keeps current, site CAs included. requests'
# own default is certifi's copy of Mozilla's list, which no site CA ever reaches.
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Rocky, Alma, Fedora
    "/etc/ssl/ca-bundle.pem",  # SUSE
    "/etc/ssl/cert.pem",  # Alpine
)
# Variables that already mean "trust this bundle" to requests and to OpenSSL.
CA_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")
VERIFY_FAILED = "TLS certificate verify failed"


def ca_trust(ca_file: str | None, conf_path: str) -> tuple[str | bool, str]:
    """``verify=`` for requests and how to name it in messages: ``imageGatewayCAFile``
    when set (checked here), else a bundle named in the environment, else the system
    CA store, else requests' default."""
    if ca_file:
        check_ca_file(ca_file, conf_path)
        return ca_file, f"imageGatewayCAFile={ca_file}"
    for var in CA_ENV:
        value = os.environ.get(var)
        if value:
            return value, f"{var}={value}"
    for path in SYSTEM_CA_FILES:
        if os.path.isfile(path):
            return path, f"the system CA store {path}"
    return True, "requests' default CAs (no system CA store found)"


def check_ca_file(ca_file: str, conf_path: str) -> None:
    """A CA file the client can use, or a ClientError saying what is wrong with it."""
    import ssl

    where = f"imageGatewayCAFile={ca_file} in {conf_path}"
    todo = "give the PEM file of the CA that signed the gateway's certificate"
    if not ca_file.startswith("/"):
        raise ClientError(f"{where}: not an absolute path; {todo}")
    try:
        with open(ca_file, "rb"):
            pass
        ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError:
        raise ClientError(f"{where}: no PEM certificate in it; {todo}") from None
    except OSError as exc:
        raise ClientError(f"{where}: {exc.strerror}; {todo}") from None


def request_failure(
    exc: requests.RequestException, timeout: float, trusted: str = "the system CA store"
) -> str:
    """Why a request got no answer, in a few words (requests' own text is a page of
    urllib3 object reprs)."""
    import re

    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g} s (gatewayTimeout)"
    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        found = re.search(r"certificate verify failed: (.+?)(?: \(_ssl\.c|'\)|\)\)|$)", text)
        if found:
            return f"{VERIFY_FAILED}: {found.group(1).strip()} (trusted: {trusted})"
        if "WRONG_VERSION_NUMBER" in text:
            return "TLS handshake failed: the server does not speak TLS (an http:// gateway?)"
        found = re.search(r"\[SSL: [A-Z0-9_]+\] ([^(')\]]+)", text)
        return f"TLS handshake failed: {found.group(1).strip() if found else type(exc).__name__}"
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip()
    if "NameResolution" in text or "resolve" in text:
        return "host name not known"
    return type(exc).__name__


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


def do_lookup(gw: Gateway, itype: str, tag: str, as_json: bool = False) -> int:
    status, data = gw.call("GET", f"/api/lookup/{gw.system}/{itype}/{tag}/")
    if status == 200 and isinstance(data, dict) and data.get("id") not in (None, "MISSING"):
        print(json.dumps(data, sort_keys=True) if as_json else data["id"])
        return 0
    if status in (200, 404):
        error(
            f"image {itype}:{tag} is not available on {gw.system}; "
            f"pull it with: {PROG} pull {itype}:{tag}"
        )
    else:
        error(_message(data))
    return 1


def do_pull(
    gw: Gateway,
    itype: str,
    tag: str,
    users: str | None,
    groups: str | None,
    verbose: bool,
    location_logins: dict[str, str],
    wait: bool = True,
) -> int:
    """``pull`` polls until the image is ready or failed; ``pullnb`` (``wait=False``)
    asks once, prints the status line and returns, as Shifter's does."""
    body: dict[str, str] = {}
    if users:
        body["allowed_uids"] = users
    if groups:
        body["allowed_gids"] = groups
    in_place = sys.stdout.isatty() and not verbose and wait
    last = ""
    while True:
        status_code, data = gw.call(
            "POST", f"/api/pull/{gw.system}/{itype}/{tag}/", body=body, logins=location_logins
        )
        if status_code != 200 or not isinstance(data, dict):
            if in_place and last:
                print()
            error(_message(data))
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
        if state not in IN_FLIGHT or not wait:
            break
        time.sleep(0.5)
    if in_place:
        print()
    if state == "FAILURE":
        error(f"pull of {itype}:{tag} failed: {data.get('status_message')}")
        return 1
    if not wait:
        return 0 if state in IN_FLIGHT or state == "READY" else 1
    return 0 if state == "READY" else 1


def do_images(gw: Gateway, as_json: bool = False) -> int:
    status, data = gw.call("GET", f"/api/list/{gw.system}/")
    if status != 200:
        error(_message(data))
        return 1
    rows = []
    for rec in data.get("list", []):
        tags = rec.get("tag") if isinstance(rec.get("tag"), list) else [rec.get("tag")]
        for tag in tags:
            rows.append((str(tag), rec))
    if as_json:
        # One object per tag, as the table has one line per tag.
        out = [{**rec, "tag": tag} for tag, rec in sorted(rows, key=lambda r: r[0])]
        print(json.dumps(out, sort_keys=True, indent=1))
        return 0
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
        error(_message(data))
        return 1
    if mode == "autoexpire":
        for image_id in data.get("status") or []:
            print(f"expired {image_id}")
    return 0


def do_remove(gw: Gateway, itype: str, tag: str) -> int:
    """Remove a private image the caller pulled (admins: any image); prints what went."""
    status, data = gw.call("POST", f"/api/remove/{gw.system}/{itype}/{tag}/")
    if status != 200 or not isinstance(data, dict):
        error(f"cannot remove {itype}:{tag}: {_message(data)}")
        return 1
    tags = [t for t in data.get("tag") or [] if isinstance(t, str)]
    print(f"removed {itype}:{tag} (id {data.get('id')})")
    for other in sorted(tags):
        # The image goes with every tag naming it: say which other names stopped working.
        if other != _with_latest(tag):
            print(f"removed {itype}:{other} too (same image)")
    return 0


def _with_latest(tag: str) -> str:
    """The tag as the gateway stores it: without a tag part, ``:latest``."""
    return tag if ":" in tag.rsplit("/", 1)[-1] else f"{tag}:latest"


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
        error(_message(data))
        return 1
    while data.get("status") not in ("READY", "FAILURE"):
        time.sleep(0.5)
        data = _poll_import(gw, itype, tag, failures_before) or data
    if data.get("status") != "READY":
        error(f"import failed: {data.get('status_message')}")
        return 1
    print(data.get("id"))
    return 0


def _with_own_id(ids: str, own: int) -> str:
    return ids if str(own) in ids.split(",") else f"{ids},{own}"


def _import_entries(gw: Gateway, tag: str, status: str | None = None) -> list[dict[str, Any]]:
    """Queue entries (records neither READY nor EXPIRED) of ``tag``, oldest first."""
    full = _with_latest(tag)
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


MODES = ("lookup", "pull", "pullnb", "images", "login", "rm", "expire", "autoexpire", "import")


def build_parser() -> argparse.ArgumentParser:
    """The command line (also what ``make docs-man`` and the shell completion read)."""
    from shifter import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Shifter image gateway client: pull images for this system, list them, "
        "find an image's id.",
        epilog="modes: lookup TYPE:TAG (print the id) | pull TYPE:TAG (wait until ready) | "
        "pullnb TYPE:TAG (ask, do not wait) | images | login [LOCATION] | "
        "rm TYPE:TAG (remove a private image you pulled) | expire TYPE:TAG (admins) | "
        "autoexpire (admins) | import FILE [TYPE:]TAG. "
        "TYPE is docker (default: defaultImageType) or custom.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what is being done")
    parser.add_argument("-u", "--user", help="users (names or ids) allowed a private image")
    parser.add_argument("-g", "--group", help="groups (names or ids) allowed a private image")
    parser.add_argument(
        "--json", action="store_true", help="lookup and images: print JSON records"
    )
    parser.add_argument("mode", choices=MODES, help="what to do (see below)")
    parser.add_argument("args", nargs="*", metavar="ARG", help="the image, file or location")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.mode not in ("lookup", "images"):
        parser.error("--json goes with lookup and images")
    from udiroot.config import load_or_exit

    cfg = load_or_exit(trusted=False)
    system = cfg.system
    try:
        if not system:
            raise ClientError(f"no system configured: set system in {cfg.path}")
        if args.mode == "login":
            if len(args.args) > 1:
                raise UsageError("login takes at most one location")
            return do_login(
                system,
                args.args[0] if args.args else None,
                os.environ.get("SHIFTER_DEFAULT_LOCATION", "index.docker.io"),
            )
        if args.mode in ("images", "autoexpire") and args.args:
            raise UsageError(f"{args.mode} takes no arguments")
        if args.mode == "import" and len(args.args) != 2:
            raise UsageError("import needs FILE [TYPE:]TAG, e.g. import img.squashfs custom:mine")
        if args.mode not in ("images", "autoexpire", "import") and len(args.args) != 1:
            raise UsageError(f"{args.mode} needs one image, e.g. {args.mode} docker:ubuntu:22.04")
        gw = Gateway(
            cfg.gateways,
            system,
            cfg.gateway_timeout,
            os.environ.get("MUNGE_SOCKET"),
            args.verbose,
            cfg.path,
            cfg.get("imageGatewayCAFile") or None,
        )
        default_type = cfg.get("defaultImageType") or "docker"
        if args.mode == "images":
            return do_images(gw, args.json)
        if args.mode == "autoexpire":
            return do_admin(gw, "autoexpire")
        if args.mode == "import":
            itype, tag = split_descriptor(args.args[1], "custom")
            return do_import(
                gw, args.args[0], itype, tag, _ids(args.user, "user"), _ids(args.group, "group")
            )
        itype, tag = split_descriptor(args.args[0], default_type)
        if args.mode == "lookup":
            return do_lookup(gw, itype, tag, args.json)
        if args.mode == "expire":
            return do_admin(gw, "expire", itype, tag)
        if args.mode == "rm":
            return do_remove(gw, itype, tag)
        return do_pull(
            gw,
            itype,
            tag,
            _ids(args.user, "user"),
            _ids(args.group, "group"),
            args.verbose,
            read_logins(system),
            wait=args.mode == "pull",
        )
    except UsageError as exc:
        parser.error(str(exc))  # exits 2
    except Unreachable as exc:
        print(exc, file=sys.stderr)
        return 1
    except ClientError as exc:
        error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
