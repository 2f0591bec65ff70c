"""Volume maps (``--volume``, ``siteFs``): syntax, validation, sizes, and the signature.

Rules (docs/behaviour.md, 'Runtime: reusing a prepared container', 'Runtime: volumes', 'Runtime:
perNodeCache'):

* Entries separated by ``;``, surrounding blanks trimmed, one pair of ``"…"`` around an
  entry removed, empty entries skipped. An entry is ``from:to[:flag…]``.
* Flags, names case-insensitive, each at most once: ``ro``, ``rec``, ``slave``,
  ``private``, ``perNodeCache=size=N[,bs=N][,method=loop][,fs=xfs]`` (``fstype=`` is read
  as ``fs=`` so a normalised signature parses back). ``slave`` with ``private`` is an error.
* Both paths absolute, no control characters, no ``..`` component. Paths are normalised
  (repeated ``/``, ``.`` components and a trailing ``/`` removed) before the destination
  rules, which compare whole components: ``/etcx`` is not under ``/etc`` (unlike Shifter).
* User volumes: ``to`` required; flags ``ro`` and ``perNodeCache`` only; exactly
  ``/var/tmp`` allowed; ``/`` and ``/opt`` forbidden; ``/etc``, ``/var``,
  ``/opt/udiImage`` and also ``/dev``, ``/proc``, ``/sys`` forbidden with everything under
  them (Shifter's usage text promised ``/dev`` and ``/proc``; a user bind under ``/dev``
  would escape ``nodev``).
* siteFs: ``to`` defaults to ``from``; every flag; forbidden ``to``: ``/``, ``/opt``,
  ``/etc``, ``/var``, ``/etc/passwd``, ``/etc/group``, ``/etc/nsswitch.conf``.
* Sizes: digits, optional ``.digits``, optional ``b k m g t p e`` (powers of 1024, either
  case), optional ``B`` after a multiplier letter: ``500KB`` = 512000.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

DENIED = "Invalid mount request, permission denied!"
DEFAULT_BLOCK_SIZE = 1 << 20
MAX_SIZE = (1 << 63) - 1  # what a signed 64-bit off_t can hold

USER_FORBIDDEN_UNDER = ("/etc", "/var", "/opt/udiImage", "/dev", "/proc", "/sys")
USER_FORBIDDEN_EXACT = ("/", "/opt")
USER_ALLOWED_EXACT = ("/var/tmp",)
USER_FLAGS = ("ro", "perNodeCache")
SITE_FORBIDDEN_EXACT = (
    "/",
    "/opt",
    "/etc",
    "/var",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
)

_WS = " \t\r\n\v\f"
_DIGITS = "0123456789"
_SUFFIXES = "bkmgtpe"  # index = power of 1024
_PLAIN_FLAGS = ("ro", "rec", "slave", "private")


class VolumeError(ValueError):
    """A volume request is malformed or not allowed; the message names path and reason."""


class PerNodeCache:
    __slots__ = ("size", "bs", "method", "fstype")

    def __init__(
        self, size: int, bs: int = DEFAULT_BLOCK_SIZE, method: str = "loop", fstype: str = "xfs"
    ) -> None:
        self.size = size
        self.bs = bs
        self.method = method
        self.fstype = fstype

    def flag_text(self) -> str:
        return (
            f"perNodeCache=size={self.size},bs={self.bs},method={self.method},fstype={self.fstype}"
        )


class Volume:
    """One validated mapping; paths are normalised."""

    __slots__ = ("source", "target", "ro", "rec", "slave", "private", "cache")

    def __init__(self, source: str, target: str) -> None:
        self.source = source
        self.target = target
        self.ro = False
        self.rec = False
        self.slave = False
        self.private = False
        self.cache: PerNodeCache | None = None

    def text(self) -> str:
        """Normalised ``from:to`` plus flags in the fixed order of the signature (docs/behaviour.md,
        'Runtime: reusing a prepared container')."""
        out = f"{self.source}:{self.target}"
        if self.ro:
            out += ":ro"
        if self.rec:
            out += ":rec"
        if self.cache is not None:
            out += ":" + self.cache.flag_text()
        if self.slave:
            out += ":slave"
        if self.private:
            out += ":private"
        return out

    __str__ = text

    def __repr__(self) -> str:
        return f"Volume({self.text()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Volume):
            return NotImplemented
        return self.text() == other.text()

    def __hash__(self) -> int:
        return hash(self.text())


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower(text: str) -> str:
    """ASCII-only case folding, as the C helper does: str.lower() would turn the KELVIN
    SIGN into 'k' and accept it as a size suffix."""
    return text.translate(_ASCII_LOWER)


def requested_volumes(options: list[str], environ: Mapping[str, str]) -> str:
    """The user's volume text: the ``--volume`` values when any were given (they replace
    the environment's), else ``SHIFTER_VOLUME``, else ``SLURM_SPANK_SHIFTER_VOLUME``."""
    if options:
        return ";".join(options)
    return environ.get("SHIFTER_VOLUME") or environ.get("SLURM_SPANK_SHIFTER_VOLUME") or ""


