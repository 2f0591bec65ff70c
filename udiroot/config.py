"""Reading ``udiRoot.conf``, the runtime's site configuration, as sites write it today.

Rules (docs/behaviour.md, 'Runtime: udiRoot.conf'): ``#`` in column 0 starts a comment; lines
without ``=`` are ignored; a line splits at its first ``=`` and both sides are trimmed; a trailing
``\\`` joins the next line with one space; no quoting; an unknown key fails the parse. The file must
be owned by root and not writable by group or others, because the setuid part trusts it. The C
helper applies the same rules to the same file itself.

Kept light: ``shifter`` imports this on every launch, under ``python3 -I -S`` where ``os``
is not loaded yet, so this uses the built-in ``posix`` (``os`` with ``stat``, ``posixpath``
and ``_collections_abc`` costs ~2 ms) and plain classes rather than ``dataclasses``.
"""

from __future__ import annotations

import posix
import sys

DEFAULT_PATH = "/etc/shifter/udiRoot.conf"

# The key tables. helpers/conf.c has the same ones (conf_required_keys, conf_tool_keys,
# conf_optional_keys, conf_deprecated_keys, conf_defunct_keys, conf_module_subkeys), in
# the same order;
# tests/test_helper_rules.py compares them.
REQUIRED = ("udiMount", "loopMount", "imagePath", "udiRootPath", "etcPath", "rootfsType")
# Shifter's external tool paths: read and kept, but this implementation runs none of
# those tools (nor does the helper), so none is required and a site file naming a tool
# a node lacks does not stop the runtime.
TOOL_PATHS = ("modprobePath", "insmodPath", "cpPath", "mvPath", "chmodPath", "ddPath")
OPTIONAL = (
    "perNodeCachePath",
    "perNodeCacheSizeLimit",
    "perNodeCacheTotalSizeLimit",
    "perNodeCacheAllowedFsType",
    "usersToImport",
    "sitePreMountHook",
    "sitePostMountHook",
    "optUdiImage",
    "allowLocalChroot",
    "allowLibcPwdCalls",
    "populateEtcDynamically",
    "mountUdiRootWritable",
    "maxGroupCount",
    "mountPropagationStyle",
    "mkfsXfsPath",
    "gatewayTimeout",
    "siteEnv",
    "siteEnvAppend",
    "siteEnvPrepend",
    "siteEnvUnset",
    "siteResources",
    "imageGateway",
    "batchType",
    "system",
    "defaultImageType",
    "defaultModules",
    "gpuLibraries",
    "gpuBinaries",
    "gpuBinaryPath",
    "gpuLdCache",
    "gpuDeviceDir",
    "gpuProcDir",
    "cdiSpecDirs",
    "cdiMountDirs",
    "allowCdiHooks",
    "imageGatewayCAFile",
    "allowWritableTmpfs",
    "writableTmpfsSizeLimit",
)
ACCUMULATING = ("siteFs",)
DEPRECATED = ("autoLoadKernelModule", "kmodBasePath", "kmodCacheFile", "optionalSshdAsRoot")
# Accepted without a word, as Shifter does (its own test files keep `nodeContextPrefix=`).
DEFUNCT = ("nodeContextPrefix",)
MODULE_KEYS = (
    "siteFs",
    "siteEnv",
    "siteEnvAppend",
    "siteEnvPrepend",
    "siteEnvUnset",
    "copyPath",
    "roothook",
    "userhook",
    "conflict",
    "enabled",
)
_KNOWN = frozenset(REQUIRED + TOOL_PATHS + OPTIONAL + ACCUMULATING)
# What the helper (reading bytes) takes for blanks and line breaks: the ASCII ones that
# str.strip() and str.splitlines() know. Theirs also include NBSP, U+3000, U+0085,
# U+2028...: a value ending in NBSP must mean the same path to both readers.
_BLANKS = " \t\n\v\f\r\x1c\x1d\x1e\x1f"
_BREAKS = "\n\r\v\f\x1c\x1d\x1e"
_OTHER_BREAKS = ("\x85", "\u2028", "\u2029")


class ConfigError(Exception):
    """The configuration is unusable; the message names the key or the problem.
    An unknown key also sets ``key`` and ``line`` (for :func:`explain`)."""

    key: str | None = None
    line = 0


