"""Transport 'shm': the conformance suite (with shared memory proven and in use), the same-host proof
and its fallbacks, and that no file is ever left behind or followed through a symlink."""

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
from kvframe_transports.shm import HEADER, Ring, ShmConfig, ShmTransport, default_directory
from kvframe_transports.tcp import CONTROL, MAGIC, PREFIX, VERSION, TcpConfig, TcpTransport, parse_address

from kvframe.errors import TransportError
from kvframe.testing import TransportConformance
from kvframe.testing.transport_conformance import assert_frame, payload, recv_within

MiB = 1 << 20


def _private_dir():
    """A fresh directory on the shared-memory file system (where the transport would really work)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="kvframe-test-", dir=base)


@pytest.fixture
def shm_dir():
    d = _private_dir()
    yield d
    left = os.listdir(d)
    shutil.rmtree(d, ignore_errors=True)
    assert not left, f"files left in the shared-memory directory: {left}"


class _ShmConformance(TransportConformance):
    """Every endpoint in a private directory, which must be empty after each test; every
    connection must have proven the same host."""

    options: dict = {}

    @pytest.fixture
    def make_transport(self, shm_dir):
        made = []

        def make(**overrides):
            t = ShmTransport(ShmConfig(directory=shm_dir, **{**self.options, **overrides}))
            made.append(t)
            return t

        yield make
        for t in made:  # already closed by the suite (close is idempotent); here for a test that fails early
            t.close()

    @pytest.fixture
    def pair(self, endpoint):
        server = endpoint()
        client = endpoint()
        to_server = client.connect(server.listen(self.listen_host, 0))
        assert client.shared_memory_peers() == [to_server], "the same-host proof failed on loopback"
        self.greet(server, client, to_server)
        return server, client, to_server


class TestShmConformance(_ShmConformance):
    """Defaults: frames of 256 KiB and more in a 16 MiB ring."""


class TestShmSmallRingConformance(_ShmConformance):
    """Every non-empty frame through a ring of 1 MiB: chunks, wrap-arounds and full rings all the time."""

    options = {"min_bytes": 1, "ring_bytes": 1 * MiB}


class TestShmByRegistryConformance(TransportConformance):
    """Built through the plugin registry with its defaults, as a store would."""

    transport_name = "shm"


@pytest.fixture
def endpoints(shm_dir):
    made = []

    def new(cls=ShmTransport, **options):
        config = ShmConfig(**{"directory": shm_dir, **options}) if cls is ShmTransport else TcpConfig(**options)
        t = cls(config)
        made.append(t)
        return t

    yield new
    for t in made:
        t.close()


def _round_trip(server, client, to_server, frames):
    """After a small first message (large ones are refused before a peer is trusted), ``frames`` to
    the server and back; returns the server's handle of the client."""
    TransportConformance.greet(server, client, to_server)
    client.send(to_server, frames)
    peer, got = recv_within(server)
    for g, f in zip(got, frames):
        assert_frame(g, f)
    server.send(peer, got)
    back, echoed = recv_within(client)
    assert back is to_server
    for g, f in zip(echoed, frames):
        assert_frame(g, f)
    return peer


def test_same_host_peers_use_shared_memory_and_leave_no_file(endpoints, shm_dir):
    server = endpoints()
    client = endpoints()
    to_server = client.connect(server.listen("127.0.0.1", 0))
    frames = [b"small", payload(3 * MiB + 5, 1), payload(100, 2), payload(40 * MiB, 3), payload(300 << 10, 4)]
    to_client = _round_trip(server, client, to_server, frames)
    assert client.shared_memory_peers() == [to_server]
    assert server.shared_memory_peers() == [to_client]
    assert os.listdir(shm_dir) == [], "ring files must be unlinked once both sides mapped them"
    client.close()
    deadline = time.monotonic() + 5
    while server.shared_memory_peers() and time.monotonic() < deadline:
        server.recv(0.05)
    assert server.shared_memory_peers() == [] and server.broken(to_client)


