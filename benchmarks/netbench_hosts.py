"""Simulated hosts for ``bench_dist.py --hosts``: the namespaces of tests/dist/netns.py, links shaped
with tc, random packet loss without netem, per-host TCP counters, and the link floor of a round.

Every host is a network namespace with its own ``eth0`` on one bridge (see tests/dist/netns.py);
traffic stays inside them and :meth:`Testbed.close` (also run at exit) removes every namespace and
process made here.

* Rate: ``tbf`` on the egress of the host's ``eth0`` (what it sends) and, unless ``egress_only``, on
  the bridge-side peer of its veth (what it receives): a full-duplex NIC of that rate.  The burst is
  1 ms worth (at least 256 KiB, four 64 KiB GSO segments), so a bucket full of tokens shortens a
  16 MiB transfer by under 4 % even at 10 Gbit/s (netns.shape's 10 ms burst would be 12.5 MB).
* Loss: this kernel may lack sch_netem (as here), so loss is a classic-BPF ``cls_bpf`` filter in
  direct-action mode on the *ingress* of both ends of the host's link (``ld rand`` < p * 2^32 ->
  TC_ACT_SHOT): a packet is lost on the wire, after the sender's stack let it go, as with netem on
  a real link.  With ``gso_max_segs 1`` on every host's ``eth0`` each dropped skb is one MSS-sized
  packet, not a 64 KiB GSO super-packet.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "dist"))

from netns import Hosts, netns_unavailable  # noqa: E402

__all__ = ["Testbed", "netns_unavailable", "rate_bps", "fmt_rate", "round_bytes", "link_floor", "Floor",
           "TCP_COUNTERS"]

SKF_AD_RANDOM = 0xFFFFF000 + 56  # classic BPF ancillary load: a random u32
TC_ACT_OK, TC_ACT_SHOT = 0, 2
# counters of /proc/net/snmp and /proc/net/netstat worth a look under loss
TCP_COUNTERS = ("RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPLossProbeRecovery", "TCPFastRetrans",
                "TCPSlowStartRetrans", "TCPSpuriousRTOs", "TCPDSACKRecv", "OutSegs")


def rate_bps(text: str | int) -> int:
    """'1gbit', '10gbit', '500mbit' -> bits per second."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)bit\s*", text.lower())
    if not m:
        raise ValueError(f"rate {text!r}: use e.g. 1gbit, 10gbit, 500mbit")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)])


def fmt_rate(bps: int) -> str:
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r


