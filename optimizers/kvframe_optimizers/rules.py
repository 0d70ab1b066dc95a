"""The update rules: Apache MXNet 1.9.1's optimizer registry, plus adamw, adabelief and lans from
MXNet 2.0.  Each docstring gives the rule as MXNet applies it (``G`` is the preprocessed gradient);
kernels work in place on numpy or cupy arrays (``xp``)."""

from __future__ import annotations

import math
from collections.abc import Hashable
from types import SimpleNamespace
from typing import Any

import numpy as np

from kvframe.arrays import array_module
from kvframe_optimizers import configs as C
from kvframe_optimizers.base import KeyState, Optimizer, _scaled, grad_into, grad_wd_into, sum_sq
from kvframe_optimizers.engine import fused, runner


@fused("sgd")
def _sgd_kernel(xp, p, a, t):
    """Plain or momentum SGD on flat views ``a = [w, g, (mom)]`` (shared by sgd, lars, lbsgd)."""
    w, g = a[0], a[1]
    G = grad_into(xp, p, g, t[0], -p.lr)  # -lr * clip(rescale * g)
    if len(a) > 2:  # mom = momentum * mom - lr * wd * w - lr * G;  w += mom
        m = a[2]
        m *= p.momentum
        m += G
        if p.wd:
            xp.multiply(w, -p.lr * p.wd, out=G)
            m += G
        w += m
    else:  # w = (1 - lr * wd) * w - lr * G
        if p.wd:
            w *= 1.0 - p.lr * p.wd
        w += G


class SGD(Optimizer):
    """``mom = momentum*mom - lr*(G + wd*w); w += mom`` with ``G = clip(rescale_grad*g)``; without
    momentum ``w = (1 - lr*wd)*w - lr*G``.  Row-sparse gradients with lazy_update touch only their rows."""

    name = "sgd"
    supports_lazy = True
    ntmp = 1

    def state_names_for(self, shape):
        return ("mom",) if self.config.momentum > 0 else ()

    def params(self, key, ks):
        p = super().params(key, ks)
        p.momentum = self.config.momentum
        return p

    # the same function object, so that its @fused mark stays (mypy cannot match a staticmethod() value
    # to the base's static method)
    kernel = staticmethod(_sgd_kernel)  # type: ignore[assignment]


class NAG(SGD):
    """Nesterov momentum as MXNet 1.9.1 applies it: ``G = clip(rescale_grad*g); G2 = G + wd*w;
    w_new = w - lr*(G2 + momentum*(momentum*mom + G2)); mom = momentum*mom + G + wd*w_new`` (MXNet's
    kernel updates the weight in place before it reads it for the momentum's weight-decay term);
    plain SGD without momentum."""

    name = "nag"
    supports_lazy = False
    ntmp = 3

    @staticmethod
    @fused("nag")
    def kernel(xp, p, a, t):
        if len(a) == 2:
            return _sgd_kernel(xp, p, a, t)
        w, g, m = a
        G, T, U = t
        grad_into(xp, p, g, G)
        if p.wd:
            xp.multiply(w, p.wd, out=T)
            T += G
        else:
            T[...] = G
        m *= p.momentum
        xp.add(m, T, out=U)
        U *= p.momentum
        U += T
        U *= p.lr
        w -= U
        m += G
        if p.wd:
            xp.multiply(w, p.wd, out=T)
            m += T


class Signum(Optimizer):
    """``mom = momentum*mom - (1-momentum)*(wd*w + G); w = (1 - lr*wd_lh)*w + lr*sign(mom)``;
    without momentum (signSGD) ``w = (1 - lr*wd)*w - lr*sign(G)``."""

    name = "signum"

    def state_names_for(self, shape):
        return ("mom",) if self.config.momentum > 0 else ()

    def params(self, key, ks):
        p = super().params(key, ks)
        p.momentum, p.wd_lh = self.config.momentum, self.config.wd_lh
        return p

    @staticmethod
    def kernel(xp, p, a, t):
        w, g = a[0], a[1]
        G, T = t
        if len(a) == 2:
            grad_into(xp, p, g, G)
            xp.sign(G, out=G)
            decay = 1.0 - p.lr * p.wd - p.lr * p.wd_lh
            if decay != 1.0:
                w *= decay
            G *= p.lr
            w -= G
            return
        m = a[2]
        grad_into(xp, p, g, G, -(1.0 - p.momentum))
        m *= p.momentum
        m += G
        if p.wd:
            xp.multiply(w, -(1.0 - p.momentum) * p.wd, out=T)
            m += T
        if p.wd_lh:
            w *= 1.0 - p.lr * p.wd_lh
        xp.sign(m, out=T)
        T *= p.lr
        w += T


