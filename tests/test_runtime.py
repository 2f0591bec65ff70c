"""The runtime end to end: ``shifter`` (Python front end) + the setuid helper, run as an
unprivileged user the way users run it (docs/behaviour.md, 'Runtime: building the container',
'Scenarios the tests cover', end to end).

Every test runs real commands inside real containers: loop-mounted squashfs, tmpfs root,
bind mounts, a private mount namespace. Checks are what a user would look at: output,
exit status, files on the host, and what is left mounted afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from world.runtime import RuntimeSite, busybox_tree, mksquashfs, reachable_temp_dir

ALICE = "shifter-alice"
BOB = "shifter-bob"
TEAM = "shifter-team"


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    # Alice is also in a supplementary group, to see groups carried into the container.
    if subprocess.run(["getent", "group", TEAM], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", TEAM], check=True)
    subprocess.run(["usermod", "-a", "-G", TEAM, ALICE], check=True)
    base = reachable_temp_dir(tmp_path_factory, "runtime")
    site = RuntimeSite.create(base / "site")
    yield site
    site.assert_nothing_left()


@pytest.fixture(scope="module")
def image(site, tmp_path_factory) -> str:
    tree = busybox_tree(tmp_path_factory.mktemp("tree") / "root")
    sqfs = mksquashfs(tree, tmp_path_factory.mktemp("sqfs") / "busybox.squashfs")
    return site.add_image(sqfs, 'ENV: ["IMAGEVAR=from-image", "PATH=/usr/bin:/bin"]\n'
                                'ENTRY: ["/bin/echo", "entry"]\nCMD: ["default-arg"]\n'
                                "WORKDIR: /opt/app\n")


@pytest.fixture(autouse=True)
def clean_conf(site):
    site.write_conf()
    yield
    site.write_conf()
    site.assert_nothing_left()


def user_dir(site: RuntimeSite, user: str, name: str, mode: int = 0o755) -> Path:
    path = site.base / f"{user}-{name}"
    path.mkdir(exist_ok=True)
    uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)
    gid = int(subprocess.run(["id", "-g", user], capture_output=True, text=True).stdout)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


# -- the main job --------------------------------------------------------------------------


def test_runs_a_command_in_the_image_as_the_user(site, image):
    res = site.shifter(ALICE, f"--image=id:{image}", "cat", "/etc/os-release")
    assert res.returncode == 0, res.stderr
    assert 'PRETTY_NAME="Shifter test image"' in res.stdout
    res = site.shifter(ALICE, f"--image=id:{image}", "id")
    uid = subprocess.run(["id", "-u", ALICE], capture_output=True, text=True).stdout.strip()
    assert res.returncode == 0, res.stderr
    assert f"uid={uid}({ALICE})" in res.stdout and TEAM in res.stdout


def test_tag_resolved_from_the_gateway_index_without_a_gateway(site, image):
    site.tag("registry.test:5000/team/busybox:1.0", image)
    res = site.shifter(ALICE, "--image=docker:registry.test:5000/team/busybox:1.0",
                       "sh", "-c", "echo $SHIFTER_IMAGE $SHIFTER_IMAGEREQUEST")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [image, "docker:registry.test:5000/team/busybox:1.0"]


def test_unknown_image_is_a_clear_error(site):
    res = site.shifter(ALICE, "--image=id:" + "0" * 64, "true")
    assert res.returncode == 1
    assert "FAILED to find requested image." in res.stderr
    res = site.shifter(ALICE, "true")
    assert res.returncode == 1 and "No image specified" in res.stderr


def test_exit_status_and_exec_failure(site, image):
    assert site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", "exit 7").returncode == 7
    res = site.shifter(ALICE, f"--image=id:{image}", "no-such-command")
    assert res.returncode == 127
    assert "no-such-command:" in res.stderr


def test_container_etc_and_identity_files(site, image):
    script = ("cat /etc/passwd; echo ---; cat /etc/group; echo ---; readlink /etc/mtab; "
              "cat /etc/site-only.conf /etc/image-only.conf")
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    passwd, group, rest = res.stdout.split("---\n")
    host_line = next(line for line in Path("/etc/passwd").read_text().splitlines()
                     if line.startswith(ALICE + ":"))
    assert host_line in passwd.splitlines()
    assert "imageuser" not in passwd  # the site's passwd wins over the image's
    team = next(line for line in group.splitlines() if line.startswith(TEAM + ":"))
    assert team.split(":")[3] == ALICE  # only the user is listed as a member
    assert not any(line.split(":")[2] == "0" for line in group.splitlines() if line)
    assert rest.splitlines() == ["/proc/mounts", "from the site", "from the image"]


def test_populate_etc_dynamically(site, image):
    """populateEtcDynamically: passwd holds the user and usersToImport, group the user's
    groups (the user listed), nsswitch.conf files-only; nothing else of etcPath."""
    site.write_conf(populateEtcDynamically="1", usersToImport="shifter-bob nosuchuser",
                    maxGroupCount="1")
    try:
        res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c",
                           "cat /etc/passwd; echo ---; cat /etc/group; echo ---; "
                           "head -1 /etc/nsswitch.conf; ls /etc/site-only.conf")
    finally:
        site.write_conf()
    assert res.returncode != 0 and "site-only.conf" in res.stderr  # not copied
    passwd, group, nss = res.stdout.split("---\n")
    assert [line.split(":")[0] for line in passwd.splitlines()] == [ALICE, "shifter-bob"]
    names = {line.split(":")[0]: line.split(":")[3] for line in group.splitlines()}
    assert ALICE in names and TEAM in names
    assert sorted(names.values()).count(ALICE) == 1  # maxGroupCount=1
    assert nss == "passwd: files\n"


def test_front_end_etc_files_are_the_callers_own(site, image):
    """Attack: the /etc files are the caller's to give (--etc-fd). Only passwd, group and
    nsswitch.conf are taken, and the root hooks, run before they are written, see the
    site's passwd."""
    from world.runtime import HELPER

    hook = site.base / "etc-roothook.sh"
    hook.write_text("grep -c '^evil:' etc/passwd > etc/hook-saw || true\n")
    os.chmod(hook, 0o755)
    site.write_conf(module_peek_roothook=str(hook))

    def run_with(records: bytes) -> subprocess.CompletedProcess:
        fd = os.memfd_create("etc", 0)
        os.write(fd, records)
        try:
            return subprocess.run(
                [str(HELPER), "run", "--image-id", image, "--modules", "peek", "--etc-fd",
                 str(fd), "--", "/bin/sh", "-c", "cat /etc/hook-saw; grep -c evil /etc/passwd"],
                pass_fds=(fd,), capture_output=True, text=True, env=site.user_env(ALICE),
                **site.spawn_kwargs(ALICE), timeout=60)
        finally:
            os.close(fd)

    try:
        res = run_with(b"shadow=root::0:0:::::\0")
        assert res.returncode == 1 and "shadow is not a file the front end writes" in res.stderr
        res = run_with(b"../x=1\0")
        assert res.returncode == 1 and "not a file the front end writes" in res.stderr
        res = run_with(b"passwd=evil:x:0:0::/:/bin/sh\n\0")
        assert (res.returncode, res.stdout.split()) == (0, ["0", "1"]), res.stderr
    finally:
        site.write_conf()
    site.assert_nothing_left()


