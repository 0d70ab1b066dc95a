"""kvframe-launch --launcher ssh and mpi on simulated hosts (tests/dist/netns.py).

Host 0 runs the launcher (and so the scheduler); hosts 1 and 2 each run an sshd of their own (own
host key, authorized_keys and config in a temporary directory, root login by key only), and the
hostfile names them by address.  The namespaces share the filesystem, so the remote commands use
this venv's python and these files by absolute path, as a cluster with a shared home would.

Without root, sshd/ssh, or network namespaces, the tests that need them skip with the reason; the
command-line and remote-watcher tests run everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dist_helpers import _leftovers
from kvframe_dist import launch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from netns import Hosts, netns_unavailable  # noqa: E402

pytestmark = pytest.mark.dist
SSH_PORT = 2222
PY = sys.executable


def _sshd() -> str | None:
    found = [p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)]
    return shutil.which("sshd") or (found[0] if found else None)  # sbin is often off a user's PATH


def _cluster_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "simulated hosts with sshd need root"
    if _sshd() is None:
        return "no sshd (apt-get install openssh-server)"
    missing = [t for t in ("ssh", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (openssh-client)"
    return netns_unavailable()


# -- everywhere: command lines, the remote watcher, per-rank mpi output ----------------------------------

def test_ssh_command_lines_options_ports_and_variables(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("root@node1:2200\n[fd00::7]:2201  # a comment\nnode3 slots=2\n")
    monkeypatch.setenv("KVFRAME_SSH", "ssh -F /dev/null")
    monkeypatch.setenv("KVFRAME_HEARTBEAT_TIMEOUT", "7")
    monkeypatch.setenv("MXNET_KVSTORE_BIGARRAY_BOUND", "99")
    monkeypatch.setenv("KVFRAME_SECRET", "s" * 32)
    monkeypatch.setenv("KVFRAME_SHM_DIR", "/dev/shm/here-only")
    monkeypatch.setenv("DMLC_NODE_HOST", "10.9.9.9")
    args = launch.parse_args(["-n", "3", "-s", "1", "--launcher", "ssh", "-H", str(hosts), "--host-ip", "10.0.0.1",
                              "--port", "9191", "--interface", "eth1", "--ssh-option", "StrictHostKeyChecking=yes",
                              "--ssh-option", "IdentityFile=/keys/job", "--", "python", "train.py", "a b"])
    procs = launch.build(args)
    assert [p.name for p in procs] == ["scheduler", "server 0", "worker 0", "worker 1", "worker 2"]
    assert procs[0].env["DMLC_INTERFACE"] == "eth1" and not procs[0].watch_stdin
    # ssh keeps the first value of an option: the user's come first, a default only when not given
    opts = ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "IdentityFile=/keys/job",
            "-o", "BatchMode=yes"]
    assert procs[1].argv[:-1] == [*opts, "-p", "2200", "root@node1"]
    assert procs[2].argv[:-1] == [*opts, "-p", "2201", "fd00::7"]
    assert procs[3].argv[:-1] == procs[4].argv[:-1] == [*opts, "node3"]
    assert all(p.watch_stdin for p in procs[1:])
    remote = procs[4].argv[-1]
    assert remote.startswith(f"cd {os.getcwd()} && env ")
    for part in ("DMLC_ROLE=worker", "KVFRAME_RANK=2", "DMLC_PS_ROOT_URI=10.0.0.1", "DMLC_PS_ROOT_PORT=9191",
                 "DMLC_NUM_WORKER=3", "DMLC_NUM_SERVER=1", "DMLC_INTERFACE=eth1", "KVFRAME_HEARTBEAT_TIMEOUT=7",
                 "MXNET_KVSTORE_BIGARRAY_BOUND=99", "PYTHONUNBUFFERED=1", "python train.py 'a b' &"):
        assert part in remote, (part, remote)
    for secret_or_local in ("KVFRAME_SECRET", "KVFRAME_SHM_DIR", "DMLC_NODE_HOST", "KVFRAME_SSH"):
        assert secret_or_local not in remote, remote

    # without --host-ip: a hostfile of loopback hosts gives a loopback scheduler
    hosts.write_text("localhost\n127.0.0.1:2222\n")
    args = launch.parse_args(["-n", "1", "--launcher", "ssh", "-H", str(hosts), "--", "x"])
    assert launch.build(args)[0].env["DMLC_PS_ROOT_URI"] == "127.0.0.1"
    # never a loopback scheduler for remote hosts (addresses, so that nothing asks a DNS server)
    hosts.write_text("localhost\n10.255.255.1\n")
    for iface, why in (("lo", "loopback address 127.0.0.1, which 10.255.255.1 cannot reach"),
                       ("no-such-if0", "--interface no-such-if0: this host has no interface")):
        args = launch.parse_args(["-n", "1", "--launcher", "ssh", "-H", str(hosts), "--interface", iface, "--", "x"])
        with pytest.raises(SystemExit, match=why):
            launch.build(args)


def test_mpi_command_lines_carry_ssh_options_and_names(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\nnode2 slots=1\n")
    monkeypatch.setenv("KVFRAME_SECRET", "s" * 32)
    monkeypatch.delenv("KVFRAME_SSH", raising=False)
    args = launch.parse_args(["-n", "2", "-s", "2", "--launcher", "mpi", "-H", str(hosts), "--host-ip", "10.0.0.1",
                              "--ssh-option", "Port=2222", "--interface", "eth0", "--", "python", "w.py"])
    srv, wrk = (p.argv for p in launch.build(args)[1:])
    assert srv[srv.index("plm_rsh_agent") + 1] == "ssh"
    assert srv[srv.index("plm_rsh_args") + 1] == "-o Port=2222 -o StrictHostKeyChecking=no -o BatchMode=yes"
    assert "--tag-output" in wrk and "DMLC_INTERFACE=eth0" in wrk and "PYTHONUNBUFFERED=1" in wrk
    assert "KVFRAME_SECRET" in wrk and not any(("s" * 32) in a for a in wrk)  # by name: the value stays off argv


def test_mpi_output_is_prefixed_per_rank():
    import io

    partial: dict = {}
    # an unbuffered print arrives as two chunks, each tagged; other ranks may come in between
    assert launch.mpi_lines('[1,0]<stdout>:{"a": 1}[1,1]<stdout>:b[1,0]<stdout>:', partial) == [("0", '{"a": 1}')]
    assert launch.mpi_lines("[1,1]<stdout>:c", partial) == [("1", "bc")] and partial == {}
    assert launch.mpi_lines("mpirun: a message", partial) == [(None, "mpirun: a message")]
    assert launch.mpi_lines("", partial) == [(None, "")]
    out = io.StringIO()
    script = "printf '[1,0]<stdout>:hel'; printf '[1,0]<stdout>:lo\\n[1,1]<stderr>:oops\\nplain\\n[1,1]<stdout>:end'"
    launcher = launch.Launcher([launch.Proc("workers", ["sh", "-c", script], mpi_role="worker")], grace=1, out=out)
    launcher.start()
    assert launcher.wait() == 0
    assert out.getvalue().splitlines() == ["[worker 0] hello", "[worker 1] oops", "[workers] plain", "[worker 1] end"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_remote_command_passes_the_status_and_dies_with_its_stdin(tmp_path, shell):
    """What ssh runs on a host, run here by a POSIX shell with a pipe as stdin, as sshd gives it."""
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    cmd = launch.remote_command(str(tmp_path), {"V": "x y"}, ["sh", "-c", 'echo "$V" "$(pwd)"; exit 7'])
    p = subprocess.Popen([shell, "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stdout.read() == f"x y {tmp_path}\n"
        assert p.wait(10) == 7                       # the command's status, with stdin still open
    finally:
        p.stdin.close()
    # a command held until its stdin, the ssh session, closes; it and its child ignore SIGHUP and SIGTERM,
    # so only the watcher's SIGKILL, 3 s after its SIGTERM, stops them
    cmd = launch.remote_command(str(tmp_path), {}, ["sh", "-c", "trap '' HUP TERM; sleep 60 & echo $$ $!; wait"])
    p = subprocess.Popen([shell, "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        time.sleep(0.3)
        assert all(_alive(x) for x in pids)
        p.stdin.close()                              # as when the launcher or its ssh goes away
        assert _wait_gone(pids, 5) == [], "the remote command outlived its ssh session"
        p.wait(10)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)


# -- simulated hosts with sshd ---------------------------------------------------------------------------

@dataclass
class Cluster:
    hosts: Hosts
    key: str
    sshd_logs: dict = field(default_factory=dict)

    @property
    def ssh(self) -> str:
        """KVFRAME_SSH: no user config, this key only."""
        return f"ssh -F /dev/null -i {self.key}"

    ssh_options = ("IdentitiesOnly=yes", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR", "ConnectTimeout=10")

    def logs(self) -> str:
        return "\n".join(f"--- sshd on host {i}:\n" + "\n".join(lines) for i, lines in self.sshd_logs.items())


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvframe-test", "-f", str(path)], check=True,
                   timeout=30, stdin=subprocess.DEVNULL)


def _start_sshd(hosts: Hosts, i: int, d: Path, authorized: Path, logs: list) -> None:
    hd = d / f"host{i}"
    hd.mkdir(mode=0o700)
    _keygen(hd / "host_key")
    cfg = hd / "sshd_config"
    cfg.write_text(textwrap.dedent(f"""\
        ListenAddress {hosts[i].ip}:{SSH_PORT}
        HostKey {hd / 'host_key'}
        AuthorizedKeysFile {authorized}
        PermitRootLogin prohibit-password
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        PidFile none
        PrintMotd no
        X11Forwarding no
        MaxStartups 50
        LogLevel INFO
    """))
    p = hosts.popen(i, [_sshd(), "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    text=True)
    ready = threading.Event()

    def drain():  # keeps sshd's log (and its pipe from filling up)
        for line in p.stderr:
            logs.append(line.rstrip())
            if "Server listening" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(15) or p.poll() is not None:
        raise RuntimeError(f"sshd on host {i} did not start: " + "\n".join(logs))


@pytest.fixture(scope="module")
def cluster():
    reason = _cluster_unavailable()
    if reason:
        pytest.skip(reason)
    made_privsep = not os.path.exists("/run/sshd")  # sshd refuses to start without it
    if made_privsep:
        os.makedirs("/run/sshd", mode=0o755)
    d = Path(tempfile.mkdtemp(prefix="kvframe-sshd-"))
    hosts = None
    try:
        _keygen(d / "id")
        authorized = d / "authorized_keys"
        shutil.copy(d / "id.pub", authorized)
        hosts = Hosts(3)
        c = Cluster(hosts, str(d / "id"))
        for i in (1, 2):
            c.sshd_logs[i] = []
            _start_sshd(hosts, i, d, authorized, c.sshd_logs[i])
        yield c
    finally:
        if hosts is not None:
            hosts.close()                            # kills the sshds and whatever is left in the namespaces
        shutil.rmtree(d, ignore_errors=True)         # keys and configs
        if made_privsep:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass


@dataclass
class Run:
    popen: subprocess.Popen
    token: str
    lines: list = field(default_factory=list)

    @property
    def out(self) -> str:
        return "\n".join(self.lines)

    def of(self, who: str, tag: str) -> list[str]:
        """The payloads of lines ``[who] TAG payload``."""
        pre = f"[{who}] {tag} "
        return [ln[len(pre):] for ln in list(self.lines) if ln.startswith(pre)]

    def probe(self, who: str) -> dict:
        got = self.of(who, "PROBE")
        assert len(got) == 1, (who, self.out)
        try:
            return json.loads(got[0])
        except ValueError:
            raise AssertionError(f"{who}: {got[0]!r}\n{self.out}") from None

    def wait_for(self, pred, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline or self.popen.poll() is not None:
                assert pred(), f"timed out; output so far:\n{self.out}"
            time.sleep(0.05)


def _start(cluster: Cluster, args: list[str], env: dict | None = None) -> Run:
    """kvframe-launch on host 0 (so the scheduler lives there), its output collected line by line."""
    token = f"kvframe-test-{uuid.uuid4().hex}"
    extra = [f"--env=PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    env = {"KVFRAME_TEST_TOKEN": token, "KVFRAME_SSH": cluster.ssh, "KVFRAME_HEARTBEAT_INTERVAL": "0.25",
           "KVFRAME_HEARTBEAT_TIMEOUT": "5", "KVFRAME_TIMEOUT": "30", "KVFRAME_CONNECT_TIMEOUT": "40", **(env or {})}
    opts = [f"--ssh-option={o}" for o in cluster.ssh_options]
    p = cluster.hosts.popen(0, [PY, "-m", "kvframe_dist.launch", *opts, *extra, *args], env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(HERE))
    run = Run(p, token)

    def read():
        for line in p.stdout:
            run.lines.append(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return run


def _abort(run: Run) -> None:
    """After a failed check: the launcher and every process of the job killed, nothing asserted."""
    run.popen.kill()
    run.popen.wait(10)
    for pid in _wait_gone(_leftovers(run.token), 6):
        os.kill(pid, signal.SIGKILL)


def _finish(cluster: Cluster, run: Run, timeout: float) -> int:
    """Waits for the launcher (killing it after ``timeout``), then checks that no process of the job is
    left on any host (remote ones carry the test token too: the launcher passes KVFRAME_* on)."""
    try:
        rc = run.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        run.popen.kill()
        rc = None
    left = _wait_gone(_leftovers(run.token), 6)  # the remote watcher's SIGKILL comes 3 s after its SIGTERM
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert rc is not None, f"kvframe-launch did not finish within {timeout} s:\n{run.out}\n{cluster.logs()}"
    assert not left, f"processes left behind: {left}\n{run.out}"
    return rc


def _hostfile(tmp_path: Path, lines: list[str]) -> str:
    f = tmp_path / "hosts"
    f.write_text("".join(f"{ln}\n" for ln in lines))
    return str(f)


def _fake_python(tmp_path: Path) -> str:
    """--python for scheduler and servers: the probe instead of ``python -m kvframe_dist --role ...``."""
    f = tmp_path / "probe-python"
    f.write_text(f"#!/bin/sh\nexec {PY} {HERE / 'launch_probe.py'} \"$@\"\n")
    f.chmod(0o755)
    return str(f)


@pytest.mark.slow
def test_ssh_launcher_starts_each_process_on_its_host_with_the_job_variables(cluster, tmp_path):
    h = cluster.hosts
    hostfile = _hostfile(tmp_path, [f"{h[1].ip}:{SSH_PORT}", f"root@{h[2].ip}:{SSH_PORT}"])
    run = _start(cluster, ["-n", "2", "-s", "2", "--launcher", "ssh", "-H", hostfile,
                           "--python", _fake_python(tmp_path), "--", PY, str(HERE / "launch_probe.py"),
                           "arg with space"])
    rc = _finish(cluster, run, 60)
    assert rc == 0, run.out + cluster.logs()
    sched = run.probe("scheduler")
    root, port = sched["env"]["DMLC_PS_ROOT_URI"], sched["env"]["DMLC_PS_ROOT_PORT"]
    assert root == h[0].ip and h[0].ip in sched["ips"], sched  # no --host-ip: the route towards host 1
    placement = {"server 0": 1, "server 1": 2, "worker 0": 1, "worker 1": 2}  # round-robin over the hostfile
    for who, host in placement.items():
        pr = run.probe(who)
        role, rank = who.split()
        assert pr["ips"] == ["127.0.0.1", h[host].ip], (who, pr)
        assert pr["env"] == {"DMLC_ROLE": role, "DMLC_PS_ROOT_URI": root, "DMLC_PS_ROOT_PORT": port,
                             "DMLC_NUM_SERVER": "2", "DMLC_NUM_WORKER": "2", "DMLC_INTERFACE": None,
                             "KVFRAME_RANK": rank, "KVFRAME_RANK_FROM_MPI": None, "OMPI_COMM_WORLD_RANK": None,
                             "KVFRAME_TEST_TOKEN": run.token, "PYTHONUNBUFFERED": "1"}, (who, pr)
        assert pr["cwd"] == str(HERE)
        assert pr["argv"] == (["-m", "kvframe_dist", "--role", "server"] if role == "server" else ["arg with space"])


def _ssh_clients(token: str) -> dict[str, int]:
    """The launcher's local ssh processes of this job: {"worker 0": pid, ...}."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not d.name.isdigit() or not argv or os.path.basename(argv[0]) != b"ssh":
            continue
        remote = argv[-2].decode(errors="replace") if len(argv) > 1 else ""
        if token in remote:
            role = "worker" if "DMLC_ROLE=worker" in remote else "server"
            rank = remote.split("KVFRAME_RANK=")[1].split()[0]
            found[f"{role} {rank}"] = int(d.name)
    return found


