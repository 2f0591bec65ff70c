"""Site modules and site filesystems in depth, end to end (docs/behaviour.md,
'Runtime: building the container' steps 5.3-5.12 and 9, 'Runtime: volumes' for siteFs flags,
'Runtime: environment' for the order, 'Runtime: modules'; issue 5 "Modules in depth").

Every test runs the real front end and the real setuid helper as an unprivileged user,
and each is built so that it fails when the behaviour or the order is wrong: hooks write
down what they saw while the container was being built, mounts are made on the host
before or after the container exists, modules are named in both orders.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from world.runtime import HELPER, RuntimeSite, busybox_tree, mksquashfs, module_site

ALICE = "shifter-alice"
PROBE = "test -e /var/hostsfile && echo PREPARED || echo FRESH"


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory) -> Iterator[RuntimeSite]:
    with module_site(tmp_path_factory, "modules") as site:
        yield site


@pytest.fixture(scope="module")
def image(site, tmp_path_factory) -> str:
    tree = busybox_tree(tmp_path_factory.mktemp("tree") / "root",
                        {"srv/from-image": "image\n", "etc/os-release": "ID=image\n"})
    sqfs = mksquashfs(tree, tmp_path_factory.mktemp("sqfs") / "modules.squashfs")
    return site.add_image(sqfs, 'ENV: ["PATH=/usr/bin:/bin"]\n')


@pytest.fixture(autouse=True)
def clean_conf(site) -> Iterator[None]:
    site.write_conf()
    yield
    site.write_conf()
    if site.our_mounts():  # fail, but do not leave the machine with our mounts for the next run
        site.root_tool("unsetupRoot")
        pytest.fail("a mount of ours is left in the root namespace")
    site.assert_nothing_left()
    assert host_mounts_under(site.base) == [], "a host mount made by the test is left"


# -- helpers ---------------------------------------------------------------------------------


def host_mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(base) + "/")]


def ids(user: str) -> tuple[str, str]:
    uid = subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True)
    gid = subprocess.run(["id", "-g", user], capture_output=True, text=True, check=True)
    return uid.stdout.strip(), gid.stdout.strip()


def site_dir(site: RuntimeSite, name: str, files: dict[str, str] | None = None,
             mode: int = 0o755) -> Path:
    """A root-owned directory on the host, as a site's trees are."""
    path = site.base / name
    path.mkdir(exist_ok=True)
    os.chmod(path, mode)
    for rel, text in (files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def script(site: RuntimeSite, name: str, text: str) -> Path:
    path = site.base / name
    path.write_text(text)
    os.chmod(path, 0o755)
    return path


def user_dir(site: RuntimeSite, name: str) -> Path:
    path = site.base / f"alice-{name}"
    path.mkdir(exist_ok=True)
    uid, gid = ids(ALICE)
    os.chown(path, int(uid), int(gid))
    return path


@contextmanager
def tmpfs(path: Path, files: dict[str, str], mode: str = "0755") -> Iterator[Path]:
    """A small tmpfs mounted on the host at ``path`` (made by the test, removed after)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,mode={mode}", "shifter-test-sub",
                    str(path)], check=True)
    try:
        for rel, text in files.items():
            (path / rel).write_text(text)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def shared_mount(path: Path) -> Iterator[Path]:
    """``path`` as its own mount in a shared peer group, as a site's parallel filesystem
    is on a systemd host (this machine's ``/`` is private, so nothing would propagate)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def prepared(site: RuntimeSite, image: str, *args: str) -> Iterator[dict]:
    """A container prepared by ``setupRoot`` for alice (with a node list, so /var/hostsfile
    tells a prepared container from a fresh one); ``unsetupRoot`` after, nothing left."""
    uid, gid = ids(ALICE)
    res = site.root_tool("setupRoot", "-U", uid, "-G", gid, "-u", ALICE, "-N", "nid1/1",
                         *args, "id", image)
    try:
        assert res.returncode == 0, res.stderr
        yield json.loads((site.udi_mount / "var" / "shifterConfig.json").read_text())
    finally:
        done = site.root_tool("unsetupRoot")
        assert done.returncode == 0, done.stderr
        site.assert_nothing_left()


def env_of(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


# What a root hook saw, one "name yes|no" line per check (hooks run /bin/sh on the host,
# cwd the container root being built).
SAW = 'saw() { if eval "$2"; then echo "$1 yes"; else echo "$1 no"; fi; }\n'


# -- siteFs flags: rec, slave, private -------------------------------------------------------


def test_site_fs_rec_carries_submounts_and_their_flags(site, image):
    src = site_dir(site, "recsrc", {"top": "top\n"})
    (src / "sub").mkdir(exist_ok=True)
    with tmpfs(src / "sub", {"inner": "submount\n"}, mode="1777"):
        site.write_conf(siteFs=f"{src}:/flat;{src}:/deep:rec;{src}:/deepro:rec:ro",
                        module_recmod_siteFs=f"{src}:/modflat;{src}:/moddeep:rec")
        res = site.shifter(
            ALICE, f"--image=id:{image}", "--module=recmod", "sh", "-c",
            "for d in flat deep deepro modflat moddeep; do "
            "  echo $d $(cat /$d/top) $(cat /$d/sub/inner 2>/dev/null || echo -); done; "
            "grep ' /deepro/sub ' /proc/mounts; "
            "touch /deepro/sub/denied 2>/dev/null && echo WROTE-RO; "
            "touch /deep/sub/by-alice && echo WROTE-RW")
        written = sorted(p.name for p in (src / "sub").iterdir())
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # Without :rec the submount is not carried (its empty mount point shows); with it, it is,
    # for the global siteFs and a module's alike.
    assert lines[:5] == ["flat top -", "deep top submount", "deepro top submount",
                         "modflat top -", "moddeep top submount"]
    # :ro, nosuid and nodev reach the submount too, not just the top of the tree.
    opts = lines[5].split()[3].split(",")
    assert {"ro", "nosuid", "nodev"} <= set(opts), lines[5]
    assert lines[6:] == ["WROTE-RW"]
    assert written == ["by-alice", "inner"]


@pytest.mark.parametrize("key, flag, style, propagates", [
    ("siteFs", ":slave", "private", True),
    ("siteFs", ":private", "slave", False),
    ("siteFs", "", "slave", True),
    ("siteFs", "", "private", False),
    ("module_prop_siteFs", ":slave", "private", True),
    ("module_prop_siteFs", ":private", "slave", False),
])
def test_site_fs_propagation_into_a_prepared_container(site, image, key, flag, style,
                                                       propagates):
    """A mount made on the host under a siteFs source after setupRoot built the job's
    container reaches the container with slave propagation (the flag, else
    mountPropagationStyle), not with private."""
    src = site_dir(site, "propsrc", {"top": "top\n"})
    (src / "late").mkdir(exist_ok=True)
    with shared_mount(src):
        site.write_conf(**{key: f"{src}:/prop{flag}"}, mountPropagationStyle=style)
        module = key.startswith("module_")
        with prepared(site, image, *(["-m", "prop"] if module else [])):
            with tmpfs(src / "late", {"news": "mounted after setup\n"}):
                res = site.shifter(ALICE, f"--image=id:{image}",
                                   *(["--module=prop"] if module else []), "sh", "-c",
                                   f"{PROBE}; cat /prop/top; "
                                   "cat /prop/late/news 2>/dev/null || echo NOT-VISIBLE")
    assert res.returncode == 0, res.stderr
    late = "mounted after setup" if propagates else "NOT-VISIBLE"
    assert res.stdout.splitlines() == ["PREPARED", "top", late]


@pytest.mark.parametrize("flag, propagates", [(":slave", True), (":private", False)])
def test_site_fs_propagation_into_a_running_fresh_container(site, image, flag, propagates):
    """The same for a container built by ``shifter`` itself in its own namespace: a mount
    made on the host while the command runs reaches it with :slave only."""
    src = site_dir(site, "propsrc2", {"top": "top\n"})
    (src / "late").mkdir(exist_ok=True)
    with shared_mount(src):
        site.write_conf(siteFs=f"{src}:/prop{flag}")
        proc = subprocess.Popen(
            [str(site.launcher), f"--image=id:{image}", "sh", "-c",
             "echo READY; i=0; while [ $i -lt 30 ] && ! test -e /prop/late/news; do "
             "sleep 0.1; i=$((i+1)); done; cat /prop/late/news 2>/dev/null || echo NOT-VISIBLE"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=site.base,
            env=site.user_env(ALICE), **site.spawn_kwargs(ALICE))
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "READY\n"
            with tmpfs(src / "late", {"news": "mounted while running\n"}):
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert out == ("mounted while running\n" if propagates else "NOT-VISIBLE\n")


# -- copyPath --------------------------------------------------------------------------------


def test_copy_path_is_copied_readable_and_module_env_points_at_it(site, image):
    """A root-only copyPath (the user cannot read it on the host) lands in
    /opt/udiImage/modules/<name>/, chmod a+rX, symlinks kept, set-id bits dropped; the
    module's env puts its bin on PATH."""
    mod = site_dir(site, "toolmod", mode=0o700)
    for d in ("bin", "lib", "share/deep"):
        (mod / d).mkdir(parents=True, exist_ok=True)
        os.chmod(mod / d, 0o700)
    (mod / "bin" / "modtool").write_text('#!/bin/sh\necho "modtool ran as $(id -un)"\n')
    os.chmod(mod / "bin" / "modtool", 0o4700)
    (mod / "lib" / "libsite.so.12.1").write_text("site library\n")
    os.chmod(mod / "lib" / "libsite.so.12.1", 0o600)
    if not (mod / "lib" / "libsite.so.12").is_symlink():
        (mod / "lib" / "libsite.so.12").symlink_to("libsite.so.12.1")
    (mod / "share" / "deep" / "data").write_text("deep\n")
    os.chmod(mod / "share" / "deep" / "data", 0o600)
    site.write_conf(module_tool_copyPath=str(mod),
                    module_tool_siteEnvPrepend="PATH=/opt/udiImage/modules/tool/bin "
                                               "LD_LIBRARY_PATH=/opt/udiImage/modules/tool/lib")
    denied = site.run(ALICE, ["cat", str(mod / "lib" / "libsite.so.12.1")])
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    m = "/opt/udiImage/modules/tool"
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=tool", "sh", "-c",
                       f"modtool; echo LD=$LD_LIBRARY_PATH; cat {m}/lib/libsite.so.12 "
                       f"{m}/share/deep/data; readlink {m}/lib/libsite.so.12; "
                       f"stat -c '%a %U %n' {m} {m}/bin {m}/bin/modtool {m}/lib/libsite.so.12.1 "
                       f"{m}/share/deep {m}/share/deep/data")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"modtool ran as {ALICE}", f"LD={m}/lib", "site library", "deep", "libsite.so.12.1",
        f"755 root {m}", f"755 root {m}/bin", f"755 root {m}/bin/modtool",
        f"644 root {m}/lib/libsite.so.12.1", f"755 root {m}/share/deep",
        f"644 root {m}/share/deep/data",
    ]


def test_large_copy_path_files_are_bound_read_only_only_when_safe(site, image):
    """Files over 1 MiB that are root's, not writable by others, set-id free and already
    a+r(X) are bind-mounted read-only (a launch need not copy a 48 MiB MPI); any other
    large file is still copied and given a+rX without set-id bits, like small ones."""
    mod = site_dir(site, "bigmod")
    big = b"x" * (2 * 1024 * 1024 + 1)
    cases = {"shared.so": 0o644, "tool": 0o755, "private.so": 0o600, "setid": 0o4755,
             "groupw.so": 0o664, "partial-x": 0o744}
    for name, mode in cases.items():
        (mod / name).write_bytes(big)
        os.chmod(mod / name, mode)
    (mod / "alice.so").write_bytes(big)
    os.chown(mod / "alice.so", *map(int, ids(ALICE)))
    os.chmod(mod / "alice.so", 0o644)
    site.write_conf(module_big_copyPath=str(mod))
    m = "/opt/udiImage/modules/big"
    names = [*cases, "alice.so"]
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=big", "sh", "-c",
                       f"cd {m} && stat -c '%n %a %s %U' {' '.join(names)}; "
                       f"grep ' {m}/' /proc/mounts; echo y > shared.so || echo write-refused")
    assert res.returncode == 0, res.stderr
    stats = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()
             if line.split()[0] in names}
    size = str(len(big))
    assert stats == {
        "shared.so": ["644", size, "root"], "tool": ["755", size, "root"],
        "private.so": ["644", size, "root"], "setid": ["755", size, "root"],
        "groupw.so": ["664", size, "root"], "partial-x": ["755", size, "root"],
        "alice.so": ["644", size, "root"],
    }
    bound = {line.split()[1].rsplit("/", 1)[1]: line.split()[3].split(",")
             for line in res.stdout.splitlines()
             if len(line.split()) >= 4 and line.split()[1].startswith(m + "/")}
    assert set(bound) == {"shared.so", "tool"}
    for opts in bound.values():
        assert {"ro", "nosuid", "nodev"} <= set(opts)
    assert "write-refused" in res.stdout
    assert (mod / "shared.so").read_bytes() == big  # the host's file is untouched