class FTML(Optimizer):
    """``G = clip(rescale_grad*g + wd*w); v = b2*v + (1-b2)*G²;
    d_t = (1-b1^t)/lr * (sqrt(v/(1-b2^t)) + eps); z = b1*z + (1-b1)*G - (d_t - b1*d)*w; d = d_t; w = -z/d_t``."""

    name = "ftml"
    state_names = ("d", "v", "z")

    def params(self, key, ks):
        p = super().params(key, ks)
        c = self.config
        p.b1, p.b2, p.eps = c.beta1, c.beta2, c.epsilon
        p.c1, p.c2 = 1.0 - c.beta1 ** p.t, 1.0 - c.beta2 ** p.t
        return p

    def step(self, p, w, g, states, ks, rows=None):
        if p.lr == 0:  # d_t would be infinite: nothing moves
            return
        self.run(p, w, g, states)

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, d, v, z = a
        G, T, U = t
        grad_wd_into(xp, p, g, w, G, T)
        xp.multiply(G, G, out=T)
        T *= 1.0 - p.b2
        v *= p.b2
        v += T
        xp.multiply(v, 1.0 / p.c2, out=T)
        xp.sqrt(T, out=T)
        T += p.eps
        T *= p.c1 / p.lr  # d_t
        z *= p.b1
        G *= 1.0 - p.b1
        z += G
        xp.multiply(d, p.b1, out=U)
        U -= T  # b1*d - d_t
        U *= w
        z += U
        d[...] = T
        xp.divide(z, T, out=w)
        xp.negative(w, out=w)

    ntmp = 3


class LARS(SGD):
    """SGD whose learning rate is scaled per layer by ``eta*|w| / (|rescale_grad*g| + wd*|w| + eps)``
    (not for names ending in gamma, beta or bias); the momentum is corrected by the lr change when
    momentum_correction.  Weight decay is zero for names not ending in _weight."""

    name = "lars"
    wd_name_suffixes = ("_weight",)

    def params(self, key, ks):
        self.count(ks)
        gl = self.globals
        base = self.lr_at(self.num_update)
        if gl.get("cur_lr") is not None:
            gl["last_lr"] = gl["cur_lr"]
        else:
            gl["last_lr"] = base
        gl["cur_lr"] = base
        c = self.config
        momentum = c.momentum
        if momentum > 0 and c.momentum_correction and gl["last_lr"] != 0:
            momentum = momentum * gl["cur_lr"] / gl["last_lr"]
        return SimpleNamespace(lr=self.lr_for(key, base), wd=self.wd_for(key), t=ks.count, rescale=c.rescale_grad,
                               clip=c.clip_gradient, momentum=momentum)

    def adjust(self, p, key, w, grad, ks):
        name = self.param_name(key)
        name = str(key) if name is None else name
        if name.endswith(("gamma", "beta", "bias")):
            return
        g = grad.data if hasattr(grad, "indices") else grad
        w_norm = math.sqrt(_sum_sq_all(w))
        g_norm = math.sqrt(_sum_sq_all(g)) * p.rescale
        if w_norm > 0 and g_norm > 0:
            p.lr *= self.config.eta * w_norm / (g_norm + p.wd * w_norm + self.config.eps)


def _sum_sq_kernel(xp, p, a, t):
    return tuple(sum_sq(xp, x) for x in a)