@pytest.mark.slow
def test_remote_processes_die_with_their_ssh_and_with_the_launcher(cluster, tmp_path):
    h = cluster.hosts
    hostfile = _hostfile(tmp_path, [h[1].ip, h[2].ip])
    names = ["server 0", "server 1", "worker 0", "worker 1"]
    args = ["-n", "2", "-s", "2", "--launcher", "ssh", "-H", hostfile, "--ssh-option", f"Port={SSH_PORT}",
            "--interface", "eth0", "--grace", "1", "--python", _fake_python(tmp_path), "--",
            PY, str(HERE / "launch_probe.py")]

    # 1. one ssh killed: its remote process goes; the launcher then stops the rest (remote ones through ssh)
    run = _start(cluster, args, {"KVFRAME_TEST_HOLD": "1"})
    try:
        run.wait_for(lambda: all(run.of(n, "PROBE") for n in ["scheduler", *names]), 30)
        remote = {n: run.probe(n)["pid"] for n in names}
        assert all(run.probe(n)["env"]["DMLC_INTERFACE"] == "eth0" for n in names)
        ssh = _ssh_clients(run.token)
        assert sorted(ssh) == names, ssh
        os.kill(ssh["worker 0"], signal.SIGKILL)
        assert _wait_gone([remote["worker 0"]], 5) == [], "worker 0 outlived its ssh"
    except BaseException:
        _abort(run)
        raise
    rc = _finish(cluster, run, 30)
    assert rc == 137 and "[kvframe-launch] worker 0 exited with status 137" in run.out, run.out
    assert _wait_gone(list(remote.values()), 1) == []

    # 2. the launcher killed outright: its ssh clients see their stdin close, and the remote side stops
    run = _start(cluster, args, {"KVFRAME_TEST_HOLD": "1"})
    try:
        run.wait_for(lambda: all(run.of(n, "PROBE") for n in names), 30)
        remote = {n: run.probe(n)["pid"] for n in names}
        run.popen.kill()
        assert _wait_gone(list(remote.values()), 8) == [], "remote processes outlived the launcher"
    finally:
        _abort(run)  # also the local scheduler: a launcher killed outright cannot stop its own children


