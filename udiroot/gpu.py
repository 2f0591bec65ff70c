"""Which GPUs a launch asks for, and what that does to the environment (docs/behaviour.md, 'Runtime:
GPU').

GPU support is requested by ``--gpu`` (bare: every GPU of the node; ``--gpu=0,1``: those
device indexes) or, as Shifter did, by ``CUDA_VISIBLE_DEVICES`` being set, non-empty and
not ``NoDevFiles``; ``--gpu`` wins over the variable. The indexes are those of
``/dev/nvidiaN``; GPU and MIG UUIDs are turned into device numbers by
:mod:`udiroot.gpuids`, and the site's CDI specs add their part (:mod:`udiroot.cdi`).
Inside a Slurm step whose devices are constrained by cgroups,
``CUDA_VISIBLE_DEVICES`` counts from 0 among the step's GPUs while ``SLURM_STEP_GPUS``
(``SLURM_JOB_GPUS`` in the batch step) names the node's real ones: when that list is set
and as long, it picks the device nodes. This module reads the request, finds the
driver's files (:func:`driver_files`, below) and layers the environment; the setuid helper
checks that each requested GPU exists and binds the files it is given, each opened with the
caller's own rights (a caller who bypasses this module can only put files they can read
into their own container):

* ``LD_LIBRARY_PATH`` gets ``<siteResources>/gpu/lib64:<siteResources>/gpu/lib`` in
  front, so the host's driver wins over any copy of ``libcuda`` in the image (a driver
  library must match the running kernel module);
* ``PATH`` gets ``<siteResources>/gpu/bin`` at the end (the image's tools win);
* with explicit indexes, ``CUDA_VISIBLE_DEVICES`` becomes ``0,…,n-1``: only the selected
  device nodes exist in the container, and CUDA numbers the devices it can open from 0;
  with UUIDs it is the UUIDs (CUDA finds a device by UUID whatever it sees).
"""

from __future__ import annotations

import posix
import stat
import struct

from udiroot.gpuids import GpuIdError, Resolved, is_uuid, resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from udiroot.cdi import Plan

DEFAULT_SITE_RESOURCES = "/opt/shifter/site-resources"
DEFAULT_LD_CACHE = "/etc/ld.so.cache"
DEFAULT_LIBRARIES = (
    "libcuda libnvidia-ml libnvidia-ptxjitcompiler libnvidia-fatbinaryloader "
    "libnvidia-compiler libnvidia-encode libnvidia-opencl libnvcuvid libnvidia-nvvm "
    "libnvidia-cfg libnvidia-allocator libnvidia-gpucomp libcudadebugger"
)
DEFAULT_BINARIES = (
    "nvidia-smi nvidia-debugdump nvidia-persistenced nvidia-cuda-mps-control "
    "nvidia-cuda-mps-server"
)
DEFAULT_BINARY_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LD_CACHE_MAX = 64 * 1024 * 1024
MAX_FILES = 256  # as the helper accepts
MAX_PATH = 4096
FAILED = "FAILED to set up GPU support"
MAX_GPUS = 64  # /dev/nvidia0 .. /dev/nvidia63, as the helper accepts
ALL = "all"


class GpuError(ValueError):
    """A malformed GPU request; the message names it and says what is expected."""


def parse_gpu_list(text: str, source: str) -> list[int | str]:
    """``0,2`` → ``[0, 2]``; ``GPU-…,MIG-…`` → the UUIDs (one kind per list: CUDA counts an
    index among the devices it sees, a UUID names one outright). ``source`` names where
    the text came from, for messages."""
    selectors: list[int | str] = []
    for piece in text.split(","):
        piece = piece.strip()
        sel: int | str
        if piece.isdigit() and piece.isascii() and int(piece) < MAX_GPUS:
            sel = int(piece)
        elif is_uuid(piece):
            sel = piece
        else:
            raise GpuError(
                f"Invalid {source} '{text}': expected GPU indexes from 0 to {MAX_GPUS - 1} "
                "such as 0,1, or GPU UUIDs (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, MIG-…)"
            )
        if sel in selectors:
            raise GpuError(f"Invalid {source} '{text}': GPU {sel} is given twice")
        selectors.append(sel)
    if len({type(s) for s in selectors}) > 1:
        raise GpuError(f"Invalid {source} '{text}': give either indexes or UUIDs, not both")
    return selectors