def _sum_sq_all(*arrays: Any) -> float:
    """Sum of squares over whole arrays (blocked and threaded on numpy)."""
    flats = [x.reshape(-1) if x.flags.c_contiguous else array_module(x).ascontiguousarray(x).reshape(-1)
             for x in arrays]
    r = runner().run(_sum_sq_kernel, None, flats, 0, flats[0].dtype)
    return r[0] if len(arrays) == 1 else r


class LBSGD(SGD):
    """Large-batch SGD: gradients of ``batch_scale`` pushes are averaged, then an SGD (momentum)
    step runs with lr scaled by the warmup multiplier (linear, power2, sqrt) or a LARS ratio."""

    name = "lbsgd"
    supports_lazy = False
    lr_before_count = True

    def state_names_for(self, shape):
        names = ("mom",) if self.config.momentum > 0 else ()
        return names + (("cum_grad",) if self.config.batch_scale > 1 else ())

    def init_state(self, key, weight, ks):
        ks.scalars["num_cums"] = 0

    def _mult(self, nup: int) -> float:
        c = self.config
        nwup = c.warmup_epochs * c.updates_per_epoch
        maxmult = float(c.batch_scale)
        if nup >= nwup:
            return maxmult
        if nwup <= 1:
            return 1.0
        frac = nup / nwup
        if c.warmup_strategy == "linear":
            return 1.0 + (maxmult - 1) * frac
        if c.warmup_strategy == "power2":
            return 1.0 + (maxmult - 1) * frac * frac
        if c.warmup_strategy == "sqrt":
            return 1.0 + (maxmult - 1) * math.sqrt(frac)
        return 1.0

    def step(self, p, w, g, states, ks, rows=None):
        c = self.config
        n = ks.scalars.get("num_cums", 0)
        mom = [s for s, nm in zip(states, self.state_names_for(ks.shape)) if nm == "mom"]
        if c.batch_scale > 1:
            cum = states[-1]
            if n > 0:
                cum += g
                n += 1
            else:
                cum[...] = g
                n = c.begin_epoch * c.updates_per_epoch + 1
        else:
            cum = g
            n = n + 1 if n > 0 else c.begin_epoch * c.updates_per_epoch + 1
        ks.scalars["num_cums"] = n
        if n % c.batch_scale:
            return  # MXNet runs sgd with lr 0 here: the weight stays as it is
        grad = cum / c.batch_scale if c.batch_scale > 1 else cum
        if c.warmup_strategy == "lars":
            w2, g2 = _sum_sq_all(w, grad)
            mult = min(100.0, max(0.01, math.sqrt(w2 / (g2 + p.wd * w2 + 1e-18))))
        else:
            mult = self._mult(n)
        p.lr *= mult
        self.run(p, w, grad, mom)
        if c.batch_scale > 1:
            cum[...] = 0


class LAMB(Optimizer):
    """``G = clip(rescale_grad*g); m, v = Adam moments; u = m̂/(sqrt(v̂)+eps) + wd*w`` (m̂, v̂ bias
    corrected when bias_correction); ``r1 = |w|`` clamped to [lower_bound, upper_bound], ``r2 = |u|``;
    ``w -= lr * (r1/r2 if r1 and r2 else 1) * u``."""

    name = "lamb"
    state_names = ("mean", "var")
    ntmp = 2

    def params(self, key, ks):
        p = super().params(key, ks)
        c = self.config
        p.b1, p.b2, p.eps = c.beta1, c.beta2, c.epsilon
        if getattr(c, "bias_correction", True):
            p.c1, p.c2 = 1.0 - c.beta1 ** p.t, 1.0 - c.beta2 ** p.t
        else:
            p.c1 = p.c2 = 1.0
        return p

    def trust(self, r1: float, r2: float) -> float:
        c = self.config
        if c.lower_bound:
            r1 = max(r1, c.lower_bound)
        if c.upper_bound:
            r1 = min(r1, c.upper_bound)
        return r1 / r2 if r1 != 0 and r2 != 0 else 1.0

    def step(self, p, w, g, states, ks, rows=None):
        u = self.scratch(ks, "u", w)
        w2, u2 = self.run(p, w, g, states, extra=(u,))
        p.scale = -p.lr * self.trust(math.sqrt(w2), math.sqrt(u2))
        runner().run(_axpy_kernel, p, [w.reshape(-1), u.reshape(-1)], 0, w.dtype)

    @staticmethod
    @fused("lamb")
    def kernel(xp, p, a, t):
        w, g, m, v, u = a
        G, T = t
        grad_into(xp, p, g, G)
        m *= p.b1
        xp.multiply(G, 1.0 - p.b1, out=T)
        m += T
        G *= G
        G *= 1.0 - p.b2
        v *= p.b2
        v += G
        xp.multiply(v, 1.0 / p.c2, out=T)
        xp.sqrt(T, out=T)
        T += p.eps
        xp.divide(m, T, out=u)
        if p.c1 != 1.0:
            u *= 1.0 / p.c1
        if p.wd:
            xp.multiply(w, p.wd, out=T)
            u += T
        return sum_sq(xp, w), sum_sq(xp, u)