def test_a_listener_that_cannot_see_the_file_falls_back_to_tcp(endpoints, shm_dir):
    """As a listener on another host would: its directory does not hold the connecting side's file."""
    other = _private_dir()
    try:
        server = ShmTransport(ShmConfig(directory=other))
        try:
            client = endpoints()
            to_server = client.connect(server.listen("127.0.0.1", 0))
            to_client = _round_trip(server, client, to_server, [b"x", payload(8 * MiB, 5)])
            assert client.shared_memory_peers() == [] and server.shared_memory_peers() == []
            assert client.broken(to_server) is None and server.broken(to_client) is None
        finally:
            server.close()
        assert os.listdir(other) == []
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.parametrize("shm_side", ["client", "server"])
def test_shm_and_plain_tcp_endpoints_talk_over_tcp(endpoints, shm_side):
    server = endpoints(ShmTransport if shm_side == "server" else TcpTransport)
    client = endpoints(ShmTransport if shm_side == "client" else TcpTransport)
    start = time.monotonic()
    to_server = client.connect(server.listen("127.0.0.1", 0))
    assert time.monotonic() - start < 2.0, "a plain tcp listener must refuse the hello at once"
    _round_trip(server, client, to_server, [payload(2 * MiB, 6)])
    shm_end = server if shm_side == "server" else client
    assert shm_end.shared_memory_peers() == []


def test_no_directory_means_plain_tcp(endpoints, shm_dir):
    server = endpoints(directory=os.path.join(shm_dir, "missing"))
    client = endpoints()
    to_server = client.connect(server.listen("127.0.0.1", 0))
    _round_trip(server, client, to_server, [payload(1 * MiB, 7)])
    assert client.shared_memory_peers() == [] and server.shared_memory_peers() == []


def test_the_directory_comes_from_the_environment(monkeypatch, shm_dir):
    monkeypatch.setenv("KVFRAME_SHM_DIR", shm_dir)
    assert default_directory() == shm_dir
    t = ShmTransport(ShmConfig())
    try:
        assert t.shm_directory == shm_dir
    finally:
        t.close()


def _raw_hello(addr, name, token, capacity):
    """A hand-made hello from a plain socket; returns the listener's answer's frames."""
    frames = [b"hello", name.encode(), token, struct.pack("<Q", capacity)]
    msg = PREFIX.pack(MAGIC, VERSION, CONTROL, 0, len(frames)) + struct.pack(
        f"<{len(frames)}Q", *map(len, frames)) + b"".join(frames)
    with socket.create_connection(parse_address(addr), timeout=5) as s:
        s.sendall(msg)
        data = b""
        while True:
            if len(data) >= PREFIX.size:
                n = PREFIX.unpack_from(data)[4]
                if len(data) >= PREFIX.size + 8 * n:
                    lengths = struct.unpack_from(f"<{n}Q", data, PREFIX.size)
                    end = PREFIX.size + 8 * n + sum(lengths)
                    if len(data) >= end:
                        out, off = [], PREFIX.size + 8 * n
                        for k in lengths:
                            out.append(data[off:off + k])
                            off += k
                        return out
            chunk = s.recv(65536)
            assert chunk, "the listener closed instead of answering"
            data += chunk


def test_a_planted_symlink_is_never_followed(endpoints, shm_dir):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    elsewhere = _private_dir()
    try:
        # a genuine ring (right owner, size, token) reached only through a symlink in the listener's directory
        target, token = Ring.create(elsewhere, 1 * MiB)
        link = "kvframe-" + "ab" * 16
        os.symlink(os.path.join(elsewhere, target.name), os.path.join(shm_dir, link))
        answer = _raw_hello(addr, link, token, 1 * MiB)
        assert answer[0] == b"refuse", answer
        assert target.echo() == bytes(32), "the listener wrote through the symlink"
        assert os.path.islink(os.path.join(shm_dir, link)) and os.path.exists(target.path)
        # creating a ring never follows or reuses a name either
        with pytest.raises(FileExistsError):
            Ring.create(shm_dir, 1 * MiB, name=link)
        with open(target.path, "rb") as f:
            assert f.read(8) == b"KVFRING1", "creating a ring wrote through the symlink"
        os.unlink(os.path.join(shm_dir, link))
        target.close()
        assert os.listdir(elsewhere) == []
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


@pytest.mark.parametrize("case", ["wrong_token", "wrong_size", "bad_name", "group_readable", "not_a_file"])
def test_a_hello_that_proves_nothing_is_refused(endpoints, shm_dir, case):
    server = endpoints()
    addr = server.listen("127.0.0.1", 0)
    ring, token = Ring.create(shm_dir, 1 * MiB)
    name, capacity = ring.name, 1 * MiB
    try:
        if case == "wrong_token":
            token = bytes(32)
        elif case == "wrong_size":
            capacity = 2 * MiB
        elif case == "bad_name":
            name = "../" + ring.name
        elif case == "group_readable":
            os.chmod(ring.path, 0o640)
        elif case == "not_a_file":
            name = "kvframe-" + "cd" * 16
            os.mkdir(os.path.join(shm_dir, name))
        answer = _raw_hello(addr, name, token, capacity)
        assert answer[0] == b"refuse", answer
        assert ring.echo() == bytes(32) and os.path.exists(ring.path), "a refused hello touched the file"
        assert server.shared_memory_peers() == []
    finally:
        ring.close()
        if case == "not_a_file":
            os.rmdir(os.path.join(shm_dir, name))
    # the listener goes on serving, with shared memory
    client = endpoints()
    to_server = client.connect(addr)
    _round_trip(server, client, to_server, [payload(1 * MiB, 8)])
    assert client.shared_memory_peers() == [to_server]


