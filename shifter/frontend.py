"""What ``shifter``, ``setupRoot`` and ``unsetupRoot`` share: option parsing, finding the
image id, handing the environment over, and becoming the setuid helper.

These front ends hold no privilege. They do the work that needs none and then
``execv`` the helper (``helpers/PROTOCOL.md``), which trusts nothing they decided and
re-checks everything. ``shifter`` runs once per task on every node of a job, so this
module imports only built-in modules: ``posix`` rather than ``os`` (under ``python3 -I -S``
nothing has loaded ``os`` yet, and it costs ~2 ms with ``stat``, ``posixpath`` and
``_collections_abc``), no ``re``, ``json``, ``urllib``, ``subprocess``, ``signal``/``enum``
or ``dataclasses``. Anything heavier is imported only on the slow path that needs it (the
gateway lookup fallback).
"""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from udiroot.config import UdiRootConfig
    from udiroot.descriptor import ImageRequest
    from udiroot.meta import ImageMeta

DEFAULT_HELPER = "/usr/local/libexec/shifter/shifter-helper"
HELPER_ENV = "SHIFTER_HELPER"
NOT_FOUND = "FAILED to find requested image."
# How `shifterimg lookup` begins its "no such image" line (shifter/shifterimg.py).
LOOKUP_MISSING = "shifterimg: error: image "
ENV_LIMIT = 4 << 20  # the helper refuses an --env-fd larger than 4 MiB

NO_ARG, REQUIRED, OPTIONAL = 0, 1, 2

# urllib.parse.quote(text, safe=""): these bytes stay, every other byte becomes %XX.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


class UsageError(Exception):
    """A command-line mistake; the message is printed with a pointer to ``--help``."""


class Failure(Exception):
    """A problem found before exec; the message (possibly several lines) is printed and
    the front end exits 1."""


# -- options ------------------------------------------------------------------------------


def getopt_long(
    args: Sequence[str],
    shorts: Mapping[str, int],
    longs: Mapping[str, int],
    *,
    permute: bool = False,
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """GNU ``getopt_long`` with ``POSIXLY_CORRECT`` (``+`` semantics), as Shifter parses:
    parsing stops at the first non-option or after ``--``; ``-abc`` clusters; a required
    argument is the rest of the cluster or the next word (``-iX``, ``-i X``, ``--image=X``,
    ``--image X``); an optional one is only ever attached (``--entrypoint=X``: a bare
    ``--entrypoint`` never takes the next word); long names may be abbreviated to any
    unambiguous prefix (``--entry``); ``-V=X`` is read as ``-V X`` (not ``=X``).
    Returns ``[(name, value)]`` in order (``name`` is the short letter or the long name;
    ``value`` ``None`` when absent) and the rest.
    ``permute``: GNU's default instead (``setupRoot``): non-options anywhere are collected
    and parsing goes on until ``--``."""
    out: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i, n = 0, len(args)
    while i < n:
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg == "-" or not arg.startswith("-"):
            if not permute:
                break
            operands.append(arg)
            i += 1
            continue
        i += 1
        if arg.startswith("--"):
            text, eq, value = arg[2:].partition("=")
            name = _long_name(text, longs)
            mode = longs[name]
            if mode == NO_ARG:
                if eq:
                    raise UsageError(f"option '--{name}' doesn't allow an argument")
                out.append((name, None))
            elif mode == OPTIONAL:
                out.append((name, value if eq else None))
            elif eq:
                out.append((name, value))
            elif i < n:
                out.append((name, args[i]))
                i += 1
            else:
                raise UsageError(f"option '--{name}' requires an argument")
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            mode = shorts.get(letter, -1)
            j += 1
            if mode < 0:
                raise UsageError(f"invalid option -- '{letter}'")
            if mode == NO_ARG:
                out.append((letter, None))
                continue
            rest = arg[j:]
            if rest.startswith("=") and mode == REQUIRED:
                # -V=/a:/b as people write it (the long form's habit): no value of these
                # options can start with "=", so getopt's "=/a:/b" would only be an error.
                rest = rest[1:]
            if rest or mode == OPTIONAL:
                out.append((letter, rest or None))
            elif i < n:
                out.append((letter, args[i]))
                i += 1
            else:
                raise UsageError(f"option requires an argument -- '{letter}'")
            break
    return out, operands + list(args[i:])


def _long_name(text: str, longs: Mapping[str, int]) -> str:
    if text in longs:
        return text
    matches = [name for name in longs if name.startswith(text)] if text else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"unrecognized option '--{text}'")
    shown = " ".join(f"'--{m}'" for m in matches)
    raise UsageError(f"option '--{text}' is ambiguous; possibilities: {shown}")


