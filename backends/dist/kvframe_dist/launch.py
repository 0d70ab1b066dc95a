"""``kvframe-launch``: start a scheduler, servers and workers, and watch them.

    kvframe-launch -n 2 -s 2 -- python train.py              # local, on loopback
    kvframe-launch -n 4 -s 2 --launcher ssh -H hosts -- python train.py
    kvframe-launch -n 4 -s 2 --launcher mpi -H hosts -- python train.py
    kvframe-launch -n 2 --dry-run -- python train.py         # print the command lines only

Every process gets MXNet's variables (DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT,
DMLC_NUM_SERVER, DMLC_NUM_WORKER) and kvframe's (KVFRAME_ROLE, KVFRAME_RANK, ...);
``--config FILE`` adds KVFRAME_CONFIG=FILE.  Output is forwarded line by line with a role
prefix (``[worker 0] ...``).  The launcher exits with the first failing process's code (128+N
for a process killed by signal N): after a failure it gives the others ``--grace`` seconds to
report their own errors, then stops them.

* local: every process is a subprocess of the launcher, the scheduler and servers bound to
  127.0.0.1 (``--ipc`` puts the servers on unix sockets instead).
* ssh: the scheduler runs here (on ``--host-ip``); servers and workers go round-robin over the
  hosts of the hostfile (one host per line, ``#`` comments, ``host slots=N`` accepted), each
  started as ``ssh HOST 'cd CWD && env VARS... COMMAND'``.
* mpi: the scheduler runs here; ``mpirun -np S --hostfile H -x VAR ... python -m kvframe_dist
  --role server`` and ``mpirun -np W ... COMMAND`` start the rest; worker ranks come from the
  MPI rank (OMPI_COMM_WORLD_RANK, PMI_RANK or PMIX_RANK).
"""

from __future__ import annotations

import argparse
import os
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
    name: str  # "scheduler", "server 1", "worker 0"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # what this process adds to the environment
    popen: subprocess.Popen | None = None


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
    p.add_argument("--host-ip", help="the scheduler's address for ssh/mpi (default: this host's address)")
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
    return args


def common_env(args: argparse.Namespace, root: str, port: int) -> dict[str, str]:
    env = {
        "DMLC_PS_ROOT_URI": root, "DMLC_PS_ROOT_PORT": str(port),
        "DMLC_NUM_SERVER": str(args.num_servers), "DMLC_NUM_WORKER": str(args.num_workers),
        "KVFRAME_ROOT_URI": root, "KVFRAME_ROOT_PORT": str(port),
        "KVFRAME_NUM_SERVERS": str(args.num_servers), "KVFRAME_NUM_WORKERS": str(args.num_workers),
    }
    if args.config:
        env["KVFRAME_CONFIG"] = os.path.abspath(args.config)
    if args.ipc:
        env["KVFRAME_IPC"] = "1"
    for kv in args.env:
        k, v = kv.split("=", 1)
        env[k] = v
    return env


def _role_env(role: str, rank: int | None = None) -> dict[str, str]:
    env = {"DMLC_ROLE": role, "KVFRAME_ROLE": role}
    if rank is not None:
        env["KVFRAME_RANK"] = str(rank)
    return env


def _role_cmd(args: argparse.Namespace, role: str) -> list[str]:
    return [args.python, "-m", "kvframe_dist", "--role", role]


def build(args: argparse.Namespace) -> list[Proc]:
    """The processes to start, with their command lines and variables."""
    local = args.launcher == "local"
    root = "127.0.0.1" if local else (args.host_ip or socket.gethostbyname(socket.gethostname()))
    port = args.port or free_port("127.0.0.1" if local else "")
    env = common_env(args, root, port)
    procs = [Proc("scheduler", _role_cmd(args, "scheduler"), {**env, **_role_env("scheduler")})]
    if local:
        procs += [Proc(f"server {i}", _role_cmd(args, "server"), {**env, **_role_env("server", i)})
                  for i in range(args.num_servers)]
        procs += [Proc(f"worker {i}", list(args.command), {**env, **_role_env("worker", i)})
                  for i in range(args.num_workers)]
        return procs
    hosts = read_hostfile(args.hostfile)
    if args.launcher == "ssh":
        cwd = os.getcwd()
        nodes = [("server", i, _role_cmd(args, "server")) for i in range(args.num_servers)]
        nodes += [("worker", i, list(args.command)) for i in range(args.num_workers)]
        for j, (role, rank, cmd) in enumerate(nodes):
            host = hosts[j % len(hosts)]
            penv = {**env, **_role_env(role, rank)}
            remote = f"cd {shlex.quote(cwd)} && env " + " ".join(
                f"{k}={shlex.quote(v)}" for k, v in sorted(penv.items())) + " " + shlex.join(cmd)
            procs.append(Proc(f"{role} {rank}", ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
                                                 host, remote]))
        return procs
    # mpi: one mpirun per role; ranks come from the MPI rank
    for role, count, cmd in (("server", args.num_servers, _role_cmd(args, "server")),
                             ("worker", args.num_workers, list(args.command))):
        penv = {**env, **_role_env(role), "KVFRAME_RANK_FROM_MPI": "1"}
        xs = []
        for k, v in sorted(penv.items()):
            xs += ["-x", f"{k}={v}"]
        procs.append(Proc(f"{role}s", ["mpirun", "--allow-run-as-root", "-np", str(count), "--hostfile",
                                       os.path.abspath(args.hostfile), *xs, *cmd]))
    return procs


class Launcher:
    def __init__(self, procs: list[Proc], grace: float, out=None):
        self.procs = procs
        self.grace = grace
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def _forward(self, proc: Proc) -> None:
        prefix = f"[{proc.name}] "
        assert proc.popen is not None and proc.popen.stdout is not None
        for raw in iter(proc.popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self.lock:
                self.out.write(prefix + line + "\n")
                self.out.flush()

    def start(self) -> None:
        for proc in self.procs:
            env = {**os.environ, **proc.env, "PYTHONUNBUFFERED": "1"}
            try:
                proc.popen = subprocess.Popen(proc.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
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
