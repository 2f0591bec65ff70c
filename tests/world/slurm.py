"""A real one-node Slurm for tests: ``slurmctld`` + ``slurmd`` from Debian's slurm-wlm.

    cluster = SlurmCluster(workdir, munge_socket=m.socket, plugstack="required … args").start()
    job = cluster.sbatch("shifter-alice", script, "--image=…", env=…)   # Submitted(...)
    cluster.wait(job.job_id)        # final state ("COMPLETED", "FAILED", …)
    cluster.srun("shifter-alice", "--image=…", "true", env=…)
    cluster.resume()                # a node drained by a failed prolog
    cluster.stop()                  # jobs cancelled, daemons stopped, dirs kept for logs

Everything lives in ``workdir`` (slurm.conf, plugstack.conf, state, spool, logs); both
daemons run as root in the foreground as children of the test process (``setpriv
--pdeathsig KILL``), on free loopback ports, authenticated by the given munged. The node
is this host (its short name), with ``PrologFlags=alloc`` so the SPANK job prolog runs
when the allocation is made, in two partitions: ``debug`` (the default) and ``whole``
(``OverSubscribe=EXCLUSIVE``: every job gets whole nodes). Clients run as the named user
through ``runuser`` with ``SLURM_CONF`` set: exactly what a user on a login node types.

``client_plugstack`` gives the clients (sbatch, salloc, srun: ``client_env()``) their own
plugstack.conf through their own copy of slurm.conf, with ``client_preload`` (e.g.
libasan) in their environment: an ASan build of a plugin can only be loaded by programs
that have the ASan runtime preloaded, and slurmd starts the job prolog and epilog
(``slurmstepd spank prolog``) with an environment of its own making, so there only a
build without ASan loads. Slurm forwards a job's environment to its tasks, so a
``srun`` inside a job is a client too.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from .ports import free_port

SLURMCTLD = shutil.which("slurmctld", path="/usr/sbin:/sbin:/usr/bin") or "/usr/sbin/slurmctld"
SLURMD = shutil.which("slurmd", path="/usr/sbin:/sbin:/usr/bin") or "/usr/sbin/slurmd"
NODE = socket.gethostname().split(".")[0]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED")

_running: weakref.WeakSet[SlurmCluster] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_running):
        cluster.stop()


@dataclass
class Client:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Submitted:
    returncode: int
    stdout: str
    stderr: str
    job_id: int | None


class SlurmCluster:
    def __init__(self, workdir: Path, *, munge_socket: str, plugstack: str = "",
                 client_plugstack: str | None = None, client_preload: str | None = None,
                 cpus: int | None = None, cgroup: bool = False,
                 spool: Path | None = None) -> None:
        self.workdir = Path(workdir)
        # slurmd's spool dir (SlurmdSpoolDir): in workdir unless given, e.g. outside /tmp
        # for tests of what the containers see of it (they have the host's /tmp)
        self.spool = Path(spool) if spool is not None else self.workdir / "spool"
        self.munge_socket = munge_socket
        self.plugstack = plugstack
        self.client_plugstack = client_plugstack
        self.client_preload = client_preload
        self.cpus = cpus or os.cpu_count() or 1
        self.cgroup = cgroup
        self.conf = self.workdir / "slurm.conf"
        self.plugstack_conf = self.workdir / "plugstack.conf"
        self.client_conf = self.conf
        self.client_plugstack_conf = self.plugstack_conf
        if client_plugstack is not None:
            self.client_conf = self.workdir / "client-slurm.conf"
            self.client_plugstack_conf = self.workdir / "client-plugstack.conf"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._owner = os.getpid()

    # -- configuration -----------------------------------------------------------------

    def write_config(self) -> None:
        w = self.workdir
        for d in (w, w / "state", self.spool):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)  # clients (the test users) read slurm.conf and plugstack.conf
        ctld_port, d_port = free_port(), free_port()
        self.conf.write_text(f"""\
