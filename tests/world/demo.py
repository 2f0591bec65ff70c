"""The README's first command (``sudo make demo``): the whole main job on this machine.

1. ``make install`` has already put ``shifter``, ``setupRoot``, ``unsetupRoot`` and the
   setuid helper in place; this writes a site ``/etc/shifter/udiRoot.conf`` when there is
   none (an existing one is used as it is).
2. Starts munge (a private daemon and key) and the image gateway on its embedded default
   (records in a SQLite file, no MongoDB), with ``imageDir`` = the runtime's ``imagePath``.
3. Makes an image available: ``--image REF`` pulls REF from its registry (for a machine
   with registry access); without it, a small demo image (Debian's static busybox and an
   ``/etc/os-release``) is built and served from a local registry on 127.0.0.1.
4. As the unprivileged user ``shifter-demo`` (created if missing; ``shifter-etc-sync`` then
   refreshes ``etcPath``'s passwd and group, as a site's timer does):
   ``shifterimg pull IMAGE`` then ``shifter --image=IMAGE cat /etc/os-release``.

The gateway, registry and munged it started are stopped at the end; the pulled image
stays in ``imagePath``, so ``shifter`` keeps working with it afterwards.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from world.gateway import Gateway  # noqa: E402
from world.imagebuild import File, Symlink, build_layer, push_image  # noqa: E402
from world.munge import Munged  # noqa: E402
from world.registry import Registry  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SITE_CONF = Path("/etc/shifter/udiRoot.conf")
IMAGE_PATH = Path("/var/lib/shifter/images")
ETC_PATH = Path("/etc/shifter/shifter_etc_files")
ETC_SYNC = "/usr/local/sbin/shifter-etc-sync"
DEMO_USER = "shifter-demo"
BUSYBOX = Path("/bin/busybox")
OS_RELEASE = """PRETTY_NAME="Shifter demo image (BusyBox)"
NAME="Shifter demo"
ID=shifter-demo
VERSION_ID=1
"""
APPLETS = ("sh", "cat", "ls", "echo", "id", "env", "true", "false", "uname", "whoami")

SITE_CONF_TEXT = """# Written by `make demo` for this machine (an existing file is never replaced).
udiMount=/var/udiMount
loopMount=/var/udiLoopMount
imagePath={image_path}
udiRootPath={repo}
etcPath={etc_path}
rootfsType=tmpfs
modprobePath=/sbin/modprobe
insmodPath=/sbin/insmod
cpPath=/bin/cp
mvPath=/bin/mv
chmodPath=/bin/chmod
ddPath=/bin/dd
mkfsXfsPath=/sbin/mkfs.xfs
perNodeCachePath=/tmp
perNodeCacheSizeLimit=200G
perNodeCacheAllowedFsType=xfs
allowLocalChroot=0
mountUdiRootWritable=0
maxGroupCount=31
mountPropagationStyle=slave
siteFs=/home:/home
siteEnv=SHIFTER_RUNTIME=1
system=demo
defaultImageType=docker
"""


def demo_layers(workdir: Path) -> list:
    """One layer: busybox with a few applet links, os-release, passwd and group."""
    entries = [File("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)]
    entries += [Symlink(f"bin/{name}", "busybox") for name in APPLETS]
    entries += [
        File("etc/os-release", OS_RELEASE),
        File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        File("etc/group", "root:x:0:\n"),
    ]
    return [build_layer(entries, "gzip", workdir)]


def site_config() -> dict[str, str]:
    """Write the site's udiRoot.conf if there is none; return its key=value pairs."""
    if not SITE_CONF.exists():
        SITE_CONF.parent.mkdir(parents=True, exist_ok=True)
        ETC_PATH.mkdir(parents=True, exist_ok=True)  # filled by shifter-etc-sync
        SITE_CONF.write_text(SITE_CONF_TEXT.format(image_path=IMAGE_PATH, repo=REPO,
                                                   etc_path=ETC_PATH))
        os.chmod(SITE_CONF, 0o644)
        print(f"== wrote {SITE_CONF}")
    else:
        print(f"== using the existing {SITE_CONF}")
    conf = {}
    for line in SITE_CONF.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            conf[key.strip()] = value.strip()
    return conf


def demo_user() -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(DEMO_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--user-group", DEMO_USER], check=True)
        pw = pwd.getpwnam(DEMO_USER)
    # etcPath must know the user (the runtime reads names from there, not from the name
    # service): refresh it as a site's shifter-etc-sync.timer does.
    subprocess.run([ETC_SYNC, "--config", str(SITE_CONF)], check=True)
    return pw


site_config_cache: dict[str, str] = {}


def as_user(pw: pwd.struct_passwd, argv: list[str], env: dict[str, str]) -> int:
    print("$ " + " ".join(argv), flush=True)
    return subprocess.run(
        argv, env=env, cwd=pw.pw_dir, user=pw.pw_uid, group=pw.pw_gid,
        extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid),
    ).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="pull this image from its registry instead of the "
                        "demo image (needs registry access), e.g. ubuntu:22.04")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("ERROR: the demo installs a site configuration: run it as root (sudo make demo)")
        return 1
    for tool in ("/usr/local/bin/shifter", "/usr/local/libexec/shifter/shifter-helper",
                 ETC_SYNC):
        if not os.path.exists(tool):
            print(f"ERROR: {tool} is missing: run 'sudo make install'")
            return 1
    site_config_cache.update(site_config())
    image_path = Path(site_config_cache["imagePath"])
    for key in ("imagePath", "udiMount", "loopMount"):
        Path(site_config_cache[key]).mkdir(parents=True, exist_ok=True)
    os.chmod(image_path, 0o755)
    pw = demo_user()
    state = Path(tempfile.mkdtemp(prefix="shifter-demo-"))
    os.chmod(state, 0o755)
    with Munged() as munged, Registry() as registry:
        image = args.image
        if image is None:
            image = f"{registry.host}/demo/busybox:latest"
            push_image(registry, "demo/busybox", "latest", demo_layers(state),
                       {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"})
            print(f"== demo registry at {registry.url} serves {image}")
        system = site_config_cache.get("system", "demo")
        gw = Gateway(state / "gateway", munge_socket=munged.socket, registry=registry,
                     extra={"Platforms": {system: {
                         "mungeSocketPath": munged.socket, "accesstype": "local",
                         "admins": ["root"], "local": {"imageDir": str(image_path)}}}})
        gw.system = system
        with gw:
            print(f"== image gateway at {gw.url} (records in {gw.config['StateDirectory']})")
            # The client's view of the site: the same config, with this gateway's address.
            client_conf = state / "udiRoot.conf"
            kept = [ln for ln in SITE_CONF.read_text().splitlines()
                    if not ln.startswith(("imageGateway=", "system="))]
            client_conf.write_text("\n".join(kept) + f"\nimageGateway={gw.url}\n"
                                   f"system={system}\n")
            os.chmod(client_conf, 0o644)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": pw.pw_dir,
                   "USER": pw.pw_name, "LANG": "C.UTF-8", "MUNGE_SOCKET": munged.socket,
                   "SHIFTER_UDIROOT_CONF": str(client_conf)}
            rc = as_user(pw, ["shifterimg", "pull", image], env)
            if rc != 0:
                print(f"ERROR: shifterimg pull failed (exit {rc})\n{gw.log()}")
                return rc
            rc = as_user(pw, ["shifter", f"--image={image}", "cat", "/etc/os-release"], env)
    shutil.rmtree(state, ignore_errors=True)
    if rc != 0:
        print(f"ERROR: shifter exited {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