# -- the build order: root hooks, siteFs, /etc, copyPath, image ------------------------------


def test_module_roothook_runs_after_the_site_steps_and_before_the_image(site, image):
    """Step 5.11: after siteFs (global and module), /etc, copyPath; before /proc (5.12) and
    the image (6); what it creates at the top level wins over the image's entries."""
    sitefs = site_dir(site, "hooksitefs", {"marker": "site\n"})
    modfs = site_dir(site, "hookmodfs", {"marker": "module\n"})
    copy = site_dir(site, "hookcopy", {"tool": "tool\n"})
    hook = script(site, "order-roothook.sh", SAW + (
        "{ saw site-fs 'test -f site/marker'; saw module-fs 'test -f modfs/marker'\n"
        "  saw etc-files 'test -f etc/site-only.conf && test -f etc/passwd && test -L etc/mtab'\n"
        "  saw copy-path 'test -f opt/udiImage/modules/hooked/tool'\n"
        "  saw proc 'test -e proc/self'\n"
        "  saw image 'test -e bin/busybox || test -e etc/image-only.conf || test -e srv'\n"
        "  echo \"as $(id -u) in $(pwd)\"; } > etc/roothook-saw\n"
        "mkdir srv && echo site > srv/who && echo ID=site > etc/os-release\n"))
    site.write_conf(siteFs=f"{sitefs}:/site", module_hooked_siteFs=f"{modfs}:/modfs",
                    module_hooked_copyPath=str(copy), module_hooked_roothook=str(hook))
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=hooked", "sh", "-c",
                       "cat /etc/roothook-saw; ls /srv; cat /srv/who /etc/os-release")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "site-fs yes", "module-fs yes", "etc-files yes", "copy-path yes", "proc no",
        "image no", f"as 0 in {site.udi_mount}",
        "who", "site", "ID=site",  # the hook's /srv and /etc/os-release, not the image's
    ]


