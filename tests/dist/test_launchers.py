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
import re
import shutil
import signal
import stat
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
from dist_helpers import _leftovers, run_job
from kvframe_launch import launch

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
    # the secret comes on stdin, as the first line; the command line has its name only
    assert remote.startswith(f"IFS= read -r KVFRAME_SECRET || exit 1; export KVFRAME_SECRET; cd {os.getcwd()} && env ")
    for part in ("DMLC_ROLE=worker", "KVFRAME_RANK=2", "DMLC_PS_ROOT_URI=10.0.0.1", "DMLC_PS_ROOT_PORT=9191",
                 "DMLC_NUM_WORKER=3", "DMLC_NUM_SERVER=1", "DMLC_INTERFACE=eth1", "KVFRAME_HEARTBEAT_TIMEOUT=7",
                 "MXNET_KVSTORE_BIGARRAY_BOUND=99", "PYTHONUNBUFFERED=1", "python train.py 'a b' &"):
        assert part in remote, (part, remote)
    for secret_or_local in ("s" * 32, "KVFRAME_SECRET=", "KVFRAME_SHM_DIR", "DMLC_NODE_HOST", "KVFRAME_SSH"):
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
    try:
        launcher.start()
        assert launcher.wait() == 0
    finally:
        launcher.close()
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
    secret = " s3cr3t with  spaces\\n "  # read -r with IFS=: the line exactly, backslashes and blanks kept
    cmd = launch.remote_command(str(tmp_path), {"V": "x y"},
                                ["sh", "-c", 'printf "%s %s [%s]\\n" "$V" "$(pwd)" "$KVFRAME_SECRET"; exit 7'])
    assert secret not in cmd and "KVFRAME_SECRET=" not in cmd
    p = subprocess.Popen([shell, "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        p.stdin.write(secret + "\n")                 # the launcher's first line: the job's secret
        p.stdin.flush()
        assert p.stdout.read() == f"x y {tmp_path} [{secret}]\n"
        assert p.wait(10) == 7                       # the command's status, with stdin still open
    finally:
        p.stdin.close()
    # no secret line (the launcher died before writing it): the command never starts
    p = subprocess.run([shell, "-c", cmd], input="", capture_output=True, text=True, timeout=10)
    assert (p.returncode, p.stdout) == (1, "")
    # a command held until its stdin, the ssh session, closes; it and its child ignore SIGHUP and SIGTERM,
    # so only the watcher's SIGKILL, 3 s after its SIGTERM, stops them
    cmd = launch.remote_command(str(tmp_path), {}, ["sh", "-c", "trap '' HUP TERM; sleep 60 & echo $$ $!; wait"])
    p = subprocess.Popen([shell, "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        p.stdin.write("secret\n")
        p.stdin.flush()
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


# -- local jobs: the secret, the launcher's death, the shared-memory directory, the summary --------------

def _launch_local(args: list[str], env: dict | None = None) -> Run:
    """kvframe-launch here in the background (cwd tests/dist), its output collected line by line; neither
    KVFRAME_SECRET nor KVFRAME_SHM_DIR comes from the test's environment unless ``env`` gives it."""
    token = f"kvframe-test-{uuid.uuid4().hex}"
    full = {k: v for k, v in os.environ.items() if k not in ("KVFRAME_SECRET", "KVFRAME_SHM_DIR")}
    full.update({"KVFRAME_TEST_TOKEN": token, "KVFRAME_HEARTBEAT_INTERVAL": "0.25", "KVFRAME_HEARTBEAT_TIMEOUT": "3",
                 "KVFRAME_TIMEOUT": "30", "KVFRAME_CONNECT_TIMEOUT": "30",
                 "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **(env or {})})
    p = subprocess.Popen([PY, "-m", "kvframe_launch", *args], env=full, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=str(HERE))
    return Run.follow(p, token)


HOLDER = [PY, str(HERE / "launch_holder.py")]


def _held(run: Run, n: int, timeout: float = 60) -> list[dict]:
    """The HELD lines of workers 0..n-1, once all have come."""
    run.wait_for(lambda: all(run.of(f"worker {r}", "HELD") for r in range(n)), timeout)
    return [json.loads(run.of(f"worker {r}", "HELD")[0]) for r in range(n)]


def _environ_of(pid: int) -> dict[str, str]:
    raw = _environ(Path(f"/proc/{pid}"))
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _argv_holding(needle: str) -> dict[int, list[bytes]]:
    """Every process on this machine (every namespace: they share /proc) whose command line contains
    ``needle``: what ps shows to every user."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            argv = _argv(d)
            if needle.encode() in b"\0".join(argv):
                found[int(d.name)] = argv
    return found


def _guards(launcher: int) -> list[int]:
    """The launcher's guard process (found while the launcher runs: it is the guard's parent)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and launch.GUARD_NAME.encode() in _argv(d):
            found.append(int(d.name))
    return found


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _end(run: Run, sig: int | None = None, timeout: float = 20) -> int:
    """The launcher's status once it ends (after ``sig``, if given), after checking that the job left no
    process behind."""
    if sig is not None and run.popen.poll() is None:
        run.popen.send_signal(sig)
    try:
        rc = run.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        _abort(run)
        raise AssertionError(f"kvframe-launch did not end within {timeout} s (signal {sig}):\n{run.out}") from None
    left = _wait_gone(_leftovers(run.token), 8)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}\n{run.out}"
    return rc


@pytest.mark.slow
def test_local_job_gets_a_fresh_secret_in_its_environment_and_never_on_a_command_line():
    assert launch.job_secret({}) != launch.job_secret({})                  # a new one per job
    assert launch.job_secret({"KVFRAME_SECRET": "given"}) == "given"       # or the user's
    run = _launch_local(["-n", "2", "-s", "1", "--", *HOLDER], {"KVFRAME_TEST_HOLD": "1", "KVFRAME_TEST_INTRUDE": "1"})
    try:
        held = _held(run, 2)
        secret = _environ_of(held[0]["pid"]).get("KVFRAME_SECRET", "")
        assert re.fullmatch(r"[0-9a-f]{64}", secret), (secret, run.out)
        for h in held:                               # the job ran, and every worker had the same secret
            assert h["sum"] == [2.0] * 4 and h["secret"] == _sha(secret), (h, run.out)
            # the scheduler refuses a connection made with another secret: the sessions are authenticated
            assert "refused the connection" in h["intruder"] and "authentication failed" in h["intruder"], h
        job = [pid for pid in _leftovers(run.token) if pid != run.popen.pid]
        roles = {_environ_of(pid).get("KVFRAME_ROLE") for pid in job}
        assert {"scheduler", "server", "worker"} <= roles, (roles, run.out)
        assert all(_environ_of(pid).get("KVFRAME_SECRET") == secret for pid in job
                   if _environ_of(pid).get("KVFRAME_ROLE")), run.out
        assert _argv_holding(secret) == {}, "the secret shows on a command line"
        assert "KVFRAME_SECRET" not in _environ_of(run.popen.pid)  # made by the launcher, not given
    except BaseException:
        _abort(run)
        raise
    assert _end(run, signal.SIGINT) == 130, run.out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name)
def test_local_job_dies_with_its_launcher_and_leaves_no_directory(sig):
    """Any end of the launcher stops every process of the job, a grandchild that ignores SIGTERM
    included, and removes the job's /dev/shm directory: a SIGKILL through PR_SET_PDEATHSIG and the
    guard, the others through the launcher itself."""
    env = {"KVFRAME_TEST_HOLD": "1", "KVFRAME_TEST_GRANDCHILD": "1"}
    if sig == signal.SIGHUP:
        env["KVFRAME_SECRET"] = "a secret given by the user"
    run = _launch_local(["-n", "2", "-s", "1", "--", *HOLDER], env)
    try:
        held = _held(run, 2)
        shm = held[0]["shm_dir"]
        m = launch.JOB_DIR.fullmatch(os.path.basename(shm))
        assert os.path.dirname(shm) == "/dev/shm" and m and int(m[1]) == run.popen.pid, shm
        st = os.lstat(shm)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert all(h["shm_dir"] == shm and h["sum"] == [2.0] * 4 for h in held), held
        if sig == signal.SIGHUP:
            assert all(h["secret"] == _sha(env["KVFRAME_SECRET"]) for h in held), held
        job = [pid for pid in _leftovers(run.token) if pid != run.popen.pid]
        guard = _guards(run.popen.pid)
        assert len(guard) == 1 and guard[0] in job, (guard, job)
        assert {h["grandchild"] for h in held} <= set(job)
        run.popen.send_signal(sig)
        rc = run.popen.wait(15)
        left = _wait_gone(job, 8)                   # the guard's SIGKILL comes 3 s after its SIGTERM
    except BaseException:
        _abort(run)
        raise
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind after {sig.name}: {left}\n{run.out}"
    assert not os.path.lexists(shm), f"{shm} outlived the job"
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:
        assert rc == 128 + sig and f"[kvframe-launch] got {sig.name}; stopping every process" in run.out, run.out
        assert run.lines[-1] == f"[kvframe-launch] job stopped by {sig.name}; exit status {128 + sig}", run.out


def _fake_job_dir(base: Path, pid: int, start: int, mode: int = 0o700, uid: int | None = None) -> Path:
    d = base / f"kvframe-job-{pid}-{start}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    (d / f"kvframe-{uuid.uuid4().hex}").write_bytes(b"ring")
    d.chmod(mode)
    if uid is not None:
        os.chown(d, uid, uid)
    return d


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_job_dirs_go_only_when_their_launcher_is_gone_and_they_are_ours(tmp_path):
    """remove_stale_job_dirs on a directory of its own (no other launcher can race it)."""
    me = os.getpid()
    start = launch._stat(me)[1]
    dead = _dead_pid()
    other = tmp_path / "elsewhere"
    other.mkdir(mode=0o700)
    (other / "keep").write_text("x")
    gone = [_fake_job_dir(tmp_path, dead, 123),           # its launcher died
            _fake_job_dir(tmp_path, me, start + 1)]       # a reused pid: that launcher started at another time
    kept = [_fake_job_dir(tmp_path, me, start),           # a live launcher's
            _fake_job_dir(tmp_path, dead, 123, mode=0o755)]  # not 0700: not one of ours
    if os.geteuid() == 0:
        kept.append(_fake_job_dir(tmp_path, dead, 123, uid=65534))  # another user's
    link = tmp_path / f"kvframe-job-{dead}-123-link"
    link.symlink_to(other)                                 # a link is never followed
    plain = tmp_path / f"kvframe-job-{dead}-123-file"
    plain.write_text("x")
    legacy = _fake_job_dir(tmp_path, 0, 0).rename(tmp_path / "kvframe-abc12345")  # no launcher pid: unknown
    removed = launch.remove_stale_job_dirs(str(tmp_path))
    assert sorted(removed) == sorted(str(d) for d in gone)
    assert not any(d.exists() for d in gone)
    assert all(d.is_dir() and len(list(d.iterdir())) == 1 for d in kept)
    assert link.is_symlink() and (other / "keep").exists() and plain.exists() and legacy.exists()


@pytest.mark.slow
def test_a_directory_outliving_a_killed_launcher_goes_with_the_next_launcher():
    """Launcher and guard both SIGKILLed: PR_SET_PDEATHSIG alone stops the children; the directory
    stays, and the next kvframe-launch removes it."""
    run = _launch_local(["-n", "1", "-s", "1", "--", *HOLDER], {"KVFRAME_TEST_HOLD": "1"})
    try:
        held = _held(run, 1)
        shm = held[0]["shm_dir"]
        job = [pid for pid in _leftovers(run.token) if pid != run.popen.pid]
        guard = _guards(run.popen.pid)
        assert len(guard) == 1, guard
        os.kill(guard[0], signal.SIGKILL)
        run.popen.kill()
        run.popen.wait(10)
        left = _wait_gone(job, 5)
    except BaseException:
        _abort(run)
        raise
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"children outlived their launcher: {left}\n{run.out}"
    assert os.path.isdir(shm)
    nxt = _launch_local(["-n", "1", "-s", "1", "--grace", "0.5", "--", "sh", "-c", "exit 3"])
    assert _end(nxt, timeout=40) == 3, nxt.out
    assert not os.path.lexists(shm), nxt.out
    # a launcher that started at the same time may have removed it first; else this one says so
    assert f"[kvframe-launch] removed {shm}, left by a launcher that no longer runs" in nxt.out or not any(
        "removed" in ln for ln in nxt.lines), nxt.out


def test_a_given_shm_dir_must_be_a_private_directory_of_this_user(tmp_path, monkeypatch):
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    wide = tmp_path / "wide"
    wide.mkdir()
    wide.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(good)
    plain = tmp_path / "plain"
    plain.write_text("x")
    bad = {str(wide): "has mode 0755, not 0700", str(link): "is a symbolic link", str(plain): "is not a directory",
           str(tmp_path / "missing"): "No such file"}
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        bad[str(theirs)] = "belongs to uid 65534, not to this user"
    for path, why in bad.items():
        monkeypatch.setenv("KVFRAME_SHM_DIR", path)
        with pytest.raises(SystemExit, match=re.escape(why)) as exc:
            launch.main(["-n", "1", "--", "true"])
        assert f"KVFRAME_SHM_DIR={path}" in str(exc.value)
    monkeypatch.delenv("KVFRAME_SHM_DIR")
    with pytest.raises(SystemExit, match="is a symbolic link"):           # --env is checked as well
        launch.main(["-n", "1", f"--env=KVFRAME_SHM_DIR={link}", "--", "true"])
    # the command, as a user runs it: a clear message, nothing started
    res = subprocess.run([PY, "-m", "kvframe_launch", "-n", "1", "--", "true"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "KVFRAME_SHM_DIR": str(wide)})
    assert res.returncode == 1 and res.stdout == "", res
    assert res.stderr.strip() == (f"kvframe-launch: refusing KVFRAME_SHM_DIR={wide}: it has mode 0755, not 0700; "
                                  "give a directory of this user with mode 0700 (mkdir -m 700 DIR), or unset "
                                  "KVFRAME_SHM_DIR and kvframe-launch makes one per job"), res.stderr


def test_transport_flags_and_version(tmp_path, capsys):
    def envs(*argv):
        return [p.env.get("KVFRAME_TRANSPORT") for p in launch.build(launch.parse_args([*argv, "--", "x"]))]

    assert envs("-n", "2", "-s", "1") == [None] * 4                  # the job's default (or its config's)
    assert envs("-n", "2", "-s", "1", "--transport", "zmq") == ["zmq"] * 4
    assert envs("-n", "1", "--no-shm") == ["tcp"] * 3                   # retired: means --transport tcp
    assert envs("-n", "1", "--ipc") == ["shm"] * 3                      # retired: means the default, shm
    assert envs("-n", "1", "--ipc", "--transport", "shm") == ["shm"] * 3
    hosts = tmp_path / "hosts"
    hosts.write_text("node1\n")
    ssh = launch.build(launch.parse_args(["-n", "1", "--launcher", "ssh", "-H", str(hosts), "--host-ip", "10.0.0.1",
                                          "--transport", "tcp", "--", "x"]))
    assert "KVFRAME_TRANSPORT=tcp" in ssh[1].argv[-1] and "KVFRAME_TRANSPORT=tcp" in ssh[2].argv[-1]
    mpi = launch.build(launch.parse_args(["-n", "1", "--launcher", "mpi", "-H", str(hosts), "--host-ip", "10.0.0.1",
                                          "--no-shm", "--", "x"]))
    assert all("KVFRAME_TRANSPORT=tcp" in p.argv for p in mpi[1:])
    for argv, why in ((["--ipc", "--transport", "tcp"], "--ipc means --transport shm"),
                      (["--no-shm", "--transport", "zmq"], "--no-shm means --transport tcp"),
                      (["--transport", "pigeon"], "--transport pigeon: no such transport plugin here; installed: "),
                      (["--env", "KVFRAME_SECRET=x"], "would put the secret on command lines")):
        with pytest.raises(SystemExit) as exc:
            launch.parse_args(["-n", "1", *argv, "--", "x"])
        assert exc.value.code == 2 and why in capsys.readouterr().err, argv
    res = subprocess.run([PY, "-m", "kvframe_launch", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and re.fullmatch(r"kvframe-launch \d+\.\d+\.\d+\S*\n", res.stdout), res
    res = subprocess.run([PY, "-m", "kvframe_launch", "--help"], capture_output=True, text=True, timeout=60)
    assert "--transport NAME" in res.stdout and "means --transport tcp" in res.stdout and "means --transport shm" \
        in res.stdout.replace("\n", " ").replace("  ", " ").replace("  ", " "), res.stdout


@pytest.mark.slow
def test_no_shm_runs_the_job_over_tcp_with_the_users_private_directory(tmp_path):
    given = tmp_path / "shm"
    given.mkdir(mode=0o700)
    run = _launch_local(["-n", "2", "-s", "1", "--no-shm", "--", *HOLDER], {"KVFRAME_SHM_DIR": str(given)})
    assert _end(run, timeout=60) == 0, run.out
    held = [json.loads(run.of(f"worker {r}", "HELD")[0]) for r in range(2)]
    assert all(h["transport"] == "tcp" and h["shm_dir"] == str(given) and h["sum"] == [2.0] * 4 for h in held), held
    assert given.is_dir()                              # the user's: not removed


@pytest.mark.slow
def test_a_stopped_worker_is_named_as_the_cause_and_killed(tmp_path):
    """Worker 1 stops itself (SIGSTOP) after the barrier: the scheduler declares it stopped, the
    others exit with status 1, and the launcher's summary blames worker 1, which gets SIGKILL."""
    job = run_job(tmp_path, """
        import signal
        kv.init(0, np.zeros(4, np.float32))
        kv.barrier()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        out = np.empty(4, np.float32)
        kv.pushpull(0, np.ones(4, np.float32), out=out)    # waits for worker 1's push: never comes
        print("NOT FAILED", flush=True)
    """, n=2, s=1, launcher_args=("--grace", "1"), timeout=60)
    last = job.out.splitlines()[-1]
    assert job.rc == 1, job.out
    assert re.fullmatch(r"\[kvframe-launch\] job failed, exit status 1: worker 1 went silent: the scheduler declared "
                        r"it stopped \(no heartbeat for [\d.]+ s .*\); its process was stopped \(SIGSTOP, or a "
                        r"debugger\) and got SIGKILL; the failure of (scheduler|server 0|worker 0) \(status 1\) "
                        r"and the others' followed from it", last), job.out
    assert "NOT FAILED" not in job.out and job.seconds < 30, job.out


def test_the_summary_blames_the_first_failure_or_a_stopped_process():
    procs = [launch.Proc(name, ["true"]) for name in ("scheduler", "worker 0", "worker 1")]
    la = launch.Launcher(procs, grace=1, guard=False)
    assert la.cause(("worker 0", 7)) == "worker 0 exited with status 7, the first to fail"
    procs[2].stopped = True                                # found stopped when the launcher stopped the job
    assert la.cause(("worker 0", 1)).startswith("worker 1 was stopped (SIGSTOP, or a debugger) and silent")
    la.declared = ("worker 0", "no heartbeat for 3.2 s")   # the silent one failed first itself: no one else blamed
    assert la.cause(("worker 0", 1)) == "worker 0 exited with status 1, the first to fail"


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

    @classmethod
    def follow(cls, popen: subprocess.Popen, token: str) -> Run:
        """A Run of ``popen`` whose output lines are collected as they come, on a thread."""
        run = cls(popen, token)

        def read():
            for line in popen.stdout:
                run.lines.append(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()
        return run

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
    p = cluster.hosts.popen(0, [PY, "-m", "kvframe_launch", *opts, *extra, *args], env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(HERE))
    return Run.follow(p, token)


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

    # 2. the launcher killed outright: its local children (the scheduler, the ssh clients) get a signal from
    # the kernel (PR_SET_PDEATHSIG), the ssh sessions close, and the remote side stops
    run = _start(cluster, args, {"KVFRAME_TEST_HOLD": "1"})
    try:
        run.wait_for(lambda: all(run.of(n, "PROBE") for n in ["scheduler", *names]), 30)
        remote = {n: run.probe(n)["pid"] for n in names}
        local = [run.probe("scheduler")["pid"], *_ssh_clients(run.token).values(), *_guards(run.popen.pid)]
        assert len(local) == 6, local
        run.popen.kill()
        assert _wait_gone(list(remote.values()), 8) == [], "remote processes outlived the launcher"
        assert _wait_gone(local, 5) == [], "local processes outlived the launcher"
    finally:
        _abort(run)


@pytest.mark.slow
def test_ssh_secret_goes_on_stdin_and_never_on_a_command_line(cluster, tmp_path):
    """A fresh secret reaches every process, remote ones through the first line of ssh's stdin; no command
    line on any host (ps) shows it; SIGTERM to the launcher then stops the job on every host."""
    h = cluster.hosts
    run = _start(cluster, ["-n", "2", "-s", "2", "--launcher", "ssh", "-H", _hostfile(tmp_path, [h[1].ip, h[2].ip]),
                           "--ssh-option", f"Port={SSH_PORT}", "--python", _fake_python(tmp_path), "--",
                           PY, str(HERE / "launch_probe.py")], {"KVFRAME_TEST_HOLD": "1"})
    names = ["scheduler", "server 0", "server 1", "worker 0", "worker 1"]
    try:
        run.wait_for(lambda: all(run.of(n, "PROBE") for n in names), 30)
        secret = _environ_of(run.probe("scheduler")["pid"]).get("KVFRAME_SECRET", "")
        assert re.fullmatch(r"[0-9a-f]{64}", secret), run.out
        assert all(run.probe(n)["secret"] == _sha(secret) for n in names), run.out
        remote = [run.probe(n)["pid"] for n in names[1:]]
        assert all(h[1].ip in run.probe(n)["ips"] or h[2].ip in run.probe(n)["ips"] for n in names[1:])
        assert _argv_holding(secret) == {}, "the secret shows on a command line"
        assert all("KVFRAME_SECRET" not in _environ_of(pid) for pid in _ssh_clients(run.token).values())
    except BaseException:
        _abort(run)
        raise
    run.popen.send_signal(signal.SIGTERM)
    rc = _finish(cluster, run, 20)
    assert rc == 143 and "[kvframe-launch] job stopped by SIGTERM; exit status 143" in run.out, run.out
    assert _wait_gone(remote, 1) == []


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


WORKERS_ONLY = str(HERE.parent / "launcher" / "workers_only_worker.py")  # RESULT {...}: variables, a rendezvous


def _check_workers_only(run: Run, rendezvous: str, mpi: bool = False) -> None:
    """Each worker of a ``-s 0`` job on its own host got the rendezvous host (worker 0's), its rank and
    the job's secret, and store 'nccl''s unique-id rendezvous across the hosts worked."""
    got = {who: json.loads(run.of(who, "RESULT")[0]) for who in ("worker 0", "worker 1") if run.of(who, "RESULT")}
    assert sorted(got) == ["worker 0", "worker 1"], run.out
    assert not any(ln.startswith(("[scheduler]", "[server", "[servers]")) for ln in run.lines), run.out
    port = got["worker 0"]["KVFRAME_ROOT_PORT"]
    for rank in (0, 1):
        r = got[f"worker {rank}"]
        assert (r["KVFRAME_ROLE"], r["KVFRAME_WORLD_SIZE"], r["KVFRAME_NUM_SERVERS"], r["KVFRAME_ROOT_URI"],
                r["KVFRAME_ROOT_PORT"], r["KVFRAME_TEST_TOKEN"]) == ("worker", "2", "0", rendezvous, port, run.token), r
        if mpi:
            assert (r["KVFRAME_RANK"], r["KVFRAME_LOCAL_RANK"], r["KVFRAME_RANK_FROM_MPI"],
                    r["OMPI_COMM_WORLD_RANK"]) == (None, None, "1", str(rank)), r
        else:
            assert (r["KVFRAME_RANK"], r["KVFRAME_LOCAL_RANK"]) == (str(rank), "0"), r  # one worker per host
        assert r["secret"] == got["worker 0"]["secret"] and r["secret"], r
        if "nccl" in r:
            assert r["nccl"] == [rank, 2, 0, "Open MPI" if mpi else "KVFRAME", rendezvous, int(port) + 1], r
            assert r["uid"] == got["worker 0"]["uid"], r


@pytest.mark.slow
def test_ssh_workers_only_job_meets_on_worker_0s_host(cluster, tmp_path):
    """-s 0: no scheduler here, a worker on each of hosts 1 and 2, the rendezvous on host 1 (worker 0's)."""
    h = cluster.hosts
    run = _start(cluster, ["-n", "2", "-s", "0", "--launcher", "ssh", "-H", _hostfile(tmp_path, [h[1].ip, h[2].ip]),
                           "--ssh-option", f"Port={SSH_PORT}", "--", PY, WORKERS_ONLY])
    rc = _finish(cluster, run, 60)
    assert rc == 0, run.out + cluster.logs()
    _check_workers_only(run, h[1].ip)


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
def test_mpi_workers_only_job_takes_its_ranks_from_mpi(mpi, tmp_path):
    h = mpi.hosts
    hostfile = _hostfile(tmp_path, [f"{h[1].ip} slots=1", f"{h[2].ip} slots=1"])
    run = _start(mpi, ["-n", "2", "-s", "0", "--launcher", "mpi", "-H", hostfile, "--ssh-option", f"Port={SSH_PORT}",
                       "--", PY, WORKERS_ONLY])
    rc = _finish(mpi, run, 60)
    assert rc == 0, run.out + mpi.logs()
    _check_workers_only(run, h[1].ip, mpi=True)


@pytest.mark.slow
def test_mpi_ranks_stop_with_their_mpirun(mpi, tmp_path):
    h = mpi.hosts
    hostfile = _hostfile(tmp_path, [f"{h[1].ip} slots=1", f"{h[2].ip} slots=1"])
    run = _start(mpi, ["-n", "2", "-s", "2", "--launcher", "mpi", "-H", hostfile, "--ssh-option", f"Port={SSH_PORT}",
                       "--grace", "1", "--python", _fake_python(tmp_path), "--", PY, str(HERE / "launch_probe.py")],
                 {"KVFRAME_TEST_HOLD": "1"})
    names = ["server 0", "server 1", "worker 0", "worker 1"]
    try:
        run.wait_for(lambda: all(run.of(n, "PROBE") for n in ["scheduler", *names]), 30)
        remote = {n: run.probe(n)["pid"] for n in names}
        # the secret: in every rank's environment (mpirun passes it by name), on no command line
        secret = _environ_of(run.probe("scheduler")["pid"]).get("KVFRAME_SECRET", "")
        assert re.fullmatch(r"[0-9a-f]{64}", secret), run.out
        assert all(run.probe(n)["secret"] == _sha(secret) for n in ["scheduler", *names]), run.out
        assert _argv_holding(secret) == {}, "the secret shows on a command line"
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

    # the launcher killed outright: both mpiruns get SIGTERM from the kernel and stop their ranks
    run = _start(mpi, ["-n", "2", "-s", "2", "--launcher", "mpi", "-H", hostfile, "--ssh-option", f"Port={SSH_PORT}",
                       "--python", _fake_python(tmp_path), "--", PY, str(HERE / "launch_probe.py")],
                 {"KVFRAME_TEST_HOLD": "1"})
    try:
        run.wait_for(lambda: all(run.of(n, "PROBE") for n in ["scheduler", *names]), 30)
        job = [pid for pid in _leftovers(run.token) if pid != run.popen.pid]  # mpiruns, orteds, ranks, scheduler
        assert {run.probe(n)["pid"] for n in ["scheduler", *names]} <= set(job), (job, run.out)
        run.popen.kill()
        assert _wait_gone(job, 10) == [], "processes outlived the launcher"
    finally:
        _abort(run)


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
