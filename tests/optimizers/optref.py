"""Independent float64 references of every optimizer's published update, written plainly (one
formula per line, no in-place tricks), with MXNet 1.9.1's documented behaviour where it differs from
the paper.  ``reference(name, cfg, w0, grads)`` returns the weight after each step.

These are the formulas of MXNet's docstrings and kernels; tests/optimizers/data/mxnet_golden.npz
additionally holds weights produced by MXNet 1.9.1 itself.
"""

from __future__ import annotations

import math

import numpy as np


def clip(x, c):
    return x if c is None else np.clip(x, -c, c)


# MXNet's default learning rates (the base class default is None: the scheduler's, else 0.01)
DEFAULT_LR = {"adam": 1e-3, "lamb": 1e-3, "rmsprop": 1e-3, "ftrl": 0.1, "adamax": 2e-3, "nadam": 1e-3,
              "signum": 0.01, "adamw": 1e-3, "adabelief": 1e-3, "lans": 1e-3}


def sched_lr(cfg, t):
    """Learning rate at update ``t`` (MXNet: optimizer.learning_rate or the scheduler's base)."""
    s = cfg.get("lr_scheduler")
    base = cfg.get("learning_rate")
    if base is None:
        base = s.get("base_lr", 0.01) if s else 0.01
    if not s:
        return base
    warm = s.get("warmup_steps", 0)
    if t < warm:
        begin = s.get("warmup_begin_lr", 0.0)
        if s.get("warmup_mode", "linear") == "constant":
            return begin
        return begin + (base - begin) * t / warm
    kind = s["type"]
    if kind == "factor":
        # MXNet: lr is multiplied by factor each time t passes count + step
        lr, count = base, 0
        while t > count + s["step"]:
            count += s["step"]
            lr *= s.get("factor", 1.0)
            lr = max(lr, s.get("stop_factor_lr", 1e-8))
        return lr
    if kind == "multifactor":
        lr = base
        for step in s["step"]:
            if t > step:
                lr *= s.get("factor", 1.0)
        return lr
    final, mx = s.get("final_lr", 0.0), s["max_update"]
    frac = (min(t, mx) - warm) / (mx - warm)
    if kind == "poly":
        return final + (base - final) * (1 - frac) ** s.get("pwr", 2)
    if kind == "cosine":
        return final + (base - final) * (1 + math.cos(math.pi * frac)) / 2
    raise ValueError(kind)


def reference(name: str, cfg: dict, w0: np.ndarray, grads: list, noise: list | None = None) -> list:
    """Weights (float64) after each step of optimizer ``name`` with options ``cfg``."""
    w = w0.astype(np.float64)
    out = []
    if name in DEFAULT_LR and "learning_rate" not in cfg:
        cfg = {**cfg, "learning_rate": DEFAULT_LR[name]}
    rg = cfg.get("rescale_grad", 1.0)
    cg = cfg.get("clip_gradient")
    wd = cfg.get("wd", 0.0)
    st: dict = {}
    for i, graw in enumerate(grads):
        t = cfg.get("begin_num_update", 0) + i + 1
        g = graw.astype(np.float64)
        lr = sched_lr(cfg, t)
        w = STEP[name](w, g, st, cfg, t, lr, wd, rg, cg, noise[i] if noise is not None else None)
        out.append(w.copy())
    return out


def _sgd(w, g, st, cfg, t, lr, wd, rg, cg, _):
    mu = cfg.get("momentum", 0.0)
    gr = clip(rg * g, cg)
    if mu == 0:
        return (1 - lr * wd) * w - lr * gr
    # MXNet's state: mom = momentum*mom - lr*(G + wd*w); w += mom
    mom = st.get("mom", np.zeros_like(w))
    mom = mu * mom - lr * (gr + wd * w)
    st["mom"] = mom
    return w + mom


def _nag(w, g, st, cfg, t, lr, wd, rg, cg, _):
    mu = cfg.get("momentum", 0.0)
    gr = clip(rg * g, cg)
    if mu == 0:
        return (1 - lr * wd) * w - lr * gr
    mom = st.get("mom", np.zeros_like(w))
    g2 = gr + wd * w
    new_w = w - lr * (g2 + mu * (mu * mom + g2))
    # MXNet 1.9.1 updates the weight in place first, so the momentum's wd term sees the new weight
    st["mom"] = mu * mom + gr + wd * new_w
    return new_w


