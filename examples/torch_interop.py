"""Driving kvframe from PyTorch (CPU tensors) through DLPack.

A small torch model is trained data-parallel over two simulated devices (two replicas): autograd
computes each replica's gradients, ``kv.push`` sums them, SGD with momentum runs on the store, and
``kv.pull`` writes the new weights straight into each replica's parameters.  No conversion code:
kvframe accepts anything with ``__dlpack__``.

What is and is not zero-copy (CPU tensors):

- ``push(key, tensor)`` / ``push(key, [t0, t1])``: **zero-copy read.**  The tensor is viewed as a
  numpy array over the same memory (``np.from_dlpack``) and the store sums straight from it; the
  sum lands in the store's own buffer (that is the stored value, not a copy of the input).
- ``pull(key, out=tensor)``, ``pushpull(key, grads)`` (in place) and ``broadcast(..., out=...)``:
  **zero-copy write.**  The value is written into the tensor's own memory; no temporary array, no
  copy back.  Pass ``param.data`` (or ``param.detach()``, which shares memory) to update a
  ``requires_grad`` parameter in place.  Non-contiguous tensors (a transpose, a slice) work too:
  DLPack carries the strides.
- ``init(key, tensor)``: **copies**, by design: the store keeps its own value (MXNet does too).
- Not accepted without a copy by you: tensors with ``requires_grad=True`` (torch refuses to export
  them: use ``.detach()``, which is free), tensors with a pending conjugate or negative bit
  (``.resolve_conj()`` / ``.resolve_neg()``), and dtypes numpy lacks, such as ``torch.bfloat16``
  (convert with ``.float()``, which copies).  Sparse torch tensors are not DLPack arrays: use
  ``kvframe.RowSparseArray``.
- CUDA tensors become cupy arrays through DLPack (zero-copy too) when cupy is installed; this
  example stays on the CPU.

Run: ``python examples/torch_interop.py`` (needs torch; ``pip install torch``).
"""

from __future__ import annotations

import sys

import kvframe
from kvframe.arrays import as_native

try:
    import torch
except ImportError:  # pragma: no cover - the test skips without torch
    sys.exit("this example needs PyTorch: pip install torch (the CPU build is enough)")


def same_memory(t: torch.Tensor) -> bool:
    """Whether kvframe's view of ``t`` is the tensor's own memory (no copy)."""
    view = as_native(t)
    return view.__array_interface__["data"][0] == t.data_ptr()


def zero_copy_report() -> list[tuple[str, bool]]:
    """Checks, on real tensors, which operations read or write the tensor's memory directly."""
    kv = kvframe.create("local")  # no optimizer: the store holds the sums
    rows = []
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    rows.append(("push: kvframe reads the tensor's memory", same_memory(t)))

    kv.init("probe", torch.zeros(3, 4))
    out = torch.zeros(3, 4)
    ptr = out.data_ptr()
    kv.push("probe", [t, t])
    kv.pull("probe", out=out)
    rows.append(("pull(out=tensor): written in place", out.data_ptr() == ptr and bool((out == 2 * t).all())))

    strided = torch.zeros(4, 3).t()  # a transposed, non-contiguous view
    kv.pull("probe", out=strided)
    rows.append(("pull into a non-contiguous tensor", (not strided.is_contiguous()) and bool((strided == 2 * t).all())))

    grads = [torch.ones(3, 4), torch.full((3, 4), 2.0)]
    ptrs = [g.data_ptr() for g in grads]
    kv.pushpull("probe", grads)  # in place: every replica gets the sum
    rows.append(("pushpull(grads) in place", [g.data_ptr() for g in grads] == ptrs
                 and all(bool((g == 3.0).all()) for g in grads)))

    src = torch.ones(3, 4)
    kv.init("copied", src)
    src += 5  # the store kept its own copy at init
    back = torch.empty(3, 4)
    kv.pull("copied", out=back)
    rows.append(("init copies (later changes to the tensor do not reach the store)", bool((back == 1.0).all())))

    try:
        kv.push("probe", torch.ones(3, 4, requires_grad=True))
        refused = False
    except TypeError:  # kvframe names the key and passes on torch's reason
        refused = True
    rows.append(("requires_grad tensors are refused (pass .detach())", refused))
    kv.close()
    return rows


def train(epochs: int = 30, replicas: int = 2, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n, d = 512, 8
    x = torch.randn(n, d, generator=g)
    true_w = torch.randn(d, 1, generator=g)
    y = torch.tanh(x @ true_w) + 0.05 * torch.randn(n, 1, generator=g)

    base = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    models = [torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
              for _ in range(replicas)]
    for m in models:
        m.load_state_dict(base.state_dict())
    names = [name for name, _ in base.named_parameters()]

    kv = kvframe.create("local")
    batch = 64
    kv.set_optimizer("sgd", learning_rate=0.1, momentum=0.9, rescale_grad=1.0 / batch)
    kv.init(names, [p.detach() for p in base.parameters()])  # copied into the store

    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        total = 0.0
        for s in range(n // batch):
            idx = order[s * batch:(s + 1) * batch]
            for m, part in zip(models, idx.chunk(replicas)):
                m.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x[part]), y[part], reduction="sum")
                loss.backward()
                total += float(loss.detach())
            params = [list(m.parameters()) for m in models]  # per replica, per key
            with torch.no_grad():
                # per key, the list of per-replica gradients: summed by the store, read in place
                kv.push(names, [[ps[k].grad for ps in params] for k in range(len(names))])
                # the new weights land straight in every replica's parameters (p.data shares memory)
                kv.pull(names, out=[[ps[k].data for ps in params] for k in range(len(names))])
        losses.append(total / n)
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(models[0](x), y))
        agree = all(torch.equal(a, b) for m in models[1:] for a, b in zip(models[0].parameters(), m.parameters()))
    kv.close()
    return {"losses": losses, "final_mse": final, "replicas_agree": agree, "zero_copy": zero_copy_report()}


def main() -> int:
    res = train()
    print(f"torch {torch.__version__}, kvframe store 'local', 2 replicas, sgd on the store")
    for i in (0, 9, 19, 29):
        print(f"epoch {i + 1:>2}  train mse {res['losses'][i]:.4f}")
    print(f"final: mse={res['final_mse']:.4f} replicas_agree={res['replicas_agree']}")
    print("zero-copy checks:")
    for what, ok in res["zero_copy"]:
        print(f"  [{'ok' if ok else 'NO'}] {what}")
    return 0 if res["replicas_agree"] and all(ok for _, ok in res["zero_copy"]) else 1


if __name__ == "__main__":
    sys.exit(main())
