"""Which address a node advertises to the scheduler, found as ps-lite does; and the state of the
link that holds it.  Pure functions over the standard library (Linux ioctls, ``/sys``, ``/proc``).

The rule (:func:`advertise_host`):

1. an interface named by ``DMLC_INTERFACE`` / ``KVFRAME_INTERFACE`` -> that interface's IPv4 address;
2. else a scheduler on loopback -> ``127.0.0.1`` (a single-host job);
3. else the local address of the route to the scheduler (the interface the kernel would use);

and a loopback address is never advertised to a scheduler that is not on loopback: other hosts
could not reach it (``ValueError`` naming the variables to set).

When a node loses contact, :func:`link_state` / :func:`describe_link` tell whether this host's
own link is down (``"this host's link eth0 (10.0.0.5) is down"``) rather than blaming the peer.
"""

from __future__ import annotations

import array
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping

__all__ = ["is_loopback", "interface_address", "interface_addresses", "route_address", "advertise_host",
           "interface_from_env", "interface_of", "link_state", "describe_link"]

_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_SIOCGIFCONF = 0x8912
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFNAMSIZ = 16
_IFREQ = 40  # sizeof(struct ifreq) on 64-bit Linux (name + a 24-byte union)
_HINT = "set DMLC_INTERFACE (or KVFRAME_INTERFACE) to the interface to use, or DMLC_NODE_HOST to the address"