def _check_sums(run: Run, placement: dict) -> None:
    n, big = 2, 1500
    for who, host in placement.items():
        got = run.of(who, "RESULT")
        assert len(got) == 1, (who, run.out)
        res = json.loads(got[0])
        assert res["rank"] == int(who.split()[1]) and res["num_workers"] == n, res
        assert res["ips"] == [f"{host}/24"], res
        assert res["small"] == [3.0] * 5, res                       # 1 + 2
        assert res["big_head"] == [0.0, 3.0, 6.0], res               # arange * (1 + 2)
        assert res["big_sum"] == 3.0 * big * (big - 1) / 2, res


@pytest.mark.slow
def test_ssh_job_sums_across_hosts(cluster, tmp_path):
    """The whole job over ssh: scheduler on host 0, a server and a worker on each of hosts 1 and 2;
    only the launcher's variables tell the roles where they are."""
    h = cluster.hosts
    run = _start(cluster, ["-n", "2", "-s", "2", "--launcher", "ssh", "-H", _hostfile(tmp_path, [h[1].ip, h[2].ip]),
                           "--ssh-option", f"Port={SSH_PORT}", "--", PY, str(HERE / "launch_worker.py")],
                 {"KVFRAME_BIGARRAY_BOUND": "1000"})
    rc = _finish(cluster, run, 90)
    assert rc == 0, run.out + cluster.logs()
    _check_sums(run, {"worker 0": h[1].ip, "worker 1": h[2].ip})


