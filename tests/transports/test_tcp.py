"""Transport 'tcp': the conformance suite, and what a hostile or broken peer cannot do to it."""

import logging
import socket
import struct
import time
import tracemalloc

import numpy as np
import pytest
from kvframe_transports.tcp import MAGIC, PREFIX, VERSION, TcpConfig, TcpTransport, parse_address

from kvframe.errors import TransportError
from kvframe.testing import TransportConformance
from kvframe.testing.transport_conformance import payload, recv_within


class TestTcpConformance(TransportConformance):
    transport_name = "tcp"


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class TestTcpOverIPv6Conformance(TransportConformance):
    transport_name = "tcp"
    listen_host = "::1"

    @pytest.fixture(autouse=True)
    def _need_ipv6(self):
        if not _has_ipv6_loopback():
            pytest.skip("no IPv6 loopback here")


@pytest.fixture
def endpoints():
    made = []

    def new(**options):
        t = TcpTransport(TcpConfig(**options))
        made.append(t)
        return t

    yield new
    for t in made:
        t.close()


def _raw_client(addr):
    host, port = parse_address(addr)
    s = socket.create_connection((host, port), timeout=5)
    return s


def _wait_dropped(sock, seconds=5.0):
    """True once the other end has closed ``sock`` (EOF or reset)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _still_serves(endpoints, server, addr):
    client = endpoints()
    to_server = client.connect(addr)
    client.send(to_server, [b"after", b"the attack"])
    peer, frames = recv_within(server, 10)
    assert [bytes(f) for f in frames] == [b"after", b"the attack"]
    server.send(peer, [b"ok"])
    back, frames = recv_within(client, 10)
    assert back is to_server and bytes(frames[0]) == b"ok"


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                      # not our magic
    PREFIX.pack(MAGIC, 99, 0, 0, 1) + b"\0" * 8,                # an unknown version
    PREFIX.pack(MAGIC, VERSION, 0, 0, 0),                       # a message of no frames
    PREFIX.pack(MAGIC, VERSION, 0, 0, (1 << 16) + 1),           # too many frames
    PREFIX.pack(MAGIC, VERSION, 0, 0, 1) + struct.pack("<Q", 1 << 63 | 10) + b"x" * 10,  # shm frame, no shm
    PREFIX.pack(MAGIC, VERSION, 1, 0, 1) + struct.pack("<Q", 1 << 20),  # an oversize control message
], ids=["http", "version", "no_frames", "too_many_frames", "shm_flag", "big_control"])
def test_garbage_drops_only_that_connection(endpoints, caplog, garbage):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    bystander = endpoints()
    to_server = bystander.connect(addr)
    bystander.send(to_server, [b"before"])
    recv_within(server, 10)
    raw = _raw_client(addr)
    with caplog.at_level(logging.WARNING, logger="kvframe_transports"):
        raw.sendall(garbage)
        assert _wait_dropped(raw), "the listener kept a connection that sent garbage"
    raw_port = raw.getsockname()[1]
    raw.close()
    assert any(f"127.0.0.1:{raw_port}" in r.getMessage() for r in caplog.records), \
        "the warning must name the peer's address"
    assert server.recv(0.1) is None
    bystander.send(to_server, [b"still connected"])  # an established peer is unaffected
    assert bytes(recv_within(server, 10)[1][0]) == b"still connected"
    _still_serves(endpoints, server, addr)


def test_an_oversize_length_is_refused_before_anything_is_allocated(endpoints, caplog):
    server = endpoints(max_message_bytes=1 << 20)
    addr = server.listen("127.0.0.1", 0)
    tracemalloc.start()  # numpy reports its allocations to tracemalloc, from every thread
    try:
        tracemalloc.reset_peak()
        for length in (1 << 30, (1 << 63) - 1, (1 << 20) + 1):
            raw = _raw_client(addr)
            with caplog.at_level(logging.WARNING, logger="kvframe_transports"):
                raw.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, 1) + struct.pack("<Q", length))
                assert _wait_dropped(raw)
            raw.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes were allocated for messages that were refused"
    assert sum("over the limit" in r.getMessage() for r in caplog.records) == 3
    _still_serves(endpoints, server, addr)


def test_a_peer_that_vanishes_mid_message_delivers_nothing(endpoints):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    raw = _raw_client(addr)
    raw.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, 2) + struct.pack("<QQ", 10, 1 << 20) + b"x" * 1000)
    raw.close()
    assert server.recv(0.3) is None
    _still_serves(endpoints, server, addr)


def test_frames_are_slices_of_one_buffer_and_more_than_iov_max_frames_travel(endpoints):
    server = endpoints()
    client = endpoints()
    to_server = client.connect(server.listen("127.0.0.1", 0))
    frames = [payload(i % 97, i) for i in range(5000)] + [payload(1 << 20, 1)]
    client.send(to_server, frames)
    _, got = recv_within(server)
    assert len(got) == len(frames)
    owners = {id(f.obj) for f in got}
    assert len(owners) == 1, "a message must be received into one buffer"
    assert all(bytes(g) == f.tobytes() for g, f in zip(got, frames))


def test_broken_says_why_and_recv_does_not_raise(endpoints):
    server = endpoints()
    client = endpoints()
    to_server = client.connect(server.listen("127.0.0.1", 0))
    client.send(to_server, [b"hi"])
    to_client, _ = recv_within(server)
    assert client.broken(to_server) is None and server.broken(to_client) is None
    assert to_client in server.peers()
    client.close()
    deadline = time.monotonic() + 5
    while server.broken(to_client) is None and time.monotonic() < deadline:
        assert server.recv(0.05) is None
    assert "closed by the peer" in server.broken(to_client)
    assert to_client not in server.peers()
    with pytest.raises(TransportError, match=str(to_client).replace("[", r"\[")):
        server.send(to_client, [b"gone?"])


def test_handles_name_the_remote_end_and_each_connect_is_its_own(endpoints):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    client = endpoints()
    a, b = client.connect(addr), client.connect(addr)
    assert a != b and str(a) == str(b) == a.address == addr
    client.send(a, [b"a"])
    client.send(b, [b"b"])
    seen = {}
    for _ in range(2):
        peer, frames = recv_within(server)
        assert peer.address.startswith("tcp://127.0.0.1:") and not peer.outbound
        seen[bytes(frames[0])] = peer
    assert seen[b"a"] != seen[b"b"]
    server.send(seen[b"b"], [b"to b"])
    assert recv_within(client)[0] is b


def test_listen_on_every_interface_returns_that_address(endpoints):
    server = endpoints()
    addr = server.listen("0.0.0.0", 0)
    assert addr.startswith("tcp://0.0.0.0:")
    client = endpoints()
    to_server = client.connect(addr.replace("0.0.0.0", "127.0.0.1"))
    client.send(to_server, [np.arange(10, dtype=np.int64)])
    assert np.frombuffer(recv_within(server)[1][0], dtype=np.int64).tolist() == list(range(10))


@pytest.mark.parametrize("address", ["tcp://host", "tcp://host:0", "tcp://host:70000", "udp://h:1", "host:1", 5])
def test_addresses_it_cannot_use(endpoints, address):
    with pytest.raises(TransportError, match="tcp://HOST:PORT"):
        endpoints().connect(address)


def test_closed_endpoint_refuses_work(endpoints):
    t = endpoints()
    t.close()
    with pytest.raises(TransportError, match="closed"):
        t.listen("127.0.0.1", 0)
    with pytest.raises(TransportError, match="closed"):
        t.connect("tcp://127.0.0.1:1")
    assert t.recv(0.01) is None
