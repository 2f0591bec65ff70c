"""Placing image files into a platform's image dir: locally, or on a remote host by ssh.

Either way a reader never sees a partial file: a file is written under
``<name>.partial.<host>.<pid>.XXXXXX`` in the image dir, given its mode and renamed to
its final name. The host and pid in the temporary name let a restarted gateway remove
exactly the partial files its dead predecessor left (a live gateway on another host may
be writing its own into the same shared dir).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import placement


def partial_prefix(name: str, pid: int | None = None) -> str:
    return f"{name}.partial.{socket.gethostname()}.{pid or os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs.

    A zombie does not: a gateway killed whole leaves its workers as zombies until their
    new parent reaps them, and a PID 1 that never does (a container's entrypoint, some
    sandboxes) would otherwise make the dead look alive for ever, and their pulls stuck.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc: trust kill(0)
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ")".
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


# Cleaning up after a gateway restart looks at this many seconds of a remote host at most:
# every gunicorn worker does it while it boots, and an unreachable host must not hold
# the boot past gunicorn's worker timeout.
REMOTE_CLEAN_TIMEOUT = 30.0


def is_dead_partial(filename: str) -> bool:
    """Whether ``filename`` (a base name) is a partial file a dead process of this host
    left. The host name is matched whole, as it may hold dots (``gw1.example.org``), and
    the name must end in the ``.<pid>.<random>`` we give it, so that no final file (whose
    tag might happen to contain ``.partial.``) is ever taken for one."""
    if ".partial." not in filename:
        return False
    rest = filename.rsplit(".partial.", 1)[1]
    match = re.fullmatch(re.escape(socket.gethostname()) + r"\.(\d+)\.[A-Za-z0-9_]+", rest)
    if match is None:
        return False
    pid = int(match.group(1))
    return pid != os.getpid() and not pid_alive(pid)


def _clean_local_partials(root: Path) -> list[str]:
    """Remove the dead partial files under ``root`` (subdirectories too: the tag index
    lives in ``tags/<type>/``); returns their paths relative to ``root``."""
    removed = []
    for path in root.rglob("*.partial.*") if root.is_dir() else []:
        if path.is_file() and is_dead_partial(path.name):
            path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(root)))
    return removed


class TransferError(Exception):
    """Copying into the image dir failed; the message names the step and the output."""


class LocalTransfer:
    """``accesstype: local``: the image dir is a local (or shared) filesystem path."""

    def __init__(self, image_dir: Path) -> None:
        self.image_dir = Path(image_dir)

    def staging(self, name: str) -> Path:
        """A fresh file to build ``name`` in: in the image dir, so placing is a rename."""
        self.image_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix(name), dir=self.image_dir)
        os.close(fd)
        return Path(tmp)

    def commit(self, staged: Path, name: str, mode: int = 0o644) -> None:
        if staged.parent == self.image_dir:
            placement.commit(staged, self.image_dir / name, mode)
            return
        tmp = self.staging(name)
        try:
            shutil.copyfile(staged, tmp)
            placement.commit(tmp, self.image_dir / name, mode)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        staged.unlink(missing_ok=True)

    def write(self, name: str, data: bytes, mode: int = 0o644) -> None:
        tmp = self.staging(name)
        try:
            tmp.write_bytes(data)
            placement.commit(tmp, self.image_dir / name, mode)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def exists(self, name: str) -> bool:
        return (self.image_dir / name).exists()

    def remove(self, name: str) -> None:
        (self.image_dir / name).unlink(missing_ok=True)

    def clean_dead_partials(self) -> list[str]:
        """Remove partial files of dead processes of this host; returns their names."""
        return _clean_local_partials(self.image_dir)


class RemoteTransfer:
    """``accesstype: remote``: copy with ``scp`` and rename with ``ssh`` on ``host[0]``."""

    def __init__(self, platform: dict[str, Any], staging_dir: Path) -> None:
        ssh = platform.get("ssh") or {}
        hosts = platform.get("host") or []
        if not hosts or not ssh.get("imageDir"):
            raise TransferError("remote platform needs host[] and ssh.imageDir")
        self.host = hosts[0]
        self.user = ssh.get("username")
        self.key = ssh.get("key")
        self.image_dir = str(ssh["imageDir"])
        self.ssh_options = _options(ssh.get("sshCmdOptions"))
        self.scp_options = _options(ssh.get("scpCmdOptions"))
        self.staging_dir = Path(staging_dir)

    @property
    def _target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_argv(self, command: str) -> list[str]:
        key = ["-i", self.key] if self.key else []
        return ["ssh", *key, *self.ssh_options, self._target, command]

    def scp_argv(self, src: str, dst: str) -> list[str]:
        key = ["-i", self.key] if self.key else []
        return ["scp", *key, *self.scp_options, src, f"{self._target}:{dst}"]

    def _run(self, argv: Sequence[str], what: str, timeout: float | None = None) -> str:
        # stdin from /dev/null: ssh would otherwise forward whatever the gateway's stdin
        # holds to the remote command, or wait on it.
        try:
            proc = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise TransferError(f"{what} on {self.host} failed: no answer in {timeout} s") from None
        if proc.returncode != 0:
            # scp says the cause first ("dest open …: Permission denied") and then only
            # "failed to upload file": keep the last few lines, not just the last.
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            detail = " | ".join(lines[-3:]) or f"exit status {proc.returncode}"
            raise TransferError(f"{what} on {self.host} failed: {detail}")
        return proc.stdout

    def staging(self, name: str) -> Path:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        # Flat: a name with a directory part (the tag index) needs no local subdirectory.
        prefix = partial_prefix(name.replace("/", "_"))
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=self.staging_dir)
        os.close(fd)
        return Path(tmp)

    def commit(self, staged: Path, name: str, mode: int = 0o644) -> None:
        remote_tmp = f"{self.image_dir}/{partial_prefix(name)}{secrets.token_hex(4)}"
        final = f"{self.image_dir}/{name}"
        try:
            if "/" in name:
                # The tag index lives in tags/<type>/, which a new image dir lacks.
                parent = shlex.quote(os.path.dirname(final))
                self._run(self.ssh_argv(f"mkdir -p {parent}"), "mkdir")
            self._run(self.scp_argv(str(staged), remote_tmp), "copy")
            self._run(
                self.ssh_argv(
                    f"chmod {mode:o} {shlex.quote(remote_tmp)} && "
                    f"mv {shlex.quote(remote_tmp)} {shlex.quote(final)}"
                ),
                "rename",
            )
        except BaseException:
            # Best effort: the partial name is never read, and a restart cleans it.
            subprocess.run(
                self.ssh_argv(f"rm -f {shlex.quote(remote_tmp)}"),
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            raise
        finally:
            staged.unlink(missing_ok=True)

    def write(self, name: str, data: bytes, mode: int = 0o644) -> None:
        staged = self.staging(name)
        staged.write_bytes(data)
        self.commit(staged, name, mode)

    def exists(self, name: str) -> bool:
        path = shlex.quote(f"{self.image_dir}/{name}")
        return (
            self._run(self.ssh_argv(f"test -e {path} && echo yes || echo no"), "check").strip()
            == "yes"
        )

    def remove(self, name: str) -> None:
        self._run(self.ssh_argv(f"rm -f {shlex.quote(f'{self.image_dir}/{name}')}"), "remove")

    def clean_dead_partials(self) -> list[str]:
        """Remove what dead processes of this host left: their staged copies here and
        their partial files in the remote image dir (a copy killed half way leaves one
        there, as big as the image). Partial names carry this host's name and the pid,
        so the check is made here; other hosts' partials are left alone."""
        removed = _clean_local_partials(self.staging_dir)
        listing = self._run(
            self.ssh_argv(
                f"find {shlex.quote(self.image_dir)} -type f -name '*.partial.*' -print0"
            ),
            "list partial files",
            timeout=REMOTE_CLEAN_TIMEOUT,
        )
        dead = [p for p in listing.split("\0") if p and is_dead_partial(os.path.basename(p))]
        if dead:
            self._run(
                self.ssh_argv("rm -f -- " + " ".join(shlex.quote(p) for p in dead)),
                "remove partial files",
                timeout=REMOTE_CLEAN_TIMEOUT,
            )
        return removed + dead


def _options(raw: Any) -> list[str]:
    if not raw:
        return []
    if isinstance(raw, str):
        return shlex.split(raw)
    return [str(x) for x in raw]


Transfer = LocalTransfer | RemoteTransfer


def transfer_for(platform: dict[str, Any], staging_dir: Path) -> Transfer:
    """The transfer a platform entry of ``imagemanager.json`` asks for."""
    access = platform.get("accesstype", "local")
    if access == "local":
        image_dir = (platform.get("local") or {}).get("imageDir")
        if not image_dir:
            raise TransferError("local platform needs local.imageDir")
        return LocalTransfer(Path(image_dir))
    if access == "remote":
        return RemoteTransfer(platform, staging_dir)
    raise TransferError(f"unknown accesstype '{access}' (local or remote)")
