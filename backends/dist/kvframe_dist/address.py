"""Which address a node advertises to the scheduler, found as ps-lite does; and the state of the
link that holds it.  Pure functions over the standard library (Linux ioctls, ``/sys``, ``/proc``).
This host's addresses (:func:`is_loopback`, :func:`interface_address`, :func:`interface_addresses`,
:func:`route_address`) come from ``kvframe_transports.addresses``, which kvframe-launch shares; they
are re-exported here.

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

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Mapping

# this host's addresses live with the transports (kvframe-launch needs them too, without this package)
from kvframe_transports.addresses import bare_host as _strip
from kvframe_transports.addresses import describe_interfaces as _available
from kvframe_transports.addresses import (
    interface_address,
    interface_addresses,
    interface_ioctl,
    is_loopback,
    route_address,
)

__all__ = ["is_loopback", "interface_address", "interface_addresses", "route_address", "advertise_host",
           "interface_from_env", "interface_of", "link_state", "describe_link"]

_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFNAMSIZ = 16
_HINT = "set DMLC_INTERFACE (or KVFRAME_INTERFACE) to the interface to use, or DMLC_NODE_HOST to the address"


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
        flags = struct.unpack_from("H", interface_ioctl(name, _SIOCGIFFLAGS), _IFNAMSIZ)[0]
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
