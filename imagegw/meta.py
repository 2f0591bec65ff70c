"""The ``<id>.meta`` file written next to each image, read by the runtime.

One ``KEY: value`` per line. ENTRY and CMD are JSON arrays (Shifter wrote Python list
reprs, which its runtime split on quotes and broke on a quote inside an element).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping


def _argv(value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return ["/bin/sh", "-c", value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def render_meta(
    *,
    fmt: str = "squashfs",
    entry: object = None,
    cmd: object = None,
    workdir: str | None = None,
    env: Iterable[str] = (),
    user_acl: Iterable[int] = (),
    group_acl: Iterable[int] = (),
    user: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> str:
    """Text of a ``.meta`` file. Variables that the line format cannot carry are skipped."""
    lines = [f"FORMAT: {fmt}"]
    for key, value in (("ENTRY", _argv(entry)), ("CMD", _argv(cmd))):
        if value:
            lines.append(f"{key}: {json.dumps(value)}")
    if workdir and "\n" not in workdir:
        lines.append(f"WORKDIR: {workdir}")
    uacl, gacl = [int(u) for u in user_acl], [int(g) for g in group_acl]
    if uacl:
        lines.append("USERACL: " + ",".join(str(u) for u in uacl))
    if gacl:
        lines.append("GROUPACL: " + ",".join(str(g) for g in gacl))
    for var in env:
        # A newline would start a new key and a trailing backslash would join the next
        # line: the runtime could not read either back as written.
        if "=" not in var or "\n" in var or var.endswith("\\"):
            if warn:
                warn(f"environment entry {var!r} cannot be stored in .meta: skipped")
            continue
        lines.append(f"ENV: {var}")
    if user:
        lines.append(f"USER: {user}")
    return "\n".join(lines) + "\n"


def meta_from_config(config: Mapping[str, object], **extra: object) -> str:
    """``.meta`` text from an OCI image config's ``config`` section."""
    section = config.get("config") or {}
    if not isinstance(section, dict):
        section = {}
    env = section.get("Env") or []
    return render_meta(
        entry=section.get("Entrypoint"),
        cmd=section.get("Cmd"),
        workdir=section.get("WorkingDir") or None,
        env=env if isinstance(env, list) else [],
        **extra,  # type: ignore[arg-type]
    )
