"""What a test's Slurm world holds and does, for the one-node test clusters
(tests/test_slurm*.py) and the virtual multi-node cluster (clusterworld.py): the site,
the cluster, the gateway and the registry, and alice's submissions and outputs. Each
kind adds only how it pulls and what it inspects."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .imagebuild import File, Symlink, build_layer, push_image
from .runtime import HELPER, TEST_CONF, RuntimeSite

ALICE = "shifter-alice"


class SlurmWorld:
    #: where push() puts images, and what the busybox image links and puts on PATH
    repo = "slurm/app"
    tools: tuple[str, ...] = ("sh", "cat", "id", "ls", "echo", "readlink", "true", "test",
                              "sleep")
    image_path = "/bin"

    def __init__(self, site: RuntimeSite, cluster: Any, gateway: Any, registry: Any,
                 munge_socket: str, bindir: Path, jobdir: Path) -> None:
        self.site = site
        self.cluster = cluster
        self.gateway = gateway
        self.registry = registry
        self.munge_socket = munge_socket
        self.bindir = bindir
        self.jobdir = jobdir

    def env(self, **extra: str) -> dict[str, str]:
        """Alice's login environment: shifter on PATH, the test helper and config."""
        env = {"PATH": f"{self.bindir}:/usr/local/bin:/usr/bin:/bin",
               "HOME": f"/home/{ALICE}", "USER": ALICE,
               "SHIFTER_HELPER": str(HELPER), "SHIFTER_UDIROOT_CONF": str(TEST_CONF),
               "MUNGE_SOCKET": self.munge_socket}
        env.update(extra)
        return env

    def tag(self, name: str) -> str:
        return f"{self.registry.host}/{self.repo}:{name}"

    def push(self, name: str, os_id: str, tmp: Path, extra: list[Any] | None = None) -> None:
        """Push an image: busybox with ``ID=os_id`` in its os-release, plus ``extra``."""
        entries: list[Any] = [File("bin/busybox", Path("/bin/busybox").read_bytes(),
                                   mode=0o755)]
        entries += [Symlink(f"bin/{n}", "busybox") for n in self.tools]
        entries += extra or []
        entries += [File("etc/os-release", f'ID={os_id}\nPRETTY_NAME="{os_id} image"\n')]
        push_image(self.registry, self.repo, name, [build_layer(entries, "gzip", tmp)],
                   {"Env": [f"PATH={self.image_path}"], "Cmd": ["/bin/sh"]})

    def sbatch(self, script: str, *args: str) -> Any:
        return self.cluster.sbatch(ALICE, script, f"--output={self.jobdir}/%j.out", *args,
                                   env=self.env(), cwd=self.jobdir)

    def output(self, job_id: int) -> str:
        try:
            return (self.jobdir / f"{job_id}.out").read_text()
        except FileNotFoundError:
            return ""

    @contextlib.contextmanager
    def plugstack_args(self, *words: str) -> Iterator[None]:
        """plugstack.conf with more arguments (Slurm re-reads it for every job)."""
        paths = (self.cluster.plugstack_conf, self.cluster.client_plugstack_conf)
        saved = [path.read_text() for path in paths]
        for path, text in zip(paths, saved, strict=True):
            path.write_text(text.rstrip("\n") + " " + " ".join(words) + "\n")
        try:
            yield
        finally:
            for path, text in zip(paths, saved, strict=True):
                path.write_text(text)
