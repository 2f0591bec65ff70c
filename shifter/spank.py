"""``shifter-spank``: the Slurm plugin's submit-time half (docs/behaviour.md, 'Slurm plugin').

    shifter-spank check [--image=TYPE:TAG] [--volume=LIST]… [--module=LIST] [--ccm]
                        [--ssh-key] [--pull-timeout=SECONDS]

The SPANK plugin (``slurm/shifter_spank.c``) runs this as the submitting user, in
``sbatch``/``salloc``/``srun`` (allocator and local contexts), with the values of its
options. It checks them with the runtime's own rules (the same code ``shifter`` and
``setupRoot`` run later, so a submission is refused exactly when the job would fail),
resolves a tag to its image id once (the gateway's tag index in ``imagePath``, else
``shifterimg lookup``), checks the image exists and its ACL lets the user in, and prints
what the job carries, one ``NAME=VALUE`` per line on stdout::

    SHIFTER_IMAGE=<id>
    SHIFTER_IMAGETYPE=id
    SHIFTER_IMAGEREQUEST=<the --image value as given>
    SHIFTER_VOLUME=<the --volume values joined with ;>     (when given)
    SHIFTER_MODULE=<the --module value>                      (when given)
    SHIFTER_SSH_PUBKEY=<the user's job key>                  (with --ssh-key)
    SHIFTER_SSH_HOSTKEY=<a fresh host key for the job's sshd> (with --ssh-key)

With ``--pull-timeout`` (the plugin gives it when the submission makes a new job and
plugstack ``pull_timeout`` is not 0), a docker tag the system does not have is pulled
first, as the user, with ``shifterimg pull``: its progress lines go to stderr (the
user's terminal), and the job is pinned to the id that pull made. A pull that fails
stops the submission with the gateway's reason; one that takes longer than the timeout
is left to the gateway and the submission stops (see :func:`pull_on_demand`).

Any problem is one message on stderr (it reaches the user's terminal as it is) and exit
status 1, and nothing on stdout. The plugin only passes strings and reads these lines.
``--ssh-key`` (plugstack ``enable_sshd=1``) makes ``~/.shifter/id_ed25519`` with
``ssh-keygen`` if it is missing and prints its public half, for ``setupRoot -s``; and
it makes a fresh host key pair for the job's sshd and prints the private key (the base64
between its BEGIN and END lines, joined): the plugin gives it only to the prolog, whose
``setupRoot`` makes it the sshd's host key on every node of the job and the one key the
containers' ssh client trusts. It is stored nowhere else.
"""

from __future__ import annotations

import os
import sys

