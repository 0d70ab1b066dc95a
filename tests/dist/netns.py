"""Simulated hosts for tests and benchmarks: network namespaces on one bridge, each with its own
``eth0``, address and private ``/dev/shm``.

Layout (nothing is added to the root namespace, so its routing and links stay untouched)::

    switch namespace  <prefix>-sw : bridge br0, ports h0 .. h{n-1} (switch-side veth peers)
    host namespace    <prefix>-hI : lo (up), eth0 = veth to port hI, address subnet[I + 1]

Every host also has a "holder" process (a shell that ends with this process) that owns the host's
mount namespace, in which a fresh tmpfs is mounted on ``/dev/shm`` and ``/sys`` shows the host's
own interfaces.  Every process started with :meth:`Hosts.popen` joins the host's network and mount
namespaces (nsenter), so processes of one host share its ``/dev/shm`` and no two hosts can share
memory, as on real machines.

Names carry ``kvfnet-<pid>-<seq>`` so leftovers are identifiable; :func:`cleanup_stale` removes
those of processes that no longer run (each new :class:`Hosts` calls it), :meth:`Hosts.close` and
an ``atexit`` hook remove one's own.

    from netns import Hosts, netns_unavailable
    reason = netns_unavailable()          # None, or why simulated hosts cannot be made here
    with Hosts(3) as hosts:
        hosts[0].ip                       # '10.213.0.1'
        p = hosts.popen(1, [sys.executable, "-c", "..."], env={"DMLC_ROLE": "server"},
                        stdout=subprocess.PIPE)
        hosts.set_link(2, False)          # host 2's eth0 down (side="switch": the bridge port)
        hosts.shape(1, rate="100mbit")    # tc tbf both ways (delay/loss need sch_netem)
        hosts.shm_files(1)                # names in host 1's private /dev/shm now
        hosts.shm_created(1)              # every name ever created there (inotify), even if removed
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import weakref

PREFIX = "kvfnet"
_STRIP = ("DMLC_", "KVFRAME_", "MXNET_", "PS_")  # job settings the parent may carry; a host starts clean
_seq = 0
_seq_lock = threading.Lock()
_live: weakref.WeakSet = weakref.WeakSet()
_unavailable: list = []
_netem: dict = {}


class NetemUnavailable(RuntimeError):
    """Delay or loss asked for, but this kernel has no sch_netem."""


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=10)
    if check and r.returncode != 0:
        raise RuntimeError(f"tc -n {ns} {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def netns_unavailable() -> str | None:
    """Why simulated hosts cannot be built here (a pytest skip reason), or None if they can.
    Checks root, the tools, and that a namespace and a veth can really be made (once per process)."""
    if _unavailable:
        return _unavailable[0]
    reason = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespaces need root"
    else:
        missing = [t for t in ("ip", "nsenter", "unshare", "mount") if shutil.which(t) is None]
        if missing:
            reason = f"missing tools: {', '.join(missing)}"
    if reason is None:
        ns = f"{PREFIX}-{os.getpid()}-probe"
        try:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            reason = f"cannot create a network namespace with a veth: {exc}"
        finally:
            _ip("netns", "del", ns, check=False)
    _unavailable.append(reason)
    return reason


def netem_available() -> bool:
    """Whether tc's netem qdisc (delay, loss) works on this kernel (probed once, in a scratch namespace)."""
    if "ok" not in _netem:
        ns = f"{PREFIX}-{os.getpid()}-netem"
        try:
            _ip("netns", "add", ns)
            _netem["ok"] = _tc(ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                               check=False).returncode == 0
        except (RuntimeError, OSError, subprocess.SubprocessError):
            _netem["ok"] = False
        finally:
            _ip("netns", "del", ns, check=False)
    return _netem["ok"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Deletes the namespaces (and so their links and bridges) left by processes that are gone;
    returns their names."""
    r = _ip("netns", "list", check=False)
    gone = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-.+", name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_ns_pids(name)
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


def _kill_ns_pids(ns: str) -> None:
    # anything still inside (also grandchildren that left their process group) keeps the namespace alive
    r = _ip("netns", "pids", ns, check=False)
    for tok in r.stdout.split():
        try:
            os.kill(int(tok), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def _rate_bps(rate: str | int) -> int:
    if isinstance(rate, int):
        return rate
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(bit|bps)?\s*", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: use e.g. '1gbit', '100mbit', '500kbit'")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return int(bits * 8 if m.group(3) == "bps" else bits)  # tc: "bps" means bytes per second


class _Inotify:
    """A minimal inotify reader (ctypes): creations and moves into watched directories."""

    _IN_CREATE, _IN_MOVED_TO, _IN_NONBLOCK, _IN_CLOEXEC = 0x100, 0x80, 0o4000, 0o2000000

    def __init__(self):
        import ctypes
        import ctypes.util

        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")

    def watch(self, path: str) -> int:
        import ctypes

        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), self._IN_CREATE | self._IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path} failed")
        return wd

    def read(self) -> list[tuple[int, str]]:
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            off = 0
            while off + 16 <= len(buf):  # struct inotify_event: wd, mask, cookie, len, name[len]
                wd, _mask, _cookie, n = struct.unpack_from("iIII", buf, off)
                out.append((wd, buf[off + 16:off + 16 + n].split(b"\0", 1)[0].decode(errors="replace")))
                off += 16 + n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Host:
    """One simulated host: ``index``, ``ns`` (its network namespace), ``ip``, ``iface`` ('eth0'),
    ``name`` (hostname, with ``hostnames=True``), ``peer`` (the bridge-side veth, in the switch
    namespace) and ``holder`` (the Popen of the process owning its mounts)."""

    def __init__(self, index: int, ns: str, ip: str, peer: str):
        self.index, self.ns, self.ip, self.peer = index, ns, ip, peer
        self.iface = "eth0"
        self.name = f"kvf-host{index}"  # its hostname with Hosts(..., hostnames=True)
        self.holder: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"Host({self.index}, ns={self.ns!r}, ip={self.ip!r})"


class Hosts:
    """``n`` simulated hosts on one bridge; a context manager (``close()`` on exit).

    ``subnet``: an IPv4 network; host ``i`` gets its address ``i + 1`` (default 10.213.0.0/24,
    private and only inside these namespaces).

    ``hostnames``: each host also gets a UTS namespace with hostname ``kvf-host{i}`` (``Host.name``)
    and a private /etc/hosts, Debian style: its own name is 127.0.1.1, the other hosts' names their
    addresses.  Without it every host keeps this machine's hostname and /etc/hosts."""

    def __init__(self, n: int, subnet: str = "10.213.0.0/24", mtu: int = 1500, hostnames: bool = False):
        reason = netns_unavailable()
        if reason:
            raise RuntimeError(reason)
        net = ipaddress.ip_network(subnet)
        if not 1 <= n <= net.num_addresses - 3:
            raise ValueError(f"{n} hosts do not fit in {subnet}")
        global _seq
        with _seq_lock:
            _seq += 1
            seq = _seq
        cleanup_stale()
        self.prefix = f"{PREFIX}-{os.getpid()}-{seq}"
        self.switch = f"{self.prefix}-sw"
        self.subnet = net
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen] = []
        self._namespaces: list[str] = []
        self._closed = False
        self._hostnames = hostnames
        self._tmp: str | None = None
        self._inotify: _Inotify | None = None
        self._watched: dict[int, int] = {}  # inotify watch -> host
        self._created: dict[int, list] = {}
        self.shm_watch_error: str | None = None
        _live.add(self)
        try:
            self._build(n, net, mtu)
        except BaseException:
            self.close()
            raise

    # -- building --------------------------------------------------------------------------------

    def _addns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self, n: int, net: ipaddress.IPv4Network, mtu: int) -> None:
        self._addns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(n):
            h = Host(i, f"{self.prefix}-h{i}", str(net[i + 1]), f"h{i}")
            self._addns(h.ns)
            # both ends are created straight inside their namespaces: no name ever appears in the root one
            _ip("link", "add", "eth0", "netns", h.ns, "mtu", str(mtu), "type", "veth",
                "peer", "name", h.peer, "netns", self.switch, "mtu", str(mtu))
            _ip("-n", self.switch, "link", "set", h.peer, "master", "br0", "up")
            _ip("-n", h.ns, "addr", "add", f"{h.ip}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            self.hosts.append(h)
        if self._hostnames:
            self._tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        for h in self.hosts:
            self._start_holder(h)
        try:
            self._inotify = _Inotify()
            for h in self.hosts:
                self._watched[self._inotify.watch(f"/proc/{h.holder.pid}/root/dev/shm")] = h.index
        except OSError as exc:
            self.shm_watch_error = f"cannot watch the hosts' /dev/shm: {exc}"

    def _start_holder(self, h: Host) -> None:
        # ip netns exec gives a mount namespace whose /sys shows the host's links; on top of it a
        # private tmpfs on /dev/shm.  The holder keeps that mount namespace alive for nsenter.
        script = "mount -t tmpfs -o mode=1777,size=50% kvfshm /dev/shm && "
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if self._hostnames:
            hosts_file = os.path.join(self._tmp, f"hosts{h.index}")
            with open(hosts_file, "w") as f:
                f.write("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
                f.writelines(f"{'127.0.1.1' if o is h else o.ip} {o.name}\n" for o in self.hosts)
            script += f"mount --bind {hosts_file} /etc/hosts && hostname {h.name} && "
            unshare.append("--uts")
        # ready once set up; then it lives only as long as this process, so a killed test run leaves
        # no mounts behind (cleanup_stale removes its namespaces later)
        script += f"echo ready && while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done"
        h.holder = subprocess.Popen(
            ["ip", "netns", "exec", h.ns, *unshare, "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._procs.append(h.holder)
        ready, _, _ = select.select([h.holder.stdout], [], [], 10)
        if ready and h.holder.stdout.readline().strip() == b"ready":
            return
        h.holder.kill()
        err = h.holder.stderr.read().decode(errors="replace").strip() if h.holder.wait(5) is not None else ""
        raise RuntimeError(f"host {h.index}: setting up its private /dev/shm failed or took over 10 s: {err}")

    # -- access ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def ips(self) -> list[str]:
        return [h.ip for h in self.hosts]

    def prefix_argv(self, i: int, cwd: str | None = None) -> list[str]:
        """The command prefix that runs a program inside host ``i`` (its network, mounts and /dev/shm)."""
        h = self.hosts[i]
        if h.holder is None or h.holder.poll() is not None:
            raise RuntimeError(f"host {i} has no running holder (closed?)")
        uts = ["--uts"] if self._hostnames else []
        return ["nsenter", f"--target={h.holder.pid}", "--net", "--mount", *uts, f"--wd={cwd or os.getcwd()}", "--"]

    def env(self, env: dict | None = None, clean: bool = True) -> dict:
        """The environment a host's process gets: this one's, less DMLC_*/KVFRAME_*/MXNET_*/PS_* when
        ``clean`` (a real host does not inherit the test's job settings), plus ``env``."""
        base = {k: v for k, v in os.environ.items() if not (clean and k.startswith(_STRIP))}
        base.update({k: str(v) for k, v in (env or {}).items()})
        return base

    def popen(self, i: int, argv: list[str], env: dict | None = None, *, clean: bool = True,
              cwd: str | None = None, **kw) -> subprocess.Popen:
        """Starts ``argv`` on host ``i`` (own process group; :meth:`close` kills it).  ``env`` is added
        to :meth:`env`'s base; other keywords go to ``subprocess.Popen`` (stdout=..., text=...)."""
        if self._closed:
            raise RuntimeError("these hosts are closed")
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen([*self.prefix_argv(i, cwd), *argv], env=self.env(env, clean), cwd=cwd,
                             start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def run(self, i: int, argv: list[str], env: dict | None = None, timeout: float = 30,
            **kw) -> subprocess.CompletedProcess:
        """Runs ``argv`` on host ``i`` to completion (output captured, text); kills it after ``timeout``."""
        p = self.popen(i, argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(p)
            out, err = p.communicate()
            raise RuntimeError(f"host {i}: {argv} ran past {timeout} s; stderr: {err}") from None
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def shm_files(self, i: int) -> list[str]:
        """The names in host ``i``'s private /dev/shm (directories included), seen from outside."""
        h = self.hosts[i]
        out = []
        for root, dirs, files in os.walk(f"/proc/{h.holder.pid}/root/dev/shm"):
            rel = os.path.relpath(root, f"/proc/{h.holder.pid}/root/dev/shm")
            out += [os.path.normpath(os.path.join(rel, n)) for n in dirs + files]
        return sorted(out)

    def shm_created(self, i: int) -> list[str]:
        """Every name ever created (or moved) at the top of host ``i``'s /dev/shm since these hosts
        were built, in order, even if already removed again: an inotify watch sees what sampling
        :meth:`shm_files` could miss.  [] where inotify is unavailable (see ``shm_watch_error``)."""
        if self._inotify is not None:
            for wd, name in self._inotify.read():
                self._created.setdefault(self._watched.get(wd), []).append(name)
        return list(self._created.get(i, []))

    # -- the network -----------------------------------------------------------------------------

    def set_link(self, i: int, up: bool, side: str = "host") -> None:
        """Takes host ``i``'s link down or up: side 'host' sets its eth0 (as ``ip link set eth0 down``
        on the host), 'switch' the bridge-side peer (a pulled cable: eth0 stays up, loses carrier)."""
        h = self.hosts[i]
        state = "up" if up else "down"
        if side == "host":
            _ip("-n", h.ns, "link", "set", "eth0", state)  # the subnet route comes back with the link
        elif side == "switch":
            _ip("-n", self.switch, "link", "set", h.peer, state)
        else:
            raise ValueError(f"side must be 'host' or 'switch', not {side!r}")

    def shape(self, i: int, rate: str | int | None = "1gbit", delay: str | None = None, loss: str | None = None,
              both_ways: bool = True) -> None:
        """Limits host ``i``'s traffic with tc: ``rate`` (tbf, e.g. '1gbit'), ``delay`` ('5ms') and
        ``loss`` ('1%') through netem (raises :class:`NetemUnavailable` without sch_netem).
        ``both_ways``: also what the host receives (shaped on the bridge-side peer)."""
        if (delay or loss) and not netem_available():
            raise NetemUnavailable("tc netem (sch_netem) is not available on this kernel: no delay/loss")
        h = self.hosts[i]
        targets = [(h.ns, "eth0")] + ([(self.switch, h.peer)] if both_ways else [])
        for ns, dev in targets:
            _tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
            parent = ["root"]
            if delay or loss:
                args = (["delay", delay] if delay else []) + (["loss", loss] if loss else [])
                _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", *args)
                parent = ["parent", "1:1"]
            if rate is not None:
                bps = _rate_bps(rate)
                # burst: 10 ms worth, but at least a few 64 KiB GSO segments, else tbf drops them
                burst = max(bps // 8 // 100, 4 * 65536)
                _tc(ns, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "tbf", "rate", str(bps),
                    "burst", str(burst), "latency", "100ms")

    def unshape(self, i: int) -> None:
        """Removes :meth:`shape`'s qdiscs from host ``i`` (both ways)."""
        h = self.hosts[i]
        _tc(h.ns, "qdisc", "del", "dev", "eth0", "root", check=False)
        _tc(self.switch, "qdisc", "del", "dev", h.peer, "root", check=False)

    def check_tcp(self, i: int, j: int, port: int = 40123, timeout: float = 10) -> bool:
        """A tiny TCP echo from host ``i`` to host ``j``'s address (no ping needed): True if it echoes."""
        server = textwrap.dedent(f"""
            import socket, sys
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(({self.hosts[j].ip!r}, {port})); s.listen(1); s.settimeout({timeout})
            print("ready", flush=True)
            c, _ = s.accept(); c.sendall(c.recv(64))
        """)
        client = textwrap.dedent(f"""
            import socket
            c = socket.create_connection(({self.hosts[j].ip!r}, {port}), timeout={timeout})
            c.sendall(b"kvframe-echo"); print(c.recv(64) == b"kvframe-echo")
        """)
        srv = self.popen(j, [sys.executable, "-c", server], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
        try:
            if srv.stdout.readline().strip() != "ready":
                return False
            try:
                r = self.run(i, [sys.executable, "-c", client], timeout=timeout + 5)
            except RuntimeError:
                return False
            return r.returncode == 0 and r.stdout.strip() == "True"
        finally:
            self._kill(srv)

    # -- cleaning up -----------------------------------------------------------------------------

    @staticmethod
    def _kill(p: subprocess.Popen, grace: float = 2.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # also what the process left in its group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for f in (p.stdout, p.stderr):
            if f is not None and not f.closed:
                f.close()

    def close(self) -> None:
        """Kills every process started on these hosts and deletes their namespaces, links and bridge
        (idempotent; also run at exit)."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 2
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self._procs:
            self._kill(p, grace=0)
        if self._inotify is not None:
            self._inotify.close()
        for ns in reversed(self._namespaces):
            _kill_ns_pids(ns)
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        _live.discard(self)


@atexit.register
def _close_all() -> None:
    for hosts in list(_live):
        try:
            hosts.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