def _strip(host: str) -> str:
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _ip_loopback(text: str) -> bool | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1, ::ffff:127.x) or 'localhost', or a
    name that resolves to loopback addresses only (e.g. a hostname mapped to 127.0.1.1).  A name
    that does not resolve is not loopback."""
    host = _strip(host)
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost") or host.lower().endswith(".localhost"):
        return True
    literal = _ip_loopback(host)
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(_ip_loopback(str(info[4][0])) for info in infos)


def _ifreq(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= _IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise ValueError(f"{name!r} is not a valid interface name")
    return struct.pack(f"{_IFNAMSIZ}s{_IFREQ - _IFNAMSIZ}x", raw)


def _ioctl(name: str, request: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, _ifreq(name))


def interface_addresses() -> list[tuple[str, str]]:
    """Every IPv4 address of this host (in this network namespace) as ``(interface, address)``,
    secondary ones included (SIOCGIFCONF; labels like ``eth0:1`` are reported as ``eth0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        size = 64 * _IFREQ
        while True:
            buf = array.array("B", bytes(size))
            addr, _ = buf.buffer_info()
            ifc = struct.pack("iL", size, addr)  # struct ifconf {int len; char *buf}
            length = struct.unpack("iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF, ifc))[0]
            if length < size:  # a full buffer may have been cut short: grow and ask again
                break
            size *= 2
    raw = buf.tobytes()
    out = []
    for off in range(0, length, _IFREQ):
        label = raw[off:off + _IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
        out.append((label.split(":", 1)[0], socket.inet_ntoa(raw[off + 20:off + 24])))
    return out


def _available() -> str:
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:
        names = []
    try:
        addrs = interface_addresses()
    except OSError:
        addrs = []
    parts = []
    for n in names:
        mine = [a for i, a in addrs if i == n]
        parts.append(f"{n} ({', '.join(mine)})" if mine else f"{n} (no IPv4 address)")
    return ", ".join(parts) or "none found"


def interface_address(name: str) -> str:
    """The IPv4 address of interface ``name`` (its primary one, SIOCGIFADDR).  ``ValueError`` naming
    the interface and listing this host's interfaces when it does not exist or has no IPv4 address."""
    try:
        data = _ioctl(name, _SIOCGIFADDR)
    except ValueError as exc:
        raise ValueError(f"{exc}; this host's interfaces: {_available()}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            why = f"interface {name!r} has no IPv4 address"
        elif exc.errno == errno.ENODEV:
            why = f"this host has no interface {name!r}"
        else:
            why = f"cannot read the address of interface {name!r}: {exc.strerror}"
        raise ValueError(f"{why}; this host's interfaces: {_available()}") from None
    return socket.inet_ntoa(data[20:24])


def route_address(host: str, port: int) -> str:
    """The local address this host would use to reach ``host:port``: a UDP socket is connected
    (which only picks a route; no packet is sent) and its own address read back.  ``OSError`` when
    there is no route (e.g. the link is down) or ``host`` does not resolve."""
    host = _strip(host)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve the scheduler's host {host!r}: {exc.strerror}") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first, as ps-lite
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(sockaddr)
                return s.getsockname()[0].split("%", 1)[0]
        except OSError as exc:
            last = exc
    raise OSError(getattr(last, "errno", None),
                  f"no route from this host to {host}:{port}: {getattr(last, 'strerror', last)}")


def interface_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The interface to advertise named by the environment: ``KVFRAME_INTERFACE``, else MXNet's
    ``DMLC_INTERFACE``; None when neither is set (or empty)."""
    environ = os.environ if environ is None else environ
    return environ.get("KVFRAME_INTERFACE") or environ.get("DMLC_INTERFACE") or None


def advertise_host(scheduler_host: str, scheduler_port: int, interface: str | None = None) -> str:
    """The address a node should advertise to the scheduler at ``scheduler_host:scheduler_port``
    (see the module's rule).  ``ValueError`` if the interface is unusable, or if the result would be
    a loopback address while the scheduler is not on loopback; ``OSError`` if there is no route."""
    sched_lo = is_loopback(scheduler_host)
    if interface:
        addr = interface_address(interface)
        how = f"interface {interface} (DMLC_INTERFACE / KVFRAME_INTERFACE)"
    elif sched_lo:
        return "127.0.0.1"
    else:
        addr = route_address(scheduler_host, scheduler_port)
        how = "the route to the scheduler"
    if is_loopback(addr) and not sched_lo:
        raise ValueError(f"this node would advertise the loopback address {addr} (from {how}) to the scheduler at "
                         f"{scheduler_host}:{scheduler_port}, which other hosts cannot reach; {_HINT} "
                         f"(this host's interfaces: {_available()})")
    return addr


def interface_of(address: str) -> str | None:
    """The name of this host's interface that holds ``address`` (IPv4 or IPv6), or None."""
    address = _strip(address).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        try:
            pairs = interface_addresses()
        except OSError:
            pairs = []
        for name, addr in pairs:
            if addr == str(ip):
                return name
        return None
    try:  # IPv6: /proc/net/if_inet6 lines are "<32 hex digits> ifindex plen scope flags name"
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 6 and ipaddress.IPv6Address(bytes.fromhex(parts[0])) == ip:
                    return parts[5]
    except (OSError, ValueError):
        pass
    return None


def _sys_state(name: str) -> tuple[str | None, str | None]:
    """``(operstate, carrier)`` from /sys/class/net, or Nones when /sys is not this namespace's."""
    base = f"/sys/class/net/{name}"
    try:
        with open(f"{base}/ifindex") as f:
            if int(f.read()) != socket.if_nametoindex(name):
                return None, None  # /sys mounted for another network namespace: not trustworthy
        with open(f"{base}/operstate") as f:
            oper = f.read().strip()
    except (OSError, ValueError):
        return None, None
    carrier: str | None
    try:
        with open(f"{base}/carrier") as f:
            carrier = f.read().strip()
    except OSError as exc:
        carrier = "0" if exc.errno == errno.EINVAL else None  # EINVAL: the interface is administratively down
    return oper, carrier


def link_state(address: str) -> str | None:
    """The state of the link holding ``address``: 'up', 'down' (administratively down, or no
    carrier: the cable or the far end of a veth is down), or None if no interface here holds it.
    Uses the interface flags (IFF_UP, IFF_RUNNING) and /sys/class/net/IF/{operstate,carrier}."""
    name = interface_of(address)
    if name is None:
        return None
    try:
        flags = struct.unpack_from("H", _ioctl(name, _SIOCGIFFLAGS), _IFNAMSIZ)[0]
    except (OSError, ValueError):
        flags = None
    oper, carrier = _sys_state(name)
    if flags is not None and (not flags & _IFF_UP or not flags & _IFF_RUNNING):
        return "down"
    if oper in ("down", "lowerlayerdown", "notpresent") or carrier == "0":
        return "down"
    if flags is None and oper is None:
        return None
    return "up"


def describe_link(address: str) -> str | None:
    """A sentence for an error message when this host's own link holding ``address`` is down
    (``"this host's link eth0 (10.0.0.5) is down"``); None when it is up or not found."""
    if link_state(address) != "down":
        return None
    return f"this host's link {interface_of(address)} ({_strip(address)}) is down"
