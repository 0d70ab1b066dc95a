"""Transport 'zmq': the conformance suite, and the limits and broken connections zmq can tell about."""

import socket
import threading
import time

import pytest
import zmq
from kvframe_transports.zeromq import Peer, RouterPeer, ZmqConfig, ZmqTransport

from kvframe import plugins
from kvframe.errors import TransportError
from kvframe.plugins import validate_plugin_config
from kvframe.protocols import Transport
from kvframe.testing import TransportConformance
from kvframe.testing.transport_conformance import assert_frame, payload, recv_within

KiB, MiB = 1 << 10, 1 << 20


def _new(**options):
    return ZmqTransport(ZmqConfig(**options))


class TestZmqConformance(TransportConformance):
    transport_name = "zmq"  # built through the plugin registry, from its entry point


class TestZmqAllFramesZeroCopyConformance(TransportConformance):
    """Every non-empty frame goes through zmq's tracked zero-copy path."""

    @pytest.fixture
    def make_transport(self):
        return lambda **overrides: _new(zero_copy_bytes=0, **overrides)


class TestZmqOverIPv6Conformance(TransportConformance):
    listen_host = "::1"

    @pytest.fixture
    def make_transport(self):
        return _new


@pytest.fixture
def endpoints():
    made = []

    def new(**options):
        t = _new(**options)
        made.append(t)
        return t

    yield new
    for t in made:
        t.close()


def _pair(endpoints, **server_options):
    server = endpoints(**server_options)
    addr = server.listen("127.0.0.1", 0)
    client = endpoints()
    return server, addr, client, client.connect(addr)


def _hello(server, client, to_server):
    """One round trip; the server's handle of the client."""
    client.send(to_server, [b"hello"])
    peer, frames = recv_within(server, 10)
    assert frames == [b"hello"]
    server.send(peer, [b"hi"])
    assert recv_within(client, 10)[1] == [b"hi"]
    return peer