@fused("axpy")
def _axpy_kernel(xp, p, a, t):
    w, u = a  # u is a work buffer: scaled in place
    u *= p.scale
    w += u


class DCASGD(Optimizer):
    """Delay-compensated SGD: ``G = clip(rescale_grad*g); step = -lr*(G + wd*w + lamda*G²*(w - w_prev));
    mom = momentum*mom + step (or step); w_prev = w; w += mom``."""

    name = "dcasgd"

    def state_names_for(self, shape):
        return ("mom", "previous_weight") if self.config.momentum > 0 else ("previous_weight",)

    def init_state(self, key, weight, ks):
        src = ks.arrays.get("weight32", weight)
        ks.arrays["previous_weight"][...] = src

    def params(self, key, ks):
        p = super().params(key, ks)
        p.momentum, p.lamda = self.config.momentum, self.config.lamda
        return p

    @staticmethod
    def kernel(xp, p, a, t):
        w, g = a[0], a[1]
        prev = a[-1]
        G, T = t
        grad_into(xp, p, g, G)
        xp.subtract(w, prev, out=T)  # w - w_prev
        T *= G
        T *= G
        T *= p.lamda
        T += G
        if p.wd:
            xp.multiply(w, p.wd, out=G)
            T += G
        T *= -p.lr
        prev[...] = w
        if len(a) == 4:
            m = a[2]
            m *= p.momentum
            m += T
            w += m
        else:
            w += T


class SGLD(Optimizer):
    """Langevin dynamics: ``w += -lr/2 * (G + wd*w) + N(0, sqrt(lr))``, ``G = clip(rescale_grad*g)``."""

    name = "sgld"

    def _rng(self) -> np.random.Generator:
        rng = getattr(self, "_gen", None)
        if rng is None:
            rng = np.random.default_rng(self.config.seed)
            self._gen: np.random.Generator | None = rng
            if "rng" in self.globals:
                rng.bit_generator.state = self.globals["rng"]
        return rng

    def step(self, p, w, g, states, ks, rows=None):
        xp = array_module(w)
        rng = self._rng()
        noise = rng.standard_normal(w.shape, dtype=np.float64) * math.sqrt(p.lr)
        self.globals["rng"] = rng.bit_generator.state
        G = grad_into(xp, p, g, xp.empty_like(w))
        if p.wd:
            G += p.wd * w
        G *= -p.lr / 2
        w += G
        w += xp.asarray(noise.astype(w.dtype))

    def load_globals(self, globals_: dict) -> None:
        self.globals = dict(globals_)
        self._gen = None


class Adam(Optimizer):
    """``G = clip(rescale_grad*g + wd*w); m = b1*m + (1-b1)*G; v = b2*v + (1-b2)*G²;
    w -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v) + eps)``; lazy on row-sparse gradients."""

    name = "adam"
    state_names = ("mean", "var")
    supports_lazy = True

    def params(self, key, ks):
        p = super().params(key, ks)
        c = self.config
        p.b1, p.b2, p.eps = c.beta1, c.beta2, c.epsilon
        p.lr_t = p.lr * math.sqrt(1.0 - c.beta2 ** p.t) / (1.0 - c.beta1 ** p.t)
        return p

    @staticmethod
    @fused("adam")
    def kernel(xp, p, a, t):
        w, g, m, v = a
        G, T = t
        grad_wd_into(xp, p, g, w, G, T)
        m *= p.b1
        xp.multiply(G, 1.0 - p.b1, out=T)
        m += T
        G *= G
        G *= 1.0 - p.b2
        v *= p.b2
        v += G
        xp.sqrt(v, out=T)
        T += p.eps
        xp.divide(m, T, out=T)
        T *= p.lr_t
        w -= T