def test_module_roothooks_run_in_module_order(site, image):
    first = script(site, "first-roothook.sh", "echo first >> etc/roothooks\n")
    second = script(site, "second-roothook.sh", "echo second >> etc/roothooks\n")
    site.write_conf(module_first_roothook=str(first), module_second_roothook=str(second))
    for order in (["first", "second"], ["second", "first"]):
        res = site.shifter(ALICE, f"--image=id:{image}", f"--module={','.join(order)}",
                           "cat", "/etc/roothooks")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == order


def test_module_site_fs_comes_after_the_global_site_fs_and_post_mount_hook(site, image):
    """Steps 5.2-5.5: pre-mount hook, siteFs, post-mount hook, module siteFs. The module's
    siteFs lands inside the global one (a reversed order would hide it under it)."""
    outer = site_dir(site, "outerfs", {"marker": "outer\n"})
    (outer / "inner").mkdir(exist_ok=True)
    inner = site_dir(site, "innerfs", {"marker": "module\n"})
    checks = ("saw site-fs 'test -f outer/marker'; "
              "saw module-fs 'test -f outer/inner/marker'")
    pre = script(site, "pre-hook.sh", SAW + f"{{ {checks}; }} > etc/pre-saw\n")
    post = script(site, "post-hook.sh", SAW + f"{{ {checks}; }} > etc/post-saw\n")
    site.write_conf(siteFs=f"{outer}:/outer", sitePreMountHook=str(pre),
                    sitePostMountHook=str(post), module_nest_siteFs=f"{inner}:/outer/inner")
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=nest", "sh", "-c",
                       "cat /etc/pre-saw /etc/post-saw /outer/marker /outer/inner/marker")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["site-fs no", "module-fs no",
                                       "site-fs yes", "module-fs no",
                                       "outer", "module"]


