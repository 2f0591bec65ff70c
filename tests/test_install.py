"""The packages, installed on a fresh Debian 12 as a site would, run the main job.

One test, in phases (each timed; the figures are printed and kept in
``<tmp>/timings.json``):

1. ``make deb``: the three role packages from this checkout into ``dist/``.
2. A fresh Debian 12 root: ``debootstrap --variant=minbase bookworm`` from the mirror this
   machine's apt uses. The finished root is cached as a tarball under
   ``/var/cache/shifter-test/`` (and apt's package lists and downloaded .deb files, in
   ``apt-lists/`` and ``apt-archives/``), so later runs skip most downloads; delete the
   directory to start over.
3. In that root, entered with ``unshare --mount --pid --fork`` + ``chroot`` (its own mount
   and PID namespaces; the host network, so the test registry on 127.0.0.1 is reachable):
   ``apt-get install`` of the three .deb files, their dependencies from the mirror, without
   Recommends (so the Depends alone must be enough), then the main job:
   munged; the gateway started from the packaged unit's ``ExecStart`` as its ``User=``
   (only ``--bind`` moved to a free port of 127.0.0.1: the host network is shared);
   a user created after the install, so ``shifter`` first refuses it ("Failed to lookup
   username") until the command of the packaged ``shifter-etc-sync.service`` runs;
   ``shifterimg pull`` as that user (and ``/metrics`` counting it), their ``shifter``;
   ``setupRoot`` as a batch prolog would run it, the user's ``shifter`` in the prepared
   container, ``unsetupRoot``; the command of ``shifter-imagegw-autoexpire.service``.

Nothing of the checkout enters the root except the three .deb files: the job script is
written by this test, the image comes from the test registry.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from world.imagebuild import File, Symlink, build_layer, push_image
from world.ports import free_port
from world.registry import Registry

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/var/cache/shifter-test")
ROOT_TARBALL = CACHE / "bookworm-minbase.tar.zst"
APT_ARCHIVES = CACHE / "apt-archives"
APT_LISTS = CACHE / "apt-lists"
SYSTEM = "instsys"
USER = "shifter-inst"
OS_RELEASE = 'PRETTY_NAME="Shifter install test image"\nID=shifter-install\n'

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installs packages in a chroot: root")


def debian_mirror() -> str:
    """The Debian mirror (URI) this machine's apt takes bookworm from."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):  # deb822 .sources
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return m.group(1)
    pytest.fail("no bookworm source in /etc/apt: cannot tell which mirror to debootstrap from")


def fresh_root(root: Path) -> str:
    """A minbase bookworm in ``root`` (from the cached tarball, made on first use); returns
    how it was obtained."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test slots must not both debootstrap
        if not ROOT_TARBALL.exists():
            if shutil.which("debootstrap") is None:
                pytest.fail("debootstrap is missing: run `make setup` (APT list)")
            build = CACHE / "bootstrap.tmp"
            shutil.rmtree(build, ignore_errors=True)
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(build),
                            debian_mirror()], check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(build / "var/cache/apt/archives", ignore_errors=True)
            (build / "var/cache/apt/archives/partial").mkdir(parents=True)
            tmp = ROOT_TARBALL.with_suffix(".tmp")
            subprocess.run(f"tar -C {build} -cf - . | zstd -q -T0 -o {tmp} -f",
                           shell=True, check=True)
            tmp.rename(ROOT_TARBALL)
            shutil.rmtree(build)
            how = "debootstrap"
        else:
            how = "cached tarball"
    root.mkdir()
    subprocess.run(f"zstd -dc {ROOT_TARBALL} | tar -C {root} -xf -", shell=True, check=True)
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    return how


def push_busybox(registry: Registry, work: Path) -> str:
    entries = [File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)]
    entries += [Symlink(f"bin/{n}", "busybox") for n in ("sh", "cat", "id", "true")]
    entries += [File("etc/os-release", OS_RELEASE)]
    push_image(registry, "inst/busybox", "1", [build_layer(entries, "gzip", work)],
               {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"})
    return f"docker:{registry.host}/inst/busybox:1"


# What an admin edits in the packaged /etc/shifter/udiRoot.conf (the admin guide's list):
# the gateway, the system name, siteFs (this root has /home but no /scratch).
UDIROOT_EDITS = ("s|^imageGateway=.*|imageGateway=http://127.0.0.1:{gw_port}|; "
                 "s|^system=.*|system={system}|; "
                 "s|^siteFs=.*|siteFs=/home:/home|; /^ *\\/scratch:\\/scratch$/d")

# The main job, run by bash inside the root. Each step prints "== step"; the test reads
# the output. {placeholders} are filled by the test.
JOB = r"""set -euo pipefail
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
t() {{ date +%s.%N; }}
echo "== apt $(t)"
apt-get -q -o APT::Sandbox::User=root update >/dev/null
apt-get -q -y -o APT::Sandbox::User=root install --no-install-recommends \
    /debs/shifter-runtime_*.deb /debs/shifter-gateway_*.deb /debs/shifter-slurm_*.deb \
    > /var/log/apt-install.log
