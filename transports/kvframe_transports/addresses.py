"""What the transports of this distribution share: ``tcp://HOST:PORT`` addresses, and frames as
flat byte views (any contiguous buffer: bytes, numpy arrays, memoryviews); and this host's network
addresses (:func:`is_loopback`, :func:`interface_address`, :func:`interface_addresses`,
:func:`route_address`), which the distributed stores' nodes and ``kvframe-launch`` use to choose
the address they announce."""

from __future__ import annotations

import array
import errno
import fcntl
import ipaddress
import re
import socket
import struct

import numpy as np

from kvframe.errors import TransportError
from kvframe.protocols import Frame

_ADDRESS = re.compile(r"^tcp://(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z]+)\]|(?P<host>[^:/\[\]\s]+)):(?P<port>\d{1,5})/?$")


def format_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    m = _ADDRESS.match(address) if isinstance(address, str) else None
    if m is None or not 0 < int(m["port"]) < 65536:
        raise TransportError(f"cannot use address {address!r}: expected tcp://HOST:PORT (IPv6 as tcp://[HOST]:PORT)")
    return m["v6"] or m["host"], int(m["port"])


def byte_view(frame: Frame, i: int) -> memoryview:
    """Frame ``i`` as a flat view of its bytes, without a copy."""
    if isinstance(frame, memoryview):
        mv = frame
    elif isinstance(frame, np.ndarray):
        mv = frame.data  # memoryview(frame), which numpy types as a buffer only on Python 3.12+
    else:
        mv = memoryview(frame)
    if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
        return mv
    if not mv.c_contiguous:
        raise TypeError(f"frame {i} is not a contiguous buffer")
    return mv.cast("B")


# -- this host's network addresses: is a host loopback, an interface's address, the route to a host -------
# (standard library only: Linux ioctls; used by kvframe_dist's nodes and by kvframe-launch)

_SIOCGIFADDR = 0x8915
_SIOCGIFCONF = 0x8912
_IFNAMSIZ = 16
_IFREQ = 40  # sizeof(struct ifreq) on 64-bit Linux (name + a 24-byte union)


def bare_host(host: str) -> str:
    """``host`` without blanks around it and without the brackets of ``[v6addr]``."""
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
    host = bare_host(host)
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


def interface_ioctl(name: str, request: int) -> bytes:
    """The ``struct ifreq`` that ioctl ``request`` (SIOCGIF...) returns for interface ``name``
    (its first 16 bytes are the name).  ``ValueError`` for a name no interface can have; ``OSError``
    from the kernel otherwise."""
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


def describe_interfaces() -> str:
    """This host's interfaces for an error message: ``lo (127.0.0.1), eth0 (10.0.0.5), ...``."""
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
        data = interface_ioctl(name, _SIOCGIFADDR)
    except ValueError as exc:
        raise ValueError(f"{exc}; this host's interfaces: {describe_interfaces()}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            why = f"interface {name!r} has no IPv4 address"
        elif exc.errno == errno.ENODEV:
            why = f"this host has no interface {name!r}"
        else:
            why = f"cannot read the address of interface {name!r}: {exc.strerror}"
        raise ValueError(f"{why}; this host's interfaces: {describe_interfaces()}") from None
    return socket.inet_ntoa(data[20:24])


def route_address(host: str, port: int) -> str:
    """The local address this host would use to reach ``host:port``: a UDP socket is connected
    (which only picks a route; no packet is sent) and its own address read back.  ``OSError`` when
    there is no route (e.g. the link is down) or ``host`` does not resolve."""
    host = bare_host(host)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve the host {host!r}: {exc.strerror}") from None
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