# -- userhooks -------------------------------------------------------------------------------


def userhook_module(site: RuntimeSite, name: str, body: str) -> dict[str, str]:
    """Config of a module whose userhook (shipped through its copyPath) runs ``body``."""
    copy = site_dir(site, f"uh-{name}", {"hook.sh": body})
    return {f"module_{name}_copyPath": str(copy),
            f"module_{name}_userhook": f"/opt/udiImage/modules/{name}/hook.sh",
            f"module_{name}_siteEnv": f"{name.upper()}VAR={name}"}


def test_userhooks_run_as_the_user_in_the_container_in_module_order(site, image):
    """Step 9: after chroot, the privilege drop and chdir to the working dir, with the
    container's environment, in module order, before the command."""
    data = user_dir(site, "hooklog")
    body = ('echo "{n} uid=$(id -u) cwd=$(pwd) env=$FIRSTVAR,$SECONDVAR,$SITEVAR,$CLI '
            'image=$(cat /etc/image-only.conf) $(grep CapEff /proc/self/status)" >> log\n')
    conf = {**userhook_module(site, "first", body.format(n="first")),
            **userhook_module(site, "second", body.format(n="second"))}
    site.write_conf(siteEnv="SITEVAR=site", **conf)
    uid, _ = ids(ALICE)
    seen = f"uid={uid} cwd=/data env=first,second,site,cli image=from the image " \
           "CapEff:\t0000000000000000"
    for order in (["first", "second"], ["second", "first"]):
        (data / "log").unlink(missing_ok=True)
        res = site.shifter(ALICE, f"--image=id:{image}", f"--module={','.join(order)}",
                           f"--volume={data}:/data", "--workdir=/data", "-e", "CLI=cli",
                           "sh", "-c", "echo command >> log; cat log")
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [f"{order[0]} {seen}", f"{order[1]} {seen}",
                                           "command"]


