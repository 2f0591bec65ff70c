"""Shared pytest fixtures: the registry side of the test world (the logic is in tests/world/)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# tests/ is not a package: make `world` importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).parent))

from world.faultproxy import FaultProxy  # noqa: E402
from world.registry import Registry  # noqa: E402
from world.runtime import (  # noqa: E402
    TEST_USERS,  # noqa: F401  (tests import it from here)
    ensure_test_users,
    remove_helper,
    strip_setid_bits,
)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """An open registry (anyone pulls and pushes), shared by the session: use unique repos."""
    with Registry() as reg:
        yield reg


@pytest.fixture(scope="session")
def basic_registry() -> Iterator[Registry]:
    """A registry with htpasswd auth; ``.username``/``.password``, ``.session()`` to push."""
    with Registry(auth="basic") as reg:
        yield reg


@pytest.fixture(scope="session")
def token_registry() -> Iterator[Registry]:
    """A registry with token auth (``.token_issuer``); anonymous pulls get 401."""
    with Registry(auth="token") as reg:
        yield reg


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(registry_or_url, **kw)`` starts a FaultProxy, stopped after."""
    started: list[FaultProxy] = []

    def make(upstream: Registry | FaultProxy | str, **kwargs: object) -> FaultProxy:
        url = upstream if isinstance(upstream, str) else upstream.url
        proxy = FaultProxy(url, **kwargs).start()  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def munged() -> Iterator[object]:
    """A private munge daemon (``tests/world/munge.py``): ``.socket`` for imagegw.munge."""
    from world.munge import Munged

    with Munged() as daemon:
        yield daemon


@pytest.fixture(scope="session")
def udiimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tree ``make install`` puts at optUdiImage (Debian's sshd and ssh, runnable in any
    image), written once by the real ``shifter-prep-udiimage``."""
    import subprocess

    out = tmp_path_factory.mktemp("udiimage") / "udiImage"
    tool = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "shifter-prep-udiimage"
    res = subprocess.run([str(tool), "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def test_users() -> dict[str, tuple[int, int]]:
    """Unprivileged users for tests that act as people do: name → (uid, gid).

    Created once if missing (CI runs as root on a fresh machine); kept afterwards, as a
    site's users would be.
    """
    return ensure_test_users()


@pytest.fixture(scope="session", autouse=True)
def setuid_hygiene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No setuid file of ours outlives the session: the test build of the helper of this
    slot is removed at the start (a stale one from a killed run) and at the end (also
    after failures and Ctrl-C; SIGTERM and exit: world/runtime.py), and the set-id bits
    in the image trees under pytest's temp dirs are cleared (pytest keeps those dirs)."""
    remove_helper()
    root = tmp_path_factory.getbasetemp().resolve()
    # Earlier sessions' numbered dirs beside ours (only pytest's own ``pytest-of-<user>``,
    # not the parent of a --basetemp), but not those of sessions still running.
    if root.parent.name.startswith("pytest-of-"):
        for old in root.parent.glob("pytest-[0-9]*"):
            if old != root and not old.is_symlink() and old.is_dir() and not _in_use(old):
                strip_setid_bits(old)
    yield
    remove_helper()
    strip_setid_bits(root)


def _in_use(basetemp: Path) -> bool:
    """Whether the pytest session that made ``basetemp`` still runs: pytest keeps its pid
    in ``.lock`` while it does (a killed session's lock stays, its pid is gone)."""
    try:
        pid = int((basetemp / ".lock").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="session")
def mpich_modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Debian's MPICH prepared by the real ``shifter-prep-mpi`` as two site modules:
    ``mpich`` (copied into each container) and ``mpichbind`` (the same, bind-mounted
    read-only through siteFs at /opt/site-mpich); their udiRoot.conf lines as a dict."""
    import subprocess

    from world.mpi import MPICH_LIBDIR
    from world.runtime import reachable_temp_dir

    base = reachable_temp_dir(tmp_path_factory, "mpich-modules")
    tool = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "shifter-prep-mpi"
    conf: dict[str, str] = {}
    for args in (["--out", str(base / "mpich")],
                 ["--out", str(base / "mpichbind"), "--name", "mpichbind", "--bind",
                  "--inside", "/opt/site-mpich"]):
        res = subprocess.run([str(tool), "--mpi-lib", str(MPICH_LIBDIR), *args],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        for line in res.stdout.splitlines():
            if line and not line.startswith("#"):
                key, value = line.split("=", 1)
                conf[key] = value
    return conf


@pytest.fixture(scope="session")
def vcluster(test_users, munged, registry, udiimage, mpich_modules,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A four-node virtual cluster with Shifter (``tests/world/clusterworld.py``), shared
    by every test that asks for it: the plugin with ``enable_sshd=1``, the site's
    ``mpich`` and ``mpichbind`` modules configured (not default), the container's sshd
    and ssh from optUdiImage on PATH."""
    from world.clusterworld import cluster_world
    from world.runtime import reachable_temp_dir

    base = reachable_temp_dir(tmp_path_factory, "vcluster")
    conf = {"optUdiImage": str(udiimage), "siteEnvPrepend": "PATH=/opt/udiImage/bin",
            **mpich_modules}
    with cluster_world(base, munged=munged, registry=registry, test_users=test_users,
                       nodes=4, conf=conf, keep_tmp=(tmp_path_factory.getbasetemp(),),
                       plugstack_args={"enable_sshd": "1", "extern_cgroup": "0"}) as world:
        yield world
    assert world.cluster.leftovers() == [], "the virtual cluster left something behind"