# -- mpi -------------------------------------------------------------------------------------------------

def _mpi_unavailable() -> str | None:
    if shutil.which("mpirun") is None:
        return "no mpirun (apt-get install openmpi-bin)"
    out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
    return None if "Open MPI" in out else f"mpirun is not Open MPI: {out.strip()[:80]}"


@pytest.fixture
def mpi(cluster):
    reason = _mpi_unavailable()
    if reason:
        pytest.skip(reason)
    return cluster



@pytest.mark.slow
def test_mpi_launcher_starts_each_rank_on_its_host(mpi, tmp_path):
    h = mpi.hosts
    hostfile = _hostfile(tmp_path, [f"{h[1].ip} slots=1", f"{h[2].ip} slots=1"])
    run = _start(mpi, ["-n", "2", "-s", "2", "--launcher", "mpi", "-H", hostfile, "--ssh-option", f"Port={SSH_PORT}",
                       "--python", _fake_python(tmp_path), "--", PY, str(HERE / "launch_probe.py")])
    rc = _finish(mpi, run, 60)
    assert rc == 0, run.out + mpi.logs()
    root = run.probe("scheduler")["env"]["DMLC_PS_ROOT_URI"]
    assert root == h[0].ip
    for who, host in {"server 0": 1, "server 1": 2, "worker 0": 1, "worker 1": 2}.items():
        pr = run.probe(who)
        role, rank = who.split()
        assert h[host].ip in pr["ips"], (who, pr)
        env = pr["env"]
        assert (env["DMLC_ROLE"], env["DMLC_PS_ROOT_URI"], env["OMPI_COMM_WORLD_RANK"], env["KVFRAME_RANK_FROM_MPI"],
                env["KVFRAME_TEST_TOKEN"]) == (role, root, rank, "1", run.token), (who, pr)


