"""Reading ``<id>.meta``, the image description the gateway writes next to each image.

Rules (docs/behaviour.md, 'Conversion and the .meta file'): one ``KEY: value`` per line, split at
the first ``:``, both sides trimmed; ``#`` in column 0 is a comment (also inside a continued value);
a trailing ``\\`` joins the next line with one space; unknown keys are ignored quietly; ENV repeats
(a ``["A=1", "B=2"]`` list on one ENV line is read as its elements); more than 1000 ACL ids is an
error; FORMAT is ``squashfs`` or ``xfs`` (empty: squashfs). ENTRY and CMD are argv lists, read from
a JSON array or from the older Python ``['a', "it's"]`` form (one small tokenizer reads both). The
file is opened without following a symlink, must be a regular file of at most 1 MiB and hold no NUL
byte.

The setuid helper (helpers/meta.c) reads the same file with the same rules but only the
keys it uses (:data:`HELPER_KEYS`); tests/test_helper_rules.py runs both on one table.

Plain loops and explicit character sets rather than ``json``/``re``/``str.isdigit``: the
setuid helper re-reads this file with the same rules in C, and ``shifter`` imports this on
every launch.
"""

from __future__ import annotations

import posix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

NOT_FOUND = "FAILED to find requested image."
ACL_DENIED = "FAILED permission denied to image"
MAX_ACL_IDS = 1000
# (uid_t)-1 means "unchanged" to setresuid, so the largest usable id is one less.
MAX_ID = 0xFFFFFFFE
MAX_META_BYTES = 1 << 20  # the helper reads at most this much (HELPER_MAX_SMALL_FILE)
FORMATS = ("squashfs", "xfs")  # what the helper can mount
# What the helper reads; the other keys are the front end's alone.
HELPER_KEYS = ("FORMAT", "USERACL", "GROUPACL")
_S_IFMT, _S_IFREG = 0o170000, 0o100000
_EFBIG_TEXT = "File too large"  # strerror(EFBIG), as the helper words it

_WS = " \t\r\n\v\f"  # C isspace() in the C locale; str.strip() would also eat Unicode spaces
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_SIMPLE_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "/": "/",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}


class MetaError(ValueError):
    """The metadata file is missing or unusable; the message says which and why."""


class ImageMeta:
    """What the runtime needs from ``<id>.meta``. Absent values are ``None`` or empty."""

    __slots__ = ("format", "entry", "cmd", "workdir", "env", "user_acl", "group_acl", "user")

    def __init__(self) -> None:
        self.format: str | None = None
        self.entry: list[str] | None = None
        self.cmd: list[str] | None = None
        self.workdir: str | None = None
        self.env: list[str] = []  # "NAME=VALUE", in file order
        self.user_acl: list[int] = []
        self.group_acl: list[int] = []
        self.user: str | None = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"ImageMeta({fields})"


def read_meta(path: str, keys: Collection[str] | None = None) -> ImageMeta:
    """Parse the file at ``path`` (``keys`` as for :func:`parse_meta`); a missing file is
    Shifter's "FAILED to find" error. Opened as the helper opens it: not through a
    symlink, not blocking on a FIFO."""
    flags = posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC | posix.O_NONBLOCK
    try:
        fd = posix.open(path, flags | posix.O_NOCTTY)
    except FileNotFoundError:
        raise MetaError(NOT_FOUND) from None
    except OSError as exc:
        raise MetaError(f"{NOT_FOUND} ({path}: {exc.strerror})") from None
    try:
        if posix.fstat(fd).st_mode & _S_IFMT != _S_IFREG:
            raise MetaError(f"{NOT_FOUND} ({path} is not a regular file)")
        data = _read_bounded(fd, path)
    finally:
        posix.close(fd)
    if b"\0" in data:
        raise MetaError(f"{NOT_FOUND} ({path}: contains a NUL byte)")
    # Lines split on "\n" only, as in C; a "\r" before it is trimmed as blank.
    return parse_meta(data.decode("utf-8", "surrogateescape"), keys)