from shifter.frontend import (
    EXPECTED_ERRORS,
    LOOKUP_MISSING,
    NO_ARG,
    NOT_FOUND,
    REQUIRED,
    Failure,
    UsageError,
    error_status,
    getopt_long,
    resolve_id,
    shifterimg_path,
    usable_image,
    valid_id,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from udiroot.config import UdiRootConfig
    from udiroot.descriptor import ImageRequest

NO_IMAGE_FOR_VOLUMES = "Cannot specify shifter volumes without specifying the image first!"
NO_IMAGE_FOR_MODULES = "Cannot specify shifter modules without specifying the image first!"
CCM_AND_IMAGE = "Cannot specify --ccm mode with --image: CCM runs the node's own root"
KEY_NAME = "id_ed25519"

LONG = {"image": REQUIRED, "volume": REQUIRED, "module": REQUIRED, "ccm": NO_ARG,
        "ssh-key": NO_ARG, "pull-timeout": REQUIRED, "help": NO_ARG}

USAGE = """\
Usage: shifter-spank check [--image=TYPE:TAG] [--volume=LIST]... [--module=LIST]
                           [--ccm] [--ssh-key] [--pull-timeout=SECONDS]

Check the Shifter options of a Slurm submission and print the job's NAME=VALUE lines
(run by the Shifter SPANK plugin as the submitting user).
"""


class Request:
    __slots__ = ("image", "volumes", "module", "ccm", "ssh_key", "pull_timeout", "help")

    def __init__(self) -> None:
        self.image: str | None = None
        self.volumes: list[str] = []
        self.module: str | None = None
        self.ccm = False
        self.ssh_key = False
        self.pull_timeout: int | None = None  # None: never pull at submit
        self.help = False


def parse_args(argv: Sequence[str]) -> Request:
    if not argv or argv[0] != "check":
        if argv and argv[0] in ("-h", "--help"):
            req = Request()
            req.help = True
            return req
        raise UsageError("expected the subcommand 'check'")
    pairs, rest = getopt_long(argv[1:], {}, LONG)
    if rest:
        raise UsageError(f"unexpected argument '{rest[0]}'")
    req = Request()
    for name, value in pairs:
        if name == "image":
            req.image = value or ""
        elif name == "volume":
            req.volumes.append(value or "")
        elif name == "module":
            req.module = value or ""
        elif name == "ccm":
            req.ccm = True
        elif name == "ssh-key":
            req.ssh_key = True
        elif name == "pull-timeout":
            req.pull_timeout = parse_pull_timeout(value or "")
        elif name == "help":
            req.help = True
    return req


def check(req: Request) -> list[tuple[str, str]]:
    """The job's variables, in order. Raises :class:`Failure` or a rule module's
    ``ValueError`` with the message to print."""
    from udiroot.config import load_or_exit
    from udiroot.descriptor import NO_IMAGE, parse_descriptor
    from udiroot.modules import select_modules
    from udiroot.volumes import parse_user_volumes

    volumes = [v for v in req.volumes if v.strip()]
    if req.ccm and req.image is not None:
        raise Failure(CCM_AND_IMAGE)
    image = "local:/" if req.ccm else req.image
    if image is None:
        if volumes:
            raise Failure(NO_IMAGE_FOR_VOLUMES)
        if req.module is not None:
            raise Failure(NO_IMAGE_FOR_MODULES)
        return []
    if not image.strip():
        raise Failure(NO_IMAGE)

    cfg = load_or_exit()
    request = parse_descriptor(image, cfg.get("defaultImageType"), cfg.flag("allowLocalChroot"))
    volume_text = ";".join(volumes)
    if volume_text:
        parse_user_volumes(volume_text)
    if req.module is not None:
        select_modules(cfg, req.module)

    out: list[tuple[str, str]] = []
    if request.type == "local":
        out += [("SHIFTER_IMAGE", request.tag), ("SHIFTER_IMAGETYPE", "local")]
    else:
        image_id = resolve_or_pull(cfg, request, req.pull_timeout)
        try:
            usable_image(cfg, image_id, os.getuid(), os.getgid(), os.getgroups())
        except Failure as exc:
            raise Failure(f"{exc} ({request})") from None
        out += [("SHIFTER_IMAGE", image_id), ("SHIFTER_IMAGETYPE", "id")]
    out.append(("SHIFTER_IMAGEREQUEST", image))
    if volume_text:
        out.append(("SHIFTER_VOLUME", volume_text))
    if req.module is not None:
        out.append(("SHIFTER_MODULE", req.module))
    if req.ccm:
        out.append(("SHIFTER_CCM", "1"))
    if req.ssh_key:
        out.append(("SHIFTER_SSH_PUBKEY", job_public_key()))
        out.append(("SHIFTER_SSH_HOSTKEY", job_host_key()))
    for name, value in out:
        if "\n" in value or "\0" in value:
            raise Failure(f"shifter: {name} cannot contain a newline")
    return out


# -- images on demand: pulled at submit --------------------------------------------------


def parse_pull_timeout(text: str) -> int:
    """Seconds, a whole number from 1 to a day (the plugin sends none for 0)."""
    if not text.isdigit() or not 1 <= int(text) <= 86400:
        raise UsageError(f"--pull-timeout must be 1 to 86400 seconds, not '{text}'")
    return int(text)


def resolve_or_pull(cfg: UdiRootConfig, request: ImageRequest, pull_timeout: int | None) -> str:
    """The image id of ``request``, as the gateway names it now: one lookup per job,
    whatever its size (the job's tasks then run the pinned id and ask nobody). A gateway
    that cannot be asked refuses the submission saying so, even for a tag the local index
    holds: the job would otherwise be pinned to what the index said when the gateway last
    wrote it (docs/behaviour.md, 'Slurm plugin'). A docker tag the gateway lacks is
    pulled first when ``pull_timeout`` is given (the pyxis way: the submission waits)."""
    if request.type == "id":
        return request.tag
    found, lacks = ask_gateway(request)
    if found is not None:
        return found
    descriptor = f"{request.type}:{request.tag}"
    if not lacks:  # its reasons are printed above
        # Shifter's two lines (scripts match them), then what it means and what to do.
        raise Failure(f"FAILED to lookup {request.type} image {request.tag}\n{NOT_FOUND}\n"
                      f"shifter: the image gateway could not be asked for {descriptor}: "
                      "the job was not submitted; submit again when the gateway answers, "
                      "or name an image already on the system by its id (--image=id:ID)")
    if pull_timeout is None or request.type != "docker":
        raise Failure(f"FAILED to lookup {request.type} image {request.tag}\n{NOT_FOUND}\n"
                      f"shifter: pull it first: shifterimg pull {descriptor}")
    pull_on_demand(request, pull_timeout)
    return resolve_id(cfg, request)  # from the index the pull wrote (or the gateway)


def ask_gateway(request: ImageRequest) -> tuple[str | None, bool]:
    """``shifterimg lookup`` as the user: (the id, False), or (None, True) when the
    system does not have the image, or (None, False) after printing why it could not
    say (an unreachable gateway, no shifterimg)."""
    import subprocess

    client = shifterimg_path()
    if client is None:
        print("shifter: error: cannot ask the image gateway: no shifterimg found (install "
              "the runtime package, or put shifterimg on PATH)", file=sys.stderr)
        return None, False
    try:
        proc = subprocess.run([client, "lookup", f"{request.type}:{request.tag}"],
                              capture_output=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"shifter: error: cannot run {client}: {exc.strerror}", file=sys.stderr)
        return None, False
    lines = proc.stderr.decode("utf-8", "replace").splitlines()
    answer = proc.stdout.decode("ascii", "replace").split()
    if proc.returncode == 0 and answer and valid_id(answer[-1]):
        return answer[-1], False
    if proc.returncode == 1 and any(line.startswith(LOOKUP_MISSING) for line in lines):
        return None, True
    for line in lines:
        print(line, file=sys.stderr)
    return None, False


def pull_on_demand(request: ImageRequest, timeout: int) -> None:
    """``shifterimg pull type:tag`` as the submitting user, its progress on our stderr,
    killed after ``timeout`` seconds. The pull is public, as ``shifterimg pull`` without
    ``-u``/``-g``. Raises :class:`Failure` when the image did not become READY."""
    import subprocess

    descriptor = f"{request.type}:{request.tag}"
    client = shifterimg_path()
    if client is None:
        raise Failure(f"shifter: cannot pull {descriptor}: no shifterimg found (install the "
                      "runtime package, or put shifterimg on PATH)")
    print(f"shifter: {descriptor} is not on this system yet: pulling it now "
          f"(up to {timeout} s)", file=sys.stderr, flush=True)
    try:
        # stdout to our stderr: sbatch's terminal shows the progress; our stdout is the
        # plugin's, for the job's NAME=VALUE lines only.
        proc = subprocess.run([client, "pull", descriptor], stdin=subprocess.DEVNULL,
                              stdout=sys.stderr.fileno(), timeout=timeout)
    except subprocess.TimeoutExpired:
        # On a terminal shifterimg was rewriting its line in place: end that line first.
        raise Failure(
            ("\n" if sys.stderr.isatty() else "")
            + f"shifter: the pull of {descriptor} did not finish within {timeout} s "
            "(pull_timeout in plugstack.conf); the gateway goes on with it: submit again "
            f"once `shifterimg lookup {descriptor}` prints its id") from None
    except OSError as exc:
        raise Failure(f"shifter: cannot run {client}: {exc.strerror}") from None
    if proc.returncode != 0:
        # shifterimg said why (the gateway's reason) on the line above.
        raise Failure(f"shifter: {descriptor} could not be pulled: the job was not submitted")


def job_public_key(home: str | None = None) -> str:
    """``~/.shifter/id_ed25519.pub``, made with ``ssh-keygen`` (no passphrase) when the key pair is
    missing: the key the container's sshd accepts (docs/behaviour.md, 'Runtime: per-container
    sshd')."""
    import subprocess

    home = home or os.path.expanduser("~")
    keydir = os.path.join(home, ".shifter")
    key = os.path.join(keydir, KEY_NAME)
    try:
        os.makedirs(keydir, mode=0o700, exist_ok=True)
        if not (os.path.isfile(key) and os.path.isfile(key + ".pub")):
            for path in (key, key + ".pub"):
                if os.path.lexists(path):
                    os.unlink(path)
            proc = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shifter job key",
                 "-f", key], stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if proc.returncode != 0:
                raise Failure(f"shifter: cannot make the job ssh key {key}: "
                              f"{proc.stderr.strip() or 'ssh-keygen failed'}")
        with open(key + ".pub", encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except OSError as exc:
        raise Failure(f"shifter: cannot make the job ssh key {key}: {exc.strerror}; "
                      "check that your home directory is writable") from None
    if not text or "\n" in text:
        raise Failure(f"shifter: {key}.pub is not one public key line; remove it and resubmit")
    return text


def job_host_key() -> str:
    """A fresh ed25519 key pair for the job's sshd, made with ``ssh-keygen`` in a private
    temporary directory (removed at once); returns the private key file's base64 body in
    one line (``setupRoot`` rebuilds the file and reads the public key from it)."""
    import subprocess
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="shifter-hostkey-") as tmp:
            path = os.path.join(tmp, "ssh_host_ed25519_key")
            proc = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shifter job host key",
                 "-f", path], stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if proc.returncode != 0:
                raise Failure("shifter: cannot make the job's ssh host key: "
                              f"{proc.stderr.strip() or 'ssh-keygen failed'}")
            with open(path, encoding="ascii") as f:
                lines = f.read().split("\n")
    except OSError as exc:
        raise Failure(f"shifter: cannot make the job's ssh host key: {exc.strerror}; "
                      "check that TMPDIR is writable") from None
    body = [line for line in lines if line and not line.startswith("-----")]
    return "".join(body)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0 after printing the job's variables, 1 on any problem."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        req = parse_args(args)
        if req.help:
            sys.stdout.write(USAGE)
            return 0
        lines = check(req)
    except UsageError as exc:
        print(f"shifter-spank: {exc}\n{USAGE}", file=sys.stderr, end="")
        return 1
    except EXPECTED_ERRORS as exc:
        return error_status(exc)
    sys.stdout.write("".join(f"{name}={value}\n" for name, value in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
