"""Putting finished files into the image dir so that a reader never sees a partial one.

Every file is written under ``<name>.partial.XXXXXX`` in the target directory, given
its mode, flushed to disk, and renamed to its final name: rename within one
filesystem is atomic, so the runtime sees either nothing or the whole file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def partial_path(image_dir: Path, name: str) -> Path:
    """A fresh temporary path in ``image_dir`` for building ``name`` in place."""
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.partial.", dir=image_dir)
    os.close(fd)
    return Path(tmp)


def commit(tmp: Path, final: Path, mode: int = 0o644) -> None:
    """Give ``tmp`` its mode, flush it to disk and rename it over ``final``."""
    os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)


def place_bytes(image_dir: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` as ``image_dir/name`` atomically."""
    tmp = partial_path(image_dir, name)
    try:
        tmp.write_bytes(data)
        commit(tmp, image_dir / name, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return image_dir / name


def move_file(src: Path, image_dir: Path, name: str, mode: int = 0o644) -> Path:
    """Move ``src`` to ``image_dir/name`` atomically (copied when on another filesystem)."""
    tmp = partial_path(image_dir, name)
    try:
        try:
            os.rename(src, tmp)
            copied = False
        except OSError:
            shutil.copyfile(src, tmp)
            copied = True
        commit(tmp, image_dir / name, mode)
        if copied:
            src.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return image_dir / name
