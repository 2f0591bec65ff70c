"""A site for runtime tests: the real setuid helper, a root-owned ``udiRoot.conf``, images.

    site = RuntimeSite.create(base)          # base: a 0755 dir every test user can reach
    site.write_conf(siteFs="/x:/x")          # the file the helper's compiled path names
    image_id = site.add_image(tree)          # mksquashfs + .meta in imagePath
    res = site.shifter("shifter-alice", f"--image=id:{image_id}", "id")

The helper is the ASan/UBSan build (``make -C helpers sanitize``), compiled with
``/etc/shifter-test/udiRoot.conf`` as its one configuration path and installed setuid
root, so the attacks in the tests hit the privilege model a site runs. A setuid sanitizer
build must never be reachable by other users (libasan reads ``ASAN_OPTIONS`` before
``main()``: ``log_path`` through a planted symlink makes root write a file of the user's
choosing), so it lives in ``/usr/local/libexec/shifter-test{SLOT}``, ``root:shifter-testers
0750``, the helper ``4750``; the group's only members are the test users. It is removed
when the session ends (``tests/conftest.py``), at exit, on SIGTERM/SIGHUP, and a stale one
from a killed run at the next session's start. ``shifter`` is the real front end, started
as the installed launcher is (``python3 -I -S``), as the user, through ``subprocess``
with the user's uid, gid and supplementary groups, as ``login`` would set them.
"""

from __future__ import annotations

import atexit
import grp
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from shifter.etc_sync import sync as etc_sync

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "helpers"
# SHIFTER_TEST_SLOT lets two checkouts run the runtime tests at once on one machine
# (each its own compiled config path and helper); unset, the paths are the usual ones.
SLOT = os.environ.get("SHIFTER_TEST_SLOT", "")
TEST_CONF_DIR = Path(f"/etc/shifter-test{SLOT}")
TEST_CONF = TEST_CONF_DIR / "udiRoot.conf"
HELPER_DIR = Path(f"/usr/local/libexec/shifter-test{SLOT}")
HELPER = HELPER_DIR / "shifter-helper"
SETUP = HELPER_DIR / "shifter-setup"  # root-only, never setuid (setupRoot/unsetupRoot)
TESTERS = "shifter-testers"
# The unprivileged users the tests act as; the only members of TESTERS.
TEST_USERS = ("shifter-alice", "shifter-bob")
PYTHON = "/usr/bin/python3"  # Debian's: every user can run it (pyenv's is root-only here)
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "ls", "echo", "id", "env", "true", "false", "touch", "mkdir",
           "grep", "readlink", "stat", "sleep", "pwd", "kill", "test", "wc", "head", "tr")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def ensure_test_users() -> dict[str, tuple[int, int]]:
    """The unprivileged test users (created if missing, kept afterwards): name → (uid, gid)."""
    out = {}
    for name in TEST_USERS:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--user-group", name], check=True)
            pw = pwd.getpwnam(name)
        out[name] = (pw.pw_uid, pw.pw_gid)
    return out


def testers_gid() -> int:
    """The group that may reach the setuid test build; its members are exactly the test
    users (anyone else added by hand is taken out again). Kept afterwards, like the users."""
    ensure_test_users()
    try:
        grp.getgrnam(TESTERS)
    except KeyError:
        # Not --system: a gid above the test users' other groups, appended last to
        # /etc/group, keeps the group list that setup reads from etcPath ascending (the
        # helper's privilege drop compares it, in order, with the kernel's sorted list).
        subprocess.run(["groupadd", TESTERS], check=True)
    group = grp.getgrnam(TESTERS)
    if sorted(group.gr_mem) != sorted(TEST_USERS):
        subprocess.run(["gpasswd", "-M", ",".join(TEST_USERS), TESTERS], check=True,
                       stdout=subprocess.DEVNULL)
    return group.gr_gid


