"""``DistributedOptimizer``: any torch.optim optimizer, with its gradients summed through a kvframe store.

Gradient hooks (``register_post_accumulate_grad_hook``) hand each gradient to the store as soon as
autograd has accumulated it, so communication overlaps the rest of the backward pass; ``step()``
waits only for what is still in flight. Parameters are grouped into buckets in the order their
gradients come (reverse layer order), and each complete bucket is one non-blocking batched
``pushpull``; its priority follows layer order (the first layer highest, as MXNet's Trainer did),
so a server serves the gradients the next forward pass needs first.

Two modes:

* ``update_on_store=False`` (default): the store only sums, through sum-only keys
  (``kvframe.sum_key``), so the store may run an optimizer for other keys; the sums come back into
  ``p.grad`` (divided by the number of workers with ``average``), and the wrapped torch optimizer
  steps on every worker. Works on every store that sums across processes (dist_sync,
  dist_device_sync, nccl) and on the single-process ones.
* ``update_on_store=True``: the store's own optimizer (``store.set_optimizer``; on the servers in
  dist stores) updates the weights; each bucket's pushpull brings the new weights straight into the
  parameters, and the torch optimizer only holds the parameter groups.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import kvframe
from kvframe.errors import NotSupportedError
from kvframe_torch._tensors import NATIVE, native, store_can_use, wire_dtype
from kvframe_torch.collectives import PREFIX, check_str_keys, check_summing_store
from kvframe_torch.compression import resolve_compression

DEFAULT_BUCKET_BYTES = 4 << 20
STORE_STATES = "kvframe_store_optimizer_states"  # the state_dict entry of update_on_store=True


def _direct(t: torch.Tensor) -> bool:
    """Whether the store can read and write ``t`` itself (no staging copy)."""
    return t.dtype in NATIVE and t.is_contiguous() and store_can_use(t)


class _Slot:
    """One parameter: its key, bucket, passes counted since the last step, staging buffers."""

    __slots__ = ("param", "name", "key", "index", "bucket", "passes", "wire", "staged_grad", "scratch",
                 "staged_weight")

    def __init__(self, param: torch.Tensor, name: str, key: str, index: int):
        self.param, self.name, self.key, self.index = param, name, key, index
        self.bucket: _Bucket | None = None
        self.passes = 0
        self.wire = wire_dtype(param.dtype, False, f"parameter {name!r}")
        self.staged_grad: torch.Tensor | None = None
        self.scratch: torch.Tensor | None = None
        self.staged_weight: torch.Tensor | None = None

    def buffer(self, attr: str, like: torch.Tensor) -> torch.Tensor:
        """A reusable tensor of this parameter's shape and wire dtype, where the store can use it."""
        buf = getattr(self, attr)
        device = like.device if store_can_use(like) else torch.device("cpu")
        if buf is None or buf.device != device or buf.shape != like.shape:
            buf = torch.empty(tuple(like.shape), dtype=self.wire, device=device)
            setattr(self, attr, buf)
        return buf


class _Bucket:
    __slots__ = ("slots", "keys", "priority", "ready", "handle", "after")

    def __init__(self, slots: list[_Slot]):
        self.slots = slots
        self.keys = [s.key for s in slots]
        self.priority = -min(s.index for s in slots)  # layer order: the first layer's gradients first
        self.ready = 0
        self.handle: Any = None
        self.after: list = []  # (source, destination) copies once the handle is done


def _names(params: list[torch.Tensor], named_parameters: Any) -> list[str]:
    if named_parameters is None:
        return [f"param.{i}" for i in range(len(params))]
    by_id: dict[int, str] = {}
    used: set[str] = set()
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError("named_parameters must be (name, parameter) pairs, e.g. model.named_parameters(); got "
                            f"an item {type(item).__name__}")
        name, p = item
        if name in used:
            raise ValueError(f"named_parameters: the name {name!r} is given twice; names must be unique")
        used.add(name)
        by_id.setdefault(id(p), name)
    missing = [tuple(p.shape) for p in params if id(p) not in by_id]
    if missing:
        raise ValueError(f"named_parameters lacks {len(missing)} of the optimizer's parameters (shapes "
                         f"{missing[:4]}{', ...' if len(missing) > 4 else ''}): give the names of every parameter "
                         "the optimizer updates")
    return [by_id[id(p)] for p in params]