class AdaGrad(Optimizer):
    """``G = clip(rescale_grad*g); h += G²; w -= lr*(G/sqrt(h + eps) + wd*w)``; row-sparse gradients
    update only their rows."""

    name = "adagrad"
    state_names = ("history",)
    always_lazy = True

    def params(self, key, ks):
        p = super().params(key, ks)
        p.eps = self.config.eps
        return p

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, h = a
        G, T = t
        grad_into(xp, p, g, G)
        xp.multiply(G, G, out=T)
        h += T
        xp.add(h, p.eps, out=T)
        xp.sqrt(T, out=T)
        G /= T
        if p.wd:
            xp.multiply(w, p.wd, out=T)
            G += T
        G *= p.lr
        w -= G


class RMSProp(Optimizer):
    """``G = clip(rescale_grad*g + wd*w); n = (1-g1)*G² + g1*n``; plain: ``w -= lr*G/sqrt(n + eps)``;
    centered: ``s = (1-g1)*G + g1*s; delta = g2*delta - lr*G/sqrt(n - s² + eps); w += delta``;
    then weights are clipped to [-clip_weights, clip_weights]."""

    name = "rmsprop"
    ntmp = 2

    def state_names_for(self, shape):
        return ("n", "g", "delta") if self.config.centered else ("n",)

    def params(self, key, ks):
        p = super().params(key, ks)
        c = self.config
        p.g1, p.g2, p.eps, p.cw = c.gamma1, c.gamma2, c.epsilon, c.clip_weights
        return p

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, n = a[0], a[1], a[2]
        G, T = t
        grad_wd_into(xp, p, g, w, G, T)
        xp.multiply(G, G, out=T)
        T *= 1.0 - p.g1
        n *= p.g1
        n += T
        if len(a) == 3:
            xp.add(n, p.eps, out=T)
            xp.sqrt(T, out=T)
            G /= T
            G *= p.lr
            w -= G
        else:
            s, delta = a[3], a[4]
            s *= p.g1
            xp.multiply(G, 1.0 - p.g1, out=T)
            s += T
            xp.multiply(s, s, out=T)
            xp.subtract(n, T, out=T)
            T += p.eps
            xp.sqrt(T, out=T)
            G /= T
            G *= p.lr
            delta *= p.g2
            delta -= G
            w += delta
        if p.cw is not None:
            xp.clip(w, -p.cw, p.cw, out=w)


class AdaDelta(Optimizer):
    """``G = clip(rescale_grad*g); acc_g = rho*acc_g + (1-rho)*G²;
    delta = sqrt(acc_delta + eps)/sqrt(acc_g + eps)*G; acc_delta = rho*acc_delta + (1-rho)*delta²;
    w -= delta + wd*w``.  As in MXNet 1.9.1 the learning rate is not used."""

    name = "adadelta"
    state_names = ("acc_g", "acc_delta")
    ntmp = 3

    def params(self, key, ks):
        p = super().params(key, ks)
        p.rho, p.eps = self.config.rho, self.config.epsilon
        return p

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, ag, ad = a
        G, T, U = t
        grad_into(xp, p, g, G)
        xp.multiply(G, G, out=T)
        T *= 1.0 - p.rho
        ag *= p.rho
        ag += T
        xp.add(ad, p.eps, out=T)
        xp.sqrt(T, out=T)
        xp.add(ag, p.eps, out=U)
        xp.sqrt(U, out=U)
        T /= U
        T *= G  # delta
        xp.multiply(T, T, out=U)
        U *= 1.0 - p.rho
        ad *= p.rho
        ad += U
        if p.wd:
            xp.multiply(w, p.wd, out=U)
            T += U
        w -= T