def requested_gpus(
    option_given: bool, option: str | None, environ: Mapping[str, str]
) -> list[int | str] | str | None:
    """``None`` (no GPU support), ``"all"``, or the indexes or UUIDs asked for."""
    if option_given:
        return ALL if option is None else parse_gpu_list(option, "--gpu")
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible.strip() == "" or visible == "NoDevFiles":
        return None
    selectors = parse_gpu_list(visible, "CUDA_VISIBLE_DEVICES")
    if isinstance(selectors[0], str):
        return selectors  # UUIDs name the devices whatever the step's numbering
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(name, "").strip():
            slurm = parse_gpu_list(environ[name], name)
            return slurm if len(slurm) == len(selectors) else selectors
    return selectors


def helper_argument(gpus: list[int] | str) -> str:
    return gpus if isinstance(gpus, str) else ",".join(str(i) for i in gpus)


def node_gpus(gpus: list[int | str] | str, cfg: Mapping[str, str],
              nvml: str | None = None) -> Resolved:
    """The device nodes for the helper: ``all`` becomes every ``nvidiaN`` character
    device of ``gpuDeviceDir`` (default ``/dev``); UUIDs are looked up in the driver's
    tables (:mod:`udiroot.gpuids`); each GPU must be a device there, and each MIG
    instance's ``nvidia-caps/nvidia-capN`` too. The helper checks each again; this gives
    the messages."""
    where = cfg.get("gpuDeviceDir") or "/dev"
    present = []
    try:
        names = posix.listdir(where)
    except OSError as exc:
        raise GpuError(f"{FAILED}: cannot read the device dir {where}: {exc.strerror}") from None
    for name in names:
        number = name[6:]
        if not (name.startswith("nvidia") and number.isdigit() and number.isascii()
                and str(int(number)) == number and int(number) < MAX_GPUS):
            continue
        if _is_char_device(f"{where}/{name}"):
            present.append(int(number))
    present.sort()
    if not present:
        raise GpuError(f"{FAILED}: GPUs were requested but this node has no GPU devices "
                       f"(no {where}/nvidiaN). Run without --gpu, or on a GPU node.")
    if isinstance(gpus, str):
        gpus = list(present)
    try:
        resolved = resolve(gpus, cfg.get("gpuProcDir"), nvml)
    except GpuIdError as exc:
        raise GpuError(str(exc)) from None
    for index, sel in zip(resolved.gpus, gpus, strict=False):
        if index not in present:
            have = ",".join(str(n) for n in present)
            what = f"GPU {sel}" if isinstance(sel, int) else f"{sel} (GPU {index})"
            raise GpuError(f"{FAILED}: {what} was requested but this node has no "
                           f"{where}/nvidia{index} (its GPUs: {have})")
    for index in resolved.gpus:
        if index not in present:
            raise GpuError(f"{FAILED}: this node has no {where}/nvidia{index}")
    for cap in resolved.caps:
        if not _is_char_device(f"{where}/nvidia-caps/nvidia-cap{cap}"):
            raise GpuError(f"{FAILED}: the MIG device {where}/nvidia-caps/nvidia-cap{cap} "
                           "is missing (is nvidia-modprobe -f /proc/driver/nvidia-caps/"
                           "mig-minors run on this node?)")
    return resolved


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(posix.lstat(path).st_mode)
    except OSError:
        return False