if TYPE_CHECKING:  # a mixin: at run time it stands in front of the wrapped optimizer's class
    _OptimizerBase = torch.optim.Optimizer
else:
    _OptimizerBase = object


class _KVFrameDistributed(_OptimizerBase):
    """What a DistributedOptimizer adds in front of the wrapped optimizer's class (see the module)."""

    _kvf_ready = False

    # setup ------------------------------------------------------------------------------------
    def _kvf_setup(self, store: Any, named_parameters: Any, compression: Any, average: bool,
                   backward_passes_per_step: int, update_on_store: bool, bucket_bytes: int, prefix: str) -> None:
        if not all(hasattr(store, a) for a in ("pushpull", "init", "keys", "num_workers")):
            raise TypeError(f"store must be a kvframe store (kvframe.create(...)); got {type(store).__name__}")
        if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be a positive int; got {backward_passes_per_step!r}")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 0:
            raise ValueError(f"bucket_bytes must be an int >= 0 (0: one key per call); got {bucket_bytes!r}")
        self._kvf_store = store
        self._kvf_average = bool(average)
        self._kvf_bpps = backward_passes_per_step
        self._kvf_on_store = bool(update_on_store)
        what = "DistributedOptimizer"
        check_str_keys(store, what)
        if self._kvf_on_store:
            opt = getattr(store, "optimizer", None)
            if opt is None:
                raise ValueError("update_on_store=True updates the weights with the store's optimizer: call "
                                 "store.set_optimizer(...) first (in dist stores it runs on the servers)")
            rescale = getattr(getattr(opt, "config", None), "rescale_grad", 1.0)
            if self._kvf_average and store.num_workers > 1 and rescale != 1.0:
                warnings.warn(f"average=True already divides the pushed gradients by the {store.num_workers} workers; "
                              f"the store's optimizer has rescale_grad={rescale}, which scales them again",
                              stacklevel=3)
        else:
            check_summing_store(store, what + " (update_on_store=False)")

        params: list[torch.Tensor] = []
        seen: set[int] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("a parameter is in two of the optimizer's parameter groups")
                seen.add(id(p))
                if p.requires_grad:
                    params.append(p)
        if not params:
            raise ValueError("the optimizer has no parameter that requires grad")
        names = _names(params, named_parameters)
        slots = []
        for i, (p, name) in enumerate(zip(params, names)):
            key = f"{prefix}{name}" if self._kvf_on_store else kvframe.sum_key(f"{PREFIX}grad/{prefix}{name}")
            slots.append(_Slot(p, name, key, i))
        self._kvf_slots = {p: s for p, s in zip(params, slots)}
        self._kvf_order = slots

        # buckets, in the order gradients come (the reverse of the parameters' order)
        buckets: list[_Bucket] = []
        current: list[_Slot] = []
        size = 0
        for s in reversed(slots):
            nbytes = s.param.numel() * s.param.element_size()
            if current and size + nbytes > bucket_bytes:
                buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(s)
            size += nbytes
        if current:
            buckets.append(_Bucket(current))
        for b in buckets:
            for s in b.slots:
                s.bucket = b
        self._kvf_buckets = buckets
        self._kvf_inflight: list[_Bucket] = []
        self._kvf_synced = False
        self._kvf_skip_sync = False
        self._kvf_initialised = False
        self._kvf_pending_states: bytes | None = None

        if compression is not None:
            config = resolve_compression(compression)
            if config is not None:
                store.set_gradient_compression(config)
        self._kvf_hooks = [p.register_post_accumulate_grad_hook(self._kvf_on_grad) for p in params]
        self._kvf_ready = True

    def _kvf_init_keys(self) -> None:
        """Initialise the store's keys (collective: every worker's first backward pass comes here)."""
        if self._kvf_initialised:
            return
        store = self._kvf_store
        keys, values = [], []
        for s in self._kvf_order:
            p = s.param.detach()
            if self._kvf_on_store:
                value = p if _direct(p) else p.to(device=s.buffer("staged_weight", p).device, dtype=s.wire)
            else:
                device = p.device if store_can_use(p) else torch.device("cpu")
                value = torch.zeros(tuple(p.shape), dtype=s.wire, device=device)
            keys.append(s.key)
            values.append(value)
        present = set(store.keys())
        if any(k in present for k in keys):
            if self._kvf_on_store:
                raise ValueError(f"the store already holds keys of these parameters ({keys[0]!r}, ...): with "
                                 "update_on_store=True each DistributedOptimizer needs its own keys (prefix=...)")
            new = [(k, v) for k, v in zip(keys, values) if k not in present]
            keys, values = [k for k, _ in new], [v for _, v in new]
        if keys:
            store.init(keys, values)
        self._kvf_initialised = True
        if self._kvf_pending_states is not None:
            blob, self._kvf_pending_states = self._kvf_pending_states, None
            self._kvf_load_store_states(blob)

    # the gradient path ------------------------------------------------------------------------
    def _kvf_on_grad(self, p: torch.Tensor) -> None:
        slot = self._kvf_slots.get(p)
        if slot is None:
            return
        if self._kvf_synced:
            raise RuntimeError("a backward pass came after synchronize() and before step(): call step() (with "
                               "skip_synchronize() if the gradients are final) before the next backward pass")
        slot.passes += 1
        if slot.passes < self._kvf_bpps:
            return
        if slot.passes > self._kvf_bpps:
            raise RuntimeError(f"the gradient of {slot.name!r} was computed {slot.passes} times since the last step(); "
                               f"backward_passes_per_step is {self._kvf_bpps}: call step() after that many backward "
                               "passes, or raise backward_passes_per_step")
        b = slot.bucket
        assert b is not None  # _kvf_setup gave every slot its bucket
        b.ready += 1
        if b.ready == len(b.slots):
            self._kvf_submit(b)

    def _kvf_submit(self, b: _Bucket) -> None:
        self._kvf_init_keys()
        n = self._kvf_store.num_workers
        values, outs, after = [], [], []
        for s in b.slots:
            p = s.param
            g = p.grad
            if g is None:
                g = p.grad = torch.zeros_like(p)  # unused here: the other workers' gradients still count
            g = g.detach()
            if g.layout != torch.strided:
                raise NotSupportedError(f"parameter {s.name!r}: sparse gradients are not supported; use dense ones")
            if not self._kvf_on_store:
                if _direct(g):
                    buf = g
                else:
                    buf = s.buffer("staged_grad", g)
                    buf.copy_(g)
                    after.append((buf, g))
                view = native(buf)
                values.append(view)
                outs.append(view)
                continue
            scale = self._kvf_average and n > 1
            if scale:
                src = s.buffer("scratch", g)
                torch.mul(g, 1.0 / n, out=src)
            elif _direct(g):
                src = g
            else:
                src = s.buffer("scratch", g)
                src.copy_(g)
            w = p.detach()
            if _direct(w):
                dst = w
            else:
                dst = s.buffer("staged_weight", w)
                after.append((dst, w))
            values.append(native(src))
            outs.append(native(dst))
        b.after = after
        b.handle = self._kvf_store.pushpull(b.keys, values, out=outs, priority=b.priority, wait=False)
        self._kvf_inflight.append(b)

    def synchronize(self) -> None:
        """Finish the sums of this step: gradients that have not been handed over yet (parameters
        unused in this step get zeros, as every worker must take part) go now, then everything in
        flight is waited for. Afterwards ``p.grad`` holds the sum (``average``: the mean) over the
        workers (``update_on_store``: the parameters hold the new weights). Clip gradients here,
        between ``synchronize()`` and ``step()``."""
        if self._kvf_synced:
            return
        for b in self._kvf_buckets:
            if b.handle is None:
                self._kvf_submit(b)
        inflight, self._kvf_inflight = self._kvf_inflight, []
        n = self._kvf_store.num_workers
        grads: list[torch.Tensor] = []
        for b in inflight:
            b.handle.wait()
            for src, dst in b.after:
                dst.copy_(src)
            b.handle, b.after, b.ready = None, [], 0
            for s in b.slots:
                s.passes = 0
                g = s.param.grad  # set by _kvf_submit
                if not self._kvf_on_store and self._kvf_average and n > 1 and g is not None and g.is_floating_point():
                    grads.append(g)
        if grads:
            torch._foreach_div_(grads, float(n))
        self._kvf_synced = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``step()`` inside does not synchronize (Horovod's idiom after an explicit synchronize())."""
        self._kvf_skip_sync = True
        try:
            yield
        finally:
            self._kvf_skip_sync = False

    def _kvf_pending(self) -> bool:
        return bool(self._kvf_inflight) or any(s.passes for s in self._kvf_order)

    def step(self, closure: Any = None) -> Any:
        """Wait for this step's sums (unless synchronize() did), then update: the wrapped optimizer
        on every worker, or (``update_on_store``) nothing more, the weights being in place already.
        A closure (LBFGS) is run, then its gradients are summed, each time the optimizer calls it."""
        if self._kvf_on_store:
            if closure is not None:
                raise NotSupportedError("step(closure) needs update_on_store=False: with update_on_store=True the "
                                        "store's optimizer has updated the weights when the gradients arrive")
            if not (self._kvf_synced or self._kvf_skip_sync):
                self.synchronize()
            self._kvf_synced = False
            return None
        if closure is not None:
            if self._kvf_pending():
                self.synchronize()

            def summed_closure():
                self._kvf_synced = False
                loss = closure()
                self.synchronize()
                return loss

            try:
                return super().step(summed_closure)
            finally:
                self._kvf_synced = False
        if not (self._kvf_synced or self._kvf_skip_sync):
            self.synchronize()
        self._kvf_synced = False
        return super().step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._kvf_inflight:
            raise RuntimeError("zero_grad() came while this step's gradients are being summed across the workers "
                               "(after backward, before step() or synchronize()): call step() first, or "
                               "synchronize() before zero_grad()")
        for s in self._kvf_order:
            s.passes = 0
        for b in self._kvf_buckets:
            b.ready = 0
        self._kvf_synced = False
        return super().zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self._kvf_ready:
            raise NotSupportedError("add_param_group on a DistributedOptimizer: add every parameter group to the "
                                    "torch optimizer before wrapping it")
        return super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Stop handing gradients to the store (the optimizer then works on local gradients)."""
        for h in self._kvf_hooks:
            h.remove()
        self._kvf_hooks = []

    # checkpoints ------------------------------------------------------------------------------
    def _kvf_torch_state_dict(self) -> dict:
        return super().state_dict()

    def _kvf_torch_load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict; with ``update_on_store`` also the store optimizer's
        states (``'kvframe_store_optimizer_states'``: bytes, arrays and JSON, no pickle)."""
        sd = super().state_dict()
        if self._kvf_on_store and self._kvf_initialised:
            sd = dict(sd)
            sd[STORE_STATES] = self._kvf_store_states()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what state_dict() gave. With ``update_on_store`` the store holds the weights: load the
        model's parameters, then this, before the first backward pass (the store's keys are made then,
        from the parameters, and the store optimizer's states are loaded into them)."""
        sd = dict(state_dict)
        blob = sd.pop(STORE_STATES, None)
        super().load_state_dict(sd)
        if blob is None:
            return
        if not self._kvf_on_store:
            raise ValueError("this state_dict holds a store optimizer's states (saved with update_on_store=True); "
                             "this DistributedOptimizer updates on the workers (update_on_store=False)")
        if self._kvf_initialised:
            raise NotSupportedError("with update_on_store=True the store holds the weights, and its keys are made "
                                    "at the first backward pass: load checkpoints (model first, then this) before "
                                    "it, e.g. right after creating the DistributedOptimizer")
        self._kvf_pending_states = bytes(blob)

    def _kvf_store_states(self) -> bytes:
        with tempfile.TemporaryDirectory(prefix="kvframe-torch-") as d:
            path = Path(d) / "states"
            self._kvf_store.save_optimizer_states(path)
            return path.read_bytes()

    def _kvf_load_store_states(self, blob: bytes) -> None:
        store = self._kvf_store
        if store.rank == 0:  # one worker loads; the servers' states are shared by every worker
            with tempfile.TemporaryDirectory(prefix="kvframe-torch-") as d:
                path = os.path.join(d, "states")
                Path(path).write_bytes(blob)
                store.load_optimizer_states(path)
        store.barrier()


_classes: dict[type[torch.optim.Optimizer], type[_KVFrameDistributed]] = {}


def _distributed_class(base: type[torch.optim.Optimizer]) -> type[_KVFrameDistributed]:
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type(base.__name__, (_KVFrameDistributed, base), {
            "__module__": __name__, "__qualname__": f"DistributedOptimizer[{base.__qualname__}]",
            "__doc__": f"{base.__name__} with gradients summed through a kvframe store (kvframe_torch)."})
    return cls


def DistributedOptimizer(optimizer: torch.optim.Optimizer, store: Any,  # noqa: N802 - Horovod's name
                         named_parameters: Iterable | None = None, compression: Any = None, average: bool = True,
                         backward_passes_per_step: int = 1, update_on_store: bool = False, *,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES, prefix: str = "") -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that its gradients are summed over the workers through ``store``.

    Returns an instance of a subclass of ``optimizer``'s class sharing its parameter groups and
    state (use the returned object from then on). ``named_parameters`` (e.g.
    ``model.named_parameters()``) names the store's keys; without it they are numbered.
    ``compression``: None, a name ('2bit' is the scale-free ``threshold_scale='rms'`` form, 'fp16',
    'bf16', '1bit', 'topk'), a config dict, or a :class:`kvframe_torch.Compression` member; set on
    the store for every key. ``average`` divides the sum by the number of workers.
    ``backward_passes_per_step`` accumulates that many backward passes (summed, as torch does)
    before the gradients go. ``update_on_store`` lets the store's optimizer update the weights.
    ``bucket_bytes``: the gradients of consecutive parameters go together up to this size (0: one
    key per call). ``prefix`` starts every key (two optimizers over one store)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer; got {type(optimizer).__name__}")
    if isinstance(optimizer, _KVFrameDistributed):
        raise ValueError("this optimizer is a DistributedOptimizer already")
    cls = _distributed_class(type(optimizer))
    dist = cls.__new__(cls)
    dist.__dict__.update(optimizer.__dict__)  # the same parameter groups, state and hooks
    dist._kvf_setup(store, named_parameters, compression, average, backward_passes_per_step, update_on_store,
                    bucket_bytes, prefix)
    return dist


def is_distributed(optimizer: Any) -> bool:
    """Whether ``optimizer`` came from DistributedOptimizer."""
    return isinstance(optimizer, _KVFrameDistributed)


__all__ = ["DistributedOptimizer", "is_distributed", "DEFAULT_BUCKET_BYTES", "STORE_STATES"]
