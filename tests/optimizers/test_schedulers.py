"""Learning-rate schedulers: values against hand-written formulas and MXNet's stateful algorithm,
warmup, use by an optimizer (num_update counting), and validation."""

import math

import numpy as np
import pytest
from kvframe_optimizers import SchedulerConfig, create_optimizer
from pydantic import TypeAdapter, ValidationError

from kvframe.errors import ConfigError

ADAPTER = TypeAdapter(SchedulerConfig)


def make(**kw):
    return ADAPTER.validate_python(kw)


def mxnet_factor(base, step, factor, stop, updates):
    """MXNet 1.9.1's FactorScheduler, stateful as it is, called with growing num_update."""
    lr, count, out = base, 0, []
    for n in updates:
        while n > count + step:
            count += step
            lr *= factor
            if lr < stop:
                lr = stop
        out.append(lr)
    return out


def test_factor_matches_mxnet_stateful_algorithm():
    s = make(type="factor", step=3, factor=0.5, stop_factor_lr=0.01, base_lr=1.0)
    ns = list(range(0, 30))
    assert [s(n) for n in ns] == pytest.approx(mxnet_factor(1.0, 3, 0.5, 0.01, ns))
    assert s(3) == 1.0 and s(4) == 0.5 and s(7) == 0.25 and s(29) == 0.01


def test_multifactor():
    s = make(type="multifactor", step=[2, 5, 9], factor=0.1, base_lr=1.0)
    expect = {0: 1, 2: 1, 3: 0.1, 5: 0.1, 6: 0.01, 9: 0.01, 10: 0.001, 100: 0.001}
    for n, lr in expect.items():
        assert s(n) == pytest.approx(lr), n


def test_poly_and_cosine_with_warmup():
    poly = make(type="poly", max_update=12, pwr=2, final_lr=0.1, base_lr=1.0, warmup_steps=2, warmup_begin_lr=0.2)
    cos = make(type="cosine", max_update=12, final_lr=0.1, base_lr=1.0, warmup_steps=2, warmup_begin_lr=0.2)
    for n in range(0, 20):
        if n < 2:
            w = 0.2 + (1.0 - 0.2) * n / 2
            assert poly(n) == pytest.approx(w) and cos(n) == pytest.approx(w)
            continue
        frac = (min(n, 12) - 2) / 10
        assert poly(n) == pytest.approx(0.1 + 0.9 * (1 - frac) ** 2), n
        assert cos(n) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * frac)) / 2), n
    assert poly(12) == pytest.approx(0.1) and cos(40) == pytest.approx(0.1)


def test_constant_warmup():
    s = make(type="factor", step=10, base_lr=1.0, warmup_steps=4, warmup_begin_lr=0.3, warmup_mode="constant")
    assert [s(n) for n in range(6)] == [0.3, 0.3, 0.3, 0.3, 1.0, 1.0]


def test_optimizer_drives_scheduler_with_update_count_and_learning_rate_overrides_base():
    """SGD without momentum moves w by -lr*g: read the lr of every step back from the weight. The
    count starts at begin_num_update and the first update uses num_update = begin + 1."""
    sched = {"type": "factor", "step": 2, "factor": 0.5, "base_lr": 123.0}
    for begin in (0, 3):
        opt = create_optimizer("sgd", learning_rate=0.8, lr_scheduler=sched, begin_num_update=begin)
        upd = opt.create_updater()
        w = np.zeros(1, np.float64)
        seen = []
        for _ in range(6):
            before = w.copy()
            upd(0, np.ones(1), w)
            seen.append(float(before[0] - w[0]))
        expect = [0.8 * 0.5 ** ((n - 1) // 2) for n in range(begin + 1, begin + 7)]
        assert seen == pytest.approx(expect)
        assert opt.num_update == begin + 6
        assert opt.learning_rate == pytest.approx(expect[-1])


def test_num_update_is_the_max_over_keys():
    opt = create_optimizer("sgd", lr_scheduler={"type": "multifactor", "step": [2], "factor": 0.1, "base_lr": 1.0})
    upd = opt.create_updater()
    w = np.zeros(1)
    for _ in range(3):
        upd(0, np.ones(1), w)  # key 0 reaches count 3 -> num_update 3
    w1 = np.zeros(1)
    upd(1, np.ones(1), w1)  # key 1's first update runs at lr(num_update=3) = 0.1
    assert w1[0] == pytest.approx(-0.1)


def test_scheduler_validation_names_the_field():
    cases = [
        ({"type": "factor", "step": 0}, "step"),
        ({"type": "factor", "step": 2, "factor": 1.5}, "factor"),
        ({"type": "factor", "step": 2, "factor": 0}, "factor"),
        ({"type": "factor", "step": 2, "stop_factor_lr": -1}, "stop_factor_lr"),
        ({"type": "multifactor", "step": []}, "step"),
        ({"type": "multifactor", "step": [3, 2]}, "increasing"),
        ({"type": "multifactor", "step": [0, 2]}, "step"),
        ({"type": "poly", "max_update": 0}, "max_update"),
        ({"type": "poly", "max_update": 5, "pwr": -1}, "pwr"),
        ({"type": "cosine", "max_update": 5, "final_lr": -0.1}, "final_lr"),
        ({"type": "cosine", "max_update": 5, "warmup_steps": 5}, "max_update"),
        ({"type": "cosine", "max_update": 5, "warmup_steps": -1}, "warmup_steps"),
        ({"type": "cosine", "max_update": 5, "warmup_mode": "cubic"}, "warmup_mode"),
        ({"type": "factor", "step": 2, "base_lr": 0.1, "warmup_steps": 2, "warmup_begin_lr": 0.5}, "warmup_begin_lr"),
        ({"type": "factor", "step": 2, "base_lr": -0.1}, "base_lr"),
        ({"type": "factor", "step": 2, "bogus": 1}, "bogus"),
        ({"type": "exponential"}, "type"),
    ]
    for cfg, field in cases:
        with pytest.raises(ConfigError, match=field):
            create_optimizer("sgd", lr_scheduler=cfg)
        with pytest.raises(ValidationError):
            ADAPTER.validate_python(cfg)


def test_warmup_begin_above_optimizer_learning_rate_is_refused():
    with pytest.raises(ConfigError, match="warmup_begin_lr"):
        create_optimizer("sgd", learning_rate=0.01, lr_scheduler={"type": "factor", "step": 2, "base_lr": 1.0,
                                                                  "warmup_steps": 3, "warmup_begin_lr": 0.5})


def test_scheduler_error_path_is_nested_under_lr_scheduler():
    with pytest.raises(ConfigError, match=r"lr_scheduler\.factor\.step"):
        create_optimizer("adam", lr_scheduler={"type": "factor", "step": 0})