ClusterName=shiftertest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={w}/state
SlurmdSpoolDir={self.spool}
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd.log
SlurmdDebug=info
{self._tracking()}
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters={"CR_Core_Memory" if self.cgroup else "CR_Core"}
SchedulerParameters=sched_min_interval=0
MinJobAge=600
PrologFlags={"alloc,contain" if self.cgroup else "alloc"}
PlugStackConfig={self.plugstack_conf}
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
PartitionName=whole Nodes={NODE} OverSubscribe=EXCLUSIVE MaxTime=INFINITE State=UP
""")
        if self.cgroup:
            # cgroup v1 (this machine: v1 controllers, a v2 hierarchy beside them at
            # /sys/fs/cgroup/unified, no systemd); memory limits enforced per job
            (w / "cgroup.conf").write_text(
                "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n"
                "ConstrainRAMSpace=yes\nConstrainSwapSpace=yes\nAllowedSwapSpace=0\n"
                "ConstrainCores=no\nConstrainDevices=no\n")
            os.chmod(w / "cgroup.conf", 0o644)
        self.plugstack_conf.write_text(self.plugstack + "\n")
        if self.client_plugstack is not None:
            self.client_conf.write_text(self.conf.read_text().replace(
                f"PlugStackConfig={self.plugstack_conf}",
                f"PlugStackConfig={self.client_plugstack_conf}"))
            self.client_plugstack_conf.write_text(self.client_plugstack + "\n")
        for path in (self.conf, self.plugstack_conf, self.client_conf,
                     self.client_plugstack_conf):
            os.chmod(path, 0o644)

    def _tracking(self) -> str:
        if not self.cgroup:
            return "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none"
        return "ProctrackType=proctrack/cgroup\nTaskPlugin=task/cgroup,task/affinity"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The daemons' and the admin commands' environment."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
               "SLURM_CONF": str(self.conf)}
        env.update(extra or {})
        return env

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A user's environment for sbatch/salloc/srun (``extra`` wins)."""
        env = self.env({"SLURM_CONF": str(self.client_conf)})
        if self.client_preload:
            env["LD_PRELOAD"] = self.client_preload
            # a finding fails the client (and so the test); leaks are not findings here
            env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=86"
        env.update(extra or {})
        return env

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self.write_config()
        self._owner = os.getpid()
        _running.add(self)
        try:
            self._spawn("slurmctld", [SLURMCTLD, "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [SLURMD, "-D", "-f", str(self.conf), "-N", NODE])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        with open(self.workdir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env(), start_new_session=True)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.logs()}")
            state = self.node_state()
            if state.startswith("IDLE"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"node not idle after {timeout}s (state {state!r}):\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, wait for their steps and epilogs, stop both daemons."""
        if os.getpid() != self._owner or not self._procs:
            return
        if all(p.poll() is None for p in self._procs.values()):
            self.admin("scancel", "--full", "--user=" + ",".join(self._job_users() or ["root"]))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (self._active_jobs() or self._steps()):
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _running.discard(self)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _job_users(self) -> list[str]:
        out = self.admin("squeue", "-h", "-o", "%u").stdout.split()
        return sorted(set(out))

    def _active_jobs(self) -> list[str]:
        out = self.admin("squeue", "-h", "-t", "all", "-o", "%i %T").stdout.splitlines()
        return [line for line in out if line.split()[-1] not in FINAL]

    def _steps(self) -> list[str]:
        """slurmstepd sockets in the spool dir: a step still alive."""
        spool = self.spool
        return [p.name for p in spool.iterdir() if p.is_socket()] if spool.is_dir() else []

    # -- clients -------------------------------------------------------------------------

    def client_argv(self, argv: list[str], cwd: str | Path | None = None) -> list[str]:
        """How a client command runs (a multi-node cluster runs it on its login node:
        world/cluster.py)."""
        return argv

    def admin(self, *argv: str, timeout: float = 60) -> Client:
        proc = subprocess.run(self.client_argv(list(argv)), capture_output=True, text=True,
                              timeout=timeout, env=self.env(), stdin=subprocess.DEVNULL)
        return Client(proc.returncode, proc.stdout, proc.stderr)

    def as_user(self, user: str, argv: list[str], *, env: dict[str, str] | None = None,
                cwd: str | Path | None = None, timeout: float = 120) -> Client:
        """``argv`` as ``user`` (runuser: their uid, gid and groups), SLURM_CONF set."""
        full = self.client_env(env)
        cmd = ["runuser", "-u", user, "--", "env", "-i",
               *[f"{k}={v}" for k, v in full.items()], *argv]
        if user == "root":
            cmd = ["env", "-i", *[f"{k}={v}" for k, v in full.items()], *argv]
        proc = subprocess.run(self.client_argv(cmd, cwd), capture_output=True, text=True,
                              timeout=timeout, cwd=str(cwd) if cwd else None,
                              stdin=subprocess.DEVNULL)
        return Client(proc.returncode, proc.stdout, proc.stderr)

    def sbatch(self, user: str, script: str, *args: str, env: dict[str, str] | None = None,
               cwd: str | Path | None = None) -> Submitted:
        """``sbatch ARGS`` with ``script`` on stdin; ``job_id`` when it was accepted."""
        full = self.client_env(env)
        cmd = ["runuser", "-u", user, "--", "env", "-i",
               *[f"{k}={v}" for k, v in full.items()], "sbatch", "--parsable", *args]
        proc = subprocess.run(self.client_argv(cmd, cwd), input=script, capture_output=True,
                              text=True, timeout=120, cwd=str(cwd) if cwd else None)
        job_id = None
        match = re.match(r"(\d+)", proc.stdout.strip())
        if proc.returncode == 0 and match:
            job_id = int(match.group(1))
        return Submitted(proc.returncode, proc.stdout, proc.stderr, job_id)

    def srun(self, user: str, *args: str, env: dict[str, str] | None = None,
             cwd: str | Path | None = None, timeout: float = 120) -> Client:
        return self.as_user(user, ["srun", *args], env=env, cwd=cwd, timeout=timeout)

    # -- state ---------------------------------------------------------------------------

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (one-line form, split on spaces)."""
        out = self.admin("scontrol", "-o", "show", "job", str(job_id)).stdout.strip()
        fields: dict[str, str] = {}
        key = None
        for word in out.split(" "):
            k, eq, v = word.partition("=")
            if eq and re.fullmatch(r"[A-Za-z:/_]+", k):
                key = k
                fields[key] = v
            elif key is not None:  # a value with spaces (Comment=…)
                fields[key] += " " + word
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "")

    def wait(self, job_id: int, timeout: float = 120) -> str:
        """Poll until the job is in a final state (its epilog done); returns the state, or
        ``HELD`` for a job Slurm requeued held (what a failed prolog does to a batch job)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in FINAL:
                return state
            if state == "PENDING" and "held" in info.get("Reason", ""):
                return "HELD"
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {state!r} after {timeout}s:\n{self.logs()}")

    def wait_until(self, job_id: int, predicate: object, timeout: float = 120) -> dict[str, str]:
        """Poll ``scontrol show job`` until ``predicate(fields)`` holds; returns the fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if predicate(info):  # type: ignore[operator]
                return info
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id}: condition not met after {timeout}s: {info}\n"
                           f"{self.logs()}")

    def settle(self, timeout: float = 60) -> None:
        """Wait until no job is pending, running or completing (epilogs done)."""
        deadline = time.monotonic() + timeout
        while self._active_jobs() or "COMPLETING" in self.node_state():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still active after {timeout}s: {self._active_jobs()}")
            time.sleep(0.1)

    def node_state(self) -> str:
        out = self.admin("sinfo", "-h", "-N", "-n", NODE, "-o", "%T").stdout.strip()
        return out.upper()

    def node_reason(self) -> str:
        return self.admin("sinfo", "-h", "-N", "-n", NODE, "-o", "%E").stdout.strip()

    def resume(self) -> None:
        """Return a node drained by a failed prolog/epilog to service."""
        self.admin("scontrol", "update", f"nodename={NODE}", "state=resume")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.node_state().startswith("IDLE"):
            time.sleep(0.2)

    def logs(self, tail: int = 4000) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            try:
                text = (self.workdir / name).read_text(errors="replace")
            except OSError:
                continue
            out.append(f"--- {name}\n{text[-tail:]}")
        return "\n".join(out)

    def slurmd_log(self) -> str:
        try:
            return (self.workdir / "slurmd.log").read_text(errors="replace")
        except OSError:
            return ""


# -- the Shifter side: the plugin build and the programs it runs -------------------------

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SRC = REPO / "slurm"
PYTHON = "/usr/bin/python3"


def asan_runtime() -> str:
    """The path of gcc's libasan, to preload into programs that load the ASan plugin."""
    out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                         text=True, check=True).stdout.strip()
    return os.path.realpath(out)


def build_plugin(variant: str = "ubsan") -> Path:
    """``make -C slurm sanitize``; ``variant`` is ``ubsan`` or ``asan``."""
    subprocess.run(["make", "-s", "-C", str(PLUGIN_SRC), "sanitize"], check=True)
    return PLUGIN_SRC / "build" / f"shifter_slurm-{variant}.so"


def write_launchers(bindir: Path, helper: Path) -> Path:
    """The programs ``make install`` puts in place, as launchers of this checkout:
    ``setupRoot``, ``unsetupRoot``, ``shifter-spank``, ``shifter`` (``python3 -IS``, like
    the installed ones) and ``shifterimg`` (the venv's). ``setupRoot`` and ``unsetupRoot``
    always use ``helper`` (the test build of the setuid helper), whatever the plugin's
    fixed environment says (it names the helper installed with the plugin)."""
    bindir.mkdir(parents=True, exist_ok=True)
    os.chmod(bindir, 0o755)
    mains = {"setupRoot": ("shifter.setuproot", "main"),
             "unsetupRoot": ("shifter.setuproot", "main_unsetup"),
             "shifter-spank": ("shifter.spank", "main"),
             "shifter": ("shifter.launch", "main")}
    for name, (module, fn) in mains.items():
        default_helper = "" if name in ("shifter", "shifter-spank") else (
            f"import os\nos.environ['SHIFTER_HELPER'] = {str(helper)!r}\n")
        (bindir / name).write_text(
            f"#!{PYTHON} -IS\n{default_helper}import sys\nsys.path.insert(0, {str(REPO)!r})\n"
            f"from {module} import {fn}\nsys.exit({fn}())\n")
        os.chmod(bindir / name, 0o755)
    # No libasan for the gateway client (clients of an ASan plugin have it preloaded): it
    # frees libmunge's credential with libc's free() through ctypes, which the preloaded
    # allocator cannot take.
    (bindir / "shifterimg").write_text(
        f'#!/bin/sh\nunset LD_PRELOAD\nexec {REPO}/.venv/bin/shifterimg "$@"\n')
    os.chmod(bindir / "shifterimg", 0o755)
    return bindir


def plugstack_line(plugin: Path, bindir: Path, shifter_config: Path, **args: str) -> str:
    """``required <plugin> shifter_config=… setuproot=… unsetuproot=… spank_tool=…
    state_dir=… …`` (the state dir beside ``bindir``: clusters of other checkouts on this
    machine number their jobs from 1 too)."""
    words = [f"shifter_config={shifter_config}", f"setuproot={bindir}/setupRoot",
             f"unsetuproot={bindir}/unsetupRoot", f"spank_tool={bindir}/shifter-spank",
             f"state_dir={bindir.parent}/shifter-state"]
    words += [f"{k}={v}" for k, v in args.items()]
    return f"required {plugin} " + " ".join(words)
