"""shifter-etc-sync (``shifter/etc_sync.py``), what `make install` puts where, SLURM_PREFIX.

The runtime refusing a user the files do not know yet, then accepting them after the
command, is shown end to end in ``test_install.py`` (a user created after the packages
were installed, on a fresh Debian root).
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shifter.etc_sync import SyncError, sync

REPO = Path(__file__).resolve().parents[1]
ALICE = "shifter-alice"


def getent(db: str) -> list[str]:
    out = subprocess.run(["getent", db], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[0] for line in out.splitlines()]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-c",
                           f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                           "from shifter.etc_sync import main; sys.exit(main())", *args],
                          capture_output=True, text=True)


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    return d


def test_files_are_the_name_service_written_atomically(etc: Path) -> None:
    assert sync(etc) == ["passwd", "group"]
    for db in ("passwd", "group"):
        path = etc / db
        assert [ln.split(":")[0] for ln in path.read_text().splitlines()] == getent(db)
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0 and st.st_gid == 0
        assert all(ln.split(":")[1] == "x" for ln in path.read_text().splitlines())
    # Nothing changed: nothing rewritten (same inode), no temporary file left behind.
    inode = (etc / "passwd").stat().st_ino
    assert sync(etc) == []
    assert (etc / "passwd").stat().st_ino == inode
    assert sorted(p.name for p in etc.iterdir()) == ["group", "passwd"]


def test_a_stale_copy_is_replaced_by_rename(etc: Path, test_users: dict) -> None:
    # The situation of a site whose files were copied before the user existed.
    stale = [ln for ln in Path("/etc/passwd").read_text().splitlines()
             if not ln.startswith(ALICE + ":")]
    (etc / "passwd").write_text("\n".join(stale) + "\n")
    (etc / "group").write_text(Path("/etc/group").read_text())
    before = (etc / "passwd").stat().st_ino
    res = run_cli("--etc-path", str(etc))
    assert res.returncode == 0, res.stderr
    assert f"{etc}: updated passwd" in res.stdout
    assert (etc / "passwd").stat().st_ino != before  # a new file renamed over the old one
    pw = pwd.getpwnam(ALICE)
    assert f"{ALICE}:x:{pw.pw_uid}:{pw.pw_gid}:" in (etc / "passwd").read_text()


@pytest.mark.parametrize("output, code, reason", [
    ("", 2, "`getent passwd` failed (exit 2)"),
    ("daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n", 0, "did not list root"),
])
def test_a_name_service_that_answers_badly_changes_nothing(
        etc: Path, tmp_path: Path, output: str, code: int, reason: str) -> None:
    fake = tmp_path / "getent"
    fake.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {code}\n")
    fake.chmod(0o755)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    with pytest.raises(SyncError, match=re.escape(reason)):
        sync(etc, getent=str(fake))
    assert (etc / "passwd").read_text() == "root:x:0:0:root:/root:/bin/sh\n"
    assert not (etc / "group").exists()  # group is not written when passwd failed


def test_a_missing_etcpath_is_named_with_the_fix(tmp_path: Path) -> None:
    conf = tmp_path / "udiRoot.conf"
    missing = tmp_path / "no-such-dir"
    conf.write_text(f"udiMount=/var/udiMount\nloopMount=/var/udiLoopMount\n"
                    f"imagePath=/var/lib/shifter/images\nudiRootPath=/opt/shifter/udiRoot\n"
                    f"etcPath={missing}\nrootfsType=tmpfs\n")
    res = run_cli("--config", str(conf))
    assert res.returncode == 1
    assert res.stderr.startswith(f"shifter-etc-sync: error: etcPath {missing} is not a "
                                 f"directory: create it (mkdir -p {missing})"), res.stderr


def test_make_install_needs_no_test_tool() -> None:
    """`make install` builds and copies: it installs no package (the test tools stay in
    `make setup`) and no venv."""
    plan = subprocess.run(["make", "-n", "install", "DESTDIR=/nonexistent"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    for word in ("apt-get", "pip install", "$(PY)", ".venv", "docker-registry", "skopeo"):
        assert word not in plan, f"`make install` would run {word!r}:\n{plan}"


def test_make_install_with_destdir(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    subprocess.run(["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/usr/local"],
                   cwd=REPO, check=True, capture_output=True)
    try:
        helper = dest / "usr/local/libexec/shifter/shifter-helper"
        st = helper.stat()
        assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 0
        setup = (dest / "usr/local/libexec/shifter/shifter-setup").stat()
        assert stat.S_IMODE(setup.st_mode) == 0o700 and setup.st_uid == 0  # root's, not setuid
        for name, flags in (("bin/shifter", "-IS"), ("bin/setupRoot", "-IS"),
                            ("bin/shifterimg", "-I"), ("sbin/shifter-etc-sync", "-IS"),
                            ("libexec/shifter/shifter-spank", "-IS")):
            text = (dest / "usr/local" / name).read_text()
            assert text.startswith(f"#!/usr/bin/python3 {flags}\n"), (name, text)
            assert 'sys.path.insert(0, "/usr/local/lib/shifter/python")' in text
        # Nothing installed names the checkout or the staging directory.
        found = subprocess.run(["grep", "-rlI", "-e", str(REPO), "-e", str(dest), str(dest)],
                               capture_output=True, text=True).stdout
        assert found == ""
        assert (dest / "usr/local/lib/shifter/python/imagegw/munge.py").exists()
        assert (dest / "usr/local/lib/shifter/shifter_slurm.so").exists()
        assert (dest / "opt/shifter/udiImage/sbin/sshd").exists()
        assert (dest / "usr/local/lib/systemd/system/shifter-etc-sync.timer").exists()
        unit = (dest / "usr/local/lib/systemd/system/shifter-etc-sync.service").read_text()
        assert "ExecStart=/usr/local/sbin/shifter-etc-sync" in unit
    finally:
        os.unlink(dest / "usr/local/libexec/shifter/shifter-helper")  # no setuid file left


def test_slurm_prefix_selects_the_headers_and_names_the_version(tmp_path: Path) -> None:
    """A site's own Slurm: the plugin compiles against SLURM_PREFIX's headers, and the
    package is described with that Slurm's version (it loads only there)."""
    plan = subprocess.run(["make", "-n", "-B", "-C", "slurm", "build/shifter_slurm.so",
                           f"SLURM_PREFIX={tmp_path}"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert f"-I{tmp_path}/include " in plan
    (tmp_path / "include/slurm").mkdir(parents=True)
    (tmp_path / "include/slurm/slurm_version.h").write_text(
        "#define SLURM_VERSION_NUMBER 0x170b01\n")
    version = subprocess.run(["sh", "-c", '. packaging/common.sh && slurm_version "$1"', "sh",
                              str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert (version.returncode, version.stdout) == (0, "23.11.1\n"), version.stderr
    missing = subprocess.run(["sh", "-c", '. packaging/common.sh && slurm_version "$1"', "sh",
                              str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 1
    assert "install libslurm-dev or set SLURM_PREFIX" in missing.stderr
