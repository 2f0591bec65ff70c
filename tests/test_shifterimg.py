"""``shifterimg`` as people use it (docs/behaviour.md, 'shifterimg', with 'Gateway: authentication'
and 'Gateway: read ACL').

The real client runs as a subprocess, mostly as the unprivileged test users, against a real
gunicorn gateway with real munge credentials and real registries (an open one and one with
bearer-token auth). Nothing is mocked: the uid in each credential is the process's own,
exactly as on a login node, so ACLs, admin checks and ImportUsers are what they would be.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import pwd
import re
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from world import catalog
from world.gateway import Gateway
from world.imagebuild import File, build_layer, push_image
from world.ports import free_port
from world.reftree import mksquashfs
from world.registry import make_tls_files
from world.tlsproxy import TlsProxy

from imagegw.fasthash import fasthash
from shifter import shifterimg

SYS = "testsys"
ALICE, BOB = "shifter-alice", "shifter-bob"
REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"
SIZE = r"[\d.]+ (?:B|KiB|MiB|GiB)"
NOT_CONTACTED = "ERROR: failed to contact the image gateway."


def shifterimg_argv() -> list[str]:
    script = VENV_BIN / "shifterimg"
    if script.exists():
        return [str(script)]
    # A venv installed before the console script was declared has the same code importable
    # (editable install): run it as a module rather than skip the whole file.
    return [str(VENV_BIN / "python"), "-m", "shifter.shifterimg"]


def pull_line(tag: str, itype: str = "docker") -> re.Pattern[str]:
    """One status line of a pull, as docs/behaviour.md, 'shifterimg' spells it (progress suffix only
    on a terminal)."""
    return re.compile(
        rf"^({STAMP}) Pulling Image: {itype}:{re.escape(tag)}, status: ([A-Z]+)"
        rf"(?: \((\d+) layers, ({SIZE}) of ({SIZE})\))?$"
    )


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_udiroot_conf(
    path: Path, gateways: Sequence[str], timeout: int = 5, extra: str = ""
) -> Path:
    # The runtime keys are required by the parser but unused by shifterimg: dummy paths.
    path.write_text(
        "udiMount=/var/udiMount\nloopMount=/var/udiLoop\nimagePath=/images\n"
        "udiRootPath=/etc/shifter\netcPath=/etc/shifter/etc\nrootfsType=tmpfs\n"
        f"imageGateway={' '.join(gateways)}\nsystem={SYS}\ngatewayTimeout={timeout}\n"
        + extra
    )
    os.chmod(path, 0o644)  # the test users read it (shifterimg loads it untrusted)
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str = ""
    elapsed: float = 0.0


@dataclass
class World:
    base: Path  # world-traversable: the test users need their homes and conf files
    gw: Gateway
    munge_socket: str
    conf: Path  # udiRoot.conf naming the live gateway only
    homes: dict[str, Path] = field(default_factory=dict)

    def fresh_home(self, user: str) -> Path:
        """A new empty home for ``user`` (no stored logins), used by later runs as them."""
        pw = pwd.getpwnam(user) if user != "root" else pwd.getpwuid(0)
        home = Path(tempfile.mkdtemp(prefix=f"home-{user}-", dir=self.base))
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o700)
        self.homes[user] = home
        return home

    def home(self, user: str) -> Path:
        return self.homes.get(user) or self.fresh_home(user)

    def _spawn_kwargs(self, user: str, conf: Path | None) -> dict:
        # A clean environment: only what a user's shell would pass that shifterimg reads.
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home(user)),
            "LANG": "C.UTF-8",
            "SHIFTER_UDIROOT_CONF": str(conf or self.conf),
            "MUNGE_SOCKET": self.munge_socket,
        }
        kwargs: dict = {"env": env, "cwd": str(self.base)}
        if user != "root":
            pw = pwd.getpwnam(user)
            # What runuser/login would do: the user's uid, primary gid and all their groups.
            kwargs |= {
                "user": pw.pw_uid,
                "group": pw.pw_gid,
                "extra_groups": os.getgrouplist(user, pw.pw_gid),
            }
        return kwargs

    def run(self, user: str, *args: str, conf: Path | None = None, timeout: float = 90) -> Result:
        """shifterimg without a terminal (stdout and stderr are pipes), as ``user``."""
        start = time.monotonic()
        proc = subprocess.run(
            [*shifterimg_argv(), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            # A new session has no controlling terminal: /dev/tty cannot be opened, as in
            # a batch job, whatever terminal pytest itself runs under.
            start_new_session=True,
            **self._spawn_kwargs(user, conf),
        )
        return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)

    def run_tty(
        self,
        user: str,
        *args: str,
        answers: Sequence[tuple[bytes, bytes]] = (),
        conf: Path | None = None,
        timeout: float = 90,
    ) -> Result:
        """shifterimg on a pseudo-terminal that is its controlling terminal (so /dev/tty
        and getpass work); each (prompt, reply) is typed once the prompt has appeared."""
        master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        # No "\n" -> "\r\n" translation: a bare "\r" in the output then means the client
        # rewrote its line in place, which is what the progress test checks.
        attrs[1] &= ~termios.ONLCR
        termios.tcsetattr(slave, termios.TCSANOW, attrs)

        def take_terminal() -> None:  # runs in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        start = time.monotonic()
        proc = subprocess.Popen(
            [*shifterimg_argv(), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=take_terminal,  # no Popen option makes the pty the controlling tty
            **self._spawn_kwargs(user, conf),
        )
        os.close(slave)
        out = b""
        seen = 0  # output before this offset already answered a prompt
        pending = list(answers)
        try:
            while True:
                if time.monotonic() - start > timeout:
                    proc.kill()
                    raise AssertionError(f"shifterimg {args} hung; output so far: {out!r}")
                ready, _, _ = select.select([master], [], [], 0.2)
                if not ready:
                    continue
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every holder of the terminal's slave side is gone
                    chunk = b""
                if not chunk:
                    break
                out += chunk
                if pending and pending[0][0] in out[seen:]:
                    prompt, reply = pending.pop(0)
                    seen = out.index(prompt, seen) + len(prompt)
                    # Typed only after the prompt: getpass flushes input typed earlier.
                    os.write(master, reply)
        finally:
            os.close(master)
        proc.wait(timeout=10)
        assert not pending, f"prompts never shown: {pending}; output {out!r}"
        return Result(
            proc.returncode, out.decode(errors="replace"), elapsed=time.monotonic() - start
        )


@pytest.fixture(scope="module")
def world(munged, registry, token_registry, test_users) -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="shifterimg-test-"))
    os.chmod(base, 0o755)
    locations = {
        reg.host: {"remotetype": "dockerv2", "url": reg.url} for reg in (registry, token_registry)
    }
    gw = Gateway(
        base / "gw",
        munge_socket=munged.socket,
        registry=registry,
        extra={"ImportUsers": ALICE, "Locations": locations},
    )
    try:
        with gw:
            conf = write_udiroot_conf(base / "udiRoot.conf", [gw.url])
            yield World(base=base, gw=gw, munge_socket=munged.socket, conf=conf)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def basic(registry, tmp_path_factory):
    return catalog.basic(registry, tmp_path_factory.mktemp("basic"), repo="shifterimg/basic")


def _push(reg, tmp_path: Path, repo: str):
    """``repo:v1``, one layer of unique content (so no earlier run's image is reused)."""
    layer = build_layer([File("hello", os.urandom(16).hex())], "gzip", tmp_path)
    return push_image(reg, repo, "v1", [layer], {"Cmd": ["/hello"]})


def _record(world: World, tag: str, user: str = ALICE, itype: str = "docker") -> dict:
    resp = world.gw.request("GET", f"/api/lookup/{SYS}/{itype}/{tag}/", user=user)
    assert resp.status_code == 200, resp.text
    return resp.json()


# -- pull ---------------------------------------------------------------------------------


def test_pull_without_terminal_prints_a_line_per_status_change(world, basic):
    tag = basic.ref()
    res = world.run(ALICE, "pull", f"docker:{tag}")
    assert res.returncode == 0, res
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    matches = [pull_line(tag).match(line) for line in lines]
    assert all(matches), lines
    statuses = [m.group(2) for m in matches]
    assert statuses[-1] == "READY"
    # One line per change: no status repeats on consecutive lines, no progress suffix.
    assert all(a != b for a, b in zip(statuses, statuses[1:], strict=False)), statuses
    assert all(m.group(3) is None for m in matches)
    first = time.mktime(time.strptime(matches[0].group(1), "%Y-%m-%dT%H:%M:%S"))
    assert abs(first - time.time()) < 120  # local time, as the user reads it


def test_pull_of_a_missing_tag_fails_and_says_why(world, registry):
    tag = f"{registry.host}/shifterimg/does-not-exist:v1"
    res = world.run(ALICE, "pull", tag)  # no type: docker is the default
    assert res.returncode != 0
    lines = res.stdout.splitlines()
    assert lines and all(pull_line(tag).match(line) for line in lines), lines
    assert lines[-1].endswith("status: FAILURE")
    assert res.stderr.startswith(f"shifterimg: error: pull of docker:{tag} failed:")
    assert "not found" in res.stderr and res.stderr.count("\n") == 1


def test_pull_on_a_terminal_rewrites_one_line_with_progress(world, registry, fault_proxy, tmp_path):
    small = build_layer([File("small", os.urandom(64).hex())], "gzip", tmp_path / "a")
    big = build_layer([File("big", os.urandom(300_000))], "none", tmp_path / "b")
    push_image(registry, "shifterimg/progress", "v1", [small, big], {"Cmd": ["/small"]})
    proxy = fault_proxy(registry)
    # The small layer arrives at once, the big one late: PULLING lasts, with one layer done.
    proxy.delay(re.escape(big.digest), 3.0)
    tag = f"{proxy.host}/shifterimg/progress:v1"
    res = world.run_tty(ALICE, "pull", f"docker:{tag}")
    assert res.returncode == 0, res.stdout
    out = res.stdout
    # Rewritten in place: frames separated by "\r", a single newline once it is over.
    assert out.count("\n") == 1 and out.endswith("\n"), repr(out)
    frames = [f for f in out[:-1].split("\r") if f]
    assert len(frames) >= 3, frames
    parsed = [pull_line(tag).match(f.rstrip()) for f in frames]
    assert all(parsed), frames
    assert parsed[-1].group(2) == "READY"
    # Each frame is padded to the previous one's length, so no stale tail stays visible.
    for prev, cur in zip(frames, frames[1:], strict=False):
        assert len(cur) >= len(prev.rstrip()), (prev, cur)
    progress = [m for m in parsed if m.group(2) == "PULLING" and m.group(3) is not None]
    assert progress, frames
    assert any(int(m.group(3)) >= 1 for m in progress), frames


# -- lookup, images ---------------------------------------------------------------------


def test_lookup_prints_the_id_or_says_how_to_pull(world, basic):
    world.gw.wait_status(basic.ref())
    image_id = basic.config_digest.split(":")[1]
    for descriptor in (f"docker:{basic.ref()}", basic.ref()):
        res = world.run(BOB, "lookup", descriptor)
        assert (res.returncode, res.stdout, res.stderr) == (0, image_id + "\n", ""), res
    never = f"{basic.host}/shifterimg/never-pulled:v1"
    missing = world.run(BOB, "lookup", never)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == (f"shifterimg: error: image docker:{never} is not available on "
                              f"{SYS}; pull it with: shifterimg pull docker:{never}\n")


def test_lookup_and_images_as_json(world, basic):
    world.gw.wait_status(basic.ref())
    image_id = basic.config_digest.split(":")[1]
    res = world.run(BOB, "--json", "lookup", basic.ref())
    assert (res.returncode, res.stderr) == (0, ""), res
    rec = json.loads(res.stdout)
    assert (rec["id"], rec["status"], rec["itype"], rec["system"]) == (
        image_id, "READY", "docker", SYS)
    res = world.run(BOB, "--json", "images")
    assert (res.returncode, res.stderr) == (0, ""), res
    rows = json.loads(res.stdout)
    tags = [row["tag"] for row in rows]
    assert tags == sorted(tags) and all(isinstance(t, str) for t in tags)
    assert {"id": image_id, "status": "READY"}.items() <= next(
        row for row in rows if row["tag"] == basic.ref()).items()
    missing = world.run(BOB, "--json", "lookup", f"{basic.host}/shifterimg/never-pulled:v1")
    assert (missing.returncode, missing.stdout) == (1, "") and "pull it with" in missing.stderr


def test_pullnb_asks_once_and_returns(world, registry, tmp_path):
    """Shifter's ``pullnb``: one request, one status line, no waiting; the pull goes on
    at the gateway and a later ``pull`` finds it done."""
    _push(registry, tmp_path, "shifterimg/pullnb")
    tag = f"{registry.host}/shifterimg/pullnb:v1"
    res = world.run(ALICE, "pullnb", f"docker:{tag}")
    assert (res.returncode, res.stderr) == (0, ""), res
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and pull_line(tag).match(lines[0]), lines
    assert world.gw.wait_status(tag, user=ALICE)["status"] == "READY"
    again = world.run(ALICE, "pullnb", tag)
    assert again.returncode == 0 and again.stdout.rstrip().endswith("status: READY"), again


def test_usage_errors_exit_2_and_version(world):
    for args, words in (
        ((), "the following arguments are required: mode"),
        (("fetch", "x"), "argument mode: invalid choice: 'fetch'"),
        (("pull",), "pull needs one image, e.g. pull docker:ubuntu:22.04"),
        (("lookup", "a", "b"), "lookup needs one image"),
        (("images", "extra"), "images takes no arguments"),
        (("--json", "pull", "x"), "--json goes with lookup and images"),
        (("import", "f"), "import needs FILE [TYPE:]TAG"),
        (("lookup", "docker:"), "no image tag in 'docker:'"),
    ):
        res = world.run(ALICE, *args)
        assert (res.returncode, res.stdout) == (2, ""), (args, res)
        assert res.stderr.startswith("usage: shifterimg "), res.stderr
        assert f"shifterimg: error: {words}" in res.stderr, (args, res.stderr)
    from shifter import __version__

    res = world.run(ALICE, "--version")
    assert (res.returncode, res.stdout) == (0, f"shifterimg {__version__}\n")


def test_images_lists_one_row_per_tag_sorted_by_tag(world, registry, tmp_path):
    one = build_layer([File("id", os.urandom(8).hex())], "gzip", tmp_path / "one")
    two = build_layer([File("id", os.urandom(8).hex())], "gzip", tmp_path / "two")
    # zeta and mid hold the same image: the gateway keeps one record with both tags,
    # and `images` still prints a row per tag.
    layers = {"list-zeta": one, "list-alpha": two, "list-mid": one}
    tags = {}
    for repo, layer in layers.items():
        pushed = push_image(registry, f"shifterimg/{repo}", "v1", [layer], {"Cmd": ["/id"]})
        tags[f"{registry.host}/shifterimg/{repo}:v1"] = pushed.config_digest.split(":")[1]
    for tag in tags:
        assert world.gw.wait_status(tag, user=ALICE)["status"] == "READY"
    res = world.run(ALICE, "images")
    assert res.returncode == 0 and res.stderr == "", res
    lines = res.stdout.splitlines()
    listed = [line.split()[5] for line in lines]
    assert listed == sorted(listed), listed
    ours = {line.split()[5]: line for line in lines if line.split()[5] in tags}
    assert set(ours) == set(tags)
    for tag, image_id in tags.items():
        rec = _record(world, tag)
        assert rec["id"] == image_id
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(rec["last_pull"]))
        # Shifter's exact layout, trailing padding included.
        row = (SYS, "docker", "READY", image_id, stamp, tag)
        assert ours[tag] == "%-10s %-10s %-8s %-.10s   %s %-30s" % row  # noqa: UP031