def _read_bounded(fd: int, path: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = posix.read(fd, MAX_META_BYTES + 1 - size)
        except OSError as exc:
            raise MetaError(f"{NOT_FOUND} ({path}: {exc.strerror})") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_META_BYTES:
            raise MetaError(f"{NOT_FOUND} ({path}: {_EFBIG_TEXT})")


def parse_meta(text: str, keys: Collection[str] | None = None) -> ImageMeta:
    """Parse ``.meta`` text; with ``keys``, only those keys are read (the others are
    skipped as unknown ones are): ``keys=HELPER_KEYS`` reads what the helper reads."""
    meta = ImageMeta()
    key: str | None = None  # set while a value continues onto the next line
    parts: list[str] = []
    for line in text.split("\n"):
        if line.startswith("#"):
            continue
        if key is None:
            colon = line.find(":")
            if colon < 0:
                continue
            key = line[:colon].strip(_WS)
            value = line[colon + 1 :].strip(_WS)
        else:
            value = line.strip(_WS)
        if value.endswith("\\"):
            parts.append(value[:-1].strip(_WS))
            continue
        parts.append(value)
        if keys is None or key in keys:
            _assign(meta, key, " ".join(parts).strip(_WS))
        key, parts = None, []
    # The file ended inside a continued value: keep what is there.
    if key is not None and (keys is None or key in keys):
        _assign(meta, key, " ".join(parts).strip(_WS))
    return meta


def _assign(meta: ImageMeta, key: str, value: str) -> None:
    if key == "FORMAT":
        if value not in ("", *FORMATS):
            # As the helper words it: at most 32 bytes of the value (C's %.32s).
            raw = value.encode("utf-8", "surrogateescape")
            shown = raw[:32].decode("utf-8", "surrogateescape") + ("..." if len(raw) > 32 else "")
            raise MetaError(f"FAILED: image format '{shown}' is not supported (squashfs or xfs)")
        meta.format = value or None
    elif key == "ENTRY":
        meta.entry = parse_argv(value, key)
    elif key == "CMD":
        meta.cmd = parse_argv(value, key)
    elif key == "WORKDIR":
        meta.workdir = value or None
    elif key == "ENV":
        # One "ENV: NAME=VALUE" line per variable (docs/behaviour.md, 'Conversion and the .meta
        # file'); also accepted: a whole list on one line, ENV: ["A=1", "B=2"] (JSON or Python
        # form), which is never a sane variable (its name would start with '['). A variable without
        # a name cannot be set: refusing it beats guessing.
        entries = [value]
        if value.startswith("["):
            entries = _parse_list(value, key)
        for entry in entries:
            if entry.find("=") < 1:
                raise MetaError(f"Invalid ENV line in image metadata: {value}")
            meta.env.append(entry)
    elif key == "USERACL":
        meta.user_acl = parse_ids(value, key)
    elif key == "GROUPACL":
        meta.group_acl = parse_ids(value, key)
    elif key == "USER":
        meta.user = value or None
    # Any other key was written by an older or newer gateway: ignored quietly (docs/behaviour.md,
    # 'Conversion and the .meta file').


def parse_ids(value: str, key: str = "USERACL") -> list[int]:
    """Comma-separated decimal ids; empty pieces skipped (as strtok does)."""
    ids: list[int] = []
    for piece in value.split(","):
        piece = piece.strip(_WS)
        if piece == "":
            continue
        if len(piece) > 10 or any(c not in _DIGITS for c in piece) or int(piece) > MAX_ID:
            raise MetaError(f"Invalid id '{piece}' in {key} of image metadata")
        ids.append(int(piece))
        if len(ids) > MAX_ACL_IDS:
            raise MetaError(f"{key} in image metadata lists more than {MAX_ACL_IDS} ids")
    # An ACL key with no ids is a damaged file, not a public image: refuse it (Shifter did).
    if not ids:
        raise MetaError(f"{key} in image metadata is empty")
    return ids


def parse_argv(value: str, key: str = "ENTRY") -> list[str] | None:
    """An argv list from ``["a", "b"]`` (JSON) or ``['a', "it's"]`` / ``[u'a']`` (Python
    ``str()`` of a list, as Shifter's gateway wrote it). A bare string is shell form, as
    in Docker: ``/bin/sh -c <string>``. Empty → ``None``."""
    if value == "":
        return None
    if not value.startswith("["):
        return ["/bin/sh", "-c", value]
    argv = _parse_list(value, key)
    return argv or None


def _parse_list(value: str, key: str) -> list[str]:
    bad = MetaError(f"Invalid {key} in image metadata: {value}")
    out: list[str] = []
    n = len(value)
    i = _skip_ws(value, 1)
    if i < n and value[i] == "]":
        i += 1
    else:
        while True:
            if i + 1 < n and value[i] in "uU" and value[i + 1] in "'\"":
                i += 1  # Python 2 unicode prefix: u'...'
            if i >= n or value[i] not in "'\"":
                raise bad
            text, i = _parse_string(value, i, bad)
            out.append(text)
            i = _skip_ws(value, i)
            if i < n and value[i] == ",":
                i = _skip_ws(value, i + 1)
                continue
            if i < n and value[i] == "]":
                i += 1
                break
            raise bad
    if _skip_ws(value, i) != n:
        raise bad
    return out


def _skip_ws(value: str, i: int) -> int:
    while i < len(value) and value[i] in _WS:
        i += 1
    return i


def _parse_string(value: str, i: int, bad: MetaError) -> tuple[str, int]:
    """One quoted element starting at ``value[i]`` (the quote); returns it and the index
    after the closing quote. Escapes: JSON's and the ones Python's repr() produces."""
    quote = value[i]
    i += 1
    chars: list[str] = []
    n = len(value)
    while i < n:
        c = value[i]
        if c == quote:
            return "".join(chars), i + 1
        if c != "\\":
            chars.append(c)
            i += 1
            continue
        if i + 1 >= n:
            raise bad
        e = value[i + 1]
        if e in _SIMPLE_ESCAPES:
            chars.append(_SIMPLE_ESCAPES[e])
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        digits = value[i + 2 : i + 2 + (width or 0)]
        if width is None or len(digits) != width or any(d not in _HEX for d in digits):
            raise bad
        code = int(digits, 16)
        i += 2 + width
        # JSON writes characters beyond the BMP as a \uD8xx\uDCxx surrogate pair.
        if 0xD800 <= code <= 0xDBFF and value[i : i + 2] == "\\u":
            low_digits = value[i + 2 : i + 6]
            if len(low_digits) == 4 and all(d in _HEX for d in low_digits):
                low = int(low_digits, 16)
                if 0xDC00 <= low <= 0xDFFF:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:  # unpaired surrogate: not text
            raise bad
        chars.append(chr(code))
    raise bad  # no closing quote


def image_allows(meta: ImageMeta, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
    """Image ACL (docs/behaviour.md, 'Runtime: identity'): open when both lists are empty,
    else the uid, the primary gid or any supplementary gid must be listed."""
    if not meta.user_acl and not meta.group_acl:
        return True
    if uid in meta.user_acl:
        return True
    if gid in meta.group_acl:
        return True
    return any(g in meta.group_acl for g in groups)
