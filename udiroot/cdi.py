"""CDI specs (``cdiSpecDirs``) applied to a GPU launch (docs/behaviour.md, 'Runtime: GPU').

A site that runs ``nvidia-ctk cdi generate`` (JSON, or YAML read by :mod:`udiroot.cdiyaml`)
names the spec directories in ``cdiSpecDirs``; specs of kind ``nvidia.com/gpu`` are read
and, for the GPUs of the launch, the spec's own ``containerEdits`` and those of each of its
devices named by the selection (the index ``"N"``, the GPU's UUID, the MIG UUID asked for,
``all`` for a bare ``--gpu``) are applied:

* ``deviceNodes``: the host node (``hostPath``, else ``path``) must be the character
  device of the same name in ``gpuDeviceDir``; ``nvidiaN`` and ``nvidia-caps/nvidia-capN``
  join the helper's selection, other nodes must be in the host's ``/dev`` (which the
  container's ``/dev`` copies);
* ``mounts``: ``hostPath`` must lie (symbolic links resolved) in a driver directory: one
  holding a driver file found in the ld.so cache, a ``gpuBinaryPath`` directory, or one of
  ``cdiMountDirs``; the helper binds it read-only, ``nosuid,nodev`` at ``containerPath``,
  opened with the user's rights; a ``containerPath`` where a user volume may not go
  (``/etc``, ``/var``, ``/dev``, …) is left out;
* ``env``: ``NAME=VALUE`` entries, after the GPU layer;
* ``hooks``: refused unless their ``path`` is listed in ``allowCdiHooks``; allowed ones run
  as the user, inside the container, before the command (``/bin/sh`` of the image runs
  them), never as root.

Who can change a spec changes what every user's GPU container holds, so each spec
directory (and each directory above it) must be owned by root and not writable by group
or others (a sticky one such as ``/tmp`` above is fine), and each spec file too. This is the
front end protecting the user who runs it; the helper needs no such trust: what it is given
(device numbers, files opened with the caller's rights) is what the caller could ask for.
"""

from __future__ import annotations

import json
import posix
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

FAILED = "FAILED to set up GPU support"
KIND = "nvidia.com/gpu"
MAX_SPEC = 4 * 1024 * 1024
DEFAULT_MOUNT_DIRS = ("/lib/firmware/nvidia /usr/lib/firmware/nvidia /run/nvidia-persistenced "
                      "/run/nvidia-fabricmanager")
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
              "poststop")
RUN_BEFORE = ("prestart", "createRuntime", "createContainer", "startContainer")
CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
USER_FORBIDDEN_UNDER = ("/etc", "/var", "/opt/udiImage", "/dev", "/proc", "/sys")


class CdiError(ValueError):
    """A spec that cannot be applied; the message names the file and the entry."""


class Plan:
    """What the specs add: device numbers, mounts ``(target, source)``, environment
    ``(name, value)``, hooks ``(path, args after argv[0], env)``, and what was left out."""

    __slots__ = ("caps", "env", "gpus", "hooks", "mounts", "skipped", "specs")

    def __init__(self) -> None:
        self.gpus: list[int] = []
        self.caps: list[int] = []
        self.mounts: list[tuple[str, str]] = []
        self.env: list[tuple[str, str]] = []
        self.hooks: list[tuple[str, list[str], list[str]]] = []
        self.skipped: list[str] = []
        self.specs: list[str] = []