def test_confinement_inside_the_container(site, image):
    script = ("grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Uid|Gid|Groups):' "
              "/proc/self/status; touch /newfile && echo ROOT-WRITABLE; true")
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    status = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap].strip(), 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    uid = subprocess.run(["id", "-u", ALICE], capture_output=True, text=True).stdout.strip()
    assert status["Uid"].split() == [uid] * 4
    assert "ROOT-WRITABLE" not in res.stdout


# -- environment, command, workdir -------------------------------------------------------


def test_environment_layers(site, image, tmp_path):
    site.write_conf(siteEnv="SITEVAR=site", siteEnvAppend="PATH=/opt/udiImage/bin",
                    siteEnvPrepend="PATH=/sbin")
    envfile = site.base / "alice.env"
    envfile.write_text("# comment\n\nFROMFILE=file\nIMAGEVAR=from-file\n")
    os.chmod(envfile, 0o644)
    res = site.shifter(ALICE, f"--image=id:{image}", f"--env-file={envfile}",
                       "-e", "CLI=cli", "env", env={"CALLER": "caller", "LD_PRELOAD": "x.so"})
    assert res.returncode == 0, res.stderr
    env = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert env["CALLER"] == "caller" and "LD_PRELOAD" not in env
    assert env["IMAGEVAR"] == "from-file" and env["FROMFILE"] == "file" and env["CLI"] == "cli"
    assert env["SITEVAR"] == "site"
    assert env["PATH"] == "/sbin:/usr/bin:/bin:/opt/udiImage/bin"
    res = site.shifter(ALICE, f"--image=id:{image}", "-E", "env", env={"CALLER": "caller"})
    assert "CALLER" not in res.stdout and f"SHIFTER_IMAGE={image}" in res.stdout



