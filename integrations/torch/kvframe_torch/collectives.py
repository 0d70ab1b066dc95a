"""Collectives over a kvframe store: allreduce of any tensor, broadcast of tensors, parameters,
JSON objects and optimizer state.

Everything goes through the store's public API. Sums use sum-only keys (``kvframe.sum_key``),
which every store sums and never hands to its optimizer, so a metric can be averaged while the
servers run SGD on the gradients. Broadcasts from rank 0 use ``store.broadcast`` (init from rank
0, then a pull: exact, never compressed) under fresh keys, one set per call; broadcasts from
another rank are sums in which only the root contributes.

Every function here is collective: each worker calls it, in the same order, with the same names
and shapes (the first call under a name initialises its key in the store).
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch

import kvframe
from kvframe.errors import NotSupportedError
from kvframe_torch._tensors import Exchange, native

PREFIX = "kvframe_torch/"
_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> {"seq": int, "keys": set}


def _store_state(store: Any) -> dict:
    st = _state.get(store)
    if st is None:
        st = _state[store] = {"seq": 0, "keys": set()}
    return st


def next_sequence(store: Any) -> int:
    """A number every worker draws in the same order (collective calls): fresh key names."""
    st = _store_state(store)
    st["seq"] += 1
    return st["seq"]


def check_str_keys(store: Any, what: str) -> None:
    keys = store.keys()
    if keys and not isinstance(keys[0], str):
        raise TypeError(f"{what} uses str keys, and this store already holds int keys ({keys[0]!r}, ...); a store "
                        "has one key type: give kvframe-torch a store of its own, or use str keys everywhere")


def check_summing_store(store: Any, what: str) -> None:
    """Sums across workers need rounds: asynchronous stores apply each push on its own."""
    if "async" in str(store.type).lower():
        raise NotSupportedError(f"{what} needs a store that sums the workers' pushes in rounds; store "
                                f"{store.type!r} applies every push on its own (use dist_sync or dist_device_sync)")


def compression_is_exact(store: Any, numel: int, dtype: torch.dtype) -> bool:
    """Whether the store's gradient compression leaves a push of ``numel`` values exact."""
    cfg = getattr(store, "gradient_compression", None)
    if cfg is None:
        return True
    kind = getattr(cfg, "type", None)
    if kind == "2bit" and getattr(cfg, "threshold_scale", "absolute") == "rms":
        return dtype == torch.float32 and numel < int(cfg.raw_below)
    if kind == "topk":
        return math.ceil(float(cfg.ratio) * numel) >= numel
    return False


def _check_exact(store: Any, t: torch.Tensor, what: str) -> None:
    if not compression_is_exact(store, t.numel(), t.dtype):
        cfg = store.gradient_compression
        raise NotSupportedError(
            f"{what}: the store compresses every push ({cfg.type!r}), which would make this sum of {t.numel()} "
            f"{str(t.dtype).replace('torch.', '')} values inexact (and carry an error into the next call). "
            "With {'type': '2bit', 'threshold_scale': 'rms'} (kvframe_torch.Compression.twobit) float32 tensors "
            f"of fewer than raw_below elements travel exactly; or sum on a store without compression")


def _ensure_keys(store: Any, keys: list, bufs: list) -> None:
    """Initialise the keys that are not in the store yet (collective, like every call here)."""
    known = _store_state(store)["keys"]
    missing = [(k, b) for k, b in zip(keys, bufs) if k not in known]
    if not missing:
        return
    present = set(store.keys())
    new = [(k, b) for k, b in missing if k not in present]
    if new:
        store.init([k for k, _ in new], [torch.zeros_like(b) for _, b in new])
    known.update(k for k, _ in missing)


def _numel_ok(t: torch.Tensor) -> torch.Tensor:
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"kvframe-torch moves dense (strided) tensors; got layout {t.layout}")
    return t


# allreduce --------------------------------------------------------------------------------------

