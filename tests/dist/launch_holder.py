"""The worker of the local launcher tests (tests/dist/test_launchers.py): a real 'dist_sync' store
(init and one pushpull, so the job's sessions and its shared-memory directory are in use); prints
one line ``HELD {...}`` saying what it was given (the secret as its SHA-256, so that the output
does not show it) and what it saw.

KVFRAME_TEST_INTRUDE=1: also connects to the scheduler as an intruder with a wrong secret and
reports the refusal.  KVFRAME_TEST_HOLD=1: then sleeps, so that a test can signal the launcher;
with KVFRAME_TEST_GRANDCHILD=1 it first starts a child of its own that ignores SIGTERM (only a
SIGKILL to its process group stops it)."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

import kvframe

kv = kvframe.create("dist_sync")
kv.init(0, np.zeros(4, np.float32))
out = np.empty(4, np.float32)
kv.pushpull(0, np.ones(4, np.float32), out=out)
secret = os.environ.get("KVFRAME_SECRET")
info = {"rank": kv.rank, "sum": out.tolist(), "pid": os.getpid(), "shm_dir": os.environ.get("KVFRAME_SHM_DIR"),
        "secret": hashlib.sha256(secret.encode()).hexdigest() if secret else None,
        "secret_len": len(secret or ""), "transport": kv.backend.transport_info()["transport"]}
if os.environ.get("KVFRAME_TEST_INTRUDE") == "1":
    from kvframe_dist.endpoint import Endpoint, Refused, make_transport
    from kvframe_dist.env import node_env

    env = node_env("worker")
    ep = Endpoint(make_transport(env.transport), b"not the job's secret", "intruder")
    try:
        ep.connect(env.scheduler_addr)
        info["intruder"] = "accepted"
    except Refused as exc:
        info["intruder"] = str(exc)
    finally:
        ep.close()
if os.environ.get("KVFRAME_TEST_GRANDCHILD") == "1":
    child = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE)
    child.stdout.readline()  # SIGTERM is ignored from here on
    info["grandchild"] = child.pid
print("HELD " + json.dumps(info), flush=True)
if os.environ.get("KVFRAME_TEST_HOLD") == "1":
    time.sleep(120)
kv.close()
