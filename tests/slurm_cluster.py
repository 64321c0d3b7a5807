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

    def __init__(self, root: Path, nodes: int = 1, cpus: int | None = None, partition: str = "debug"):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]  # `hostname -s`
        # One node is named after the host. Several nodes are several slurmd on this host, each with its
        # own NodeName and port (NodeHostname is the host, NodeAddr loopback): SLURM then gives every
        # node its own SLURM_NODEID, so multi-node launch code runs for real, over loopback.
        self.nodes = [self.host] if nodes == 1 else [f"{self.host}-{i}" for i in range(nodes)]
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
        for sub in ("munge", "state", "spool", "log"):
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
SlurmctldHost={self.host}(127.0.0.1)
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
""" + "".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
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
            self._spawn(f"slurmd-{node}", [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", node])
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.state in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {self.job(job_id)}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started two-node LocalSlurmCluster (two slurmd on this host) for the test session; torn down
    (by pid) at the end. Single-node jobs use `-N 1`."""
    try:
        install_s = ensure_installed()
    except ClusterUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")
    root = Path(tempfile.mkdtemp(prefix="distthink-slurm-"))
    cluster = LocalSlurmCluster(root, nodes=2)
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