class Ftrl(Optimizer):
    """``G = clip(rescale_grad*g); z += G - (sqrt(n + G²) - sqrt(n))*w/lr; n += G²;
    w = (sign(z)*lamda1 - z) / ((beta + sqrt(n))/lr + wd) * (|z| > lamda1)``; row-sparse gradients
    update only their rows."""

    name = "ftrl"
    state_names = ("z", "n")
    always_lazy = True
    ntmp = 3

    def params(self, key, ks):
        p = super().params(key, ks)
        p.l1, p.beta = self.config.lamda1, self.config.beta
        return p

    def step(self, p, w, g, states, ks, rows=None):
        if p.lr == 0:  # every term divides by lr: nothing can move
            return
        self.run(p, w, g, states)

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, z, n = a
        G, T, U = t
        grad_into(xp, p, g, G)
        xp.sqrt(n, out=U)
        xp.multiply(G, G, out=T)
        n += T
        xp.sqrt(n, out=T)
        T -= U  # sqrt(n + G²) - sqrt(n)
        T *= w
        T *= 1.0 / p.lr
        G -= T
        z += G
        xp.sqrt(n, out=T)
        T += p.beta
        T *= 1.0 / p.lr
        if p.wd:
            T += p.wd
        xp.sign(z, out=G)
        G *= p.l1
        G -= z
        G /= T
        xp.abs(z, out=U)
        xp.greater(U, p.l1, out=U)
        xp.multiply(G, U, out=w)


class Adamax(Optimizer):
    """``G = clip(rescale_grad*g + wd*w); m = b1*m + (1-b1)*G; u = max(b2*u, |G|);
    w -= lr/(1-b1^t) * m/u``."""

    name = "adamax"
    state_names = ("mean", "u")

    def params(self, key, ks):
        p = super().params(key, ks)
        c = self.config
        p.b1, p.b2 = c.beta1, c.beta2
        p.lr_t = p.lr / (1.0 - c.beta1 ** p.t)
        return p

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, m, u = a
        G, T = t
        grad_wd_into(xp, p, g, w, G, T)
        m *= p.b1
        xp.multiply(G, 1.0 - p.b1, out=T)
        m += T
        u *= p.b2
        xp.abs(G, out=G)
        xp.maximum(u, G, out=u)
        xp.divide(m, u, out=T)
        T *= p.lr_t
        w -= T


class Nadam(Optimizer):
    """Adam with Nesterov momentum and the momentum schedule ``mu_t = b1*(1 - 0.5*0.96^(t*schedule_decay))``
    (Dozat 2016, as MXNet applies it; the schedule product is kept per key)."""

    name = "nadam"
    state_names = ("mean", "var")
    ntmp = 3

    def init_state(self, key, weight, ks):
        ks.scalars["m_schedule"] = 1.0

    def params(self, key, ks):
        p = super().params(key, ks)
        c = self.config
        t = p.t
        mu_t = c.beta1 * (1.0 - 0.5 * 0.96 ** (t * c.schedule_decay))
        mu_t1 = c.beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * c.schedule_decay))
        sched = ks.scalars.get("m_schedule", 1.0) * mu_t
        ks.scalars["m_schedule"] = sched
        p.b1, p.b2, p.eps = c.beta1, c.beta2, c.epsilon
        p.cg = (1.0 - mu_t) / (1.0 - sched)  # weight of the gradient
        p.cm = mu_t1 / (1.0 - sched * mu_t1)  # weight of the mean
        p.cv = 1.0 / (1.0 - c.beta2 ** t)
        return p

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, m, v = a
        G, T, U = t
        grad_wd_into(xp, p, g, w, G, T)
        m *= p.b1
        xp.multiply(G, 1.0 - p.b1, out=T)
        m += T
        xp.multiply(G, G, out=T)
        T *= 1.0 - p.b2
        v *= p.b2
        v += T
        G *= p.cg
        xp.multiply(m, p.cm, out=T)
        G += T  # m_bar
        xp.multiply(v, p.cv, out=U)
        xp.sqrt(U, out=U)
        U += p.eps
        G /= U
        G *= p.lr
        w -= G


