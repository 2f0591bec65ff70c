"""The setuid test build of the helper (ASan + UBSan) is reachable only by the test users.

libasan reads ``ASAN_OPTIONS`` before ``main()``: a setuid-root sanitizer build that any
user may execute lets that user make root create or truncate a file of their choosing
(``log_path`` through a planted symlink). So the test build lives in a directory only the
members of the testers group (the test users) can enter, and it is gone when the session
ends, however it ends.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_USERS
from world.runtime import HELPER, HELPER_DIR, REPO, SLOT, TESTERS, RuntimeSite, module_site

ALICE = "shifter-alice"
OUTSIDER = "nobody"


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    with module_site(tmp_path_factory, "test-helper") as site:
        yield site


def _as_outsider_in_pid_ns(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``argv`` as ``nobody`` (no supplementary groups) as pid 1 of a fresh pid namespace,
    so the pid that libasan appends to ``log_path`` is known in advance (1)."""
    pw = pwd.getpwnam(OUTSIDER)
    cmd = ["unshare", "--pid", "--fork", "setpriv", f"--reuid={pw.pw_uid}",
           f"--regid={pw.pw_gid}", "--clear-groups", "env", "-i",
           *[f"{k}={v}" for k, v in env.items()], *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_outsider_cannot_make_root_write_through_asan_log_path(site: RuntimeSite) -> None:
    # The victim: a root-owned file the outsider may not write.
    victim = site.base / "victim"
    victim.write_text("precious\n")
    os.chown(victim, 0, 0)
    os.chmod(victim, 0o644)
    # The outsider's own directory with the planted symlink: libasan would open
    # <log_path>.<pid> as root, following the link.
    trap = site.base / "outsider-trap"
    trap.mkdir()
    nobody = pwd.getpwnam(OUTSIDER)
    os.chown(trap, nobody.pw_uid, nobody.pw_gid)
    os.chmod(trap, 0o755)
    (trap / "asan.1").symlink_to(victim)
    os.lchown(trap / "asan.1", nobody.pw_uid, nobody.pw_gid)

    res = _as_outsider_in_pid_ns(
        [str(HELPER)], {"PATH": "/usr/bin:/bin",
                        "ASAN_OPTIONS": f"log_path={trap}/asan:verbosity=1"})

    assert victim.read_text() == "precious\n", "root wrote through the outsider's symlink"
    assert victim.stat().st_uid == 0
    # Not only harmless: the outsider cannot execute the test build at all.
    assert res.returncode == 126 and "Permission denied" in res.stderr, (res.returncode,
                                                                       res.stderr)


def test_outsider_cannot_see_into_the_test_helper_dir(site: RuntimeSite) -> None:
    res = _as_outsider_in_pid_ns(["ls", str(HELPER_DIR)], {"PATH": "/usr/bin:/bin"})
    assert res.returncode != 0 and "Permission denied" in res.stderr


def test_test_user_still_runs_the_test_helper(site: RuntimeSite) -> None:
    # A member of the testers group reaches it: the helper itself answers (usage).
    res = site.run(ALICE, [str(HELPER)])
    assert res.returncode == 1, res.stderr
    assert "usage: shifter-helper" in res.stderr


def test_test_helper_install_is_group_restricted(site: RuntimeSite) -> None:
    group = grp.getgrnam(TESTERS)
    # Only the test users are in the group: not the demo user, not anyone else, and
    # nobody has it as primary group.
    assert sorted(group.gr_mem) == sorted(TEST_USERS)
    assert [p.pw_name for p in pwd.getpwall() if p.pw_gid == group.gr_gid] == []
    d = os.stat(HELPER_DIR)
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (0, group.gr_gid, 0o750)
    h = os.stat(HELPER)
    assert (h.st_uid, h.st_gid, stat.S_IMODE(h.st_mode)) == (0, group.gr_gid, 0o4750)
    # The directory's parents are root's and not writable by others (no swap of the dir).
    for parent in HELPER_DIR.parents:
        st = os.stat(parent)
        assert st.st_uid == 0 and not st.st_mode & 0o022, parent


# -- removal at the end of a session, however it ends ---------------------------------

INNER_TEST = """
import time
from world.runtime import HELPER, install_helper

def test_install_then_{how}():
    install_helper()
    assert HELPER.exists()
    print("INSTALLED", flush=True)
    {end}
"""

ENDINGS = {
    "fail": "assert False, 'a failing test'",
    "sigterm": "time.sleep(120)",
    "sigint": "time.sleep(120)",
}


@pytest.mark.parametrize("how", sorted(ENDINGS))
def test_test_helper_removed_when_session_ends(how: str, tmp_path: Path) -> None:
    """A whole pytest session (its own slot) installs the test helper and then fails, is
    interrupted (Ctrl-C) or terminated (SIGTERM): the directory is gone afterwards."""
    slot = f"{SLOT}-end"
    inner_dir = Path(f"/usr/local/libexec/shifter-test{slot}")
    tests = tmp_path / "inner"
    tests.mkdir()
    # The project's conftest (fixtures, the session's setuid hygiene), under another name.
    (tests / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('shifter_conftest', "
        f"{str(REPO / 'tests' / 'conftest.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
        "globals().update({k: v for k, v in vars(mod).items() if not k.startswith('__')})\n")
    (tests / f"test_{how}.py").write_text(INNER_TEST.format(how=how, end=ENDINGS[how]))
    env = {**os.environ, "SHIFTER_TEST_SLOT": slot}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         f"--rootdir={tests}", f"--basetemp={tmp_path / 'bt'}", str(tests)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tests)
    try:
        assert proc.stdout is not None
        if how in ("sigterm", "sigint"):
            deadline = time.monotonic() + 300
            for line in proc.stdout:
                if "INSTALLED" in line:
                    break
                assert time.monotonic() < deadline
            assert os.stat(inner_dir / "shifter-helper").st_mode & stat.S_ISUID
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    assert not inner_dir.exists(), f"{inner_dir} left after a session that ended by {how}"


# -- the audit make test ends with ------------------------------------------------------

def test_setuid_audit_lists_a_stray_setuid_file(tmp_path: Path) -> None:
    stray = tmp_path / "stray-suid"
    stray.write_bytes(b"x")
    os.chmod(stray, 0o4755)
    try:
        res = subprocess.run([sys.executable, str(REPO / "tests" / "setuid_audit.py")],
                             capture_output=True, text=True, timeout=600)
    finally:
        os.chmod(stray, 0o755)
    assert res.returncode == 1
    listed = [line.strip() for line in res.stderr.splitlines()[1:]]
    assert str(stray) in listed
    # What Debian installs set-id (merged /usr: dpkg knows /bin/su) is not ours.
    assert "/usr/bin/su" not in listed and "/usr/bin/passwd" not in listed
