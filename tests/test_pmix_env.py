"""The front end's PMIx rules (udiroot/pmix.py; docs/behaviour.md, 'Runtime: PMIx'): when
the step's directory is handed to the helper, and the MCA names added for an image's own
PMIx. End to end (the helper, Slurm): tests/test_runtime_pmix.py, tests/test_slurm_pmix.py."""

from __future__ import annotations

import pytest

from udiroot.pmix import add_mca_names, pmix_step_dir

DIR = "/var/spool/slurmd/pmix.7.0/"


@pytest.mark.parametrize("env, want", [
    ({"PMIX_SERVER_TMPDIR": DIR, "SLURM_MPI_TYPE": "pmix"}, DIR),
    ({"PMIX_SERVER_TMPDIR": DIR, "SLURM_MPI_TYPE": "pmix_v4"}, DIR),
    ({"PMIX_SERVER_TMPDIR": DIR}, DIR),  # MpiDefault=pmix, or not under srun at all
    ({"PMIX_SERVER_TMPDIR": DIR, "SLURM_MPI_TYPE": "pmi2"}, None),
    ({"PMIX_SERVER_TMPDIR": DIR, "SLURM_MPI_TYPE": "none"}, None),
    ({"PMIX_SERVER_TMPDIR": ""}, None),
    ({"SLURM_MPI_TYPE": "pmix"}, None),
])
def test_which_steps_get_their_directory(env, want):
    assert pmix_step_dir(env) == want


def test_mca_names_from_the_servers_choices_unless_set():
    env = {"PMIX_SECURITY_MODE": "native", "PMIX_GDS_MODULE": "ds21,ds12,hash",
           "PMIX_PTL_MODULE": "tcp,usock", "PMIX_MCA_gds": "hash"}
    add_mca_names(env)
    assert env["PMIX_MCA_psec"] == "native"
    assert env["PMIX_MCA_ptl"] == "tcp,usock"
    assert env["PMIX_MCA_gds"] == "hash"  # the user's (or the image's) own choice stays
    empty = {"PMIX_SECURITY_MODE": ""}
    add_mca_names(empty)
    assert empty == {"PMIX_SECURITY_MODE": ""}
