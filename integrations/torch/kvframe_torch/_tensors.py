"""How a torch tensor reaches a store: its own memory where kvframe can use it, else a staging copy.

kvframe reads and writes CPU tensors in place through DLPack (numpy views), and CUDA tensors
through cupy when cupy is installed. Anything else goes through a staging tensor: CUDA tensors
without cupy (a host copy), dtypes numpy lacks (bfloat16 travels as float32), bool tensors that
are summed (as int32: numpy's sum of bools is a logical or), non-contiguous tensors.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

# dtypes every store moves (numpy's, and the dist stores' wire dtypes)
NATIVE = frozenset({torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
                    torch.uint8, torch.bool})
WIDER = {torch.bfloat16: torch.float32}


@functools.lru_cache(maxsize=1)
def have_cupy() -> bool:
    return importlib.util.find_spec("cupy") is not None


def store_can_use(t: torch.Tensor) -> bool:
    """Whether the store can read and write ``t``'s own memory."""
    return t.device.type == "cpu" or (t.device.type == "cuda" and have_cupy())


def wire_dtype(dtype: torch.dtype, summed: bool, what: str) -> torch.dtype:
    if dtype == torch.bool and summed:
        return torch.int32
    if dtype in NATIVE:
        return dtype
    if dtype in WIDER:
        return WIDER[dtype]
    raise TypeError(f"{what}: tensors of dtype {dtype} cannot go through kvframe (numpy and the dist stores move "
                    f"{', '.join(sorted(str(d).replace('torch.', '') for d in NATIVE))}, and bfloat16 as float32); "
                    "convert it first")


def native(t: torch.Tensor):
    """What to hand a store for ``t``: a numpy view of a CPU tensor (``Tensor.numpy()``, much cheaper
    than the DLPack exchange the store would do), else the tensor itself (CUDA: cupy through DLPack)."""
    if t.device.type == "cpu":
        try:
            return t.numpy()
        except (RuntimeError, TypeError):  # a conjugate or negative view...: the store explains it
            return t
    return t


class Exchange:
    """A tensor as a store sees it: ``buf`` is the tensor itself (detached) where kvframe can use
    its memory, else a staging tensor; ``load()`` fills the staging copy, ``unload()`` writes it back."""

    __slots__ = ("tensor", "buf", "staged")

    def __init__(self, tensor: torch.Tensor, summed: bool, what: str):
        self.tensor = tensor.detach()
        wire = wire_dtype(tensor.dtype, summed, what)
        usable = store_can_use(tensor)
        self.staged = not (wire == tensor.dtype and usable and tensor.is_contiguous())
        if self.staged:
            device = tensor.device if usable else torch.device("cpu")
            self.buf = torch.empty(tuple(tensor.shape), dtype=wire, device=device)
        else:
            self.buf = self.tensor

    def load(self) -> torch.Tensor:
        if self.staged:
            self.buf.copy_(self.tensor)
        return self.buf

    def unload(self) -> None:
        if self.staged:
            self.tensor.copy_(self.buf)


__all__ = ["Exchange", "NATIVE", "have_cupy", "native", "store_can_use", "wire_dtype"]
