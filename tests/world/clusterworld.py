"""Shifter on the virtual cluster (world/cluster.py): the test site, the SPANK plugin in
every slurmd, the gateway on the service node, the image dir on the shared filesystem.

    with cluster_world(base, munged=m, registry=reg, nodes=4) as w:
        w.push("v1", "cluster-one", tmp)        # a busybox image with that os-release ID
        image_id = w.pull("v1")                 # ``shifterimg pull`` as alice on the login node
        job = w.sbatch(script, "-N", "4", "--exclusive", f"--image={w.tag('v1')}")
        w.cluster.wait(job.job_id); w.output(job.job_id)
        w.cluster.on_node("node2", [...]); w.leftover_mounts()

Who is where: the login node is the ``ctl`` host (slurmctld's namespaces: clients,
``shifterimg``, the submit-time checker run there); the gateway runs on the service node
``svc`` (``http://10.251.0.2:8080``), reaches the registry through a relay, and writes
images into ``export`` (the service node's disk); every compute node and the login node
mount ``export`` at the site's ``imagePath`` (the shared filesystem, sshfs by default). The plugin's
``state_dir`` and the per-node cache are private to each node. The runtime is the test
site's (``RuntimeSite``: the sanitized setuid helper of this checkout's test slot and its
udiRoot.conf), ``conf`` adds to that file; ``plugstack_args`` to the plugin's line
(``enable_sshd="1"``…).

Outside pytest (a bench script), as root, the same parts by hand:

    from world.munge import Munged; from world.registry import Registry
    from world.runtime import ensure_test_users
    with Munged() as m, Registry() as reg, cluster_world(
            base, munged=m, registry=reg, test_users=ensure_test_users(), nodes=32,
            keep_tmp=(base,)) as w:
        ...

``base`` a fresh 0755 dir; ``SHIFTER_TEST_SLOT`` picks the test helper's install, as
for the tests. What the cluster shows of itself: world/cluster.py.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cluster import VirtualCluster
from .gateway import Gateway
from .imagebuild import File, Symlink
from .runtime import HELPER, TEST_CONF, RuntimeSite
from .slurm import (
    PLUGIN_SRC,
    Client,
    asan_runtime,
    build_plugin,
    plugstack_line,
    write_launchers,
)
from .slurmworld import ALICE, SlurmWorld

REPO = "cluster/app"


class ClusterWorld(SlurmWorld):
    repo = REPO
    tools = SlurmWorld.tools + ("hostname", "grep", "wc", "sort", "cut", "tr")
    image_path = "/bin:/usr/bin"

    def __init__(self, site: RuntimeSite, cluster: VirtualCluster, gateway: Gateway,
                 registry: Any, munge_socket: str, bindir: Path, jobdir: Path,
                 export: Path) -> None:
        super().__init__(site, cluster, gateway, registry, munge_socket, bindir, jobdir)
        self.export = export

    def push(self, name: str, os_id: str, tmp: Path, tree: Path | None = None) -> None:
        """Push an image: busybox with ``ID=os_id`` in its os-release, plus ``tree``."""
        super().push(name, os_id, tmp, tree_entries(tree) if tree is not None else None)

    def pull(self, name: str) -> str:
        """``shifterimg pull`` as alice on the login node; the id the tag index holds."""
        res = self.cluster.as_user(ALICE, [str(self.bindir / "shifterimg"), "pull",
                                           self.tag(name)], env=self.env(), timeout=300)
        assert res.returncode == 0 and "READY" in res.stdout, (res, self.gateway.log())
        from shifter.frontend import quote_tag

        index = self.export / "tags" / "docker" / quote_tag(self.tag(name))
        return index.read_text().strip()

    def srun(self, *args: str, timeout: float = 120) -> Client:
        return self.cluster.srun(ALICE, *args, env=self.env(), cwd=self.jobdir,
                                 timeout=timeout)

    def leftover_mounts(self) -> dict[str, list[str]]:
        """Per node, what is mounted under the site's udiMount and loopMount."""
        dirs = (self.site.udi_mount, self.site.loop_mount)
        out = {n: self.cluster.node_mounts(n, dirs) for n in self.cluster.nodes}
        return {n: m for n, m in out.items() if m}


