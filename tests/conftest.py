"""Shared pytest fixtures: the registry side of the test world (the logic is in tests/world/)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# tests/ is not a package: make `world` importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).parent))

from world.faultproxy import FaultProxy  # noqa: E402
from world.registry import Registry  # noqa: E402


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


TEST_USERS = ("shifter-alice", "shifter-bob")


@pytest.fixture(scope="session")
def test_users() -> dict[str, tuple[int, int]]:
    """Unprivileged users for tests that act as people do: name → (uid, gid).

    Created once if missing (CI runs as root on a fresh machine); kept afterwards, as a
    site's users would be.
    """
    import pwd
    import subprocess

    out = {}
    for name in TEST_USERS:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--user-group", name], check=True)
            pw = pwd.getpwnam(name)
        out[name] = (pw.pw_uid, pw.pw_gid)
    return out