def test_a_ring_file_has_the_private_mode_and_exact_size(shm_dir):
    ring, _ = Ring.create(shm_dir, 1 * MiB)
    try:
        st = os.stat(ring.path)
        assert st.st_mode & 0o777 == 0o600 and st.st_size == HEADER + 1 * MiB
    finally:
        ring.close()
    assert os.listdir(shm_dir) == []


def test_frames_much_larger_than_the_ring_and_mixed_messages(endpoints):
    server = endpoints(ring_bytes=1 << 16, min_bytes=1000)
    client = endpoints(ring_bytes=1 << 16, min_bytes=1000)
    to_server = client.connect(server.listen("127.0.0.1", 0))
    rng = np.random.default_rng(9)
    for i in range(5):
        frames = [payload(int(n), 50 * i + j) for j, n in enumerate(rng.integers(0, 300_000, 9))]
        frames.insert(2, payload(3 * MiB + i, i))
        _round_trip(server, client, to_server, frames)
    assert client.shared_memory_peers() == [to_server]


_STOPPED_SERVER = textwrap.dedent("""
    import sys, time
    from kvframe_transports.shm import ShmConfig, ShmTransport
    t = ShmTransport(ShmConfig(directory=sys.argv[1], ring_bytes=1 << 20))
    print(t.listen("127.0.0.1", 0), flush=True)
    while True:
        t.recv(1.0)
""")


def test_a_stopped_peer_fails_a_send_in_time_and_a_killed_one_leaves_nothing(endpoints, shm_dir):
    server = subprocess.Popen([sys.executable, "-c", _STOPPED_SERVER, shm_dir], stdout=subprocess.PIPE, text=True)
    try:
        addr = server.stdout.readline().strip()
        assert addr.startswith("tcp://"), addr
        client = endpoints(ring_bytes=1 << 20, send_timeout=1.0)
        to_server = client.connect(addr)
        client.send(to_server, [b"hello"])
        client.send(to_server, [b"hi", payload(1 << 20, 1)])
        assert client.shared_memory_peers() == [to_server]
        os.kill(server.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TransportError, match=r"stayed full|no progress"):
            client.send(to_server, [payload(64 * MiB, 2)])
        assert time.monotonic() - start < 10
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        assert os.listdir(shm_dir) == [], "a killed peer left files behind"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def test_disconnect_releases_the_rings(endpoints, shm_dir):
    server = endpoints()
    client = endpoints()
    to_server = client.connect(server.listen("127.0.0.1", 0))
    to_client = _round_trip(server, client, to_server, [payload(2 * MiB, 10)])
    assert server.shared_memory_peers() == [to_client]
    client.send(to_server, [payload(3 * MiB, 11)])  # waits for recv, in the buffer it was copied to
    time.sleep(0.2)
    server.disconnect(to_client)
    assert server.shared_memory_peers() == [] and server.recv(0.2) is None
    deadline = time.monotonic() + 10
    while client.broken(to_server) is None and time.monotonic() < deadline:
        client.recv(0.05)
    assert client.broken(to_server) and client.shared_memory_peers() == []
    assert os.listdir(shm_dir) == []


def test_a_connecting_side_whose_queue_is_full_still_proves_the_same_host(endpoints):
    other = endpoints()
    client = endpoints(max_queued_bytes=1 << 16)
    to_other = client.connect(other.listen("127.0.0.1", 0))
    to_client = _round_trip(other, client, to_other, [b"x"])
    other.send(to_client, [payload(1 * MiB, 12)])  # fills the client's queue: it reads nothing more
    deadline = time.monotonic() + 10
    while not client._full and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client._full
    server = endpoints()
    start = time.monotonic()
    to_server = client.connect(server.listen("127.0.0.1", 0))
    assert time.monotonic() - start < 2.0 and client.shared_memory_peers() == [to_other, to_server]
    back, frames = recv_within(client)
    assert back is to_other and frames[0].nbytes == 1 * MiB
    _round_trip(server, client, to_server, [payload(2 * MiB, 13)])