# -- image ids ----------------------------------------------------------------------------


def valid_id(text: str) -> bool:
    """The helper's id syntax (ids become file names under ``imagePath``): one rule,
    :func:`udiroot.descriptor.valid_image_id` (imported here: ``--version`` reads no rules)."""
    from udiroot.descriptor import valid_image_id

    return valid_image_id(text)


def quote_tag(tag: str) -> str:
    """``urllib.parse.quote(tag, safe="")`` without importing ``urllib`` (it loads ``re``)."""
    return "".join(
        chr(b) if b in _UNRESERVED else f"%{b:02X}"
        for b in tag.encode("utf-8", "surrogateescape")
    )


def index_candidates(type_: str, tag: str) -> list[str]:
    """Tag strings to try in the gateway's tag index: the tag as given, then the form the
    gateway stores (``imagegw.manager.normalize_tag``: ``:latest`` added when the last
    path component has no tag and there is no digest). The gateway keeps the location and
    namespace as written (``ubuntu`` is not rewritten to ``library/ubuntu``), and so do we."""
    out = [tag]
    if type_ in ("docker", "custom") and "@" not in tag and ":" not in tag.rsplit("/", 1)[-1]:
        out.append(tag + ":latest")
    return out


def index_lookup(image_path: str, type_: str, tag: str, verbose: bool = False) -> str | None:
    """Beyond Shifter (docs/behaviour.md, 'Runtime: image selection'):
    ``<imagePath>/tags/<type>/<quoted tag>`` holds the id of a tag the gateway made
    available; an id counts only when its ``.meta`` is there too (so a tag being replaced or
    expired falls through to the gateway)."""
    for candidate in index_candidates(type_, tag):
        path = f"{image_path}/tags/{type_}/{quote_tag(candidate)}"
        try:
            with open(path, "rb") as f:
                text = f.read(512).decode("ascii", "replace").strip()
        except OSError:
            continue
        if not valid_id(text):
            if verbose:
                print(f"shifter: ignoring the damaged tag index entry {path}", file=sys.stderr)
            continue
        try:
            posix.stat(f"{image_path}/{text}.meta")
        except OSError:
            if verbose:
                print(f"shifter: {path} names {text}, which has no .meta", file=sys.stderr)
            continue
        if verbose:
            print(f"shifter: {type_}:{candidate} is {text} (tag index)", file=sys.stderr)
        return text
    return None


def shifterimg_path() -> str | None:
    """The ``shifterimg`` console script: next to the running script, next to the Python
    that runs us (a venv's bin/), else on ``PATH``."""
    import os

    dirs = []
    if "/" in sys.argv[0]:
        dirs.append(os.path.dirname(os.path.abspath(sys.argv[0])))
    if sys.executable:
        dirs.append(os.path.dirname(sys.executable))
    dirs.extend(os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"))
    for d in dirs:
        path = os.path.join(d or ".", "shifterimg")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def gateway_lookup(type_: str, tag: str, verbose: bool = False) -> str | None:
    """``shifterimg lookup type:tag`` as the caller (Shifter's way): its output is the id,
    exit status 1 means not found. Its own error messages reach our stderr."""
    import subprocess  # only here: the tag index answers the common case (it loads os)

    client = shifterimg_path()
    if client is None:
        print(
            "shifter: error: cannot ask the image gateway: no shifterimg found "
            "(install the runtime package, or put shifterimg on PATH)",
            file=sys.stderr,
        )
        return None
    argv = [client, *(["--verbose"] if verbose else []), "lookup", f"{type_}:{tag}"]
    try:
        proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"shifter: error: cannot run {client}: {exc.strerror}", file=sys.stderr)
        return None
    # Its words reach the user, but for "not available; pull it": we say that ourselves.
    for line in proc.stderr.decode("utf-8", "replace").splitlines():
        if not line.startswith(LOOKUP_MISSING):
            print(line, file=sys.stderr)
    if proc.returncode != 0:
        return None
    lines = proc.stdout.decode("ascii", "replace").split()
    found = lines[-1] if lines else ""
    if not valid_id(found):
        print(f"shifter: error: {client} answered an invalid image id: {found!r}",
              file=sys.stderr)
        return None
    if verbose:
        print(f"shifter: {type_}:{tag} is {found} (image gateway)", file=sys.stderr)
    return found