def _signum(w, g, st, cfg, t, lr, wd, rg, cg, _):
    mu = cfg.get("momentum", 0.9)
    wd_lh = cfg.get("wd_lh", 0.0)
    gr = clip(rg * g, cg)
    if mu == 0:
        return (1 - lr * wd - lr * wd_lh) * w - lr * np.sign(gr)
    # documented: state = mu*state + (1-mu)*(G + wd*w); w = (1 - lr*wd_lh)*w - lr*sign(state)
    s = st.get("s", np.zeros_like(w))
    s = mu * s + (1 - mu) * (gr + wd * w)
    st["s"] = s
    return (1 - lr * wd_lh) * w - lr * np.sign(s)


def _ftml(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2, eps = cfg.get("beta1", 0.6), cfg.get("beta2", 0.999), cfg.get("epsilon", 1e-8)
    gr = clip(rg * g + wd * w, cg)
    v = b2 * st.get("v", 0) + (1 - b2) * gr ** 2
    d = (1 - b1 ** t) / lr * (np.sqrt(v / (1 - b2 ** t)) + eps)
    sigma = d - b1 * st.get("d", 0)
    z = b1 * st.get("z", 0) + (1 - b1) * gr - sigma * w
    st.update(v=v, d=d, z=z)
    return -z / d


def _lars(w, g, st, cfg, t, lr, wd, rg, cg, _, name="w"):
    eta, eps = cfg.get("eta", 0.001), cfg.get("eps", 0.0)
    mu = cfg.get("momentum", 0.0)
    last = st.get("last_lr", lr)
    st["last_lr"] = lr
    if mu and cfg.get("momentum_correction", True) and last != 0:
        mu = mu * lr / last
    wn, gn = np.linalg.norm(w), np.linalg.norm(g) * rg
    if wn > 0 and gn > 0:
        lr = lr * eta * wn / (gn + wd * wn + eps)
    return _sgd(w, g, st, {**cfg, "momentum": mu}, t, lr, wd, rg, cg, None)


def _lbsgd(w, g, st, cfg, t, lr, wd, rg, cg, _):
    # lr is read before the update count moves (MXNet reads it first)
    lr = sched_lr(cfg, t - 1)
    bs = cfg.get("batch_scale", 1)
    st["n"] = st.get("n", cfg.get("begin_epoch", 0) * cfg.get("updates_per_epoch", 32)) + 1
    st["cum"] = st.get("cum", 0) + g
    if st["n"] % bs:
        return w
    avg = st["cum"] / bs
    st["cum"] = 0
    if cfg.get("warmup_strategy", "linear") == "lars":
        w2, g2 = np.sum(w * w), np.sum(avg * avg)
        mult = min(100.0, max(0.01, math.sqrt(w2 / (g2 + wd * w2 + 1e-18))))
    else:
        nwup = cfg.get("warmup_epochs", 5) * cfg.get("updates_per_epoch", 32)
        n = st["n"]
        if n >= nwup:
            mult = float(bs)
        elif nwup <= 1:
            mult = 1.0
        else:
            x = n / nwup
            mult = 1 + (bs - 1) * {"linear": x, "power2": x * x, "sqrt": math.sqrt(x)}[cfg.get("warmup_strategy",
                                                                                            "linear")]
    return _sgd(w, avg, st, cfg, t, lr * mult, wd, rg, cg, None)


def _bounded_ratio(cfg, r1, r2):
    if cfg.get("lower_bound"):
        r1 = max(r1, cfg["lower_bound"])
    if cfg.get("upper_bound"):
        r1 = min(r1, cfg["upper_bound"])
    return r1 / r2 if r1 > 0 and r2 > 0 else 1.0


def _lamb(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2, eps = cfg.get("beta1", 0.9), cfg.get("beta2", 0.999), cfg.get("epsilon", 1e-6)
    gr = clip(rg * g, cg)
    m = b1 * st.get("m", 0) + (1 - b1) * gr
    v = b2 * st.get("v", 0) + (1 - b2) * gr ** 2
    st.update(m=m, v=v)
    if cfg.get("bias_correction", True):
        u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * w
    else:
        u = m / (np.sqrt(v) + eps) + wd * w
    ratio = _bounded_ratio(cfg, np.linalg.norm(w), np.linalg.norm(u))
    return w - lr * ratio * u


def _dcasgd(w, g, st, cfg, t, lr, wd, rg, cg, _):
    mu, lam = cfg.get("momentum", 0.0), cfg.get("lamda", 0.04)
    gr = clip(rg * g, cg)
    prev = st.get("prev", w)
    step = -lr * (gr + wd * w + lam * gr * gr * (w - prev))
    mom = mu * st.get("mom", 0) + step if mu else step
    st.update(prev=w.copy(), mom=mom)
    return w + mom


def _sgld(w, g, st, cfg, t, lr, wd, rg, cg, noise):
    gr = clip(rg * g, cg)
    return w - lr / 2 * (gr + wd * w) + math.sqrt(lr) * noise


def _adam(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2, eps = cfg.get("beta1", 0.9), cfg.get("beta2", 0.999), cfg.get("epsilon", 1e-8)
    gr = clip(rg * g + wd * w, cg)
    m = b1 * st.get("m", 0) + (1 - b1) * gr
    v = b2 * st.get("v", 0) + (1 - b2) * gr ** 2
    st.update(m=m, v=v)
    lr_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return w - lr_t * m / (np.sqrt(v) + eps)


def _adagrad(w, g, st, cfg, t, lr, wd, rg, cg, _):
    gr = clip(rg * g, cg)
    h = st.get("h", 0) + gr ** 2
    st["h"] = h
    return w - lr * (gr / np.sqrt(h + cfg.get("eps", 1e-7)) + wd * w)


def _rmsprop(w, g, st, cfg, t, lr, wd, rg, cg, _):
    g1, g2, eps = cfg.get("gamma1", 0.9), cfg.get("gamma2", 0.9), cfg.get("epsilon", 1e-8)
    gr = clip(rg * g + wd * w, cg)
    n = (1 - g1) * gr ** 2 + g1 * st.get("n", 0)
    st["n"] = n
    if cfg.get("centered"):
        gm = (1 - g1) * gr + g1 * st.get("g", 0)
        delta = g2 * st.get("delta", 0) - lr * gr / np.sqrt(n - gm ** 2 + eps)
        st.update(g=gm, delta=delta)
        w = w + delta
    else:
        w = w - lr * gr / np.sqrt(n + eps)
    cw = cfg.get("clip_weights")
    return np.clip(w, -cw, cw) if cw else w


def _adadelta(w, g, st, cfg, t, lr, wd, rg, cg, _):
    rho, eps = cfg.get("rho", 0.9), cfg.get("epsilon", 1e-5)
    gr = clip(rg * g, cg)
    ag = rho * st.get("ag", 0) + (1 - rho) * gr ** 2
    delta = np.sqrt(st.get("ad", 0) + eps) / np.sqrt(ag + eps) * gr
    ad = rho * st.get("ad", 0) + (1 - rho) * delta ** 2
    st.update(ag=ag, ad=ad)
    return w - (delta + wd * w)  # MXNet 1.9.1 does not use the learning rate here


def _ftrl(w, g, st, cfg, t, lr, wd, rg, cg, _):
    l1, beta = cfg.get("lamda1", 0.01), cfg.get("beta", 1.0)
    gr = clip(rg * g, cg)
    n0 = st.get("n", np.zeros_like(w))
    z = st.get("z", 0) + gr - (np.sqrt(n0 + gr ** 2) - np.sqrt(n0)) * w / lr
    n = n0 + gr ** 2
    st.update(z=z, n=n)
    return (np.sign(z) * l1 - z) / ((beta + np.sqrt(n)) / lr + wd) * (np.abs(z) > l1)


def _adamax(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2 = cfg.get("beta1", 0.9), cfg.get("beta2", 0.999)
    gr = clip(rg * g + wd * w, cg)
    m = b1 * st.get("m", 0) + (1 - b1) * gr
    u = np.maximum(b2 * st.get("u", 0), np.abs(gr))
    st.update(m=m, u=u)
    return w - lr / (1 - b1 ** t) * m / u


def _nadam(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2, eps, sd = (cfg.get("beta1", 0.9), cfg.get("beta2", 0.999), cfg.get("epsilon", 1e-8),
                       cfg.get("schedule_decay", 0.004))
    gr = clip(rg * g + wd * w, cg)
    mu_t = b1 * (1 - 0.5 * 0.96 ** (t * sd))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * sd))
    prod = st.get("prod", 1.0) * mu_t
    m = b1 * st.get("m", 0) + (1 - b1) * gr
    v = b2 * st.get("v", 0) + (1 - b2) * gr ** 2
    st.update(prod=prod, m=m, v=v)
    g_hat = gr / (1 - prod)
    m_hat = m / (1 - prod * mu_next)
    v_hat = v / (1 - b2 ** t)
    m_bar = (1 - mu_t) * g_hat + mu_next * m_hat
    return w - lr * m_bar / (np.sqrt(v_hat) + eps)


def _groupadagrad(w, g, st, cfg, t, lr, wd, rg, cg, _):
    gr = clip(rg * g, cg)
    h = st.get("h", 0) + np.mean(gr ** 2, axis=1, keepdims=True)
    st["h"] = h
    return w - lr * gr / np.sqrt(h + cfg.get("eps", 1e-5))


def _test(w, g, st, cfg, t, lr, wd, rg, cg, _):
    return w + rg * g


def _adamw(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2, eps = cfg.get("beta1", 0.9), cfg.get("beta2", 0.999), cfg.get("epsilon", 1e-6)
    gr = clip(rg * g, cg)
    m = b1 * st.get("m", 0) + (1 - b1) * gr
    v = b2 * st.get("v", 0) + (1 - b2) * gr ** 2
    st.update(m=m, v=v)
    eta = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if cfg.get("correct_bias", True) else lr
    return w - eta * (m / (np.sqrt(v) + eps) + wd * w)


def _adabelief(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2, eps = cfg.get("beta1", 0.9), cfg.get("beta2", 0.999), cfg.get("epsilon", 1e-6)
    gr = clip(rg * g + wd * w, cg)
    m = b1 * st.get("m", 0) + (1 - b1) * gr
    s = b2 * st.get("s", 0) + (1 - b2) * (gr - m) ** 2 + eps
    st.update(m=m, s=s)
    eta = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if cfg.get("correct_bias", True) else lr
    return w - eta * m / (np.sqrt(s) + eps)


def _lans(w, g, st, cfg, t, lr, wd, rg, cg, _):
    b1, b2, eps = cfg.get("beta1", 0.9), cfg.get("beta2", 0.999), cfg.get("epsilon", 1e-6)
    gr = rg * g
    gr = clip(gr / np.linalg.norm(gr), cg)
    m = b1 * st.get("m", 0) + (1 - b1) * gr
    v = b2 * st.get("v", 0) + (1 - b2) * gr ** 2
    st.update(m=m, v=v)
    denom = np.sqrt(v / (1 - b2 ** t)) + eps
    um = (m / (1 - b1 ** t)) / denom + wd * w
    ug = gr / denom + wd * w
    r1 = np.linalg.norm(w)
    return w - lr * (b1 * _bounded_ratio(cfg, r1, np.linalg.norm(um)) * um
                     + (1 - b1) * _bounded_ratio(cfg, r1, np.linalg.norm(ug)) * ug)


STEP = {
    "sgd": _sgd, "ccsgd": _sgd, "nag": _nag, "signum": _signum, "ftml": _ftml, "lars": _lars, "lbsgd": _lbsgd,
    "lamb": _lamb, "dcasgd": _dcasgd, "sgld": _sgld, "adam": _adam, "adagrad": _adagrad, "rmsprop": _rmsprop,
    "adadelta": _adadelta, "ftrl": _ftrl, "adamax": _adamax, "nadam": _nadam, "groupadagrad": _groupadagrad,
    "test": _test, "adamw": _adamw, "adabelief": _adabelief, "lans": _lans,
}