def nvml_library(files: list[str]) -> str | None:
    """The host's ``libnvidia-ml.so.1`` among :func:`driver_files` output."""
    for spec in files:
        if spec.startswith("lib64/libnvidia-ml.so.1="):
            return spec.split("=", 1)[1]
    return None


def apply_gpu_env(env: dict[str, str], gpus: list[int | str] | str,
                  site_resources: str | None) -> None:
    """The GPU layer of the environment (after ``--env``, before the modules and the site)."""
    base = (site_resources or DEFAULT_SITE_RESOURCES).rstrip("/") + "/gpu"
    libs = f"{base}/lib64:{base}/lib"
    current = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{libs}:{current}" if current else libs
    current = env.get("PATH")
    env["PATH"] = f"{current}:{base}/bin" if current else f"{base}/bin"
    if isinstance(gpus, list) and gpus and isinstance(gpus[0], str):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(u) for u in gpus)  # UUIDs stay valid
    elif not isinstance(gpus, str):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))


# -- the driver's files ---------------------------------------------------------------------
#
# The ld.so cache as glibc 2.32+ writes it ("glibc-ld.so.cache1.1", possibly after the old
# "ld.so-1.7.0" table): a 48-byte header (magic, version, nlibs, len_strings, flags,
# extension offset), nlibs 24-byte entries {flags, key, value, osversion, hwcap} and a
# string table; key and value are offsets from the start of the new header.
_NEW_MAGIC = b"glibc-ld.so.cache1.1"
_HEADER = 48
_ENTRY = struct.Struct("<iIIIQ")


def _clean_path(path: str) -> bool:
    """Absolute, bounded, no control characters, no ``..`` component (the helper's rule)."""
    if not path.startswith("/") or len(path) >= MAX_PATH:
        return False
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        return False
    return ".." not in path.split("/")


def _wanted(name: str, libraries: list[str]) -> bool:
    """``<lib>.so`` or ``<lib>.so.<anything>`` for a word ``<lib>`` of the list."""
    return any(name == f"{lib}.so" or name.startswith(f"{lib}.so.") for lib in libraries)


def _read_cache(path: str) -> bytes:
    """The cache file, refused unless a regular file owned by root that group and others
    cannot write (what it names is bound into containers)."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC)
    except OSError as exc:
        raise GpuError(f"{FAILED}: cannot open the library cache {path}: {exc.strerror}") from None
    try:
        st = posix.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GpuError(f"{FAILED}: {path} is not a regular file")
        if st.st_uid != 0:
            raise GpuError(f"{FAILED}: {path} is not owned by root (owner uid {st.st_uid})")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise GpuError(f"{FAILED}: {path} is writable by group or others "
                           f"(mode {st.st_mode & 0o777:o})")
        chunks = []
        size = 0
        while chunk := posix.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > LD_CACHE_MAX:
                raise GpuError(f"{FAILED}: {path} is larger than {LD_CACHE_MAX} bytes")
        return b"".join(chunks)
    finally:
        posix.close(fd)


def ld_cache_entries(data: bytes, path: str) -> list[tuple[str, str]]:
    """``(name, file)`` of every entry of an ld.so cache, in the cache's order (its
    first entry for a name has the priority)."""
    off = 0
    if data.startswith(b"ld.so-1.7.0") and len(data) >= 16:
        (old_n,) = struct.unpack_from("<I", data, 12)
        off = (16 + old_n * 12 + 3) & ~3
    if len(data) - off < _HEADER or data[off : off + len(_NEW_MAGIC)] != _NEW_MAGIC:
        raise GpuError(f"{FAILED}: {path} is not an ld.so cache this helper reads "
                       "(glibc-ld.so.cache1.1)")
    base = data[off:]
    (nlibs,) = struct.unpack_from("<I", base, 20)
    if nlibs > (len(base) - _HEADER) // _ENTRY.size:
        raise GpuError(f"{FAILED}: {path} is truncated")

    def string(at: int) -> str | None:
        end = base.find(b"\0", at) if at < len(base) else -1
        return None if end < 0 else base[at:end].decode("utf-8", "surrogateescape")

    out = []
    for i in range(nlibs):
        _, key, value, _, _ = _ENTRY.unpack_from(base, _HEADER + i * _ENTRY.size)
        name, file = string(key), string(value)
        if name is not None and file is not None:
            out.append((name, file))
    return out


def _elf_dir(path: str) -> str | None:
    """``lib64`` or ``lib`` by the ELF class of a regular file, None if it is not ELF."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NONBLOCK | posix.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(posix.fstat(fd).st_mode):
            return None
        ident = posix.read(fd, 5)
    finally:
        posix.close(fd)
    if len(ident) < 5 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
        return None
    return "lib64" if ident[4] == 2 else "lib"


