"""Round trip of one large message on loopback, client and echo server in two processes:
transports 'tcp' and 'shm', the old pyzmq transport of kvframe-dist ('zmq': taken from the git
history, where backends/dist/kvframe_dist/transport.py last was) and any registered transport
('plugin:NAME').

    .venv/bin/python benchmarks/bench_transports.py [--mib 64] [--reps 10] [--kinds tcp,shm,zmq]

Prints the median and best round-trip time and the payload rate (2 x size / time).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

OLD_ZMQ = "c859856^:backends/dist/kvframe_dist/transport.py"


def old_zmq():
    """The ZmqTransport class of kvframe-dist before it moved to the Transport protocol."""
    try:
        from kvframe_dist.transport import ZmqTransport

        return ZmqTransport
    except ImportError:
        pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "-C", repo, "show", OLD_ZMQ], capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="kvframe-bench-") as folder:
        path = os.path.join(folder, "old_zmq_transport.py")
        with open(path, "wb") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location("old_zmq_transport", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # pydantic resolves the config's annotations through it
        spec.loader.exec_module(module)
    return module.ZmqTransport


def make(kind: str):
    if kind.startswith("plugin:"):
        from kvframe import plugins
        from kvframe.plugins import validate_plugin_config

        return plugins.create("transports", validate_plugin_config("transports", kind[7:], "transport"))
    if kind == "tcp":
        from kvframe_transports.tcp import TcpConfig, TcpTransport

        return TcpTransport(TcpConfig())
    if kind == "shm":
        from kvframe_transports.shm import ShmConfig, ShmTransport

        return ShmTransport(ShmConfig())
    raise ValueError(kind)


def serve(kind: str) -> None:
    """Echo every message back until stdin closes."""
    if kind == "zmq":
        t = old_zmq()()
        sock, addr = t.router("tcp://127.0.0.1:0")
        print(addr, flush=True)
        while True:
            ident, header, data = t.recv(sock, router=True)
            if header["op"] == "stop":
                break
            t.send(sock, header, [f.buffer for f in data], ident=ident)
        sock.close(linger=0)
        t.close()
        return
    t = make(kind)
    print(t.listen("127.0.0.1", 0), flush=True)
    while True:
        got = t.recv(1.0)
        if got is None:
            continue
        peer, frames = got
        if bytes(frames[0]) == b"stop":
            break
        t.send(peer, frames)
    t.close()


def client(kind: str, addr: str, x: np.ndarray, reps: int) -> list[float]:
    times = []
    if kind == "zmq":
        t = old_zmq()()
        sock = t.dealer(addr)
        for _ in range(reps + 1):
            start = time.perf_counter()
            t.send(sock, {"op": "echo"}, [x])
            _, _, data = t.recv(sock)
            times.append(time.perf_counter() - start)
            assert data[0].buffer.nbytes == x.nbytes
        t.send(sock, {"op": "stop"})
        sock.close(linger=1000)
        t.close()
        return times[1:]
    t = make(kind)
    peer = t.connect(addr)
    t.send(peer, [b"hello"])  # a small first message: a large one is refused before the peer is trusted
    assert t.recv(60.0) is not None
    for _ in range(reps + 1):  # the first warms up page tables and socket buffers
        start = time.perf_counter()
        t.send(peer, [b"echo", x])
        _, frames = t.recv(60.0)
        times.append(time.perf_counter() - start)
        assert frames[1].nbytes == x.nbytes
    if kind == "shm":  # proof that the frames went through shared memory
        assert t.shared_memory_peers() == [peer], "shared memory was not used"
    t.send(peer, [b"stop"])
    t.close()
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kinds", default="tcp,shm,zmq")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    x = np.frombuffer(np.random.default_rng(0).bytes(args.mib << 20), dtype=np.uint8)
    for kind in args.kinds.split(","):
        if kind == "zmq":
            try:
                old_zmq()
            except Exception as exc:
                print(f"zmq: skipped ({exc})")
                continue
        server = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, text=True)
        try:
            addr = server.stdout.readline().strip()
            times = client(kind, addr, x, args.reps)
            server.wait(30)
        finally:
            if server.poll() is None:
                server.kill()
        med, best = statistics.median(times), min(times)
        rate = 2 * x.nbytes / med / 1e9
        print(f"{kind:4s} {args.mib} MiB round trip: median {med * 1e3:7.1f} ms, best {best * 1e3:7.1f} ms, "
              f"{rate:5.2f} GB/s (median)")


if __name__ == "__main__":
    main()