def test_shifter_site_file_with_nodecontextprefix_runs(site, image):
    """Shifter's test configs keep a blank ``nodeContextPrefix=`` (defunct there): a site
    file copied from them must launch, through the front end and the setuid helper, with
    no warning."""
    for value in ("", "/var/nodecontext"):
        site.write_conf(nodeContextPrefix=value)
        res = site.shifter(ALICE, f"--image=id:{image}", "true")
        assert (res.returncode, res.stderr) == (0, ""), res


def _container_environ(stdout: str) -> dict[str, str]:
    """``cat /proc/self/environ`` output as a dict (NUL records: values may hold anything)."""
    records = stdout.split("\0")
    assert records[-1] == "", stdout[-80:]
    return dict(record.split("=", 1) for record in records[:-1])


def test_whole_environment_under_env_i_is_exactly_the_layers(site, image, tmp_path):
    """Under ``env -i`` the front end's Python runs in the C locale and coerces it
    (``LC_CTYPE=C.UTF-8`` in its own environment): the container must see only the
    caller's variables (``LD_*`` gone), ``SHIFTER_IMAGEREQUEST`` as requested,
    ``SHIFTER_IMAGE``, the image's ENV, ``--env``, the site's layer. Nothing else."""
    site.tag("registry.test:5000/team/envi:1.0", image)
    site.write_conf(siteEnv="SITEVAR=site", siteEnvAppend="PATH=/opt/udiImage/bin")
    plumbing = {"SHIFTER_HELPER": str(site.user_env(ALICE)["SHIFTER_HELPER"]),
                "SHIFTER_UDIROOT_CONF": site.user_env(ALICE)["SHIFTER_UDIROOT_CONF"]}
    cases = [
        ({}, [f"--image=id:{image}"], {"SHIFTER_IMAGEREQUEST": f"id:{image}"}),
        ({"HOME": "/home/x", "TERM": "dumb", "ODD": "a b=c\tz", "LD_LIBRARY_PATH": "/nowhere",
          "SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": image}, ["-e", "CLI=1"], {"CLI": "1"}),
        ({"LANG": "C"}, ["--image=registry.test:5000/team/envi:1.0"],
         {"SHIFTER_IMAGEREQUEST": "registry.test:5000/team/envi:1.0"}),
        # The user's own LC_CTYPE=C, which Python's start-up would overwrite with C.UTF-8.
        ({"LC_CTYPE": "C", "SHIFTER": "docker:registry.test:5000/team/envi:1.0"}, [],
         {"SHIFTER_IMAGEREQUEST": "docker:registry.test:5000/team/envi:1.0"}),
    ]
    for given, args, added in cases:
        caller = {**plumbing, **given}
        res = site.run(ALICE, ["env", "-i", *(f"{k}={v}" for k, v in caller.items()),
                               str(site.launcher), *args, "cat", "/proc/self/environ"])
        assert res.returncode == 0, res.stderr
        expected = {k: v for k, v in caller.items() if not k.startswith("LD_")}
        expected.update({"SHIFTER_IMAGE": image, "IMAGEVAR": "from-image",
                         "PATH": "/usr/bin:/bin:/opt/udiImage/bin", "SITEVAR": "site", **added})
        assert _container_environ(res.stdout) == expected, (given, args)

