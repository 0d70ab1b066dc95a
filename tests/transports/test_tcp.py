"""Transport 'tcp': the conformance suite, and what a hostile or broken peer cannot do to it."""

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest
from kvframe_transports.tcp import (
    DATA,
    LOG_EVERY,
    LOG_FIRST,
    MAGIC,
    PREFIX,
    VERSION,
    TcpConfig,
    TcpTransport,
    parse_address,
)

from kvframe.errors import TransportError
from kvframe.testing import TransportConformance
from kvframe.testing.transport_conformance import payload, recv_within


class TestTcpConformance(TransportConformance):
    transport_name = "tcp"


class TestTcpOverIPv6Conformance(TransportConformance):
    transport_name = "tcp"
    listen_host = "::1"


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
    PREFIX.pack(MAGIC, VERSION, 1, 0, 9),                       # a control message of too many frames
    PREFIX.pack(MAGIC, VERSION, 0, 0, 1) + struct.pack("<Q", (1 << 16) + 1),  # a first message over its limit
    PREFIX.pack(MAGIC, VERSION, 0, 0, 9000),                    # a first message's lengths over its limit
], ids=["http", "version", "no_frames", "too_many_frames", "shm_flag", "big_control", "many_control_frames",
        "big_first", "long_first_lengths"])
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


def _message(frames, kind=DATA):
    return PREFIX.pack(MAGIC, VERSION, kind, 0, len(frames)) + struct.pack(
        f"<{len(frames)}Q", *map(len, frames)) + b"".join(frames)


@pytest.mark.parametrize("first", [True, False], ids=["first_message", "later_message"])
def test_an_oversize_length_is_refused_before_anything_is_allocated(endpoints, caplog, first):
    server = endpoints(max_message_bytes=1 << 20)
    addr = server.listen("127.0.0.1", 0)
    tracemalloc.start()  # numpy reports its allocations to tracemalloc, from every thread
    try:
        tracemalloc.reset_peak()
        for length in (1 << 30, (1 << 63) - 1, (1 << 20) + 1):
            raw = _raw_client(addr)
            with caplog.at_level(logging.WARNING, logger="kvframe_transports"):
                if not first:
                    raw.sendall(_message([b"hello"]))
                    peer, _ = recv_within(server, 10)
                raw.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, 1) + struct.pack("<Q", length))
                assert _wait_dropped(raw)
            raw.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes were allocated for messages that were refused"
    what = "a first message of" if first else "a message of"
    assert sum(what in r.getMessage() and "over the limit" in r.getMessage() for r in caplog.records) == 3
    _still_serves(endpoints, server, addr)


def test_after_its_first_message_a_connection_is_not_read_until_recv_hands_that_out(endpoints):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    raw = _raw_client(addr)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        # a hello and, right behind it, the start of a 1 GiB message: none of that may be allocated
        # before the application has seen the hello
        raw.sendall(_message([b"hello"]) + PREFIX.pack(MAGIC, VERSION, 0, 0, 1) + struct.pack("<Q", 1 << 30)
                    + b"x" * 100_000)
        time.sleep(0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes were allocated for a peer whose first message nobody has taken"
    peer, frames = recv_within(server, 10)
    assert bytes(frames[0]) == b"hello"
    server.disconnect(peer)  # its hello failed authentication, say
    assert _wait_dropped(raw)
    raw.close()
    assert server.recv(0.2) is None
    _still_serves(endpoints, server, addr)


def test_disconnect_releases_a_message_half_received_and_the_socket(endpoints):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    raw = _raw_client(addr)
    raw.sendall(_message([b"hello"]))
    peer, _ = recv_within(server, 10)
    tracemalloc.start()
    try:
        raw.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, 1) + struct.pack("<Q", 64 << 20) + b"x" * (1 << 20))
        deadline = time.monotonic() + 10
        while tracemalloc.get_traced_memory()[0] < 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the receiver has allocated the message's buffer
        assert tracemalloc.get_traced_memory()[0] >= 64 << 20
        server.disconnect(peer)
        deadline = time.monotonic() + 10
        while tracemalloc.get_traced_memory()[0] > 16 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 16 << 20, f"{held} bytes are still held for a disconnected peer"
    assert _wait_dropped(raw)
    raw.close()
    assert server.broken(peer) == "disconnected by this endpoint" and peer not in server.peers()
    with pytest.raises(TransportError, match="disconnected"):
        server.send(peer, [b"x"])
    assert not server._open, "the disconnected peer's socket is still open"
    with pytest.raises(TransportError, match="unknown peer"):
        server.disconnect(object())