def install_helper() -> Path:
    """Build the sanitized helper and install it setuid root where only the testers group
    can reach it (see the module doc), and beside it the sanitized ``shifter-setup``,
    root's only (0700, never setuid); returns the helper's path. Removed by
    ``remove_helper()``."""
    subprocess.run(["make", "-s", "-C", str(HELPERS), "sanitize",
                    f"TEST_CONF_PATH={TEST_CONF}", f"SLOT={SLOT}"], check=True)
    gid = testers_gid()
    _guard_helper_install()
    HELPER_DIR.parent.mkdir(parents=True, exist_ok=True)
    try:
        HELPER_DIR.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(HELPER_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise RuntimeError(f"{HELPER_DIR} is not a directory of root's: remove it")
    os.chown(HELPER_DIR, 0, gid)
    os.chmod(HELPER_DIR, 0o750)
    tmp = HELPER_DIR / ".shifter-helper.new"
    shutil.copyfile(HELPERS / "build" / f"shifter-helper-san{SLOT}", tmp)
    os.chown(tmp, 0, gid)
    os.chmod(tmp, 0o4750)  # after chown, which clears set-id bits
    os.replace(tmp, HELPER)
    tmp = HELPER_DIR / ".shifter-setup.new"
    shutil.copyfile(HELPERS / "build" / f"shifter-setup-san{SLOT}", tmp)
    os.chown(tmp, 0, 0)
    os.chmod(tmp, 0o700)
    os.replace(tmp, SETUP)
    return HELPER


def remove_helper() -> None:
    """Remove the setuid test build of this slot (idempotent; safe in a signal handler)."""
    shutil.rmtree(HELPER_DIR, ignore_errors=True)


_guarded = False


def _guard_helper_install() -> None:
    """However the process ends, the setuid test build goes: at exit, and on SIGTERM/SIGHUP,
    which become KeyboardInterrupt so that pytest tears down (unmounts, stops daemons) and
    runs the session finalizer; a second signal removes it at once and dies."""
    global _guarded
    if _guarded:
        return
    _guarded = True
    atexit.register(remove_helper)

    signalled = []

    def on_signal(signum: int, frame: object) -> None:
        if signalled:
            remove_helper()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        signalled.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_DFL:  # nohup's SIG_IGN stays
                signal.signal(signum, on_signal)


def strip_setid_bits(top: Path) -> list[Path]:
    """Clear the set-uid/set-gid bits of every non-directory under ``top`` (not crossing
    mount points, not following links): image trees that tests build must not leave
    set-id files on the machine. Returns the paths changed."""
    changed = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
                    changed.append(Path(path))
            except OSError:
                continue  # gone meanwhile, or on a read-only mount
    return changed


def busybox_tree(root: Path, files: dict[str, bytes | str] | None = None) -> Path:
    """A small image tree: static busybox with applet links, /etc basics, ``files``."""
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    for name in APPLETS:
        link = root / "bin" / name
        if not link.is_symlink():
            link.symlink_to("busybox")
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    base = {
        "etc/os-release": 'PRETTY_NAME="Shifter test image"\nID=shifter-test\n',
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nimageuser:x:4242:4242::/:/bin/sh\n",
        "etc/group": "root:x:0:\n",
        "etc/image-only.conf": "from the image\n",
    }
    for rel, data in {**base, **(files or {})}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    for d in ("usr/bin", "var/lib/app", "opt/app", "tmp", "home"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def mksquashfs(tree: Path, out: Path, *, keep_xattrs: bool = False) -> Path:
    argv = ["mksquashfs", str(tree), str(out), "-all-root", "-noappend", "-quiet"]
    argv += ["-xattrs"] if keep_xattrs else ["-no-xattrs"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return out


def file_id(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class RuntimeSite:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.image_dir = base / "images"
        self.etc_dir = TEST_CONF_DIR / "etc"
        self.udi_mount = base / "udiMount"
        self.loop_mount = base / "loopMount"
        self.cache_dir = base / "pernodecache"
        self.launcher = base / "shifter"
        self.conf: dict[str, str] = {}

    @classmethod
    def create(cls, base: Path) -> RuntimeSite:
        site = cls(base)
        for d in (base, site.image_dir, site.udi_mount, site.loop_mount, site.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        os.chmod(site.cache_dir, 0o700)
        install_helper()
        TEST_CONF_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(TEST_CONF_DIR, 0o755)
        site.etc_dir.mkdir(exist_ok=True)
        etc_sync(site.etc_dir)  # passwd and group from getent, as a site's timer writes them
        (site.etc_dir / "site-only.conf").write_text("from the site\n")
        for path in site.etc_dir.iterdir():
            os.chmod(path, 0o644)
        site.launcher.write_text(
            f"#!{PYTHON} -IS\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from shifter.launch import main\nsys.exit(main())\n"
        )
        os.chmod(site.launcher, 0o755)
        site.write_conf()
        return site

    # -- configuration ---------------------------------------------------------------

    def defaults(self) -> dict[str, str]:
        return {
            "udiMount": str(self.udi_mount),
            "loopMount": str(self.loop_mount),
            "imagePath": str(self.image_dir),
            "udiRootPath": str(REPO),
            "etcPath": str(self.etc_dir),
            "rootfsType": "tmpfs",
            "modprobePath": "/sbin/modprobe",
            "insmodPath": "/sbin/insmod",
            "cpPath": "/bin/cp",
            "mvPath": "/bin/mv",
            "chmodPath": "/bin/chmod",
            "ddPath": "/bin/dd",
            "mkfsXfsPath": "/sbin/mkfs.xfs",
            "perNodeCachePath": str(self.cache_dir),
            "perNodeCacheSizeLimit": "2G",
            "perNodeCacheAllowedFsType": "xfs",
            "allowLocalChroot": "0",
            "mountUdiRootWritable": "0",
            "maxGroupCount": "31",
            "mountPropagationStyle": "slave",
            "system": "testsys",
            "defaultImageType": "docker",
        }

    def write_conf(self, text: str | None = None, **overrides: str | None) -> Path:
        """Write the trusted config (root:root 0644); a value of None drops the key."""
        if text is None:
            conf = {**self.defaults(), **overrides}
            self.conf = {k: v for k, v in conf.items() if v is not None}
            text = "".join(f"{k}={v}\n" for k, v in self.conf.items())
        tmp = TEST_CONF.with_suffix(".new")
        tmp.write_text(text)
        os.chown(tmp, 0, 0)
        os.chmod(tmp, 0o644)
        os.replace(tmp, TEST_CONF)
        return TEST_CONF

    # -- images ----------------------------------------------------------------------

    def add_image(self, squashfs: Path, meta: str = "") -> str:
        """Place a squashfs under its sha256 with a ``.meta``; returns the id."""
        image_id = file_id(squashfs)
        shutil.copyfile(squashfs, self.image_dir / f"{image_id}.squashfs")
        (self.image_dir / f"{image_id}.meta").write_text("FORMAT: squashfs\n" + meta)
        for suffix in ("squashfs", "meta"):
            os.chmod(self.image_dir / f"{image_id}.{suffix}", 0o644)
        return image_id

    def tag(self, tag: str, image_id: str, itype: str = "docker") -> None:
        """What the gateway's tag index holds for ``tag``."""
        from urllib.parse import quote

        index = self.image_dir / "tags" / itype
        index.mkdir(parents=True, exist_ok=True)
        (index / quote(tag, safe="")).write_text(image_id + "\n")

    # -- running ---------------------------------------------------------------------

    def user_env(self, user: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        pw = pwd.getpwnam(user)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": pw.pw_dir,
            "USER": user,
            "LANG": "C.UTF-8",
            "SHIFTER_HELPER": str(HELPER),
            "SHIFTER_UDIROOT_CONF": str(TEST_CONF),
            # The sanitizers of the test build: a finding must fail the test.
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",
            "UBSAN_OPTIONS": "halt_on_error=1:exitcode=87:print_stacktrace=1",
        }
        env.update(extra or {})
        return env

    def spawn_kwargs(self, user: str) -> dict:
        if user == "root":
            return {}
        pw = pwd.getpwnam(user)
        return {"user": pw.pw_uid, "group": pw.pw_gid,
                "extra_groups": os.getgrouplist(user, pw.pw_gid)}

    def shifter(self, user: str, *args: str, env: dict[str, str] | None = None,
                cwd: str | Path | None = None, input: str | None = None,
                timeout: float = 60) -> Result:
        """``shifter ARGS`` as ``user``; stdout and stderr captured."""
        return self.run(user, [str(self.launcher), *args], env=env, cwd=cwd, input=input,
                        timeout=timeout)

    def run(self, user: str, argv: list[str], *, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, input: str | None = None,
            timeout: float = 60) -> Result:
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout,
            env=self.user_env(user, env), cwd=str(cwd or self.base),
            stdin=None if input is not None else subprocess.DEVNULL,
            **self.spawn_kwargs(user),
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def root_tool(self, name: str, *args: str, timeout: float = 60,
                  env: dict[str, str] | None = None) -> Result:
        """``setupRoot``/``unsetupRoot`` as root (as the batch system's prolog runs them),
        ``env`` added to the fixed environment."""
        module = "shifter.setuproot"
        fn = "main" if name == "setupRoot" else "main_unsetup"
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                f"from {module} import {fn}; sys.argv[0] = {name!r}; sys.exit({fn}())")
        proc = subprocess.run([PYTHON, "-I", "-S", "-c", code, *args], capture_output=True,
                              text=True, timeout=timeout, env=self.user_env("root", env),
                              stdin=subprocess.DEVNULL)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    # -- what is left behind -----------------------------------------------------------

    def our_mounts(self) -> list[str]:
        """Mount points of the root namespace under this site's mount dirs."""
        roots = (str(self.udi_mount), str(self.loop_mount))
        out = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = _unescape(line.split()[4])
                if any(point == r or point.startswith(r + "/") for r in roots):
                    out.append(point)
        return out

    def assert_nothing_left(self) -> None:
        """What every runtime test ends with: no mount and no loop device of ours. The
        kernel may free an autoclear device a few ms after its last user is gone (seen
        here under load, when the last mount goes from another process's context), so
        a device gets up to 5 s to go; one that is leaked stays."""
        assert self.our_mounts() == [], "a mount of ours is left in the root namespace"
        deadline = time.monotonic() + 5
        while self.our_loops() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.our_loops() == [], "a loop device of ours is left"

    def our_loops(self) -> list[str]:
        """Loop devices backed by this site's images or cache files."""
        text = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        return [line for line in text.splitlines() if str(self.base) in line]


def reachable_temp_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A fresh pytest temp dir that the test users can reach: it, pytest's basetemp and
    (only when it is pytest's own ``pytest-of-<user>``) the basetemp's parent become 0755.
    Never anything above: with ``--basetemp=/tmp/x`` that would be /tmp itself."""
    base = Path(tmp_path_factory.mktemp(name, numbered=True))
    root = tmp_path_factory.getbasetemp().resolve()
    dirs = [base, *[p for p in base.parents if p == root or root in p.parents]]
    if root.parent.name.startswith("pytest-of-"):
        dirs.append(root.parent)
    for d in dirs:
        os.chmod(d, 0o755)
    return base


@contextmanager
def module_site(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[RuntimeSite]:
    """A site for one test module, in a fresh pytest temp dir every user can reach;
    afterwards nothing of ours may be mounted (a module-scoped fixture's body)."""
    base = reachable_temp_dir(tmp_path_factory, name)
    site = RuntimeSite.create(base / "site")
    yield site
    site.assert_nothing_left()


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def compile_static(source: str, out: Path) -> Path:
    """A static test program (it runs inside images that have no libc)."""
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(out), str(src)], check=True)
    return out



def add_dynamic_program(root: Path, program: Path, dest: str,
                        lib_path: str | None = None) -> list[str]:
    """Copy a dynamically linked ``program`` into the image tree at ``dest`` with every
    shared library it loads (its ``ldd`` closure, glibc and ld-linux included, found with
    ``LD_LIBRARY_PATH=lib_path``), laid out as Debian's merged /usr has them: real files in
    ``/usr/lib/x86_64-linux-gnu`` (``/usr/lib64`` for ld-linux) under their own names plus
    a link by the name the program asks for; ``/lib`` and ``/lib64`` link to ``usr/``.
    The image's ld.so finds them on its built-in search path (there is no ld.so.cache).
    Returns the image paths of the libraries."""
    env = {"PATH": "/usr/bin:/bin"}
    if lib_path:
        env["LD_LIBRARY_PATH"] = lib_path
    out = subprocess.run(["ldd", str(program)], capture_output=True, text=True, env=env,
                         check=True).stdout
    libdir = root / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True, exist_ok=True)
    (root / "usr/lib64").mkdir(parents=True, exist_ok=True)
    for top in ("lib", "lib64"):
        if not (root / top).exists() and not (root / top).is_symlink():
            (root / top).symlink_to(f"usr/{top}")
    placed = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            name, path = parts[0], parts[parts.index("=>") + 1]
        elif parts and parts[0].startswith("/"):
            name, path = os.path.basename(parts[0]), parts[0]  # the ELF interpreter
        else:
            continue  # linux-vdso
        if path == "not":
            raise RuntimeError(f"ldd {program}: {name} not found")
        where = root / "usr/lib64" if name.startswith("ld-linux") else libdir
        real = Path(os.path.realpath(path))
        if not (where / real.name).exists():
            shutil.copyfile(real, where / real.name)
            os.chmod(where / real.name, 0o755)
        if name != real.name and not (where / name).is_symlink():
            (where / name).symlink_to(real.name)
        placed.append("/" + str((where / name).relative_to(root)))
    target = root / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(program, target)
    os.chmod(target, 0o755)
    return placed


# Reports its ids, then tries to become root: a setuid-root copy of this in an image (or
# one made set-id through a writable layer) must come up with the user's ids and fail.
ESCALATE_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <unistd.h>
int main(void) {
    uid_t r, e, s;
    getresuid(&r, &e, &s);
    printf("ids %u %u %u\n", r, e, s);
    if (setuid(0) == 0 && geteuid() == 0) { printf("ESCALATED\n"); return 0; }
    printf("denied\n");
    return 0;
}
"""
