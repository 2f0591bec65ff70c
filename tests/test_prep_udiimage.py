"""``shifter-prep-udiimage`` (docs/behaviour.md, 'Runtime: building the container' step 5.9,
'Runtime: per-container sshd'): the optUdiImage tree with Debian's sshd and ssh, runnable in
any image.

Oracles independent of the tool: ``readelf`` for the interpreter and DT_RPATH, and
glibc's own loader, run inside a root that holds nothing but the tree (no /lib, no libc),
for where every library comes from. That sshd really serves logins from the tree inside
a busybox image is tests/test_runtime_sshd.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREP = REPO / ".venv" / "bin" / "shifter-prep-udiimage"
LIB = "/opt/udiImage/lib"


def prep(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
    return subprocess.run([str(PREP), *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "udiImage"
    res = prep("--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"optUdiImage={out}\n"
    return out


def bare_root(tree: Path, where: Path) -> Path:
    """A root holding only /opt/udiImage (the tree), /dev/null and an /etc/passwd (ssh
    looks its user up: the tree's glibc reads it): no libc at all."""
    root = where / "root"
    shutil.copytree(tree, root / "opt/udiImage", symlinks=True)
    (root / "dev").mkdir()
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return root


def test_layout_and_patched_programs(tree):
    for rel in ("sbin/sshd", "libexec/ssh", "bin/ssh", "lib/ld-linux-x86-64.so.2",
                "lib/libc.so.6", "lib/libcrypto.so.3", "lib/libnss_files.so.2", "SOURCES"):
        assert (tree / rel).is_file(), rel
    assert (tree / "bin/ssh").read_text().splitlines()[-1] == \
        'exec /opt/udiImage/libexec/ssh -F /opt/udiImage/etc/ssh_config "$@"'
    for rel in ("sbin/sshd", "libexec/ssh"):
        prog = str(tree / rel)
        headers = subprocess.run(["readelf", "-lW", prog], capture_output=True, text=True,
                                 check=True).stdout
        assert f"[Requesting program interpreter: {LIB}/ld-linux-x86-64.so.2]" in headers
        dynamic = subprocess.run(["readelf", "-dW", prog], capture_output=True, text=True,
                                 check=True).stdout
        # DT_RPATH, not RUNPATH: it also covers what glibc dlopens (NSS modules).
        assert f"(RPATH)              Library rpath: [{LIB}]" in dynamic
        assert "RUNPATH" not in dynamic
    # Everything readable and runnable by every user (the container copy keeps modes).
    for path in tree.rglob("*"):
        assert path.stat().st_mode & 0o005 == 0o005 or path.stat().st_mode & 0o444 == 0o444


def test_every_library_comes_from_the_tree_in_a_root_without_libc(tree, tmp_path):
    root = bare_root(tree, tmp_path)
    for rel in ("sbin/sshd", "libexec/ssh"):
        res = subprocess.run(["chroot", str(root), f"{LIB}/ld-linux-x86-64.so.2", "--list",
                              f"/opt/udiImage/{rel}"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        deps = [line.split() for line in res.stdout.splitlines() if "=>" in line]
        assert len(deps) > 5
        for parts in deps:
            assert parts[2].startswith(f"{LIB}/"), parts
    res = subprocess.run(["chroot", str(root), "/opt/udiImage/libexec/ssh", "-V"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.startswith("OpenSSH_"), res.stderr


def test_refuses_to_overwrite_unless_forced(tree, tmp_path):
    out = tmp_path / "udiImage"
    out.mkdir()
    (out / "site-file").write_text("mine\n")
    res = prep("--out", str(out))
    assert res.returncode == 1 and "--force" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["site-file"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    res = prep("--out", str(out), "--force")
    assert res.returncode == 0, res.stderr
    assert (out / "sbin/sshd").is_file() and not (out / "site-file").exists()


def test_a_missing_program_is_a_clear_error(tmp_path):
    res = prep("--out", str(tmp_path / "u"), "--sshd", "/nonexistent/sshd")
    assert res.returncode == 1
    assert "/nonexistent/sshd is missing" in res.stderr
    assert not (tmp_path / "u").exists()
    assert os.listdir(tmp_path) == []
