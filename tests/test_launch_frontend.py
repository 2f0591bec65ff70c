"""The unprivileged front ends ``shifter``, ``setupRoot`` and ``unsetupRoot`` (see
docs/behaviour.md, 'Runtime: shifter options' to 'Runtime: modules', and 'Runtime: setupRoot
and unsetupRoot'; helpers/PROTOCOL.md for what they hand over).

They run for real, as the installed launcher runs them (``python3 -I -S``, no
site-packages), and really ``execv`` the "helper": ``$SHIFTER_HELPER`` names a small
``/bin/sh`` script written here that records its argv, its pid, its ignored signals and
what it reads from the ``--env-fd`` descriptor (from the current offset), so each test
sees exactly what the setuid helper would get. The gateway fallback runs the real
``shifterimg`` against a small HTTP gateway with a real munge daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest

from shifter import __version__
from shifter.frontend import UsageError, getopt_long, index_candidates, quote_tag
from shifter.launch import parse_args
from udiroot.environ import EnvError

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"  # what the installed launchers use
VENV_BIN = REPO / ".venv" / "bin"
ALICE = "shifter-alice"

DUMP_HELPER = r"""#!/bin/sh
# Stands in for shifter-helper: records what it was given, then exits $DUMP_EXIT.
out="$DUMP_OUT"
printf '%s\0' "$0" "$@" > "$out.argv.tmp"
echo $$ > "$out.pid"
sed -n 's/^SigIgn:[[:space:]]*//p' /proc/$$/status > "$out.sigign"
fd=""
prev=""
for a in "$@"; do
    [ "$a" = "--" ] && break
    [ "$prev" = "--env-fd" ] && fd="$a"
    prev="$a"
done
if [ -n "$fd" ]; then
    eval "cat <&$fd" > "$out.env"
