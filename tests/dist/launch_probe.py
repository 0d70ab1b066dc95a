"""A stand-in process for tests/dist/test_launchers.py: prints one JSON line saying where it runs
(the IPv4 addresses of its network namespace, from ``ip -4 -o addr``) and what it was given (job
variables, argv, cwd, pid; the job's secret as its SHA-256, so that the output does not show it).
With KVFRAME_TEST_HOLD=1 it then prints READY and sleeps, so a test can kill the launcher or an ssh
and watch this process go."""

import hashlib
import json
import os
import subprocess
import sys
import time

NAMES = ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER",
         "DMLC_INTERFACE", "KVFRAME_RANK", "KVFRAME_RANK_FROM_MPI", "OMPI_COMM_WORLD_RANK", "KVFRAME_TEST_TOKEN",
         "PYTHONUNBUFFERED")

ips = [ln.split()[3].split("/")[0] for ln in subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                                                            text=True, timeout=10).stdout.splitlines()]
print("PROBE " + json.dumps({"env": {k: os.environ.get(k) for k in NAMES}, "ips": ips, "argv": sys.argv[1:],
                             "cwd": os.getcwd(), "pid": os.getpid(),
                             "secret": hashlib.sha256(os.environ["KVFRAME_SECRET"].encode()).hexdigest()
                             if "KVFRAME_SECRET" in os.environ else None}), flush=True)
if os.environ.get("KVFRAME_TEST_HOLD") == "1":
    print("READY", flush=True)
    time.sleep(120)
