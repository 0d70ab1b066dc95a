"""The worker of the launcher tests (tests/dist/test_launchers.py): a 'dist_sync' store started by
kvframe-launch on a remote host; init, push and pull a small key and a big one (split over the
servers) and print the results as one JSON line ``RESULT {...}``; the test checks the exact sums."""

import json
import os
import subprocess

import numpy as np

import kvframe

BIG = 1500  # above KVFRAME_BIGARRAY_BOUND=1000 (set by the test): split over both servers
kv = kvframe.create("dist_sync")
rank, nw = kv.rank, kv.num_workers
kv.init([3, 9], [np.zeros(5, np.float32), np.zeros(BIG, np.float32)])
small, big = np.empty(5, np.float32), np.empty(BIG, np.float32)
kv.push([3, 9], [np.full(5, rank + 1.0, np.float32), np.arange(BIG, dtype=np.float32) * (rank + 1)])
kv.pull([3, 9], out=[small, big])
print("RESULT " + json.dumps({"rank": rank, "num_workers": nw, "small": small.tolist(), "big_sum": float(big.sum()),
                              "big_head": big[:3].tolist(), "role": os.environ.get("DMLC_ROLE"),
                              "ips": subprocess.run(["ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True,
                                                    text=True, timeout=10).stdout.split()[3:4]}), flush=True)
kv.close()
