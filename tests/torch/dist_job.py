"""One dist_sync job (2 workers, 1 server, started by kvframe-launch from test_dist.py) running every
distributed scenario of the torch tests in turn on one store; each worker writes what it saw to
$KVF_TORCH_RESULT (``{rank}`` replaced). The server runs SGD from the start, so every scenario that
only sums proves that sums bypass the server's optimizer."""

from __future__ import annotations

import json
import os
import sys

import kvframe_torch
import torch
from torch_helpers import LR, MOMENTUM, STEPS, data, flat, loss_of, make_model, share

import kvframe

torch.set_num_threads(1)
store = kvframe.create("dist_sync")
rank, n = store.rank, store.num_workers
store.set_optimizer("sgd", learning_rate=LR, momentum=MOMENTUM)  # on the server
X, Y = data()
out: dict = {"rank": rank, "num_workers": n}


def train(prefix: str, steps=range(STEPS), model=None, opt=None, lr=LR, passes=1, clip=None, **kw) -> dict:
    model = model or make_model()
    if opt is None:
        opt = kvframe_torch.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM), store,
                                                 model.named_parameters(), prefix=prefix,
                                                 backward_passes_per_step=passes, **kw)
    losses, params = [], []
    for s in steps:
        opt.zero_grad()
        x, y = share(X[s], rank, n), share(Y[s], rank, n)
        total = 0.0
        for xs, ys in zip(x.tensor_split(passes), y.tensor_split(passes)):
            loss = loss_of(model, xs, ys) / passes
            loss.backward()
            total += float(loss)
        # the metric: averaged over the workers while the server runs SGD for the store's own keys
        losses.append(float(kvframe_torch.allreduce(torch.tensor([total]), store, "loss")))
        if clip is not None:
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        params.append(flat(model))
    return {"losses": losses, "params": params, "model": model, "opt": opt}


def keep(r: dict) -> dict:
    return {"losses": r["losses"], "params": r["params"]}


# both modes, averaging -------------------------------------------------------------------------------
out["sum"] = keep(train("sum/"))
out["store"] = keep(train("store/", update_on_store=True))
out["no_average"] = keep(train("noavg/", lr=LR / n, average=False))
out["passes"] = keep(train("passes/", passes=2))
out["clip"] = keep(train("clip/", clip=0.05))

# a checkpoint after 3 steps, resumed by a new model and optimizer -------------------------------------
first = train("ckpt/", steps=range(3))
ckpt = {"model": first["model"].state_dict(), "opt": first["opt"].state_dict()}
model2 = make_model(seed=99)
model2.load_state_dict(ckpt["model"])
opt2 = kvframe_torch.DistributedOptimizer(torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.0), store,
                                          model2.named_parameters(), prefix="ckpt2/")
opt2.load_state_dict(ckpt["opt"])  # momentum buffers, lr and momentum come back
rest = train("", steps=range(3, STEPS), model=model2, opt=opt2)
out["resumed"] = {"losses": first["losses"] + rest["losses"], "params": first["params"] + rest["params"]}

# broadcasts --------------------------------------------------------------------------------------------
m = make_model(seed=10 + rank)
kvframe_torch.broadcast_parameters(m.state_dict(), store, root_rank=0)
out["bcast0"] = flat(m)
m = make_model(seed=10 + rank)
kvframe_torch.broadcast_parameters(m.named_parameters(), store, root_rank=1)
out["bcast1"] = flat(m)

m = make_model(seed=0)
opt = torch.optim.SGD(m.parameters(), lr=0.01 * (rank + 1), momentum=0.5)
if rank == 1:  # only the root has momentum buffers
    for s in range(2):
        opt.zero_grad()
        loss_of(m, X[s], Y[s]).backward()
        opt.step()
kvframe_torch.broadcast_optimizer_state(opt, store, root_rank=1)
sd = opt.state_dict()
out["opt_state"] = {"lr": sd["param_groups"][0]["lr"], "momentum": sd["param_groups"][0]["momentum"],
                    "buffers": [sd["state"][i]["momentum_buffer"].reshape(-1).tolist() for i in sorted(sd["state"])]}
out["object"] = kvframe_torch.broadcast_object({"from": rank, "list": [1, 2.5, None]}, store, root_rank=1)

# allreduce of other dtypes and shapes ---------------------------------------------------------------------
out["allreduce_int"] = kvframe_torch.allreduce(torch.tensor([rank + 1, 10], dtype=torch.int64), store, "ints",
                                               average=False).tolist()
out["allreduce_scalar"] = float(kvframe_torch.allreduce(2.0 * rank, store, "scalar"))
t = torch.full((3, 2), float(rank), dtype=torch.float64)
kvframe_torch.allreduce_(t, store, "f64")
out["allreduce_f64"] = t.tolist()
store.barrier()
store.close()
with open(os.environ["KVF_TORCH_RESULT"].replace("{rank}", str(rank)), "w") as f:
    json.dump(out, f)
print("DONE", file=sys.stderr)