def resolve_id(cfg: UdiRootConfig, request: ImageRequest, verbose: bool = False) -> str:
    """The image id of a ``docker``/``custom``/``id`` request (not ``local``)."""
    if request.type == "id":
        return request.tag
    image_path = (cfg.get("imagePath") or "").rstrip("/") or "/"
    found = index_lookup(image_path, request.type, request.tag, verbose)
    if found is None:
        found = gateway_lookup(request.type, request.tag, verbose)
    if found is None:
        # Shifter's two lines (scripts match them), then the next step.
        raise Failure(
            f"FAILED to lookup {request.type} image {request.tag}\n{NOT_FOUND}\n"
            f"shifter: pull it first: shifterimg pull {request.type}:{request.tag}"
        )
    return found


def meta_path(cfg: UdiRootConfig, image_id: str) -> str:
    return f"{(cfg.get('imagePath') or '').rstrip('/')}/{image_id}.meta"


def usable_image(cfg: UdiRootConfig, image_id: str, uid: int, gid: int,
                 groups: Sequence[int]) -> ImageMeta:
    """The image's ``.meta`` when the caller may use it; :class:`Failure` with the
    reference's words when it is missing or its ACL leaves the caller out. The helper
    checks again: this only gives the message before anything is started."""
    from udiroot.meta import ACL_DENIED, MetaError, image_allows, read_meta

    try:
        meta = read_meta(meta_path(cfg, image_id))
    except MetaError as exc:
        if str(exc) == NOT_FOUND:
            raise Failure(NOT_FOUND) from None
        raise
    if not image_allows(meta, uid, gid, groups):
        raise Failure(ACL_DENIED)
    return meta


# -- handing over -------------------------------------------------------------------------


def helper_path(environ: Mapping[str, str]) -> str:
    """``$SHIFTER_HELPER`` or the installed path. Letting the caller choose is harmless:
    privilege comes only from the setuid bit an administrator put on a root-owned file,
    and pointing this at any other program runs that program as the caller, which the
    caller could do anyway. The tests use it to watch what the front end hands over."""
    return environ.get(HELPER_ENV) or DEFAULT_HELPER


_FS_ENCODING = sys.getfilesystemencoding()


def fsencode(text: str) -> bytes:
    """``os.fsencode`` without ``os``."""
    return text.encode(_FS_ENCODING, "surrogateescape")


def caller_environ() -> dict[str, str]:
    """The environment the caller exec'd us with, as text.

    Read from ``/proc/self/environ`` (the block the kernel copied at exec), not from
    ``os.environ``/``posix.environ``: Python's start-up changes those. In the C or POSIX
    locale it coerces the locale and sets ``LC_CTYPE=C.UTF-8`` (``-I`` makes
    ``PYTHONCOERCECLOCALE`` ignored, so this cannot be switched off), and the container
    must not receive a variable the user never set. One ``open``+``read``: ~20 µs.
    Falls back to ``posix.environ`` only where ``/proc`` is not mounted. A name given
    twice keeps its first value, as ``getenv`` and ``posix.environ`` do."""
    try:
        block = _read_proc_environ()
    except OSError:
        return {
            k.decode(_FS_ENCODING, "surrogateescape"): v.decode(_FS_ENCODING, "surrogateescape")
            for k, v in posix.environ.items()
        }
    env: dict[str, str] = {}
    for record in block.split(b"\0"):
        name, eq, value = record.partition(b"=")
        if not eq or not name:
            continue  # not a NAME=VALUE record: getenv cannot see it either
        key = name.decode(_FS_ENCODING, "surrogateescape")
        if key not in env:
            env[key] = value.decode(_FS_ENCODING, "surrogateescape")
    return env