def allreduce_(tensor: torch.Tensor, store: Any, name: str, average: bool = True) -> torch.Tensor:
    """Sum ``tensor`` over the workers in place (and divide by their number with ``average``;
    integer tensors are floor-divided). Correct whatever optimizer the store runs: the sum goes
    through a sum-only key, ``'__sum__/kvframe_torch/allreduce/<name>'``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"allreduce_ needs a torch.Tensor (use allreduce for numbers); got {type(tensor).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"allreduce needs a non-empty str name (the same on every worker); got {name!r}")
    what = f"allreduce {name!r}"
    check_summing_store(store, what)
    x = Exchange(_numel_ok(tensor), summed=True, what=what)
    _check_exact(store, x.buf, what)
    key = kvframe.sum_key(PREFIX + "allreduce/" + name)
    if key not in _store_state(store)["keys"]:  # the first call under this name: its key is made
        check_str_keys(store, what)
        _ensure_keys(store, [key], [x.buf])
    buf = x.load()
    view = native(buf)
    store.pushpull(key, view, out=view)
    n = store.num_workers
    if average and n > 1:
        if buf.is_floating_point():
            buf.div_(n)
        else:
            buf.copy_(torch.div(buf, n, rounding_mode="floor"))
    x.unload()
    return tensor


def allreduce(tensor: Any, store: Any, name: str, average: bool = True) -> torch.Tensor:
    """The sum (``average``: the mean) of ``tensor`` over the workers, as a new tensor. Numbers are
    taken as tensors (``allreduce(loss.item(), store, 'loss')``)."""
    if isinstance(tensor, torch.Tensor):
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
    else:
        out = torch.as_tensor(tensor).clone()
    return allreduce_(out, store, name, average)


# broadcast --------------------------------------------------------------------------------------

def _check_root(store: Any, root_rank: int) -> None:
    n = store.num_workers
    if not isinstance(root_rank, int) or not 0 <= root_rank < n:
        raise ValueError(f"root_rank must be a worker rank in [0, {n}); got {root_rank!r}")


def broadcast_tensors(store: Any, named: list[tuple[str, torch.Tensor]], root_rank: int = 0,
                      what: str = "broadcast") -> None:
    """Write the root's values into every worker's tensors, in place (collective)."""
    _check_root(store, root_rank)
    named = [(name, t) for name, t in named if t.numel() > 0]  # nothing to move
    if store.num_workers == 1 or not named:
        return
    check_str_keys(store, what)
    seq = next_sequence(store)
    summed = root_rank != 0
    exchanges = [Exchange(_numel_ok(t), summed=summed, what=f"{what}: {name!r}") for name, t in named]
    if len({name for name, _ in named}) != len(named):
        raise ValueError(f"{what}: the tensor names must be unique")
    if not summed:
        keys = [f"{PREFIX}bcast{seq}/{name}" for name, _ in named]
        bufs = [x.load() for x in exchanges]
        store.broadcast(keys, bufs, out=bufs)  # rank 0's values, never compressed
    else:
        check_summing_store(store, what + f" from root_rank {root_rank}")
        for (name, _), x in zip(named, exchanges):
            _check_exact(store, x.buf, f"{what} from root_rank {root_rank} ({name!r})")
        keys = [kvframe.sum_key(f"{PREFIX}bcast{seq}/{name}") for name, _ in named]
        mine = store.rank == root_rank
        bufs = [x.load() if mine else x.buf.zero_() for x in exchanges]
        store.init(keys, [torch.zeros_like(b) for b in bufs])
        store.pushpull(keys, bufs, out=bufs)  # only the root contributes
    for x in exchanges:
        x.unload()


def _named(params: Any, what: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, Mapping):
        items = list(params.items())
    else:
        items = list(params)
        if items and isinstance(items[0], torch.Tensor):
            items = [(f"{i}", t) for i, t in enumerate(items)]
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"{what} takes a state_dict, (name, tensor) pairs (model.named_parameters()) or a list "
                            f"of tensors; got an item {type(item).__name__}")
        out.append((str(item[0]), item[1]))
    return out


def broadcast_parameters(params: Any, store: Any, root_rank: int = 0) -> None:
    """Make every worker's parameters (and buffers, with a state_dict) equal to the root's, in place:
    ``broadcast_parameters(model.state_dict(), store)``."""
    broadcast_tensors(store, _named(params, "broadcast_parameters"), root_rank, "broadcast_parameters")


def broadcast_object(obj: Any, store: Any, root_rank: int = 0) -> Any:
    """The root's ``obj`` on every worker. It travels as JSON (never pickled), so it is made of
    dicts with str keys, lists, str, numbers, bools and None."""
    _check_root(store, root_rank)
    if store.num_workers == 1:
        return obj
    if store.rank == root_rank:
        data = json.dumps(obj, allow_nan=True).encode("utf-8")
    else:
        data = b""
    length = torch.tensor([len(data)], dtype=torch.int64)
    broadcast_tensors(store, [("length", length)], root_rank, "broadcast_object")
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(int(length), dtype=torch.uint8)
    broadcast_tensors(store, [("json", buf)], root_rank, "broadcast_object")
    return json.loads(bytes(buf.numpy()).decode("utf-8"))


# optimizer state --------------------------------------------------------------------------------

def _flatten(obj: Any, tensors: list, where: str) -> Any:
    """A JSON description of a state_dict; its tensors go to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1, "shape": list(obj.shape), "dtype": str(obj.dtype)[6:]}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_flatten(k, tensors, where), _flatten(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, where) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"broadcast_optimizer_state: {where} holds a {type(obj).__name__}, which cannot travel as JSON "
                    "(tensors, numbers, str, bool, None, lists, tuples and dicts can)")