# -- private images (-u/-g) ---------------------------------------------------------------


def test_private_pull_with_user_and_group_names_and_ids(world, registry, tmp_path, test_users):
    _push(registry, tmp_path, "shifterimg/private")
    tag = f"{registry.host}/shifterimg/private:v1"
    alice_uid, alice_gid = test_users[ALICE]
    # A name and a bare id in -u, a name in -g: the client sends ids only.
    res = world.run(ALICE, "-u", f"{ALICE},4242", "-g", ALICE, "pull", f"docker:{tag}")
    assert res.returncode == 0, res
    assert res.stdout.splitlines()[-1].endswith("status: READY")
    rec = _record(world, tag, user=ALICE)
    assert sorted(rec["userACL"]) == sorted({alice_uid, 4242})
    assert rec["groupACL"] == [alice_gid]
    denied = world.run(BOB, "lookup", tag)
    assert (denied.returncode, denied.stdout) == (1, "")
    assert tag not in world.run(BOB, "images").stdout
    mine = world.run(ALICE, "lookup", tag)
    assert (mine.returncode, mine.stdout) == (0, rec["id"] + "\n")
    assert tag in world.run(ALICE, "images").stdout


def test_unknown_user_or_group_name_is_refused_before_asking_the_gateway(world):
    for opt, kind in (("-u", "user"), ("-g", "group")):
        res = world.run(ALICE, opt, "no-such-name-here", "pull", "docker:whatever:v1")
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.strip() == f"shifterimg: error: unknown {kind} 'no-such-name-here'"


