"""GPU identifiers as Slurm and CUDA hand them out, turned into device nodes (docs/behaviour.md,
'Runtime: GPU').

``CUDA_VISIBLE_DEVICES``, ``SLURM_STEP_GPUS`` and ``SLURM_JOB_GPUS`` name GPUs by index
(``0,1``), by UUID (``GPU-5d5ba0d6-…``) or, for a MIG instance, by MIG UUID
(``MIG-c6d4f1ef-…``, drivers from R470) or by the older ``MIG-GPU-<uuid>/<gi>/<ci>``. The
device nodes they stand for are found where the driver publishes them, under
``gpuProcDir`` (default ``/proc/driver``):

* ``nvidia/gpus/<pci bus id>/information``: ``GPU UUID:`` and ``Device Minor:`` lines, the
  UUID → ``/dev/nvidia<minor>`` map (what ``nvidia-smi -L`` lists);
* ``nvidia/capabilities/gpu<minor>/mig/gi<G>/access`` and ``…/gi<G>/ci<C>/access``:
  ``DeviceFileMinor: N``, the MIG instance's ``/dev/nvidia-caps/nvidia-cap<N>`` (the table
  ``nvidia-caps/mig-minors`` sums up);
* a whole GPU (an index, a ``GPU-`` UUID) in MIG mode brings every instance's caps;
* a MIG UUID carries no instance numbers: NVML (``libnvidia-ml.so.1`` from the ld.so cache,
  as Slurm's gres/nvml plugin does) gives its parent GPU and its GPU and compute instance.

All of it runs in the front end, as the user: the user already picks any GPU by index, and
the node's devices cgroup decides what the job may open. The helper still creates only the
character devices of ``gpuDeviceDir`` it is given by number.
"""

from __future__ import annotations

import posix

FAILED = "FAILED to set up GPU support"
DEFAULT_PROC_DIR = "/proc/driver"
_UUID_GROUPS = (8, 4, 4, 4, 12)  # xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx
MAX_CAPS = 64
MAX_CAP_MINOR = 1 << 20


class GpuIdError(ValueError):
    """A GPU identifier this node cannot place; the message says which and why."""


def _hex_uuid(text: str) -> bool:
    """``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` in hex digits (no ``re``: this runs on
    the launch path)."""
    groups = text.split("-")
    return [len(g) for g in groups] == list(_UUID_GROUPS) and all(
        c in "0123456789abcdefABCDEF" for c in "".join(groups))


def is_gpu_uuid(text: str) -> bool:
    return text.startswith("GPU-") and _hex_uuid(text[4:])


def is_mig_uuid(text: str) -> bool:
    return text.startswith("MIG-") and _hex_uuid(text[4:])


def old_mig(text: str) -> tuple[str, int, int] | None:
    """``MIG-GPU-<uuid>/<gi>/<ci>`` → ``(GPU-<uuid>, gi, ci)``."""
    parts = text[4:].split("/") if text.startswith("MIG-GPU-") else []
    if len(parts) != 3 or not is_gpu_uuid(parts[0]):
        return None
    if not all(p.isdigit() and p.isascii() and len(p) <= 3 for p in parts[1:]):
        return None
    return parts[0], int(parts[1]), int(parts[2])


def is_uuid(text: str) -> bool:
    return is_gpu_uuid(text) or is_mig_uuid(text) or old_mig(text) is not None


class Resolved:
    """The device nodes of a request: ``gpus`` (``/dev/nvidiaN``, in order, distinct) and
    ``caps`` (``/dev/nvidia-caps/nvidia-capN`` of MIG instances)."""

    __slots__ = ("caps", "gpus")

    def __init__(self) -> None:
        self.gpus: list[int] = []
        self.caps: list[int] = []

    def add(self, gpu: int, caps: tuple[int, ...] = ()) -> None:
        if gpu not in self.gpus:
            self.gpus.append(gpu)
        self.caps += [c for c in caps if c not in self.caps]


