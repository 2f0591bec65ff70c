"""A private munge daemon for tests (munge 0.5.15, ``munged``).

    with Munged() as m:                  # or m = Munged().start(); ...; m.stop()
        m.socket                         # DIR/sock: pass to imagegw.munge / `munge -S`
        m.encode_cli(b"x", user="nobody")  # a credential made by the `munge` CLI as that user
        m.log()                          # munged's output, for failure messages

Each daemon gets its own temp dir with a fresh random 1024-byte key (mode 0600), so
two daemons do not accept each other's credentials. It runs in the foreground as a
child of the test process and is ready once ``munge -S sock -n`` succeeds.

Permissions that work here: munged (as root) accepts its dirs if they are not
writable by group/other (sticky /tmp above is fine) and the key is 0600. The temp dir is
made 0755, not mkdtemp's 0700, so that unprivileged users (``runuser -u nobody``) can
reach the socket (the socket itself is 0777). ``--force`` lets it start over a stale
socket or lock file.

Cleanup: ``stop()`` (SIGTERM, then SIGKILL) is called by the context manager and the
pytest fixture, and again at interpreter exit for any daemon still running. munged is
started through ``setpriv --pdeathsig KILL`` so it also dies if the test process is
killed outright. Caveat of pdeathsig: it fires when the *thread* that started munged
exits, so start it from a long-lived thread (the main thread, as fixtures do).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

MUNGED = shutil.which("munged", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
MUNGE = shutil.which("munge")

_running: weakref.WeakSet[Munged] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for daemon in list(_running):
        daemon.stop()


class Munged:
    """A munged on a private socket and key; see the module docstring."""

    def __init__(self, num_threads: int = 2, ready_timeout: float = 15.0) -> None:
        self.num_threads = num_threads
        self.ready_timeout = ready_timeout
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()

    # -- paths -----------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        if self.dir is None:
            raise RuntimeError("munged not started")
        return str(self.dir / name)

    @property
    def socket(self) -> str:
        return self._path("sock")

    @property
    def key_path(self) -> str:
        return self._path("key")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Munged:
        if MUNGED is None or MUNGE is None:
            raise RuntimeError("munge not installed: apt-get install munge")
        self._owner = os.getpid()
        self.dir = Path(tempfile.mkdtemp(prefix="munged-"))
        # 0755: others must traverse to the socket; munged refuses group/other-writable dirs.
        os.chmod(self.dir, 0o755)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        cmd = [
            MUNGED,
            "-F",
            "--force",
            f"--socket={self.socket}",
            f"--key-file={self.key_path}",
            f"--log-file={self._path('log')}",
            f"--pid-file={self._path('pid')}",
            f"--seed-file={self._path('seed')}",
            f"--num-threads={self.num_threads}",
        ]
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        # In the foreground munged logs to stderr (the log file stays empty): keep it.
        with open(self._path("stderr"), "wb") as err:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
            )
        _running.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"munged exited with {self._proc.returncode}:\n{self.log()}")
            probe = subprocess.run(
                [MUNGE, "-S", self.socket, "-n"], capture_output=True, timeout=10
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"munged not ready after {self.ready_timeout}s: "
                    f"{probe.stderr.decode(errors='replace')}\n{self.log()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (munged removes its socket), SIGKILL if it lingers; remove the dir."""
        if os.getpid() != self._owner:
            # A forked test child exiting through atexit must not kill the parent's daemon.
            return
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _running.discard(self)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Munged:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------

    def log(self) -> str:
        out = []
        for name in ("stderr", "log"):
            try:
                out.append(Path(self._path(name)).read_text(errors="replace"))
            except (OSError, RuntimeError):
                pass
        return "".join(out)

    def encode_cli(
        self, payload: bytes = b"", user: str | None = None, ttl: int | None = None
    ) -> str:
        """A credential made by the ``munge`` CLI, as ``user`` (via ``runuser``) if given."""
        cmd = [MUNGE or "munge", "-S", self.socket]
        if ttl is not None:
            cmd += ["-t", str(ttl)]
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        out = subprocess.run(cmd, input=payload, capture_output=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(
                f"{cmd}: exit {out.returncode}: {out.stderr.decode(errors='replace')}"
            )
        return out.stdout.decode().strip()

    def decode_cli(self, cred: str) -> subprocess.CompletedProcess[str]:
        """``unmunge`` the credential; ``.returncode`` is the munge error number."""
        return subprocess.run(
            ["unmunge", "-S", self.socket], input=cred, capture_output=True, text=True, timeout=30
        )
