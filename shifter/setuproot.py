"""``setupRoot`` and ``unsetupRoot``: prepare and remove a node's shared container for a job
(docs/behaviour.md, 'Runtime: setupRoot and unsetupRoot'; run by the Slurm prolog and
epilog, 'Slurm plugin').

    setupRoot [-v volmap]… [-s sshPubKey] [-u user] [-U uid] [-G gid] [-N "host/n …"]
              [-m modules] <type> <identifier>        (or one <type:identifier> word)
    unsetupRoot

Exit status of ``setupRoot`` (the Slurm prolog tells the two apart): 0 when the container
is ready; **2** (``USER_ERROR``) when the request cannot be served because of what the
user asked for (an image that is missing or that the ACL denies them, a volume that does
not parse or whose source they cannot open, an unknown or conflicting module, an invalid
ssh key, ``--local`` not allowed, an image without a shell for sshd): the job fails, the
node is fine; **1** for anything else, a fault of the node or its configuration (the
prolog fails and Slurm drains the node). The helper's ``setup`` mode uses the same two
statuses, and ``setupRoot`` becomes the helper, so its status is the helper's.

``SHIFTER_SSH_HOSTKEY`` in the environment (the Slurm plugin's job host key: the base64
body of an unencrypted OpenSSH private key, its lines joined) makes that the container's
sshd host key instead of a fresh one; it goes to the helper in a memfd, never in argv.

Root only. Like ``shifter`` they check what needs no privilege (options, image id,
volumes, modules, node list) and become ``shifter-setup``, the root-only program installed
beside the setuid ``shifter-helper`` (never setuid itself), which builds the container in
the caller's mount namespace and writes ``shifterConfig.json`` (``setup``) or unmounts it
all (``unsetup``)::

    shifter-setup setup --user NAME --uid U --gid G (--image-id ID | --local PATH)
        [--volume LIST]… --modules LIST|none [--nodes "host/N …"] [--ssh-pubkey KEY
        [--ssh-hostkey-fd N --ssh-host-pubkey KEY]] [--etc-fd N]
    shifter-setup unsetup
"""

from __future__ import annotations

import os
import sys

from shifter.frontend import (
    EXPECTED_ERRORS,
    NO_ARG,
    REQUIRED,
    Failure,
    UsageError,
    env_fd,
    error_status,
    exec_helper,
    getopt_long,
    helper_path,
    resolve_id,
    usable_image,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

SHORT = {
    "h": NO_ARG,
    "v": REQUIRED,
    "s": REQUIRED,
    "u": REQUIRED,
    "U": REQUIRED,
    "G": REQUIRED,
    "N": REQUIRED,
    "m": REQUIRED,
    "V": NO_ARG,  # Shifter's: verbose (print the configuration, then the helper's progress)
}
LONG = {"help": NO_ARG, "version": NO_ARG}

USER_ERROR = 2  # the user's request cannot be served (the helper's setup mode says 2 too)


class UserError(Failure):
    """A request that cannot be served because of the user's own input."""

SETUP_USAGE = """\
Usage: setupRoot [-V] [-v volmap]... [-s sshPubKey] [-u user] -U uid -G gid
                 [-N "host/n host/n ..."] [-m modules] <type> <identifier>

Prepare this node's container for a job (root only; the Slurm prolog runs it).
  -v VOLMAP   user volume map (from:to[:ro|:perNodeCache=size=N][;...]); repeatable
  -s KEY      the user's ssh public key
  -u USER     user name (default: the name of uid)
  -U UID      the user's uid
  -G GID      the user's primary gid
  -N NODES    node list for /var/hostsfile: "host/tasks host/tasks ..."
  -m MODULES  site modules (comma list or none; default: defaultModules)
  -V          verbose: print what will be set up, then the helper's progress
  -h, --help  show this help; --version: show the version
The image is <type> <identifier> (e.g. docker ubuntu:22.04) or one type:identifier.
With -s, SHIFTER_SSH_HOSTKEY in the environment (the job's sshd host key: the base64 of
an unencrypted OpenSSH private key, its lines joined) is the sshd's host key on every
node of the job; without it each container gets a fresh one.
"""
HOSTKEY_VAR = "SHIFTER_SSH_HOSTKEY"
KEYGEN = "/usr/bin/ssh-keygen"  # the helper's too
HOSTKEY_MAX = 12000  # base64 characters: an RSA-8192 key file is about 6,600
HOSTKEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "ssh-rsa")
UNSETUP_USAGE = """\
Usage: unsetupRoot [-V] [-h|--help] [--version]

Remove this node's prepared container (root only; the Slurm epilog runs it).
  -V   verbose: the helper's progress on stderr
"""