echo "== installed $(t)"
stat -c 'helper %a %U:%G' /usr/libexec/shifter/shifter-helper
stat -c 'setup %a %U:%G' /usr/libexec/shifter/shifter-setup
for t in docker-registry skopeo umoci charliecloud slurm-wlm slurmd mpich clang gcc; do
    if dpkg-query -W -f='${{Status}}' "$t" 2>/dev/null | grep -q 'ok installed'; then
        echo "test tool installed: $t"
    fi
done
sed -i -e '{udiroot_edits}' /etc/shifter/udiRoot.conf
grep -E '^(imageGateway|system|siteFs)=' /etc/shifter/udiRoot.conf
mkdir -p /var/udiMount /var/udiLoopMount

echo "== munge $(t)"
[ -e /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged

echo "== gateway $(t)"
python3 - <<'EOF'
import json
path = "/etc/shifter/imagemanager.json"
cfg = json.load(open(path))
cfg["DefaultImageLocation"] = "{reg_host}"
cfg["Locations"] = {{"{reg_host}": {{"remotetype": "dockerv2", "url": "{reg_url}"}}}}
cfg["Platforms"] = {{"{system}": {{"mungeSocketPath": "/run/munge/munge.socket.2",
    "accesstype": "local", "admins": ["root"],
    "local": {{"imageDir": "/var/lib/shifter/images"}}}}}}
json.dump(cfg, open(path, "w"), indent=2)
EOF
unit=/lib/systemd/system/shifter-imagegw.service
user=$(sed -n 's/^User=//p' $unit)
group=$(sed -n 's/^Group=//p' $unit)
envs=$(sed -n 's/^Environment=//p' $unit)
start=$(sed -n 's/^ExecStart=//p' $unit)
cmd=$(echo "$start" | sed 's/--bind [^ ]*/--bind 127.0.0.1:{gw_port}/')
[ "$cmd" != "$start" ]
echo "unit: $user:$group $envs $start"
env $envs runuser -u "$user" -g "$group" -- $cmd > /var/log/shifter-imagegw.log 2>&1 &
python3 - <<'EOF' || {{ cat /var/log/shifter-imagegw.log; exit 1; }}
import time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen("http://127.0.0.1:{gw_port}/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    raise SystemExit("gateway did not answer in 60 s")
EOF
python3 - <<'EOF'
import os, pwd
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{{pid}}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if any(b"/opt/shifter/gateway/" in a for a in argv):
        print("gateway process of", pwd.getpwuid(os.stat(f"/proc/{{pid}}").st_uid).pw_name)
EOF

echo "== user $(t)"
useradd -m -s /bin/sh {user}
as_user() {{ runuser -u {user} -- env -i PATH=/usr/bin:/bin HOME=/home/{user} "$@"; }}

echo "== pull $(t)"
as_user shifterimg pull {image} || {{ cat /var/log/shifter-imagegw.log; exit 1; }}

python3 -c 'import urllib.request; print(urllib.request.urlopen(
    "http://127.0.0.1:{gw_port}/metrics").read().decode())' | grep '^shifter_imagegw_pulls_total'
echo "== before-sync $(t)"
if as_user shifter --image={image} true 2>/tmp/before.err; then
    echo "shifter ran before the sync"; exit 1
