"""The Slurm step's PMIx server reaching the container (docs/behaviour.md, 'Runtime: PMIx').

Under ``srun --mpi=pmix`` every task gets ``PMIX_*`` variables from slurmstepd's PMIx
server: its address (``PMIX_SERVER_URI*``, a loopback TCP port the container shares with
the host), its directory ``PMIX_SERVER_TMPDIR`` (``<SlurmdSpoolDir>/pmix.<job>.<step>/``,
the job data the clients map from shared memory) and the component names the server
chose. The variables pass like the rest of the caller's environment; the directory is
handed to the helper, which mounts it at the same path (``--pmix-dir``, checked there).
As enroot's slurm-pmi hook does, the component names are also given in the form a PMIx
of another version reads (``PMIX_MCA_ptl``, ``PMIX_MCA_psec``, ``PMIX_MCA_gds``) unless
already set: an image's Open MPI may bring its own PMIx.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# The server's name for a component -> the name a client's MCA parameter has.
MCA_NAMES = (("PMIX_PTL_MODULE", "PMIX_MCA_ptl"), ("PMIX_SECURITY_MODE", "PMIX_MCA_psec"),
             ("PMIX_GDS_MODULE", "PMIX_MCA_gds"))


def pmix_step_dir(env: Mapping[str, str]) -> str | None:
    """The PMIx server directory to mount for a container with environment ``env``:
    ``PMIX_SERVER_TMPDIR`` when the step's MPI type is PMIx (``SLURM_MPI_TYPE`` unset or
    ``pmix…``), else None."""
    path = env.get("PMIX_SERVER_TMPDIR", "")
    mpi_type = env.get("SLURM_MPI_TYPE", "")
    if not path or (mpi_type and not mpi_type.startswith("pmix")):
        return None
    return path


def add_mca_names(env: dict[str, str]) -> None:
    """``PMIX_MCA_*`` from the server's ``PMIX_*_MODULE``/``PMIX_SECURITY_MODE`` values,
    where the variable is not set yet."""
    for server, client in MCA_NAMES:
        if env.get(server) and client not in env:
            env[client] = env[server]