def _read_proc_environ() -> bytes:
    fd = posix.open("/proc/self/environ", posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        chunks = []
        while chunk := posix.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        posix.close(fd)
    return b"".join(chunks)


def env_records(env: Mapping[str, str]) -> bytes:
    """``NAME=VALUE\\0`` records, bytes as the OS gave them (``os.fsencode``)."""
    out = bytearray()
    for name, value in env.items():
        record = fsencode(name) + b"=" + fsencode(value)
        if b"\0" in record:
            raise Failure(f"shifter: error: environment variable {name} contains a NUL "
                          "character; remove it (or run with --clearenv)")
        out += record + b"\0"
    if len(out) > ENV_LIMIT:
        raise Failure(
            f"shifter: error: the container environment is too large ({len(out)} bytes; "
            "the limit is 4 MiB): unset large variables or use --clearenv"
        )
    return bytes(out)


def env_fd(env: Mapping[str, str], name: str = "shifter-env") -> int:
    """An inheritable memfd holding the environment, positioned at 0, for ``--env-fd``
    (the helper cannot take it from its own environment: glibc strips ``LD_*`` from a
    setuid program's environment and modules legitimately set ``LD_LIBRARY_PATH``); the
    same records carry the container's ``/etc`` files for ``--etc-fd``."""
    data = env_records(env)
    try:
        fd = posix.memfd_create(name, 0)
    except (AttributeError, OSError) as exc:
        raise Failure(f"shifter: error: cannot create the environment memfd: {exc}") from None
    view = memoryview(data)
    while view:
        written = posix.write(fd, view)
        view = view[written:]
    posix.lseek(fd, 0, 0)  # SEEK_SET
    posix.set_inheritable(fd, True)
    return fd


def exec_helper(argv: list[str], verbose: bool = False) -> int:
    """Become the helper (no fork: signals, stdin, the terminal and the exit status are
    the command's). Returns 1 only when exec fails."""
    if verbose:
        print("shifter: exec " + " ".join(_shell_word(a) for a in argv), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    _restore_signals()
    try:
        posix.execv(argv[0], argv)
    except OSError as exc:
        print(
            f"shifter: error: cannot run the shifter helper {argv[0]}: {exc.strerror} "
            "(is the runtime installed? a developer checkout: make install)",
            file=sys.stderr,
        )
    return 1


def _restore_signals() -> None:
    """Python starts with SIGPIPE and SIGXFSZ ignored, and an ignored signal stays ignored
    across exec: put them back to default, as ``subprocess`` does for its children, so
    ``shifter cmd | head`` behaves as ``cmd | head``. ``_signal`` (built in, already
    loaded) rather than ``signal``, which imports ``enum``."""
    import _signal

    for name in ("SIGPIPE", "SIGXFSZ"):
        number = getattr(_signal, name, None)
        if number is not None:
            _signal.signal(number, _signal.SIG_DFL)


def _shell_word(text: str) -> str:
    if text and all(c.isalnum() or c in "@%+=:,./_-" for c in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


# What a front end's main() catches around its work; error_status() says what to do.
EXPECTED_ERRORS = (Failure, ValueError, SystemExit, KeyboardInterrupt)


def error_status(exc: BaseException) -> int:
    """The exit status for an expected error, its message printed. The rule modules'
    errors (DescriptorError, VolumeError, ModuleError, EnvError, MetaError, GpuError, …)
    carry the message Shifter prints; any other ValueError is a bug and is raised again.
    ``SystemExit`` comes from ``load_or_exit``, whose message is already out."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, ValueError) and not type(exc).__module__.startswith("udiroot."):
        raise exc
    return fail(str(exc))