def test_entrypoint_and_workdir(site, image):
    res = site.shifter(ALICE, f"--image=id:{image}", "--entrypoint")
    assert (res.returncode, res.stdout) == (0, "entry default-arg\n"), res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "--entrypoint", "given")
    assert res.stdout == "entry given\n", res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "--workdir", "pwd")
    assert res.stdout == "/opt/app\n", res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "--workdir=/var/lib/app", "pwd")
    assert res.stdout == "/var/lib/app\n", res.stderr
    # The caller's cwd is not in the container: a clear note, and the command still runs.
    # (/tmp is bound into every container; /usr/share is not in this image.)
    res = site.shifter(ALICE, f"--image=id:{image}", "pwd", cwd="/usr/share/doc")
    assert (res.returncode, res.stdout) == (0, "/\n"), res.stderr
    assert "Failed to switch to working dir: /usr/share/doc, staying in /" in res.stderr


# -- streams, terminals and signals ------------------------------------------------------


def test_stdin_passes_through(site, image):
    res = site.shifter(ALICE, f"--image=id:{image}", "tr", "a-z", "A-Z", input="hello\n")
    assert (res.returncode, res.stdout) == (0, "HELLO\n"), res.stderr


def test_terminal_passes_through(site, image):
    pid, fd = pty.fork()
    if pid == 0:  # child: become alice on the pty, exec the launcher
        kw = site.spawn_kwargs(ALICE)
        os.setgroups(kw["extra_groups"])
        os.setgid(kw["group"])
        os.setuid(kw["user"])
        os.chdir(site.base)
        os.execve(str(site.launcher), [str(site.launcher), f"--image=id:{image}", "sh", "-c",
                  "test -t 0 && test -t 1 && echo IS-A-TTY"], site.user_env(ALICE))
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"IS-A-TTY" in out


def test_signals_reach_the_command(site, image):
    proc = subprocess.Popen(
        [str(site.launcher), f"--image=id:{image}", "sh", "-c",
         "trap 'echo GOT-TERM; exit 3' TERM; echo READY; while true; do sleep 0.1; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=site.base,
        env=site.user_env(ALICE), **site.spawn_kwargs(ALICE),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "READY\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 3 and "GOT-TERM" in out, err


# -- volumes and perNodeCache ------------------------------------------------------------


def test_user_volume_read_write_and_read_only(site, image):
    data = user_dir(site, ALICE, "data")
    res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={data}:/data",
                       "sh", "-c", "echo inside > /data/out && cat /data/out")
    assert res.returncode == 0, res.stderr
    out = data / "out"
    assert out.read_text() == "inside\n"
    assert out.stat().st_uid == int(subprocess.run(["id", "-u", ALICE], capture_output=True,
                                                   text=True).stdout)
    res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={data}:/data:ro",
                       "sh", "-c", "cat /data/out; echo again > /data/out")
    assert res.returncode != 0 and res.stdout == "inside\n"
    assert out.read_text() == "inside\n"


def test_volume_target_missing_in_image_is_created(site, image):
    data = user_dir(site, ALICE, "data2")
    (data / "f").write_text("x")
    res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={data}:/new/deep/dir",
                       "cat", "/new/deep/dir/f")
    assert (res.returncode, res.stdout) == (0, "x"), res.stderr


def test_volumes_from_the_environment_replaced_by_the_command_line(site, image):
    one, two = user_dir(site, ALICE, "one"), user_dir(site, ALICE, "two")
    (one / "which").write_text("one")
    (two / "which").write_text("two")
    env = {"SHIFTER_VOLUME": f"{one}:/v"}
    res = site.shifter(ALICE, f"--image=id:{image}", "cat", "/v/which", env=env)
    assert res.stdout == "one", res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", f"-V={two}:/v", "cat", "/v/which", env=env)
    assert res.stdout == "two", res.stderr


def test_per_node_cache_is_a_private_xfs_that_vanishes(site, image):
    res = site.shifter(ALICE, f"--image=id:{image}", "--volume=/tmp:/cache:perNodeCache=size=512M",
                       "sh", "-c", "grep ' /cache ' /proc/mounts; echo hi > /cache/f && "
                       "cat /cache/f && stat -c %U /cache")
    assert res.returncode == 0, res.stderr
    mount_line, hi, owner = res.stdout.splitlines()
    assert " xfs " in mount_line and "nosuid" in mount_line and "nodev" in mount_line
    assert (hi, owner) == ("hi", ALICE)
    assert list(site.cache_dir.iterdir()) == []  # the backing file never has a name


