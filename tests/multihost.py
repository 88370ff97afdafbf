"""Several "hosts" on one machine, for running ngsgd-train across hosts under MPICH's Hydra.

Each host is a set of fresh Linux namespaces: network (its own ``eth0`` and loopback),
UTS (its own hostname), IPC, and mount (its own ``/etc/hosts``, bind-mounted, listing every
host, and its own ``/dev/shm``).  A further namespace holds a bridge, the "switch"; one
veth pair joins each host's ``eth0`` to it.  Addresses come from one private /24 and exist
only inside these namespaces: nothing is added to, or reachable from, the machine's own
network.  The filesystem is shared, as on a cluster with a shared filesystem.

Every namespace is held open by one ``sleep`` process started with ``unshare``; a
namespace disappears with the last process in it, veth pairs and addresses included, so
nothing persists on the machine (no ``/run/netns`` entries).  :meth:`Cluster.stop` kills
every process inside the namespaces by PID, then the holders; a terminated test run still
gets there (:func:`stop_on_sigterm`).  If the test process is killed outright, the holders
get SIGKILL with it (PR_SET_PDEATHSIG) and the namespaces go once the jobs still running
in them end.

Hydra reaches the hosts the way it reaches cluster nodes with ssh: ``mpiexec -launcher ssh
-launcher-exec BOOTSTRAP``.  The generated ``BOOTSTRAP`` script takes ssh's arguments
(``[-x] HOST COMMAND...``) and runs the command in that host's namespaces with ``nsenter``,
through ``sh -c`` as sshd would.  Hydra's proxies then connect back to ``mpiexec`` by
hostname over TCP, and the ranks talk to ranks on other hosts over ``eth0``.

Used by ``tests/test_multihost.py`` (fixture), or by hand (as root)::

    python tests/multihost.py /tmp/mh node1 node2    # prints how to launch; Ctrl-C tears down
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.151.47"                 # the private /24, inside the namespaces only
BINARIES = ("unshare", "nsenter", "ip", "mount")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_requirements() -> str | None:
    """Why hosts cannot be made here (one line), or None when they probably can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and veth pairs need root"
    absent = [b for b in BINARIES if not _which(b)]
    if absent:
        return f"not found: {', '.join(absent)} (util-linux, iproute2)"
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (no namespace outlives it)."""
    import ctypes  # noqa: PLC0415

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ClusterError(RuntimeError):
    """The namespaces or the network between them could not be set up."""


class Cluster:
    """Hosts ``names[i]`` at ``SUBNET.(i+1)``, all on one bridge.

    State fields:
      root       directory for the generated files (hosts file, bootstrap script)
      names      host names, in order
      addresses  host name -> IPv4 address
      bootstrap  path of the Hydra launcher-exec script
    """

    def __init__(self, root, names=("node1", "node2")):
        self.root = Path(root)
        self.names = list(names)
        self.addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        self.bootstrap = self.root / "bootstrap.sh"
        self._holders: dict[str, subprocess.Popen] = {}    # "switch" and every host
        self._net_ns: dict[str, int] = {}                   # open fds of their network namespaces

    # ------------------------------------------------------------------ setup / teardown

    def start(self) -> Cluster:
        self.root.mkdir(parents=True, exist_ok=True)
        hosts_file = self.root / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n"
                              + "".join(f"{a} {n}\n" for n, a in self.addresses.items()))
        try:
            self._hold("switch", mount_hosts=None)
            for name in self.names:
                self._hold(name, mount_hosts=hosts_file)
            self._sh("switch", "ip link add br0 type bridge && ip link set br0 up")
            for name, address in self.addresses.items():
                # created inside the switch: the pair never exists in the machine's own namespace
                self._sh("switch", f"ip link add {name} type veth peer name eth0 netns {self.pid(name)}"
                                   f" && ip link set {name} master br0 && ip link set {name} up")
                self._sh(name, f"ip addr add {address}/24 dev eth0 && ip link set eth0 up")
        except BaseException:
            self.stop()
            raise
        self._write_bootstrap()
        return self

    def _hold(self, name: str, mount_hosts: Path | None) -> None:
        """Start the process that holds ``name``'s namespaces open; wait until they are set up.

        A host (``mount_hosts`` given) also gets its own IPC namespace and its own ``/dev/shm``:
        UCX decides that two processes share a machine (and talks through SysV/POSIX shared
        memory and CMA instead of TCP) when they share a kernel and an IPC namespace, so
        without these the "hosts" would not talk over the network at all."""
        steps = [f"hostname {shlex.quote(name)}", "ip link set lo up"]
        flags = ["--net", "--uts"]
        if mount_hosts is not None:
            flags += ["--ipc", "--mount", "--propagation", "private"]
            steps += [f"mount --bind {shlex.quote(str(mount_hosts))} /etc/hosts",
                      "mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm"]
        script = " && ".join(steps) + " && echo ready && exec sleep infinity"
        proc = subprocess.Popen([_which("unshare"), *flags, "--", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        self._holders[name] = proc
        line = proc.stdout.readline()          # "ready", or EOF when a step failed
        if line.strip() != "ready":
            proc.wait(timeout=10)
            why = proc.stderr.read().strip().splitlines() or [f"exit {proc.returncode}"]
            raise ClusterError(f"namespaces for {name!r} could not be set up: {why[-1]}")
        # an open fd pins the namespace: its inode identifies the host's processes, even after
        # the holder died, and cannot be reused for another namespace on this machine meanwhile
        self._net_ns[name] = os.open(f"/proc/{proc.pid}/ns/net", os.O_RDONLY)

    def _sh(self, name: str, script: str) -> None:
        res = subprocess.run(self.enter(name) + ["sh", "-c", script], capture_output=True, text=True,
                             timeout=30)
        if res.returncode != 0:
            raise ClusterError(f"on {name}: `{script}` failed: {res.stderr.strip()}")

    def _write_bootstrap(self) -> None:
        cases = "".join(f"    {n}) pid={self.pid(n)} ;;\n" for n in self.names)
        nsenter = _which("nsenter")
        text = f"""#!/bin/sh
