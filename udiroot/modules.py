"""Which site modules (``module_<name>_*`` in udiRoot.conf) are active (docs/behaviour.md, 'Runtime:
modules').

``defaultModules`` apply unless the user names modules with ``--module`` or
``SHIFTER_MODULE`` (``SLURM_SPANK_SHIFTER_MODULE`` as its twin), which replace the default
set. ``none`` (any case, alone) means no modules; an empty ``--module=`` too. Names are
comma-separated, blanks (space, tab) around them trimmed, repeats ignored, order kept (it
is the order of the environment layers and of the reuse signature). A name must be 1 to
64 of ``[A-Za-z0-9_.+-]`` and a module set in udiRoot.conf and not disabled, else
"Unknown shifter module: X"; a pair where either lists the other in its space-separated
``conflict`` is "ERROR: cannot load conflicting modules A and B" (A the later one); at
most 32 modules. The helper re-checks the list with the same rule
(``conf_select_modules`` in helpers/conf.c; tests/test_helper_rules.py compares them).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from udiroot.config import Module, UdiRootConfig


MAX_MODULES = 32
MAX_MODULE_NAME = 64
# The helper copies a list into a buffer of this many bytes (NUL included).
MAX_LIST_BYTES = MAX_MODULES * (MAX_MODULE_NAME + 1) + 64
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-")
_BLANKS = " \t"


class ModuleError(ValueError):
    """The message is the one to print before exiting 1."""


def requested_modules(option: str | None, environ: Mapping[str, str]) -> str | None:
    """The user's module text (``--module`` value, else the environment), or ``None``
    when the user chose nothing and the defaults apply."""
    if option is not None:
        return option
    return environ.get("SHIFTER_MODULE") or environ.get("SLURM_SPANK_SHIFTER_MODULE") or None


def module_names(text: str) -> list[str]:
    if text.strip(_BLANKS).lower() == "none":
        return []
    names: list[str] = []
    for piece in text.split(","):
        name = piece.strip(_BLANKS)
        if name and name not in names:
            names.append(name)
    return names


def select_modules(cfg: UdiRootConfig, request: str | None = None) -> list[Module]:
    """Active modules in order, from the user's request or ``defaultModules``."""
    text = request if request is not None else (cfg.get("defaultModules") or "")
    if len(text.encode("utf-8", "surrogateescape")) >= MAX_LIST_BYTES:
        raise ModuleError(f"module list longer than {MAX_LIST_BYTES - 1} bytes")
    active: list[Module] = []
    for name in module_names(text):
        module = cfg.modules.get(name)
        if (
            len(name) > MAX_MODULE_NAME
            or any(c not in _NAME_CHARS for c in name)
            or module is None
            or not module.enabled
        ):
            raise ModuleError(f"Unknown shifter module: {name}")
        mine = _conflicts(module)
        for other in active:
            if other.name in mine or name in _conflicts(other):
                raise ModuleError(f"ERROR: cannot load conflicting modules {name} and {other.name}")
        if len(active) >= MAX_MODULES:
            raise ModuleError(f"more than {MAX_MODULES} modules requested")
        active.append(module)
    return active


def _conflicts(module: Module) -> list[str]:
    """The words of ``conflict``, separated by spaces and tabs only (as the helper reads
    them: a vertical tab is part of a word)."""
    return [w for w in module.values.get("conflict", "").replace("\t", " ").split(" ") if w]