# -- login ----------------------------------------------------------------------------------


def _login(world: World, user: str, location: str | None, name: str, password: str) -> Result:
    shown = location or "index.docker.io"
    return world.run_tty(
        user,
        "login",
        *([location] if location else []),
        answers=[
            (f"{shown} username: ".encode(), f"{name}\n".encode()),
            (f"{shown} password: ".encode(), f"{password}\n".encode()),
        ],
    )


def test_login_prompts_on_the_terminal_and_stores_one_line_per_location(world, test_users):
    home = world.fresh_home(ALICE)
    cred = home / ".udiRoot" / ".cred"
    res = _login(world, ALICE, "reg.example.org:5000", "alice1", "s3cret-one")
    assert res.returncode == 0, res.stdout
    assert "alice1" in res.stdout  # the username is echoed ...
    assert "s3cret-one" not in res.stdout  # ... the password is not
    uid, _ = test_users[ALICE]
    for path, mode in ((cred.parent, 0o700), (cred, 0o600)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, uid), path
    line1 = f"{SYS}:reg.example.org:5000={b64('alice1:s3cret-one')}"
    assert cred.read_text() == line1 + "\n"
    # A second login for the same location replaces its line.
    assert _login(world, ALICE, "reg.example.org:5000", "alice2", "s3cret-two").returncode == 0
    line2 = f"{SYS}:reg.example.org:5000={b64('alice2:s3cret-two')}"
    assert cred.read_text() == line2 + "\n"
    # Without a location: the default one, on a line of its own.
    assert _login(world, ALICE, None, "hubuser", "hubpass").returncode == 0
    assert cred.read_text().splitlines() == [
        line2,
        f"{SYS}:index.docker.io={b64('hubuser:hubpass')}",
    ]
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600  # rewritten, still private