class Testbed:
    """``n`` simulated hosts (a context manager); host ``i`` is ``self.hosts[i]``."""

    def __init__(self, n: int):
        self.hosts = Hosts(n, hostnames=True)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.hosts.close()

    # both ends of host i's link: (namespace, device) of its eth0 and of the bridge port
    def _ends(self, i: int) -> tuple[tuple[str, str], tuple[str, str]]:
        h = self.hosts[i]
        return (h.ns, "eth0"), (self.hosts.switch, h.peer)

    def shape(self, i: int, rate: str | int, egress_only: bool = False) -> None:
        bps = rate_bps(rate)
        burst = max(bps // 8 // 1000, 4 * 65536)
        ends = self._ends(i)
        for ns, dev in ends[:1] if egress_only else ends:
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", str(bps), "burst",
                  str(burst), "latency", "50ms"])

    def unshape(self, i: int) -> None:
        for ns, dev in self._ends(i):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)

    def set_loss(self, i: int, fraction: float) -> None:
        """Drops ``fraction`` of the packets entering either end of host ``i``'s link, at random."""
        threshold = min(int(fraction * 2**32), 2**32 - 1)
        # A = random; if A >= threshold goto pass; else drop
        code = f"4,32 0 0 {SKF_AD_RANDOM},53 1 0 {threshold},6 0 0 {TC_ACT_SHOT},6 0 0 {TC_ACT_OK}"
        for ns, dev in self._ends(i):
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "clsact"])
            _run(["tc", "-n", ns, "filter", "replace", "dev", dev, "ingress", "pref", "1", "bpf", "da",
                  "bytecode", code])

    def clear_loss(self, i: int) -> None:
        for ns, dev in self._ends(i):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "clsact"], check=False)

    def loss_drops(self, i: int) -> int:
        """Packets the loss filters of host ``i`` dropped so far (tc's counters)."""
        total = 0
        for ns, dev in self._ends(i):
            out = _run(["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev], check=False).stdout
            for block in out.split("qdisc ")[1:]:
                if block.startswith("clsact"):
                    m = re.search(r"dropped (\d+)", block)
                    total += int(m.group(1)) if m else 0
        return total

    def set_gso_segs(self, i: int, segs: int) -> None:
        """At most ``segs`` MSS per skb that host ``i`` sends (1: no GSO super-packets); sockets opened
        later pick it up."""
        _run(["ip", "-n", self.hosts[i].ns, "link", "set", "dev", "eth0", "gso_max_segs", str(segs)])

    def set_rto_min(self, i: int, ms: float) -> None:
        """The minimum RTO of every TCP connection of host ``i`` on the hosts' subnet (the route's
        ``rto_min``: what the socket option TCP_RTO_MIN_US, Linux >= 6.15, sets per connection)."""
        h = self.hosts[i]
        _run(["ip", "-n", h.ns, "route", "replace", str(self.hosts.subnet), "dev", "eth0", "proto", "kernel",
              "scope", "link", "src", h.ip, "rto_min", f"{ms:g}ms"])

    def tcp_counters(self, i: int) -> dict[str, int]:
        """TCP counters of host ``i``'s network namespace (/proc/net/snmp and netstat)."""
        r = self.hosts.run(i, ["cat", "/proc/net/snmp", "/proc/net/netstat"], timeout=10)
        got: dict[str, int] = {}
        lines = r.stdout.splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            names, nums = head.split()[1:], vals.split()[1:]
            if head.split(":")[0] in ("Tcp", "TcpExt"):
                for k, v in zip(names, nums):
                    if k in TCP_COUNTERS:
                        got[k] = int(v)
        return got


# -- the link floor ----------------------------------------------------------------------------------

def round_bytes(size: int, nkeys: int, servers: int, bound: int = 1_000_000, itemsize: int = 4) -> list[int]:
    """Bytes one worker pushes to (and pulls from) each server per round: keys of at least ``bound``
    elements split into ``servers`` contiguous ranges, smaller keys whole on server (key * 9973) % S
    (MXNet's rule, which kvframe follows)."""
    per = [0] * servers
    for k in range(nkeys):
        if size >= bound:
            for s, part in enumerate(np.array_split(np.arange(size), servers)):
                per[s] += part.size * itemsize
        else:
            per[(k * 9973) % servers] += size * itemsize
    return per


@dataclass
class Floor:
    seconds: float  # busiest shaped link direction: its bytes / rate
    where: str  # which one, and its bytes
    two_phase: float  # the push phase's busiest direction, then the pull phase's (no overlap)
    formula: str


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def link_floor(size: int, nkeys: int, servers: int, workers: int, bps: int, egress_only: bool = False) -> Floor:
    """The link floor of one push+pull round: every link direction that tc shapes carries its bytes
    at ``bps``; directions are independent (full duplex), so the floor is the busiest one."""
    per = round_bytes(size, nkeys, servers)
    push = {"worker out (push)": sum(per)}  # every worker sends its pushes
    pull = {f"server {s} out (pull replies)": workers * b for s, b in enumerate(per)}
    if not egress_only:  # the receiving side of each link is shaped too
        push.update({f"server {s} in (pushes)": workers * b for s, b in enumerate(per)})
        pull["worker in (pull replies)"] = sum(per)
    dirs = {**push, **pull}
    top = max(dirs.values())
    where = " = ".join(k for k, v in dirs.items() if v == top)
    rate = bps / 8
    terms = " + ".join(f"{_mib(b)}" for b in per)
    formula = (f"per worker and round: pushes {terms} (one per server), pull replies the same; busiest shaped "
               f"direction: {where} = {_mib(top)}; floor = {_mib(top)} / {fmt_rate(bps)}")
    return Floor(top / rate, f"{where}: {_mib(top)}", max(push.values()) / rate + max(pull.values()) / rate,
                 formula)