fi
mv "$out.argv.tmp" "$out.argv"
exit "${DUMP_EXIT:-0}"
"""


def image_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class Run:
    """One front-end run: status, output, and what the helper received (if it ran)."""

    def __init__(self, proc: subprocess.CompletedProcess[str], out: Path, pid: int) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.spawned_pid = pid
        argv_file = Path(f"{out}.argv")
        self.helper_ran = argv_file.exists()
        self.argv: list[str] = []
        self.env_records: list[str] = []
        self.sigign = 0
        self.helper_pid = 0
        if self.helper_ran:
            self.argv = argv_file.read_bytes().decode().split("\0")[:-1]
            self.helper_pid = int(Path(f"{out}.pid").read_text())
            self.sigign = int(Path(f"{out}.sigign").read_text().strip(), 16)
            env_file = Path(f"{out}.env")
            if env_file.exists():
                data = env_file.read_bytes()
                assert data == b"" or data.endswith(b"\0"), data[-50:]
                self.env_records = data.decode("utf-8", "surrogateescape").split("\0")[:-1]

    @property
    def env(self) -> dict[str, str]:
        out = {}
        for record in self.env_records:
            name, eq, value = record.partition("=")
            assert eq and name, record
            out[name] = value
        return out

    def option(self, name: str) -> list[str]:
        """Values of a helper option, in order (before ``--``)."""
        head = self.argv[: self.argv.index("--")] if "--" in self.argv else self.argv
        return [head[i + 1] for i, a in enumerate(head) if a == name]

    @property
    def command(self) -> list[str]:
        return self.argv[self.argv.index("--") + 1 :]


class Site:
    """A root-owned udiRoot.conf, an imagePath with images and a tag index, launchers."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.images = base / "images"
        self.images.mkdir()
        self.conf = base / "udiRoot.conf"
        self.helper = base / "helper"
        self.helper.write_text(DUMP_HELPER)
        self.helper.chmod(0o755)
        self.setup = base / "shifter-setup"  # setupRoot's program, beside the helper
        self.setup.write_text(DUMP_HELPER)
        self.setup.chmod(0o755)
        self.out = base / "dump"
        self.runs = 0
        self.launchers = {}
        for name, module, fn in (
            ("shifter", "shifter.launch", "main"),
            ("setupRoot", "shifter.setuproot", "main"),
            ("unsetupRoot", "shifter.setuproot", "main_unsetup"),
        ):
            path = base / name
            path.write_text(
                f"#!{PYTHON} -IS\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                f"from {module} import {fn}\nsys.exit({fn}())\n"
            )
            path.chmod(0o755)
            self.launchers[name] = path
        self.write_conf()

    def write_conf(self, **extra: str) -> None:
        values = {
            "udiMount": str(self.base / "udiMount"),
            "loopMount": str(self.base / "loopMount"),
            "imagePath": str(self.images),
            "udiRootPath": str(REPO),
            "etcPath": str(self.base / "etc"),
            "rootfsType": "tmpfs",
            "system": "testsys",
            "defaultImageType": "docker",
            **extra,
        }
        self.conf.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        os.chown(self.conf, 0, 0)
        self.conf.chmod(0o644)

    def add_image(self, name: str, meta: str = "", tag: str | None = None) -> str:
        iid = image_id(name)
        (self.images / f"{iid}.squashfs").write_bytes(b"")
        (self.images / f"{iid}.meta").write_text("FORMAT: squashfs\n" + meta)
        if tag is not None:
            self.tag(tag, iid)
        return iid

    def tag(self, tag: str, iid: str, itype: str = "docker") -> None:
        """What imagegw.manager writes: tags/<type>/<quote(tag, safe="")> holding the id."""
        index = self.images / "tags" / itype
        index.mkdir(parents=True, exist_ok=True)
        (index / quote(tag, safe="")).write_text(iid + "\n")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/root",
            "SHIFTER_UDIROOT_CONF": str(self.conf),
            "SHIFTER_HELPER": str(self.helper),
        }
        env.update(extra or {})
        return env

    def run(
        self,
        tool: str,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        launcher: list[str] | None = None,
        user: tuple[int, int, list[int]] | None = None,
    ) -> Run:
        self.runs += 1
        out = Path(f"{self.out}{self.runs}")
        full_env = self.env(env)
        full_env = {k: v for k, v in full_env.items() if v is not None}
        full_env["DUMP_OUT"] = str(out)
        argv = (launcher or [str(self.launchers[tool])]) + list(args)
        kwargs = {}
        if user is not None:
            kwargs = {"user": user[0], "group": user[1], "extra_groups": user[2]}
        proc = subprocess.Popen(
            argv,
            env=full_env,
            cwd=str(cwd or self.base),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        stdout, stderr = proc.communicate(timeout=60)
        done = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        return Run(done, out, proc.pid)

    def shifter(self, *args: str, **kw: object) -> Run:
        return self.run("shifter", *args, **kw)  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# -- option parsing (docs/behaviour.md, 'Runtime: shifter options') --------------------------------


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["-i", "docker:ubuntu", "ls", "-l"], {"image": "docker:ubuntu", "command": ["ls", "-l"]}),
        (["--image=x:y", "-v", "cmd", "-v"], {"image": "x:y", "verbose": True,
                                               "command": ["cmd", "-v"]}),
        (["--image", "a", "--", "-v"], {"image": "a", "verbose": False, "command": ["-v"]}),
        (["-iimg", "-", "x"], {"image": "img", "command": ["-", "x"]}),
        (["--entrypoint", "x"], {"use_entrypoint": True, "entrypoint": None, "command": ["x"]}),
        (["--entrypoint=/bin/x", "a"], {"use_entrypoint": True, "entrypoint": "/bin/x",
                                        "command": ["a"]}),
        (["--entrypoint="], {"use_entrypoint": True, "entrypoint": None, "command": []}),
        (["--entry"], {"use_entrypoint": True, "entrypoint": None}),
        (["--workdir", "pwd"], {"use_workdir": True, "workdir": None, "command": ["pwd"]}),
        (["--workdir=/a", "pwd"], {"use_workdir": True, "workdir": "/a"}),
        (["-w", "/a", "pwd"], {"use_workdir": True, "workdir": "/a", "command": ["pwd"]}),
        (["-w/a"], {"use_workdir": True, "workdir": "/a"}),
        (["-V", "/a:/b", "--volume=/c:/d", "-V=/e:/f", "--volume", "/g:/h"],
         {"volumes": ["/a:/b", "/c:/d", "/e:/f", "/g:/h"]}),
        (["-e", "A=1", "--env=B=2=3", "-eC=x"], {"env": ["A=1", "B=2=3", "C=x"]}),
        (["-vE", "-mnone"], {"verbose": True, "clearenv": True, "module": "none"}),
        (["--module", "a,b", "--clearenv"], {"module": "a,b", "clearenv": True}),
        (["--env-file", "/f", "--env-file=/g"], {"env_file": "/g"}),
        (["--version"], {"version": True}),
        (["--vers"], {"version": True}),
        (["-h"], {"help": True}),
        (["--help", "x"], {"help": True, "command": ["x"]}),
        ([], {"image": None, "command": [], "volumes": [], "use_entrypoint": False}),
    ],
)
def test_option_table(argv: list[str], expect: dict[str, object]) -> None:
    opts = parse_args(argv)
    for name, value in expect.items():
        assert getattr(opts, name) == value, (argv, name)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nope"], "unrecognized option '--nope'"),
        (["-x"], "invalid option -- 'x'"),
        (["-i"], "option requires an argument -- 'i'"),
        (["--image"], "option '--image' requires an argument"),
        (["--verbose=1"], "option '--verbose' doesn't allow an argument"),
        (["--e"], "option '--e' is ambiguous; possibilities: '--env' '--env-file' "
                  "'--entrypoint'"),
        (["--ver"], "option '--ver' is ambiguous"),
    ],
)
def test_option_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert str(info.value).startswith(message.split(";")[0])
    if ";" in message:
        for name in ("'--env'", "'--env-file'", "'--entrypoint'"):
            assert name in str(info.value)


@pytest.mark.parametrize("bad", ["=x", "x=", "x", ""])
def test_env_option_format(bad: str) -> None:
    with pytest.raises(EnvError, match="^Improperly formatted environment variable"):
        parse_args(["-e", bad, "true"])


def test_getopt_permute_for_setuproot() -> None:
    pairs, rest = getopt_long(["-U", "5", "docker", "-G7", "img", "--", "-x"],
                              {"U": 1, "G": 1}, {}, permute=True)
    assert pairs == [("U", "5"), ("G", "7")]
    assert rest == ["docker", "img", "-x"]


@pytest.mark.parametrize(
    "tag", ["ubuntu:22.04", "registry.test:5000/team/busybox:1.0", "a@sha256:" + "0" * 64,
            "x+y_z.w-v", "é"]
)
def test_quote_tag_is_urllib_quote(tag: str) -> None:
    assert quote_tag(tag) == quote(tag, safe="")


def test_index_candidates_follow_the_gateway_normalisation() -> None:
    from imagegw.manager import normalize_tag

    for itype, tag in [("docker", "ubuntu"), ("docker", "ubuntu:22.04"),
                       ("docker", "registry.test:5000/team/busybox"),
                       ("docker", "ubuntu@sha256:" + "a" * 64), ("custom", "mine")]:
        assert normalize_tag(itype, tag) in index_candidates(itype, tag)
    assert index_candidates("docker", "ubuntu") == ["ubuntu", "ubuntu:latest"]