def test_login_without_a_terminal_is_refused(world):
    home = world.fresh_home(BOB)
    res = world.run(BOB, "login", "reg.example.org")
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "shifterimg: error: login needs a terminal to ask for the username"
    )
    assert not (home / ".udiRoot" / ".cred").exists()


def test_private_pull_from_a_token_registry_with_the_stored_login(
    world, token_registry, tmp_path, test_users
):
    """The issue's scenario: log in once, pull a private image for yourself only."""
    layer = build_layer([File("secret", os.urandom(16).hex())], "gzip", tmp_path)
    pushed = push_image(token_registry, "shifterimg/secret", "v1", [layer], {"Cmd": ["/x"]})
    push_image(token_registry, "shifterimg/secret", "nologin", [layer], {"Cmd": ["/x"]})
    host = token_registry.host
    world.fresh_home(ALICE)
    # Without a stored login the registry refuses the gateway, and the user is told so.
    # (Another tag: a FAILURE record is shown as is for a few seconds to pollers.)
    anon = world.run(ALICE, "-u", ALICE, "pull", f"docker:{host}/shifterimg/secret:nologin")
    assert anon.returncode != 0
    assert anon.stdout.splitlines()[-1].endswith("status: FAILURE")
    assert "refused anonymous access" in anon.stderr, anon.stderr
    assert "shifterimg login" in anon.stderr  # says what to do about it
    login = _login(world, ALICE, host, token_registry.username, token_registry.password)
    assert login.returncode == 0, login.stdout

    tag = f"{host}/shifterimg/secret:v1"
    res = world.run(ALICE, "-u", ALICE, "pull", f"docker:{tag}")
    assert res.returncode == 0, res
    assert res.stdout.splitlines()[-1].endswith("status: READY")
    rec = _record(world, tag, user=ALICE)
    assert rec["userACL"] == [test_users[ALICE][0]] and rec["id"] == pushed.config_digest[7:]
    denied = world.run(BOB, "lookup", tag)
    assert (denied.returncode, denied.stdout) == (1, "")
    mine = world.run(ALICE, "lookup", tag)
    assert (mine.returncode, mine.stdout) == (0, rec["id"] + "\n")
    # The login crossed the network inside the munge credential; the gateway must not
    # have written it anywhere: not in its log, not in its database or image files.
    secret = token_registry.password
    packed = b64(f"{token_registry.username}:{secret}")
    log = world.gw.log_path.read_text(errors="replace")
    assert secret not in log and packed not in log
    for path in world.gw.workdir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert secret.encode() not in data and packed.encode() not in data, path


