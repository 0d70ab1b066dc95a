"""``kvframe-launch``: start a scheduler, servers and workers (or the workers only), and watch them.

    kvframe-launch -n 2 -s 2 -- python train.py              # local, on loopback
    kvframe-launch -n 4 -s 2 --launcher ssh -H hosts -- python train.py
    kvframe-launch -n 4 -s 2 --launcher mpi -H hosts -- python train.py
    kvframe-launch -n 2 -s 0 -- python train.py              # workers only (store 'nccl', ...)
    kvframe-launch -n 2 --dry-run -- python train.py         # print the command lines only

(``python -m kvframe_launch`` is the same command.)  The scheduler and servers are commands,
``python -m kvframe_dist --role scheduler|server`` (from kvframe-dist, which must be installed where
they run); the launcher itself imports no store.  Every process gets MXNet's variables
(DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER, DMLC_NUM_WORKER; DMLC_INTERFACE
with ``--interface``) and kvframe's (KVFRAME_ROLE, KVFRAME_RANK, KVFRAME_ROOT_URI, KVFRAME_ROOT_PORT,
KVFRAME_NUM_SERVERS, KVFRAME_NUM_WORKERS); each worker also KVFRAME_WORLD_SIZE (the number of
workers) and KVFRAME_LOCAL_RANK (its rank among the workers of its host; under mpi, Open MPI's
OMPI_COMM_WORLD_LOCAL_RANK instead).  ``--config FILE`` adds KVFRAME_CONFIG=FILE, ``--transport NAME``
KVFRAME_TRANSPORT=NAME.  Output is forwarded line by line with a role prefix (``[worker 0] ...``).
The launcher exits with the first failing process's code (128+N for a process killed by signal N):
after a failure it gives the others ``--grace`` seconds to report their own errors, then stops them
(SIGTERM, SIGKILL 3 s later; a stopped process gets SIGKILL at once).  Its last line names the
cause: the first process that failed, or, when the scheduler declared a node stopped (no heartbeat:
hung, or stopped with SIGSTOP), that node, whose silence made the others fail.

Workers only (``-s 0`` / ``--num-servers 0``), for stores without servers (``nccl``, or any that
does its own rendezvous): no scheduler and no servers start, only the workers, with the variables
above (KVFRAME_NUM_SERVERS=0, so that a store that needs servers says so) and the job's secret.
KVFRAME_ROOT_URI:KVFRAME_ROOT_PORT is the rendezvous address, on worker 0's host: 127.0.0.1
locally; under ssh and mpi ``--host-ip``, else the first host of the hostfile (ssh starts worker 0
there, mpirun its rank 0), or this host's address that the others can reach when that entry is a
loopback name.  The port is ``--port``, else a free port P of the launcher's host whose next port is
free too (nothing listens on P itself; store 'nccl' serves its unique id on KVFRAME_ROOT_PORT +
KVFRAME_NCCL_PORT_OFFSET, default 1).  Under mpi the ranks come from MPI, as for workers with
servers.  After a failure the other workers get ``--grace`` seconds (default 5: there is no
heartbeat to wait for) to report their own errors before they are stopped.

The job's secret: KVFRAME_SECRET from the launcher's environment, else a fresh random one per job.
It never appears on a command line (``ps`` shows those to every user): local processes and mpirun
get it in their environment (mpirun passes it on by name, ``-x KVFRAME_SECRET``), ssh sends it as
the first line of the remote command's stdin.

The job dies with the launcher.  On SIGHUP, SIGINT or SIGTERM the launcher stops every process and
exits with 128+N.  Each child gets a signal from the kernel when the launcher dies, SIGKILL
included (PR_SET_PDEATHSIG: SIGKILL for local roles and workers, SIGTERM for ssh and mpirun so that
they stop their remote side), and a small guard process (``kvframe-launch-guard``) then stops what
is left of each child's process group and removes the job's shared-memory directory.

* local: every process is a subprocess of the launcher, the scheduler and servers bound to
  127.0.0.1.  The job's shared-memory files go to a directory of its own,
  ``/dev/shm/kvframe-job-<launcher pid>-<its start time>-<random>`` (mode 0700), removed when the
  job ends; a launcher removes such directories of this user left by launchers that no longer run.
  A KVFRAME_SHM_DIR given by the user is used instead, and only when it is a directory (not a
  symbolic link) owned by this user with mode 0700.
* ssh: the scheduler runs here, on ``--host-ip`` (default: this host's address on the route to
  the first non-loopback host of the hostfile, or that of ``--interface``); servers and workers go
  round-robin over the hosts of the hostfile (one per line: ``host``, ``user@host``, ``host:port``
  or ``[v6addr]:port``; ``#`` comments; ``host slots=N`` repeats a host), each started as
  ``ssh [OPTIONS] HOST 'IFS= read -r KVFRAME_SECRET ...; cd CWD && env VARS... COMMAND ...'`` in
  the same directory as here.  The ssh command is ``$KVFRAME_SSH`` (default ``ssh``) plus ``-o OPT``
  for each ``--ssh-option OPT`` (default options: StrictHostKeyChecking=no, BatchMode=yes unless
  given).  Besides the job's variables, the launcher's own DMLC_*, KVFRAME_* (but KVFRAME_SECRET,
  which goes on stdin) and MXNET_* variables and OMP_NUM_THREADS are passed on.  The remote side
  watches its ssh connection: when the launcher or its ssh goes away, the remote process group gets
  SIGTERM (SIGKILL 3 s later), so nothing outlives the job.
* mpi (Open MPI): the scheduler runs here as for ssh; ``mpirun -np S --hostfile H -x VAR ...
  python -m kvframe_dist --role server`` and ``mpirun -np W ... COMMAND`` start the rest; worker
  ranks come from the MPI rank (OMPI_COMM_WORLD_RANK, PMI_RANK or PMIX_RANK).  ``$KVFRAME_SSH``
  and ``--ssh-option`` become mpirun's ``plm_rsh_agent`` and ``plm_rsh_args``; the launcher's
  variables above go by name (``-x NAME``, KVFRAME_SECRET included: mpirun carries values itself).

Retired flags, still accepted: ``--no-shm`` is ``--transport tcp``; ``--ipc`` (servers on unix
sockets) is ``--transport shm``, the default, whose shared memory between processes of one host
took its place.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvframe.log import get_logger

log = get_logger("kvframe_launch.launch")


@dataclass
class Proc:
    name: str  # "scheduler", "server 1", "worker 0", "servers" (one mpirun)
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # what this process adds to the environment
    popen: subprocess.Popen | None = None
    watch_stdin: bool = False  # ssh: stdin is a pipe held open: the secret's line, then EOF tells the remote to stop
    mpi_role: str | None = None  # mpirun with --tag-output: lines are re-prefixed per rank
    deathsig: int = signal.SIGKILL  # what the kernel sends it when the launcher dies (ssh, mpirun: SIGTERM)
    stopped: bool = False  # found stopped (SIGSTOP) when the launcher stopped the job


WORKERS_ONLY_GRACE = 5.0  # -s 0: the seconds the other workers get after a failure (no heartbeat to wait for)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A free port P whose next port P+1 is free too, both bound together for a moment: in a job
    without servers nothing listens on P itself, and a store derives its own rendezvous port from
    it (store 'nccl': KVFRAME_ROOT_PORT + 1); else a plain free port."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as t:
                try:
                    t.bind((host, port + 1))
                except OSError:
                    continue
                return port
    return free_port(host)


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kvframe-launch")
    except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH
        import kvframe

        return kvframe.__version__


def job_secret(environ: Mapping[str, str] | None = None) -> str:
    """The job's secret: the launcher's KVFRAME_SECRET, else a fresh one (a new one per job)."""
    environ = os.environ if environ is None else environ
    return environ.get("KVFRAME_SECRET") or secrets.token_hex(32)


# -- children that die with the launcher ------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_launcher(sig: int):
    """A preexec_fn: the child gets ``sig`` from the kernel when the launcher dies, however it dies
    (SIGKILL included), or None where prctl is missing.  Must run in the thread that stays: the
    signal comes when the thread that forked the child ends (the launcher forks from its main thread)."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None  # from another thread the signal would come when that thread ends
    launcher = os.getpid()

    def arm() -> None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != launcher:  # the launcher died before prctl: no signal will come
            os._exit(1)

    return arm


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def is_stopped(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] in "Tt"  # SIGSTOP/SIGTSTP, or a debugger's stop