# -- simple runs ----------------------------------------------------------------------------


def test_version_and_help(site: Site) -> None:
    res = site.shifter("--version")
    assert (res.returncode, res.stdout, res.helper_ran) == (0, f"shifter {__version__}\n", False)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"]
    res = site.shifter("--help")
    assert res.returncode == 0 and res.stdout.startswith("Usage: shifter")
    assert "--entrypoint[=CMD]" in res.stdout


def test_every_cli_says_its_version(site: Site) -> None:
    """``--version`` on every command a site installs, the same version everywhere."""
    import imagegw

    assert imagegw.__version__ == __version__
    for name in ("setupRoot", "unsetupRoot"):
        res = site.run(name, "--version")
        assert (res.returncode, res.stdout, res.helper_ran) == (0, f"{name} {__version__}\n",
                                                                False), res.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    project_scripts = project["scripts"]
    assert {"shifterimg", "shifter-imagegw", "shifter-prep-mpi", "shifter-prep-udiimage",
            "shifter-convert"} <= set(project_scripts)
    for name in project_scripts:
        if name in ("shifter", "setupRoot", "unsetupRoot"):
            continue  # the python3 -I -S launchers above
        proc = subprocess.run([str(VENV_BIN / name), "--version"], capture_output=True,
                              text=True, timeout=60)
        assert (proc.returncode, proc.stdout) == (0, f"{name} {__version__}\n"), proc.stderr


def test_usage_error_exits_2(site: Site) -> None:
    res = site.shifter("--nope", "true")
    assert res.returncode == 2 and not res.helper_ran
    assert res.stderr == ("shifter: error: unrecognized option '--nope'\n"
                          "Try 'shifter --help' for more information.\n")
    res = site.shifter("-i", "docker:x", "-e", "NOEQUALS", "true")
    assert res.returncode == 1
    assert "Improperly formatted environment variable: NOEQUALS" in res.stderr


def test_no_image(site: Site) -> None:
    res = site.shifter("true")
    assert res.returncode == 1 and not res.helper_ran
    assert res.stderr == "No image specified, or specified incorrectly!\n"


def test_untrusted_config_is_refused(site: Site) -> None:
    site.conf.chmod(0o666)
    res = site.shifter("--image=id:" + image_id("x"), "true")
    assert res.returncode == 1 and not res.helper_ran
    assert "FAILED to parse udiRoot configuration." in res.stderr


# -- what reaches the helper ----------------------------------------------------------------


def test_exact_helper_argv_and_env_for_an_id_image(site: Site) -> None:
    iid = site.add_image("plain", "ENV: FROM_IMAGE=1\nENV: PATH=/usr/bin\n")
    res = site.shifter(f"--image=id:{iid}", "ls", "-l", "--", "x",
                       env={"CALLER": "here", "LD_PRELOAD": "/evil.so", "LD_LIBRARY_PATH": "/l"})
    assert res.returncode == 0, res.stderr
    fd = res.option("--env-fd")[0]
    assert res.argv == [
        str(site.helper), "run", "--image-id", iid, "--modules", "none",
        "--workdir", str(site.base), "--request", f"id:{iid}", "--env-fd", fd,
        "--", "ls", "-l", "--", "x",
    ]
    assert int(fd) > 2
    # exec, not fork: the helper is the very process that was started.
    assert res.helper_pid == res.spawned_pid
    env = res.env
    assert env["CALLER"] == "here"
    assert not [name for name in env if name.startswith("LD_")]
    assert env["SHIFTER_IMAGE"] == iid
    assert env["SHIFTER_IMAGEREQUEST"] == f"id:{iid}"  # the request as given, as Shifter
    assert env["FROM_IMAGE"] == "1"
    assert env["PATH"] == "/usr/bin"  # the image's PATH wins over the caller's
    assert env["SHIFTER_HELPER"] == str(site.helper)  # the caller's own variables stay


def test_exit_status_is_the_helpers(site: Site) -> None:
    iid = site.add_image("status")
    res = site.shifter(f"--image=id:{iid}", "true", env={"DUMP_EXIT": "7"})
    assert res.returncode == 7 and res.helper_ran


def test_sigpipe_and_sigxfsz_are_not_left_ignored(site: Site) -> None:
    iid = site.add_image("signals")
    res = site.shifter(f"--image=id:{iid}", "true")
    assert res.helper_ran
    for signum in (13, 25):  # SIGPIPE, SIGXFSZ
        assert not res.sigign & (1 << (signum - 1)), hex(res.sigign)


def test_environment_layers_in_order(site: Site) -> None:
    site.write_conf(
        siteEnv="SITE=global BOTH=global",
        siteEnvAppend="PATH=/opt/udiImage/bin",
        siteEnvPrepend="PATH=/sbin",
        siteEnvUnset="DROPME",
        defaultModules="mod",
        module_mod_siteEnv="BOTH=module MOD=1 LD_LIBRARY_PATH=/opt/udiImage/modules/mod/lib",
    )
    iid = site.add_image("layers", "ENV: PATH=/usr/bin\nENV: A=image\nENV: B=image\n"
                                   "ENV: C=image\n")
    envfile = site.base / "envfile"
    envfile.write_text("# comment\n\n  B=file\nC=file\nWITH_SPACE=a b\n")
    res = site.shifter(f"--image=id:{iid}", f"--env-file={envfile}", "-e", "C=option",
                       "--env=DROPME=x", "env", env={"A": "caller", "DROPME": "caller"})
    assert res.returncode == 0, res.stderr
    env = res.env
    assert env["PATH"] == "/sbin:/usr/bin:/opt/udiImage/bin"
    assert (env["A"], env["B"], env["C"]) == ("image", "file", "option")
    assert env["WITH_SPACE"] == "a b"
    assert (env["SITE"], env["BOTH"], env["MOD"]) == ("global", "global", "1")
    assert env["LD_LIBRARY_PATH"] == "/opt/udiImage/modules/mod/lib"
    assert "DROPME" not in env
    assert res.option("--modules") == ["mod"]


