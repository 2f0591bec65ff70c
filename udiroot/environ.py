"""The container's environment, built in layers; later layers override earlier ones.

Order (docs/behaviour.md, 'Runtime: environment'):

1. the caller's environment without ``LD_*`` (what a setuid program is left with), or
   nothing with ``--clearenv``;
2. ``SHIFTER_IMAGEREQUEST`` (the request as given; not set when there was none, see
   ``shifter/launch.py``) and ``SHIFTER_IMAGE=<id>``;
3. the image's ``ENV`` lines;
4. ``--env-file`` lines (blank and ``#`` lines skipped; a line needs ``NAME=``);
5. ``--env NAME=VALUE`` (``=`` neither first nor last);
   then, with a GPU request, the GPU layer (``udiroot/gpu.py``: driver dirs on
   ``LD_LIBRARY_PATH`` and ``PATH``, ``CUDA_VISIBLE_DEVICES`` renumbered);
6. each active module's ``siteEnv``, ``siteEnvAppend``, ``siteEnvPrepend``,
   ``siteEnvUnset``, in module order;
7. the same four keys of ``udiRoot.conf``.

Append gives ``cur:new``, prepend ``new:cur``; on an absent or empty variable just
``new``; an empty ``new`` changes nothing (it would put the current directory on a path).
Names match exactly: ``PATH`` is not ``PATH_2``. The site keys are space-separated words.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from udiroot.config import Module

IMPROPER = "Improperly formatted environment variable"


class EnvError(ValueError):
    """A malformed variable; the message names it."""


def caller_environment(environ: Mapping[str, str], clearenv: bool = False) -> dict[str, str]:
    if clearenv:
        return {}
    return {name: value for name, value in environ.items() if not name.startswith("LD_")}


def parse_env_option(text: str) -> tuple[str, str]:
    """``--env NAME=VALUE``: the ``=`` may be neither the first nor the last character."""
    eq = text.find("=")
    if eq <= 0 or eq == len(text) - 1:
        raise EnvError(f"{IMPROPER}: {text}")
    return text[:eq], text[eq + 1 :]


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """``--env-file`` content. Leading blanks are ignored; the value is taken verbatim
    (no quote processing, as Docker's env-file); a trailing ``\\r`` is dropped."""
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        stripped = line.lstrip(" \t")
        if stripped == "" or stripped.startswith("#"):
            continue
        eq = stripped.find("=")
        name = stripped[:eq] if eq > 0 else ""
        if name == "" or " " in name or "\t" in name:
            raise EnvError(f"{IMPROPER} on line {number} of the env file: {stripped}")
        pairs.append((name, stripped[eq + 1 :]))
    return pairs


def apply_site_env(env: dict[str, str], values: Mapping[str, str], where: str) -> None:
    """One layer of site settings (a module's or udiRoot.conf's), in the order
    set, append, prepend, unset. ``where`` names the source in error messages."""
    for name, value in _site_pairs(values, "siteEnv", where):
        env[name] = value
    for name, value in _site_pairs(values, "siteEnvAppend", where):
        if value == "":
            continue
        current = env.get(name)
        env[name] = f"{current}:{value}" if current else value
    for name, value in _site_pairs(values, "siteEnvPrepend", where):
        if value == "":
            continue
        current = env.get(name)
        env[name] = f"{value}:{current}" if current else value
    for name in _words(values.get("siteEnvUnset", "")):
        env.pop(name, None)


def _site_pairs(values: Mapping[str, str], key: str, where: str) -> list[tuple[str, str]]:
    pairs = []
    for word in _words(values.get(key, "")):
        eq = word.find("=")
        if eq <= 0:
            raise EnvError(f"Invalid {key} entry in {where}: {word} (need NAME=VALUE)")
        pairs.append((word[:eq], word[eq + 1 :]))
    return pairs


def _words(value: str) -> list[str]:
    # Spaces and tabs only (the C side splits on those), not every Unicode blank.
    return [w for w in value.replace("\t", " ").split(" ") if w]


def build_environment(
    caller: Mapping[str, str],
    *,
    image_request: str | None,
    image_id: str,
    clearenv: bool = False,
    image_env: Iterable[str] = (),
    env_file: Iterable[tuple[str, str]] = (),
    env_options: Iterable[str] = (),
    modules: Sequence[Module] = (),
    site: Mapping[str, str] | None = None,
    gpus: list[int | str] | str | None = None,
    gpu_env: Iterable[tuple[str, str]] = (),
) -> dict[str, str]:
    """The whole stack of docs/behaviour.md, 'Runtime: environment'. ``modules`` are the
    active ones in order; ``site`` is ``UdiRootConfig.values``; ``env_file`` is
    :func:`parse_env_file` output; ``gpus`` is :func:`udiroot.gpu.requested_gpus` output;
    ``gpu_env``, the CDI specs' variables (:mod:`udiroot.cdi`), comes right after the GPU
    layer."""
    env = caller_environment(caller, clearenv)
    if image_request is not None:
        env["SHIFTER_IMAGEREQUEST"] = image_request
    env["SHIFTER_IMAGE"] = image_id
    for entry in image_env:
        eq = entry.find("=")
        if eq <= 0:
            raise EnvError(f"{IMPROPER} in the image: {entry}")
        env[entry[:eq]] = entry[eq + 1 :]
    for name, value in env_file:
        env[name] = value
    for text in env_options:
        name, value = parse_env_option(text)
        env[name] = value
    if gpus is not None:
        from udiroot.gpu import apply_gpu_env

        apply_gpu_env(env, gpus, (site or {}).get("siteResources"))
        env.update(gpu_env)
    for module in modules:
        apply_site_env(env, module.values, f"module {module.name}")
    if site is not None:
        apply_site_env(env, site, "udiRoot.conf")
    return env