# -- environment order (docs/behaviour.md, 'Runtime: environment') ---------------------------------


def test_module_environment_is_applied_before_the_global_site_environment(site, image):
    site.write_conf(
        siteEnv="X=site SETBYSITE=site", siteEnvAppend="PATH=/site/append",
        siteEnvPrepend="PATH=/site/prepend", siteEnvUnset="GONE",
        module_a_siteEnv="X=a ORDER=a GONE=a A_ONLY=a W=mid",
        module_a_siteEnvAppend="W=end", module_a_siteEnvPrepend="PATH=/a/bin W=start",
        module_b_siteEnv="ORDER=b", module_b_siteEnvPrepend="PATH=/b/bin",
        module_b_siteEnvUnset="SETBYSITE A_ONLY CALLER",
    )

    def env(modules: str) -> dict[str, str]:
        res = site.shifter(ALICE, f"--image=id:{image}", f"--module={modules}",
                           "-e", "X=cli", "-e", "ORDER=cli", "env", env={"CALLER": "caller"})
        assert res.returncode == 0, res.stderr
        return env_of(res.stdout)

    ab, ba = env("a,b"), env("b,a")
    for e in (ab, ba):
        assert e["X"] == "site"            # module over --env, global siteEnv over module
        assert "GONE" not in e              # set by a module, unset by the global siteEnvUnset
        assert e["SETBYSITE"] == "site"     # unset by a module, set again by the global siteEnv
        assert e["W"] == "start:mid:end"    # within a module: set, append, prepend
        assert "CALLER" not in e            # a module's unset reaches the caller's variables
    # Module order: later modules override earlier ones.
    assert ab["ORDER"] == "b" and ba["ORDER"] == "a"
    assert "A_ONLY" not in ab and ba["A_ONLY"] == "a"
    assert ab["PATH"] == "/site/prepend:/b/bin:/a/bin:/usr/bin:/bin:/site/append"
    assert ba["PATH"] == "/site/prepend:/a/bin:/b/bin:/usr/bin:/bin:/site/append"


# -- which modules: defaults, the user's choice, conflicts, the reuse signature --------------