def test_per_node_cache_limits(site, image):
    res = site.shifter(ALICE, f"--image=id:{image}", "--volume=/tmp:/cache:perNodeCache=size=3G",
                       "true")
    assert res.returncode == 1 and "perNodeCache" in res.stderr
    site.write_conf(perNodeCachePath=None)
    res = site.shifter(ALICE, f"--image=id:{image}",
                       "--volume=/tmp:/cache:perNodeCache=size=512M", "true")
    assert res.returncode == 1 and "perNodeCache" in res.stderr


# -- site filesystems and modules --------------------------------------------------------


def test_site_fs_and_modules(site, image, tmp_path):
    sitefs = site.base / "sitefs"
    sitefs.mkdir(exist_ok=True)
    os.chmod(sitefs, 0o755)
    (sitefs / "marker").write_text("site fs\n")
    mod = site.base / "modcopy"
    mod.mkdir(exist_ok=True)
    (mod / "tool").write_text("module tool\n")
    hook = site.base / "userhook.sh"
    hook.write_text("echo userhook ran as $(id -un) >&2\n")
    os.chmod(hook, 0o755)
    site.write_conf(
        siteFs=f"{sitefs}:/site",
        module_demo_siteEnv="DEMO=1",
        module_demo_copyPath=str(mod),
        module_demo_userhook="/opt/udiImage/modules/demo/hook.sh",
        module_other_siteEnv="OTHER=1",
        module_other_conflict="demo",
        defaultModules="demo",
    )
    (mod / "hook.sh").write_text(hook.read_text())
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c",
                       "cat /site/marker /opt/udiImage/modules/demo/tool; echo DEMO=$DEMO")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "site fs\nmodule tool\nDEMO=1\n"
    assert f"userhook ran as {ALICE}" in res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=none", "sh", "-c",
                       "echo DEMO=$DEMO; ls /opt/udiImage/modules")
    assert res.stdout == "DEMO=\n", res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=demo,other", "true")
    assert res.returncode == 1
    assert "cannot load conflicting modules" in res.stderr
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=nosuch", "true")
    assert res.returncode == 1 and "Unknown shifter module: nosuch" in res.stderr


EXAMPLE_CONF = Path(__file__).resolve().parent.parent / "etc" / "udiRoot.conf.example"


def example_conf_for(site: RuntimeSite) -> str:
    """etc/udiRoot.conf.example with only what is site-specific pointed at the test site:
    the runtime's directories, the trees it copies, and a siteFs source this host lacks."""
    scratch = site.base / "example-scratch"
    udi_image = site.base / "example-udiImage"
    for d in (scratch, udi_image):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)
    (scratch / "marker").write_text("scratch\n")
    text = EXAMPLE_CONF.read_text()
    for old, new in {
        "udiMount=/var/udiMount\n": f"udiMount={site.udi_mount}\n",
        "loopMount=/var/udiLoopMount\n": f"loopMount={site.loop_mount}\n",
        "imagePath=/var/lib/shifter/images\n": f"imagePath={site.image_dir}\n",
        "udiRootPath=/opt/shifter/udiRoot\n": f"udiRootPath={site.conf['udiRootPath']}\n",
        "etcPath=/etc/shifter/shifter_etc_files\n": f"etcPath={site.etc_dir}\n",
        "optUdiImage=/opt/shifter/udiImage\n": f"optUdiImage={udi_image}\n",
        "perNodeCachePath=/tmp\n": f"perNodeCachePath={site.cache_dir}\n",
        "    /scratch:/scratch\n": f"    {scratch}:/scratch\n",
    }.items():
        # Exactly once: if the example changes, this test must be looked at again.
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_the_example_udiroot_conf_works_as_shipped(site, image):
    """A site that copies etc/udiRoot.conf.example and sets its own paths can launch:
    the front end and the helper both accept every key the example sets."""
    site.write_conf(example_conf_for(site))
    res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c",
                       "cat /scratch/marker; echo $SHIFTER_RUNTIME; ls -d /home")
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == "scratch\n1\n/home\n"


# -- setupRoot / unsetupRoot: the batch-job path ------------------------------------------