# -- several gateways --------------------------------------------------------------------


def test_a_dead_gateway_in_the_list_is_skipped(world, basic):
    world.gw.wait_status(basic.ref())
    image_id = basic.config_digest.split(":")[1]
    dead = f"http://127.0.0.1:{free_port()}"
    conf = write_udiroot_conf(world.base / "udiRoot-failover.conf", [dead, world.gw.url])
    tried_dead = 0
    # The list is shuffled per run: run until the dead one has been tried first a few
    # times (-v reports each failed try), checking every run succeeds regardless.
    for attempt in range(16):
        for args, check in (
            (("lookup", basic.ref()), lambda out: out == image_id + "\n"),
            (("images",), lambda out: basic.ref() in out),
            (("pull", basic.ref()), lambda out: out.splitlines()[-1].endswith("READY")),
        ):
            res = world.run(BOB, "-v", *args, conf=conf)
            assert res.returncode == 0 and check(res.stdout), (args, res)
            tried_dead += f"gateway {dead}:" in res.stderr
        if tried_dead >= 2 and attempt >= 1:
            break
    assert tried_dead >= 2


def test_a_gateway_that_never_answers_costs_one_gateway_timeout(world, basic):
    world.gw.wait_status(basic.ref())
    # Accepts connections (the kernel does, from the backlog) but never answers.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        silent = f"http://127.0.0.1:{hole.getsockname()[1]}"
        conf = write_udiroot_conf(
            world.base / "udiRoot-silent.conf", [silent, world.gw.url], timeout=1
        )
        for _ in range(12):
            res = world.run(BOB, "-v", "lookup", basic.ref(), conf=conf)
            assert res.returncode == 0, res
            if f"gateway {silent}:" in res.stderr:
                assert res.elapsed < 8  # one second for the silent one, not forever
                break
        else:
            pytest.fail("the silent gateway was never tried first")


DOWN = "munged is not reachable on the gateway (try again later)"


class _Unavailable(BaseHTTPRequestHandler):
    """A gateway that answers every request 503, as ours does when its munged is down."""

    def _answer(self) -> None:
        body = json.dumps({"status": 503, "error": "Service Unavailable", "message": DOWN})
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def unavailable_gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_503_gateway_is_skipped_and_its_message_shown_when_alone(
    world, basic, unavailable_gateway
):
    world.gw.wait_status(basic.ref())
    both = write_udiroot_conf(world.base / "udiRoot-503.conf", [unavailable_gateway, world.gw.url])
    for _ in range(4):
        res = world.run(BOB, "lookup", basic.ref(), conf=both)
        assert res.returncode == 0 and res.stdout == basic.config_digest[7:] + "\n", res
    # Alone, it did answer: the user reads why it cannot serve, not "failed to contact".
    alone = write_udiroot_conf(world.base / "udiRoot-503-alone.conf", [unavailable_gateway])
    res = world.run(BOB, "lookup", basic.ref(), conf=alone)
    assert (res.returncode, res.stdout, res.stderr) == (1, "", f"shifterimg: error: {DOWN}\n")


def test_no_gateway_answers(world):
    """Shifter's line first (scripts match it), then each URL tried and why, then where
    the setting lives."""
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    conf = write_udiroot_conf(world.base / "udiRoot-dead.conf", dead)
    for args in (("lookup", "x:v1"), ("images",), ("pull", "docker:x:v1"), ("pullnb", "x:v1")):
        res = world.run(ALICE, *args, conf=conf)
        assert (res.returncode, res.stdout) == (1, ""), res
        lines = res.stderr.splitlines()
        assert lines[0] == NOT_CONTACTED
        assert sorted(lines[1:3]) == sorted(f"shifterimg: error: {url}: Connection refused"
                                            for url in dead), lines
        assert lines[3:] == [f"shifterimg: check imageGateway in {conf} and that "
                             "shifter-imagegw runs there"]


def test_unresolvable_gateway_host_is_named(world):
    conf = write_udiroot_conf(world.base / "udiRoot-nxhost.conf", ["http://gw.invalid:7777"])
    res = world.run(ALICE, "lookup", "x:v1", conf=conf)
    assert res.returncode == 1
    line = res.stderr.splitlines()[1]
    assert line.startswith("shifterimg: error: http://gw.invalid:7777: ") and len(line) < 160
    assert "resolution" in line or "not known" in line, line


# -- https gateways: which CAs the client trusts ------------------------------------------

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's system CA store


@dataclass
class TlsSite:
    proxy: TlsProxy  # https in front of world.gw, as nginx at a site
    ca: Path  # the site CA that signed the proxy's certificate
    other_ca: Path  # a CA that signed nothing here
    url: str


@pytest.fixture(scope="module")
def tls(world) -> Iterator[TlsSite]:
    site, other = world.base / "tls-site", world.base / "tls-other"
    for d in (site, other):
        d.mkdir()
        os.chmod(d, 0o755)
    ca, cert, key = make_tls_files(site)
    other_ca = make_tls_files(other)[0]
    for path in (ca, other_ca):
        os.chmod(path, 0o644)  # what a site publishes
    os.chmod(key, 0o600)  # the server's key: root's alone
    with TlsProxy("127.0.0.1", world.gw.port, cert, key) as proxy:
        yield TlsSite(proxy, ca, other_ca, proxy.url)


