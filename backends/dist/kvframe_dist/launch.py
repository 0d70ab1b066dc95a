"""``kvframe-launch``: start a scheduler, servers and workers, and watch them.

    kvframe-launch -n 2 -s 2 -- python train.py              # local, on loopback
    kvframe-launch -n 4 -s 2 --launcher ssh -H hosts -- python train.py
    kvframe-launch -n 4 -s 2 --launcher mpi -H hosts -- python train.py
    kvframe-launch -n 2 --dry-run -- python train.py         # print the command lines only

Every process gets MXNet's variables (DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT,
DMLC_NUM_SERVER, DMLC_NUM_WORKER; DMLC_INTERFACE with ``--interface``) and kvframe's
(KVFRAME_ROLE, KVFRAME_RANK, ...); ``--config FILE`` adds KVFRAME_CONFIG=FILE.  Output is forwarded
line by line with a role prefix (``[worker 0] ...``).  The launcher exits with the first failing
process's code (128+N for a process killed by signal N): after a failure it gives the others
``--grace`` seconds to report their own errors, then stops them.

* local: every process is a subprocess of the launcher, the scheduler and servers bound to
  127.0.0.1 (``--ipc`` puts the servers on unix sockets instead).
* ssh: the scheduler runs here, on ``--host-ip`` (default: this host's address on the route to
  the first non-loopback host of the hostfile, or that of ``--interface``); servers and workers go
  round-robin over the hosts of the hostfile (one per line: ``host``, ``user@host``, ``host:port``
  or ``[v6addr]:port``; ``#`` comments; ``host slots=N`` repeats a host), each started as
  ``ssh [OPTIONS] HOST 'cd CWD && env VARS... COMMAND ...'`` in the same directory as here.  The
  ssh command is ``$KVFRAME_SSH`` (default ``ssh``) plus ``-o OPT`` for each ``--ssh-option OPT``
  (default options: StrictHostKeyChecking=no, BatchMode=yes unless given).  Besides the job's
  variables, the launcher's own DMLC_*, KVFRAME_* and MXNET_* variables and OMP_NUM_THREADS are
  passed on (not KVFRAME_SECRET, which would show on command lines: set it on the hosts).  The
  remote side watches its ssh connection: when the launcher or its ssh goes away, the remote
  process group gets SIGTERM (SIGKILL 3 s later), so nothing outlives the job.
* mpi (Open MPI): the scheduler runs here as for ssh; ``mpirun -np S --hostfile H -x VAR ...
  python -m kvframe_dist --role server`` and ``mpirun -np W ... COMMAND`` start the rest; worker
  ranks come from the MPI rank (OMPI_COMM_WORLD_RANK, PMI_RANK or PMIX_RANK).  ``$KVFRAME_SSH``
  and ``--ssh-option`` become mpirun's ``plm_rsh_agent`` and ``plm_rsh_args``; the launcher's
  variables above go by name (``-x NAME``, KVFRAME_SECRET included: mpirun carries values itself).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Proc:
    name: str  # "scheduler", "server 1", "worker 0", "servers" (one mpirun)
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # what this process adds to the environment
    popen: subprocess.Popen | None = None
    watch_stdin: bool = False  # ssh: stdin is a pipe held open; its EOF tells the remote side to stop
    mpi_role: str | None = None  # mpirun with --tag-output: lines are re-prefixed per rank


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    from kvframe_dist.address import interface_address, is_loopback, route_address

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvframe-launch", description="Start a kvframe distributed job: scheduler, "
                                "servers and workers.", epilog=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", "--num-workers", type=int, required=True, help="number of workers")
    p.add_argument("-s", "--num-servers", type=int, help="number of servers (default: as many as workers)")
    p.add_argument("--launcher", choices=["local", "ssh", "mpi"], default="local")
    p.add_argument("-H", "--hostfile", help="hosts for ssh and mpi (one per line)")
    p.add_argument("--config", help="a kvframe config file, passed to every process as KVFRAME_CONFIG")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra variable for every process")
    p.add_argument("--port", type=int, default=0, help="the scheduler's port (default: a free one)")
    p.add_argument("--host-ip", help="ssh/mpi: the scheduler's address, reachable from every host (default: the "
                   "address of --interface, else this host's address on the route to the first remote host)")
    p.add_argument("--interface", help="network interface the nodes announce (DMLC_INTERFACE for every process)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                   help="ssh/mpi: add `-o OPT` to ssh (repeatable), e.g. --ssh-option IdentityFile=~/.ssh/job")
    p.add_argument("--ipc", action="store_true", help="local: servers listen on unix sockets")
    p.add_argument("--no-shm", action="store_true",
                   help="local: large arrays go over the sockets too (default: through a private /dev/shm directory)")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds the others get to exit after a failure (default: heartbeat timeout + 5)")
    p.add_argument("--python", default=sys.executable, help="python for scheduler and servers")
    p.add_argument("--dry-run", action="store_true", help="print the command lines and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the worker command")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the worker command after --, e.g. kvframe-launch -n 2 -- python train.py")
    if args.num_workers < 1 or (args.num_servers is not None and args.num_servers < 1):
        p.error("need at least one worker and one server")
    if args.launcher != "local" and not args.hostfile:
        p.error(f"--launcher {args.launcher} needs a hostfile (-H)")
    args.command = cmd
    if args.num_servers is None:
        args.num_servers = args.num_workers
    for kv in args.env:
        if "=" not in kv:
            p.error(f"--env takes K=V; got {kv!r}")
    for opt in args.ssh_option:
        if "=" not in opt and " " not in opt:
            p.error(f"--ssh-option takes an ssh_config option as KEY=VALUE; got {opt!r}")
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
    if args.ipc:
        env["KVFRAME_IPC"] = "1"
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    return env


# what a remote process inherits from the launcher's environment (a local one inherits everything)
_PASS_PREFIXES = ("DMLC_", "KVFRAME_", "MXNET_")
_PASS_NAMES = ("OMP_NUM_THREADS",)
# per-host or local-only settings: passing the launcher's value on would be wrong on other hosts
_NOT_PASSED = ("KVFRAME_NODE_HOST", "DMLC_NODE_HOST", "KVFRAME_SHM_DIR", "KVFRAME_IPC", "DMLC_LOCAL", "KVFRAME_SSH")


def passed_names(environ: dict[str, str] | None = None, secret: bool = False) -> list[str]:
    environ = os.environ if environ is None else environ
    return sorted(k for k in environ if (k.startswith(_PASS_PREFIXES) or k in _PASS_NAMES)
                  and k not in _NOT_PASSED and (secret or k != "KVFRAME_SECRET"))


def _role_env(role: str, rank: int | None = None) -> dict[str, str]:
    env = {"DMLC_ROLE": role, "KVFRAME_ROLE": role}
    if rank is not None:
        env["KVFRAME_RANK"] = str(rank)
    return env


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
    watcher on the ssh session's stdin, a pipe the launcher holds open and never writes.  Its EOF
    means the launcher or its ssh is gone: the session's process group (sshd made it, with setsid)
    gets SIGTERM, then SIGKILL.  The command's exit status is ssh's."""
    envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    # the command runs in the background (stdin /dev/null, as POSIX gives an async list); fd 3 keeps
    # the session's stdin for the watcher, which outlives the TERM it sends to its own group
    return (f"cd {shlex.quote(cwd)} && env {envs} {shlex.join(cmd)} & p=$!; exec 3<&0; "
            "(trap : TERM; while read -r _ <&3; do :; done; kill -TERM 0; sleep 3; kill -KILL 0) & w=$!; "
            "wait $p; rc=$?; kill -KILL $w 2>/dev/null; exit $rc")


