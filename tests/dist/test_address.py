"""kvframe_dist.address: which address a node advertises, and whether its own link is down.

Loopback-only tests run anywhere; the others build simulated hosts (tests/dist/netns.py) and run
the functions inside them, skipping where network namespaces cannot be made."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ADDRESS = HERE.parents[1] / "backends" / "dist" / "kvframe_dist" / "address.py"
sys.path.insert(0, str(HERE))
from netns import Hosts, netns_unavailable  # noqa: E402

# loaded from its file: the module needs only the standard library and kvframe_transports.addresses (where
# this host's addresses live), not the rest of its package
_spec = importlib.util.spec_from_file_location("kvframe_address_under_test", ADDRESS)
address = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(address)

needs_netns = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))


# -- anywhere (loopback only) --------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.1", "localhost",
                                  "LOCALHOST", "foo.localhost"])
def test_is_loopback_true(host):
    assert address.is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "192.0.2.7", "::2", "0.0.0.0", "", "[2001:db8::1]"])
def test_is_loopback_false(host):
    assert not address.is_loopback(host)


def test_is_loopback_resolves_names_from_hosts_file(monkeypatch):
    # a hostname mapped to 127.0.1.1 (Debian's /etc/hosts) is loopback; one mapped elsewhere is not
    table = {"box": ["127.0.1.1"], "mixed": ["127.0.0.1", "10.1.2.3"], "far": ["10.1.2.3"]}

    def fake(host, *a, **k):
        if host not in table:
            raise address.socket.gaierror(-2, "Name or service not known")
        return [(address.socket.AF_INET, 1, 6, "", (ip, 0)) for ip in table[host]]

    monkeypatch.setattr(address.socket, "getaddrinfo", fake)
    assert address.is_loopback("box")
    assert not address.is_loopback("mixed")
    assert not address.is_loopback("far")
    assert not address.is_loopback("unknown-name")


def test_interface_address_lo():
    assert address.interface_address("lo") == "127.0.0.1"
    assert ("lo", "127.0.0.1") in address.interface_addresses()


@pytest.mark.parametrize("name", ["kvfnope0", "x" * 20, "a/b"])
def test_interface_address_missing_names_it_and_lists_the_others(name):
    with pytest.raises(ValueError) as info:
        address.interface_address(name)
    msg = str(info.value)
    assert repr(name) in msg and "lo (127.0.0.1)" in msg


def test_route_and_advertise_on_loopback():
    assert address.route_address("127.0.0.1", 9) == "127.0.0.1"
    assert address.advertise_host("127.0.0.1", 9000) == "127.0.0.1"
    assert address.advertise_host("localhost", 9000) == "127.0.0.1"
    assert address.advertise_host("127.0.0.1", 9000, interface="lo") == "127.0.0.1"


def test_loopback_interface_for_remote_scheduler_is_refused():
    # interface_address only reads the interface: no packet goes anywhere
    with pytest.raises(ValueError) as info:
        address.advertise_host("192.0.2.50", 9000, interface="lo")
    msg = str(info.value)
    assert "127.0.0.1" in msg and "DMLC_INTERFACE" in msg and "DMLC_NODE_HOST" in msg


def test_interface_from_env():
    assert address.interface_from_env({}) is None
    assert address.interface_from_env({"DMLC_INTERFACE": "eth0"}) == "eth0"
    assert address.interface_from_env({"DMLC_INTERFACE": "eth0", "KVFRAME_INTERFACE": "ib0"}) == "ib0"
    assert address.interface_from_env({"DMLC_INTERFACE": ""}) is None


def test_interface_of_and_link_state_on_loopback():
    assert address.interface_of("127.0.0.1") == "lo"
    assert address.interface_of("[::1]") in ("lo", None)  # None where IPv6 is off
    assert address.interface_of("192.0.2.99") is None
    assert address.interface_of("not an address") is None
    assert address.link_state("127.0.0.1") == "up"
    assert address.link_state("192.0.2.99") is None
    assert address.describe_link("127.0.0.1") is None


# -- inside simulated hosts ----------------------------------------------------------------------

def _in_host(hosts: Hosts, i: int, body: str) -> dict:
    """Runs ``body`` (which sets ``out``, a dict) on host ``i`` with the module loaded as ``a``."""
    code = textwrap.dedent(f"""
        import importlib.util, json
        s = importlib.util.spec_from_file_location("address", {str(ADDRESS)!r})
        a = importlib.util.module_from_spec(s); s.loader.exec_module(a)
        def err(fn, *args):
            try:
                return ["ok", fn(*args)]
            except Exception as exc:
                return [type(exc).__name__, str(exc)]
        out = {{}}
    """) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    r = hosts.run(i, [sys.executable, "-c", code], timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def hosts():
    with Hosts(2, subnet="10.213.7.0/24") as h:
        yield h


@needs_netns
def test_real_interface_and_route(hosts):
    me, sched = hosts[0].ip, hosts[1].ip
    out = _in_host(hosts, 0, f"""
        out["eth0"] = a.interface_address("eth0")
        out["route"] = a.route_address({sched!r}, 9000)
        out["route_self"] = a.route_address({me!r}, 9000)
        out["adv_iface"] = a.advertise_host({sched!r}, 9000, "eth0")
        out["adv_route"] = a.advertise_host({sched!r}, 9000)
        out["adv_lo_sched"] = a.advertise_host("127.0.0.1", 9000)
        out["adv_lo_iface"] = err(a.advertise_host, {sched!r}, 9000, "lo")
        out["missing"] = err(a.interface_address, "eth7")
        out["of"] = a.interface_of({me!r})
        out["of_other"] = a.interface_of({sched!r})
        out["state"] = a.link_state({me!r})
        out["unresolvable"] = err(a.route_address, "kvframe-no-such-host.invalid", 9000)
    """)
    assert out["eth0"] == me
    assert out["route"] == me and out["route_self"] == me
    assert out["adv_iface"] == me and out["adv_route"] == me
    assert out["adv_lo_sched"] == "127.0.0.1"
    kind, msg = out["adv_lo_iface"]
    assert kind == "ValueError" and "DMLC_INTERFACE" in msg and f"eth0 ({me})" in msg
    kind, msg = out["missing"]
    assert kind == "ValueError" and "'eth7'" in msg and f"eth0 ({me})" in msg and "lo (127.0.0.1)" in msg
    assert out["of"] == "eth0" and out["of_other"] is None
    assert out["state"] == "up"
    assert out["unresolvable"][0] == "OSError"


@needs_netns
def test_interface_without_address(hosts):
    # a veth pair inside host 0 only: up, but no IPv4 address
    from netns import _ip

    _ip("-n", hosts[0].ns, "link", "add", "bare0", "type", "veth", "peer", "name", "bare1")
    _ip("-n", hosts[0].ns, "link", "set", "bare0", "up")
    out = _in_host(hosts, 0, """out["bare"] = err(a.interface_address, "bare0")""")
    kind, msg = out["bare"]
    assert kind == "ValueError" and "'bare0' has no IPv4 address" in msg and "bare1 (no IPv4 address)" in msg


@needs_netns
def test_only_loopback_route_is_refused(hosts):
    # a host whose only way to the scheduler's address is lo: advertising would hand out 127.0.0.1
    from netns import _ip

    _ip("-n", hosts[0].ns, "route", "add", "192.0.2.0/24", "dev", "lo", "src", "127.0.0.1")
    out = _in_host(hosts, 0, """
        out["route"] = a.route_address("192.0.2.1", 9000)
        out["adv"] = err(a.advertise_host, "192.0.2.1", 9000)
    """)
    assert out["route"] == "127.0.0.1"
    kind, msg = out["adv"]
    assert kind == "ValueError" and "DMLC_INTERFACE" in msg and "DMLC_NODE_HOST" in msg


@needs_netns
@pytest.mark.parametrize("side", ["host", "switch"])
def test_link_down_is_seen(hosts, side):
    """(a) side='host': ``ip link set eth0 down`` on the host; (b) side='switch': the bridge-side
    veth peer down (the host's eth0 stays administratively up but loses its carrier)."""
    me, sched = hosts[0].ip, hosts[1].ip
    probe = f"""
        out["state"] = a.link_state({me!r})
        out["of"] = a.interface_of({me!r})
        out["say"] = a.describe_link({me!r})
        out["route"] = err(a.route_address, {sched!r}, 9000)
        out["oper"] = open("/sys/class/net/eth0/operstate").read().strip()
        out["carrier"] = err(lambda: open("/sys/class/net/eth0/carrier").read().strip())
    """
    hosts.set_link(0, False, side=side)
    down = _in_host(hosts, 0, probe)
    hosts.set_link(0, True, side=side)
    up = _in_host(hosts, 0, probe)
    assert down["of"] == "eth0"  # the address stays on the interface while the link is down
    assert down["state"] == "down", down
    assert down["say"] == f"this host's link eth0 ({me}) is down"
    assert down["oper"] == "down"
    if side == "host":
        assert down["carrier"][0] == "OSError"  # EINVAL: no carrier to report on an interface that is down
        assert down["route"][0] == "OSError"  # the subnet route goes with the link
    else:
        assert down["carrier"] == ["ok", "0"]
    assert up["state"] == "up" and up["say"] is None
    assert up["route"] == ["ok", me]
