"""Run by test_wheels.py, not collected by pytest: the main paths of the stores, in an environment
installed from the wheels on the oldest supported numpy, and again in the development environment.
Prints one JSON line of exact results (float32 values as Python floats) that the test compares between
the two and with hand-checked values; no result depends on the numpy version or on numba."""

import json
import sys

import numpy as np

import kvframe
from kvframe.arrays import RowSparseArray
from kvframe.errors import KVFrameError

res: dict = {}


def pulled(kv, key, shape):
    out = np.empty(shape, np.float32)
    kv.pull(key, out=out)
    return out.tolist()


# local: per-device values summed; a repeated key summed
kv = kvframe.create("local")
kv.init("w", np.zeros((2, 3), np.float32))
kv.push("w", [np.ones((2, 3), np.float32)] * 4)
res["local_sum"] = pulled(kv, "w", (2, 3))
kv.push(["w", "w"], [np.full((2, 3), 0.25, np.float32), np.full((2, 3), 0.5, np.float32)])
res["local_repeated_key"] = pulled(kv, "w", (2, 3))
kv.close()

# device: the same sum over simulated devices, then 2bit compression with its residuals (MXNet's
# hand-checked sequence: threshold 0.5, a push of two devices twice)
a = np.float32([0.4, 0.6, -0.7, 0.1])
b = np.float32([0.6, 0.6, -0.2, 0.1])
kv = kvframe.create("device")
kv.init(3, np.zeros(4, np.float32))
kv.push(3, [a, b])
res["device_sum"] = pulled(kv, 3, 4)
kv.close()
kv = kvframe.create("device")
kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
kv.init(3, np.zeros(4, np.float32))
kv.push(3, [a, b])
res["2bit_first"] = pulled(kv, 3, 4)
kv.push(3, [a, b])
res["2bit_second"] = pulled(kv, 3, 4)
kv.close()

# an Adam step on the store: two devices' gradients summed, then the update
kv = kvframe.create("local")
kv.init(0, np.ones((4, 3), np.float32))
kv.set_optimizer("adam", learning_rate=0.1)
kv.push(0, [np.ones((4, 3), np.float32), np.full((4, 3), 2.0, np.float32)])
res["adam_step"] = pulled(kv, 0, (4, 3))
kv.close()

# row-sparse: pull of some rows (unsorted, repeated ids), and a lazy SGD update of the pushed rows only
kv = kvframe.create("local")
weight = np.arange(12, dtype=np.float32).reshape(6, 2)
kv.init("emb", weight)
out = RowSparseArray.zeros((6, 2))
kv.row_sparse_pull("emb", out=out, row_ids=np.array([3, 1, 3, 1]))
res["row_sparse_pull"] = {"indices": out.indices.tolist(), "data": out.data.tolist()}
kv.init("lazy", np.ones((5, 2), np.float32))
kv.set_optimizer("sgd", learning_rate=0.5, wd=0.1, momentum=0.9)
kv.push("lazy", [RowSparseArray(np.ones((1, 2), np.float32), [3], (5, 2)),
                 RowSparseArray(np.ones((2, 2), np.float32), [1, 3], (5, 2))])
res["row_sparse_sgd"] = pulled(kv, "lazy", (5, 2))
kv.close()

# an unknown store: the error lists what is installed (never the test suite's plugins here)
try:
    kvframe.create("no_such_store")
except KVFrameError as exc:
    res["unknown_store_error"] = str(exc)

res["numpy"] = np.__version__
res["kvframe_file"] = kvframe.__file__
print("RESULT " + json.dumps(res), flush=True)
sys.exit(0)