def test_image_env_as_one_list_line(site: Site) -> None:
    iid = site.add_image("envlist", 'ENV: ["A=1", "PATH=/usr/bin:/bin"]\nENV: B=[x]\n')
    res = site.shifter(f"--image=id:{iid}", "env")
    assert res.returncode == 0, res.stderr
    assert (res.env["A"], res.env["PATH"], res.env["B"]) == ("1", "/usr/bin:/bin", "[x]")


def test_clearenv(site: Site) -> None:
    iid = site.add_image("clear", "ENV: IMG=1\n")
    res = site.shifter(f"--image=id:{iid}", "-E", "-e", "X=1", "env", env={"CALLER": "x"})
    assert res.returncode == 0, res.stderr
    assert res.env == {"SHIFTER_IMAGEREQUEST": f"id:{iid}", "SHIFTER_IMAGE": iid, "IMG": "1",
                       "X": "1"}


def test_env_file_errors(site: Site) -> None:
    iid = site.add_image("envfile")
    res = site.shifter(f"--image=id:{iid}", f"--env-file={site.base}/missing", "true")
    assert res.returncode == 1 and not res.helper_ran
    assert f"Failed to read env file {site.base}/missing: No such file or directory" in res.stderr
    bad = site.base / "bad.env"
    bad.write_text("GOOD=1\nno equals here\n")
    res = site.shifter(f"--image=id:{iid}", f"--env-file={bad}", "true")
    assert res.returncode == 1 and not res.helper_ran
    assert "Improperly formatted environment variable on line 2" in res.stderr


def test_environment_too_large(site: Site) -> None:
    iid = site.add_image("big")
    envfile = site.base / "big.env"
    envfile.write_text("".join(f"V{i}={'x' * 1000}\n" for i in range(4200)))
    res = site.shifter(f"--image=id:{iid}", f"--env-file={envfile}", "true")
    assert res.returncode == 1 and not res.helper_ran
    assert "too large" in res.stderr


def test_missing_helper_names_it(site: Site) -> None:
    iid = site.add_image("nohelper")
    res = site.shifter(f"--image=id:{iid}", "true", env={"SHIFTER_HELPER": "/nonexistent/h"})
    assert res.returncode == 1
    assert "/nonexistent/h" in res.stderr and "make install" in res.stderr


# -- image selection and ids (docs/behaviour.md, 'Runtime: image selection') -----------------------


def test_tag_from_the_index(site: Site) -> None:
    iid = site.add_image("busybox", tag="registry.test:5000/team/busybox:1.0")
    res = site.shifter("--image=docker:registry.test:5000/team/busybox:1.0", "true")
    assert res.returncode == 0, res.stderr
    assert res.option("--image-id") == [iid]
    assert res.option("--request") == ["docker:registry.test:5000/team/busybox:1.0"]
    assert res.env["SHIFTER_IMAGEREQUEST"] == "docker:registry.test:5000/team/busybox:1.0"
    assert res.env["SHIFTER_IMAGE"] == iid


def test_bare_tag_uses_default_type_and_latest(site: Site) -> None:
    iid = site.add_image("ubuntu-latest", tag="ubuntu:latest")
    res = site.shifter("--image=ubuntu", "true")
    assert res.returncode == 0, res.stderr
    assert res.option("--image-id") == [iid] and res.option("--request") == ["docker:ubuntu"]


def test_custom_type_index(site: Site) -> None:
    iid = site.add_image("custom")
    site.tag("mine:1", iid, itype="custom")
    res = site.shifter("-i", "custom:mine:1", "true")
    assert res.option("--image-id") == [iid], res.stderr


def test_index_entry_without_meta_is_not_used(site: Site) -> None:
    site.tag("gone:1", image_id("gone"))
    res = site.shifter("--image=docker:gone:1", "true", env={"PATH": "/nonexistent"})
    assert res.returncode == 1 and not res.helper_ran
    assert "FAILED to lookup docker image gone:1" in res.stderr
    assert "FAILED to find requested image." in res.stderr
    # ...and what to do about it, with the exact descriptor.
    assert res.stderr.endswith("shifter: pull it first: shifterimg pull docker:gone:1\n")


def test_index_entry_the_helper_would_refuse_is_not_used(site: Site) -> None:
    """An id with ".." (here with a .meta the front end could read) never reaches the
    helper: the front end applies the helper's id rule (it used to hand a..b over)."""
    (site.images / "a..b.meta").write_text("FORMAT: squashfs\n")
    site.tag("dots:1", "a..b")
    res = site.shifter("--verbose", "--image=docker:dots:1", "true", env={"PATH": "/nonexistent"})
    assert res.returncode == 1 and not res.helper_ran
    assert "ignoring the damaged tag index entry" in res.stderr
    assert "FAILED to lookup docker image dots:1" in res.stderr


