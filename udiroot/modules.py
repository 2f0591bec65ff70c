"""Which site modules (``module_<name>_*`` in udiRoot.conf) are active (spec §6.11).

``defaultModules`` apply unless the user names modules with ``--module`` or
``SHIFTER_MODULE`` (``SLURM_SPANK_SHIFTER_MODULE`` as its twin), which replace the default
set. ``none`` (any case, alone) means no modules; an empty ``--module=`` too. Names are
comma-separated, blanks around them trimmed, repeats ignored, order kept (it is the order
of the environment layers and of the reuse signature). An unknown or disabled module is
"Unknown shifter module: X"; a pair where either lists the other in its space-separated
``conflict`` is "ERROR: cannot load conflicting modules A and B" (A the later one).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from udiroot.config import Module, UdiRootConfig


class ModuleError(ValueError):
    """The message is the one to print before exiting 1."""


def requested_modules(option: str | None, environ: Mapping[str, str]) -> str | None:
    """The user's module text (``--module`` value, else the environment), or ``None``
    when the user chose nothing and the defaults apply."""
    if option is not None:
        return option
    return environ.get("SHIFTER_MODULE") or environ.get("SLURM_SPANK_SHIFTER_MODULE") or None


def module_names(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    names: list[str] = []
    for piece in text.split(","):
        name = piece.strip()
        if name and name not in names:
            names.append(name)
    return names


def select_modules(cfg: UdiRootConfig, request: str | None = None) -> list[Module]:
    """Active modules in order, from the user's request or ``defaultModules``."""
    text = request if request is not None else (cfg.get("defaultModules") or "")
    active: list[Module] = []
    for name in module_names(text):
        module = cfg.modules.get(name)
        if module is None or not module.enabled:
            raise ModuleError(f"Unknown shifter module: {name}")
        mine = _conflicts(module)
        for other in active:
            if other.name in mine or name in _conflicts(other):
                raise ModuleError(f"ERROR: cannot load conflicting modules {name} and {other.name}")
        active.append(module)
    return active


def _conflicts(module: Module) -> list[str]:
    return module.values.get("conflict", "").split()
