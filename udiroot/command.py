"""What to execute and where: command, entrypoint and working directory (docs/behaviour.md,
'Runtime: command, entrypoint, workdir').

| ``--entrypoint`` | args | result                                         |
|------------------|------|------------------------------------------------|
| absent           | yes  | args                                           |
| absent           | no   | ``$SHELL``, else ``/bin/sh``                   |
| ``=X``           | any  | ``X`` + args                                   |
| bare             | yes  | image ENTRY + args                             |
| bare             | no   | image ENTRY + image CMD (CMD may be absent)    |
| bare, no ENTRY   | any  | error "Image does not have a defined entrypoint." |

Working directory: the caller's cwd; ``--workdir=X`` gives X; bare ``--workdir`` gives
the image WORKDIR, or the error when the image has none. ``--entrypoint=`` and
``--workdir=`` with an empty value count as bare.
"""

from __future__ import annotations

NO_ENTRYPOINT = "Image does not have a defined entrypoint."
NO_WORKDIR = "No workdir specified on command line or in image definition."
DEFAULT_SHELL = "/bin/sh"


class CommandError(ValueError):
    """The message is Shifter's, to print before exiting 1."""


def select_command(
    args: list[str],
    *,
    use_entrypoint: bool = False,
    entrypoint: str | None = None,
    image_entry: list[str] | None = None,
    image_cmd: list[str] | None = None,
    shell: str | None = None,
) -> list[str]:
    """``use_entrypoint`` is True when ``--entrypoint`` was given, ``entrypoint`` its value
    (``None`` or ``""`` when bare); ``shell`` is the caller's ``$SHELL``."""
    if not use_entrypoint:
        if args:
            return list(args)
        return [shell or DEFAULT_SHELL]
    if entrypoint:
        return [entrypoint, *args]
    if not image_entry:
        raise CommandError(NO_ENTRYPOINT)
    if args:
        return [*image_entry, *args]
    return [*image_entry, *(image_cmd or [])]


def select_workdir(
    cwd: str,
    *,
    use_workdir: bool = False,
    workdir: str | None = None,
    image_workdir: str | None = None,
) -> str:
    if not use_workdir:
        return cwd
    if workdir:
        return workdir
    if not image_workdir:
        raise CommandError(NO_WORKDIR)
    return image_workdir
