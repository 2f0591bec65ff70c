#!/usr/bin/env python3
"""After the tests: no set-uid or set-gid file of ours may be left on the machine.

``make test`` runs this after pytest, whatever pytest's result. Every set-id regular file
on the local filesystems of /, /tmp, /var, /usr/local, /opt and /home must belong to a
Debian package (``dpkg -S``) or be the installed product helper
(``PREFIX/libexec/shifter/shifter-helper``); anything else is listed and the exit status
is 1. Set-gid directories are not looked at (they grant nothing).

    python3 tests/setuid_audit.py [--prefix /usr/local]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOTS = ("/", "/tmp", "/var", "/usr/local", "/opt", "/home")


def setid_files() -> list[str]:
    """Set-uid/set-gid regular files on / and on those of ROOTS that are other filesystems."""
    devs: set[int] = set()
    found: list[str] = []
    for root in ROOTS:
        try:
            dev = os.stat(root).st_dev
        except FileNotFoundError:
            continue
        if dev in devs:
            continue
        devs.add(dev)
        out = subprocess.run(["find", root, "-xdev", "-type", "f", "(", "-perm", "-4000",
                              "-o", "-perm", "-2000", ")", "-print0"],
                             capture_output=True).stdout
        found += [p.decode(errors="surrogateescape") for p in out.split(b"\0") if p]
    return sorted(set(found))


def _aliases(path: str) -> list[str]:
    """The names dpkg may know the file by: merged /usr makes /bin/x and /usr/bin/x one."""
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if path.startswith(f"/usr/{top}/"):
            return [path, path[len("/usr"):]]
        if path.startswith(f"/{top}/"):
            return [path, "/usr" + path]
    return [path]


def packaged(paths: list[str]) -> set[str]:
    """The paths of ``paths`` that a Debian package owns."""
    names = {alias: path for path in paths for alias in _aliases(path)}
    if not names:
        return set()
    out = subprocess.run(["dpkg-query", "-S", *names], capture_output=True, text=True).stdout
    owned = set()
    for line in out.splitlines():
        pkg, sep, name = line.partition(": ")
        if sep and name in names:
            owned.add(names[name])
    return owned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="/usr/local", help="make install's PREFIX")
    args = ap.parse_args(argv)
    product = os.path.join(args.prefix, "libexec/shifter/shifter-helper")
    hits = [p for p in setid_files() if p != product]
    stray = sorted(set(hits) - packaged(hits))
    if stray:
        print(f"setuid-audit: {len(stray)} set-id file(s) of no package and not "
              f"{product} (left by the tests? remove them or clear their set-id bits):",
              file=sys.stderr)
        for path in stray:
            print(f"  {path}", file=sys.stderr)
        return 1
    print(f"setuid-audit: ok ({len(hits)} set-id files, all from Debian packages"
          f"{'' if not os.path.exists(product) else f'; and {product}'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