def test_environment_selects_the_image(site: Site) -> None:
    a = site.add_image("a", tag="a:1")
    b = site.add_image("b", tag="b:1")
    c = site.add_image("c", tag="c:1")
    cases = [
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": "a:1"}, [], a),
        ({"SLURM_SPANK_SHIFTER_IMAGETYPE": "docker", "SLURM_SPANK_SHIFTER_IMAGE": "b:1"}, [], b),
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": "a:1", "SHIFTER": "docker:b:1"}, [], a),
        ({"SHIFTER_IMAGE": "a:1", "SHIFTER": "docker:b:1"}, [], b),  # half a pair is ignored
        ({"SHIFTER": "c:1"}, [], c),
        ({"SLURM_SPANK_SHIFTER": "docker:b:1"}, [], b),
        ({"SHIFTER": "docker:b:1"}, ["--image=docker:c:1"], c),
    ]
    for env, args, expect in cases:
        res = site.shifter(*args, "true", env=env)
        assert res.option("--image-id") == [expect], (env, args, res.stderr)


def test_slurm_resolved_id_keeps_the_original_request(site: Site) -> None:
    iid = site.add_image("slurm", tag="ubuntu:22.04")
    env = {"SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": iid, "SHIFTER_IMAGEREQUEST": "ubuntu:22.04"}
    res = site.shifter("true", env=env)
    assert res.returncode == 0, res.stderr
    assert res.env["SHIFTER_IMAGEREQUEST"] == "ubuntu:22.04" and res.env["SHIFTER_IMAGE"] == iid


def test_image_request_is_set_as_shifter_sets_it(site: Site) -> None:
    """``SHIFTER_IMAGEREQUEST``: the --image value as typed; else the caller's (the Slurm
    plugin's pinned request), else ``$SHIFTER``'s value; not set when only the
    SHIFTER_IMAGETYPE/SHIFTER_IMAGE pair chose the image (Shifter sets none then)."""
    iid = site.add_image("req", tag="req:1")
    cases = [
        ({}, [f"--image=id:{iid}"], f"id:{iid}"),
        ({}, ["--image=req:1"], "req:1"),
        ({"SHIFTER_IMAGEREQUEST": "old"}, ["--image=docker:req:1"], "docker:req:1"),
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": "req:1"}, [], None),
        ({"SHIFTER": "req:1"}, [], "req:1"),
        ({"SLURM_SPANK_SHIFTER_IMAGETYPE": "id", "SLURM_SPANK_SHIFTER_IMAGE": iid,
          "SLURM_SPANK_SHIFTER_IMAGEREQUEST": "req:1"}, [], "req:1"),
    ]
    for env, args, expect in cases:
        res = site.shifter(*args, "true", env=env)
        assert res.returncode == 0, res.stderr
        assert res.env.get("SHIFTER_IMAGEREQUEST") == expect, (env, args)


def test_bad_descriptors(site: Site) -> None:
    res = site.shifter("--image=docker:ub$untu", "true")
    assert res.returncode == 1 and "Invalid character '$'" in res.stderr
    res = site.shifter("--image=id:abc", "true")
    assert res.returncode == 1 and "64 lowercase hexadecimal" in res.stderr
    site.write_conf(defaultImageType="")
    res = site.shifter("--image=ubuntu", "true")
    assert res.returncode == 1 and "FAILED to determine image type" in res.stderr


def test_missing_meta(site: Site) -> None:
    res = site.shifter("--image=id:" + image_id("nothing"), "true")
    assert res.returncode == 1 and not res.helper_ran
    assert res.stderr == "FAILED to find requested image.\n"


def test_unknown_tag_without_a_shifterimg(site: Site) -> None:
    res = site.shifter("--image=docker:nosuch:1", "true", env={"PATH": "/nonexistent"})
    assert res.returncode == 1 and not res.helper_ran
    assert "no shifterimg found" in res.stderr
    assert res.stderr.endswith("FAILED to lookup docker image nosuch:1\n"
                               "FAILED to find requested image.\n"
                               "shifter: pull it first: shifterimg pull docker:nosuch:1\n")


def test_unknown_tag_with_an_unreachable_gateway(site: Site, munged) -> None:
    # The real shifterimg (the venv's, on PATH) with no gateway that answers.
    site.write_conf(imageGateway="http://127.0.0.1:9", gatewayTimeout="2")
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "MUNGE_SOCKET": str(munged.socket)}
    res = site.shifter("--image=docker:nosuch:1", "true", env=env)
    assert res.returncode == 1 and not res.helper_ran
    # Shifter's line, then which URL and why (shifterimg's words reach the user).
    assert "ERROR: failed to contact the image gateway.\n" in res.stderr
    assert "shifterimg: error: http://127.0.0.1:9: Connection refused\n" in res.stderr
    assert res.stderr.endswith("FAILED to find requested image.\n"
                               "shifter: pull it first: shifterimg pull docker:nosuch:1\n")