def test_setup_root_then_shifter_reuses_it_then_unsetup(site, image):
    uid = subprocess.run(["id", "-u", ALICE], capture_output=True, text=True).stdout.strip()
    gid = subprocess.run(["id", "-g", ALICE], capture_output=True, text=True).stdout.strip()
    data = user_dir(site, ALICE, "jobdata")
    res = site.root_tool("setupRoot", "-U", uid, "-G", gid, "-u", ALICE, "-N", "nid1/2 nid2/1",
                         "-v", f"{data}:/data", "id", image)
    try:
        assert res.returncode == 0, res.stderr
        config = (site.udi_mount / "var" / "shifterConfig.json").read_text()
        assert json.loads(config) == {"identifier": image, "user": ALICE,
                                      "volMap": f"{data}:/data", "modules": ""}
        assert (site.udi_mount / "var" / "hostsfile").read_text() == "nid1\nnid1\nnid2\n"
        assert site.our_mounts(), "setupRoot builds in the caller's namespace"
        # The task's request matches the signature: it enters the prepared container.
        res = site.shifter(ALICE, f"--image=id:{image}", f"--volume={data}:/data",
                           "sh", "-c", "cat /var/hostsfile | wc -l; cat /etc/os-release")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split("\n", 1)[0].strip() == "3"
        # A different request does not match the signature: a fresh private container.
        res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c",
                           "test -e /var/hostsfile && echo PREPARED || echo FRESH")
        assert res.stdout == "FRESH\n", res.stderr
    finally:
        done = site.root_tool("unsetupRoot")
    assert done.returncode == 0, done.stderr
    site.assert_nothing_left()


def test_setup_root_dash_capital_v_is_shifters_verbose(site, image):
    """``setupRoot -V`` (Shifter's verbose): what will be set up on stdout, then the
    helper's progress on stderr; the container is built all the same."""
    uid = subprocess.run(["id", "-u", ALICE], capture_output=True, text=True).stdout.strip()
    gid = subprocess.run(["id", "-g", ALICE], capture_output=True, text=True).stdout.strip()
    res = site.root_tool("setupRoot", "-V", "-U", uid, "-G", gid, "-u", ALICE, "id", image)
    try:
        assert res.returncode == 0, res.stderr
        assert f"setupRoot: user {ALICE} uid {uid} gid {gid}\n" in res.stdout
        assert f"setupRoot: image id:{image} = {image}\n" in res.stdout
        assert "setup done" in res.stderr  # the helper's progress
        assert (site.udi_mount / "var" / "shifterConfig.json").exists()
    finally:
        done = site.root_tool("unsetupRoot", "-V")
    assert done.returncode == 0, done.stderr
    site.assert_nothing_left()


def test_setup_root_failure_leaves_nothing(site, image):
    res = site.root_tool("setupRoot", "-U", "1001", "-G", "1001", "-u", ALICE,
                         "-v", "/nonexistent-source:/data", "id", image)
    # the user's volume: status 2 (the prolog fails the job and keeps the node)
    assert res.returncode == 2 and "/nonexistent-source" in res.stderr
    site.assert_nothing_left()


def test_setup_root_is_for_root_only(site, image):
    """The setuid helper has no setup or unsetup mode; the program that has them is
    root's alone and never setuid."""
    from world.runtime import HELPER, SETUP

    res = site.run(ALICE, [str(HELPER), "setup", "--user", ALICE, "--uid", "1001",
                           "--gid", "1001", "--image-id", image])
    assert res.returncode == 1 and "usage: shifter-helper run" in res.stderr
    res = site.run(ALICE, [str(HELPER), "unsetup"])
    assert res.returncode == 1 and "usage: shifter-helper run" in res.stderr
    st = SETUP.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    res = site.run(ALICE, ["/bin/sh", "-c", 'exec "$0" unsetup', str(SETUP)])
    assert res.returncode == 126 and "Permission denied" in res.stderr


# -- the whole main job: registry → gateway → shifterimg pull → shifter ----------------------