def driver_files(cfg: Mapping[str, str]) -> list[str]:
    """The helper's ``--gpu-file DIR/NAME=PATH`` values: the ld.so cache entries
    (``gpuLdCache``) named ``<lib>.so*`` for a word of ``gpuLibraries``, by ELF class, and
    the first executable of each ``gpuBinaries`` name in ``gpuBinaryPath``. A node whose
    cache has no ``libcuda.so`` has no driver: :class:`GpuError`."""
    path = cfg.get("gpuLdCache") or DEFAULT_LD_CACHE
    libraries = (cfg.get("gpuLibraries") or DEFAULT_LIBRARIES).split()
    files: dict[tuple[str, str], str] = {}
    for name, file in ld_cache_entries(_read_cache(path), path):
        if not _wanted(name, libraries) or "/" in name or len(name) >= 256:
            continue
        where = _elf_dir(file) if _clean_path(file) else None
        if where is not None and (where, name) not in files:  # the cache's first wins
            files[(where, name)] = file
    if not any(name.startswith("libcuda.so") for _, name in files):
        raise GpuError(
            f"{FAILED}: GPUs were requested (--gpu or CUDA_VISIBLE_DEVICES) but this node "
            f"has no NVIDIA driver (no libcuda.so in {path}). Run without --gpu, or on a GPU "
            "node."
        )
    dirs = [d for d in (cfg.get("gpuBinaryPath") or DEFAULT_BINARY_PATH).split(":")
            if _clean_path(d)]
    for name in (cfg.get("gpuBinaries") or DEFAULT_BINARIES).split():
        if "/" in name or name in (".", ".."):
            raise GpuError(f"FAILED to parse udiRoot configuration. (gpuBinaries: {name} is "
                           "not a file name)")
        for d in dirs:
            try:
                st = posix.stat(f"{d}/{name}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                files[("bin", name)] = f"{d}/{name}"
                break
    if len(files) > MAX_FILES:
        raise GpuError(f"{FAILED}: more than {MAX_FILES} driver files")
    return [f"{where}/{name}={file}" for (where, name), file in files.items()]


def cdi_plan(cfg: Mapping[str, str], gpus: list[int | str] | str, resolved: Resolved,
             files: list[str]) -> Plan:
    """The CDI specs' part of the launch (:mod:`udiroot.cdi`): their device nodes join
    ``resolved``; the driver's directories are those of ``files`` (:func:`driver_files`)
    and ``gpuBinaryPath``."""
    from udiroot.cdi import CdiError, names_of, plan

    dirs = [f.split("=", 1)[1].rsplit("/", 1)[0] or "/" for f in files]
    dirs += (cfg.get("gpuBinaryPath") or DEFAULT_BINARY_PATH).split(":")
    dirs = [d for i, d in enumerate(dirs) if _clean_path(d) and d not in dirs[:i]]
    try:
        out = plan(cfg, names_of(gpus, cfg.get("gpuProcDir")), dirs)
    except CdiError as exc:
        raise GpuError(str(exc)) from None
    for gpu in out.gpus:
        resolved.add(gpu)
    resolved.caps += [c for c in out.caps if c not in resolved.caps]
    return out