# The guard: a process of its own session (so a terminal's SIGHUP or SIGINT misses it) reading the
# launcher's notes on its stdin: "pg PID" (a child's process group), "gone PID" (reaped: never signal
# a group whose id may be reused), "dir PATH" (the job's directory), "done".  EOF without "done" means
# the launcher died: the groups get SIGTERM and SIGCONT, SIGKILL 3 s later, and the directory goes.
_GUARD = r"""
import os, shutil, signal, sys, time
groups, dirs = set(), []
for line in sys.stdin:
    op, _, arg = line.strip().partition(" ")
    if op == "done":
        sys.exit(0)
    if op == "pg":
        groups.add(int(arg))
    elif op == "gone":
        groups.discard(int(arg))
    elif op == "dir":
        dirs.append(arg)

def signal_all(sig):
    alive = []
    for g in groups:
        try:
            os.killpg(g, sig)
            alive.append(g)
        except OSError:
            pass
    return alive

def remove_dirs():
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)

signal_all(signal.SIGTERM)
signal_all(signal.SIGCONT)
remove_dirs()
end = time.monotonic() + 3
while signal_all(0) and time.monotonic() < end:
    time.sleep(0.05)
signal_all(signal.SIGKILL)
remove_dirs()
"""
GUARD_NAME = "kvframe-launch-guard"


class Guard:
    """Stops the job's process groups and removes its directory when the launcher dies (see _GUARD)."""

    def __init__(self) -> None:
        self.popen: subprocess.Popen | None = None
        env = {k: v for k, v in os.environ.items() if k != "KVFRAME_SECRET"}
        try:  # -I -S: no site, no user paths: starts fast, needs nothing of the job's
            self.popen = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARD, GUARD_NAME], text=True, env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            pass  # PR_SET_PDEATHSIG and the next launcher's clean-up still apply

    def tell(self, note: str) -> None:
        if self.popen is None or self.popen.stdin is None:
            return
        try:
            self.popen.stdin.write(note + "\n")
            self.popen.stdin.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """The launcher ends normally: the guard leaves without touching anything."""
        if self.popen is None:
            return
        self.tell("done")
        try:
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        except OSError:
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


