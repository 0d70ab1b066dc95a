"""Writes data/mxnet_golden.npz: weights after each step of Apache MXNet 1.9.1's own optimizers
(through its Updater, as kv.push runs them), for test_mxnet_golden.py.

Run with MXNet's python:  /work/.venv-mxnet/bin/python tests/optimizers/make_mxnet_golden.py
The file holds only arrays plus one JSON entry (no pickle).
"""

import json
from pathlib import Path

import numpy as np

CLIP = {"wd": 0.05, "rescale_grad": 0.7, "clip_gradient": 0.5, "learning_rate": 0.1}
PLAIN = {"wd": 0.05, "rescale_grad": 0.7, "learning_rate": 0.1}
OPTS = {  # case -> (mxnet name, options)
    "sgd": ("sgd", {}), "sgd_mom": ("sgd", {"momentum": 0.9}), "nag": ("nag", {}),
    "nag_mom": ("nag", {"momentum": 0.9}), "signum": ("signum", {"wd_lh": 0.01}),
    "signsgd": ("signum", {"momentum": 0.0}), "ftml": ("ftml", {}), "lars": ("lars", {"momentum": 0.9}),
    "lars0": ("lars", {}), "lbsgd": ("lbsgd", {"momentum": 0.9}), "lamb": ("lamb", {}),
    "lamb_nobc": ("lamb", {"bias_correction": False, "lower_bound": 0.5, "upper_bound": 2.0}),
    "dcasgd": ("dcasgd", {}), "adam": ("adam", {}), "adagrad": ("adagrad", {}), "rmsprop": ("rmsprop", {}),
    "rmsprop_c": ("rmsprop", {"centered": True, "clip_weights": 1.5}), "adadelta": ("adadelta", {}),
    "ftrl": ("ftrl", {}), "adamax": ("adamax", {}), "nadam": ("nadam", {}),
    "groupadagrad": ("groupadagrad", {"wd": 0.0}), "test": ("test", {}), "ccsgd": ("ccsgd", {"momentum": 0.9}),
}
ROWS = [[0, 2], [1, 2, 5], [5]]


def cases():
    out = {}
    for k, (opt, kw) in OPTS.items():
        for tag, base in (("clip", CLIP), ("plain", PLAIN)):
            out[f"{k}-{tag}"] = {"opt": opt, "kw": {**base, **kw}, "steps": 3}
    out["lbsgd-bs"] = {"opt": "lbsgd", "kw": {**PLAIN, "momentum": 0.9, "batch_scale": 2, "warmup_epochs": 1,
                                              "updates_per_epoch": 4}, "steps": 5}
    out["lbsgd-lars"] = {"opt": "lbsgd", "kw": {**PLAIN, "momentum": 0.9, "batch_scale": 2,
                                                "warmup_strategy": "lars"}, "steps": 4}
    sparse = {"sgd": ("sgd", {"momentum": 0.9}), "sgd_dense": ("sgd", {"momentum": 0.9, "lazy_update": False}),
              "sgd0": ("sgd", {}), "adam": ("adam", {}), "adam_dense": ("adam", {"lazy_update": False}),
              "adagrad": ("adagrad", {"wd": 0.0}), "ftrl": ("ftrl", {}), "groupadagrad": ("groupadagrad", {"wd": 0.0}),
              "lars": ("lars", {"momentum": 0.9})}
    for k, (opt, kw) in sparse.items():
        for tag, base in (("clip", CLIP), ("plain", PLAIN)):
            out[f"rsp_{k}-{tag}"] = {"opt": opt, "kw": {**base, **kw}, "steps": 3, "rows": ROWS}
    for opt, kw in (("sgd", {"momentum": 0.9}), ("adam", {}), ("lamb", {})):
        out[f"mp_{opt}"] = {"opt": opt, "kw": {**PLAIN, **kw, "multi_precision": True}, "dtype": "float16", "steps": 3}
    sched = {"factor": {"step": 2, "factor": 0.5, "warmup_steps": 1, "warmup_begin_lr": 0.01},
             "cosine": {"max_update": 4, "final_lr": 0.001, "warmup_steps": 1}}
    for k, s in sched.items():
        out[f"sched_{k}"] = {"opt": "sgd", "kw": {"learning_rate": 0.1, "momentum": 0.5}, "sched": {"type": k, **s},
                             "steps": 5}
    return out


def main():
    import mxnet as mx
    from mxnet.optimizer import contrib  # noqa: F401  (registers groupadagrad)

    arrays = {}
    all_cases = cases()
    for name, case in all_cases.items():
        rs = np.random.RandomState(0)
        shape, dtype = (6, 5), case.get("dtype", "float32")
        w0 = rs.randn(*shape).astype(dtype)
        grads = [rs.randn(*shape).astype(dtype) for _ in range(case["steps"])]
        kw = dict(case["kw"])
        if "sched" in case:
            s = dict(case["sched"])
            cls = {"factor": mx.lr_scheduler.FactorScheduler, "cosine": mx.lr_scheduler.CosineScheduler}[s.pop("type")]
            kw["lr_scheduler"] = cls(base_lr=kw["learning_rate"], **s)
        opt = mx.optimizer.create(case["opt"], **kw)
        upd = mx.optimizer.get_updater(opt)
        w = mx.nd.array(w0, dtype=dtype)
        arrays[f"{name}/w0"] = w0
        for i, g in enumerate(grads):
            arrays[f"{name}/g{i}"] = g
            if "rows" in case:
                r = np.array(case["rows"][i], dtype=np.int64)
                gd = mx.nd.sparse.row_sparse_array((g[r], r), shape=shape, dtype=dtype)
            else:
                gd = mx.nd.array(g, dtype=dtype)
            upd(0, gd, w)
            arrays[f"{name}/w{i + 1}"] = w.asnumpy()
    meta = np.frombuffer(json.dumps(all_cases).encode(), dtype=np.uint8)
    path = Path(__file__).parent / "data" / "mxnet_golden.npz"
    np.savez_compressed(path, __cases__=meta, **arrays)
    print(f"wrote {path} ({len(all_cases)} cases, MXNet {mx.__version__})")


if __name__ == "__main__":
    main()