@pytest.mark.slow
def test_mpi_job_sums_across_hosts(mpi, tmp_path):
    h = mpi.hosts
    hostfile = _hostfile(tmp_path, [f"{h[1].ip} slots=1", f"{h[2].ip} slots=1"])
    run = _start(mpi, ["-n", "2", "-s", "2", "--launcher", "mpi", "-H", hostfile, "--ssh-option", f"Port={SSH_PORT}",
                       "--", PY, str(HERE / "launch_worker.py")], {"KVFRAME_BIGARRAY_BOUND": "1000"})
    rc = _finish(mpi, run, 90)
    assert rc == 0, run.out + mpi.logs()
    _check_sums(run, {"worker 0": h[1].ip, "worker 1": h[2].ip})


@pytest.mark.slow
def test_mpi_ranks_stop_with_their_mpirun(mpi, tmp_path):
    h = mpi.hosts
    hostfile = _hostfile(tmp_path, [f"{h[1].ip} slots=1", f"{h[2].ip} slots=1"])
    run = _start(mpi, ["-n", "2", "-s", "2", "--launcher", "mpi", "-H", hostfile, "--ssh-option", f"Port={SSH_PORT}",
                       "--grace", "1", "--python", _fake_python(tmp_path), "--", PY, str(HERE / "launch_probe.py")],
                 {"KVFRAME_TEST_HOLD": "1"})
    names = ["server 0", "server 1", "worker 0", "worker 1"]
    try:
        run.wait_for(lambda: all(run.of(n, "PROBE") for n in names), 30)
        remote = {n: run.probe(n)["pid"] for n in names}
        mpirun = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _argv(d)[:1] == [b"mpirun"]
                  and b"DMLC_ROLE=worker" in _argv(d) and run.token.encode() in _environ(d)]
        assert len(mpirun) == 1, mpirun
        os.kill(mpirun[0], signal.SIGKILL)          # its orteds lose their lifeline and stop their ranks
        assert _wait_gone([remote["worker 0"], remote["worker 1"]], 10) == [], "ranks outlived their mpirun"
    except BaseException:
        _abort(run)
        raise
    rc = _finish(mpi, run, 30)
    assert rc == 137 and "[kvframe-launch] workers exited with status 137" in run.out, run.out
    assert _wait_gone(list(remote.values()), 1) == []   # the servers' mpirun stopped by the launcher


def _argv(d: Path) -> list[bytes]:
    try:
        return (d / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _environ(d: Path) -> bytes:
    try:
        return (d / "environ").read_bytes()
    except OSError:
        return b""