def _norm(path: str) -> str | None:
    """Absolute, no ``..``, no control characters; repeated ``/`` and ``.`` dropped."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) >= 4096:
        return None
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/" + "/".join(parts)


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _trusted(path: str, st: posix.stat_result, what: str) -> None:
    if st.st_uid != 0:
        raise CdiError(f"{FAILED}: {what} {path} is not owned by root (uid {st.st_uid}): "
                       "CDI specs are not read from it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
            stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and what != "spec dir"):
        raise CdiError(f"{FAILED}: {what} {path} is writable by group or others (mode "
                       f"{stat.S_IMODE(st.st_mode):o}): CDI specs are not read from it")


def _check_dir(path: str) -> bool:
    """A spec dir root controls, every directory above it too (links resolved first:
    ``/var/run`` is one); False if it is missing."""
    import os.path

    path = os.path.realpath(path)
    try:
        st = posix.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CdiError(f"{FAILED}: cannot read the CDI spec dir {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CdiError(f"{FAILED}: the CDI spec dir {path} is not a directory")
    _trusted(path, st, "spec dir")
    parent = path
    while parent != "/":
        parent = parent.rsplit("/", 1)[0] or "/"
        _trusted(parent, posix.lstat(parent), "directory")
    return True


def _read_spec(path: str) -> Any:
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC |
                        posix.O_NONBLOCK)
    except OSError as exc:
        raise CdiError(f"{FAILED}: cannot open the CDI spec {path}: {exc.strerror}") from None
    try:
        st = posix.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CdiError(f"{FAILED}: the CDI spec {path} is not a regular file")
        _trusted(path, st, "spec")
        chunks, size = [], 0
        while chunk := posix.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SPEC:
                raise CdiError(f"{FAILED}: the CDI spec {path} is larger than {MAX_SPEC} bytes")
    finally:
        posix.close(fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    try:
        if path.endswith(".json"):
            return json.loads(text)
        from udiroot.cdiyaml import loads

        return loads(text)
    except ValueError as exc:
        raise CdiError(f"{FAILED}: the CDI spec {path} does not parse: {exc}") from None


def load_specs(dirs: str) -> list[tuple[str, dict[str, Any]]]:
    """``(path, spec)`` of each ``nvidia.com/gpu`` spec in the ``cdiSpecDirs`` list, in
    the list's order and file name order within a dir."""
    out = []
    for d in dirs.split():
        where = _norm(d)
        if where is None:
            raise CdiError(f"FAILED to parse udiRoot configuration. (cdiSpecDirs: {d} is not "
                           "an absolute path)")
        if not _check_dir(where):
            continue
        for name in sorted(posix.listdir(where)):
            if not name.endswith((".json", ".yaml", ".yml")):
                continue
            path = f"{where}/{name}"
            spec = _read_spec(path)
            if not isinstance(spec, dict) or not isinstance(spec.get("cdiVersion"), str):
                raise CdiError(f"{FAILED}: the CDI spec {path} has no cdiVersion")
            if spec.get("kind") != KIND:
                continue
            out.append((path, spec))
    return out