def product_plugin() -> Path:
    """``make -C slurm``: the plugin as ``make install`` builds it (no sanitizer)."""
    src = PLUGIN_SRC
    subprocess.run(["make", "-s", "-C", str(src), "all"], check=True)
    return src / "build" / "shifter_slurm.so"


def tree_entries(root: Path) -> list[Any]:
    """A directory tree as layer entries (regular files and symlinks)."""
    out: list[Any] = []
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out.append(Symlink(rel, os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                out.append(File(rel, path.read_bytes(), mode=stat.S_IMODE(st.st_mode)))
        for d in os.listdir(dirpath):
            path = Path(dirpath) / d
            if path.is_symlink():
                out.append(Symlink(str(path.relative_to(root)), os.readlink(path)))
    return out


@contextlib.contextmanager
def cluster_world(base: Path, *, munged: Any, registry: Any, test_users: dict[str, Any],
                  nodes: int = 4, plugstack_args: dict[str, str] | None = None,
                  conf: dict[str, str] | None = None,
                  gateway_extra: dict[str, Any] | None = None,
                  keep_tmp: tuple[Path, ...] = (),
                  sanitized: bool = True) -> Iterator[ClusterWorld]:
    """The whole world, started; everything stopped and removed after (also on error).
    ``base`` must be reachable by the test users (0755 up to it); ``keep_tmp`` adds to
    what stays visible in the nodes' /tmp (``base`` and the munge socket's dir do).
    ``sanitized=False`` (bench/cluster) loads the plugin's product build everywhere and
    preloads no ASan runtime into the clients (nor, through them, into every task)."""
    site = RuntimeSite.create(base / "site")
    bindir = write_launchers(base / "bin", HELPER)
    uid, gid = test_users[ALICE]
    jobdir = base / "jobs"
    jobdir.mkdir()
    os.chown(jobdir, uid, gid)
    export = base / "svc-disk" / "images"
    export.mkdir(parents=True)
    os.chmod(export.parent, 0o755)
    os.chmod(export, 0o755)
    state_dir = base / "shifter-state"  # plugstack_line's, beside bindir
    state_dir.mkdir(mode=0o700)
    args = {**(plugstack_args or {})}
    if sanitized:
        plugin, client_plugin, preload = build_plugin("ubsan"), build_plugin("asan"), \
            asan_runtime()
    else:
        plugin = client_plugin = product_plugin()
        preload = None
    cluster = VirtualCluster(
        base / "cluster", nodes=nodes, munge_socket=munged.socket,
        plugstack=plugstack_line(plugin, bindir, TEST_CONF, **args),
        client_plugstack=plugstack_line(client_plugin, bindir, TEST_CONF, **args),
        client_preload=preload,
        keep_tmp=[base, Path(munged.socket).parent, *keep_tmp],
        private_dirs=[state_dir, site.cache_dir],
        shared={site.image_dir: export})
    gateway = Gateway(base / "gw", munge_socket=munged.socket, registry=registry,
                      host=cluster.svc_address, netns=cluster.svc_netns,
                      extra={"Platforms": {"testsys": {
                          "mungeSocketPath": munged.socket, "accesstype": "local",
                          "admins": ["root"], "local": {"imageDir": str(export)}}},
                          **(gateway_extra or {})})
    try:
        with cluster:
            cluster.relay(registry.port)
            with gateway:
                site.write_conf(imageGateway=gateway.url, **(conf or {}))
                yield ClusterWorld(site, cluster, gateway, registry, munged.socket, bindir,
                                   jobdir, export)
    finally:
        site.write_conf()