def _unflatten(desc: Any, tensors: list) -> Any:
    if isinstance(desc, dict):
        if "__tensor__" in desc:
            return tensors[desc["__tensor__"]]
        if "__dict__" in desc:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in desc["__dict__"]}
        if "__tuple__" in desc:
            return tuple(_unflatten(v, tensors) for v in desc["__tuple__"])
        raise ValueError(f"unexpected entry in a broadcast optimizer state: {sorted(desc)}")
    if isinstance(desc, list):
        return [_unflatten(v, tensors) for v in desc]
    return desc


def _tensor_descs(desc: Any, found: dict) -> None:
    if isinstance(desc, dict):
        if "__tensor__" in desc:
            found[desc["__tensor__"]] = desc
            return
        for v in desc.values():
            _tensor_descs(v, found)
    elif isinstance(desc, list):
        for v in desc:
            _tensor_descs(v, found)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, store: Any, root_rank: int = 0) -> None:
    """Make every worker's optimizer state (momentum buffers, steps, learning rates...) equal to the
    root's: its structure travels as JSON, its tensors as arrays; the others load it. For a
    DistributedOptimizer with ``update_on_store=True`` the store's own optimizer states are one copy
    already (on the servers): only the torch side travels."""
    _check_root(store, root_rank)
    if store.num_workers == 1:
        return
    torch_side = getattr(optimizer, "_kvf_torch_state_dict", None)
    mine = store.rank == root_rank
    tensors: list = []
    if mine:
        sd = torch_side() if torch_side is not None else optimizer.state_dict()
        desc = _flatten(sd, tensors, "the state_dict")
    else:
        desc = None
    desc = broadcast_object(desc, store, root_rank)
    if not mine:
        found: dict = {}
        _tensor_descs(desc, found)
        tensors = [torch.empty(found[i]["shape"], dtype=getattr(torch, found[i]["dtype"])) for i in range(len(found))]
    broadcast_tensors(store, [(f"{i}", t) for i, t in enumerate(tensors)], root_rank, "broadcast_optimizer_state")
    if not mine:
        sd = _unflatten(desc, tensors)
        load = getattr(optimizer, "_kvf_torch_load_state_dict", None)
        (load or optimizer.load_state_dict)(sd)


__all__ = ["allreduce", "allreduce_", "broadcast_parameters", "broadcast_optimizer_state", "broadcast_object",
           "broadcast_tensors", "compression_is_exact"]