def test_a_flood_of_garbage_connections_logs_a_bounded_number_of_lines(endpoints, caplog):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    n = LOG_EVERY + 100
    with caplog.at_level(logging.WARNING, logger="kvframe_transports"):
        for _ in range(n):
            with _raw_client(addr) as raw:
                raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + 30
        while server._log.counts.get("drop", 0) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    assert server._log.counts.get("drop") == n, "every garbage connection is dropped"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == LOG_FIRST + 1, f"{n} bad connections made {len(lines)} warnings"
    assert "from now on only one in 1000" in lines[LOG_FIRST - 1]
    assert f"({LOG_EVERY} such lines so far)" in lines[-1]
    _still_serves(endpoints, server, addr)


_FLOODED_RECEIVER = textwrap.dedent("""
    import json, sys, time
    from kvframe import plugins
    from kvframe.plugins import validate_plugin_config

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))

    options, count = json.loads(sys.argv[1]), int(sys.argv[2])
    t = plugins.create("transports", validate_plugin_config("transports", options, "transport"))
    print(t.listen("127.0.0.1", 0), flush=True)
    assert t.recv(30) is not None  # the hello
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM from here on
    except OSError:
        pass
    base = status("VmRSS")
    sys.stdin.readline()  # the sender stalled: read, slowly
    for i in range(count):
        got = t.recv(30)
        assert got is not None, i
        del got
        time.sleep(0.002)
    print(json.dumps({"base": base, "peak": status("VmHWM")}), flush=True)
    t.close()
""")


def flood_a_slow_receiver_process(options, count=200, size=8 << 20):
    """Run a receiver with ``options`` in a child process, send it ``count`` messages of ``size``
    bytes as fast as it lets us while it does not call recv, then let it read them slowly. Returns
    how many went in before the sender stalled and the growth of the child's peak RSS."""
    child = subprocess.Popen([sys.executable, "-c", _FLOODED_RECEIVER, json.dumps(options), str(count)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = TcpTransport(TcpConfig()) if options["type"] == "tcp" else None
    try:
        if client is None:
            from kvframe_transports.shm import ShmConfig, ShmTransport
            client = ShmTransport(ShmConfig(directory=options["directory"]))
        to_server = client.connect(child.stdout.readline().strip())
        client.send(to_server, [b"hello"])
        msg, sent = payload(size, 1), [0]

        def flood():
            for _ in range(count):
                client.send(to_server, [msg])
                sent[0] += 1

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        last, since = -1, time.monotonic()
        while sent[0] < count and time.monotonic() - since < 1.0:
            if sent[0] != last:
                last, since = sent[0], time.monotonic()
            time.sleep(0.02)
        stalled_at = sent[0]
        child.stdin.write("go\n")
        child.stdin.flush()
        sender.join(60)
        assert not sender.is_alive() and sent[0] == count, f"{sent[0]} of {count} messages went"
        result = json.loads(child.stdout.readline())
        assert child.wait(30) == 0
        return stalled_at, result["peak"] - result["base"]
    finally:
        client.close()
        if child.poll() is None:
            child.kill()
            child.wait(10)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the child's RSS from /proc")
@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_a_receiver_process_flooded_while_it_does_not_recv_stays_small(kind):
    bound = 32 << 20
    options = {"type": kind, "max_queued_bytes": bound}
    directory = None
    if kind == "shm":
        directory = tempfile.mkdtemp(prefix="kvframe-test-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        options["directory"] = directory
    try:
        stalled_at, growth = flood_a_slow_receiver_process(options)
    finally:
        if directory is not None:
            left = os.listdir(directory)
            shutil.rmtree(directory, ignore_errors=True)
            assert not left, f"files left in the shared-memory directory: {left}"
    # 200 x 8 MiB went through; the queue's bound, one message over it, one half received and the
    # shared-memory ring are what may stay resident
    assert stalled_at < 20, f"{stalled_at} messages of 8 MiB went in before the sender was held back"
    assert growth < bound + (64 << 20), f"the receiver's peak RSS grew by {growth >> 20} MiB"


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
    TransportConformance.greet(server, client, to_server)
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