class _LookupGateway(BaseHTTPRequestHandler):
    ids: dict[str, str] = {}
    seen: list[tuple[str, bool]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append((self.path, bool(self.headers.get("authentication"))))
        m = re.fullmatch(r"/api/lookup/testsys/(\w+)/(.+)/", self.path)
        key = f"{m.group(1)}:{m.group(2)}" if m else ""
        if key in self.ids:
            status, body = 200, {"id": self.ids[key], "status": "READY"}
        else:
            status, body = 404, {"message": "image not found"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lookup_gateway() -> Iterator[type[_LookupGateway]]:
    handler = type("Handler", (_LookupGateway,), {"ids": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


def test_tag_not_in_the_index_is_looked_up_with_shifterimg(site, lookup_gateway, munged):
    iid = site.add_image("from-gateway")  # transferred, but the index has no entry yet
    lookup_gateway.ids["docker:team/app:2"] = iid
    site.write_conf(imageGateway=lookup_gateway.url, gatewayTimeout="5")
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "MUNGE_SOCKET": str(munged.socket)}
    res = site.shifter("--image=docker:team/app:2", "-v", "true", env=env)
    assert res.returncode == 0, res.stderr
    assert res.option("--image-id") == [iid]
    assert lookup_gateway.seen == [("/api/lookup/testsys/docker/team/app:2/", True)]
    assert f"docker:team/app:2 is {iid} (image gateway)" in res.stderr
    # Not found at the gateway either: exit 1 with Shifter's words.
    res = site.shifter("--image=docker:team/other:1", "true", env=env)
    assert res.returncode == 1 and not res.helper_ran
    # shifterimg's own "not available" line is not repeated: shifter says the next step.
    assert res.stderr == ("FAILED to lookup docker image team/other:1\n"
                          "FAILED to find requested image.\n"
                          "shifter: pull it first: shifterimg pull docker:team/other:1\n")


def test_image_acl(site: Site) -> None:
    denied = site.add_image("private", "USERACL: 4242\nGROUPACL: 4343\n")
    res = site.shifter(f"--image=id:{denied}", "true")
    assert res.returncode == 1 and not res.helper_ran
    assert res.stderr == "FAILED permission denied to image\n"
    # A supplementary group of the caller is enough.
    res = site.shifter(f"--image=id:{denied}", "true", user=(0, 0, [4343]))
    assert res.returncode == 0 and res.helper_ran, res.stderr


def test_local_images(site: Site) -> None:
    res = site.shifter("--image=local:/srv/root", "true")
    assert res.returncode == 1 and "allowLocalChroot" in res.stderr
    site.write_conf(allowLocalChroot="1")
    res = site.shifter("--image=local:/srv/root", "true")
    assert res.returncode == 0, res.stderr
    assert res.argv[1:4] == ["run", "--local", "/srv/root"]
    assert "--image-id" not in res.argv
    assert res.env["SHIFTER_IMAGE"] == "/srv/root"


# -- volumes, modules, command, workdir -----------------------------------------------------


def test_volumes(site: Site) -> None:
    iid = site.add_image("vols")
    env = {"SHIFTER_VOLUME": "/env:/e"}
    res = site.shifter(f"--image=id:{iid}", "true", env=env)
    assert res.option("--volume") == ["/env:/e"], res.stderr
    res = site.shifter(f"--image=id:{iid}", "-V", "/a:/b;/c:/d:ro", "--volume=/e:/f", "true",
                       env=env)
    assert res.option("--volume") == ["/a:/b;/c:/d:ro", "/e:/f"], res.stderr
    res = site.shifter(f"--image=id:{iid}", "true", env={"SLURM_SPANK_SHIFTER_VOLUME": "/s:/t"})
    assert res.option("--volume") == ["/s:/t"]
    res = site.shifter(f"--image=id:{iid}", "-V", "/a:/etc/x", "true")
    assert res.returncode == 1 and not res.helper_ran
    assert "Invalid mount request, permission denied! Cannot mount from /a to /etc/x" in res.stderr
    res = site.shifter(f"--image=id:{iid}", "-V", "/a:/b:rec", "true")
    assert res.returncode == 1 and "site volumes only" in res.stderr


def test_modules(site: Site) -> None:
    site.write_conf(
        defaultModules="one",
        module_one_siteEnv="ONE=1",
        module_two_siteEnv="TWO=1",
        module_two_conflict="three",
        module_three_siteEnv="THREE=1",
        module_off_enabled="0",
    )
    iid = site.add_image("mods")
    assert site.shifter(f"--image=id:{iid}", "true").option("--modules") == ["one"]
    assert site.shifter(f"--image=id:{iid}", "-m", "none", "true").option("--modules") == ["none"]
    res = site.shifter(f"--image=id:{iid}", "--module=two,one", "true")
    assert res.option("--modules") == ["two,one"] and "ONE" in res.env and "TWO" in res.env
    res = site.shifter(f"--image=id:{iid}", "true", env={"SHIFTER_MODULE": "three"})
    assert res.option("--modules") == ["three"]
    res = site.shifter(f"--image=id:{iid}", "--module=nosuch", "true")
    assert res.returncode == 1 and res.stderr == "Unknown shifter module: nosuch\n"
    res = site.shifter(f"--image=id:{iid}", "--module=off", "true")
    assert res.returncode == 1 and res.stderr == "Unknown shifter module: off\n"
    res = site.shifter(f"--image=id:{iid}", "--module=two,three", "true")
    assert res.returncode == 1
    assert res.stderr == "ERROR: cannot load conflicting modules three and two\n"


def test_modules_from_the_environment_without_default_modules(site: Site) -> None:
    """With no defaultModules the front end skips the module rules unless a request came:
    both environment variables must still count."""
    site.write_conf(module_two_siteEnv="TWO=1")
    iid = site.add_image("envmods")
    assert site.shifter(f"--image=id:{iid}", "true").option("--modules") == ["none"]
    for name in ("SHIFTER_MODULE", "SLURM_SPANK_SHIFTER_MODULE"):
        res = site.shifter(f"--image=id:{iid}", "true", env={name: "two"})
        assert res.option("--modules") == ["two"] and res.env.get("TWO") == "1", name
        res = site.shifter(f"--image=id:{iid}", "true", env={name: "nosuch"})
        assert res.returncode == 1 and res.stderr == "Unknown shifter module: nosuch\n", name


def test_command_entrypoint_and_workdir(site: Site) -> None:
    iid = site.add_image(
        "entry", 'ENTRY: ["/bin/entry", "-x"]\nCMD: ["default"]\nWORKDIR: /opt/app\n'
    )
    plain = site.add_image("plain-cmd")
    cases = [
        ([], {"SHELL": "/bin/zsh"}, ["/bin/zsh"]),
        ([], {}, ["/bin/sh"]),
        (["--entrypoint"], {}, ["/bin/entry", "-x", "default"]),
        (["--entrypoint", "given"], {}, ["/bin/entry", "-x", "given"]),
        (["--entrypoint=/other", "a"], {}, ["/other", "a"]),
        (["cmd", "arg"], {}, ["cmd", "arg"]),
    ]
    for args, env, expect in cases:
        res = site.shifter(f"--image=id:{iid}", *args, env=env)
        assert res.command == expect, (args, res.stderr)
    res = site.shifter(f"--image=id:{plain}", "--entrypoint")
    assert res.returncode == 1 and res.stderr == "Image does not have a defined entrypoint.\n"

    assert site.shifter(f"--image=id:{iid}", "pwd", cwd="/tmp").option("--workdir") == ["/tmp"]
    assert site.shifter(f"--image=id:{iid}", "--workdir", "pwd").option("--workdir") == [
        "/opt/app"
    ]
    assert site.shifter(f"--image=id:{iid}", "-w", "/x", "pwd").option("--workdir") == ["/x"]
    assert site.shifter(f"--image=id:{iid}", "--workdir=rel", "pwd").option("--workdir") == [
        "/rel"
    ]
    res = site.shifter(f"--image=id:{plain}", "--workdir", "pwd")
    assert res.returncode == 1
    assert res.stderr == "No workdir specified on command line or in image definition.\n"


def test_verbose_passes_on(site: Site) -> None:
    iid = site.add_image("verbose", tag="v:1")
    res = site.shifter("--image=v:1", "-v", "true")
    assert res.argv[res.argv.index("--") - 1] == "--verbose"
    assert f"docker:v:1 is {iid} (tag index)" in res.stderr
    assert "shifter: exec " in res.stderr


def test_as_an_unprivileged_user(test_users: dict[str, tuple[int, int]]) -> None:
    """The path people take: their own uid and groups, the ACL checked against them."""
    uid, gid = test_users[ALICE]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        site = Site(base)
        iid = site.add_image("alice-only", f"USERACL: {uid}\n")
        work = base / "work"
        work.mkdir()
        os.chown(work, uid, gid)
        site.out = work / "dump"
        user = (uid, gid, os.getgrouplist(ALICE, gid))
        res = site.shifter(f"--image=id:{iid}", "id", cwd=work, user=user,
                           env={"HOME": str(work), "USER": ALICE})
        assert res.returncode == 0, res.stderr
        assert res.argv[1:4] == ["run", "--image-id", iid]
        assert res.option("--workdir") == [str(work)] and res.env["USER"] == ALICE
        denied = site.add_image("bob-only", f"USERACL: {uid + 1}\n")
        res = site.shifter(f"--image=id:{denied}", "id", cwd=work, user=user)
        assert (res.returncode, res.stderr) == (1, "FAILED permission denied to image\n")


# -- setupRoot / unsetupRoot (docs/behaviour.md, 'Runtime: setupRoot and unsetupRoot') -------------


def test_setup_root_argv(site: Site) -> None:
    iid = site.add_image("job")
    res = site.run("setupRoot", "-U", "1001", "-G", "1002", "-u", "someone",
                   "-N", "nid1/2 nid2/1", "-v", "/a:/b", "-v", "/c:/d:ro",
                   "-s", "ssh-ed25519 AAAA key", "id", iid)
    assert res.returncode == 0, res.stderr
    assert res.argv == [
        str(site.setup), "setup", "--user", "someone", "--uid", "1001", "--gid", "1002",
        "--image-id", iid, "--volume", "/a:/b", "--volume", "/c:/d:ro", "--modules", "none",
        "--nodes", "nid1/2 nid2/1", "--ssh-pubkey", "ssh-ed25519 AAAA key",
    ]
    assert res.helper_pid == res.spawned_pid


def test_setup_root_image_forms_and_modules(site: Site) -> None:
    site.write_conf(defaultModules="mpich", module_mpich_siteEnv="M=1", module_x_siteEnv="X=1")
    iid = site.add_image("job2", tag="ubuntu:22.04")
    for image in (["docker", "ubuntu:22.04"], ["docker:ubuntu:22.04"], ["ubuntu:22.04"]):
        res = site.run("setupRoot", *image, "-U", "1001", "-G", "1001", "-u", "someone")
        assert res.returncode == 0, (image, res.stderr)
        assert res.option("--image-id") == [iid] and res.option("--modules") == ["mpich"]
    res = site.run("setupRoot", "-U", "1001", "-G", "1001", "-u", "u", "-m", "x", "id", iid)
    assert res.option("--modules") == ["x"] and res.option("--nodes") == []


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        (["-U", "1001", "-u", "u", "id", "IID"], "-U uid and -G gid are required", 1),
        (["-U", "0", "-G", "0", "-u", "u", "id", "IID"], "attempted to run as root.\n"
         "setupRoot: containers never run as root: give the job owner's -U and -G\n", 1),
        (["-U", "abc", "-G", "1", "id", "IID"], "-U needs a numeric id, not 'abc'", 1),
        (["-U", "1001", "-G", "1001", "-u", "u", "-N", "bad", "id", "IID"],
         "Invalid node list entry 'bad'", 1),
        # what the user asked for: 2, so that the Slurm prolog fails the job, not the node
        (["-U", "1001", "-G", "1001", "-u", "u", "-v", "/a:/etc", "id", "IID"],
         "Invalid mount request", 2),
        (["-U", "1001", "-G", "1001", "-u", "u", "-m", "nosuch", "id", "IID"],
         "Unknown shifter module: nosuch", 2),
        (["-U", "1001", "-G", "1001", "-u", "u", "id", "0" * 64], "FAILED to find requested", 2),
        (["-U", "1001", "-G", "1001", "-u", "u", "id", "a/b"], "Invalid character", 2),
        (["-U", "1001", "-G", "1001", "-u", "u"], "expected the image as <type> <identifier>", 1),
        (["-U", "1001", "-G", "1001", "-u", "u", "a", "b", "c"], "expected the image", 1),
    ],
)
def test_setup_root_errors(site: Site, args: list[str], message: str, status: int) -> None:
    iid = site.add_image("err")
    res = site.run("setupRoot", *[iid if a == "IID" else a for a in args])
    assert res.returncode == status and not res.helper_ran, res.stderr
    assert message in res.stderr


def test_setup_root_acl_uses_the_target_user(site: Site) -> None:
    iid = site.add_image("acl", "USERACL: 1001\n")
    res = site.run("setupRoot", "-U", "1001", "-G", "1001", "-u", "someone", "id", iid)
    assert res.returncode == 0, res.stderr
    res = site.run("setupRoot", "-U", "1002", "-G", "1002", "-u", "someone", "id", iid)
    assert (res.returncode, res.stderr) == (2, "FAILED permission denied to image\n")


def test_unsetup_root_argv(site: Site) -> None:
    res = site.run("unsetupRoot")
    assert res.returncode == 0, res.stderr
    assert res.argv == [str(site.setup), "unsetup"]
    res = site.run("unsetupRoot", "extra")
    assert res.returncode == 1 and "unexpected argument 'extra'" in res.stderr


def test_root_tools_refuse_other_users(test_users: dict[str, tuple[int, int]]) -> None:
    uid, gid = test_users[ALICE]
    for fn, name in (("main", "setupRoot"), ("main_unsetup", "unsetupRoot")):
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                f"from shifter.setuproot import {fn}; sys.exit({fn}())")
        args = ["-U", "1001", "-G", "1001", "id", "0" * 64] if name == "setupRoot" else []
        proc = subprocess.run([PYTHON, "-I", "-S", "-c", code, *args], capture_output=True,
                              text=True, user=uid, group=gid, extra_groups=[], cwd="/",
                              env={"PATH": "/usr/bin:/bin", "SHIFTER_HELPER": "/bin/true"})
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == f"{name}: must be run as root\n"


