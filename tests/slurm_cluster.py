"""A real, single-machine SLURM cluster for integration tests.

`LocalSlurmCluster` installs Debian's `slurm-wlm` and `munge` when they are missing (as root, with
apt-get), then starts its own `munged`, `slurmctld` and `slurmd` with everything in a private temp folder:
its own munge key and socket, its own ports, state and spool dirs, logs, and a generated `slurm.conf`
(proctrack/linuxproc, task/none, cons_tres, JobRequeue=1, no accounting). Nothing under /etc is changed
and nothing of an already running system SLURM is touched: clients find this cluster through
`SLURM_CONF`, which `env()` returns.

Teardown cancels the jobs of this cluster and stops the daemons by the pids this module started.

The session fixture `slurm_cluster` skips (with the reason) only when the packages truly cannot be
installed: not root, no apt-get, or apt-get failing even after `apt-get update`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
APT_PACKAGES = ("slurm-wlm", "munge")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


# ---------------------------------------------------------------------------------------------------
# installation
# ---------------------------------------------------------------------------------------------------

def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(log=print) -> float:
    """Install slurm-wlm and munge with apt-get when any binary is missing. Returns seconds spent.

    Idempotent: when every binary is present it returns at once. Raises ClusterUnavailable with the
    reason when the packages cannot be installed."""
    if not _missing_binaries():
        return 0.0
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM binaries {_missing_binaries()} are missing and we are not root, "
                                 "so apt-get cannot install slurm-wlm/munge")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("SLURM binaries are missing and there is no apt-get to install slurm-wlm/munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    t0 = time.monotonic()
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # Package lists may be missing or stale on a fresh machine: refresh once and retry.
        log("apt-get install failed; running apt-get update and retrying")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or _missing_binaries():
        tail = (proc.stdout + proc.stderr)[-1500:]
        raise ClusterUnavailable(f"apt-get could not install {' '.join(APT_PACKAGES)} "
                                 f"(rc={proc.returncode}); still missing {_missing_binaries()}:\n{tail}")
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class JobInfo:
    """What `scontrol show job -o` says about one job (kept MinJobAge seconds after it ends)."""

    job_id: int
    state: str
    exit_code: str  # "rc:signal", e.g. "0:0"
    restarts: int
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def rc(self) -> int:
        return int(self.exit_code.split(":")[0])


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class LocalSlurmCluster:
    """One slurmctld + one slurmd per node on this machine, all state in `root` (a temp folder)."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int | None = None, partition: str = "debug",
                 netns: bool = False):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]  # `hostname -s`
        # One node is named after the host. Several nodes are several slurmd on this host, each with its
        # own NodeName and port (NodeHostname is the host, NodeAddr loopback): SLURM then gives every
        # node its own SLURM_NODEID, so multi-node launch code runs for real, over loopback.
        # netns=True: each node is a network namespace (own eth0, address and hostname, via a veth pair
        # on a private bridge) -- a two-"host" cluster on one machine; slurmctld stays on the host side.
        self.nodes = [self.host] if nodes == 1 else [f"{self.host}-{i}" for i in range(nodes)]
        self.netns = NetnsNodes(self.nodes, tag=self.root.name[-6:], hosts_file=self.root / "hosts") if netns else None
        # More CPUs than the machine has are declared on purpose (SlurmdParameters=config_overrides):
        # a 2-task job plus a second job fit on a 2-core CI machine; they just share the cores.
        self.cpus = cpus or max(8, os.cpu_count() or 1)
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.logs = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}

    # -- environment for clients ---------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        # An outer allocation (a developer running the tests inside salloc) must not leak in.
        for k in list(env):
            if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SALLOC_", "SRUN_")):
                del env[k]
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=kw.pop("env", None) or self.env(), capture_output=True,
                              text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    # -- start / stop --------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():  # our own key: this cluster never reads /etc/munge
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o600)
        self.ctld_port = _free_port()
        self.slurmd_ports = {n: _free_port() for n in self.nodes}
        r = self.root
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py for a throw-away single-machine cluster
ClusterName=distthink-test
SlurmctldHost={self.host}({self.netns.host_addr if self.netns else "127.0.0.1"})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.ctld_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
# A short scheduling interval so that a requeued job starts seconds after it becomes eligible.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""" + "".join(f"NodeName={n} NodeHostname={n if self.netns else self.host} "
              f"NodeAddr={self.netns.addr[n] if self.netns else '127.0.0.1'} Port={port} CPUs={self.cpus} "
              "State=UNKNOWN\n" for n, port in self.slurmd_ports.items()))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with {proc.returncode} during start-up; "
                                         f"its log:\n{self.daemon_log(name)}")

    def daemon_log(self, name: str, chars: int = 3000) -> str:
        text = ""
        for p in sorted(self.logs.glob(f"{name}*")):
            text += f"--- {p.name}\n" + p.read_text(errors="replace")[-chars:]
        return text

    def start(self, timeout: float = 60) -> "LocalSlurmCluster":
        t0 = time.monotonic()
        if self.netns:
            self.netns.create()
        self.write_config()
        m = self.root / "munge"
        # --force: munged refuses to run as root, or with a socket under /tmp, without it.
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={self.logs}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False, timeout=15).returncode == 0,
                   timeout, "slurmctld to answer `scontrol ping`")
        for node in self.nodes:
            cmd = [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", node]
            if self.netns:
                cmd = self.netns.wrap(node, cmd)
            self._spawn(f"slurmd-{node}", cmd)
        self._wait(self._nodes_idle, timeout, f"nodes {self.nodes} to be idle in sinfo")
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _nodes_idle(self) -> bool:
        p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15)
        idle = {line.split()[0] for line in p.stdout.splitlines() if line.split()[1:] == ["idle"]}
        return idle >= set(self.nodes)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if cond():
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}; daemon logs:\n"
                                 + self.daemon_log("slurm"))

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons we started (by pid), slurmd first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", str(os.geteuid()), check=False, timeout=15)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                q = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.netns:
            self.netns.destroy()

    # -- jobs ----------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> int:
        p = self.run("sbatch", "--parsable", *args, env=self.env(**(env or {})), cwd=cwd)
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> JobInfo:
        p = self.run("scontrol", "show", "job", "-o", str(job_id))
        fields = dict(re.findall(r"(\w+)=(\S*)", p.stdout))
        return JobInfo(job_id, fields.get("JobState", "?"), fields.get("ExitCode", "?:?"),
                       int(fields.get("Restarts", "0")), fields)

    def wait_job(self, job_id: int, timeout: float = 300, states=TERMINAL_STATES) -> JobInfo:
        """The job's info once it reaches one of `states`. A job still running at the timeout is cancelled
        first: left running, it would hold the nodes (and CPUs) of every later test."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.state in states:
                return info
            time.sleep(0.5)
        info = self.job(job_id)
        self.cancel(job_id)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s (cancelled): {info}")

    def cancel_all(self) -> None:
        """Cancel every job still queued or running (a failed test must not leave one behind)."""
        for job_id in self.run("squeue", "-h", "-o", "%i").stdout.split():
            self.cancel(int(job_id))

    def cancel(self, job_id: int, timeout: float = 60) -> None:
        """scancel, then wait until the job has left its nodes."""
        self.run("scancel", str(job_id))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.job(job_id).state not in TERMINAL_STATES:
            time.sleep(0.5)


class NetnsNodes:
    """Network namespaces as SLURM "hosts": one per node, each with an `eth0` (a veth pair whose other
    end is on a private bridge that also holds the host-side address for slurmctld), its own IP, and
    its own hostname and /etc/hosts (slurmd runs under `unshare --uts --mount`, which bind-mounts a
    generated hosts file privately) so node names resolve as on a real cluster. `nsenter --net` is
    used rather than `ip netns exec`, which remounts /sys and so hides the cgroup fs slurmd needs.
    All removed by destroy()."""

    def __init__(self, nodes: list[str], tag: str, hosts_file: Path):
        self.hosts_file = hosts_file
        tag = re.sub(r"[^a-z0-9]", "", tag.lower())[-5:] or "x"
        self.subnet = f"10.{200 + int(tag, 36) % 50}.{int(tag, 36) % 250}"
        self.bridge = f"dtbr{tag}"
        self.ns = {n: f"dt-{tag}-{i}" for i, n in enumerate(nodes)}
        self.veth = {n: f"dtv{tag}{i}" for i, n in enumerate(nodes)}
        self.host_addr = f"{self.subnet}.1"
        self.addr = {n: f"{self.subnet}.{10 + i}" for i, n in enumerate(nodes)}
        self.created: list[tuple[str, str]] = []

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else the reason they cannot."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                return f"`{tool}` is not installed"
        probe = f"dt-probe-{os.getpid()}"
        p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if p.returncode != 0:
            return f"`ip netns add` failed: {p.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def _ip(self, *args: str) -> None:
        p = subprocess.run(["ip", *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise ClusterUnavailable(f"ip {' '.join(args)} failed: {p.stderr.strip()}")

    def create(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.created.append(("link", self.bridge))
        self._ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
        for node, ns in self.ns.items():
            veth = self.veth[node]
            self._ip("netns", "add", ns)
            self.created.append(("netns", ns))
            self._ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            self.created.append(("link", veth))
            self._ip("link", "set", veth, "master", self.bridge)
            self._ip("link", "set", veth, "up")
            self._ip("link", "set", f"{veth}p", "netns", ns)
            self._ip("-n", ns, "link", "set", f"{veth}p", "name", "eth0")
            self._ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def wrap(self, node: str, cmd: list[str]) -> list[str]:
        """cmd run inside the node's namespace with its own hostname (exec all the way: the pid we
        get is the daemon's)."""
        inner = (f"mount --bind {shlex.quote(str(self.hosts_file))} /etc/hosts && hostname {shlex.quote(node)} "
                 "&& exec " + " ".join(shlex.quote(c) for c in cmd))
        return ["nsenter", f"--net=/run/netns/{self.ns[node]}", "unshare", "--uts", "--mount", "sh", "-c", inner]

    def destroy(self) -> None:
        for kind, name in reversed(self.created):
            if kind == "link":
                subprocess.run(["ip", "link", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.created.clear()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started two-node LocalSlurmCluster for the test session: each node a network namespace with
    its own address and hostname when possible (root, `ip netns`), else two slurmd on loopback
    (DISTTHINK_SLURM_NETNS=0 forces that). Torn down (by pid) at the end."""
    try:
        install_s = ensure_installed()
    except ClusterUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")
    root = Path(tempfile.mkdtemp(prefix="distthink-slurm-"))
    # Two "hosts" as network namespaces when this machine allows it; else two slurmd on loopback.
    why_not = NetnsNodes.available() if os.environ.get("DISTTHINK_SLURM_NETNS", "1") != "0" else "disabled"
    cluster = LocalSlurmCluster(root, nodes=2, netns=why_not is None)
    cluster.netns_unavailable = why_not
    cluster.timings["install_s"] = install_s
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("DISTTHINK_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)
