"""A real image gateway for tests: ``shifter-imagegw`` (gunicorn) on 127.0.0.1.

    gw = Gateway(tmp_dir, munge_socket=m.socket, registry=reg).start()
    gw.url, gw.image_dir, gw.config_path, gw.system ("testsys")
    gw.request("POST", "/api/pull/testsys/docker/HOST/repo:tag/", user="shifter-alice")
    gw.kill()            # SIGKILL the master and every worker (crash tests); gw.start() again
    gw.stop()

Requests are authenticated with real munge credentials made by the ``munge`` CLI run as
the named user (``runuser``), so uid/gid in the credential are that user's, exactly as
on a login node. ``payload`` puts e.g. ``{"authorized_locations": …}`` inside it.

``netns="NAME"`` starts it inside that network namespace (the virtual cluster's service
node, world/cluster.py), listening on ``host``; the test's own HTTP calls then go
there too (world/netns.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from .ports import free_port

SYSTEM = "testsys"


def munge_cred(socket: str, user: str | None = None, payload: bytes = b"") -> str:
    """A fresh credential from the ``munge`` CLI, as ``user`` (root when None)."""
    argv = ["munge", "-S", socket]
    if user and user != "root":
        argv = ["runuser", "-u", user, "--", *argv]
    out = subprocess.run(argv, input=payload, capture_output=True, check=True)
    return out.stdout.decode().strip()


class Gateway:
    def __init__(self, workdir: Path, *, munge_socket: str, registry: Any = None,
                 workers: int = 2, threads: int = 1, extra: dict[str, Any] | None = None,
                 admins: tuple[str, ...] = ("root",), host: str = "127.0.0.1",
                 netns: str | None = None, gunicorn_config: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.netns = netns
        self.munge_socket = munge_socket
        self.workers = workers
        self.threads = threads
        self.gunicorn_config = gunicorn_config  # None: the service's own
        self.image_dir = self.workdir / "images"
        self.config_path = self.workdir / "imagemanager.json"
        self.log_path = self.workdir / "gateway.log"
        self.system = SYSTEM
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        locations = {}
        if registry is not None:
            locations[registry.host] = {"remotetype": "dockerv2", "url": registry.url}
        self.config: dict[str, Any] = {
            "WorkerThreads": 2,
            "DefaultImageLocation": registry.host if registry is not None else "index.docker.io",
            "DefaultImageFormat": "squashfs",
            "PullUpdateTimeout": 300,
            "ImageExpirationTimeout": "90:00:00:00",
            "CacheDirectory": str(self.workdir / "cache"),
            "ExpandDirectory": str(self.workdir / "expand"),
            "StateDirectory": str(self.workdir / "state"),
            "Metrics": True,
            "Authentication": "munge",
            "Locations": locations,
            "Platforms": {
                SYSTEM: {
                    "mungeSocketPath": munge_socket,
                    "accesstype": "local",
                    "admins": list(admins),
                    "local": {"imageDir": str(self.image_dir)},
                }
            },
        }
        self.config.update(extra or {})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _http(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        if self.netns is None:
            return requests.request(method, url, **kwargs)
        from .netns import in_netns

        return in_netns(self.netns, requests.request, method, url, **kwargs)

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def start(self, timeout: float = 30.0) -> Gateway:
        self.write_config()
        self.port = free_port() if self.netns is None else 8080
        wrap = [] if self.netns is None else ["nsenter", f"--net=/run/netns/{self.netns}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "imagegw.service", "-c", str(self.config_path),
             "--bind", f"{self.host}:{self.port}", "--workers", str(self.workers),
             "--threads", str(self.threads),
             *(["--gunicorn-config", self.gunicorn_config] if self.gunicorn_config else [])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        # Ready when every worker has answered: gunicorn stops the whole gateway when a
        # worker fails to boot, and a start that returned on the first worker's answer
        # would leave that failure to surface later as "connection refused".
        answered: set[int] = set()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                resp = self._http("GET", f"{self.url}/healthz", timeout=1,
                                  headers={"Connection": "close"})
                if resp.status_code == 200:
                    answered.add(int(resp.json().get("pid", 0)))
                    if len(answered) >= self.workers:
                        return self
                    continue
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway did not answer in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole gateway (master and workers) at once: a crash."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request(self, method: str, path: str, *, user: str | None = None,
                body: Any = None, payload: bytes = b"", auth: bool = True,
                header: str | None = None, timeout: float = 30) -> requests.Response:
        headers = {}
        if header is not None:
            headers["authentication"] = header
        elif auth:
            headers["authentication"] = munge_cred(self.munge_socket, user, payload)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes | str) else json.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            return self._http(method, self.url + path, headers=headers, data=data,
                              timeout=timeout)
        except requests.ConnectionError:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"the gateway exited {self.proc.returncode}:\n{self.log()}"
                ) from None
            raise

    def wait_status(self, tag: str, want: tuple[str, ...] = ("READY", "FAILURE"), *,
                    user: str | None = None, body: Any = None, timeout: float = 120,
                    itype: str = "docker") -> dict[str, Any]:
        """Re-POST the pull (as shifterimg does) until the record's status is in ``want``."""
        deadline = time.monotonic() + timeout
        rec: dict[str, Any] = {}
        while time.monotonic() < deadline:
            resp = self.request("POST", f"/api/pull/{self.system}/{itype}/{tag}/", user=user,
                                body=body)
            rec = resp.json()
            if resp.status_code != 200:
                raise AssertionError(f"pull answered {resp.status_code}: {rec}")
            if rec.get("status") in want:
                return rec
            time.sleep(0.2)
        raise AssertionError(f"{tag} still {rec.get('status')} after {timeout} s\n{self.log()}")