def explain(exc: ConfigError, path: str) -> str:
    """What a user reads: an unknown key names the file, the line and the nearest known
    key. (The plain message is the C helper's too: tests compare the two parsers.)"""
    if exc.key is None:
        return str(exc)
    import difflib

    known = [*REQUIRED, *TOOL_PATHS, *OPTIONAL, *ACCUMULATING, *DEPRECATED, *DEFUNCT]
    if exc.key.startswith("module_"):
        name = exc.key[len("module_"):].rsplit("_", 1)[0] or "NAME"
        known = [f"module_{name}_{sub}" for sub in MODULE_KEYS]
    by_case = [k for k in known if k.lower() == exc.key.lower()]
    near = by_case or difflib.get_close_matches(exc.key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"Couldn't understand key: {exc.key} ({path} line {exc.line}{hint})"


class Module:
    """``module_<name>_<subkey>`` values of one module (plain class, not a dataclass:
    ``dataclasses`` pulls in ``inspect`` and costs ~20 ms on every launch)."""

    __slots__ = ("name", "values")

    def __init__(self, name: str, values: dict[str, str] | None = None) -> None:
        self.name = name
        self.values: dict[str, str] = {} if values is None else values

    def __repr__(self) -> str:
        return f"Module(name={self.name!r}, values={self.values!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Module):
            return NotImplemented
        return (self.name, self.values) == (other.name, other.values)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    @property
    def enabled(self) -> bool:
        # As the helper reads it: exactly 0, false or no (ASCII, any case) disables.
        value = self.values.get("enabled", "1")
        return not (value.isascii() and value.lower() in ("0", "false", "no"))


class UdiRootConfig:
    """Every key as written (strings); typed accessors for the ones with a shape."""

    __slots__ = ("values", "site_fs", "modules", "path", "warnings")

    def __init__(
        self,
        values: dict[str, str],
        site_fs: list[str],
        modules: dict[str, Module],
        path: str = DEFAULT_PATH,
        warnings: list[str] | None = None,
    ) -> None:
        self.values = values
        self.site_fs = site_fs
        self.modules = modules
        self.path = path
        self.warnings: list[str] = [] if warnings is None else warnings

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"UdiRootConfig({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UdiRootConfig):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def flag(self, key: str, default: bool = False) -> bool:
        """1, true, yes or on (ASCII, any case; the whole value) is true; empty or unset
        is ``default``; anything else is false. ``config_flag`` in the helper is the same."""
        value = (self.values.get(key) or "").strip(" \t")
        if value == "":
            return default
        return value.isascii() and value.lower() in ("1", "true", "yes", "on")

    def number(self, key: str, default: int = 0) -> int:
        value = self.values.get(key)
        if value is None or value.strip() == "":
            return default
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, not '{value}'") from None

    def words(self, key: str) -> list[str]:
        return (self.values.get(key) or "").split()

    @property
    def gateways(self) -> list[str]:
        return self.words("imageGateway")

    @property
    def system(self) -> str | None:
        return self.values.get("system") or None

    @property
    def gateway_timeout(self) -> float:
        return float(self.number("gatewayTimeout", 10)) or 10.0

    @property
    def default_modules(self) -> list[str]:
        return [
            m.strip() for m in (self.values.get("defaultModules") or "").split(",") if m.strip()
        ]


def parse_text(text: str, path: str = DEFAULT_PATH) -> UdiRootConfig:
    """Parse the text of a ``udiRoot.conf`` (no ownership checks: see :func:`load`)."""
    values: dict[str, str] = {}
    site_fs: list[str] = []
    modules: dict[str, Module] = {}
    warnings: list[str] = []
    for lineno, line in _logical_lines(text):
        if line.startswith("#") or "=" not in line:
            continue
        key, value = (part.strip(_BLANKS) for part in line.split("=", 1))
        if key in DEFUNCT:
            continue
        if key in DEPRECATED:
            warnings.append(f"IGNORING parameter {key}, deprecated.")
        elif key in ACCUMULATING:
            site_fs.append(value)
        elif key in _KNOWN:
            values[key] = value
        elif key.startswith("module_") and _module_key(key):
            name, sub = _module_key(key)  # type: ignore[misc]
            modules.setdefault(name, Module(name)).values[sub] = value
        else:
            error = ConfigError(f"Couldn't understand key: {key} (udiRoot.conf line {lineno})")
            error.key, error.line = key, lineno
            raise error
    missing = [k for k in REQUIRED if not values.get(k)]
    if missing:
        raise ConfigError(f"required key {missing[0]} is missing")
    style = values.get("mountPropagationStyle", "slave")
    if style not in ("private", "slave"):
        raise ConfigError(f"mountPropagationStyle must be private or slave, not '{style}'")
    return UdiRootConfig(values, site_fs, modules, path, warnings)


def _module_key(key: str) -> tuple[str, str] | None:
    """``module_<name>_<subkey>``: the subkey is one of MODULE_KEYS (names may hold ``_``)."""
    rest = key[len("module_") :]
    for sub in MODULE_KEYS:
        if rest.endswith("_" + sub) and len(rest) > len(sub) + 1:
            return rest[: -len(sub) - 1], sub
    return None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(number of the first physical line, text) of each logical line: physical lines
    with trailing-backslash continuations joined by one space."""
    out: list[tuple[int, str]] = []
    pending = ""
    first = 0
    for number, line in enumerate(_split_lines(text), start=1):
        if not pending:
            first = number
        if line.rstrip(_BLANKS).endswith("\\"):
            pending += line.rstrip(_BLANKS)[:-1].rstrip(_BLANKS) + " "
            continue
        out.append((first, pending + line.lstrip(_BLANKS) if pending else line))
        pending = ""
    if pending:
        out.append((first, pending.rstrip(_BLANKS)))
    return out


def _split_lines(text: str) -> list[str]:
    """``str.splitlines()`` with only the ASCII breaks (``\\r\\n`` is one break)."""
    if not any(c in text for c in _OTHER_BREAKS):
        return text.splitlines()  # the common case, and fast
    lines: list[str] = []
    start = i = 0
    n = len(text)
    while i < n:
        if text[i] in _BREAKS:
            lines.append(text[start:i])
            i += 2 if text[i] == "\r" and text[i + 1 : i + 2] == "\n" else 1
            start = i
        else:
            i += 1
    if start < n:
        lines.append(text[start:])
    return lines


_S_IFMT, _S_IFREG = 0o170000, 0o100000
_S_IWGRP, _S_IWOTH = 0o020, 0o002


def _getenv(name: str) -> str | None:
    """``os.environ.get`` (when ``os`` is loaded, so changes made through it count), else
    read from the built-in ``posix.environ``."""
    os_module = sys.modules.get("os")
    if os_module is not None:
        return os_module.environ.get(name)
    value = posix.environ.get(name.encode())
    if value is None:
        return None
    return value.decode(sys.getfilesystemencoding(), "surrogateescape")


def _check_trusted_fd(fd: int, path: str) -> None:
    st = posix.fstat(fd)
    if st.st_mode & _S_IFMT != _S_IFREG:
        raise ConfigError(f"{path} is not a regular file")
    if st.st_uid != 0:
        raise ConfigError(f"{path} is not owned by root (owner uid {st.st_uid})")
    if st.st_mode & (_S_IWGRP | _S_IWOTH):
        raise ConfigError(f"{path} is writable by group or others (mode {st.st_mode & 0o777:o})")


def _open(path: str) -> int:
    # O_NOFOLLOW: whoever can plant a symlink must not choose the trusted file;
    # O_NONBLOCK: a FIFO must not hang us before fstat refuses it.
    try:
        return posix.open(
            path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC | posix.O_NONBLOCK
        )
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def check_trusted(path: str) -> None:
    """The file must be a regular file (not a symlink) owned by root and not group/other
    writable."""
    fd = _open(path)
    try:
        _check_trusted_fd(fd, path)
    finally:
        posix.close(fd)


def load(path: str | None = None, *, trusted: bool = True) -> UdiRootConfig:
    """Read ``path`` (default ``$SHIFTER_UDIROOT_CONF`` for tests of unprivileged tools,
    else the system file), checking ownership of the opened file first when ``trusted``."""
    path = path or _getenv("SHIFTER_UDIROOT_CONF") or DEFAULT_PATH
    fd = _open(path)
    try:
        if trusted:
            _check_trusted_fd(fd, path)
        with open(fd, encoding="utf-8", errors="surrogateescape", closefd=False) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        posix.close(fd)
    return parse_text(text, path)


def load_or_exit(path: str | None = None, *, trusted: bool = True) -> UdiRootConfig:
    """:func:`load`, printing Shifter's messages and exiting 1 on failure."""
    try:
        cfg = load(path, trusted=trusted)
    except ConfigError as exc:
        print(explain(exc, path or _getenv("SHIFTER_UDIROOT_CONF") or DEFAULT_PATH),
              file=sys.stderr)
        print("FAILED to parse udiRoot configuration.", file=sys.stderr)
        raise SystemExit(1) from None
    for warning in cfg.warnings:
        print(warning, file=sys.stderr)
    return cfg