class GroupAdaGrad(Optimizer):
    """AdaGrad with one accumulator per row: ``G = clip(rescale_grad*g); h += mean(G², other axes);
    w -= lr*G/sqrt(h + eps)``; row-sparse gradients update only their rows.  No weight decay."""

    name = "groupadagrad"
    state_names = ("history",)
    always_lazy = True

    def state_shapes(self, shape, dtype):
        out = super().state_shapes(shape, dtype)
        if len(shape) < 2:
            raise ValueError(f"groupadagrad needs weights with at least 2 dimensions (one accumulator per row); "
                             f"got shape {tuple(shape)}")
        hist_shape = (shape[0],) + (1,) * (len(shape) - 1)
        out["history"] = (hist_shape, out["history"][1])
        return out

    def params(self, key, ks):
        p = super().params(key, ks)
        p.eps = self.config.eps
        return p

    def step(self, p, w, g, states, ks, rows=None):
        xp = array_module(w)
        (h,) = states
        G = grad_into(xp, p, g, xp.empty(w.shape, dtype=w.dtype))
        axes = tuple(range(1, w.ndim))
        h += xp.mean(G * G, axis=axes, keepdims=True)
        G *= p.lr
        G /= xp.sqrt(h + p.eps)
        w -= G


class Test(Optimizer):
    """MXNet's 'test' optimizer: ``w += rescale_grad * g``; its state is a copy of the weight."""

    __test__ = False
    name = "test"
    state_names = ("weight_copy",)
    ntmp = 1

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, s = a
        _scaled(xp, g, p.rescale, t[0])
        w += t[0]
        s[...] = w


class AdamW(Optimizer):
    """Decoupled weight decay (MXNet 2.0): ``G = clip(rescale_grad*g)``; Adam moments;
    ``eta = lr*sqrt(1-b2^t)/(1-b1^t)`` (lr without correct_bias); ``w -= eta*(m/(sqrt(v)+eps) + wd*w)``."""

    name = "adamw"
    state_names = ("mean", "var")

    def params(self, key, ks):
        p = super().params(key, ks)
        c = self.config
        p.b1, p.b2, p.eps = c.beta1, c.beta2, c.epsilon
        p.eta = p.lr * math.sqrt(1.0 - c.beta2 ** p.t) / (1.0 - c.beta1 ** p.t) if c.correct_bias else p.lr
        return p

    @staticmethod
    @fused("adamw")
    def kernel(xp, p, a, t):
        w, g, m, v = a
        G, T = t
        grad_into(xp, p, g, G)
        m *= p.b1
        xp.multiply(G, 1.0 - p.b1, out=T)
        m += T
        G *= G
        G *= 1.0 - p.b2
        v *= p.b2
        v += G
        xp.sqrt(v, out=T)
        T += p.eps
        xp.divide(m, T, out=T)
        if p.wd:
            xp.multiply(w, p.wd, out=G)
            T += G
        T *= p.eta
        w -= T


class AdaBelief(AdamW):
    """AdaBelief (MXNet 2.0): ``G = clip(rescale_grad*g + wd*w); m = b1*m + (1-b1)*G;
    s = b2*s + (1-b2)*(G - m)² + eps; w -= eta*m/(sqrt(s) + eps)`` with eta as in adamw."""

    name = "adabelief"

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, m, s = a
        G, T = t
        grad_wd_into(xp, p, g, w, G, T)
        m *= p.b1
        xp.multiply(G, 1.0 - p.b1, out=T)
        m += T
        G -= m
        G *= G
        G *= 1.0 - p.b2
        s *= p.b2
        s += G
        s += p.eps
        xp.sqrt(s, out=T)
        T += p.eps
        xp.divide(m, T, out=T)
        T *= p.eta
        w -= T