fi
cat /tmp/before.err
echo "== sync $(t)"
# What shifter-etc-sync.timer starts: the packaged service's command.
$(sed -n 's/^ExecStart=//p' /lib/systemd/system/shifter-etc-sync.service)
echo "== shifter $(t)"
as_user shifter --image={image} cat /etc/os-release
as_user shifter --image={image} id -un
echo "== setupRoot $(t)"
# As a batch prolog would (root): the node's container prepared for the user, used by
# their next shifter, removed by unsetupRoot.
setupRoot -U "$(id -u {user})" -G "$(id -g {user})" -u {user} docker {image_tag}
as_user shifter --image={image} cat /etc/os-release
unsetupRoot
echo "setupRoot and unsetupRoot ran"
echo "== autoexpire $(t)"
# What shifter-imagegw-autoexpire.timer starts, as root (an admin of the platform).
$(sed -n 's/^ExecStart=//p' /lib/systemd/system/shifter-imagegw-autoexpire.service) \
    && echo "autoexpire ran"
echo "== done $(t)"
"""


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if (ln.split()[4] + "/").startswith(prefix)]


@pytest.fixture(scope="module")
def built_debs() -> tuple[dict[str, list[Path]], float]:
    """`make deb` once for the module: the packages by name, and how long it took."""
    t0 = time.monotonic()
    made = subprocess.run(["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, f"make deb failed:\n{made.stdout}\n{made.stderr[-4000:]}"
    took = time.monotonic() - t0
    debs = {name: sorted((REPO / "dist").glob(f"{name}_*.deb"))
            for name in ("shifter-runtime", "shifter-gateway", "shifter-slurm")}
    assert all(debs.values()), f"make deb did not write every package: {debs}"
    return debs, took


def test_packages_install_and_run_on_fresh_debian(
        tmp_path: Path, built_debs: tuple[dict[str, list[Path]], float]) -> None:
    debs, took = built_debs
    timings: dict[str, float] = {"make deb": took}
    info = subprocess.run(["dpkg-deb", "-f", str(debs["shifter-runtime"][-1]), "Depends"],
                          capture_output=True, text=True, check=True).stdout
    for tool in ("docker-registry", "skopeo", "umoci", "charliecloud", "slurm", "mpich",
                 "clang", "gcc"):
        assert tool not in info, f"the runtime package depends on the test tool {tool}: {info}"

    root = tmp_path / "root"
    try:
        run_in_fresh_root(root, debs, timings)
    finally:
        # The root holds a setuid helper: remove it, unless something is still mounted
        # under it (then removing would reach into what is mounted).
        if root.exists() and not mounts_under(root):
            shutil.rmtree(root)


def run_in_fresh_root(root: Path, debs: dict[str, list[Path]],
                      timings: dict[str, float]) -> None:
    tmp_path = root.parent
    t0 = time.monotonic()
    how = fresh_root(root)
    timings[f"root ({how})"] = time.monotonic() - t0
    (root / "debs").mkdir()
    for files in debs.values():
        shutil.copy(files[-1], root / "debs")
    for cache in (APT_ARCHIVES, APT_LISTS):
        (cache / "partial").mkdir(parents=True, exist_ok=True)

    gw_port = free_port()
    with Registry() as registry:
        image = push_busybox(registry, tmp_path)
        job = JOB.format(
            udiroot_edits=UDIROOT_EDITS.format(gw_port=gw_port, system=SYSTEM),
            gw_port=gw_port, system=SYSTEM, user=USER, image=image,
            image_tag=image.split(":", 1)[1],
            reg_host=registry.host, reg_url=registry.url)
        (root / "root/job.sh").write_text(job)
        enter = (
            # The root a mount point of its own, as / is on a node (the helper makes /
            # a slave mount, which a plain directory cannot be).
            "set -e; r=$1; mount --bind $r $r; "
            "mount --rbind /dev $r/dev; mount -t proc proc $r/proc; "
            "mount -t sysfs -o ro sysfs $r/sys; mount -t tmpfs tmpfs $r/run; "
            f"mount --bind {APT_ARCHIVES} $r/var/cache/apt/archives; "
            f"mount --bind {APT_LISTS} $r/var/lib/apt/lists; "
            "exec chroot $r /bin/bash /root/job.sh"
        )
        t0 = time.monotonic()
        proc = subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "--propagation", "private",
             "sh", "-c", enter, "enter", str(root)],
            capture_output=True, text=True, timeout=900)
        timings["install + main job in the root"] = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    steps = dict(re.findall(r"^== (\S+) (\d+\.\d+)$", proc.stdout, re.M))
    names = list(steps)
    for a, b in zip(names, names[1:], strict=False):
        timings[f"  {a}"] = float(steps[b]) - float(steps[a])
    print("\n".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=2))

    left = mounts_under(root)
    assert not left, f"mounts left under the root after its namespace ended: {left}"
    assert proc.returncode == 0, f"the main job failed in the fresh root (exit " \
        f"{proc.returncode}):\n{out[-6000:]}"
    assert "helper 4755 root:root" in out
    assert "setup 700 root:root" in out
    assert "gateway process of shifter" in out, out
    assert "test tool installed" not in out, out
    assert "Failed to lookup username" in out, out  # before shifter-etc-sync
    assert "Shifter install test image" in out
    assert re.search(rf"^{USER}$", proc.stdout, re.M), out
    assert "autoexpire ran" in out, out
    assert 'shifter_imagegw_pulls_total{state="READY"} 1.0' in out, out  # /metrics works
    assert "setupRoot and unsetupRoot ran" in out, out
    assert out.count("Shifter install test image") == 2, out


def test_rpm_packages_hold_what_the_debs_hold(
        built_debs: tuple[dict[str, list[Path]], float]) -> None:
    """`make rpm` (rpmbuild from packaging/shifter.spec) builds the same three packages:
    the same files as the .deb files (units under /usr/lib/systemd instead of /lib), the
    helper setuid root, configuration as %config, no test tool required."""
    made = subprocess.run(["make", "-s", "rpm"], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, f"make rpm failed:\n{made.stderr[-4000:]}"
    for role in ("runtime", "gateway", "slurm"):
        deb = built_debs[0][f"shifter-{role}"][-1]
        rpm = sorted((REPO / "dist").glob(f"shifter-{role}-*.rpm"))[-1]
        listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True,
                                 text=True, check=True).stdout
        deb_files = {re.sub(r"^\./", "/", ln.split(None, 5)[5].split(" -> ")[0]).rstrip("/")
                     for ln in listing.splitlines() if not ln.startswith("d")}
        deb_files = {f.replace("/lib/systemd/", "/usr/lib/systemd/", 1)
                     if f.startswith("/lib/") else f for f in deb_files}
        rpm_all = subprocess.run(["rpm", "-qlvp", str(rpm)], capture_output=True, text=True,
                                 check=True).stdout
        rpm_files = {ln.split(None, 8)[8].split(" -> ")[0] for ln in rpm_all.splitlines()
                     if not ln.startswith("d")}
        assert rpm_files == deb_files, (role, rpm_files ^ deb_files)
        requires = subprocess.run(["rpm", "-qp", "--requires", str(rpm)], capture_output=True,
                                  text=True, check=True).stdout
        for tool in ("docker-registry", "skopeo", "umoci", "charliecloud", "slurm-wlm",
                     "mpich", "clang", "gcc"):
            assert tool not in requires, (role, tool, requires)
        # The helper is the one set-id file of all three (shifter-setup is root's only).
        setid = [ln.split()[8] for ln in rpm_all.splitlines() if ln[3] in "sS" or ln[6] in "sS"]
        assert setid == (["/usr/libexec/shifter/shifter-helper"] if role == "runtime" else [])
        if role == "runtime":
            helper = next(ln for ln in rpm_all.splitlines()
                          if ln.endswith("/usr/libexec/shifter/shifter-helper"))
            assert helper.split()[0] == "-rwsr-xr-x" and helper.split()[2:4] == ["root", "root"]
        configs = subprocess.run(["rpm", "-qcp", str(rpm)], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert configs == sorted(f for f in deb_files if f.startswith("/etc/")), (role, configs)
