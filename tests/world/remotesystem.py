"""A second compute system whose image dir the gateway does not share (issue 12).

    with remote_system(world, base) as rs:       # world: a ClusterWorld (clusterworld.py)
        rs.cluster                               # its own VirtualCluster (2 nodes)
        rs.disk                                  # its image disk, which only it mounts
        rs.pull("v1"); rs.sbatch(script, "-N", "2", …); rs.output(job_id)
        rs.sshd.log()                            # the login node's sshd (the gateway's logins)

What there is: a second virtual cluster (its own bridge, login node ``ctl``, slurmctld,
slurmds) standing for a system at another site, named ``remotesys`` in the gateway's
``Platforms`` with ``accesstype: remote``. Its nodes and its login node bind-mount its
own disk (``shared_fs="bind"``: the login node writes it) at the site's ``imagePath``;
the gateway (on the first cluster's service node) never
sees that disk. An OpenSSH server runs on its login node (in slurmctld's namespaces, so it
sees the disk where the nodes do), and the gateway copies the squashfs, ``.meta`` and tag
index entry there with ``scp``/``ssh`` as ``RemoteTransfer`` does for any remote system.

The two clusters' networks are not linked; two relays stand for the WAN between the
sites (``netns.Relay``: a socket listening in one namespace, each connection forwarded to
a socket made in the other): the gateway reaches the login node's sshd at
``127.0.0.1:2222`` of the service node, and the remote login node reaches the gateway at
``127.0.0.1:8080`` of its own. Its ``udiRoot.conf`` (bind-mounted over the test site's
in the remote namespaces only) is the site's with ``system=remotesys`` and that gateway
URL; the helper, the plugin and the users are the same.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import netns
from .cluster import CTL_ADDR, VirtualCluster
from .clusterworld import ALICE, ClusterWorld
from .runtime import TEST_CONF
from .slurm import asan_runtime
from .sshd import CLIENT_OPTIONS, SSHD, Sshd

SYSTEM = "remotesys"
SSH_PORT = 2222  # on the gateway's service node, relayed to the login node's port 22
GW_PORT = 8080  # on the remote login node, relayed to the gateway


class LoginSshd(Sshd):
    """``sshd`` on a virtual cluster's login node (slurmctld's namespaces), port 22."""

    def __init__(self, cluster: VirtualCluster) -> None:
        super().__init__(host=CTL_ADDR)
        self.cluster = cluster

    def run(self, command: str, user: str = "root",
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``command`` over ssh from the login node itself."""
        return subprocess.run(
            self.cluster.client_argv(["ssh", "-i", self.key, *self.ssh_options,
                                      f"{user}@{self.host}", command]),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check, timeout=30)

    def start(self, timeout: float = 15.0) -> LoginSshd:
        netns_dir = Path("/run/sshd")
        netns_dir.mkdir(mode=0o755, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="shifter-login-sshd-"))
        self.dir.chmod(0o755)
        self._keygen(self.dir / "host_key")
        self._keygen(self.dir / "client_key")
        shutil.copyfile(self.dir / "client_key.pub", self.dir / "authorized_keys")
        (self.dir / "authorized_keys").chmod(0o644)
        self.port = 22
        config = self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--",
                 *self.cluster.client_argv([SSHD, "-D", "-e", "-f", str(config)])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        if self._wait_ready(timeout):
            return self
        self.stop()
        raise RuntimeError(f"the login node's sshd did not start:\n{self.log()}")

    def platform(self, image_dir: str | os.PathLike[str], **_: Any) -> dict[str, Any]:
        """The gateway's ``Platforms.remotesys`` entry: through the relay on its node."""
        return {
            "accesstype": "remote",
            "host": ["127.0.0.1"],
            "ssh": {"username": "root", "key": self.key, "imageDir": str(image_dir),
                    "sshCmdOptions": ["-p", str(SSH_PORT), *CLIENT_OPTIONS],
                    "scpCmdOptions": ["-P", str(SSH_PORT), *CLIENT_OPTIONS]},
        }