def parse_user_volumes(text: str) -> list[Volume]:
    return parse_volume_map(text, site=False)


def parse_site_volumes(text: str) -> list[Volume]:
    return parse_volume_map(text, site=True)


def parse_volume_map(text: str, *, site: bool) -> list[Volume]:
    volumes: list[Volume] = []
    for raw in text.split(";"):
        entry = raw.strip(_WS)
        if len(entry) >= 2 and entry[0] == '"' and entry[-1] == '"':
            entry = entry[1:-1]
        if entry != "":
            volumes.append(parse_volume(entry, site=site))
    return volumes


def parse_volume(entry: str, *, site: bool) -> Volume:
    """One ``from:to[:flag…]`` entry (no ``;``, no quotes)."""
    tokens = entry.split(":")
    raw_from = tokens[0]
    if len(tokens) == 1:
        if not site:
            raise VolumeError(_syntax(entry, "no destination given, use from:to"))
        raw_to = raw_from
    else:
        raw_to = tokens[1]
    source = _clean_path(raw_from, raw_from, raw_to, "source")
    target = _clean_path(raw_to, raw_from, raw_to, "destination")
    vol = Volume(source, target)
    seen: list[str] = []
    for flag in tokens[2:]:
        _apply_flag(vol, flag, entry, seen)
    if vol.slave and vol.private:
        raise VolumeError(_syntax(entry, "slave and private cannot both be given"))
    if site:
        _check_site(vol)
    else:
        _check_user(vol, seen)
    return vol


def _syntax(entry: str, reason: str) -> str:
    return f'Invalid volume map "{entry}": {reason}.'


def _denied(source: str, target: str, reason: str) -> str:
    return f"{DENIED} Cannot mount from {source} to {target}: {reason}."


def _clean_path(path: str, raw_from: str, raw_to: str, which: str) -> str:
    if path == "":
        raise VolumeError(_denied(raw_from, raw_to, f"the {which} is empty"))
    if not path.startswith("/"):
        raise VolumeError(_denied(raw_from, raw_to, f"the {which} must be an absolute path"))
    for c in path:
        if c < " " or c == "\x7f":
            raise VolumeError(_denied(raw_from, raw_to, f"the {which} has a control character"))
    parts = [p for p in path.split("/") if p != "" and p != "."]
    if ".." in parts:
        raise VolumeError(_denied(raw_from, raw_to, f"the {which} must not contain '..'"))
    return "/" + "/".join(parts)


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base + "/")


def _check_user(vol: Volume, flags: list[str]) -> None:
    for flag in flags:
        if flag not in USER_FLAGS:
            raise VolumeError(
                _denied(
                    vol.source,
                    vol.target,
                    f"flag {flag} is for site volumes only (use ro or perNodeCache)",
                )
            )
    to = vol.target
    if to in USER_ALLOWED_EXACT:
        return
    if to in USER_FORBIDDEN_EXACT:
        raise VolumeError(_denied(vol.source, to, f"{to} is reserved for the system"))
    for base in USER_FORBIDDEN_UNDER:
        if _under(to, base):
            raise VolumeError(
                _denied(
                    vol.source, to, f"{base} and everything under it is reserved for the system"
                )
            )