def build(args: argparse.Namespace) -> list[Proc]:
    """The processes to start, with their command lines and variables."""
    local = args.launcher == "local"
    hosts = [] if local else read_hostfile(args.hostfile)
    root = "127.0.0.1" if local else (args.host_ip or default_host_ip(hosts, args.interface))
    port = args.port
    if not port:
        try:
            port = free_port(root)
        except OSError:  # --host-ip may be an address of a NAT in front of this host
            port = free_port("")
    env = common_env(args, root, port)
    procs = [Proc("scheduler", _role_cmd(args, "scheduler"), {**env, **_role_env("scheduler")})]
    if local:
        procs += [Proc(f"server {i}", _role_cmd(args, "server"), {**env, **_role_env("server", i)})
                  for i in range(args.num_servers)]
        procs += [Proc(f"worker {i}", list(args.command), {**env, **_role_env("worker", i)})
                  for i in range(args.num_workers)]
        return procs
    ssh, opts = ssh_options(args)
    if args.launcher == "ssh":
        cwd = os.getcwd()
        passed = {k: os.environ[k] for k in passed_names()}
        nodes = [("server", i, _role_cmd(args, "server")) for i in range(args.num_servers)]
        nodes += [("worker", i, list(args.command)) for i in range(args.num_workers)]
        for j, (role, rank, cmd) in enumerate(nodes):
            dest, _, sshport = split_host(hosts[j % len(hosts)])
            penv = {**passed, **env, **_role_env(role, rank), "PYTHONUNBUFFERED": "1"}
            portopt = ["-p", str(sshport)] if sshport else []
            procs.append(Proc(f"{role} {rank}", [*ssh, *opts, *portopt, dest, remote_command(cwd, penv, cmd)],
                              watch_stdin=True))
        return procs
    # mpi: one mpirun per role; ranks come from the MPI rank
    rsh = ["--mca", "plm_rsh_agent", shlex.join(ssh), "--mca", "plm_rsh_args", " ".join(opts)]
    for role, count, cmd in (("server", args.num_servers, _role_cmd(args, "server")),
                             ("worker", args.num_workers, list(args.command))):
        penv = {**env, **_role_env(role), "KVFRAME_RANK_FROM_MPI": "1", "PYTHONUNBUFFERED": "1"}
        xs = []
        for k in passed_names(secret=True):
            if k not in penv:
                xs += ["-x", k]  # by name: mpirun sends the value, which stays off command lines
        for k, v in sorted(penv.items()):
            xs += ["-x", f"{k}={v}"]
        procs.append(Proc(f"{role}s", ["mpirun", "--allow-run-as-root", "-np", str(count), "--hostfile",
                                       os.path.abspath(args.hostfile), "--tag-output", *rsh, *xs, *cmd],
                          mpi_role=role))
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


