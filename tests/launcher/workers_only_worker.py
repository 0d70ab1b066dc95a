"""Run as a worker of a workers-only job (kvframe-launch -s 0), not collected by pytest: prints one line
``RESULT {...}`` with what the launcher gave it, what store 'nccl' reads from that
(kvframe_nccl.launch_env, pure Python) and the hash of the unique id that a real rendezvous
(kvframe_nccl.rendezvous, plain sockets, the job's secret as its token) brought from rank 0."""

import hashlib
import json
import os

env = os.environ
out = {k: env.get(k) for k in ("KVFRAME_ROLE", "KVFRAME_RANK", "KVFRAME_WORLD_SIZE", "KVFRAME_NUM_WORKERS",
                               "KVFRAME_NUM_SERVERS", "KVFRAME_LOCAL_RANK", "KVFRAME_ROOT_URI", "KVFRAME_ROOT_PORT",
                               "KVFRAME_RANK_FROM_MPI", "OMPI_COMM_WORLD_RANK", "KVFRAME_TEST_TOKEN")}
out["secret"] = hashlib.sha256(env["KVFRAME_SECRET"].encode()).hexdigest() if env.get("KVFRAME_SECRET") else None
try:
    from kvframe_nccl.launch_env import detect_launch, rendezvous_address
    from kvframe_nccl.rendezvous import exchange_unique_id
except ImportError:
    pass
else:
    info = detect_launch()
    host, port = rendezvous_address()
    out["nccl"] = [info.rank, info.world_size, info.local_rank, info.source, host, port]
    uid = exchange_unique_id(info.rank, info.world_size, host, port, lambda: bytes(range(128)), timeout=30,
                             token=env["KVFRAME_SECRET"])
    out["uid"] = hashlib.sha256(uid).hexdigest()
print("RESULT " + json.dumps(out), flush=True)