class SetupOptions:
    __slots__ = (
        "volumes", "ssh_key", "user", "uid", "gid", "nodes", "modules", "image", "help",
        "verbose", "version",
    )

    def __init__(self) -> None:
        self.volumes: list[str] = []
        self.ssh_key: str | None = None
        self.user: str | None = None
        self.uid: int | None = None
        self.gid: int | None = None
        self.nodes: str | None = None
        self.modules: str | None = None
        self.image: list[str] = []
        self.help = False
        self.verbose = False
        self.version = False


def parse_setup_args(argv: Sequence[str]) -> SetupOptions:
    """Options anywhere before ``--`` (GNU getopt's default ordering); the image operands
    are one ``type:identifier`` word or ``type identifier``."""
    opts = SetupOptions()
    pairs, opts.image = getopt_long(argv, SHORT, LONG, permute=True)
    for name, value in pairs:
        text = value or ""
        if name in ("h", "help"):
            opts.help = True
        elif name == "version":
            opts.version = True
        elif name == "V":
            opts.verbose = True
        elif name == "v":
            opts.volumes.append(text)
        elif name == "s":
            opts.ssh_key = text
        elif name == "u":
            opts.user = text
        elif name == "U":
            opts.uid = _id_number(text, "-U")
        elif name == "G":
            opts.gid = _id_number(text, "-G")
        elif name == "N":
            opts.nodes = text
        elif name == "m":
            opts.modules = text
    if not (opts.help or opts.version) and not 1 <= len(opts.image) <= 2:
        raise UsageError("expected the image as <type> <identifier>")
    return opts


def _id_number(text: str, option: str) -> int:
    if not text or len(text) > 10 or any(c not in "0123456789" for c in text):
        raise UsageError(f"{option} needs a numeric id, not '{text}'")
    number = int(text)
    if number > 0xFFFFFFFE:
        raise UsageError(f"{option} id {text} is out of range")
    return number


def plan_setup(opts: SetupOptions) -> list[str]:
    """The helper's ``setup`` argv. Raises :class:`Failure` or a rule module's error."""
    from udiroot.config import load_or_exit
    from udiroot.descriptor import make_request, parse_descriptor
    from udiroot.groups import container_files
    from udiroot.hostsfile import parse_node_list
    from udiroot.modules import select_modules
    from udiroot.volumes import parse_user_volumes

    if opts.uid is None or opts.gid is None:
        raise Failure("setupRoot: -U uid and -G gid are required")
    if opts.uid == 0 or opts.gid == 0:
        raise Failure("Failed to lookup username or attempted to run as root.\n"
                      "setupRoot: containers never run as root: give the job owner's -U and -G")
    user = opts.user or _user_name(opts.uid)

    cfg = load_or_exit()
    if opts.nodes is not None:
        parse_node_list(opts.nodes)  # Slurm's, not the user's

    # From here on every check is of what the user asked for.
    try:
        allow_local = cfg.flag("allowLocalChroot")
        if len(opts.image) == 2:
            request = make_request(opts.image[0], opts.image[1], allow_local)
        else:
            request = parse_descriptor(opts.image[0], cfg.get("defaultImageType"), allow_local)
        volumes = [v for v in opts.volumes if v.strip()]
        for text in volumes:
            parse_user_volumes(text)
        modules = select_modules(cfg, opts.modules)
        if request.type == "local":
            target = ["--local", request.tag]
        else:
            image_id = resolve_id(cfg, request)
            target = ["--image-id", image_id]
            usable_image(cfg, image_id, opts.uid, opts.gid, _groups(user, opts.gid))
    except Failure as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        if not type(exc).__module__.startswith("udiroot."):
            raise
        raise UserError(str(exc)) from None

    argv = [setup_path(os.environ), "setup", "--user", user, "--uid", str(opts.uid)]
    argv += ["--gid", str(opts.gid), *target]
    for text in volumes:
        argv += ["--volume", text]
    argv += ["--modules", ",".join(m.name for m in modules) or "none"]
    if opts.nodes is not None:
        argv += ["--nodes", opts.nodes]
    if opts.ssh_key is not None:
        argv += ["--ssh-pubkey", opts.ssh_key.strip()]  # a .pub file's line, newline and all
    # The host's groups, as shifter-setup takes them (getgrouplist), gid 0 as the primary.
    groups = [g or opts.gid for g in _groups(user, opts.gid)]
    files = container_files(cfg, user, opts.gid, [g for g in groups if g != opts.gid])
    if files:
        argv += ["--etc-fd", str(env_fd(files, "shifter-etc"))]
    if opts.verbose:
        # Shifter's -V printed its setup and udiRoot settings to stdout: ours says the same
        # things as the request it will make of the helper.
        print(f"setupRoot: udiRoot.conf {cfg.path}")
        print(f"setupRoot: user {user} uid {opts.uid} gid {opts.gid}")
        print(f"setupRoot: image {request}" + (f" = {target[1]}" if target[0] != "--local" else ""))
        print(f"setupRoot: volumes {';'.join(volumes) or '(none)'}")
        print(f"setupRoot: modules {','.join(m.name for m in modules) or '(none)'}")
        print(f"setupRoot: nodes {opts.nodes or '(none)'}")
        argv.append("--verbose")
    return argv


