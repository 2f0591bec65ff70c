"""The README's first command: a demo of the main job on a machine without registry access.

Starts a real local registry, builds a small demo image (Debian's static busybox, an
``/etc/os-release``, users) and pushes it, then converts it with ``shifter-convert`` into
the image dir and shows what landed there. ``make demo`` runs it with the project's venv.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from world.imagebuild import File, Symlink, build_layer, push_image  # noqa: E402
from world.registry import Registry  # noqa: E402

BUSYBOX = Path("/bin/busybox")
OS_RELEASE = """PRETTY_NAME="Shifter demo image (BusyBox)"
NAME="Shifter demo"
ID=shifter-demo
VERSION_ID=1
"""
APPLETS = ("sh", "cat", "ls", "echo", "id", "env", "true", "false", "uname", "whoami")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_images = "/var/lib/shifter/images" if os.geteuid() == 0 else "./demo-images"
    parser.add_argument("--image-dir", default=default_images)
    parser.add_argument("--state-dir", default=None, help="cache and expand dirs")
    args = parser.parse_args()
    if not BUSYBOX.exists():
        print("ERROR: /bin/busybox is missing: run 'make setup' (Debian busybox-static)")
        return 1
    with tempfile.TemporaryDirectory() as work, Registry() as registry:
        image = f"{registry.host}/demo/busybox:latest"
        push_image(registry, "demo/busybox", "latest", demo_layers(Path(work)),
                   {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"})
        print(f"== demo registry at {registry.url} serves {image}")
        cmd = [sys.executable, "-m", "imagegw.convert_cli", "--image-dir", args.image_dir]
        if args.state_dir:
            cmd += ["--state-dir", args.state_dir]
        print("== " + " ".join(["shifter-convert", *cmd[3:], image]))
        proc = subprocess.run([*cmd, image], stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            return proc.returncode
        image_id = proc.stdout.strip()
    images = Path(args.image_dir)
    print(f"== image id {image_id}; in {images}:")
    for suffix in ("squashfs", "meta"):
        path = images / f"{image_id}.{suffix}"
        print(f"   {path.name}  {path.stat().st_size} bytes")
    print(f"== {image_id}.meta:")
    print((images / f"{image_id}.meta").read_text(), end="")
    print("== /etc/os-release inside the squashfs:")
    subprocess.run(["unsquashfs", "-cat", str(images / f"{image_id}.squashfs"),
                    "etc/os-release"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
