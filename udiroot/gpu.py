"""Which GPUs a launch asks for, and what that does to the environment (docs/behaviour.md, 'Runtime:
GPU').

GPU support is requested by ``--gpu`` (bare: every GPU of the node; ``--gpu=0,1``: those
device indexes) or, as Shifter did, by ``CUDA_VISIBLE_DEVICES`` being set, non-empty and
not ``NoDevFiles``; ``--gpu`` wins over the variable. The indexes are those of
``/dev/nvidiaN``. Inside a Slurm step whose devices are constrained by cgroups,
``CUDA_VISIBLE_DEVICES`` counts from 0 among the step's GPUs while ``SLURM_STEP_GPUS``
(``SLURM_JOB_GPUS`` in the batch step) names the node's real ones: when that list is set
and as long, it picks the device nodes. The setuid helper finds the driver's files and
checks that each requested GPU exists; this module only reads the request and layers the
environment:

* ``LD_LIBRARY_PATH`` gets ``<siteResources>/gpu/lib64:<siteResources>/gpu/lib`` in
  front, so the host's driver wins over any copy of ``libcuda`` in the image (a driver
  library must match the running kernel module);
* ``PATH`` gets ``<siteResources>/gpu/bin`` at the end (the image's tools win);
* with explicit indexes, ``CUDA_VISIBLE_DEVICES`` becomes ``0,…,n-1``: only the selected
  device nodes exist in the container, and CUDA numbers the devices it can open from 0.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_SITE_RESOURCES = "/opt/shifter/site-resources"
MAX_GPUS = 64  # /dev/nvidia0 .. /dev/nvidia63, as the helper accepts
ALL = "all"


class GpuError(ValueError):
    """A malformed GPU request; the message names it and says what is expected."""


def parse_gpu_list(text: str, source: str) -> list[int]:
    """``0,2`` → ``[0, 2]``; ``source`` names where the text came from, for messages."""
    indexes: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece.isdigit() or not piece.isascii() or int(piece) >= MAX_GPUS:
            hint = ""
            if piece.upper().startswith(("GPU-", "MIG-")):
                hint = " (GPU UUIDs are not supported: give device indexes)"
            raise GpuError(
                f"Invalid {source} '{text}': expected GPU indexes from 0 to {MAX_GPUS - 1} "
                f"such as 0,1{hint}"
            )
        if int(piece) in indexes:
            raise GpuError(f"Invalid {source} '{text}': GPU {int(piece)} is given twice")
        indexes.append(int(piece))
    return indexes


def requested_gpus(
    option_given: bool, option: str | None, environ: Mapping[str, str]
) -> list[int] | str | None:
    """``None`` (no GPU support), ``"all"``, or the device indexes asked for."""
    if option_given:
        return ALL if option is None else parse_gpu_list(option, "--gpu")
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible.strip() == "" or visible == "NoDevFiles":
        return None
    indexes = parse_gpu_list(visible, "CUDA_VISIBLE_DEVICES")
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(name, "").strip():
            slurm = parse_gpu_list(environ[name], name)
            return slurm if len(slurm) == len(indexes) else indexes
    return indexes


def helper_argument(gpus: list[int] | str) -> str:
    return gpus if isinstance(gpus, str) else ",".join(str(i) for i in gpus)


def apply_gpu_env(env: dict[str, str], gpus: list[int] | str, site_resources: str | None) -> None:
    """The GPU layer of the environment (after ``--env``, before the modules and the site)."""
    base = (site_resources or DEFAULT_SITE_RESOURCES).rstrip("/") + "/gpu"
    libs = f"{base}/lib64:{base}/lib"
    current = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{libs}:{current}" if current else libs
    current = env.get("PATH")
    env["PATH"] = f"{current}:{base}/bin" if current else f"{base}/bin"
    if not isinstance(gpus, str):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))
