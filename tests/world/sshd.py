"""A real OpenSSH server for tests: the "remote host" of an ``accesstype: remote`` platform.

    with Sshd() as sshd:                         # sshd -D -e on 127.0.0.1:<free port>
        sshd.ssh_options, sshd.scp_options       # -p/-P PORT, no host key checks, BatchMode
        sshd.platform(image_dir)                 # a Platforms.<system> entry for the gateway
        sshd.run("ls /tmp")                      # a command over ssh, as the gateway runs them

Everything it needs is generated in a private directory (removed by ``stop``): a host key,
a client key pair and an ``authorized_keys`` that admits that key for every user. The
directory is world-traversable (and the key list world-readable) because sshd reads a
user's authorized keys with that user's privileges, and tests log in as unprivileged users
too; the client's private key stays 0600 (ssh refuses a readable one). Host key checking
is off on the client side: the host key is new every run.

Needs Debian's ``openssh-server`` (``/usr/sbin/sshd``) and ``openssh-client``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .ports import free_port

SSHD = "/usr/sbin/sshd"
# sshd refuses to start without its privilege-separation directory, which the Debian
# service unit (never started here) would otherwise create.
PRIVSEP_DIR = Path("/run/sshd")
# No prompts, no known_hosts, no "Permanently added" chatter in the gateway's error text.
CLIENT_OPTIONS = (
    "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
).split()


def available() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh") is not None


class Sshd:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- paths and client options ------------------------------------------------------

    @property
    def key(self) -> str:
        """The client's private key (``Platforms.<system>.ssh.key``)."""
        assert self.dir is not None, "sshd not started"
        return str(self.dir / "client_key")

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "sshd not started"
        return self.dir / "sshd.log"

    @property
    def ssh_options(self) -> list[str]:
        return ["-p", str(self.port), *CLIENT_OPTIONS]

    @property
    def scp_options(self) -> list[str]:
        return ["-P", str(self.port), *CLIENT_OPTIONS]

    def platform(
        self,
        image_dir: str | os.PathLike[str],
        *,
        user: str = "root",
        scp_extra: list[str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A ``Platforms.<system>`` entry whose images go to ``image_dir`` over this sshd."""
        return {
            "accesstype": "remote",
            "host": [self.host],
            "ssh": {
                "username": user,
                "key": self.key,
                "imageDir": str(image_dir),
                "sshCmdOptions": self.ssh_options,
                "scpCmdOptions": [*self.scp_options, *(scp_extra or [])],
            },
            **extra,
        }

    def run(
        self, command: str, user: str = "root", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-i", self.key, *self.ssh_options, f"{user}@{self.host}", command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except (OSError, AssertionError):
            return ""

    # -- lifecycle -----------------------------------------------------------------------

    def _keygen(self, path: Path) -> None:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "shifter-test", "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )

    def _write_config(self) -> Path:
        assert self.dir is not None
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.host}\n"
            f"HostKey {self.dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PidFile none\n"
            # The key files live in a test temp dir, not in a home dir sshd would vet.
            "StrictModes no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\n"
            # PAM's account stack is what lets users with a locked password ("!" in
            # /etc/shadow, as useradd leaves them) log in with a key.
            "UsePAM yes\n"
            # scp speaks SFTP since OpenSSH 9.0; the in-process server needs no binary.
            "Subsystem sftp internal-sftp\n"
            # The gateway opens an ssh connection per step, several workers at once.
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            "LogLevel INFO\n"
        )
        return config

    def start(self, timeout: float = 15.0) -> Sshd:
        if not available():
            raise RuntimeError(f"{SSHD} is missing: apt-get install openssh-server")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="shifter-sshd-"))
        self.dir.chmod(0o755)
        self._keygen(self.dir / "host_key")
        self._keygen(self.dir / "client_key")
        authorized = self.dir / "authorized_keys"
        shutil.copyfile(self.dir / "client_key.pub", authorized)
        authorized.chmod(0o644)
        # free_port() can race with another process: retry on a failed bind.
        for _attempt in range(5):
            self.port = free_port(self.host)
            config = self._write_config()
            log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            self._terminate()
        self.stop()
        raise RuntimeError(f"sshd did not start:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        """Ready when a real login works: a listening socket alone says nothing about keys."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                if self.run("true", check=False).returncode == 0:
                    return True
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        return False

    def _terminate(self) -> None:
        if self.proc is None:
            return
        # Its own session: the listener and every per-connection child go together.
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._terminate()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