# -- the job's shared-memory directory ----------------------------------------------------------------

SHM_BASE = "/dev/shm"
JOB_DIR = re.compile(r"kvframe-job-(\d+)-(\d+)-[a-z0-9_]+")  # kvframe-job-<launcher pid>-<its start time>-<random>


def check_private_dir(path: str, name: str = "KVFRAME_SHM_DIR") -> None:
    """Refuse (SystemExit naming ``name``) a directory that others could read or swap: it must be a
    real directory (not a symbolic link), owned by this user, with mode 0700."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise SystemExit(f"kvframe-launch: {name}={path}: {exc.strerror or exc}") from None
    problems = []
    if stat.S_ISLNK(st.st_mode):
        problems.append("is a symbolic link")
    elif not stat.S_ISDIR(st.st_mode):
        problems.append("is not a directory")
    else:
        if st.st_uid != os.geteuid():
            problems.append(f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
        if stat.S_IMODE(st.st_mode) != 0o700:
            problems.append(f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700")
    if problems:
        raise SystemExit(f"kvframe-launch: refusing {name}={path}: it {' and '.join(problems)}; give a directory "
                         f"of this user with mode 0700 (mkdir -m 700 DIR), or unset {name} and kvframe-launch makes "
                         "one per job")


def _launcher_alive(pid: int, start: int) -> bool:
    if os.path.exists("/proc/self/stat"):
        st = _stat(pid)
        return st is not None and st[1] == start and st[0] != "Z"  # a reused pid starts at another time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_job_dirs(base: str = SHM_BASE) -> list[str]:
    """Remove job directories (JOB_DIR names) of this user whose launcher no longer runs; only real
    directories with mode 0700 owned by this user are trusted, anything else is left alone."""
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = JOB_DIR.fullmatch(name)
        if not m:
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700
                or _launcher_alive(int(m[1]), int(m[2]))):
            continue
        shutil.rmtree(path, ignore_errors=True)  # fd-based on Linux: follows no symbolic link inside
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def make_job_dir(base: str = SHM_BASE) -> str:
    st = _stat(os.getpid())
    path = tempfile.mkdtemp(prefix=f"kvframe-job-{os.getpid()}-{st[1] if st else 0}-", dir=base)  # mode 0700
    check_private_dir(path)
    return path

def read_hostfile(path: str) -> list[str]:
    hosts = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            host, *rest = line.split()
            slots = 1
            for r in rest:
                if r.startswith("slots="):
                    slots = int(r.split("=", 1)[1])
            hosts.extend([host] * max(1, slots))
    if not hosts:
        raise SystemExit(f"kvframe-launch: the hostfile {path} names no host")
    return hosts


def split_host(spec: str) -> tuple[str, str, int | None]:
    """A hostfile entry as ``(ssh destination, bare host, ssh port or None)``: ``user@host``,
    ``host:port`` (as MXNet's ssh launcher), ``[v6addr]:port``; a bare IPv6 address has no port."""
    user, sep, rest = spec.rpartition("@")
    port = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":") and tail[1:].isdigit():
            port = int(tail[1:])
    elif rest.count(":") == 1 and rest.split(":")[1].isdigit():
        host, port = rest.split(":")[0], int(rest.split(":")[1])
    else:
        host = rest
    return (f"{user}@{host}" if sep else host), host, port


def default_host_ip(hosts: list[str], interface: str | None) -> str:
    """The scheduler's address that the hosts can reach: the interface's, else the local end of the
    route to the first non-loopback host; 127.0.0.1 only when every host is loopback."""
    from kvframe_transports.addresses import interface_address, is_loopback, route_address

    target = next((h for h in (split_host(s)[1] for s in hosts) if not is_loopback(h)), None)
    if interface:
        try:
            addr = interface_address(interface)
        except ValueError as exc:
            raise SystemExit(f"kvframe-launch: --interface {interface}: {exc}") from None
    elif target is None:
        return "127.0.0.1"  # every host is this one
    else:
        try:
            socket.getaddrinfo(target, 22)
            addr = route_address(target, 22)  # picks a route only: nothing is sent
        except OSError as exc:
            raise SystemExit(f"kvframe-launch: cannot find this host's address towards {target} "
                             f"({exc.strerror or exc}); give --host-ip (an address of this host every host "
                             "can reach)") from None
    if target is not None and is_loopback(addr):
        raise SystemExit(f"kvframe-launch: the scheduler would listen on the loopback address {addr}, which "
                         f"{target} cannot reach; give --host-ip or --interface")
    return addr