def _check_site(vol: Volume) -> None:
    if vol.target in SITE_FORBIDDEN_EXACT:
        raise VolumeError(
            _denied(vol.source, vol.target, f"{vol.target} cannot be replaced by a site mount")
        )


def _apply_flag(vol: Volume, flag: str, entry: str, seen: list[str]) -> None:
    eq = flag.find("=")
    name = flag if eq < 0 else flag[:eq]
    lname = _lower(name)
    if lname in _PLAIN_FLAGS:
        if eq >= 0:
            raise VolumeError(_syntax(entry, f"flag {lname} takes no value"))
        canonical = lname
    elif lname == "pernodecache":
        canonical = "perNodeCache"
        vol.cache = _parse_cache(flag[eq + 1 :] if eq >= 0 else "", entry)
    elif flag == "":
        raise VolumeError(_syntax(entry, "empty flag"))
    else:
        raise VolumeError(_syntax(entry, f"unknown flag '{name}'"))
    if canonical in seen:
        raise VolumeError(_syntax(entry, f"flag {canonical} given twice"))
    seen.append(canonical)
    if canonical == "ro":
        vol.ro = True
    elif canonical == "rec":
        vol.rec = True
    elif canonical == "slave":
        vol.slave = True
    elif canonical == "private":
        vol.private = True


def _parse_cache(args: str, entry: str) -> PerNodeCache:
    size = 0
    cache = PerNodeCache(0)
    seen: list[str] = []
    for item in args.split(",") if args else []:
        eq = item.find("=")
        key = _lower(item if eq < 0 else item[:eq])
        value = item[eq + 1 :] if eq >= 0 else ""
        if key == "fstype":
            key = "fs"
        if value == "":
            raise VolumeError(_syntax(entry, f"perNodeCache option '{item}' needs a value"))
        if key in seen:
            raise VolumeError(_syntax(entry, f"perNodeCache option {key} given twice"))
        seen.append(key)
        if key == "size":
            size = _cache_size(value, "size", entry)
        elif key == "bs":
            cache.bs = _cache_size(value, "bs", entry)
        elif key == "method":
            if _lower(value) != "loop":
                raise VolumeError(_syntax(entry, f"perNodeCache method must be loop, not {value}"))
        elif key == "fs":
            if _lower(value) != "xfs":
                raise VolumeError(_syntax(entry, f"perNodeCache fs must be xfs, not {value}"))
        else:
            raise VolumeError(_syntax(entry, f"unknown perNodeCache option '{key}'"))
    if size == 0:
        raise VolumeError(_syntax(entry, "perNodeCache needs size=N (for example size=10G)"))
    cache.size = size
    return cache


def _cache_size(value: str, key: str, entry: str) -> int:
    try:
        n = parse_size(value)
    except VolumeError as exc:
        raise VolumeError(_syntax(entry, f"perNodeCache {key}: {exc}")) from None
    if n <= 0:
        raise VolumeError(_syntax(entry, f"perNodeCache {key} must be more than 0"))
    return n