def setup_path(environ: Mapping[str, str]) -> str:
    """``shifter-setup`` beside the helper (``$SHIFTER_HELPER`` or the installed path):
    both are installed in one directory, and the test builds too."""
    return os.path.join(os.path.dirname(helper_path(environ)), "shifter-setup")


def job_host_key(body: str) -> tuple[str, str]:
    """``SHIFTER_SSH_HOSTKEY`` → (the private key file, its public key line). The body is
    an ``openssh-key-v1`` blob: magic, cipher and kdf names (``none``: sshd cannot use a
    key with a passphrase), kdf options, the key count (1), then the public key blob,
    whose first string is its type."""
    import base64
    import binascii

    problem = f"{HOSTKEY_VAR} is not the base64 of an unencrypted OpenSSH private key"
    if not 0 < len(body) <= HOSTKEY_MAX:
        raise UserError(f"setupRoot: {problem} (empty or too long)")
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"setupRoot: {problem} (not base64)") from None
    magic = b"openssh-key-v1\0"
    fields: list[bytes] = []
    at = len(magic)
    try:
        if not blob.startswith(magic):
            raise ValueError("no openssh-key-v1 header")
        for _ in range(3):  # cipher, kdf, kdf options
            fields.append(_ssh_string(blob, at))
            at += 4 + len(fields[-1])
        count = int.from_bytes(blob[at:at + 4], "big")
        public = _ssh_string(blob, at + 4)
        kind = _ssh_string(public, 0).decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"setupRoot: {problem} ({exc})") from None
    if fields[0] != b"none" or fields[1] != b"none":
        raise UserError(f"setupRoot: {problem} (it has a passphrase)")
    if count != 1 or kind not in HOSTKEY_TYPES:
        raise UserError(f"setupRoot: {problem} (one key of type {', '.join(HOSTKEY_TYPES)})")
    lines = [body[i:i + 70] for i in range(0, len(body), 70)]  # as ssh-keygen writes it
    pem = ("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines) +
           "\n-----END OPENSSH PRIVATE KEY-----\n")
    return pem, f"{kind} {base64.b64encode(public).decode('ascii')}"


def _ssh_string(blob: bytes, at: int) -> bytes:
    """The SSH wire format's string at offset ``at``: a 32-bit length, then the bytes."""
    if at + 4 > len(blob):
        raise ValueError("truncated")
    n = int.from_bytes(blob[at:at + 4], "big")
    if at + 4 + n > len(blob):
        raise ValueError("truncated")
    return blob[at + 4:at + 4 + n]