def test_default_modules_are_replaced_by_the_users_choice(site, image):
    conf: dict[str, str] = {"defaultModules": "a"}
    for name in ("a", "b"):
        copy = site_dir(site, f"sel-{name}", {"tool": name})
        conf.update({f"module_{name}_copyPath": str(copy),
                     f"module_{name}_siteEnv": f"{name.upper()}=1"})
    site.write_conf(**conf)
    cmd = ("sh", "-c", "echo A=$A B=$B $(ls /opt/udiImage/modules)")
    cases = [
        ((), {}, "A=1 B= a"),
        (("--module=b",), {}, "A= B=1 b"),
        (("--module=a,b",), {}, "A=1 B=1 a b"),
        (("--module=none",), {}, "A= B="),
        (("--module=NONE",), {}, "A= B="),
        ((), {"SHIFTER_MODULE": "b"}, "A= B=1 b"),
        ((), {"SHIFTER_MODULE": "none"}, "A= B="),
        (("--module=a",), {"SHIFTER_MODULE": "b"}, "A=1 B= a"),
    ]
    for args, env, expected in cases:
        res = site.shifter(ALICE, f"--image=id:{image}", *args, *cmd, env=env)
        assert (res.returncode, res.stdout) == (0, expected + "\n"), (args, env, res.stderr)


CONFLICTS = {
    "module_a_siteEnv": "A=1", "module_b_siteEnv": "B=1", "module_b_conflict": "a",
    "module_c_conflict": "x  a", "module_off_siteEnv": "OFF=1", "module_off_enabled": "0",
    "module_shut_siteEnv": "SHUT=1", "module_shut_enabled": "No",
}


@pytest.mark.parametrize("modules, default, message", [
    ("a,b", None, "ERROR: cannot load conflicting modules b and a"),
    ("b,a", None, "ERROR: cannot load conflicting modules a and b"),  # declared by b only
    ("a,c", None, "ERROR: cannot load conflicting modules c and a"),  # one of several words
    (None, "b,a", "ERROR: cannot load conflicting modules a and b"),  # in defaultModules
    ("a,nosuch", None, "Unknown shifter module: nosuch"),
    ("off", None, "Unknown shifter module: off"),                     # enabled=0
    ("shut", None, "Unknown shifter module: shut"),                   # enabled=No
    (None, "a,off", "Unknown shifter module: off"),
])
def test_conflicting_unknown_and_disabled_modules(site, image, modules, default, message):
    site.write_conf(**CONFLICTS, defaultModules=default)
    args = [f"--module={modules}"] if modules is not None else []
    res = site.shifter(ALICE, f"--image=id:{image}", *args, "echo", "RAN")
    assert (res.returncode, res.stdout, res.stderr.strip()) == (1, "", message)


@pytest.mark.parametrize("modules, message", [
    ("a,b", "ERROR: cannot load conflicting modules b and a"),
    ("b,a", "ERROR: cannot load conflicting modules a and b"),
    ("off", "Unknown shifter module: off"),
    ("shut", "Unknown shifter module: shut"),
    ("a,nosuch", "Unknown shifter module: nosuch"),
])
def test_the_helper_itself_refuses_what_the_front_end_refuses(site, image, modules, message):
    """A user can exec the setuid helper directly: it applies the same module rules."""
    site.write_conf(**CONFLICTS)
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--modules", modules,
                           "--", "/bin/echo", "RAN"])
    assert (res.returncode, res.stdout, res.stderr.strip()) == (1, "", message)


def test_module_names_are_part_of_the_reuse_signature(site, image):
    """A prepared container is entered only by a request with the same modules in the same
    order (their roothooks and env ran in that order); anything else builds a fresh one."""
    hook = script(site, "sig-roothook.sh",
                  SAW + "saw hostsfile 'test -f var/hostsfile' > etc/a-roothook\n")
    site.write_conf(defaultModules="a", module_a_siteEnv="A=1", module_a_roothook=str(hook),
                    module_b_siteEnv="B=1")

    def probe(*args: str) -> str:
        res = site.shifter(ALICE, f"--image=id:{image}", *args, "sh", "-c", PROBE)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    with prepared(site, image, "-m", "a,b") as config:
        assert config["modules"] == "a,b,"
        assert probe("--module=a,b") == "PREPARED"
        # setupRoot ran the roothook after writing the hostsfile (step 5.10 before 5.11).
        res = site.shifter(ALICE, f"--image=id:{image}", "--module=a,b", "cat", "/etc/a-roothook")
        assert res.stdout == "hostsfile yes\n", res.stderr
        for other in ("--module=b,a", "--module=a", "--module=none"):
            assert probe(other) == "FRESH", other
        assert probe() == "FRESH"  # the default set is just a
    with prepared(site, image) as config:  # setupRoot applies defaultModules as shifter does
        assert config["modules"] == "a,"
        assert probe() == "PREPARED" and probe("--module=a") == "PREPARED"
        assert probe("--module=none") == "FRESH"
    with prepared(site, image, "-m", "none") as config:
        assert config["modules"] == ""
        assert probe("--module=none") == "PREPARED"
        assert probe() == "FRESH"