# Hydra's launcher-exec, generated by tests/multihost.py: called like ssh,
#   bootstrap.sh [-x] HOST COMMAND...
# it runs COMMAND in HOST's namespaces through sh -c (sshd's way; Hydra quotes for it),
# starting in the current directory (Hydra's proxy changes to the job's directory itself).
[ "$1" = -x ] && shift
host=$1
shift
case $host in
{cases}    *) echo "bootstrap.sh: unknown host $host" >&2; exit 255 ;;
esac
exec {nsenter} -t "$pid" --net --uts --ipc --mount --wd="$PWD" -- sh -c "$*"
"""
        tmp = self.bootstrap.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, self.bootstrap)

    def stop(self) -> None:
        """Kill every process inside the namespaces, then the holders; the namespaces go with them."""
        for name in self._net_ns:
            self.kill_host(name)
        for proc in self._holders.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        self._holders.clear()
        for fd in self._net_ns.values():
            os.close(fd)
        self._net_ns.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ using the hosts

    def pid(self, name: str) -> int:
        """PID of the process holding host ``name``'s namespaces (what nsenter enters)."""
        holder = self._holders[name]
        if holder.poll() is not None:
            raise ClusterError(f"host {name} is gone: its namespace holder exited ({holder.returncode})")
        return holder.pid

    def enter(self, name: str) -> list[str]:
        """Command prefix that runs a command on host ``name`` (in the current directory)."""
        which = ["--net", "--uts"] + (["--ipc", "--mount"] if name != "switch" else [])
        return [_which("nsenter"), "-t", str(self.pid(name)), *which, f"--wd={os.getcwd()}", "--"]

    def launcher_args(self) -> list[str]:
        """mpiexec options that make Hydra start its proxies on these hosts."""
        return ["-launcher", "ssh", "-launcher-exec", str(self.bootstrap)]

    def pids(self, name: str) -> list[int]:
        """Every process on host ``name`` except its holder (``ip netns pids``, by inode)."""
        holder, target = self._holders[name].pid, os.fstat(self._net_ns[name]).st_ino
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == holder:
                continue
            with contextlib.suppress(OSError):          # gone meanwhile, or a zombie
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                    found.append(int(entry))
        return found

    def command_line(self, pid: int) -> str:
        """What process ``pid`` runs, with its state (R, S, Z, ...), for messages."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            return f"{pid} (gone)"
        return f"{pid} [{state}] {argv[:200]}"

    def kill_host(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process on host ``name``: what a host dying leaves behind."""
        pids = self.pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def traffic(self, name: str) -> int:
        """Bytes received plus sent by host ``name``'s eth0 so far."""
        with open(f"/proc/{self.pid(name)}/net/dev") as f:
            for line in f:
                iface, _, counters = line.partition(":")
                if iface.strip() == "eth0":
                    fields = counters.split()
                    return int(fields[0]) + int(fields[8])
        raise ClusterError(f"{name} has no eth0")


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt while the block runs, so that pytest (or a
    ``finally``) still tears the namespaces down when the test run is terminated."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    reason = missing_requirements()
    if reason:
        print(f"multihost: {reason}", file=sys.stderr)
        return 2
    with stop_on_sigterm(), Cluster(argv[0], argv[1:]) as cluster:
        first = cluster.names[0]
        print(f"hosts {', '.join(f'{n}={a}' for n, a in cluster.addresses.items())}; on {first}:\n"
              f"  {shlex.join(cluster.enter(first))} \\\n"
              f"    mpiexec {shlex.join(cluster.launcher_args())} -hosts {','.join(cluster.names)} -n N CMD",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
