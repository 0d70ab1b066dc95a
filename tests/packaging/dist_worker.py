"""Run by test_wheels.py under kvframe-launch, not collected by pytest: a 'dist_sync' worker that pushes
two devices' values of one key and prints the pulled sum (exact in float32) as one JSON line."""

import json

import kvframe_dist
import numpy as np

import kvframe

kv = kvframe.create("dist_sync")
kv.init(3, np.zeros(5, np.float32))
kv.push(3, [np.full(5, 1.5, np.float32), np.arange(5, dtype=np.float32) * 0.25])
out = np.empty(5, np.float32)
kv.pull(3, out=out)
print("RESULT " + json.dumps({"sum": out.tolist(), "rank": kv.rank, "num_workers": kv.num_workers,
                              "kvframe_file": kvframe.__file__, "kvframe_dist_file": kvframe_dist.__file__}),
      flush=True)
kv.close()
