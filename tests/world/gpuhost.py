"""A fake NVIDIA driver on this GPU-less machine, laid out the way a real one is.

    host = FakeGpuHost.create(base, gpus=2)
    site.write_conf(**host.conf())          # gpuLdCache, gpuDeviceDir, gpuBinaryPath

What the helper sees is what a real node offers, in the same formats:

* ``lib64/libcuda.so.<ver>`` and ``lib64/libnvidia-ml.so.<ver>``: real 64-bit shared
  libraries (sonames ``libcuda.so.1``, ``libnvidia-ml.so.1``) exporting
  ``shifter_gpu_marker()``, which returns ``host-driver:<name>:<token>``; ``lib32/``
  holds a 32-bit ``libcuda`` (assembled with ``as --32``: no multilib toolchain needed);
* ``ld.so.cache``: made by the real ``ldconfig`` from a conf naming those dirs (plus the
  system's own dirs, as on a real node);
* ``dev/nvidiaN`` (char 195:N), ``dev/nvidiactl`` (195:255), ``dev/nvidia-modeset``
  (195:254), ``dev/nvidia-uvm`` (a dynamic major, as on a real node), made with mknod;
* ``bin/nvidia-smi``: a shell script (the images have busybox ``sh``).

``program_tree`` copies a dynamically linked program and its ``ldd`` closure into an
image tree, for programs that must ``dlopen`` inside the container.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

MARKER_C = """
const char *shifter_gpu_marker(void) { return "host-driver:%(name)s:%(token)s"; }
"""
MARKER_I386_S = """
.text
.globl shifter_gpu_marker
.type shifter_gpu_marker, @function
shifter_gpu_marker:
    ret
"""
PROBE_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>

/* For each library named: dlopen it by name, call its marker, print where it came from. */
int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        void *h = dlopen(argv[i], RTLD_NOW);
        const char *(*marker)(void);
        struct link_map *lm = NULL;
        if (h == NULL) {
            printf("%s: dlopen failed: %s\n", argv[i], dlerror());
            return 2;
        }
        marker = (const char *(*)(void))dlsym(h, "shifter_gpu_marker");
        if (dlinfo(h, RTLD_DI_LINKMAP, &lm) != 0)
            lm = NULL;
        printf("%s %s %s\n", argv[i], marker ? marker() : "no-marker", lm ? lm->l_name : "?");
    }
    return 0;
}
"""
DRIVER_VERSION = "999.12"


def _cc(*args: str) -> None:
    subprocess.run(["gcc", *args], check=True)


def shared_library(out: Path, soname: str, body: str) -> Path:
    src = out.with_name(out.name + ".c")
    src.write_text(body)
    _cc("-shared", "-fPIC", "-O1", f"-Wl,-soname,{soname}", "-o", str(out), str(src))
    src.unlink()
    return out


class FakeGpuHost:
    def __init__(self, base: Path, gpus: int) -> None:
        self.base = base
        self.gpus = gpus
        self.token = secrets.token_hex(6)
        self.lib64 = base / "lib64"
        self.lib32 = base / "lib32"
        self.dev = base / "dev"
        self.bin = base / "bin"
        self.cache = base / "ld.so.cache"
        self.ld_conf = base / "ld.so.conf"

    @classmethod
    def create(cls, base: Path, gpus: int = 2, extra_libraries: tuple[str, ...] = ()
               ) -> FakeGpuHost:
        """``extra_libraries``: more driver library names (``libnvidia-cfg``, …), each
        made with its soname and an unversioned link, as a real driver's are (the
        benchmark makes the whole default list)."""
        host = cls(base, gpus)
        for d in (base, host.lib64, host.lib32, host.dev, host.bin):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        for name in ("libcuda", "libnvidia-ml", *extra_libraries):
            shared_library(host.lib64 / f"{name}.so.{DRIVER_VERSION}", f"{name}.so.1",
                           MARKER_C % {"name": name, "token": host.token})
            if name in extra_libraries:
                (host.lib64 / f"{name}.so").symlink_to(f"{name}.so.1")
        obj = host.lib32 / "marker.o"
        subprocess.run(["as", "--32", "-o", str(obj), "-"], input=MARKER_I386_S.encode(),
                       check=True)
        subprocess.run(["ld", "-m", "elf_i386", "-shared", "-soname", "libcuda.so.1", "-o",
                        str(host.lib32 / f"libcuda.so.{DRIVER_VERSION}"), str(obj)], check=True)
        obj.unlink()
        # Something that is not the driver, to see that only the listed libraries go in.
        shared_library(host.lib64 / "libcudart.so.12.0", "libcudart.so.12",
                       MARKER_C % {"name": "libcudart", "token": host.token})
        host.ld_conf = base / "ld.so.conf"
        host.ld_conf.write_text(f"include /etc/ld.so.conf.d/*.conf\n{host.lib64}\n{host.lib32}\n")
        host.make_cache(host.cache)
        for n in range(gpus):
            host.mknod(f"nvidia{n}", 195, n)
        host.mknod("nvidiactl", 195, 255)
        host.mknod("nvidia-modeset", 195, 254)
        host.mknod("nvidia-uvm", 509, 0)
        smi = host.bin / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho 'fake nvidia-smi {host.token}'\n")
        os.chmod(smi, 0o755)
        return host

    def make_cache(self, path: Path, fmt: str = "new") -> Path:
        """The ld.so cache of this driver (``fmt``: ``new``, or ``compat``, the old table
        followed by the new one, as glibc before 2.32 wrote by default)."""
        subprocess.run(["ldconfig", "-c", fmt, "-C", str(path), "-f", str(self.ld_conf)],
                       check=True)
        os.chmod(path, 0o644)
        return path

    def mknod(self, name: str, major: int, minor: int) -> None:
        path = self.dev / name
        if not path.exists():
            os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(path, 0o666)

    def conf(self) -> dict[str, str]:
        return {"gpuLdCache": str(self.cache), "gpuDeviceDir": str(self.dev),
                "gpuBinaryPath": str(self.bin)}

    def marker(self, name: str) -> str:
        return f"host-driver:{name}:{self.token}"


def _ldd_closure(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    paths = []
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("/"):
                paths.append(Path(word))
    return paths


def program_tree(root: Path, name: str, source: str, *, extra_args: tuple[str, ...] = ()
                 ) -> Path:
    """Compile ``source`` as ``/usr/bin/<name>`` in ``root`` with its libraries (glibc and
    the loader, at the host's paths), so that it runs in a container of that tree."""
    build = root.parent / f"{name}-build"
    build.mkdir(exist_ok=True)
    src = build / f"{name}.c"
    src.write_text(source)
    binary = build / name
    _cc("-O1", "-o", str(binary), str(src), *extra_args)
    dest = root / "usr" / "bin" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(binary, dest)
    os.chmod(dest, 0o755)
    for lib in _ldd_closure(binary):
        target = root / str(lib).lstrip("/")
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib.resolve(), target)
        os.chmod(target, 0o755)
    return dest