def _run_with_system_bundle(world: World, user: str, bundle: Path, *args: str,
                            conf: Path) -> Result:
    """shifterimg as ``user`` in a mount namespace where ``bundle`` is bind-mounted over
    the system CA store (the machine's own file is never touched)."""
    kwargs = world._spawn_kwargs(user, conf)
    pw = pwd.getpwnam(user)
    script = (
        'mount --bind "$1" "$2" || exit 99; uid=$3; gid=$4; shift 4; '
        'exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"'
    )
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
            "sh", str(bundle), str(SYSTEM_BUNDLE), str(pw.pw_uid), str(pw.pw_gid),
            *shifterimg_argv(), *args]
    start = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=90, start_new_session=True, env=kwargs["env"],
                          cwd=kwargs["cwd"])
    assert proc.returncode != 99, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def test_https_gateway_with_the_ca_named_by_imageGatewayCAFile(world, basic, tls):
    world.gw.wait_status(basic.ref())
    image_id = basic.config_digest.split(":")[1]
    conf = write_udiroot_conf(world.base / "udiRoot-tls-key.conf", [tls.url],
                              extra=f"imageGatewayCAFile={tls.ca}\n")
    before = tls.proxy.handshakes
    res = world.run(ALICE, "lookup", basic.ref(), conf=conf)
    assert (res.returncode, res.stdout, res.stderr) == (0, image_id + "\n", ""), res
    res = world.run(ALICE, "pull", basic.ref(), conf=conf)
    assert res.returncode == 0 and res.stdout.splitlines()[-1].endswith("READY"), res
    res = world.run(ALICE, "images", conf=conf)
    assert res.returncode == 0 and basic.ref() in res.stdout, res
    assert tls.proxy.handshakes >= before + 3  # every answer came through TLS


def test_https_gateway_signed_by_a_ca_in_the_system_store(world, basic, tls):
    """No key, no REQUESTS_CA_BUNDLE: the site CA added to the node's system store (here
    bind-mounted over it in a mount namespace) is all the client needs."""
    world.gw.wait_status(basic.ref())
    image_id = basic.config_digest.split(":")[1]
    conf = write_udiroot_conf(world.base / "udiRoot-tls-system.conf", [tls.url])
    bundle = world.base / "tls-site" / "ca-certificates.crt"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + tls.ca.read_bytes())
    os.chmod(bundle, 0o644)
    # Without the site CA in the store the same command is refused...
    res = _run_with_system_bundle(world, ALICE, SYSTEM_BUNDLE, "lookup", basic.ref(), conf=conf)
    assert res.returncode == 1 and "certificate verify failed" in res.stderr, res
    # ...and with it, it works.
    res = _run_with_system_bundle(world, ALICE, bundle, "lookup", basic.ref(), conf=conf)
    assert (res.returncode, res.stdout, res.stderr) == (0, image_id + "\n", ""), res
    res = _run_with_system_bundle(world, BOB, bundle, "pull", basic.ref(), conf=conf)
    assert res.returncode == 0 and res.stdout.splitlines()[-1].endswith("READY"), res


def test_untrusted_gateway_certificate_says_what_to_do(world, tls):
    conf = write_udiroot_conf(world.base / "udiRoot-tls-untrusted.conf", [tls.url])
    res = world.run(ALICE, "lookup", "x:v1", conf=conf)
    assert (res.returncode, res.stdout) == (1, ""), res
    lines = res.stderr.splitlines()
    assert lines[0] == NOT_CONTACTED
    assert lines[1].startswith(f"shifterimg: error: {tls.url}: TLS certificate verify failed: ")
    assert str(SYSTEM_BUNDLE) in lines[1], lines  # what it trusted
    assert f"imageGatewayCAFile in {conf}" in lines[2], lines  # what to do
    # The key naming a CA that did not sign the gateway's certificate: named back.
    wrong = write_udiroot_conf(world.base / "udiRoot-tls-wrong.conf", [tls.url],
                               extra=f"imageGatewayCAFile={tls.other_ca}\n")
    res = world.run(ALICE, "lookup", "x:v1", conf=wrong)
    assert (res.returncode, res.stdout) == (1, ""), res
    lines = res.stderr.splitlines()
    assert lines[0] == NOT_CONTACTED
    assert lines[1].startswith(f"shifterimg: error: {tls.url}: TLS certificate verify failed: ")
    assert f"imageGatewayCAFile={tls.other_ca}" in lines[2] and str(wrong) in lines[2], lines


def test_an_unusable_imageGatewayCAFile_is_named_before_any_request(world, tls):
    not_pem = world.base / "tls-site" / "not-a-ca.pem"
    not_pem.write_text("hello\n")
    os.chmod(not_pem, 0o644)
    secret = world.base / "tls-site" / "server-key.pem"  # root's 0600
    for value, why in (
        ("/nonexistent/ca.pem", "No such file or directory"),
        ("ca.pem", "not an absolute path"),
        (str(not_pem), "no PEM certificate"),
        (str(secret), "Permission denied"),
    ):
        conf = write_udiroot_conf(world.base / "udiRoot-tls-bad.conf", [tls.url],
                                  extra=f"imageGatewayCAFile={value}\n")
        before = tls.proxy.handshakes + tls.proxy.refused
        res = world.run(ALICE, "lookup", "x:v1", conf=conf)
        assert (res.returncode, res.stdout) == (1, ""), res
        assert res.stderr.startswith(
            f"shifterimg: error: imageGatewayCAFile={value} in {conf}: {why}"), res.stderr
        assert len(res.stderr.splitlines()) == 1, res.stderr
        assert tls.proxy.handshakes + tls.proxy.refused == before


