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
* ``bin/nvidia-smi``: a shell script (the images have busybox ``sh``); ``nvidia-smi -L``
  lists the GPUs and MIG devices with their UUIDs, in the driver's format;
* ``proc/`` (the site's ``gpuProcDir``, ``/proc/driver`` on a real node):
  ``nvidia/gpus/<bus id>/information`` with each GPU's ``GPU UUID`` and ``Device Minor``,
  and, for the MIG instances of ``mig`` (``{gpu: [(gi, ci, uuid), …]}``),
  ``nvidia/capabilities/gpuN/mig/giG[/ciC]/access`` (``DeviceFileMinor``) and
  ``nvidia-caps/mig-minors``, the minors numbered as the driver numbers them; the nodes
  ``dev/nvidia-caps/nvidia-capN`` (a dynamic major, mode 0444 as the driver makes them);
* ``libnvidia-ml`` answers the NVML calls Slurm's gres/nvml plugin makes for MIG devices
  (``nvmlDeviceGetHandleByUUID``, parent handle, minor, GPU and compute instance ids)
  from the same table.

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
NVML_C = r"""
#include <string.h>
/* A fake NVML: the devices of this fake driver, GPUs (parent -1) and MIG instances. */
struct dev { const char *uuid; unsigned minor, gi, ci; int parent; };
static const struct dev devs[] = { %(rows)s };
#define N_DEVS (sizeof devs / sizeof devs[0])
static int inited;
int nvmlInit_v2(void) { inited = 1; return 0; }
int nvmlShutdown(void) { inited = 0; return 0; }
int nvmlDeviceGetHandleByUUID(const char *uuid, const struct dev **h)
{
    if (!inited)
        return 1;
    for (unsigned i = 0; i < N_DEVS; i++)
        if (strcmp(devs[i].uuid, uuid) == 0) {
            *h = &devs[i];
            return 0;
        }
    return 6;
}
int nvmlDeviceGetDeviceHandleFromMigDeviceHandle(const struct dev *h, const struct dev **p)
{
    if (h->parent < 0)
        return 2;
    *p = &devs[h->parent];
    return 0;
}
int nvmlDeviceGetMinorNumber(const struct dev *h, unsigned *v)
{
    if (h->parent >= 0)
        return 3;
    *v = h->minor;
    return 0;
}
int nvmlDeviceGetUUID(const struct dev *h, char *buf, unsigned len)
{
    if (strlen(h->uuid) >= len)
        return 7;
    strcpy(buf, h->uuid);
    return 0;
}
int nvmlDeviceGetGpuInstanceId(const struct dev *h, unsigned *v)
{
    if (h->parent < 0)
        return 2;
    *v = h->gi;
    return 0;
}
int nvmlDeviceGetComputeInstanceId(const struct dev *h, unsigned *v)
{
    if (h->parent < 0)
        return 2;
    *v = h->ci;
    return 0;
}
"""
DRIVER_VERSION = "999.12"
CAPS_MAJOR = 508  # nvidia-caps, a dynamic major as on a real node


def mig_minor(gpu: int, gi: int, ci: int | None = None) -> int:
    """The nvidia-cap minor the driver gives a GPU instance (``ci`` None) or a compute
    instance: 1 and 2 are config and monitor, then 9 per GPU instance (its access and
    8 compute instances), 15 GPU instances per GPU."""
    base = 3 + gpu * 15 * 9 + gi * 9
    return base if ci is None else base + 1 + ci


def fake_uuid(prefix: str) -> str:
    h = secrets.token_hex(16)
    return f"{prefix}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
        self.uuids = [fake_uuid("GPU") for _ in range(gpus)]
        self.mig: dict[int, list[tuple[int, int, str]]] = {}
        self.proc = base / "proc"
        self.lib64 = base / "lib64"
        self.lib32 = base / "lib32"
        self.dev = base / "dev"
        self.bin = base / "bin"
        self.cache = base / "ld.so.cache"
        self.ld_conf = base / "ld.so.conf"

    @classmethod
    def create(cls, base: Path, gpus: int = 2, extra_libraries: tuple[str, ...] = (),
               mig: dict[int, list[tuple[int, int]]] | None = None) -> FakeGpuHost:
        """``extra_libraries``: more driver library names (``libnvidia-cfg``, …), each
        made with its soname and an unversioned link, as a real driver's are (the
        benchmark makes the whole default list). ``mig``: ``{gpu: [(gi, ci), …]}``, the
        MIG instances of GPUs in MIG mode (each gets a ``MIG-`` UUID)."""
        host = cls(base, gpus)
        host.mig = {g: [(gi, ci, fake_uuid("MIG")) for gi, ci in insts]
                    for g, insts in (mig or {}).items()}
        for d in (base, host.lib64, host.lib32, host.dev, host.bin):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        for name in ("libcuda", "libnvidia-ml", *extra_libraries):
            body = MARKER_C % {"name": name, "token": host.token}
            if name == "libnvidia-ml":
                body += NVML_C % {"rows": host._nvml_rows()}
            shared_library(host.lib64 / f"{name}.so.{DRIVER_VERSION}", f"{name}.so.1", body)
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
        host.write_proc()
        smi = host.bin / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nif [ \"$1\" = -L ]; then cat <<'EOF'\n{host.smi_list()}EOF\n"
                       f"else echo 'fake nvidia-smi {host.token}'; fi\n")
        os.chmod(smi, 0o755)
        return host

    def _nvml_rows(self) -> str:
        rows = [f'{{"{u}", {n}, 0, 0, -1}}' for n, u in enumerate(self.uuids)]
        for gpu, insts in sorted(self.mig.items()):
            rows += [f'{{"{u}", 0, {gi}, {ci}, {gpu}}}' for gi, ci, u in insts]
        return ", ".join(rows)

    def bus_id(self, gpu: int) -> str:
        return f"00000000:{0x07 + gpu:02X}:00.0"

    def write_proc(self) -> None:
        """The driver's /proc/driver tables (see the module's docstring)."""
        minors = ["config 1", "monitor 2"]
        for gpu, uuid in enumerate(self.uuids):
            d = self.proc / "nvidia" / "gpus" / self.bus_id(gpu).lower()[4:]
            d.mkdir(parents=True, exist_ok=True)
            (d / "information").write_text(
                f"Model: \t\t NVIDIA A100-SXM4-40GB\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\n"
                f"Video BIOS: \t 92.00.36.00.01\nBus Type: \t PCIe\nDMA Size: \t 47 bits\n"
                f"DMA Mask: \t 0x7fffffffffff\nBus Location: \t {self.bus_id(gpu)}\n"
                f"Device Minor: \t {gpu}\nGPU Excluded:\t No\n")
            for gi in range(15):
                minors.append(f"gpu{gpu}/gi{gi}/access {mig_minor(gpu, gi)}")
                minors += [f"gpu{gpu}/gi{gi}/ci{ci}/access {mig_minor(gpu, gi, ci)}"
                           for ci in range(8)]
        for gpu, insts in self.mig.items():
            for gi, ci, _ in insts:
                gdir = self.proc / "nvidia" / "capabilities" / f"gpu{gpu}" / "mig" / f"gi{gi}"
                (gdir / f"ci{ci}").mkdir(parents=True, exist_ok=True)
                for path, minor in ((gdir / "access", mig_minor(gpu, gi)),
                                    (gdir / f"ci{ci}" / "access", mig_minor(gpu, gi, ci))):
                    path.write_text(f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\n"
                                    "DeviceFileModify: 1\n")
                    self.mknod(f"nvidia-caps/nvidia-cap{minor}", CAPS_MAJOR, minor, 0o444)
        caps = self.proc / "nvidia-caps"
        caps.mkdir(parents=True, exist_ok=True)
        (caps / "mig-minors").write_text("\n".join(minors) + "\n")
        for path in (self.proc, *self.proc.rglob("*")):
            os.chmod(path, 0o755 if path.is_dir() else 0o444)

    def cdi_spec(self, directory: Path, *, fmt: str = "yaml", hooks: str = "",
                 extra_common: str = "", name: str = "nvidia") -> Path:
        """The spec ``nvidia-ctk cdi generate`` writes for this driver (its layout and
        quoting; device names by index and by UUID, MIG devices as ``<gpu>:<n>`` and by
        UUID, ``all``), root's, 0644, in ``directory`` (made 0755). ``hooks``: YAML lines
        for the spec's ``containerEdits.hooks``; ``extra_common``: more YAML lines under
        the spec's ``containerEdits``. ``fmt="json"``: the same spec as JSON."""
        def nodes(*rels: str) -> str:
            return "".join(f"            - path: /dev/{r}\n"
                           f"              hostPath: {self.dev}/{r}\n" for r in rels)

        devices = ""
        for gpu, uuid in enumerate(self.uuids):
            for dev_name in (f'"{gpu}"', uuid):
                devices += (f"    - name: {dev_name}\n      containerEdits:\n"
                            f"        deviceNodes:\n{nodes(f'nvidia{gpu}')}")
            for n, (gi, ci, mig) in enumerate(self.mig.get(gpu, [])):
                caps = (f"nvidia-caps/nvidia-cap{mig_minor(gpu, gi)}",
                        f"nvidia-caps/nvidia-cap{mig_minor(gpu, gi, ci)}")
                for dev_name in (f'"{gpu}:{n}"', mig):
                    devices += (f"    - name: {dev_name}\n      containerEdits:\n"
                                f"        deviceNodes:\n{nodes(f'nvidia{gpu}', *caps)}")
        all_nodes = nodes(*[f"nvidia{g}" for g in range(self.gpus)])
        text = (f"---\ncdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n{devices}"
                f"    - name: all\n      containerEdits:\n        deviceNodes:\n"
                + all_nodes
                + "containerEdits:\n    env:\n        - NVIDIA_VISIBLE_DEVICES=void\n"
                f"        - NVIDIA_CTK_LIBCUDA_DIR={self.lib64}\n"
                "    deviceNodes:\n"
                + nodes("nvidiactl", "nvidia-uvm", "nvidia-modeset").replace(
                    "            ", "        ")
                + (f"    hooks:\n{hooks}" if hooks else "")
                + "    mounts:\n"
                f"        - hostPath: {self.lib64}/libcuda.so.{DRIVER_VERSION}\n"
                f"          containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so."
                f"{DRIVER_VERSION}\n"
                "          options:\n            - ro\n            - nosuid\n"
                "            - nodev\n            - bind\n"
                f"        - hostPath: {self.bin}/nvidia-smi\n"
                "          containerPath: /usr/bin/nvidia-smi\n"
                "          options:\n            - ro\n            - nosuid\n"
                "            - nodev\n            - bind\n"
                + extra_common)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
        path = directory / f"{name}.{fmt}"
        if fmt == "json":
            import json

            import yaml
            text = json.dumps(yaml.safe_load(text), indent=2)
        path.write_text(text)
        os.chmod(path, 0o644)
        return path

    def smi_list(self) -> str:
        """``nvidia-smi -L`` of this driver."""
        out = ""
        for gpu, uuid in enumerate(self.uuids):
            out += f"GPU {gpu}: NVIDIA A100-SXM4-40GB (UUID: {uuid})\n"
            for n, (_, _, mig) in enumerate(self.mig.get(gpu, [])):
                out += f"  MIG 1g.5gb     Device  {n}: (UUID: {mig})\n"
        return out

    def make_cache(self, path: Path, fmt: str = "new") -> Path:
        """The ld.so cache of this driver (``fmt``: ``new``, or ``compat``, the old table
        followed by the new one, as glibc before 2.32 wrote by default)."""
        subprocess.run(["ldconfig", "-c", fmt, "-C", str(path), "-f", str(self.ld_conf)],
                       check=True)
        os.chmod(path, 0o644)
        return path

    def mknod(self, name: str, major: int, minor: int, mode: int = 0o666) -> None:
        path = self.dev / name
        path.parent.mkdir(mode=0o755, exist_ok=True)
        if not path.exists():
            os.mknod(path, mode | 0o020000, os.makedev(major, minor))
        os.chmod(path, mode)

    def conf(self) -> dict[str, str]:
        return {"gpuLdCache": str(self.cache), "gpuDeviceDir": str(self.dev),
                "gpuBinaryPath": str(self.bin), "gpuProcDir": str(self.proc)}

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
