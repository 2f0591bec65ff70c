"""Remote transfer end to end (issue 12; tests/world/remotesystem.py): a second compute
system whose image disk the gateway does not share (``accesstype: remote``). A user on
that system's login node pulls; the gateway, on the first system's service node, copies
the squashfs, ``.meta`` and tag index entry over ssh to that login node; a two-node job
there runs the image. Checks are what the user sees (shifterimg, the job's output) and
what an admin sees (the two disks, the login node's sshd log, the nodes' mounts).
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from world.clusterworld import ALICE
from world.remotesystem import SYSTEM, remote_system


@pytest.fixture(scope="module")
def remote(vcluster, test_users, tmp_path_factory):
    from world.runtime import reachable_temp_dir

    base = reachable_temp_dir(tmp_path_factory, "remotesys")
    with remote_system(vcluster, base, uid_gid=test_users[ALICE]) as rs:
        yield rs
    assert rs.cluster.leftovers() == [], "the remote system left something behind"


def files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_pull_for_a_remote_system_lands_on_its_disk_and_its_jobs_run_it(
        vcluster, remote, tmp_path):
    w = vcluster
    w.push("remote1", "remote-one", tmp_path)
    res = remote.pull("remote1")
    assert res.returncode == 0 and "READY" in res.stdout, (res, w.gateway.log())
    # the image is on the remote system's disk, complete, final names only
    index = f"tags/docker/{quote(w.tag('remote1'), safe='')}"
    image_id = (remote.disk / index).read_text().strip()
    assert files(remote.disk) == sorted([f"{image_id}.meta", f"{image_id}.squashfs", index])
    for name in (f"{image_id}.meta", f"{image_id}.squashfs", index):
        assert (remote.disk / name).stat().st_mode & 0o777 == 0o644, name
    # ... and not on the gateway's own (shared with the first system only)
    assert not (w.export / f"{image_id}.squashfs").exists()
    assert not (w.export / index).exists()
    # it came over ssh: the login node's sshd let the gateway's key in
    assert "Accepted publickey for root" in remote.sshd.log(), remote.sshd.log()
    # the gateway's record is for that system
    rec = w.gateway.request("GET", f"/api/lookup/{SYSTEM}/docker/{w.tag('remote1')}/",
                            user=ALICE).json()
    assert rec.get("id") == image_id and rec.get("status") == "READY", rec

    # a two-node job on the remote system runs it, on both of its nodes
    script = ("#!/bin/sh\nsrun -N 2 shifter sh -c "
              "'echo \"RAN $(hostname) $(grep ^ID= /etc/os-release)\"'\n")
    job = remote.sbatch(script, "-N", "2", "--exclusive", f"--image={w.tag('remote1')}")
    assert job.returncode == 0 and job.job_id, job
    state = remote.cluster.wait(job.job_id, timeout=180)
    out = remote.output(job.job_id)
    assert state == "COMPLETED", (state, out, remote.cluster.logs())
    ran = sorted(line.split()[1:] for line in out.splitlines() if line.startswith("RAN "))
    assert ran == [["node1", "ID=remote-one"], ["node2", "ID=remote-one"]], out
    remote.cluster.settle()
    assert remote.leftover_mounts() == {}
    # the first system cannot run it: its image dir does not have it
    refused = w.sbatch("#!/bin/sh\necho never\n", "-N", "1", f"--image=id:{image_id}")
    assert refused.returncode != 0 and refused.job_id is None, refused