def test_which_cas_are_trusted_key_then_environment_then_system_store(monkeypatch, tmp_path):
    """imageGatewayCAFile wins; else a bundle the user named the usual way (requests'
    REQUESTS_CA_BUNDLE, OpenSSL's SSL_CERT_FILE) still works as before; else the system
    store, never requests' certifi copy."""
    ca = make_tls_files(tmp_path)[0]
    for var in shifterimg.CA_ENV:
        monkeypatch.delenv(var, raising=False)
    assert shifterimg.ca_trust(None, "c") == (
        str(SYSTEM_BUNDLE), f"the system CA store {SYSTEM_BUNDLE}")
    monkeypatch.setenv("SSL_CERT_FILE", "/elsewhere.pem")
    assert shifterimg.ca_trust(None, "c")[0] == "/elsewhere.pem"
    assert shifterimg.ca_trust(str(ca), "c") == (str(ca), f"imageGatewayCAFile={ca}")


# -- admin modes -----------------------------------------------------------------------------


def test_expire_and_autoexpire_are_for_admins(world, registry, tmp_path):
    _push(registry, tmp_path, "shifterimg/expire")
    tag = f"{registry.host}/shifterimg/expire:v1"
    rec = world.gw.wait_status(tag)
    for args in (("expire", f"docker:{tag}"), ("autoexpire",)):
        res = world.run(ALICE, *args)
        assert res.returncode == 1 and res.stdout == "", res
        assert res.stderr.startswith("shifterimg: error: ") and "admin" in res.stderr
    assert world.run(ALICE, "lookup", tag).returncode == 0  # still there
    # root is listed in the platform's admins.
    res = world.run("root", "expire", f"docker:{tag}")
    assert (res.returncode, res.stderr) == (0, ""), res
    assert world.run(ALICE, "lookup", tag).returncode == 1
    assert not (world.gw.image_dir / f"{rec['id']}.squashfs").exists()
    res = world.run("root", "autoexpire")
    assert (res.returncode, res.stderr) == (0, ""), res


# -- rm: a user removes a private image they pulled ------------------------------------------


def test_rm_removes_a_private_image_its_puller_pulled(world, registry, tmp_path):
    _push(registry, tmp_path / "a", "shifterimg/rm-shared")
    shared = f"{registry.host}/shifterimg/rm-shared:v1"
    assert world.run(ALICE, "-u", BOB, "pull", f"docker:{shared}").returncode == 0
    rec = _record(world, shared)
    files = [world.gw.image_dir / f"{rec['id']}.{ext}" for ext in ("squashfs", "meta")]
    index = world.gw.image_dir / "tags" / "docker" / quote(shared, safe="")
    assert all(f.exists() for f in [*files, index])
    # Bob may use it, but did not pull it.
    res = world.run(BOB, "rm", f"docker:{shared}")
    assert (res.returncode, res.stdout) == (1, ""), res
    assert res.stderr == (
        f"shifterimg: error: cannot remove docker:{shared}: docker:{shared} was pulled by "
        f"{ALICE}: only they or an admin of {SYS} can remove it\n")
    assert world.run(BOB, "lookup", shared).stdout == rec["id"] + "\n"
    # Alice removes it: files, tag index and record go; nobody can look it up.
    res = world.run(ALICE, "rm", shared)  # no type: docker is the default
    assert (res.returncode, res.stderr) == (0, ""), res
    assert res.stdout == f"removed docker:{shared} (id {rec['id']})\n"
    assert not any(f.exists() for f in [*files, index])
    for user in (ALICE, BOB):
        assert world.run(user, "lookup", shared).returncode == 1
    queue = world.gw.request("GET", f"/api/queue/{SYS}/", user=ALICE).json()["list"]
    assert [e for e in queue if e["image"] == shared] == []  # no record left in flight
    deadline = time.monotonic() + 10  # the admin's record of it, in the gateway's log
    while f"remove user={ALICE} system={SYS} tag={shared} " not in world.gw.log():
        assert time.monotonic() < deadline, world.gw.log()
        time.sleep(0.1)
    # Removed twice: the second says there is nothing to remove.
    again = world.run(ALICE, "rm", f"docker:{shared}")
    assert again.returncode == 1 and again.stderr == (
        f"shifterimg: error: cannot remove docker:{shared}: image docker:{shared} not found "
        f"on {SYS}\n")


def test_rm_of_an_image_with_two_tags_says_both_went(world, registry, tmp_path):
    # The same image pulled under two names is one record with both tags: removing it
    # by one name removes the other too, and the user is told.
    layer = build_layer([File("hello", os.urandom(16).hex())], "gzip", tmp_path)
    for name in ("one", "two"):
        push_image(registry, "shifterimg/rm-twice", name, [layer], {"Cmd": ["/hello"]})
    one, two = (f"{registry.host}/shifterimg/rm-twice:{n}" for n in ("one", "two"))
    for tag in (one, two):
        assert world.run(ALICE, "-u", ALICE, "pull", f"docker:{tag}").returncode == 0
    image_id = _record(world, one)["id"]
    assert _record(world, two)["id"] == image_id
    res = world.run(ALICE, "rm", f"docker:{two}")
    assert (res.returncode, res.stderr) == (0, ""), res
    assert res.stdout == (f"removed docker:{two} (id {image_id})\n"
                          f"removed docker:{one} too (same image)\n")
    for tag in (one, two):
        assert world.run(ALICE, "lookup", tag).returncode == 1