# -- the launch path stays light ------------------------------------------------------------

HEAVY = ("requests", "imagegw", "json", "re", "urllib", "subprocess", "argparse", "getopt",
         "dataclasses", "inspect", "enum", "typing", "pathlib", "signal", "shutil", "tempfile",
         "locale", "gettext", "collections", "functools", "os", "stat", "shifter.shifterimg")
ALLOWED = {"shifter", "__future__", "shifter.frontend", "shifter.launch", "udiroot"}


def _imported(stderr: str) -> set[str]:
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def test_launch_imports_nothing_heavy(site: Site) -> None:
    """Beyond what ``python3 -I -S -c pass`` loads, only our own modules (+ __future__)."""
    bare = subprocess.run([PYTHON, "-I", "-S", "-X", "importtime", "-c", "pass"],
                          capture_output=True, text=True, check=True)
    baseline = _imported(bare.stderr)
    site.add_image("light", 'ENV: A=1\nENTRY: ["/e"]\n', tag="light:1")
    launcher = [PYTHON, "-I", "-S", "-X", "importtime", str(site.launchers["shifter"])]
    version = site.shifter("--version", launcher=launcher)
    assert version.returncode == 0
    full = site.shifter("--image=light:1", "-V", "/a:/b", "-e", "X=1", "--entrypoint",
                        launcher=launcher)
    assert full.returncode == 0 and full.helper_ran
    for res in (version, full):
        extra = _imported(res.stderr) - baseline
        assert "shifter.launch" in extra
        heavy = sorted(n for n in extra if n in HEAVY or n.split(".")[0] in HEAVY)
        assert heavy == [], heavy
        assert sorted(n for n in extra if n not in ALLOWED and not n.startswith("udiroot.")) == []
    # --version does not even read the rules.
    assert not [n for n in _imported(version.stderr) if n.startswith("udiroot")]
    assert {"udiroot.config", "udiroot.meta", "udiroot.volumes"} <= _imported(full.stderr)
    # A plain launch (no volume, no module asked for or configured) reads neither rule set.
    plain = site.shifter("--image=light:1", "true", launcher=launcher)
    assert plain.returncode == 0 and plain.helper_ran, plain.stderr
    assert not {"udiroot.volumes", "udiroot.modules"} & _imported(plain.stderr)


def test_shifter_module_is_runnable_with_python_m(site: Site) -> None:
    launcher = [sys.executable, "-X", "importtime", "-m", "shifter.launch"]
    res = site.shifter("--version", launcher=launcher, cwd=REPO)
    assert (res.returncode, res.stdout) == (0, f"shifter {__version__}\n"), res.stderr
    imported = _imported(res.stderr)
    assert "shifter.frontend" in imported  # (shifter.launch itself runs as __main__)
    for name in ("requests", "imagegw", "json", "subprocess", "argparse", "shifter.shifterimg"):
        assert name not in imported


def test_main_returns_instead_of_exiting(site: Site, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from shifter.launch import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"shifter {__version__}\n"
    monkeypatch.setenv("SHIFTER_UDIROOT_CONF", str(site.base / "missing.conf"))
    assert main(["--image=id:" + image_id("x"), "true"]) == 1
    assert "FAILED to parse udiRoot configuration." in capsys.readouterr().err