def _key_values(path: str) -> dict[str, str]:
    """``Key: value`` lines of a driver file (values trimmed); missing file: empty."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return {}
    try:
        data = posix.read(fd, 65536).decode("utf-8", "replace")
    finally:
        posix.close(fd)
    out = {}
    for line in data.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def gpu_minors(proc_dir: str) -> dict[str, int]:
    """``{uuid (lower case): device minor}`` of every GPU the driver lists."""
    where = f"{proc_dir}/nvidia/gpus"
    try:
        buses = posix.listdir(where)
    except OSError:
        return {}
    out = {}
    for bus in buses:
        info = _key_values(f"{where}/{bus}/information")
        uuid, minor = info.get("GPU UUID", ""), info.get("Device Minor", "")
        if is_gpu_uuid(uuid) and minor.isdigit() and minor.isascii():
            out[uuid.lower()] = int(minor)
    return out


def mig_caps(proc_dir: str, gpu: int, gi: int, ci: int, name: str) -> tuple[int, int]:
    """The ``nvidia-cap`` minors of GPU instance ``gi`` and compute instance ``ci`` of
    ``/dev/nvidia<gpu>``."""
    base = f"{proc_dir}/nvidia/capabilities/gpu{gpu}/mig/gi{gi}"
    minors = []
    for path in (f"{base}/access", f"{base}/ci{ci}/access"):
        minor = _key_values(path).get("DeviceFileMinor", "")
        if not (minor.isdigit() and minor.isascii() and int(minor) < MAX_CAP_MINOR):
            raise GpuIdError(f"{FAILED}: {name}: GPU {gpu} has no MIG instance gi{gi}/ci{ci} "
                             f"(no {path})")
        minors.append(int(minor))
    return minors[0], minors[1]


def all_mig_caps(proc_dir: str, gpu: int) -> tuple[int, ...]:
    """The nvidia-cap minors of every MIG instance of ``/dev/nvidia<gpu>`` (none when the
    GPU is not in MIG mode): asking for a whole GPU is asking for all of its instances."""
    base = f"{proc_dir}/nvidia/capabilities/gpu{gpu}/mig"
    try:
        gis = sorted(g for g in posix.listdir(base) if g.startswith("gi"))
    except OSError:
        return ()
    paths = []
    for gi in gis:
        paths.append(f"{base}/{gi}/access")
        try:
            cis = sorted(c for c in posix.listdir(f"{base}/{gi}") if c.startswith("ci"))
        except OSError:
            continue
        paths += [f"{base}/{gi}/{ci}/access" for ci in cis]
    minors = []
    for path in paths:
        minor = _key_values(path).get("DeviceFileMinor", "")
        if minor.isdigit() and minor.isascii() and int(minor) < MAX_CAP_MINOR:
            minors.append(int(minor))
    return tuple(minors)


def _nvml_mig(nvml: str | None, uuid: str) -> tuple[str, int, int, int]:
    """``(parent uuid, parent minor, gi, ci)`` of a MIG UUID, from NVML."""
    if nvml is None:
        raise GpuIdError(f"{FAILED}: {uuid}: a MIG UUID needs NVML (libnvidia-ml.so.1), "
                         "which this node's library cache does not list")
    import ctypes

    try:
        lib = ctypes.CDLL(nvml)
    except OSError as exc:
        raise GpuIdError(f"{FAILED}: {uuid}: cannot load NVML {nvml}: {exc}") from None
    handle, parent = ctypes.c_void_p(), ctypes.c_void_p()
    minor, gi, ci = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
    text = ctypes.create_string_buffer(96)
    if lib.nvmlInit_v2() != 0:
        raise GpuIdError(f"{FAILED}: {uuid}: NVML does not start (nvmlInit)")
    try:
        steps = (
            ("nvmlDeviceGetHandleByUUID", lambda: lib.nvmlDeviceGetHandleByUUID(
                uuid.encode(), ctypes.byref(handle))),
            ("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", lambda:
                lib.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle, ctypes.byref(parent))),
            ("nvmlDeviceGetMinorNumber", lambda: lib.nvmlDeviceGetMinorNumber(
                parent, ctypes.byref(minor))),
            ("nvmlDeviceGetUUID", lambda: lib.nvmlDeviceGetUUID(parent, text, 96)),
            ("nvmlDeviceGetGpuInstanceId", lambda: lib.nvmlDeviceGetGpuInstanceId(
                handle, ctypes.byref(gi))),
            ("nvmlDeviceGetComputeInstanceId", lambda: lib.nvmlDeviceGetComputeInstanceId(
                handle, ctypes.byref(ci))),
        )
        for what, call in steps:
            status = call()
            if status != 0:
                why = "no such MIG device on this node" if status == 6 else f"NVML error {status}"
                raise GpuIdError(f"{FAILED}: {uuid}: {why} ({what})")
    finally:
        lib.nvmlShutdown()
    return text.value.decode("ascii", "replace"), minor.value, gi.value, ci.value


def resolve(selectors: list[int | str], proc_dir: str | None, nvml: str | None) -> Resolved:
    """The device nodes of indexes and UUIDs (``proc_dir``: ``gpuProcDir``; ``nvml``: the
    path of ``libnvidia-ml.so.1``, for MIG UUIDs)."""
    proc = proc_dir or DEFAULT_PROC_DIR
    out = Resolved()
    minors: dict[str, int] | None = None
    for sel in selectors:
        if isinstance(sel, int):
            out.add(sel, all_mig_caps(proc, sel))
            continue
        if minors is None:
            minors = gpu_minors(proc)
        old = old_mig(sel)
        if is_gpu_uuid(sel) or old:
            uuid = old[0] if old else sel
            if uuid.lower() not in minors:
                raise GpuIdError(f"{FAILED}: {sel}: this node has no GPU {uuid} (the driver "
                                 f"lists {len(minors)} GPU(s) in {proc}/nvidia/gpus)")
            gpu = minors[uuid.lower()]
            out.add(gpu, mig_caps(proc, gpu, old[1], old[2], sel) if old
                    else all_mig_caps(proc, gpu))
            continue
        parent, gpu, gi, ci = _nvml_mig(nvml, sel)
        if minors.get(parent.lower(), gpu) != gpu:
            raise GpuIdError(f"{FAILED}: {sel}: NVML and {proc} disagree on GPU {parent}")
        out.add(gpu, mig_caps(proc, gpu, gi, ci, sel))
    if len(out.caps) > MAX_CAPS:
        raise GpuIdError(f"{FAILED}: more than {MAX_CAPS} MIG device nodes")
    return out
