"""The transport conformance suite: the :class:`kvframe.protocols.Transport` contract, for any plugin.

Use it from a transport plugin's tests by subclassing :class:`TransportConformance` and either naming
the transport (it is then built through the plugin registry) or defining the fixture
``make_transport``, which returns a callable ``(**config_overrides) -> Transport``::

    from kvframe.testing import TransportConformance

    class TestFooConformance(TransportConformance):
        transport_name = "foo"
        transport_options = {"buffer_bytes": 1 << 20}

    class TestBarConformance(TransportConformance):
        @pytest.fixture
        def make_transport(self):
            return lambda **overrides: BarTransport(BarConfig(**overrides))

The suite overrides only the generic ``TransportConfig`` fields (``max_message_bytes``,
``connect_timeout``, ``max_first_message_bytes``, ``max_queued_bytes``).  Every test closes every
endpoint it made, and every wait in it is bounded, so a transport that hangs fails the test instead
of hanging the run.  Endpoints listen on ``listen_host`` (loopback by default).  As the roles do,
every connection starts with a small message (:meth:`TransportConformance.greet`) before anything
large travels on it.

Some tests check what not every transport can do; each runs where the transport says it can, and is
skipped (with the reason) elsewhere:

- ``supports_first_message_limit = True`` on the transport class (or instance): the first message
  on an accepted connection over ``max_first_message_bytes`` is refused and that connection cut;
  later messages, and messages on connections this endpoint made, may be up to
  ``max_message_bytes``.
- ``supports_queue_limit = True``: a sender flooding a receiver that does not call ``recv`` is held
  back once about ``max_queued_bytes`` wait there (the receiving process's resident memory is
  measured on Linux), a single message over that bound still comes through, and two endpoints
  sending each other one such message at once do not deadlock.
- a ``disconnect(peer)`` method: nothing sent after it comes out of ``recv``, sends to that peer raise
  ``TransportError``, a second call does nothing and the peer's own sends fail soon.  Messages that
  were waiting for ``recv`` may still come out, unless the transport declares
  ``disconnect_discards_queued = True``: then none may.

A transport that leaves a ``supports_*`` attribute undeclared is not tested for it (written before
these bounds existed).  A test class may decide instead of the transport by setting
``first_message_limit`` or ``queue_limit`` to True or False.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import pytest

from kvframe import plugins
from kvframe.errors import TransportError
from kvframe.plugins import validate_plugin_config

KiB, MiB = 1 << 10, 1 << 20
WAIT = 20.0  # seconds any single expected message may take, even on a slow, shared machine


def payload(nbytes: int, seed: int) -> np.ndarray:
    """Reproducible random bytes (a pattern like arange would hide frames shifted by 256 bytes)."""
    return np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8)


def as_bytes(frame: Any) -> np.ndarray:
    return np.frombuffer(memoryview(frame).cast("B"), dtype=np.uint8)


def assert_frame(frame: Any, expected: Any, what: str = "frame") -> None:
    got, want = as_bytes(frame), as_bytes(expected)
    assert got.nbytes == want.nbytes, f"{what}: {got.nbytes} bytes came, {want.nbytes} were sent"
    if not np.array_equal(got, want):
        first = int(np.flatnonzero(got != want)[0])
        raise AssertionError(f"{what}: the bytes differ from offset {first} on ({got.nbytes} bytes)")


def recv_within(t: Any, seconds: float = WAIT) -> tuple[Hashable, list]:
    """The next message, failing the test when none comes within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no message came within {seconds} s")
        got = t.recv(min(left, 1.0))
        if got is not None:
            peer, frames = got
            assert isinstance(frames, list) and frames, "recv must return (peer, non-empty list of frames)"
            assert all(isinstance(f, memoryview) for f in frames), "recv's frames must be memoryviews"
            return peer, frames


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Worker(threading.Thread):
    """Runs a function on its own thread and keeps its result or exception for the test."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def outcome(self, seconds: float) -> Any:
        self.join(seconds)
        if self.is_alive():
            raise AssertionError(f"did not finish within {seconds} s (deadlock?)")
        if self.error is not None:
            raise self.error
        return self.result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """This process's peak resident memory over a ``with`` block, above what it had at the start:
    sampled every few milliseconds, and read from VmHWM where the kernel lets it be reset."""

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _PeakRss:
        try:  # "5" resets VmHWM to the current RSS (Linux 4.0 and later)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        self.base = self.peak = _rss_bytes()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._sampler.join(5.0)
        if self._hwm:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def can_listen_on(host: str) -> bool:
    """Whether this machine can bind a TCP socket on ``host`` (an IPv6 loopback may be missing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def send_over(sender: Any, peer: Hashable, limit: int, split: bool) -> None:
    """Send a message of ``limit + 1`` bytes, in one frame or split across two; a sender that
    refuses it itself is fine too."""
    big = [payload(limit // 2 + 1, 7), payload(limit // 2, 8)] if split else [payload(limit + 1, 7)]
    try:
        sender.send(peer, big)
    except TransportError:
        pass


class TransportConformance:
    """The Transport contract. Subclass and set ``transport_name`` or define ``make_transport``."""

    transport_name: str | None = None
    transport_options: dict[str, Any] = {}
    listen_host: str = "127.0.0.1"
    #: seconds ``close`` may take
    close_bound: float = 5.0
    #: whether to test ``max_first_message_bytes`` and ``max_queued_bytes``; None: as the transport
    #: declares (``supports_first_message_limit``, ``supports_queue_limit``), else skipped
    first_message_limit: bool | None = None
    queue_limit: bool | None = None

    # fixtures ----------------------------------------------------------------------------------
    @pytest.fixture(autouse=True)
    def _listen_host_here(self) -> None:
        if not can_listen_on(self.listen_host):
            pytest.skip(f"this machine cannot listen on {self.listen_host} (listen_host)")

    @pytest.fixture
    def make_transport(self) -> Callable[..., Any]:
        """``(**config_overrides) -> Transport``; override it, or set ``transport_name``."""
        if self.transport_name is None:
            pytest.fail(f"{type(self).__name__} sets no transport_name and defines no make_transport fixture")
        name, options = self.transport_name, dict(self.transport_options)

        def make(**overrides: Any) -> Any:
            config = validate_plugin_config("transports", {"type": name, **options, **overrides}, "transport config")
            return plugins.create("transports", config)

        return make

    @pytest.fixture
    def endpoint(self, make_transport: Callable[..., Any]):
        """Like ``make_transport``, and every endpoint made is closed after the test."""
        made: list = []

        def new(**overrides: Any) -> Any:
            t = make_transport(**overrides)
            made.append(t)
            return t

        yield new
        for t in reversed(made):
            t.close()

    @pytest.fixture
    def pair(self, endpoint: Callable[..., Any]) -> tuple[Any, Any, Hashable]:
        """A listening server, a client connected to it, and the client's handle of the server."""
        server = endpoint()
        addr = server.listen(self.listen_host, 0)
        client = endpoint()
        to_server = client.connect(addr)
        self.greet(server, client, to_server)
        return server, client, to_server

    # helpers -----------------------------------------------------------------------------------
    @staticmethod
    def greet(server: Any, client: Any, to_server: Hashable) -> Hashable:
        """The small first message of a connection (the roles' handshake); returns the server's
        handle of the client."""
        client.send(to_server, [b"hello"])
        peer, frames = recv_within(server)
        assert [bytes(f) for f in frames] == [b"hello"], "the first message came out changed"
        return peer

    @staticmethod
    def exchange_at_once(server: Any, client: Any, to_server: Hashable, to_client: Hashable, nbytes: int,
                         seeds: tuple[int, int]) -> None:
        """Client and server each send the other ``nbytes`` at the same time; both arrive intact."""
        a, b = payload(nbytes, seeds[0]), payload(nbytes, seeds[1])
        size = f"{nbytes // MiB} MiB"
        # each endpoint is used by one thread at a time: the client's on a worker, the server's here
        client_side = _Worker(lambda: (client.send(to_server, [a]), recv_within(client, 60.0))[1])
        client_side.start()
        server.send(to_client, [b])
        peer, frames = recv_within(server, 60.0)
        assert peer == to_client
        assert_frame(frames[0], a, f"the client's {size} at the server")
        back, frames = client_side.outcome(60.0)
        assert back == to_server
        assert_frame(frames[0], b, f"the server's {size} at the client")

    def require(self, t: Any, what: str) -> None:
        """Skip unless the test class or the transport says it honours ``what``."""
        declared = getattr(self, what)
        if declared is None:
            declared = getattr(t, f"supports_{what}", None)
        if not declared:
            pytest.skip(f"{type(t).__name__} does not declare supports_{what} = True")

    @staticmethod
    def assert_cut(t: Any, peer: Hashable, seconds: float = 10.0) -> None:
        """The connection to ``peer`` is cut: sends fail within ``seconds`` (the first ones may still
        fit in kernel buffers)."""
        deadline = time.monotonic() + seconds
        with pytest.raises(TransportError):
            while time.monotonic() < deadline:
                t.send(peer, [b"anyone?", payload(64 * KiB, 3)])
                time.sleep(0.02)

    @staticmethod
    def round_trip(server: Any, client: Any, to_server: Hashable, frames: list) -> None:
        """client -> server -> (echo) -> client, checking every byte and the peer handles."""
        client.send(to_server, frames)
        peer, got = recv_within(server)
        assert len(got) == len(frames), f"{len(frames)} frames sent, {len(got)} came"
        for i, (g, f) in enumerate(zip(got, frames)):
            assert_frame(g, f, f"frame {i} at the server")
        server.send(peer, got)  # received frames are valid frames to send on
        back, echoed = recv_within(client)
        assert back == to_server and hash(back) == hash(to_server), \
            f"the reply came from {back!r}, not from the handle connect returned ({to_server!r})"
        assert len(echoed) == len(frames)
        for i, (g, f) in enumerate(zip(echoed, frames)):
            assert_frame(g, f, f"frame {i} back at the client")

    # tests -------------------------------------------------------------------------------------
    def test_listen_returns_an_address_to_connect_to(self, endpoint):
        server = endpoint()
        addr = server.listen(self.listen_host, 0)
        assert isinstance(addr, str) and "://" in addr, f"listen returned {addr!r}, not scheme://host:port"
        port = int(addr.rsplit(":", 1)[1].rstrip("/"))
        assert port > 0, f"listen on port 0 must return the port it got, not {addr!r}"

    def test_address_names_an_endpoint_from_its_host_and_port(self, endpoint):
        server = endpoint()
        addr = server.listen(self.listen_host, 0)
        port = int(addr.rsplit(":", 1)[1].rstrip("/"))
        client = endpoint()
        built = client.address(self.listen_host, port)
        assert built == addr, f"address({self.listen_host!r}, {port}) gave {built!r}; listen returned {addr!r}"
        self.greet(server, client, client.connect(built))

    @pytest.mark.parametrize("nbytes", [0, 1, 7, 64 * KiB, 8 * MiB, 64 * MiB],
                             ids=["0B", "1B", "7B", "64KiB", "8MiB", "64MiB"])
    def test_round_trip_one_frame(self, pair, nbytes):
        server, client, to_server = pair
        self.round_trip(server, client, to_server, [payload(nbytes, nbytes)])

    def test_round_trip_many_frames_of_every_buffer_kind(self, pair):
        server, client, to_server = pair
        rng = np.random.default_rng(1)
        frames: list = [b"header", b"", bytearray(b"\x00\x01\x02"), memoryview(b"view"),
                        rng.standard_normal((33, 17)).astype(np.float32),  # a typed, 2-d buffer
                        payload(300 * KiB, 2), payload(1 * MiB + 3, 3)]
        frames += [payload(int(n), 100 + i) for i, n in enumerate(rng.integers(0, 3000, 993))]
        self.round_trip(server, client, to_server, frames)

    def test_small_messages_keep_their_order(self, pair):
        server, client, to_server = pair
        n = 1000
        for i in range(n):
            client.send(to_server, [struct.pack("<I", i), b"x" * (i % 50)])
        peer = None
        for i in range(n):
            peer, frames = recv_within(server)
            assert struct.unpack("<I", frames[0])[0] == i, f"message {i} came out of order"
            assert len(frames) == 2 and frames[1] == b"x" * (i % 50)
        for i in range(n):
            server.send(peer, [struct.pack("<I", i)])
        for i in range(n):
            back, frames = recv_within(client)
            assert back == to_server and struct.unpack("<I", frames[0])[0] == i

    def test_clients_are_told_apart_and_replies_reach_the_right_one(self, endpoint):
        server = endpoint()
        addr = server.listen(self.listen_host, 0)
        clients = [endpoint() for _ in range(3)]
        handles = [c.connect(addr) for c in clients]
        for i, (c, h) in enumerate(zip(clients, handles)):
            c.send(h, [b"hello", struct.pack("<I", i)])
        peers: dict = {}
        for _ in clients:
            peer, frames = recv_within(server)
            assert frames[0] == b"hello"
            peers[peer] = struct.unpack("<I", frames[1])[0]
        assert sorted(peers.values()) == [0, 1, 2], "the server must see three distinct peers"
        for peer, i in peers.items():
            server.send(peer, [b"you are", struct.pack("<I", i)])
        for i, (c, h) in enumerate(zip(clients, handles)):
            back, frames = recv_within(c)
            assert back == h and hash(back) == hash(h), "a reply must come with the handle connect returned"
            assert frames[0] == b"you are" and struct.unpack("<I", frames[1])[0] == i, \
                "a reply reached the wrong client"
            assert str(back), "a peer handle must print as something readable"

    def test_recv_times_out_with_none(self, pair):
        server, client, _ = pair
        for t, timeout in [(server, 0.0), (server, 0.3), (client, 0.3)]:
            start = time.monotonic()
            assert t.recv(timeout) is None
            took = time.monotonic() - start
            assert took < timeout + 2.0, f"recv({timeout}) took {took:.2f} s"

    def test_message_at_the_limit_is_accepted(self, endpoint):
        limit = 1 << 16
        server = endpoint(max_message_bytes=limit)
        client = endpoint(max_message_bytes=limit)
        to_server = client.connect(server.listen(self.listen_host, 0))
        self.greet(server, client, to_server)
        self.round_trip(server, client, to_server, [payload(limit - 100, 5), payload(100, 6)])

    @pytest.mark.parametrize("split", [False, True], ids=["one_frame", "split_across_frames"])
    def test_oversize_message_is_refused_and_the_receiver_serves_on(self, endpoint, split):
        limit = 1 << 16
        server = endpoint(max_message_bytes=limit)
        addr = server.listen(self.listen_host, 0)
        bad = endpoint()  # its own limit is the default: only the receiver's limit is tested
        to_server = bad.connect(addr)
        send_over(bad, to_server, limit, split)
        # the receiver still serves a well-behaved client, and never hands out the oversize message
        good = endpoint(max_message_bytes=limit)
        to_good_server = good.connect(addr)
        good.send(to_good_server, [b"still there?"])
        while True:
            peer, frames = recv_within(server)
            assert sum(memoryview(f).nbytes for f in frames) <= limit, \
                f"a message of {sum(memoryview(f).nbytes for f in frames)} bytes passed a limit of {limit}"
            if frames == [b"still there?"]:
                break
        server.send(peer, [b"yes"])
        back, frames = recv_within(good)
        assert back == to_good_server and frames == [b"yes"]
        assert server.recv(0.2) is None, "nothing else may come out of the receiver"

    @pytest.mark.parametrize("nbytes", [1 * KiB, 8 * MiB], ids=["1KiB", "8MiB"])
    def test_buffers_may_be_overwritten_once_send_returns(self, pair, nbytes):
        server, client, to_server = pair
        buf = np.empty(nbytes, dtype=np.uint8)
        small = bytearray(64)
        sent = []
        for i in range(3):
            buf[:] = payload(nbytes, 10 + i)
            small[:] = bytes([i]) * 64
            sent.append((buf.copy(), bytes(small)))
            client.send(to_server, [small, buf])
            buf[:] = 0  # the moment send returns, the caller may reuse its memory
            small[:] = b"\xff" * 64
        for i, (want_big, want_small) in enumerate(sent):
            _, frames = recv_within(server)
            assert_frame(frames[0], want_small, f"small frame of message {i}")
            assert_frame(frames[1], want_big, f"large frame of message {i}")

    def test_both_ends_sending_64MiB_at_once_do_not_deadlock(self, pair):
        server, client, to_server = pair
        client.send(to_server, [b"hi"])
        to_client, _ = recv_within(server)
        self.exchange_at_once(server, client, to_server, to_client, 64 * MiB, seeds=(21, 22))

    def test_server_may_start_after_the_client_connects(self, endpoint):
        port = free_port(self.listen_host)
        server = endpoint()
        client = endpoint(connect_timeout=10.0)
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host

        def later() -> str:
            time.sleep(0.5)
            return server.listen(self.listen_host, port)

        starter = _Worker(later)
        starter.start()
        # the address is the one listen will return; learn its scheme from a throwaway endpoint
        probe = endpoint()
        scheme = probe.listen(self.listen_host, 0).split("://", 1)[0]
        to_server = client.connect(f"{scheme}://{host}:{port}")
        addr = starter.outcome(WAIT)
        assert addr.endswith(f":{port}")
        self.greet(server, client, to_server)
        self.round_trip(server, client, to_server, [b"late", payload(100 * KiB, 9)])

    def test_send_to_a_closed_peer_raises(self, pair):
        server, client, to_server = pair
        self.round_trip(server, client, to_server, [b"ping"])
        server.close()
        self.assert_cut(client, to_server)

    def test_unreachable_address_raises(self, endpoint):
        client = endpoint(connect_timeout=0.5)
        probe = endpoint()
        scheme = probe.listen(self.listen_host, 0).split("://", 1)[0]
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        addr = f"{scheme}://{host}:{free_port(self.listen_host)}"  # nobody listens there
        start = time.monotonic()
        with pytest.raises(TransportError):
            h = client.connect(addr)  # may connect lazily: then sending must fail
            while time.monotonic() - start < 10.0:
                client.send(h, [b"anyone?"])
                time.sleep(0.02)
        assert time.monotonic() - start < 10.0

    def test_an_address_it_cannot_use_raises(self, endpoint):
        client = endpoint(connect_timeout=0.5)
        with pytest.raises(TransportError):
            client.connect("no-such-scheme:nowhere")

    def test_close_is_idempotent_and_bounded(self, endpoint):
        idle = endpoint()
        busy_server = endpoint()
        busy_client = endpoint()
        to_server = busy_client.connect(busy_server.listen(self.listen_host, 0))
        self.greet(busy_server, busy_client, to_server)
        busy_client.send(to_server, [payload(4 * MiB, 4)])  # left unreceived on purpose
        for t in (idle, busy_server, busy_client):
            for _ in range(2):
                start = time.monotonic()
                t.close()
                took = time.monotonic() - start
                assert took < self.close_bound, f"close took {took:.2f} s"

    # bounds before trust: see the module docstring for which transports these run on --------------
    @pytest.mark.parametrize("split", [False, True], ids=["one_frame", "split_across_frames"])
    def test_a_first_message_over_its_limit_is_refused_and_later_ones_may_be_larger(self, endpoint, split):
        limit = 4 * KiB
        server = endpoint(max_first_message_bytes=limit)
        self.require(server, "first_message_limit")
        addr = server.listen(self.listen_host, 0)
        bad = endpoint()
        to_server = bad.connect(addr)
        send_over(bad, to_server, limit, split)
        self.assert_cut(bad, to_server)
        # a first message at the limit passes, and later ones may be larger (up to max_message_bytes)
        good = endpoint()
        to_good_server = good.connect(addr)
        first = [payload(limit - 10, 9), payload(10, 10)]
        good.send(to_good_server, first)
        peer, frames = recv_within(server)
        for i, (g, f) in enumerate(zip(frames, first)):
            assert_frame(g, f, f"frame {i} of a first message at the limit")
        later = payload(1 * MiB, 11)
        good.send(to_good_server, [later])
        again, frames = recv_within(server)
        assert again == peer
        assert_frame(frames[0], later, "a later message larger than the first-message limit")
        assert server.recv(0.2) is None, "nothing of the refused first message may come out"

    def test_messages_on_a_connection_this_endpoint_made_are_not_bound_as_first_messages(self, endpoint):
        server = endpoint()
        client = endpoint(max_first_message_bytes=4 * KiB)
        self.require(client, "first_message_limit")
        to_server = client.connect(server.listen(self.listen_host, 0))
        to_client = self.greet(server, client, to_server)
        reply = payload(1 * MiB, 12)
        server.send(to_client, [reply])
        back, frames = recv_within(client)
        assert back == to_server
        assert_frame(frames[0], reply, "the first reply on an outbound connection")

    def test_disconnect_drops_a_peer_at_once(self, endpoint):
        server = endpoint()
        if not callable(getattr(server, "disconnect", None)):
            pytest.skip(f"{type(server).__name__} has no disconnect method")
        addr = server.listen(self.listen_host, 0)
        bad = endpoint()
        to_server = bad.connect(addr)
        to_bad = self.greet(server, bad, to_server)
        for i in range(4):
            bad.send(to_server, [b"before", struct.pack("<I", i)])
        peer, frames = recv_within(server)
        assert peer == to_bad and bytes(frames[0]) == b"before"
        time.sleep(0.2)  # the rest may be waiting for recv by now
        server.disconnect(to_bad)
        server.disconnect(to_bad)  # idempotent
        with pytest.raises(TransportError):
            server.send(to_bad, [b"to a dropped peer"])
        try:
            for _ in range(3):
                bad.send(to_server, [b"after"])
        except TransportError:
            pass
        self.assert_cut(bad, to_server)
        strict = getattr(server, "disconnect_discards_queued", False)
        while (got := server.recv(0.3)) is not None:
            peer, frames = got
            assert bytes(frames[0]) == b"before", "a message sent after disconnect came out of recv"
            assert not strict, "a message that waited for recv came out after disconnect"
        # the others are served as before
        good = endpoint()
        to_good_server = good.connect(addr)
        to_good = self.greet(server, good, to_good_server)
        assert to_good != to_bad
        self.round_trip(server, good, to_good_server, [b"still", payload(100 * KiB, 13)])

    def test_a_message_over_the_queue_bound_comes_through_and_two_such_do_not_deadlock(self, endpoint):
        bound = 1 << 16  # the smallest TransportConfig allows
        server = endpoint(max_queued_bytes=bound)
        self.require(server, "queue_limit")
        client = endpoint(max_queued_bytes=bound)
        to_server = client.connect(server.listen(self.listen_host, 0))
        to_client = self.greet(server, client, to_server)
        self.exchange_at_once(server, client, to_server, to_client, 16 * MiB, seeds=(23, 24))

    def test_a_flood_into_a_receiver_that_does_not_recv_is_held_back(self, endpoint):
        bound, size, count = 32 * MiB, 8 * MiB, 64
        server = endpoint(max_queued_bytes=bound)
        self.require(server, "queue_limit")
        if not os.path.exists("/proc/self/statm"):
            pytest.skip("resident memory is measured through /proc (Linux)")
        client = endpoint()
        to_server = client.connect(server.listen(self.listen_host, 0))
        to_client = self.greet(server, client, to_server)
        msg = payload(size, 25)
        sent = [0]

        def flood() -> None:
            for i in range(count):
                client.send(to_server, [struct.pack("<I", i), msg])
                sent[0] = i + 1

        with _PeakRss() as mem:
            sender = _Worker(flood)
            sender.start()
            last, since, deadline = -1, time.monotonic(), time.monotonic() + WAIT
            while sent[0] < count and time.monotonic() < deadline:  # until the sender stalls
                if sent[0] != last:
                    last, since = sent[0], time.monotonic()
                elif time.monotonic() - since > 0.5:
                    break
                time.sleep(0.02)
            stalled_at = sent[0]
            held_back = mem.growth
            for i in range(count):
                peer, frames = recv_within(server)
                assert peer == to_client and struct.unpack("<I", frames[0])[0] == i, f"message {i} out of order"
                assert memoryview(frames[1]).nbytes == size
            del frames
            sender.outcome(WAIT)
        assert stalled_at < count, f"all {count} messages of {size >> 20} MiB went in while nobody called recv"
        # the queue's bound, one message over it, one half received, and room for buffers and rings
        allowed = bound + 2 * size + 64 * MiB
        assert mem.growth < allowed, (
            f"resident memory grew by {mem.growth >> 20} MiB ({held_back >> 20} MiB while recv was not called) "
            f"for max_queued_bytes={bound >> 20} MiB; {count} x {size >> 20} MiB were sent")
