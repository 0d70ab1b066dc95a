"""A third-party transport, 'plainpipe' from the pip-installed test plugin package (tests/plugins),
is found by name through its entry point, and passes the conformance suite like the built-in ones."""

import subprocess
import sys
import textwrap

import numpy as np

from kvframe import plugins
from kvframe.plugins import validate_plugin_config
from kvframe.protocols import Transport
from kvframe.testing import TransportConformance
from kvframe.testing.transport_conformance import assert_frame, recv_within


class TestPlainPipeConformance(TransportConformance):
    # built through kvframe.plugins by name: nothing in kvframe names the plugin
    transport_name = "plainpipe"


def _make(**options):
    config = validate_plugin_config("transports", {"type": "plainpipe", **options}, "transport config")
    return plugins.create("transports", config)


def test_found_through_its_entry_point_with_its_config_model():
    reg = plugins.lookup("transports", "plainpipe")
    assert reg.distribution == "kvframe-testplugin" and reg.version == "0.0.1"
    assert reg.factory.__module__ == "kvframe_testplugin.transport"
    t = _make(max_message_bytes=1 << 20)
    try:
        assert isinstance(t, Transport)
        assert type(t.config).__name__ == "PlainPipeConfig" and t.config.max_message_bytes == 1 << 20
    finally:
        t.close()


def test_messages_cross_processes():
    # the other process finds the transport by name too, and echoes what it receives
    code = """
        import sys, time
        from kvframe import plugins
        from kvframe.plugins import validate_plugin_config
        t = plugins.create('transports', validate_plugin_config('transports', 'plainpipe', 'transport config'))
        print(t.listen('127.0.0.1', 0), flush=True)
        got = t.recv(30)
        if got is not None:
            peer, frames = got
            t.send(peer, frames[::-1])
            deadline = time.monotonic() + 30
            while t.broken(peer) is None and time.monotonic() < deadline:  # until the test closes its end
                time.sleep(0.05)
        t.close()
        print('kvframe_transports' in sys.modules, flush=True)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    client = _make()
    try:
        to_server = client.connect(proc.stdout.readline().strip())
        big = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)
        client.send(to_server, [b"first", big])
        back, frames = recv_within(client, 30)
        assert back == to_server
        assert_frame(frames[0], big, "the echoed array")
        assert bytes(frames[1]) == b"first"
    finally:
        client.close()
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0
    assert out.strip() == "False", "the third-party transport must not need kvframe-transports"