def _wait_broken(t, peer, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reason = t.broken(peer)
        if reason is not None:
            return reason
        t.recv(0.05)
    raise AssertionError(f"broken({peer!r}) stayed None for {seconds} s")


def test_found_by_name_through_its_entry_point():
    reg = plugins.lookup("transports", "zmq")
    assert reg.distribution == "kvframe-transports" and reg.config_model is ZmqConfig
    t = plugins.create("transports", validate_plugin_config("transports", {"type": "zmq", "hwm": 5}, "config"))
    try:
        assert isinstance(t, ZmqTransport) and isinstance(t, Transport) and t.config.hwm == 5
    finally:
        t.close()


@pytest.mark.parametrize("frames", [[payload(64 * KiB + 1, 1)], [b"ok", payload(64 * KiB + 1, 1), b"end"]],
                         ids=["alone", "among_small_frames"])
def test_oversize_frame_is_refused_and_the_endpoint_serves_others(endpoints, frames):
    limit = 64 * KiB
    server, addr, bad, to_server = _pair(endpoints, max_message_bytes=limit)
    bad_peer = _hello(server, bad, to_server)
    bad.send(to_server, frames)  # the sender's own limit is the default: only the receiver's counts
    # zmq (MAXMSGSIZE) drops the connection before buffering the frame: the sender learns of it
    assert "closed" in _wait_broken(bad, to_server)
    with pytest.raises(TransportError, match="cannot send"):
        bad.send(to_server, [b"again"])
    good = endpoints()
    to_good = good.connect(addr)
    peer = _hello(server, good, to_good)
    assert peer != bad_peer
    server.send(peer, [payload(limit, 2)])  # a frame at the limit passes
    assert_frame(recv_within(good, 10)[1][0], payload(limit, 2))
    assert server.recv(0.2) is None, "nothing of the oversize message may come out"


def test_frames_under_the_limit_adding_up_over_it_cut_that_peer_off(endpoints, caplog):
    limit = 64 * KiB
    server, addr, bad, to_server = _pair(endpoints, max_message_bytes=limit)
    bad_peer = _hello(server, bad, to_server)
    bad.send(to_server, [payload(limit // 2 + 1, 3), payload(limit // 2, 4)])
    bad.send(to_server, [b"after"])
    good = endpoints()
    peer = _hello(server, good, good.connect(addr))
    assert server.recv(0.3) is None, "neither the oversize message nor what its sender sent after may come"
    assert "over the limit" in server.broken(bad_peer)
    assert server.broken(peer) is None
    with pytest.raises(TransportError, match="over the limit"):
        server.send(bad_peer, [b"x"])
    assert any("over the limit" in r.getMessage() for r in caplog.records)


def test_oversize_reply_breaks_the_connection_at_the_client(endpoints):
    server, _, client, to_server = _pair(endpoints)
    client_small = endpoints(max_message_bytes=64 * KiB)
    to_server_2 = client_small.connect(server.listen("127.0.0.1", 0))
    client_small.send(to_server_2, [b"give me a lot"])
    peer, _ = recv_within(server, 10)
    server.send(peer, [payload(64 * KiB + 1, 5)])
    assert _wait_broken(client_small, to_server_2)
    assert client_small.recv(0.2) is None
    _hello(server, client, to_server)  # the server serves on


def test_send_to_a_peer_that_went_away_raises_naming_it(endpoints):
    server, _, client, to_server = _pair(endpoints)
    peer = _hello(server, client, to_server)
    assert isinstance(peer, RouterPeer) and isinstance(to_server, Peer)
    assert "127.0.0.1" in str(peer)
    client.close()
    deadline = time.monotonic() + 10
    with pytest.raises(TransportError, match="no longer connected") as err:
        while time.monotonic() < deadline:  # until zmq has seen the connection close
            server.send(peer, [b"anyone?"])
            time.sleep(0.02)
    assert peer.identity.hex() in str(err.value)
    assert server.broken(peer) is not None


def test_broken_says_why_and_recv_does_not_raise(endpoints):
    server, _, client, to_server = _pair(endpoints)
    _hello(server, client, to_server)
    assert client.broken(to_server) is None
    assert client.broken(object()) is None  # unknown handles are not broken
    server.close()
    assert "closed" in _wait_broken(client, to_server)
    assert client.recv(0.1) is None
    with pytest.raises(TransportError, match=str(to_server)):
        client.send(to_server, [b"x"])


def test_replies_that_came_before_the_server_closed_are_still_received(endpoints):
    server, _, client, to_server = _pair(endpoints)
    client.send(to_server, [b"two replies please"])
    peer, _ = recv_within(server, 10)
    server.send(peer, [b"one"])
    server.send(peer, [payload(1 * MiB, 6)])
    time.sleep(0.3)  # both are in the client's zmq queue
    server.close()
    got = [recv_within(client, 10)[1] for _ in range(2)]
    assert got[0] == [b"one"]
    assert_frame(got[1][0], payload(1 * MiB, 6))
    assert _wait_broken(client, to_server)


def test_unreachable_peer_is_broken_after_connect_timeout(endpoints):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = endpoints(connect_timeout=0.3)
    h = client.connect(f"tcp://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(TransportError, match="connect_timeout"):
        client.send(h, [b"anyone?"])
    assert time.monotonic() - start < 5
    assert "connect_timeout" in client.broken(h)


def test_zero_copy_frames_wait_for_zmq_and_time_out_when_the_peer_does_not_read(endpoints):
    # a peer that accepts the connection and reads nothing: the zmq handshake never completes
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        client = endpoints(send_timeout=0.5, connect_timeout=5)
        h = client.connect(f"tcp://127.0.0.1:{mute.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(TransportError, match="cannot send"):
            client.send(h, [payload(1 * MiB, 7)])
        assert time.monotonic() - start < 5
        assert client.broken(h) is not None


def test_close_from_another_thread_wakes_a_blocked_recv(endpoints):
    server = endpoints()
    server.listen("127.0.0.1", 0)
    result = []
    waiter = threading.Thread(target=lambda: result.append(server.recv(None)), daemon=True)
    waiter.start()
    time.sleep(0.2)
    start = time.monotonic()
    server.close()
    waiter.join(5)
    assert not waiter.is_alive() and result == [None]
    assert time.monotonic() - start < 5


def test_closed_endpoint_refuses_work(endpoints):
    server, addr, client, to_server = _pair(endpoints)
    client.close()
    assert client.recv(0) is None
    with pytest.raises(TransportError, match="closed"):
        client.send(to_server, [b"x"])
    with pytest.raises(TransportError, match="closed"):
        client.connect(addr)
    with pytest.raises(TransportError, match="closed"):
        client.listen("127.0.0.1", 0)
    assert client.broken(to_server) == "the endpoint closed"


def test_listen_on_a_taken_port_raises(endpoints):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    with pytest.raises(TransportError, match="cannot listen"):
        endpoints().listen("127.0.0.1", int(addr.rsplit(":", 1)[1]))


@pytest.mark.parametrize("address", ["127.0.0.1:5", "tcp://127.0.0.1", "ipc:///tmp/x", "tcp://h:0", "tcp://h:99999"])
def test_addresses_it_cannot_use(endpoints, address):
    with pytest.raises(TransportError, match="cannot use address"):
        endpoints().connect(address)


def test_sockets_get_the_configured_options(endpoints):
    t = endpoints(hwm=7, max_message_bytes=1 << 20)
    t.listen("127.0.0.1", 0)
    h = t.connect("tcp://127.0.0.1:1")
    for sock in (t._routers[0], t._dealers[h].sock):
        assert sock.getsockopt(zmq.SNDHWM) == 7 and sock.getsockopt(zmq.RCVHWM) == 7
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 1 << 20


def test_received_frames_outlive_the_next_recv(endpoints):
    server, _, client, to_server = _pair(endpoints)
    a, b = payload(200 * KiB, 8), payload(200 * KiB, 9)
    client.send(to_server, [a])
    client.send(to_server, [b])
    first = recv_within(server, 10)[1]
    second = recv_within(server, 10)[1]
    del second
    assert_frame(first[0], a)  # a view of zmq's buffer stays valid while it is held