def test_rm_refuses_public_images_and_hides_others_private_ones(world, registry, tmp_path):
    _push(registry, tmp_path / "a", "shifterimg/rm-public")
    public = f"{registry.host}/shifterimg/rm-public:v1"
    _push(registry, tmp_path / "b", "shifterimg/rm-hers")
    hers = f"{registry.host}/shifterimg/rm-hers:v1"
    assert world.run(ALICE, "pull", f"docker:{public}").returncode == 0
    assert world.run(ALICE, "-u", ALICE, "pull", f"docker:{hers}").returncode == 0
    res = world.run(ALICE, "rm", f"docker:{public}")  # her pull, but everyone's image
    assert (res.returncode, res.stdout) == (1, ""), res
    assert res.stderr == (
        f"shifterimg: error: cannot remove docker:{public}: docker:{public} is a public image: "
        f"only an admin of {SYS} can remove it (they use shifterimg expire)\n")
    # Bob cannot read alice's private image: he is told what lookup tells him.
    res = world.run(BOB, "rm", f"docker:{hers}")
    assert res.returncode == 1 and res.stderr.endswith(f"not found on {SYS}\n"), res
    assert world.run(ALICE, "lookup", hers).returncode == 0
    # An admin removes any image.
    res = world.run("root", "rm", f"docker:{public}")
    assert (res.returncode, res.stderr) == (0, ""), res
    assert world.run(BOB, "lookup", public).returncode == 1
    bad = world.run(ALICE, "rm")
    assert bad.returncode == 2 and "rm needs one image" in bad.stderr


# -- import ----------------------------------------------------------------------------------


def _squashfs(directory: Path, content: str) -> Path:
    tree = directory / "tree"
    tree.mkdir(parents=True)
    (tree / "hello").write_text(content)
    out = directory / "img.squashfs"
    mksquashfs(tree, out)
    os.chmod(out, 0o644)
    return out


def test_import_by_an_import_user_prints_the_id(world):
    image = _squashfs(Path(tempfile.mkdtemp(dir=world.base)), os.urandom(8).hex())
    os.chmod(image.parent, 0o755)
    res = world.run(ALICE, "import", str(image), "custom:shifterimg-mine:v1")
    assert res.returncode == 0, res
    assert res.stdout == fasthash(image) + "\n" and res.stderr == ""
    looked = world.run(ALICE, "lookup", "custom:shifterimg-mine:v1")
    assert looked.stdout == res.stdout
    refused = world.run(BOB, "import", str(image), "custom:shifterimg-bobs:v1")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("shifterimg: error: ") and "ImportUsers" in refused.stderr


def test_import_for_others_stays_readable_by_the_importer(world, test_users):
    image = _squashfs(Path(tempfile.mkdtemp(dir=world.base)), os.urandom(8).hex())
    os.chmod(image.parent, 0o755)
    res = world.run(ALICE, "-u", BOB, "import", str(image), "custom:shifterimg-shared:v1")
    assert (res.returncode, res.stdout, res.stderr) == (0, fasthash(image) + "\n", ""), res
    rec = _record(world, "shifterimg-shared:v1", user=ALICE, itype="custom")
    assert sorted(rec["userACL"]) == sorted([test_users[ALICE][0], test_users[BOB][0]])
    assert world.run(BOB, "lookup", "custom:shifterimg-shared:v1").stdout == res.stdout


class _ScriptedGateway:
    """Stands in for ``shifterimg.Gateway``: the queue and lookup answers of a gateway on
    which earlier imports of the same tag left records behind (hard to produce for real:
    an import fails only on an I/O error after its checks passed)."""

    system = SYS

    def __init__(self, queues: list[list[dict]], lookup: tuple[int, dict]) -> None:
        self.queues = queues  # one per GET of the queue; the last one repeats
        self.lookup = lookup

    def call(self, method: str, path: str, **_: object) -> tuple[int, object]:
        if path.startswith("/api/doimport/"):
            return 200, {"status": "PENDING", "tag": "MISSING"}
        if path.startswith("/api/queue/"):
            return 200, {"list": self.queues.pop(0) if len(self.queues) > 1 else self.queues[0]}
        return self.lookup


def _entry(status: str, message: str = "") -> dict:
    return {"status": status, "image": "old:v1", "status_message": message}


def test_import_ignores_an_earlier_failure_of_the_same_tag(monkeypatch, capsys):
    monkeypatch.setattr(shifterimg.time, "sleep", lambda _s: None)
    old = _entry("FAILURE", "import of /x failed: disk full")
    gw = _ScriptedGateway(
        # before the POST; then the new import runs behind the old failure; then ends READY
        [[old], [old, _entry("HASHING")], [old]],
        (200, {"status": "READY", "id": "new-id"}),
    )
    assert shifterimg.do_import(gw, "/tmp/x.sqsh", "custom", "old:v1", None, None) == 0
    assert capsys.readouterr() == ("new-id\n", "")


def test_import_failure_is_not_hidden_by_an_older_image_of_the_tag(monkeypatch, capsys):
    monkeypatch.setattr(shifterimg.time, "sleep", lambda _s: None)
    # The tag still names an older READY image; this import fails.
    gw = _ScriptedGateway(
        [[], [_entry("HASHING")], [_entry("FAILURE", "import of /x failed: disk full")]],
        (200, {"status": "READY", "id": "older-id"}),
    )
    assert shifterimg.do_import(gw, "/tmp/x.sqsh", "custom", "old:v1", None, None) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", "shifterimg: error: import failed: import of /x failed: disk full\n")
