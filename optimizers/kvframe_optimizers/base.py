"""The optimizer base class (learning rates, weight decays, update counts, multi-precision,
row-sparse updates) and the per-key states it keeps."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from kvframe.arrays import RowSparseArray, array_module
from kvframe.errors import DTypeMismatchError, ShapeMismatchError
from kvframe_optimizers.checkpoint import check_states_for, read_states
from kvframe_optimizers.engine import runner
from kvframe_optimizers.states import MASTER, KeyState  # noqa: F401 - KeyState is part of this module's API
from kvframe_optimizers.updater import Updater


def _lookup(table: dict, key: Hashable) -> Any:
    if key in table:
        return table[key]
    if not isinstance(key, str) and str(key) in table:
        return table[str(key)]
    return None


class Optimizer:
    """Base of every kvframe optimizer.  ``config`` is the validated pydantic model.

    Subclasses set ``state_names`` (arrays shaped like the weight), and implement either
    ``kernel`` (element-wise, run by :mod:`kvframe_optimizers.engine`) or ``step``.
    """

    name: ClassVar[str] = ""
    state_names: ClassVar[tuple[str, ...]] = ()
    ntmp: ClassVar[int] = 2
    supports_lazy: ClassVar[bool] = False  # lazy row-sparse updates when lazy_update (or always_lazy)
    always_lazy: ClassVar[bool] = False  # lazy on row-sparse gradients, with no lazy_update option
    lr_before_count: ClassVar[bool] = False
    wd_name_suffixes: ClassVar[tuple[str, ...]] = ("_weight", "_gamma")

    def __init__(self, config: Any):
        self.config = config
        self.num_update = config.begin_num_update
        self.globals: dict = {}  # optimizer-wide JSON-able state, saved with the states

    # construction ---------------------------------------------------------------------------
    def create_updater(self) -> Updater:
        return Updater(self)

    def check_states(self, data: bytes, weights: dict | None = None) -> None:
        """Raise a clear error if ``data`` (saved states) does not fit this optimizer, or the
        weights ``{key: (shape, dtype)}`` of the store it is about to be loaded into."""
        meta, arrays = read_states(data)
        check_states_for(self, meta, arrays, weights)

    def reconfigure(self, config: Any) -> None:
        """Adopt a new config of the same optimizer (load_optimizer_states with a dumped config)."""
        if config.type != self.config.type and {config.type, self.config.type} != {"sgd", "ccsgd"}:
            raise ValueError(f"cannot reconfigure optimizer {self.config.type!r} with a {config.type!r} config")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # learning rate and weight decay ---------------------------------------------------------
    @property
    def base_lr(self) -> float:
        c = self.config
        if c.learning_rate is not None:
            return c.learning_rate
        if c.lr_scheduler is not None:
            return c.lr_scheduler.base_lr
        return 0.01

    def lr_at(self, num_update: int) -> float:
        s = self.config.lr_scheduler
        return s(num_update, self.base_lr) if s is not None else self.base_lr

    @property
    def learning_rate(self) -> float:
        """The current learning rate (before per-key multipliers)."""
        return self.lr_at(self.num_update)

    def set_learning_rate(self, lr: float) -> None:
        if self.config.lr_scheduler is not None:
            raise ValueError("set_learning_rate: this optimizer has an lr_scheduler, which sets the learning rate")
        self.config.learning_rate = lr  # validated (validate_assignment)

    def param_name(self, key: Hashable) -> str | None:
        return _lookup(self.config.param_idx2name, key)

    def lr_for(self, key: Hashable, base: float) -> float:
        mult = _lookup(self.config.lr_mult, key)
        if mult is None:
            name = self.param_name(key)
            mult = self.config.lr_mult.get(name, 1.0) if name is not None else 1.0
        return base * mult

    def wd_for(self, key: Hashable) -> float:
        c = self.config
        mult = _lookup(c.wd_mult, key)
        if mult is None:
            name = self.param_name(key)
            if name is None:
                mult = 1.0
            elif name in c.wd_mult:
                mult = c.wd_mult[name]
            else:
                mult = 1.0 if name.endswith(self.wd_name_suffixes) else 0.0
        return c.wd * mult

    # states ---------------------------------------------------------------------------------
    def state_shapes(self, shape: tuple, dtype: np.dtype) -> dict[str, tuple[tuple, np.dtype]]:
        """Name -> (shape, dtype) of every state array for a weight of ``shape`` and ``dtype``."""
        mp = self.uses_master(dtype)
        sdt = np.dtype(np.float32) if mp else np.dtype(dtype)
        out = {n: (tuple(shape), sdt) for n in self.state_names_for(shape)}
        if mp:
            out[MASTER] = (tuple(shape), np.dtype(np.float32))
        return out

    def state_names_for(self, shape: tuple) -> tuple[str, ...]:
        return self.state_names

    def uses_master(self, dtype: Any) -> bool:
        return bool(self.config.multi_precision) and np.dtype(dtype) == np.float16

    def check_weight(self, key: Hashable, shape: tuple, dtype: Any) -> None:
        """Raise, naming the key, if this optimizer cannot update a weight of ``shape`` and ``dtype``.
        Changes nothing: a store asks it for every key of a push before it updates any."""
        if np.dtype(dtype).kind != "f":  # the rules compute in real floating point (not int, bool, complex)
            raise DTypeMismatchError(f"key {key!r}: optimizer {self.config.type!r} updates floating-point weights; "
                                     f"this key holds dtype {np.dtype(dtype)} (keep such keys in a store without an "
                                     "optimizer, or set an updater of your own)")
        try:
            self.state_shapes(tuple(shape), np.dtype(dtype))
        except ValueError as exc:  # a rule that needs another layout (groupadagrad: 2-D or more)
            raise ShapeMismatchError(f"key {key!r}: {exc}") from None

    def create_state(self, key: Hashable, weight: Any) -> KeyState:
        self.check_weight(key, tuple(weight.shape), weight.dtype)
        xp = array_module(weight)
        arrays = {}
        for n, (shape, dt) in self.state_shapes(tuple(weight.shape), weight.dtype).items():
            arrays[n] = weight.astype(np.float32) if n == MASTER else xp.zeros(shape, dtype=dt)
        if np.dtype(weight.dtype) == np.float16 and not self.config.multi_precision:
            warnings.warn("updating float16 weights without multi_precision=True can lose accuracy; consider "
                          "multi_precision=True", stacklevel=3)
        ks = KeyState(arrays, self.config.begin_num_update, {}, tuple(weight.shape), weight.dtype, xp)
        self.init_state(key, weight, ks)
        return ks

    def init_state(self, key: Hashable, weight: Any, ks: KeyState) -> None:
        """Hook for states that are not zeros (a copy of the weight, scalars)."""

    # the update -----------------------------------------------------------------------------
    def count(self, ks: KeyState) -> None:
        ks.count += 1
        self.num_update = max(self.num_update, ks.count)

    def params(self, key: Hashable, ks: KeyState) -> SimpleNamespace:
        """The scalars of one step: lr, wd, t and the options the kernel needs."""
        if self.lr_before_count:
            lr = self.lr_for(key, self.lr_at(self.num_update))
            self.count(ks)
        else:
            self.count(ks)
            lr = self.lr_for(key, self.lr_at(self.num_update))
        c = self.config
        return SimpleNamespace(lr=lr, wd=self.wd_for(key), t=ks.count, rescale=c.rescale_grad,
                               clip=c.clip_gradient)

    def lazy(self, grad: Any) -> bool:
        if not isinstance(grad, RowSparseArray):
            return False
        if self.always_lazy:
            return True
        return self.supports_lazy and bool(getattr(self.config, "lazy_update", False))

    def update(self, key: Hashable, weight: Any, grad: Any, ks: KeyState) -> None:
        """One step for ``key``: ``weight`` (and the states) are updated in place."""
        p = self.params(key, ks)
        mp = MASTER in ks.arrays
        target = ks.arrays[MASTER] if mp else weight
        states = [ks.arrays[n] for n in self.state_names_for(ks.shape)]
        self.adjust(p, key, target, grad, ks)
        if self.lazy(grad):
            rows = grad.indices
            if rows.shape[0] == 0:
                return
            xp = array_module(weight)
            if array_module(rows) is not xp:
                rows = xp.asarray(rows)
            sub_w = target[rows]
            sub_s = [s[rows] for s in states]
            self.step(p, sub_w, grad.data, sub_s, ks, rows=rows)
            target[rows] = sub_w
            for s, sub in zip(states, sub_s):
                s[rows] = sub
            if mp:
                weight[rows] = sub_w.astype(weight.dtype)
            return
        if isinstance(grad, RowSparseArray):
            grad = grad.todense()
        contiguous = target.flags.c_contiguous
        work = target if contiguous else target.copy()
        self.step(p, work, grad, states, ks)
        if not contiguous:
            target[...] = work
        if mp:
            array_module(weight).copyto(weight, target, casting="same_kind")

    def adjust(self, p: SimpleNamespace, key: Hashable, w: Any, grad: Any, ks: KeyState) -> None:
        """Hook run before the step with the whole weight (LARS scales lr by norms here)."""

    def step(self, p: SimpleNamespace, w: Any, g: Any, states: list, ks: KeyState, rows: Any = None) -> None:
        """Update ``w`` (contiguous) and ``states`` from the gradient ``g`` of the same shape."""
        self.run(p, w, g, states)

    def run(self, p: SimpleNamespace, w: Any, g: Any, states: list, extra: tuple = ()) -> Any:
        xp = array_module(w)
        if not g.flags.c_contiguous:
            g = xp.ascontiguousarray(g)
        arrays = [w.reshape(-1), g.reshape(-1), *(s.reshape(-1) for s in states), *(e.reshape(-1) for e in extra)]
        return runner().run(self.kernel, p, arrays, self.ntmp, w.dtype)

    @staticmethod
    def kernel(xp: Any, p: Any, a: Sequence[Any], t: Sequence[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # helpers for kernels and steps ----------------------------------------------------------
    def scratch(self, ks: KeyState, name: str, like: Any) -> Any:
        """A work array shaped like ``like``, kept with the key (never saved)."""
        buf = ks.scratch.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or array_module(buf) is not \
                array_module(like):
            buf = ks.scratch[name] = array_module(like).empty_like(like)
        return buf


def _scaled(xp: Any, g: Any, s: float, out: Any) -> None:
    """``out = g * s`` computed in ``out``'s dtype (a float16 gradient meets a float32 master copy)."""
    if g.dtype == out.dtype:
        xp.multiply(g, s, out=out)
    else:
        out[...] = g
        out *= s


def grad_into(xp: Any, p: SimpleNamespace, g: Any, out: Any, scale: float = 1.0) -> Any:
    """``out = clip(rescale_grad * g, clip_gradient) * scale``."""
    if p.clip is None:
        _scaled(xp, g, p.rescale * scale, out)
    else:
        _scaled(xp, g, p.rescale, out)
        xp.clip(out, -p.clip, p.clip, out=out)
        if scale != 1.0:
            out *= scale
    return out


def grad_wd_into(xp: Any, p: SimpleNamespace, g: Any, w: Any, out: Any, tmp: Any) -> Any:
    """``out = clip(rescale_grad * g + wd * w, clip_gradient)`` (MXNet's Adam-family order)."""
    _scaled(xp, g, p.rescale, out)
    if p.wd:
        xp.multiply(w, p.wd, out=tmp)
        out += tmp
    if p.clip is not None:
        xp.clip(out, -p.clip, p.clip, out=out)
    return out


def sum_sq(xp: Any, x: Any) -> float:
    """Sum of squares of a flat array, accumulated in float64."""
    if x.dtype != np.float64 and x.dtype != np.float32:
        x = x.astype(np.float32)
    return float(xp.dot(x, x))
