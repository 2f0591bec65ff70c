"""``shifter-etc-sync``: keep ``etcPath``'s passwd and group equal to the node's name service.

    shifter-etc-sync                      # etcPath from /etc/shifter/udiRoot.conf
    shifter-etc-sync --etc-path DIR       # a directory named explicitly
    shifter-etc-sync --config FILE        # etcPath from another udiRoot.conf

The runtime resolves user and group names from ``etcPath/passwd`` and ``etcPath/group``
(the files it copies into every container), not from the node's name service: a user
added to LDAP, sssd or ``/etc/passwd`` after those files were written is refused with
"Failed to lookup username". This command rewrites both files from ``getent passwd`` and
``getent group`` (so every NSS source the node has counts), run by root from a systemd
timer (``shifter-etc-sync.timer``) and after adding users.

Each file is written as a temporary file in the same directory, flushed to disk, made
0644 root:root and renamed over the old one: a launch reading it at the same moment sees
either the old or the new file, never a half-written one. A file whose content did not
change is left alone. Passwords never enter (the password field is written as ``x``).
Refuses to write an empty list or one without root (a name service that answered nothing
must not empty the files every container gets).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from shifter import __version__

GETENT = "/usr/bin/getent"
DATABASES = ("passwd", "group")


class SyncError(Exception):
    """The name service or the directory could not give a safe result."""


def entries(database: str, getent: str = GETENT) -> str:
    """``getent DATABASE`` as file content, in getent's order: password fields written as
    ``x``, one line per name (the first source that names it wins, as lookups do)."""
    try:
        proc = subprocess.run([getent, database], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise SyncError(f"cannot run {getent}: {exc.strerror}") from None
    # getent exits 2 when the database is empty: an error for us, as any other failure.
    if proc.returncode != 0:
        raise SyncError(f"`getent {database}` failed (exit {proc.returncode}): "
                        f"{proc.stderr.strip() or 'no entries'}")
    seen: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        fields = line.split(":")
        want = 7 if database == "passwd" else 4
        if len(fields) != want or not fields[0] or fields[0] in seen:
            continue
        if not fields[2].isdigit():
            continue
        fields[1] = "x"
        seen[fields[0]] = fields
    if "root" not in seen:
        raise SyncError(f"`getent {database}` did not list root: refusing to write an "
                        f"incomplete {database}")
    return "".join(":".join(f) + "\n" for f in seen.values())


def write_atomically(path: Path, text: str) -> bool:
    """Replace ``path`` with ``text`` (0644, root's when run by root); False if unchanged."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            if os.geteuid() == 0:
                os.fchown(f.fileno(), 0, 0)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable once the directory is on disk too.
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def sync(etc_path: Path, getent: str = GETENT) -> list[str]:
    """Rewrite passwd and group in ``etc_path``; returns the names of the files changed.
    Both are computed before either is written, so a failure changes nothing."""
    if not etc_path.is_dir():
        raise SyncError(f"etcPath {etc_path} is not a directory: create it "
                        f"(mkdir -p {etc_path}) or fix etcPath in udiRoot.conf")
    texts = {db: entries(db, getent) for db in DATABASES}
    return [db for db in DATABASES if write_atomically(etc_path / db, texts[db])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shifter-etc-sync",
        description="rewrite etcPath's passwd and group from the node's name service")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--etc-path", type=Path, help="the directory (default: etcPath of "
                       "the configuration)")
    where.add_argument("--config", help="udiRoot.conf to read etcPath from (default: "
                       "$SHIFTER_UDIROOT_CONF or /etc/shifter/udiRoot.conf)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    etc_path = args.etc_path
    if etc_path is None:
        from udiroot.config import load_or_exit

        etc_path = Path(load_or_exit(args.config).get("etcPath") or "")
    try:
        changed = sync(etc_path)
    except (SyncError, OSError) as exc:
        print(f"shifter-etc-sync: error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        what = ", ".join(changed) if changed else "nothing (already current)"
        print(f"shifter-etc-sync: {etc_path}: updated {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