def parse_size(text: str) -> int:
    """``5`` → 5, ``5k`` → 5120, ``500KB`` → 512000, ``1.5g`` → 1610612736 (docs/behaviour.md,
    'Runtime: perNodeCache')."""
    bad = VolumeError(f"invalid size '{text}' (use a number with an optional b k m g t p e)")
    n = len(text)
    i = 0
    while i < n and text[i] in _DIGITS:
        i += 1
    whole = text[:i]
    frac = ""
    if i < n and text[i] == ".":
        j = i + 1
        while j < n and text[j] in _DIGITS:
            j += 1
        frac = text[i + 1 : j]
        if frac == "":
            raise bad
        i = j
    if whole == "" or len(whole) + len(frac) > 30:
        raise bad
    power = 0
    if i < n and _lower(text[i]) in _SUFFIXES:
        power = _SUFFIXES.index(_lower(text[i]))
        i += 1
        if power > 0 and i < n and text[i] in "bB":
            i += 1
    if i != n:
        raise bad
    # Integer arithmetic, so 1.5g is exact and the C helper gets the same number.
    scale = 10 ** len(frac)
    value = (int(whole) * scale + int(frac or "0")) * (1024**power) // scale
    if value > MAX_SIZE:
        raise bad
    return value


def check_cache_policy(
    volumes: Iterable[Volume], size_limit: int | None, allowed_fs: Iterable[str] = ()
) -> None:
    """``perNodeCacheSizeLimit`` and ``perNodeCacheAllowedFsType`` (enforced, unlike Shifter)."""
    allowed = [_lower(fs) for fs in allowed_fs]
    for vol in volumes:
        cache = vol.cache
        if cache is None:
            continue
        if size_limit is not None and cache.size > size_limit:
            raise VolumeError(
                _denied(
                    vol.source,
                    vol.target,
                    f"perNodeCache size {cache.size} is over the site limit of {size_limit}",
                )
            )
        if allowed and cache.fstype not in allowed:
            raise VolumeError(
                _denied(vol.source, vol.target, f"perNodeCache fs {cache.fstype} is not allowed")
            )


def cache_total_limit(total: str | None, per_volume: str | None) -> int | None:
    """The most all perNodeCaches of one launch may add up to: ``perNodeCacheTotalSizeLimit``,
    unset → ``perNodeCacheSizeLimit`` (one launch, one maximal cache), neither → no limit.
    The helper applies the same rule to the same keys."""
    key, text = "perNodeCacheTotalSizeLimit", total
    if text is None or text.strip() == "":
        key, text = "perNodeCacheSizeLimit", per_volume
    if text is None or text.strip() == "":
        return None
    try:
        return parse_size(text.strip())
    except VolumeError as exc:
        raise VolumeError(f"FAILED to parse udiRoot configuration. ({key}: {exc})") from None


def check_cache_total(volumes: Iterable[Volume], limit: int | None) -> None:
    """Refuse at the perNodeCache whose size brings the launch's total over ``limit``."""
    if limit is None:
        return
    total = 0
    for vol in volumes:
        if vol.cache is None:
            continue
        total = min(total + vol.cache.size, 2**64 - 1)  # the helper's uint64 saturates
        if total > limit:
            raise VolumeError(
                _denied(
                    vol.source,
                    vol.target,
                    f"the perNodeCaches of this launch add up to {total} bytes, over the "
                    f"site total of {limit} (perNodeCacheTotalSizeLimit)",
                )
            )


def volume_signature(volumes: Iterable[Volume]) -> str:
    """Normalised entries sorted and joined by ``;`` (docs/behaviour.md, 'Runtime: reusing a
    prepared container'). Sorted by their bytes, as the C helper's strcmp() does (code
    points differ for undecodable bytes)."""
    texts = sorted((v.text() for v in volumes), key=_as_bytes)
    return ";".join(texts)


def _as_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def container_signature(
    identifier: str, user: str, volumes: Iterable[Volume], modules: Iterable[str]
) -> str:
    """The ``shifterConfig.json`` text a prepared container is matched by, byte for byte."""
    ident = _json_escape(identifier)
    name = _json_escape(user)
    volmap = _json_escape(volume_signature(volumes))
    mods = _json_escape("".join(m + "," for m in modules))
    # Written by hand, not json.dumps: the key order and spacing are part of the match.
    return f'{{"identifier":"{ident}","user":"{name}","volMap":"{volmap}","modules":"{mods}"}}'


def _json_escape(text: str) -> str:
    """The minimum JSON needs: quote, backslash and control characters."""
    out = []
    for c in text:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c < " ":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)
