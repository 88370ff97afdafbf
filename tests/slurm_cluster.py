"""A real single-node Slurm cluster in a temporary directory, for the jobs/ tests.

No systemd and nothing under /etc: the cluster gets its own munge key and
``munged`` socket, a generated ``slurm.conf`` whose state, spool, pid and log
files all live under ``root``, and controller/node daemons on free loopback
ports.  Clients find it through ``SLURM_CONF`` (see :attr:`SlurmCluster.env`).
:meth:`SlurmCluster.stop` cancels the jobs still queued, waits until they are gone,
and ends exactly the daemons :meth:`start` launched, by PID.  The daemons also get
SIGTERM if the test process dies (PR_SET_PDEATHSIG), so none is left behind.

Used as the module-scoped pytest fixture :func:`slurm` (``tests/test_slurm.py``),
or by hand to try the job scripts::

    python tests/slurm_cluster.py /tmp/myslurm     # prints `export SLURM_CONF=...`; Ctrl-C stops it

Needs root (slurmd launches jobs, munged must own its key) and the Debian
packages ``slurm-wlm`` and ``munge``.  Without them the fixture skips, except
when the environment variable ``CI`` is set: there a missing cluster is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "srun", "scancel")


def missing_requirements() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    absent = [b for b in BINARIES if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if absent:
        return f"Slurm/munge binaries not found: {', '.join(absent)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd launches the jobs)"
    return None


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (no stray daemons)."""
    import ctypes  # noqa: PLC0415

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on the loopback interface, in the high range."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            sockets.append(s)
            if port >= 20000:
                ports.append(port)
    finally:
        for s in sockets:
            s.close()
    return ports


class SlurmCluster:
    """One slurmctld + one slurmd + one munged, all under ``root``.

    State fields:
      root      directory holding everything (conf, munge key/socket, spool, state, logs)
      conf      path of the generated slurm.conf
      node      this host's short name: the one node and the controller
      cpus      CPUs the node offers (default: this machine's, at least 2)
      env       os.environ plus SLURM_CONF: pass it to every Slurm client call
      procs     the daemons started, name -> Popen (stopped by PID in stop())
    """

    def __init__(self, root, cpus: int | None = None, real_memory_mb: int = 2000):
        self.root = Path(root).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or max(2, os.cpu_count() or 1)     # room for a 2-rank job even on 1 core
        self.real_memory_mb = real_memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []                     # daemon stdout files, closed by stop()
        if len(str(self.munge_socket)) > 100:     # AF_UNIX paths are limited to 108 bytes
            raise ValueError(f"root: path too long for a unix socket ({self.munge_socket})")

    # ---------------------------------------------------------------- start / stop

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        try:
            self._start_munge(timeout)
            self._write_conf()
            for name in ("slurmctld", "slurmd"):
                self.procs[name] = subprocess.Popen(
                    [_which(name), "-D", "-f", str(self.conf)],
                    stdout=self._log_file(self.root / "log" / f"{name}.stdout"), stderr=subprocess.STDOUT,
                    env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End the daemons we started (TERM, then KILL after 15 s), by PID.

        Jobs still queued or running are cancelled first, and we wait (bounded) until the
        controller has seen them finish, so no slurmstepd or task outlives the cluster."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--quiet", f"--user={os.getuid()}"], timeout=15, check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                res = self.run(["squeue", "--noheader", "--format=%i"], timeout=15, check=False)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs = []

    def _log_file(self, path):
        log = open(path, "w")
        self._logs.append(log)
        return log

    # ---------------------------------------------------------------- munge

    def _start_munge(self, timeout: float) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(munge_dir, 0o700)                         # munged refuses group/world-writable dirs
        (self.root / "log").mkdir(exist_ok=True)
        key = munge_dir / "munge.key"
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chmod(key, 0o600)
        self.procs["munged"] = subprocess.Popen(
            [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
             f"--seed-file={munge_dir / 'munged.seed'}", f"--log-file={munge_dir / 'munged.log'}"],
            stdout=subprocess.DEVNULL, stderr=self._log_file(munge_dir / "munged.stderr"),
            start_new_session=True, preexec_fn=_die_with_parent)
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket",
                   [munge_dir / "munged.stderr", munge_dir / "munged.log"])

    # ---------------------------------------------------------------- slurm.conf

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        lines = [
            "ClusterName=ngsgdtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            # job ids unlike any earlier test cluster's: MPICH names (and leaks, when ranks are
            # killed) its /dev/shm segments after "JOBID.STEP", so a repeated id can meet them
            f"FirstJobId={1_000_000 + int(time.time() * 10) % 59_000_000}",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=600",                 # finished jobs stay visible to `scontrol show job`
            "KillWait=10",                   # seconds between SIGTERM and SIGKILL at job end
            "InactiveLimit=0",
            "MessageTimeout=20",
            "SlurmdParameters=config_overrides",   # trust this file's CPU count, not the probe
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- waiting

    def _wait(self, ready, timeout: float, what: str, logs=()) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}"
                                       + self._tails(logs))
            time.sleep(0.2)
        raise TimeoutError(f"Slurm test cluster: no {what} after {timeout:.0f} s" + self._tails(logs))

    def _tails(self, logs) -> str:
        logs = list(logs) or sorted((self.root / "log").glob("*"))
        out = []
        for path in logs:
            path = Path(path)
            if path.exists():
                out.append(f"\n--- {path} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "".join(out)

    def _wait_idle(self, timeout: float) -> None:
        def idle():
            res = self.run(["sinfo", "--noheader", "--nodes", self.node, "--format=%T"], check=False)
            return res.returncode == 0 and res.stdout.strip() == "idle"
        self._wait(idle, timeout, f"idle node {self.node}")

    # ---------------------------------------------------------------- clients

    def run(self, cmd, timeout: float = 30, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        env = dict(self.env, **kwargs.pop("env", {}))
        res = subprocess.run([_which(cmd[0])] + list(cmd[1:]), capture_output=True, text=True,
                             timeout=timeout, env=env, **kwargs)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def sbatch(self, args, env=None) -> int:
        """Submit; returns the job id."""
        res = self.run(["sbatch", "--parsable"] + list(args), env=env or {})
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        res = self.run(["scontrol", "--oneliner", "show", "job", str(job_id)], check=False)
        if res.returncode != 0:
            return {}
        return dict(re.findall(r"(\S+?)=(\S*)", res.stdout))

    def wait_job(self, job_id: int, until, timeout: float, poll: float = 0.5) -> dict:
        """Poll the job until ``until(job_dict)`` holds; TimeoutError (with logs) otherwise."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info and until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id}: condition not reached in {timeout:.0f} s; last state "
                           f"{info.get('JobState')} ({info.get('Reason')})" + self._tails(()))


def main(argv) -> int:
    """Start a cluster in argv[1] (created if needed) and keep it up until Ctrl-C."""
    if len(argv) != 2:
        sys.stderr.write("usage: python tests/slurm_cluster.py DIR\n")
        return 2
    reason = missing_requirements()
    if reason:
        sys.stderr.write(f"slurm_cluster: {reason}\n")
        return 1
    root = Path(argv[1])
    root.mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(root).start()
    print(f"export SLURM_CONF={cluster.conf}\n# Ctrl-C stops the cluster", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)    # TERM stops it like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