class RemoteSystem:
    def __init__(self, world: ClusterWorld, cluster: VirtualCluster, disk: Path,
                 sshd: LoginSshd, jobdir: Path) -> None:
        self.world = world
        self.cluster = cluster
        self.disk = disk
        self.sshd = sshd
        self.jobdir = jobdir

    def pull(self, name: str) -> subprocess.CompletedProcess[str] | Any:
        """``shifterimg pull`` as alice on the remote system's login node."""
        w = self.world
        return self.cluster.as_user(ALICE, [str(w.bindir / "shifterimg"), "pull", w.tag(name)],
                                    env=w.env(), timeout=300)

    def sbatch(self, script: str, *args: str):
        return self.cluster.sbatch(ALICE, script, f"--output={self.jobdir}/%j.out", *args,
                                   env=self.world.env(), cwd=self.jobdir)

    def output(self, job_id: int) -> str:
        try:
            return (self.jobdir / f"{job_id}.out").read_text()
        except FileNotFoundError:
            return ""

    def leftover_mounts(self) -> dict[str, list[str]]:
        dirs = (self.world.site.udi_mount, self.world.site.loop_mount)
        out = {n: self.cluster.node_mounts(n, dirs) for n in self.cluster.nodes}
        return {n: m for n, m in out.items() if m}


@contextlib.contextmanager
def remote_system(world: ClusterWorld, base: Path, *, nodes: int = 2,
                  uid_gid: tuple[int, int]) -> Iterator[RemoteSystem]:
    """The remote system, started, and the gateway restarted with its platform; all
    stopped, and the gateway restarted without it, after. ``base``: 0755 up to it."""
    site = world.site
    a = world.cluster
    disk = base / "remote-disk" / "images"
    disk.mkdir(parents=True)
    os.chmod(disk.parent, 0o755)
    os.chmod(disk, 0o755)
    jobdir = base / "jobs"
    jobdir.mkdir()
    os.chown(jobdir, *uid_gid)
    conf = base / "udiRoot.conf"
    lines = [line for line in TEST_CONF.read_text().splitlines()
             if not line.startswith(("system=", "imageGateway="))]
    conf.write_text("\n".join([*lines, f"system={SYSTEM}",
                               f"imageGateway=http://127.0.0.1:{GW_PORT}"]) + "\n")
    os.chmod(conf, 0o644)
    cluster = VirtualCluster(
        base / "cluster", nodes=nodes, munge_socket=world.munge_socket,
        plugstack=a.plugstack_conf.read_text().strip(),
        client_plugstack=a.client_plugstack_conf.read_text().strip(),
        client_preload=asan_runtime(),
        keep_tmp=[*a.keep_tmp, base], private_dirs=a.private_dirs,
        shared={site.image_dir: disk, TEST_CONF: conf}, shared_fs="bind")
    gw = world.gateway
    relays: list[netns.Relay] = []
    sshd = LoginSshd(cluster)
    with cluster:
        try:
            sshd.start()
            relays.append(netns.Relay(a.svc_netns, ("127.0.0.1", SSH_PORT), (CTL_ADDR, 22),
                                      connect_ns=cluster.ctl_netns))
            relays.append(netns.Relay(cluster.ctl_netns, ("127.0.0.1", GW_PORT),
                                      (a.svc_address, 8080), connect_ns=a.svc_netns))
            gw.config["Platforms"][SYSTEM] = {
                "mungeSocketPath": world.munge_socket, "admins": ["root"],
                **sshd.platform(site.image_dir)}
            gw.stop()
            gw.start()
            yield RemoteSystem(world, cluster, disk, sshd, jobdir)
        finally:
            gw.config["Platforms"].pop(SYSTEM, None)
            gw.stop()
            gw.start()
            for relay in relays:
                relay.close()
            sshd.stop()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and cluster.active_jobs():
                time.sleep(0.2)
