"""Turning a flattened tree into a squashfs image with ``mksquashfs``."""

from __future__ import annotations

import errno
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

MKSQUASHFS = "mksquashfs"

# The codec used when ConverterOptions.squashfs names none (``-comp``), on both conversion
# paths: zstd at level 3 compresses about ten times cheaper than mksquashfs's gzip -9 for
# images within 1% of the size, and decompresses faster at launch (bench/README.md,
# "Compression"). Kernels mount it from 4.14 on; docs/admin-guide.md says how a site whose
# node kernels cannot switches back to gzip.
DEFAULT_COMPRESSION: tuple[str, ...] = ("-comp", "zstd", "-Xcompression-level", "3")


def with_default_compression(options: Sequence[str] | None) -> list[str]:
    """The site's options, preceded by the default codec unless they choose one."""
    opts = list(options or [])
    return opts if "-comp" in opts else [*DEFAULT_COMPRESSION, *opts]


class SquashfsError(Exception):
    """mksquashfs failed; ``no_space`` tells whether the output filesystem was full."""

    def __init__(self, message: str, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


def _pseudo_name(rel: str) -> str:
    if "\n" in rel:
        raise SquashfsError(f"cannot set the mode of {rel!r}: a newline in a file name")
    return "".join("\\" + c if c in ' \t"\\' else c for c in rel)


def squashfs_args(options: Sequence[str] | None) -> list[str]:
    """Arguments after ``mksquashfs SRC DEST``: ours first, then the site's options.

    ``-all-root`` always: the image is run by users who own nothing in it. ``-no-xattrs``
    unless the site asks for ``-xattrs`` (the tree has none of the image's, but the
    expand dir's filesystem may add its own labels). ``-noappend`` always: mksquashfs
    would otherwise append to a file left at the output path.
    """
    opts = with_default_compression(options)
    args = ["-all-root", "-noappend", "-no-progress"]
    if "-xattrs" not in opts:
        args.append("-no-xattrs")
    return args + opts


def make_squashfs(
    tree: Path,
    out: Path,
    options: Sequence[str] | None = None,
    mode_fixes: Mapping[str, int] | None = None,
) -> None:
    """Build ``out`` from ``tree``; ``mode_fixes`` gives modes the tree could not hold."""
    cmd = [MKSQUASHFS, str(tree), str(out), *squashfs_args(options)]
    with tempfile.NamedTemporaryFile("w", suffix=".pseudo", encoding="utf-8") as pseudo:
        if mode_fixes:
            for rel, mode in sorted(mode_fixes.items()):
                pseudo.write(f"{_pseudo_name(rel)} m {mode & 0o7777:o} 0 0\n")
            pseudo.flush()
            cmd += ["-pf", pseudo.name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        except FileNotFoundError as exc:
            raise SquashfsError(
                "mksquashfs is not installed (Debian package squashfs-tools)"
            ) from exc
    if proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        tail = " | ".join(output[-3:]) or f"exit status {proc.returncode}"
        no_space = "No space left" in proc.stderr or "No space left" in proc.stdout
        raise SquashfsError(f"mksquashfs failed: {tail}", no_space=no_space)


def is_no_space(exc: BaseException) -> bool:
    """Whether an error means a filesystem (or quota) is full."""
    if isinstance(exc, SquashfsError):
        return exc.no_space
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
