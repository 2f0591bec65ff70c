"""A virtual multi-node Slurm cluster on this one machine (issue 12).

    vc = VirtualCluster(workdir, nodes=4, munge_socket=m.socket, plugstack=…,
                        keep_tmp=[basetemp, munge_dir], private_dirs=[state_dir]).start()
    vc.nodes                      # ["node1", …, "node4"]; vc.address("node3") "10.251.1.3"
    vc.sbatch(user, script, "-N", "4", …); vc.wait(job_id); vc.srun(user, …)   # as SlurmCluster
    vc.node_states()              # {"node1": "IDLE", …}
    vc.on_node("node2", argv)     # argv in node2's namespaces (net, UTS, mount), as root
    vc.node_mounts("node2", dirs) # mount points under ``dirs`` as node2 sees them
    vc.node_pid("node2")          # its slurmd's pid
    vc.slurmd_log("node2"); vc.resume(["node2"])    # a node's log; back to service
    vc.kill_node("node2")         # it dies: all in it killed, its namespaces gone
    vc.revive_node("node2")       # it boots again (fresh namespaces and slurmd)
    vc.relay(port)                # 127.0.0.1:port of the test process, on the service node
    vc.stop()                     # jobs cancelled, daemons stopped, namespaces deleted
    vc.leftovers()                # [] after stop(): no namespace, no process of ours

What there is (``NET`` is 10.251.0.0/16, on a bridge that exists only inside the
``ctl`` namespace: no link to the machine's own interfaces, no route out):

- ``ctl`` (10.251.0.1): a network namespace with the bridge; slurmctld runs there in
  its own UTS and mount namespace as host ``ctl`` (with the cluster's /etc/hosts and
  the ``shared`` mounts). It is the login node: every client (sbatch, srun, squeue,
  scontrol, ``as_user``) runs in slurmctld's namespaces (``client_argv``).
- ``svc`` (10.251.0.2): the service node, for the image gateway
  (``Gateway(..., netns=vc.svc_netns, host=vc.svc_address)``). ``relay(port)`` makes a
  service of the test process (the registry on 127.0.0.1) reachable from it.
- ``node1..nodeN`` (10.251.1.1…): each its own network, UTS and mount namespace with its
  own slurmd (``slurmd -D -N nodeK``, started through ``nsenter --net`` + ``unshare
  --uts --mount``: ``ip netns exec`` remounts /sys without /sys/fs/cgroup, and slurmd
  22.05 dies of it). In its mount namespace: ``/etc/hosts`` naming every host above, a
  fresh ``/dev/shm``, its own ``/tmp`` (a directory of this cluster; the paths in
  ``keep_tmp`` stay visible in it at their own names: the test world's temp dir and the
  munge socket's), a fresh tmpfs on each of ``private_dirs`` (per-node state), and on
  each ``path`` of ``shared`` (``{path: export}``) the shared filesystem: ``export``, a
  directory of the service node, mounted over the cluster network (below). Mounts a job
  makes on a node (setupRoot's) are that node's alone.
- All nodes share the IPC namespace of the machine: Debian's MPICH uses UCX, which
  takes the boot id (the same in every namespace) for "same host" and then hangs in
  MPI_Finalize about every second run when the nodes cannot share memory.
- One munged (the caller's; its socket is a file, reachable from every namespace): the
  nodes share one key.

Every daemon runs as a child of the test process with ``setpriv --pdeathsig KILL``;
``stop()`` (also at interpreter exit, and from the context manager on failure) cancels
jobs, stops the daemons and deletes the namespaces (``ip netns del`` unmounts their
``/run/netns`` files; the mount ``ip netns add`` made of /run/netns itself goes too, when
this cluster made it and no namespace is left). Namespaces are named ``sc<pid>-<n>-…``:
those of a killed run (that pid gone) are deleted, with whatever still runs in them (the
gateway, steps, containers' sshds), when the next cluster starts.

The shared filesystem (``shared_fs="sshfs"``, the default) is SFTP over the cluster
network: an sshd on the service node (root, key only, ``internal-sftp``) and an
``sshfs -o ro,allow_other`` mount in the login node and every compute node, so image
files and ``.meta`` reach the nodes only over the bridge, and a dead service node is
felt on the nodes. Not NFS, because this kernel has none: neither ``nfs`` nor ``nfsd`` is
in /proc/filesystems and it loads no modules (no /proc/modules), so Debian's
nfs-kernel-server has nothing to serve with and the nodes nothing to mount with.
``shared_fs="bind"`` bind-mounts ``export`` instead (no network in the way).

Scale: a node costs one slurmd (about 7 MB) plus its steps; the limit on this machine is
its two cores (bench/cluster). Node count and addresses allow up to 4000 nodes.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path

from . import netns
from .slurm import FINAL, SLURMCTLD, SLURMD, SlurmCluster

NET = "10.251"
CTL_ADDR = f"{NET}.0.1"
SVC_ADDR = f"{NET}.0.2"

_running: weakref.WeakSet[VirtualCluster] = weakref.WeakSet()
_serial = itertools.count(1)


@atexit.register
def _stop_all() -> None:
    for cluster in list(_running):
        cluster.stop()


def reap_stale_namespaces() -> list[str]:
    """Delete the namespaces of clusters whose test process is gone (a killed run)."""
    gone = []
    for name in netns.names("sc"):
        m = re.match(r"sc(\d+)-", name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            _kill_netns_processes(name)  # steps and sshds outlive their slurmd
            netns.delete(name)
            gone.append(name)
        except PermissionError:
            pass
    return gone


def _kill_netns_processes(name: str) -> None:
    """Whatever still runs in a namespace of ours (a step or a container's sshd that
    outlived its slurmd): SIGKILL, so the namespace and its mounts go."""
    res = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class VirtualCluster(SlurmCluster):
    """See the module docstring."""

    def __init__(self, workdir: Path, *, nodes: int = 4, munge_socket: str,
                 plugstack: str = "", client_plugstack: str | None = None,
                 client_preload: str | None = None, cpus: int | None = None,
                 keep_tmp: list[Path] | tuple[Path, ...] = (),
                 private_dirs: list[Path] | tuple[Path, ...] = (),
                 shared: dict[Path, Path] | None = None, shared_fs: str = "sshfs",
                 slurmd_timeout: int = 30) -> None:
        super().__init__(workdir, munge_socket=munge_socket, plugstack=plugstack,
                         client_plugstack=client_plugstack, client_preload=client_preload,
                         cpus=cpus)
        if not 1 <= nodes <= 4000:
            raise ValueError("nodes: 1..4000")
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.keep_tmp = [Path(p) for p in keep_tmp]
        self.private_dirs = [Path(p) for p in private_dirs]
        self.shared = {Path(k): Path(v) for k, v in (shared or {}).items()}
        self.slurmd_timeout = slurmd_timeout  # how soon slurmctld sees a dead node
        if shared_fs not in ("sshfs", "bind"):
            raise ValueError("shared_fs: sshfs or bind")
        self.shared_fs = shared_fs
        self.prefix = f"sc{os.getpid()}-{next(_serial)}-"
        self.ctl_netns = self.prefix + "ctl"
        self.svc_netns = self.prefix + "svc"
        self.svc_address = SVC_ADDR
        self.hosts_file = self.workdir / "hosts"
        self._relays: list[netns.Relay] = []
        self._netns: list[str] = []
        self._mounted_netns_dir = False

    def client_argv(self, argv: list[str], cwd: str | Path | None = None) -> list[str]:
        """On the login node: slurmctld's network, UTS and mount namespaces."""
        pid = self._procs["slurmctld"].pid
        return ["nsenter", "-t", str(pid), "--net", "--uts", "--mount",
                f"--wd={cwd or '/'}", *argv]

    def address(self, node: str) -> str:
        i = self.nodes.index(node)
        return f"{NET}.{1 + i // 250}.{1 + i % 250}"

    def netns_of(self, node: str) -> str:
        return self.prefix + node

    # -- configuration -----------------------------------------------------------------

    def write_config(self) -> None:
        w = self.workdir
        for d in (w, w / "state", w / "nodes"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)
        for node in self.nodes:
            for sub in ("spool", "tmp"):
                (w / "nodes" / node / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(w / "nodes" / node / "tmp", 0o1777)
        cpus = self.cpus
        node_lines = "".join(
            f"NodeName={n} NodeAddr={self.address(n)} CPUs={cpus} Sockets=1 "
            f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN\n"
            for n in self.nodes)
        names = ",".join(self.nodes)
        self.conf.write_text(f"""\
ClusterName=shiftervc
SlurmctldHost=ctl({CTL_ADDR})
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/nodes/%n/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/nodes/%n/slurmd.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/nodes/%n/slurmd.log
SlurmdDebug=info
SlurmdTimeout={self.slurmd_timeout}
# A loaded 2-core machine: a step launch once failed on connect (default TCPTimeout 2 s)
MessageTimeout=30
TCPTimeout=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_min_interval=0
MinJobAge=600
TreeWidth=64
PrologFlags=alloc
PlugStackConfig={self.plugstack_conf}
{node_lines}PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
PartitionName=whole Nodes={names} OverSubscribe=EXCLUSIVE MaxTime=INFINITE State=UP
""")
        self.plugstack_conf.write_text(self.plugstack + "\n")
        if self.client_plugstack is not None:
            self.client_conf.write_text(self.conf.read_text().replace(
                f"PlugStackConfig={self.plugstack_conf}",
                f"PlugStackConfig={self.client_plugstack_conf}"))
            self.client_plugstack_conf.write_text(self.client_plugstack + "\n")
        hosts = ["127.0.0.1\tlocalhost", f"{CTL_ADDR}\tctl", f"{SVC_ADDR}\tsvc"]
        hosts += [f"{self.address(n)}\t{n}" for n in self.nodes]
        self.hosts_file.write_text("\n".join(hosts) + "\n")
        for path in (self.conf, self.plugstack_conf, self.client_conf,
                     self.client_plugstack_conf, self.hosts_file):
            os.chmod(path, 0o644)

    # -- network -------------------------------------------------------------------------

    def _make_network(self) -> None:
        reap_stale_namespaces()
        self._mounted_netns_dir = not netns.dir_is_mounted()
        for name in (self.ctl_netns, self.svc_netns, *map(self.netns_of, self.nodes)):
            netns.add(name)
            self._netns.append(name)
        ctl = self.ctl_netns
        netns.ip(ctl, "link", "add", "br0", "type", "bridge")
        netns.ip(ctl, "addr", "add", f"{CTL_ADDR}/16", "dev", "br0")
        netns.ip(ctl, "link", "set", "br0", "up")
        self._link(self.svc_netns, SVC_ADDR)
        for node in self.nodes:
            self._link(self.netns_of(node), self.address(node))

    def _link(self, name: str, addr: str) -> None:
        """A veth from the bridge to ``eth0`` in namespace ``name``, with ``addr``."""
        veth = "v-" + name[len(self.prefix):]
        netns.ip(self.ctl_netns, "link", "add", veth, "type", "veth", "peer", "name",
                 "eth0", "netns", name)
        netns.ip(self.ctl_netns, "link", "set", veth, "master", "br0", "up")
        netns.ip(name, "addr", "add", f"{addr}/16", "dev", "eth0")
        netns.ip(name, "link", "set", "eth0", "up")

    def relay(self, port: int, host: str = "127.0.0.1") -> None:
        """``host:port`` of the test process, reachable from the service node at
        127.0.0.1:``port`` (e.g. the registry, for the gateway there)."""
        self._relays.append(netns.Relay(self.svc_netns, ("127.0.0.1", port), (host, port)))

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> VirtualCluster:
        self.write_config()
        self._owner = os.getpid()
        _running.add(self)
        try:
            self._make_network()
            if self.shared and self.shared_fs == "sshfs":
                self._start_file_server()
            self._spawn_in(self.ctl_netns, "slurmctld", "ctl", self._shared_mounts(),
                           [SLURMCTLD, "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn_node(node)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_node(self, node: str) -> None:
        self._spawn_in(self.netns_of(node), node, node, self._node_mounts(node),
                       [SLURMD, "-D", "-N", node, "-f", str(self.conf)])

    def kill_node(self, node: str) -> None:
        """The node dies: SIGKILL to everything in its network namespace (slurmd, steps,
        tasks, containers' sshds), so its mount namespace and every mount in it go, then
        the network namespace itself. slurmctld sees it stop answering."""
        name = self.netns_of(node)
        proc = self._procs.pop(node, None)
        _kill_netns_processes(name)
        if proc is not None:
            proc.kill()
            proc.wait()
        netns.delete(name)
        if name in self._netns:
            self._netns.remove(name)
        # The killed slurmstepds' sockets stay in the spool dir: stop() would wait for
        # those "steps" in vain.
        spool = self.workdir / "nodes" / node / "spool"
        for path in spool.iterdir() if spool.is_dir() else []:
            if path.is_socket():
                path.unlink(missing_ok=True)

    def revive_node(self, node: str, timeout: float = 60) -> None:
        """A killed node boots again: fresh namespaces, a fresh slurmd; returns when it
        has registered (its state is then up to Slurm: ``resume()`` brings a DOWN node
        back to IDLE)."""
        info = self.admin("scontrol", "-o", "show", "node", node).stdout
        m = re.search(r"SlurmdStartTime=(\S+)", info)
        started = m.group(1) if m else "?"
        name = self.netns_of(node)
        netns.add(name)
        self._netns.append(name)
        self._link(name, self.address(node))
        self._spawn_node(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._procs[node].poll() is not None:
                raise RuntimeError(f"{node}'s slurmd exited:\n{self.logs()}")
            info = self.admin("scontrol", "-o", "show", "node", node).stdout
            if f"SlurmdStartTime={started}" not in info and "*" not in \
                    self.node_states().get(node, "*"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"{node} did not register again after {timeout}s")

    def _node_mounts(self, node: str) -> list[str]:
        """Shell lines that make ``node``'s mount namespace (see the module docstring)."""
        tmp = self.workdir / "nodes" / node / "tmp"
        lines = ["mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm"]
        for keep in self.keep_tmp:
            if not keep.resolve().is_relative_to("/tmp"):
                continue  # outside /tmp: visible anyway
            rel = keep.resolve().relative_to("/tmp")
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            lines.append(f"mount --bind '{keep}' '{tmp / rel}'")
        lines.append(f"mount --rbind '{tmp}' /tmp")
        for d in self.private_dirs:
            mode = oct(os.stat(d).st_mode & 0o7777)[2:]
            lines.append(f"mount -t tmpfs -o mode={mode},size=64m tmpfs '{d}'")
        return lines + self._shared_mounts()

    def _shared_mounts(self) -> list[str]:
        if self.shared_fs == "bind":
            return [f"mount --bind '{export}' '{path}'"
                    for path, export in self.shared.items()]
        key = self.workdir / "sshfs" / "client_key"
        # read-only for everyone (the gateway writes on the service node's own disk);
        # allow_other: users read images and .meta files too; no directory cache, so a
        # file the gateway has just renamed into place is seen at once
        opts = (f"ro,allow_other,dir_cache=no,reconnect,ServerAliveInterval=10,"
                f"IdentityFile={key},BatchMode=yes,StrictHostKeyChecking=no,"
                "UserKnownHostsFile=/dev/null,LogLevel=ERROR")
        return [f"sshfs -o {opts} 'root@{SVC_ADDR}:{export}' '{path}'"
                for path, export in self.shared.items()]

    def _start_file_server(self, timeout: float = 30) -> None:
        """The service node's sshd (root, keys only, SFTP): what the nodes' sshfs mount."""
        d = self.workdir / "sshfs"
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o700)
        for key in ("host_key", "client_key"):
            if not (d / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                "virtual cluster", "-f", str(d / key)], check=True)
        # StrictModes no: the keys sit below /tmp, which sshd's mode check refuses.
        # MaxStartups: every node mounts at once; sshd's default (10:30:100) drops
        # connections past 10 unauthenticated ones, and a 16-node cluster failed to start.
        (d / "sshd_config").write_text(f"""\
Port 22
ListenAddress {SVC_ADDR}
HostKey {d}/host_key
AuthorizedKeysFile {d}/client_key.pub
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
PidFile none
MaxStartups 4096
""")
        self._spawn_in(self.svc_netns, "sshd", "svc", [],
                       ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")])
        deadline = time.monotonic() + timeout
        while True:
            if self._procs["sshd"].poll() is not None:
                raise RuntimeError(f"the service node's sshd exited:\n{self.logs()}")
            try:
                netns.in_netns(self.ctl_netns, socket.create_connection, (SVC_ADDR, 22),
                               timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the service node's sshd does not answer:\n"
                                       f"{self.logs()}") from None
                time.sleep(0.1)

    def _spawn_in(self, ns: str, name: str, hostname: str, mounts: list[str],
                  argv: list[str]) -> None:
        """``argv`` (exec'd, so the pid is the daemon's) in network namespace ``ns`` and
        a new UTS and mount namespace with ``hostname``, /etc/hosts and ``mounts``."""
        script = "\n".join(["set -e", f"hostname {hostname}",
                            f"mount --bind '{self.hosts_file}' /etc/hosts", *mounts,
                            'exec "$@"'])
        cmd = ["setpriv", "--pdeathsig", "KILL", "--", "nsenter", f"--net={netns.path(ns)}",
               "unshare", "--uts", "--mount", "--propagation", "private", "--",
               "sh", "-c", script, name, *argv]
        out_dir = self.workdir / "nodes" / name if name in self.nodes else self.workdir
        with open(out_dir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env(), start_new_session=True)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.logs()}")
            states = self.node_states()
            if len(states) == len(self.nodes) and all(
                    s.startswith("IDLE") for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout}s ({states}):\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, wait for their epilogs, stop the daemons, delete the
        namespaces (their mounts go with the last process in them)."""
        if os.getpid() != self._owner:
            return
        if self._procs and all(p.poll() is None for p in self._procs.values()):
            users = "--user=" + ",".join(self._job_users() or ["root"])
            self.admin("scancel", users)  # pending and held jobs too
            self.admin("scancel", "--full", users)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (self._active_jobs() or self._steps()):
                time.sleep(0.2)
        for name in [*self.nodes, "slurmctld", "sshd"]:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for relay in self._relays:
            relay.close()
        self._relays.clear()
        for name in self._netns:
            _kill_netns_processes(name)
            netns.delete(name)
        self._netns.clear()
        if self._mounted_netns_dir:
            netns.release_dir()
        _running.discard(self)

    def _steps(self) -> list[str]:
        out = []
        for node in self.nodes:
            spool = self.workdir / "nodes" / node / "spool"
            if spool.is_dir():
                out += [f"{node}:{p.name}" for p in spool.iterdir() if p.is_socket()]
        return out

    def leftovers(self) -> list[str]:
        """What of this cluster still exists: its namespaces, processes that name its
        workdir (daemons, steps). Empty after ``stop()``."""
        out = [f"netns {n}" for n in netns.names(self.prefix)]
        if self._mounted_netns_dir and not netns.names("") and netns.dir_is_mounted():
            out.append(f"the mount on {netns.NETNS_DIR}")
        needle = str(self.workdir).encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline and int(pid) != os.getpid():
                words = cmdline.replace(b"\0", b" ").decode(errors="replace")
                out.append(f"pid {pid}: {words}")
        return out

    # -- nodes ---------------------------------------------------------------------------

    def node_pid(self, node: str) -> int:
        """The pid of ``node``'s slurmd (its namespaces are the node's)."""
        return self._procs[node].pid

    def on_node(self, node: str, argv: list[str], *, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` as root in ``node``'s network, UTS and mount namespaces."""
        return subprocess.run(
            ["nsenter", "-t", str(self.node_pid(node)), "--net", "--uts", "--mount", *argv],
            capture_output=True, text=True, timeout=timeout, input=input, env=self.env(),
            stdin=None if input is not None else subprocess.DEVNULL)

    def node_mounts(self, node: str, dirs: list[Path] | tuple[Path, ...]) -> list[str]:
        """Mount points at or under ``dirs`` in ``node``'s mount namespace."""
        roots = [str(d) for d in dirs]
        out = []
        with open(f"/proc/{self.node_pid(node)}/mountinfo") as f:
            for line in f:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                               line.split()[4])
                if any(point == r or point.startswith(r + "/") for r in roots):
                    out.append(point)
        return out

    def node_states(self) -> dict[str, str]:
        out = self.admin("sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
        states = {}
        for line in out:
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1].upper()
        return states

    def node_state(self) -> str:
        """Every node's state, space-separated in node order (``settle()`` looks for
        COMPLETING in it)."""
        states = self.node_states()
        return " ".join(states.get(n, "?") for n in self.nodes)

    def node_reason(self) -> str:
        return self.admin("sinfo", "-h", "-N", "-o", "%N %E").stdout.strip()

    def resume(self, nodes: list[str] | None = None) -> None:
        """Return drained nodes to service."""
        names = [n for n, s in self.node_states().items()
                 if (nodes is None or n in nodes) and not s.startswith("IDLE")]
        if names:
            self.admin("scontrol", "update", f"nodename={','.join(names)}", "state=resume")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                not self.node_states().get(n, "").startswith("IDLE") for n in names):
            time.sleep(0.2)

    def logs(self, tail: int = 3000) -> str:
        out = []
        paths = [self.workdir / "slurmctld.log", self.workdir / "slurmctld.out",
                 self.workdir / "sshd.out"]
        for node in self.nodes:
            paths += [self.workdir / "nodes" / node / "slurmd.log",
                      self.workdir / "nodes" / node / f"{node}.out"]
        for path in paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text:
                out.append(f"--- {path.relative_to(self.workdir)}\n{text[-tail:]}")
        return "\n".join(out)

    def slurmd_log(self, node: str | None = None) -> str:
        """One node's slurmd log, or all of them."""
        out = []
        for n in ([node] if node else self.nodes):
            try:
                out.append((self.workdir / "nodes" / n / "slurmd.log").read_text(
                    errors="replace"))
            except OSError:
                pass
        return "".join(out)

    def active_jobs(self) -> list[str]:
        out = self.admin("squeue", "-h", "-t", "all", "-o", "%i %T").stdout.splitlines()
        return [line for line in out if line.split()[-1] not in FINAL]

    def __enter__(self) -> VirtualCluster:
        return self.start()