# -- bad input: clear message, exit 1, nothing left mounted ----------------------------------


def test_missing_copy_path_fails_before_anything_is_built(site, image):
    marker = site.base / "premount-ran"
    marker.unlink(missing_ok=True)
    pre = script(site, "marking-pre-hook.sh", f"touch {marker}\n")
    missing = site.base / "no-such-copypath"
    not_dir = script(site, "a-file-not-a-dir", "")
    site.write_conf(sitePreMountHook=str(pre), defaultModules="gone",
                    module_gone_copyPath=str(missing), module_file_copyPath=str(not_dir))
    res = site.shifter(ALICE, f"--image=id:{image}", "echo", "RAN")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.strip() == (f"Failed to setup module gone: cannot open its copyPath "
                                  f"{missing}: No such file or directory")
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=file", "echo", "RAN")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.strip() == (f"Failed to setup module file: cannot open its copyPath "
                                  f"{not_dir}: Not a directory")
    assert not marker.exists(), "the build started (a site hook ran) before the check"
    # The same for the batch prolog, which builds in the root namespace.
    uid, gid = ids(ALICE)
    res = site.root_tool("setupRoot", "-U", uid, "-G", gid, "-u", ALICE, "id", image)
    assert res.returncode == 1 and "Failed to setup module gone" in res.stderr, res.stderr
    site.assert_nothing_left()
    assert not marker.exists()
    # The user can opt out of the broken default module.
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=none", "echo", "RAN")
    assert (res.returncode, res.stdout) == (0, "RAN\n"), res.stderr


def test_failing_userhook_stops_the_launch(site, image):
    data = user_dir(site, "uhfail")
    conf = {**userhook_module(site, "ok", "echo ok-hook >> /data/hooks\n"),
            **userhook_module(site, "bad", "echo 'image MPI is not ABI compatible' >&2; "
                                           "exit 4\n"),
            "module_lost_userhook": "/opt/udiImage/modules/lost/hook.sh"}
    site.write_conf(**conf)
    for modules, failed, hooks in (("ok,bad", "bad", "ok-hook\n"), ("lost", "lost", None)):
        for name in ("ran", "hooks"):
            (data / name).unlink(missing_ok=True)
        res = site.shifter(ALICE, f"--image=id:{image}", f"--module={modules}",
                           f"--volume={data}:/data", "touch", "/data/ran")
        assert (res.returncode, res.stdout) == (1, ""), res.stderr
        assert res.stderr.splitlines()[-1] == f"Failed to setup module {failed}"
        assert not (data / "ran").exists(), "the command ran after a failed userhook"
        # Earlier modules' hooks did run, in order.
        log = (data / "hooks").read_text() if (data / "hooks").exists() else None
        assert log == hooks
    # The hook's own words reach the user, before the helper's.
    assert "image MPI is not ABI compatible" in site.shifter(
        ALICE, f"--image=id:{image}", "--module=bad", "true").stderr


def test_failing_roothook_fails_the_launch_and_setup_root(site, image):
    failing = script(site, "failing-roothook.sh", "echo 'no interconnect here' >&2; exit 3\n")
    site.write_conf(module_broken_roothook=str(failing), module_broken_siteEnv="X=1")
    expected = f"Failed to setup module broken: roothook {failing} failed (status 3)"
    res = site.shifter(ALICE, f"--image=id:{image}", "--module=broken", "echo", "RAN")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.splitlines() == ["no interconnect here", expected]
    uid, gid = ids(ALICE)
    res = site.root_tool("setupRoot", "-U", uid, "-G", gid, "-u", ALICE, "-m", "broken",
                         "id", image)
    assert res.returncode == 1 and res.stderr.splitlines()[-1] == expected, res.stderr
    # setupRoot mounts in the root namespace: it must have taken all of it down again.
    site.assert_nothing_left()
    assert not (site.udi_mount / "var").exists()