def rendezvous_host(hosts: list[str], interface: str | None) -> str:
    """A workers-only job's KVFRAME_ROOT_URI under ssh and mpi: the host of worker 0 (the first of
    the hostfile: ssh starts worker 0 there, mpirun puts rank 0 there), as the hostfile names it; when
    that entry is this host (a loopback name) and other hosts are remote, this host's address that
    they can reach (as :func:`default_host_ip`)."""
    from kvframe_transports.addresses import is_loopback

    first = split_host(hosts[0])[1]
    if not is_loopback(first):
        return first
    return default_host_ip(hosts, interface)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvframe-launch", description="Start a kvframe distributed job: scheduler, "
                                "servers and workers.", epilog=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--version", action="version", version=f"kvframe-launch {version()}")
    p.add_argument("-n", "--num-workers", type=int, required=True, help="number of workers")
    p.add_argument("-s", "--num-servers", type=int, help="number of servers (default: as many as workers); 0: the "
                   "workers only, no scheduler and no servers (stores without servers, e.g. nccl)")
    p.add_argument("--launcher", choices=["local", "ssh", "mpi"], default="local")
    p.add_argument("-H", "--hostfile", help="hosts for ssh and mpi (one per line)")
    p.add_argument("--config", help="a kvframe config file, passed to every process as KVFRAME_CONFIG")
    p.add_argument("--transport", metavar="NAME", help="the job's transport plugin, passed to every process as "
                   "KVFRAME_TRANSPORT (default: the [store] transport of --config, else shm)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra variable for every process")
    p.add_argument("--port", type=int, default=0, help="the scheduler's port, with -s 0 KVFRAME_ROOT_PORT (default: "
                   "a free one)")
    p.add_argument("--host-ip", help="ssh/mpi: the scheduler's address, reachable from every host (default: the "
                   "address of --interface, else this host's address on the route to the first remote host); with "
                   "-s 0 KVFRAME_ROOT_URI, the rendezvous host (default: the first host of the hostfile)")
    p.add_argument("--interface", help="network interface the nodes announce (DMLC_INTERFACE for every process)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                   help="ssh/mpi: add `-o OPT` to ssh (repeatable), e.g. --ssh-option IdentityFile=~/.ssh/job")
    p.add_argument("--ipc", action="store_true", help="retired (servers on unix sockets): accepted, and means "
                   "--transport shm, the default")
    p.add_argument("--no-shm", action="store_true", help="retired: means --transport tcp")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds the others get to exit after a failure (default: heartbeat timeout + 5; with -s 0, "
                   f"{WORKERS_ONLY_GRACE:g})")
    p.add_argument("--python", default=sys.executable, help="python for scheduler and servers")
    p.add_argument("--dry-run", action="store_true", help="print the command lines and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the worker command")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the worker command after --, e.g. kvframe-launch -n 2 -- python train.py")
    if args.num_workers < 1:
        p.error("need at least one worker")
    if args.num_servers is not None and args.num_servers < 0:
        p.error("-s/--num-servers takes a count of servers: 0 (workers only) or more")
    if args.launcher != "local" and not args.hostfile:
        p.error(f"--launcher {args.launcher} needs a hostfile (-H)")
    args.command = cmd
    if args.num_servers is None:
        args.num_servers = args.num_workers
    if args.num_servers and args.python == sys.executable and importlib.util.find_spec("kvframe_dist") is None:
        p.error("a job with servers runs `python -m kvframe_dist --role scheduler|server`, and kvframe-dist is not "
                "installed here: pip install kvframe-dist (or kvframe[dist]); or give -s 0 for a job of workers only")
    for kv in args.env:
        if "=" not in kv:
            p.error(f"--env takes K=V; got {kv!r}")
        if kv.split("=", 1)[0] == "KVFRAME_SECRET":
            p.error("--env KVFRAME_SECRET=... would put the secret on command lines, which ps shows to every user; "
                    "export KVFRAME_SECRET instead, or leave it unset and kvframe-launch makes one for the job")
    for opt in args.ssh_option:
        if "=" not in opt and " " not in opt:
            p.error(f"--ssh-option takes an ssh_config option as KEY=VALUE; got {opt!r}")
    for flag, means in (("ipc", "shm"), ("no_shm", "tcp")):  # the retired flags, as transports
        if getattr(args, flag):
            if args.transport not in (None, means):
                p.error(f"--{flag.replace('_', '-')} means --transport {means}; it contradicts --transport "
                        f"{args.transport}")
            args.transport = means
    if args.transport is not None:
        from kvframe import plugins

        known = plugins.names("transports")
        if args.transport not in known:
            p.error(f"--transport {args.transport}: no such transport plugin here; installed: "
                    f"{', '.join(known) or 'none'}")
    return args


def common_env(args: argparse.Namespace, root: str, port: int) -> dict[str, str]:
    env = {
        "DMLC_PS_ROOT_URI": root, "DMLC_PS_ROOT_PORT": str(port),
        "DMLC_NUM_SERVER": str(args.num_servers), "DMLC_NUM_WORKER": str(args.num_workers),
        "KVFRAME_ROOT_URI": root, "KVFRAME_ROOT_PORT": str(port),
        "KVFRAME_NUM_SERVERS": str(args.num_servers), "KVFRAME_NUM_WORKERS": str(args.num_workers),
    }
    if args.interface:
        env["DMLC_INTERFACE"] = args.interface
    if args.config:
        env["KVFRAME_CONFIG"] = os.path.abspath(args.config)
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    if args.transport:
        env["KVFRAME_TRANSPORT"] = args.transport
    return env


# what a remote process inherits from the launcher's environment (a local one inherits everything)
_PASS_PREFIXES = ("DMLC_", "KVFRAME_", "MXNET_")
_PASS_NAMES = ("OMP_NUM_THREADS",)
# per-host or local-only settings: passing the launcher's value on would be wrong on other hosts
_NOT_PASSED = ("KVFRAME_NODE_HOST", "DMLC_NODE_HOST", "KVFRAME_SHM_DIR", "KVFRAME_IPC", "DMLC_LOCAL", "KVFRAME_SSH")


def passed_names(environ: Mapping[str, str] | None = None, secret: bool = False) -> list[str]:
    environ = os.environ if environ is None else environ
    return sorted(k for k in environ if (k.startswith(_PASS_PREFIXES) or k in _PASS_NAMES)
                  and k not in _NOT_PASSED and (secret or k != "KVFRAME_SECRET"))


def _role_env(role: str, rank: int | None = None) -> dict[str, str]:
    env = {"DMLC_ROLE": role, "KVFRAME_ROLE": role}
    if rank is not None:
        env["KVFRAME_RANK"] = str(rank)
    return env


def _worker_env(args: argparse.Namespace, rank: int | None, local_rank: int | None) -> dict[str, str]:
    """A worker's own variables: its role and rank (None: mpirun's rank), the job's world size, and its
    rank among the workers of its host (None: mpirun's OMPI_COMM_WORLD_LOCAL_RANK)."""
    env = {**_role_env("worker", rank), "KVFRAME_WORLD_SIZE": str(args.num_workers)}
    if local_rank is not None:
        env["KVFRAME_LOCAL_RANK"] = str(local_rank)
    return env


def local_ranks(hosts: list[str], first: int, count: int) -> list[int]:
    """The rank among the workers of its host of each of ``count`` workers placed round-robin over
    ``hosts`` from position ``first`` on (a host is its name and ssh port, whoever logs in)."""
    seen: dict[tuple[str, int | None], int] = {}
    out = []
    for i in range(count):
        _, host, port = split_host(hosts[(first + i) % len(hosts)])
        out.append(seen.get((host, port), 0))
        seen[(host, port)] = out[-1] + 1
    return out


def _role_cmd(args: argparse.Namespace, role: str) -> list[str]:
    return [args.python, "-m", "kvframe_dist", "--role", role]


def ssh_options(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``(ssh command, -o options)``: $KVFRAME_SSH (default ``ssh``); then --ssh-option's, then the
    defaults the user did not set (ssh keeps the first value it reads for an option)."""
    base = shlex.split(os.environ.get("KVFRAME_SSH") or "ssh")
    opts: list[str] = []
    for o in args.ssh_option:
        opts += ["-o", o]
    toks, given = base + opts, set()
    for i, tok in enumerate(toks):
        if tok == "-o" and i + 1 < len(toks):
            val = toks[i + 1]
        elif tok.startswith("-o"):
            val = tok[2:]
        else:
            continue
        given.add(re.split(r"[\s=]", val.strip(), maxsplit=1)[0].lower())
    for key, value in (("StrictHostKeyChecking", "no"), ("BatchMode", "yes")):
        if key.lower() not in given:
            opts += ["-o", f"{key}={value}"]
    return base, opts


def remote_command(cwd: str, env: dict[str, str], cmd: list[str]) -> str:
    """The shell command ssh runs on a host (a POSIX shell): ``cmd`` with ``env`` in ``cwd``, and a
    watcher on the ssh session's stdin, a pipe the launcher holds open.  The launcher writes one line,
    the job's secret, which the shell reads into KVFRAME_SECRET (a shell reads a pipe byte by byte up
    to the newline, so the rest stays for the watcher); EOF before it, or any time later, means the
    launcher or its ssh is gone: the session's process group (sshd made it, with setsid) gets
    SIGTERM, then SIGKILL.  The command's exit status is ssh's."""
    envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    # the command runs in the background (stdin /dev/null, as POSIX gives an async list); fd 3 keeps
    # the session's stdin for the watcher, which outlives the TERM it sends to its own group
    return ("IFS= read -r KVFRAME_SECRET || exit 1; export KVFRAME_SECRET; "
            f"cd {shlex.quote(cwd)} && env {envs} {shlex.join(cmd)} & p=$!; exec 3<&0; "
            "(trap : TERM; while read -r _ <&3; do :; done; kill -TERM 0; sleep 3; kill -KILL 0) & w=$!; "
            "wait $p; rc=$?; kill -KILL $w 2>/dev/null; exit $rc")


def build(args: argparse.Namespace) -> list[Proc]:
    """The processes to start, with their command lines and variables (the secret is not among
    them: Launcher.start hands it over)."""
    local = args.launcher == "local"
    workers_only = args.num_servers == 0
    hosts = [] if local else read_hostfile(args.hostfile)
    if local:
        root = "127.0.0.1"
    elif args.host_ip:
        root = args.host_ip
    else:
        root = rendezvous_host(hosts, args.interface) if workers_only else default_host_ip(hosts, args.interface)
    port = args.port
    if not port:
        pick = free_port_pair if workers_only else free_port
        try:
            port = pick(root)
        except OSError:  # --host-ip may be an address of a NAT in front of this host (or, -s 0, another host)
            port = pick("")
    env = common_env(args, root, port)
    procs = [] if workers_only else [Proc("scheduler", _role_cmd(args, "scheduler"), {**env, **_role_env("scheduler")})]
    if local:
        procs += [Proc(f"server {i}", _role_cmd(args, "server"), {**env, **_role_env("server", i)})
                  for i in range(args.num_servers)]
        procs += [Proc(f"worker {i}", list(args.command), {**env, **_worker_env(args, i, i)})
                  for i in range(args.num_workers)]
        return procs
    ssh, opts = ssh_options(args)
    if args.launcher == "ssh":
        cwd = os.getcwd()
        passed = {k: os.environ[k] for k in passed_names()}
        nodes = [("server", i, _role_cmd(args, "server"), _role_env("server", i)) for i in range(args.num_servers)]
        lranks = local_ranks(hosts, args.num_servers, args.num_workers)
        nodes += [("worker", i, list(args.command), _worker_env(args, i, lranks[i])) for i in range(args.num_workers)]
        for j, (role, rank, cmd, renv) in enumerate(nodes):
            dest, _, sshport = split_host(hosts[j % len(hosts)])
            penv = {**passed, **env, **renv, "PYTHONUNBUFFERED": "1"}
            portopt = ["-p", str(sshport)] if sshport else []
            procs.append(Proc(f"{role} {rank}", [*ssh, *opts, *portopt, dest, remote_command(cwd, penv, cmd)],
                              watch_stdin=True, deathsig=signal.SIGTERM))  # TERM: ssh closes the session cleanly
        return procs
    # mpi: one mpirun per role; ranks come from the MPI rank
    rsh = ["--mca", "plm_rsh_agent", shlex.join(ssh), "--mca", "plm_rsh_args", " ".join(opts)]
    for role, count, cmd, renv in (("server", args.num_servers, _role_cmd(args, "server"), _role_env("server")),
                                   ("worker", args.num_workers, list(args.command), _worker_env(args, None, None))):
        if not count:
            continue
        penv = {**env, **renv, "KVFRAME_RANK_FROM_MPI": "1", "PYTHONUNBUFFERED": "1"}
        xs = []
        for k in sorted({*passed_names(secret=True), "KVFRAME_SECRET"}):
            if k not in penv:
                xs += ["-x", k]  # by name: mpirun sends the value, which stays off command lines
        for k, v in sorted(penv.items()):
            xs += ["-x", f"{k}={v}"]
        procs.append(Proc(f"{role}s", ["mpirun", "--allow-run-as-root", "-np", str(count), "--hostfile",
                                       os.path.abspath(args.hostfile), "--tag-output", *rsh, *xs, *cmd],
                          mpi_role=role, deathsig=signal.SIGTERM))  # TERM: mpirun stops its daemons and ranks
    return procs


_MPI_TAG = re.compile(r"\[\d+,(\d+)\]<(std(?:out|err|diag))>:")  # Open MPI's --tag-output: [job,rank]<stdout>:


def mpi_lines(line: str, partial: dict) -> list[tuple[str | None, str]]:
    """Whole lines ``(rank, text)`` in one line of ``mpirun --tag-output`` (rank None: mpirun's own).
    mpirun tags every chunk a rank writes, so one line may hold ``[1,0]<stdout>:{...`` from a print
    whose newline comes later as ``[1,0]<stdout>:``, or pieces of other ranks: a fragment is a rank's
    whole line only when it ends the physical line; the others wait in ``partial``."""
    pieces = _MPI_TAG.split(line)  # [before, rank, stream, text, rank, stream, text, ...]
    out: list[tuple[str | None, str]] = [(None, pieces[0])] if pieces[0] or len(pieces) == 1 else []
    for i in range(1, len(pieces), 3):
        key = (pieces[i], pieces[i + 1])
        partial[key] = partial.get(key, "") + pieces[i + 2]
        if i + 3 >= len(pieces):
            out.append((pieces[i], partial.pop(key)))
    return out


# the scheduler's verdict on a silent node: "kvframe scheduler: worker 1 on 127.0.0.1 stopped: no heartbeat ..."
_DECLARED = re.compile(r"kvframe scheduler: (worker|server) (\d+)\b.*? stopped: (.*?)(?:; telling every other node "
                       r"and stopping)?$")


class Launcher:
    def __init__(self, procs: list[Proc], grace: float, out=None, secret: str | None = None, guard: bool = True):
        self.procs = procs
        self.grace = grace
        self.out = out or sys.stdout
        self.secret = secret
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.guard = Guard() if guard else None
        self.signalled: int | None = None  # a signal that asks the launcher to stop the job
        self.declared: tuple[str, str] | None = None  # (node, reason): the scheduler declared it stopped
        self.summary = ""  # the last line: why the job failed

    def interrupt(self, signum: int) -> None:
        """A signal handler: the main loop stops the job (a flag: a handler must not interrupt a Popen)."""
        if self.signalled is None:
            self.signalled = signum

    def _write(self, lines: list[str]) -> None:
        with self.lock:
            try:
                self.out.write("".join(f"{ln}\n" for ln in lines))
                self.out.flush()
            except (OSError, ValueError):  # our output is gone (a closed terminal): keep draining the children
                pass

    def _forward(self, proc: Proc) -> None:
        prefix = f"[{proc.name}] "
        assert proc.popen is not None and proc.popen.stdout is not None
        partial: dict = {}
        for raw in iter(proc.popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if proc.name == "scheduler" and self.declared is None:
                m = _DECLARED.search(line)
                if m:
                    self.declared = (f"{m[1]} {m[2]}", m[3])
            if not proc.mpi_role:
                self._write([prefix + line])
                continue
            self._write([f"[{proc.mpi_role} {rank}] {text}" if rank is not None else prefix + text
                         for rank, text in mpi_lines(line, partial)])
        if partial:  # a last line without its newline
            self._write([f"[{proc.mpi_role} {rank}] {text}" for (rank, _), text in partial.items()])

    def start(self) -> None:
        for proc in self.procs:
            if self.signalled is not None:
                break  # wait() stops what has started
            env = {**os.environ, **proc.env, "PYTHONUNBUFFERED": "1"}
            if self.secret is not None:  # in the environment, which no other user can read; ssh: on stdin
                env.pop("KVFRAME_SECRET", None)
                if not proc.watch_stdin:
                    env["KVFRAME_SECRET"] = self.secret
            try:
                popen = proc.popen = subprocess.Popen(
                    proc.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.PIPE if proc.watch_stdin else subprocess.DEVNULL,
                    start_new_session=True, preexec_fn=die_with_launcher(proc.deathsig))
            except OSError as exc:
                self._say(f"cannot start {proc.name} ({shlex.join(proc.argv)}): {exc}; stopping the others")
                self.procs = [p for p in self.procs if p.popen is not None]
                self.stop_all()
                self.close()
                raise SystemExit(127) from None
            log.debug("started %s (pid %d): %s", proc.name, popen.pid, shlex.join(proc.argv))
            if self.guard is not None:
                self.guard.tell(f"pg {popen.pid}")
            if proc.watch_stdin and popen.stdin is not None:
                try:  # ssh: the remote shell reads the first line into KVFRAME_SECRET
                    popen.stdin.write(f"{self.secret or ''}\n".encode())
                    popen.stdin.flush()
                except OSError:
                    pass  # ssh already failed: its status says why
            t = threading.Thread(target=self._forward, args=(proc,), daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
            self.guard = None

    @staticmethod
    def code(rc: int) -> int:
        return 128 - rc if rc < 0 else rc

    def _say(self, msg: str) -> None:
        self._write([f"[kvframe-launch] {msg}"])

    @staticmethod
    def _exited(proc: Proc) -> bool:
        """Whether the process has ended, without reaping it: while it is a zombie its id cannot be
        reused, so its process group can still be signalled safely."""
        p = proc.popen
        if p is None or p.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
        except AttributeError:  # no waitid here
            return p.poll() is not None

    def _reap(self, proc: Proc) -> None:
        """SIGKILL to what is left of the process's group (its children that ignored or never got a
        signal), then reap it."""
        p = proc.popen
        if p is None or p.returncode is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            rc = p.wait(5)
        except subprocess.TimeoutExpired:  # cannot be killed (uninterruptible sleep): leave it to the guard
            return
        log.debug("%s (pid %d) ended with status %d", proc.name, p.pid, self.code(rc))
        if self.guard is not None:
            self.guard.tell(f"gone {p.pid}")  # reaped: its id may be reused, never signal it again

    def _poll(self, proc: Proc) -> int | None:
        if proc.popen is None:
            return 0
        if proc.popen.returncode is None and self._exited(proc):
            self._reap(proc)
        return proc.popen.returncode

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        """``sig`` to every running process group (SIGCONT too, so that a stopped member handles it),
        SIGKILL at once to a stopped process (TERM would wait for a SIGCONT); 3 s later SIGKILL to
        whatever is left of every group."""
        live = [proc for proc in self.procs if self._poll(proc) is None]
        for proc in live:
            if proc.popen is None:  # not started: _poll() said 0, so it is not here
                continue
            pid = proc.popen.pid
            proc.stopped = is_stopped(pid)
            log.debug("stopping %s (pid %d) with %s", proc.name, pid, "SIGKILL" if proc.stopped else
                      signal.Signals(sig).name)
            for s in ((signal.SIGKILL,) if proc.stopped else (sig, signal.SIGCONT)):
                try:
                    os.killpg(pid, s)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 3
        for proc in live:
            while not self._exited(proc) and time.monotonic() < deadline:
                time.sleep(0.02)
        for proc in live:
            self._reap(proc)

    def _join_output(self) -> None:
        for t in self.threads:
            t.join(2)

    def wait(self) -> int:
        first: tuple[str, int] | None = None
        failed_at = 0.0
        workers_done_at: float | None = None
        try:
            while True:
                if self.signalled is not None:
                    name = signal.Signals(self.signalled).name
                    self._say(f"got {name}; stopping every process")
                    self.stop_all()
                    self._join_output()
                    self.summary = f"job stopped by {name}; exit status {128 + self.signalled}"
                    self._say(self.summary)
                    return 128 + self.signalled
                running = [p for p in self.procs if self._poll(p) is None]
                if first is None:
                    for p in self.procs:
                        rc = self._poll(p)
                        if rc not in (None, 0):
                            first = (p.name, self.code(rc))
                            failed_at = time.monotonic()
                            self._say(f"{p.name} exited with status {first[1]}; waiting up to {self.grace:g} s for "
                                      "the others, then stopping them")
                            break
                if not running:
                    break
                now = time.monotonic()
                if first is not None and now - failed_at > self.grace:
                    self._say("stopping: " + ", ".join(p.name for p in running))
                    self.stop_all()
                    break
                workers = [p for p in self.procs if p.name.startswith("worker")]
                if first is None and workers and all(self._poll(p) == 0 for p in workers):
                    workers_done_at = workers_done_at or now
                    if now - workers_done_at > 15:  # scheduler and servers stop by themselves when workers close
                        self._say("the workers finished but " + ", ".join(p.name for p in running) +
                                  " did not stop within 15 s; stopping them")
                        self.stop_all()
                        break
                time.sleep(0.05)
        except KeyboardInterrupt:
            self._say("interrupted; stopping every process")
            self.stop_all()
            return 130
        self._join_output()
        if first is None:
            for p in self.procs:  # a process stopped by us after all workers succeeded does not count
                rc = p.popen.returncode if p.popen is not None else None
                if rc not in (None, 0) and p.name.startswith("worker"):
                    first = (p.name, self.code(rc))
                    break
        if first is None:
            return 0
        self.summary = f"job failed, exit status {first[1]}: {self.cause(first)}"
        self._say(self.summary)
        return first[1]

    def cause(self, first: tuple[str, int]) -> str:
        """Who made the job fail.  Nodes that hear that another went silent exit with status 1, often
        before the silent one's process ends (a SIGSTOPped one never does): the scheduler's verdict, or
        a process found stopped, names the cause; otherwise the first process that failed."""
        by_name = {p.name: p for p in self.procs}
        if self.declared is not None and self.declared[0] != first[0]:
            name, reason = self.declared
            proc = by_name.get(name)
            fate = ""
            if proc is not None and proc.stopped:
                fate = "; its process was stopped (SIGSTOP, or a debugger) and got SIGKILL"
            elif proc is not None and proc.popen is not None and proc.popen.returncode == 0:
                fate = "; its process had exited with status 0 without closing its store"
            return (f"{name} went silent: the scheduler declared it stopped ({reason}){fate}; the failure of "
                    f"{first[0]} (status {first[1]}) and the others' followed from it")
        stopped = [p.name for p in self.procs if p.stopped]
        if self.declared is None and stopped and first[0] not in stopped:
            return (f"{stopped[0]} was stopped (SIGSTOP, or a debugger) and silent, and got SIGKILL; the failure of "
                    f"{first[0]} (status {first[1]}) and the others' followed from it")
        return f"{first[0]} exited with status {first[1]}, the first to fail"


def main(argv: list[str] | None = None) -> int:
    from kvframe.log import LogLevelError, configure

    try:  # a bad KVFRAME_LOG_LEVEL stops the job before anything starts
        configure("launch")
    except LogLevelError as exc:
        print(f"kvframe-launch: {exc}", file=sys.stderr)
        return 2
    args = parse_args(argv)
    procs = build(args)
    given = dict(kv.split("=", 1) for kv in args.env).get("KVFRAME_SHM_DIR") or os.environ.get("KVFRAME_SHM_DIR")
    if given:
        check_private_dir(given)  # the scheduler runs here under every launcher
    if args.dry_run:
        for p in procs:
            envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(p.env.items()))
            print(f"# {p.name}\n{envs + ' ' if envs else ''}{shlex.join(p.argv)}")
        print("# KVFRAME_SECRET: " + ("from this environment" if os.environ.get("KVFRAME_SECRET") else
                                      "a fresh one for the job") + ("; over ssh, the first line of stdin"
                                                                    if args.launcher == "ssh" else ""))
        return 0
    grace = args.grace
    if grace is None and args.num_servers == 0:
        grace = WORKERS_ONLY_GRACE
    elif grace is None:
        grace = float(os.environ.get("KVFRAME_HEARTBEAT_TIMEOUT", "15")) + 5
    launcher = Launcher(procs, grace, secret=job_secret())
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: launcher.interrupt(signum))
    shm = None
    try:
        for path in remove_stale_job_dirs():
            launcher._say(f"removed {path}, left by a launcher that no longer runs")
        if args.launcher == "local" and not given and os.path.isdir(SHM_BASE):
            shm = make_job_dir()
            if launcher.guard is not None:
                launcher.guard.tell(f"dir {shm}")
            for p in procs:
                p.env["KVFRAME_SHM_DIR"] = shm
        launcher.start()
        rc = launcher.wait()
        trace = dict(kv.split("=", 1) for kv in args.env).get("KVFRAME_TIMELINE") or os.environ.get("KVFRAME_TIMELINE")
        if trace and args.launcher == "local":
            launcher._say(f"timelines of KVFRAME_TIMELINE={trace} written; merge them for Perfetto with: kvframe "
                          f"timeline {shlex.quote(trace)}")
        return rc
    finally:
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
        launcher.close()


if __name__ == "__main__":
    sys.exit(main())