def test_pull_with_shifterimg_then_run_with_shifter(site, registry, munged, tmp_path):
    """docs/behaviour.md, 'Scenarios the tests cover', end to end: an image built and pushed
    here, pulled through a real gateway by the user, then run by tag; the tag resolves from
    the gateway's index in imagePath, and still does while the gateway is down."""
    from world.gateway import Gateway
    from world.imagebuild import File, Symlink, build_layer, push_image

    entries = [File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)]
    entries += [Symlink(f"bin/{n}", "busybox") for n in ("sh", "echo", "cat")]
    entries += [File("etc/os-release", "ID=pulled-for-runtime\n")]
    push_image(registry, "runtime/e2e", "v1", [build_layer(entries, "gzip", tmp_path)],
               {"Env": ["PATH=/bin", "FROM_CONFIG=yes"], "Cmd": ["/bin/sh"]})
    tag = f"{registry.host}/runtime/e2e:v1"
    gw = Gateway(tmp_path / "gw", munge_socket=munged.socket, registry=registry,
                 extra={"Platforms": {"testsys": {
                     "mungeSocketPath": munged.socket, "accesstype": "local",
                     "admins": ["root"], "local": {"imageDir": str(site.image_dir)}}}})
    client_conf = site.base / "client-udiRoot.conf"
    with gw:
        text = "".join(f"{k}={v}\n" for k, v in site.conf.items())
        client_conf.write_text(text + f"imageGateway={gw.url}\n")
        os.chmod(client_conf, 0o644)
        venv_bin = Path(__file__).resolve().parents[1] / ".venv" / "bin"
        env = {"SHIFTER_UDIROOT_CONF": str(client_conf), "MUNGE_SOCKET": munged.socket,
               "PATH": f"{venv_bin}:/usr/bin:/bin"}
        shifterimg = str(venv_bin / "shifterimg")
        # Not pulled yet: shifter asks the gateway, then says the command that fixes it...
        res = site.shifter(ALICE, f"--image={tag}", "true", env=env)
        assert res.returncode == 1, res
        assert res.stderr == (f"FAILED to lookup docker image {tag}\n"
                              "FAILED to find requested image.\n"
                              f"shifter: pull it first: shifterimg pull docker:{tag}\n")
        # ...and that very command works.
        suggested = res.stderr.splitlines()[-1].split("pull it first: ", 1)[1].split()
        assert suggested[:2] == ["shifterimg", "pull"]
        pulled = site.run(ALICE, [shifterimg, *suggested[1:]], env=env, timeout=120)
        assert pulled.returncode == 0 and "READY" in pulled.stdout, pulled
        res = site.shifter(ALICE, f"--image={tag}", "sh", "-c",
                           "echo test; cat /etc/os-release; echo $FROM_CONFIG", env=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout == "test\nID=pulled-for-runtime\nyes\n"
    # The gateway is down: the image still runs, by tag.
    res = site.shifter(ALICE, f"--image=docker:{tag}", "echo", "still", env=env)
    assert (res.returncode, res.stdout) == (0, "still\n"), res.stderr


def test_removing_an_image_leaves_a_running_container_whole(site, registry, munged, tmp_path):
    """``shifterimg rm`` while a container of the image runs: the gateway unlinks the
    squashfs, but the loop device set up at launch holds the file, so the container reads
    the image to its end (even blocks it never read before) and its teardown leaves
    nothing. Only what starts afterwards finds the image gone."""
    from world.gateway import Gateway
    from world.imagebuild import File, Symlink, build_layer, push_image

    data = os.urandom(1 << 20)  # read only after the removal: not in the page cache
    entries = [File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)]
    entries += [Symlink(f"bin/{n}", "busybox") for n in ("sh", "cat", "sha256sum", "head")]
    entries += [File("data/late", data), File("etc/marker", "early\n")]
    push_image(registry, "runtime/rm", "v1", [build_layer(entries, "gzip", tmp_path)],
               {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})
    tag = f"{registry.host}/runtime/rm:v1"
    gw = Gateway(tmp_path / "gw", munge_socket=munged.socket, registry=registry,
                 extra={"Platforms": {"testsys": {
                     "mungeSocketPath": munged.socket, "accesstype": "local",
                     "admins": ["root"], "local": {"imageDir": str(site.image_dir)}}}})
    client_conf = site.base / "client-udiRoot.conf"
    venv_bin = Path(__file__).resolve().parents[1] / ".venv" / "bin"
    env = {"SHIFTER_UDIROOT_CONF": str(client_conf), "MUNGE_SOCKET": munged.socket,
           "PATH": f"{venv_bin}:/usr/bin:/bin"}
    shifterimg = str(venv_bin / "shifterimg")
    with gw:
        text = "".join(f"{k}={v}\n" for k, v in site.conf.items())
        client_conf.write_text(text + f"imageGateway={gw.url}\n")
        os.chmod(client_conf, 0o644)
        pulled = site.run(ALICE, [shifterimg, "-u", ALICE, "pull", f"docker:{tag}"], env=env,
                          timeout=120)
        assert pulled.returncode == 0, pulled
        image_id = site.run(ALICE, [shifterimg, "lookup", tag], env=env).stdout.strip()
        squashfs = site.image_dir / f"{image_id}.squashfs"
        proc = subprocess.Popen(
            [str(site.launcher), f"--image={tag}", "sh", "-c",
             "cat /etc/marker; read go; sha256sum /data/late; cat /etc/marker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=site.user_env(ALICE, env), cwd=str(site.base), **site.spawn_kwargs(ALICE))
        try:
            assert proc.stdout.readline() == "early\n"  # the container runs
            removed = site.run(ALICE, [shifterimg, "rm", f"docker:{tag}"], env=env)
            assert (removed.returncode, removed.stderr) == (0, ""), removed
            assert not squashfs.exists()
            # The loop device still holds the unlinked file.
            assert any("(deleted)" in line for line in site.our_loops()), site.our_loops()
            out, err = proc.communicate("go\n", timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert out == f"{hashlib.sha256(data).hexdigest()}  /data/late\nearly\n"
        # What starts now finds no image: by tag, and pinned to the id (a later job step).
        res = site.shifter(ALICE, f"--image={tag}", "true", env=env)
        assert res.returncode == 1 and "FAILED to lookup docker image" in res.stderr, res
        res = site.shifter(ALICE, f"--image=id:{image_id}", "true", env=env)
        assert (res.returncode, res.stderr) == (1, "FAILED to find requested image.\n"), res
    site.assert_nothing_left()


def test_site_and_module_root_hooks(site, image):
    """sitePreMountHook and a module roothook run as root in the container root being
    built (cwd udiMount); a failing one stops the launch and leaves nothing mounted."""
    pre = site.base / "premount.sh"
    pre.write_text("id -u > etc/premount-ran\n")
    roothook = site.base / "roothook.sh"
    roothook.write_text("echo \"$(id -u) $(pwd)\" > etc/roothook-ran\n")
    failing = site.base / "failing.sh"
    failing.write_text("echo hook says no >&2; exit 3\n")
    for path in (pre, roothook, failing):
        os.chmod(path, 0o755)
    site.write_conf(sitePreMountHook=str(pre), module_hooked_roothook=str(roothook),
                    module_broken_roothook=str(failing))
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=hooked", "cat",
                       "/etc/premount-ran", "/etc/roothook-ran")
    assert res.returncode == 0, res.stderr
    # As root, with cwd the container root being built (udiMount, in the private namespace).
    assert res.stdout.split() == ["0", "0", str(site.udi_mount)]
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=broken", "true")
    assert res.returncode == 1 and "broken" in res.stderr, res.stderr
    site.assert_nothing_left()


def test_a_site_with_many_users_can_launch(site, image):
    """A large site's etcPath (20,000 users, 10,000 groups: over 1 MiB each) is read by the
    helper in full: the caller's name is found and the container gets the files."""
    passwd, group = site.etc_dir / "passwd", site.etc_dir / "group"
    old_passwd, old_group = passwd.read_bytes(), group.read_bytes()
    many_users = "".join(f"user{i:05d}:x:{200000 + i}:{200000 + i}:Site User {i}:"
                         f"/home/user{i:05d}:/bin/bash\n" for i in range(20000))
    many_groups = "".join(f"group{i:05d}:x:{300000 + i}:user{i:05d},user{i + 1:05d}\n"
                          for i in range(10000))
    try:
        passwd.write_bytes(many_users.encode() + old_passwd)
        group.write_bytes(many_groups.encode() + old_group)
        assert passwd.stat().st_size > 1024 * 1024 and group.stat().st_size > 300 * 1024
        res = site.shifter(ALICE, f"--image=id:{image}", "sh", "-c",
                           "id -un; grep -c '^user' /etc/passwd")
    finally:
        passwd.write_bytes(old_passwd)
        group.write_bytes(old_group)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [ALICE, "20000"]
    site.assert_nothing_left()