class Launcher:
    def __init__(self, procs: list[Proc], grace: float, out=None):
        self.procs = procs
        self.grace = grace
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def _write(self, lines: list[str]) -> None:
        with self.lock:
            self.out.write("".join(f"{ln}\n" for ln in lines))
            self.out.flush()

    def _forward(self, proc: Proc) -> None:
        prefix = f"[{proc.name}] "
        assert proc.popen is not None and proc.popen.stdout is not None
        partial: dict = {}
        for raw in iter(proc.popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not proc.mpi_role:
                self._write([prefix + line])
                continue
            self._write([f"[{proc.mpi_role} {rank}] {text}" if rank is not None else prefix + text
                         for rank, text in mpi_lines(line, partial)])
        if partial:  # a last line without its newline
            self._write([f"[{proc.mpi_role} {rank}] {text}" for (rank, _), text in partial.items()])

    def start(self) -> None:
        for proc in self.procs:
            env = {**os.environ, **proc.env, "PYTHONUNBUFFERED": "1"}
            try:
                proc.popen = subprocess.Popen(proc.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              stdin=subprocess.PIPE if proc.watch_stdin else subprocess.DEVNULL,
                                              start_new_session=True)
            except OSError as exc:
                self._say(f"cannot start {proc.name} ({shlex.join(proc.argv)}): {exc}; stopping the others")
                self.procs = [p for p in self.procs if p.popen is not None]
                self.stop_all()
                raise SystemExit(127) from None
            t = threading.Thread(target=self._forward, args=(proc,), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def code(rc: int) -> int:
        return 128 - rc if rc < 0 else rc

    def _say(self, msg: str) -> None:
        with self.lock:
            self.out.write(f"[kvframe-launch] {msg}\n")
            self.out.flush()

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        for proc in self.procs:
            p = proc.popen
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 3
        for proc in self.procs:
            p = proc.popen
            if p is None:
                continue
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait(5)

    def wait(self) -> int:
        first: tuple[str, int] | None = None
        failed_at = 0.0
        workers_done_at: float | None = None
        try:
            while True:
                running = [p for p in self.procs if p.popen.poll() is None]
                if first is None:
                    for p in self.procs:
                        rc = p.popen.poll()
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
                if first is None and workers and all(p.popen.poll() == 0 for p in workers):
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
        for t in self.threads:
            t.join(2)
        if first is None:
            for p in self.procs:  # a process stopped by us after all workers succeeded does not count
                rc = p.popen.returncode
                if rc not in (None, 0) and p.name.startswith("worker"):
                    first = (p.name, self.code(rc))
                    break
        return first[1] if first else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs = build(args)
    if args.dry_run:
        for p in procs:
            envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(p.env.items()))
            print(f"# {p.name}\n{envs + ' ' if envs else ''}{shlex.join(p.argv)}")
        return 0
    shm = None
    if args.launcher == "local" and not args.no_shm and "KVFRAME_SHM_DIR" not in os.environ:
        import tempfile

        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        shm = tempfile.mkdtemp(prefix="kvframe-", dir=base)  # mode 0700: this user only
        for p in procs:
            p.env["KVFRAME_SHM_DIR"] = shm
    grace = args.grace
    if grace is None:
        grace = float(os.environ.get("KVFRAME_HEARTBEAT_TIMEOUT", "15")) + 5
    launcher = Launcher(procs, grace)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        launcher.start()
        return launcher.wait()
    finally:
        if shm is not None:
            import shutil

            shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
