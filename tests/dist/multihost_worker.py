"""The worker of the multi-host tests (tests/dist/test_multihost.py): started on a simulated host
with MXNet's variables only, it checks exact sums against numpy and prints JSON lines ``KVF {...}``.

Settings (environment): KVTYPE (dist_sync | dist_async), ROUNDS, BIG (elements of key 0; above
KVFRAME_BIGARRAY_BOUND, default 1e6, so it is split over the servers), SMALL (number of small keys),
KVOPT (dist_async: 'test' or 'sgd' on the servers), MODE ('sums', or 'forever': keep pushing until
the job fails, as for a link taken down mid-job).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np


def say(**kw) -> None:
    print("KVF " + json.dumps(kw, default=str), flush=True)


def main() -> int:
    import kvframe

    kvtype = os.environ.get("KVTYPE", "dist_sync")
    rounds = int(os.environ.get("ROUNDS", "5"))
    big_n = int(os.environ.get("BIG", "1200000"))
    n_small = int(os.environ.get("SMALL", "50"))
    mode = os.environ.get("MODE", "sums")
    opt = os.environ.get("KVOPT", "test")

    kv = kvframe.create(kvtype)
    rank, nw = kv.rank, kv.num_workers
    say(event="start", rank=rank, num_workers=nw, kvtype=kvtype)

    keys = [0] + [100 + k for k in range(n_small)]
    shapes = [(big_n,)] + [(k + 1,) for k in range(n_small)]
    base = np.arange(big_n, dtype=np.int64) % 251

    def grad(w: int, r: int, i: int) -> np.ndarray:
        # small integers: float32 sums stay exact, and every element, worker and round differs
        if i == 0:
            return (base + w * 3 + r).astype(np.float32)
        return np.arange(shapes[i][0], dtype=np.float32) + (i + 7 * w + 11 * r)

    def reference_round(r: int, i: int) -> np.ndarray:
        return sum(grad(w, r, i) for w in range(nw))

    kv.init(keys, [np.full(s, 2.0, np.float32) for s in shapes])
    if kvtype == "dist_async":
        if opt == "sgd":
            kv.set_optimizer("sgd", learning_rate=1.0)
        else:
            kv.set_optimizer(opt)
    kv.barrier()

    outs = [np.empty(s, np.float32) for s in shapes]
    mismatches: list = []
    done = 0
    limit = rounds if mode == "sums" else 1_000_000
    for r in range(limit):
        kv.push(keys, [grad(rank, r % 1000, i) for i in range(len(keys))])
        kv.pull(keys, out=outs)
        if kvtype == "dist_sync":
            # no updater: a round's value is the sum of that round's pushes
            for i, o in enumerate(outs):
                want = reference_round(r % 1000, i)
                if not np.array_equal(o, want) and len(mismatches) < 5:
                    bad = int(np.flatnonzero(o != want)[0])
                    mismatches.append({"round": r, "key": keys[i], "at": bad, "got": float(o[bad]),
                                       "want": float(want[bad])})
        done = r + 1
        say(event="round", n=done, rank=rank)
        if mode != "sums":
            time.sleep(0.05)
    kv.barrier()
    if kvtype == "dist_async":
        # every push applied once by the optimizer: init + (sign) * all gradients of all rounds
        kv.pull(keys, out=outs)
        sign = -1.0 if opt == "sgd" else 1.0
        for i, o in enumerate(outs):
            want = np.full(shapes[i], 2.0, np.float32) + sign * sum(reference_round(r, i) for r in range(rounds))
            if not np.array_equal(o, want) and len(mismatches) < 5:
                bad = int(np.flatnonzero(o != want)[0])
                mismatches.append({"key": keys[i], "at": bad, "got": float(o[bad]), "want": float(want[bad])})
    info_fn = getattr(kv.backend, "transport_info", None)
    info = info_fn() if callable(info_fn) else {"missing": "kv.backend.transport_info() does not exist"}
    stats_fn = getattr(kv.backend, "server_stats", None)
    elements = None
    if callable(stats_fn):
        try:
            elements = [s.get("elements") for s in stats_fn()]
        except Exception as exc:  # noqa: BLE001 - auxiliary information only
            elements = repr(exc)
    try:
        shm = sorted(os.listdir("/dev/shm"))
    except OSError as exc:
        shm = [repr(exc)]
    kv.barrier()
    say(event="result", rank=rank, rounds=done, mismatches=mismatches, ok=not mismatches, transport_info=info,
        server_elements=elements, dev_shm=shm)
    kv.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - reported as a line the test reads, then a non-zero exit
        say(event="error", type=type(exc).__name__, msg=str(exc))
        traceback.print_exc()
        sys.exit(3)
