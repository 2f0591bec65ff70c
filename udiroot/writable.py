"""``shifter --writable-tmpfs[=SIZE]``: the site's rule (docs/behaviour.md, 'Runtime: writable
containers'). The setuid helper applies the same rule again, with the same messages
(helpers/writable.c); this side only says no earlier.

* ``allowWritableTmpfs`` (a flag, default off) allows it at all;
* ``writableTmpfsSizeLimit`` (a size, default 1G) caps the layer; a bare option asks for
  the whole limit, ``=SIZE`` for less (sizes as perNodeCache's: ``512M``, ``1.5g``);
* images only: a ``--local`` tree is never put under an overlay.
"""

from __future__ import annotations

from udiroot.volumes import VolumeError, parse_size

DEFAULT_LIMIT = 1 << 30


class WritableError(ValueError):
    """--writable-tmpfs cannot be granted; the message says why."""


def writable_size(value: str | None, *, allowed: bool, limit: str | None, local: bool) -> int:
    """The upper layer's size in bytes for ``--writable-tmpfs`` (``value`` None: bare)."""
    if not allowed:
        raise WritableError(
            "--writable-tmpfs is not allowed on this system (allowWritableTmpfs=0)"
        )
    if local:
        raise WritableError("--writable-tmpfs works with images only, not with --local")
    most = DEFAULT_LIMIT
    if limit:
        try:
            most = parse_size(limit)
        except VolumeError as exc:
            raise WritableError(
                f"FAILED to parse udiRoot configuration. (writableTmpfsSizeLimit: {exc})"
            ) from None
    if value is None:
        return most
    try:
        want = parse_size(value)
    except VolumeError:
        want = 0
    if want <= 0:
        raise WritableError(f"Invalid --writable-tmpfs size {value}: give a size such as 512M")
    if want > most:
        raise WritableError(
            f"--writable-tmpfs of {want} bytes is over the site limit of {most} bytes "
            "(writableTmpfsSizeLimit)"
        )
    return want