class LANS(LAMB):
    """LANS (MXNet 2.0, fused form): ``G = clip(rescale_grad*g / |rescale_grad*g|)``; Adam moments with
    bias correction; ``d = sqrt(v̂) + eps; um = m̂/d + wd*w; ug = G/d + wd*w``;
    ``w -= lr*(b1*ratio(um)*um + (1-b1)*ratio(ug)*ug)`` with ``ratio(u) = r1/|u|`` as in lamb."""

    name = "lans"

    def step(self, p, w, g, states, ks, rows=None):
        g2 = _sum_sq_all(g) * p.rescale * p.rescale
        p.gscale = 1.0 / math.sqrt(g2) if g2 > 0 else 0.0
        um = self.scratch(ks, "um", w)
        ug = self.scratch(ks, "ug", w)
        w2, m2, gg2 = self.run(p, w, g, states, extra=(um, ug))
        r1 = math.sqrt(w2)
        p.sm = -p.lr * p.b1 * self.trust(r1, math.sqrt(m2))
        p.sg = -p.lr * (1.0 - p.b1) * self.trust(r1, math.sqrt(gg2))
        runner().run(_lans_apply, p, [w.reshape(-1), um.reshape(-1), ug.reshape(-1)], 0, w.dtype)

    @staticmethod
    def kernel(xp, p, a, t):
        w, g, m, v, um, ug = a
        G, T = t
        _scaled(xp, g, p.rescale * p.gscale, G)
        if p.clip is not None:
            xp.clip(G, -p.clip, p.clip, out=G)
        m *= p.b1
        xp.multiply(G, 1.0 - p.b1, out=T)
        m += T
        xp.multiply(G, G, out=T)
        T *= 1.0 - p.b2
        v *= p.b2
        v += T
        xp.multiply(v, 1.0 / p.c2, out=T)
        xp.sqrt(T, out=T)
        T += p.eps  # d
        xp.divide(m, T, out=um)
        um *= 1.0 / p.c1
        xp.divide(G, T, out=ug)
        if p.wd:
            xp.multiply(w, p.wd, out=T)
            um += T
            ug += T
        return sum_sq(xp, w), sum_sq(xp, um), sum_sq(xp, ug)


def _lans_apply(xp, p, a, t):
    w, um, ug = a
    um *= p.sm
    w += um
    ug *= p.sg
    w += ug


RULES: dict[str, tuple[type[Optimizer], type]] = {
    "sgd": (SGD, C.SGDConfig),
    "ccsgd": (SGD, C.CCSGDConfig),
    "nag": (NAG, C.NAGConfig),
    "signum": (Signum, C.SignumConfig),
    "ftml": (FTML, C.FTMLConfig),
    "lars": (LARS, C.LARSConfig),
    "lbsgd": (LBSGD, C.LBSGDConfig),
    "lamb": (LAMB, C.LAMBConfig),
    "dcasgd": (DCASGD, C.DCASGDConfig),
    "sgld": (SGLD, C.SGLDConfig),
    "adam": (Adam, C.AdamConfig),
    "adagrad": (AdaGrad, C.AdaGradConfig),
    "rmsprop": (RMSProp, C.RMSPropConfig),
    "adadelta": (AdaDelta, C.AdaDeltaConfig),
    "ftrl": (Ftrl, C.FtrlConfig),
    "adamax": (Adamax, C.AdamaxConfig),
    "nadam": (Nadam, C.NadamConfig),
    "groupadagrad": (GroupAdaGrad, C.GroupAdaGradConfig),
    "test": (Test, C.TestConfig),
    "adamw": (AdamW, C.AdamWConfig),
    "adabelief": (AdaBelief, C.AdaBeliefConfig),
    "lans": (LANS, C.LANSConfig),
}


def create(config: Any) -> Optimizer:
    """The plugin factory: an optimizer object for a validated config."""
    cls, _ = RULES[config.type]
    return cls(config)


def create_optimizer(name: str, **options: Any) -> Optimizer:
    """``create_optimizer('adam', learning_rate=0.01)``: validate the options, build the optimizer."""
    from kvframe.plugins import validate_plugin_config

    return create(validate_plugin_config("optimizers", name, "optimizer config", **options))


__all__ = ["RULES", "create", "create_optimizer", "KeyState", "Hashable"]