def host_key_args(body: str, uid: int, gid: int) -> list[str]:
    """The helper's options for the job's host key: the private key in a memfd that the
    helper inherits (argv is readable by anybody in /proc), the public line in argv.
    ``ssh-keygen -y``, run as the user, must read the same public key out of the private
    part: a key sshd cannot load is the user's error (status 2), found before anything is
    built, not a failed sshd that would drain the node."""
    import subprocess

    pem, public = job_host_key(body)
    data = pem.encode("ascii")
    fd = os.memfd_create("shifter-job-host-key", 0)  # inherited by the helper
    if os.write(fd, data) != len(data):
        raise Failure("setupRoot: cannot pass the job host key on (short write)")
    os.fchown(fd, uid, gid)  # ssh-keygen wants its key file the user's own, 0600
    os.fchmod(fd, 0o600)
    try:
        proc = subprocess.run(
            [KEYGEN, "-y", "-f", f"/proc/self/fd/{fd}"], pass_fds=(fd,), user=uid,
            group=gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/",
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Failure(f"setupRoot: cannot check the job's ssh host key with {KEYGEN}: "
                      f"{exc}") from None
    derived = proc.stdout.split()[:2]
    if proc.returncode != 0 or derived != public.split():
        raise UserError(f"setupRoot: {HOSTKEY_VAR} is not a usable ssh host key: "
                        f"{proc.stderr.strip() or 'its private and public parts differ'}")
    return ["--ssh-hostkey-fd", str(fd), "--ssh-host-pubkey", public]


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise Failure(f"setupRoot: no user with uid {uid}; give the name with -u") from None


def _groups(user: str, gid: int) -> list[int]:
    """The user's supplementary groups for the ACL pre-check (the helper decides)."""
    try:
        return os.getgrouplist(user, gid)
    except OSError:
        return []


def _run(argv: Sequence[str] | None, name: str, body: Callable[[list[str]], int]) -> int:
    """Shared error handling of both mains."""
    try:
        return body(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        # 1, not 2: the prolog reads 2 as "the user's fault" and a bad command line is the
        # prolog's (or an admin's), never the job owner's.
        print(f"{name}: error: {exc}\nTry '{name} -h' for more information.", file=sys.stderr)
        return 1
    except UserError as exc:
        print(exc, file=sys.stderr)
        return USER_ERROR
    except EXPECTED_ERRORS as exc:
        return error_status(exc)


def _setup(args: list[str]) -> int:
    opts = parse_setup_args(args)
    if opts.help:
        sys.stdout.write(SETUP_USAGE)
        return 0
    if opts.version:
        return _version("setupRoot")
    if os.getuid() != 0:
        raise Failure("setupRoot: must be run as root")
    host_key = os.environ.pop(HOSTKEY_VAR, None)  # not in the helper's environment either
    argv = plan_setup(opts)
    if host_key is not None and opts.ssh_key is not None:
        assert opts.uid is not None and opts.gid is not None  # plan_setup checked them
        argv += host_key_args(host_key, opts.uid, opts.gid)
    return exec_helper(argv)


def _unsetup(args: list[str]) -> int:
    pairs, rest = getopt_long(args, {"h": NO_ARG, "V": NO_ARG}, LONG)
    names = {name for name, _ in pairs}
    if names & {"h", "help"}:
        sys.stdout.write(UNSETUP_USAGE)
        return 0
    if "version" in names:
        return _version("unsetupRoot")
    if rest:
        raise UsageError(f"unexpected argument '{rest[0]}'")
    if os.getuid() != 0:
        raise Failure("unsetupRoot: must be run as root")
    verbose = ["--verbose"] if "V" in names else []
    return exec_helper([setup_path(os.environ), "unsetup", *verbose])


def _version(name: str) -> int:
    from shifter import __version__

    print(f"{name} {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``setupRoot``: returns 2 for a user error, 1 for any other; on success it does not
    return (exec), and the helper's status (0, 2 or 1) is setupRoot's."""
    return _run(argv, "setupRoot", _setup)


def main_unsetup(argv: Sequence[str] | None = None) -> int:
    """``unsetupRoot``: returns 1 on any error; on success it does not return (exec)."""
    return _run(argv, "unsetupRoot", _unsetup)


if __name__ == "__main__":
    sys.exit(main())