def _list(value: Any, what: str, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CdiError(f"{FAILED}: CDI spec {path}: {what} is not a list")
    return value


def _str(entry: dict[str, Any], key: str, path: str, what: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise CdiError(f"{FAILED}: CDI spec {path}: a {what} without {key}")
    return value


class _Context:
    def __init__(self, cfg: Mapping[str, str], driver_dirs: list[str]) -> None:
        self.dev = (cfg.get("gpuDeviceDir") or "/dev").rstrip("/") or "/"
        self.mount_dirs = driver_dirs + (cfg.get("cdiMountDirs") or DEFAULT_MOUNT_DIRS).split()
        self.hooks = (cfg.get("allowCdiHooks") or "").split()


def _device(node: Any, path: str, ctx: _Context, plan: Plan) -> None:
    if not isinstance(node, dict):
        raise CdiError(f"{FAILED}: CDI spec {path}: a deviceNode is not a mapping")
    inside = _norm(_str(node, "path", path, "deviceNode"))
    host = _norm(node.get("hostPath") or node["path"])
    if inside is None or host is None or not inside.startswith("/dev/"):
        raise CdiError(f"{FAILED}: CDI spec {path}: device {node.get('path')} is not a path "
                       "under /dev")
    rel = inside[len("/dev/"):]
    if host != f"{ctx.dev}/{rel}":
        raise CdiError(f"{FAILED}: CDI spec {path}: device {host} is not {ctx.dev}/{rel}: "
                       "device nodes come only from the device dir (gpuDeviceDir)")
    try:
        mode = posix.lstat(host).st_mode
    except OSError:
        mode = 0
    if not stat.S_ISCHR(mode) or node.get("type", "c") != "c":
        raise CdiError(f"{FAILED}: CDI spec {path}: device {host} is not a character device")
    digits = rel[len("nvidia"):]
    cap = rel[len("nvidia-caps/nvidia-cap"):]
    if rel.startswith("nvidia") and digits.isdigit() and digits.isascii() and int(digits) < 64:
        if int(digits) not in plan.gpus:
            plan.gpus.append(int(digits))
    elif rel.startswith("nvidia-caps/nvidia-cap") and cap.isdigit() and cap.isascii():
        if int(cap) not in plan.caps:
            plan.caps.append(int(cap))
    elif rel not in CONTROL:
        try:
            ok = stat.S_ISCHR(posix.lstat(f"/dev/{rel}").st_mode)
        except OSError:
            ok = False
        if not ok:
            raise CdiError(f"{FAILED}: CDI spec {path}: device /dev/{rel} is not a device of "
                           "this node's /dev, which the container's /dev copies")


def _mount(entry: Any, path: str, ctx: _Context, plan: Plan) -> None:
    if not isinstance(entry, dict):
        raise CdiError(f"{FAILED}: CDI spec {path}: a mount is not a mapping")
    source = _norm(_str(entry, "hostPath", path, "mount"))
    target = _norm(_str(entry, "containerPath", path, "mount"))
    if source is None or target is None:
        raise CdiError(f"{FAILED}: CDI spec {path}: mount {entry.get('hostPath')} -> "
                       f"{entry.get('containerPath')}: paths must be absolute, without '..'")
    try:
        real = _realpath(source)
    except OSError as exc:
        raise CdiError(f"{FAILED}: CDI spec {path}: mount source {source}: {exc.strerror}"
                       ) from None
    if not any(_under(real, d) for d in ctx.mount_dirs):
        raise CdiError(f"{FAILED}: CDI spec {path}: mount source {source} is outside the "
                       "driver's directories (those of the driver files in the ld.so cache, "
                       "gpuBinaryPath, cdiMountDirs)")
    if target in ("/", "/opt") or any(_under(target, b) for b in USER_FORBIDDEN_UNDER):
        plan.skipped.append(f"{target} (a path volumes may not use)")
        return
    if all(t != target for t, _ in plan.mounts):
        plan.mounts.append((target, source))


def _realpath(path: str) -> str:
    """``path`` with every symbolic link resolved (it must exist)."""
    import os.path

    posix.stat(path)
    return os.path.realpath(path)


def _env(entry: Any, path: str, plan: Plan) -> None:
    name, sep, value = entry.partition("=") if isinstance(entry, str) else ("", "", "")
    if not sep or not name or not (name[0].isalpha() or name[0] == "_") or not all(
            c.isascii() and (c.isalnum() or c == "_") for c in name):
        raise CdiError(f"{FAILED}: CDI spec {path}: env entry {entry!r} is not NAME=VALUE")
    plan.env = [(n, v) for n, v in plan.env if n != name] + [(name, value)]


def _hook(entry: Any, path: str, ctx: _Context, plan: Plan) -> None:
    if not isinstance(entry, dict):
        raise CdiError(f"{FAILED}: CDI spec {path}: a hook is not a mapping")
    name = _str(entry, "hookName", path, "hook")
    program = _norm(_str(entry, "path", path, "hook"))
    if name not in HOOK_NAMES or program is None:
        raise CdiError(f"{FAILED}: CDI spec {path}: hook {name} {entry.get('path')} is not "
                       "an OCI hook with an absolute path")
    if program not in ctx.hooks:
        raise CdiError(f"{FAILED}: CDI spec {path}: its {name} hook {program} is not allowed "
                       "on this node (allowCdiHooks). Hooks run only if the site lists them.")
    args = _list(entry.get("args"), "hook args", path)
    env = _list(entry.get("env"), "hook env", path)
    if not all(isinstance(a, str) for a in args + env):
        raise CdiError(f"{FAILED}: CDI spec {path}: hook {program}: args and env are strings")
    for e in env:
        _env(e, path, Plan())  # checked only
    if name in RUN_BEFORE and (program, args[1:], env) not in plan.hooks:
        plan.hooks.append((program, args[1:], env))


def _apply(edits: Any, path: str, ctx: _Context, plan: Plan) -> None:
    if edits is None:
        return
    if not isinstance(edits, dict):
        raise CdiError(f"{FAILED}: CDI spec {path}: containerEdits is not a mapping")
    for node in _list(edits.get("deviceNodes"), "deviceNodes", path):
        _device(node, path, ctx, plan)
    for mount in _list(edits.get("mounts"), "mounts", path):
        _mount(mount, path, ctx, plan)
    for entry in _list(edits.get("env"), "env", path):
        _env(entry, path, plan)
    for hook in _list(edits.get("hooks"), "hooks", path):
        _hook(hook, path, ctx, plan)


def plan(cfg: Mapping[str, str], names: list[str], driver_dirs: list[str]) -> Plan:
    """What the ``cdiSpecDirs`` specs add for the devices named ``names`` (``"0"``,
    ``GPU-…``, ``MIG-…``, ``all``); nothing when the key is unset."""
    out = Plan()
    dirs = cfg.get("cdiSpecDirs") or ""
    if not dirs.strip():
        return out
    ctx = _Context(cfg, driver_dirs)
    for path, spec in load_specs(dirs):
        devices = _list(spec.get("devices"), "devices", path)
        chosen = []
        for dev in devices:
            if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
                raise CdiError(f"{FAILED}: CDI spec {path}: a device without a name")
            if dev["name"] in names:
                chosen.append(dev)
        if not chosen:
            continue
        out.specs.append(path)
        _apply(spec.get("containerEdits"), path, ctx, out)
        for dev in chosen:
            _apply(dev.get("containerEdits"), path, ctx, out)
    return out


def names_of(selectors: list[int | str] | str, proc_dir: str | None) -> list[str]:
    """The CDI device names of a selection: ``all`` for a bare ``--gpu``; each GPU asked
    for by index or UUID as both (``nvidia-ctk`` names devices by index, by UUID or both);
    a MIG instance by the identifier asked for."""
    from udiroot.gpuids import DEFAULT_PROC_DIR, gpu_minors, is_gpu_uuid

    if isinstance(selectors, str):
        return ["all"]
    by_minor = {m: u for u, m in gpu_minors(proc_dir or DEFAULT_PROC_DIR).items()}
    uuids = {u.lower(): u for u in by_minor.values()}
    names: list[str] = []
    for sel in selectors:
        if isinstance(sel, int):
            names += [str(sel)] + ([by_minor[sel]] if sel in by_minor else [])
        elif is_gpu_uuid(sel):
            minor = next((m for m, u in by_minor.items() if u.lower() == sel.lower()), None)
            names += [uuids.get(sel.lower(), sel)] + ([str(minor)] if minor is not None else [])
        else:
            names.append(sel)
    return names


def hook_command(plan: Plan, site_resources: str, command: list[str]
                 ) -> tuple[list[str], list[str]]:
    """``(--gpu-file specs, command)``: each hook program bound as
    ``<siteResources>/gpu/bin/<name>`` and the command run by the image's ``/bin/sh``
    after the hooks, as the user (a failing hook stops the launch with its status)."""
    if not plan.hooks:
        return [], command
    import shlex

    files: dict[str, str] = {}
    steps = []
    for program, args, env in plan.hooks:
        name = program.rsplit("/", 1)[1]
        if files.setdefault(name, program) != program:
            raise CdiError(f"{FAILED}: two CDI hooks are both named {name}")
        inside = f"{site_resources.rstrip('/')}/gpu/bin/{name}"
        words = [f"{n}={shlex.quote(v)}" for n, _, v in (e.partition("=") for e in env)]
        words.append(shlex.quote(inside))
        words += [shlex.quote(a) for a in args]
        steps.append(" ".join(words) + f" || {{ echo 'CDI hook {name} failed' >&2; exit 1; }}")
    script = "; ".join(steps) + '; exec "$@"'
    return [f"bin/{n}={p}" for n, p in files.items()], ["/bin/sh", "-c", script, "sh", *command]
