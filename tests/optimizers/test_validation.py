"""Every optimizer config's defaults (MXNet 1.9.1's table) and every validation bound: a bad value
is refused with an error naming the field, before anything is applied."""

import numpy as np
import pytest
from kvframe_optimizers import RULES, create_optimizer

import kvframe
from kvframe.errors import ConfigError

# MXNet 1.9.1's defaults (reference section 5; 2.0's for adamw, adabelief, lans)
DEFAULTS = {
    "sgd": {"momentum": 0.0, "lazy_update": True, "learning_rate": None},
    "ccsgd": {"momentum": 0.0, "lazy_update": True},
    "nag": {"momentum": 0.0},
    "signum": {"learning_rate": 0.01, "momentum": 0.9, "wd_lh": 0.0},
    "ftml": {"beta1": 0.6, "beta2": 0.999, "epsilon": 1e-8},
    "lars": {"momentum": 0.0, "lazy_update": True, "eta": 0.001, "eps": 0.0, "momentum_correction": True},
    "lbsgd": {"warmup_strategy": "linear", "warmup_epochs": 5, "batch_scale": 1, "updates_per_epoch": 32,
              "begin_epoch": 0, "num_epochs": 60, "momentum": 0.0},
    "lamb": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-6, "lower_bound": None,
             "upper_bound": None, "bias_correction": True},
    "dcasgd": {"momentum": 0.0, "lamda": 0.04},
    "sgld": {},
    "adam": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "lazy_update": True},
    "adagrad": {"eps": 1e-7},
    "rmsprop": {"learning_rate": 1e-3, "gamma1": 0.9, "gamma2": 0.9, "epsilon": 1e-8, "centered": False,
                "clip_weights": None},
    "adadelta": {"rho": 0.9, "epsilon": 1e-5},
    "ftrl": {"lamda1": 0.01, "learning_rate": 0.1, "beta": 1.0},
    "adamax": {"learning_rate": 2e-3, "beta1": 0.9, "beta2": 0.999},
    "nadam": {"learning_rate": 1e-3, "schedule_decay": 0.004, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    "groupadagrad": {"eps": 1e-5},
    "test": {},
    "adamw": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-6, "correct_bias": True},
    "adabelief": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-6, "correct_bias": True},
    "lans": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-6, "lower_bound": None,
             "upper_bound": None},
}
COMMON = {"wd": 0.0, "rescale_grad": 1.0, "clip_gradient": None, "lr_scheduler": None, "multi_precision": False,
          "begin_num_update": 0, "lr_mult": {}, "wd_mult": {}, "param_idx2name": {}}


@pytest.mark.parametrize("name", sorted(RULES))
def test_defaults(name):
    cfg = create_optimizer(name).config
    for field, value in {**COMMON, **DEFAULTS[name]}.items():
        assert getattr(cfg, field) == value, f"{name}.{field}"
    assert cfg.type == name


# (optimizer, field, bad value) for every bound
COMMON_BAD = [("learning_rate", -0.1), ("wd", -1e-4), ("rescale_grad", 0.0), ("rescale_grad", -1.0),
              ("clip_gradient", 0.0), ("clip_gradient", -1.0), ("begin_num_update", -1), ("lr_mult", {0: -1.0}),
              ("wd_mult", {"x": -2.0}), ("multi_precision", "maybe"), ("learning_rate", float("nan")),
              ("wd", float("inf")), ("param_idx2name", {0: 5})]
BETA_FIELDS = {"sgd": ["momentum"], "ccsgd": ["momentum"], "nag": ["momentum"], "signum": ["momentum"],
               "ftml": ["beta1", "beta2"], "lars": ["momentum"], "lbsgd": ["momentum"], "lamb": ["beta1", "beta2"],
               "dcasgd": ["momentum"], "adam": ["beta1", "beta2"], "rmsprop": ["gamma1", "gamma2"],
               "adadelta": ["rho"], "adamax": ["beta1", "beta2"], "nadam": ["beta1", "beta2"],
               "adamw": ["beta1", "beta2"], "adabelief": ["beta1", "beta2"], "lans": ["beta1", "beta2"]}
EPS_FIELDS = {"ftml": "epsilon", "lamb": "epsilon", "adam": "epsilon", "adagrad": "eps", "rmsprop": "epsilon",
              "adadelta": "epsilon", "nadam": "epsilon", "groupadagrad": "eps", "adamw": "epsilon",
              "adabelief": "epsilon", "lans": "epsilon"}
OTHER_BAD = [
    ("signum", "wd_lh", -0.1), ("lars", "eta", -1.0), ("lars", "eps", -1e-3), ("lars", "lazy_update", "sometimes"),
    ("lbsgd", "warmup_strategy", "cubic"), ("lbsgd", "warmup_epochs", -1), ("lbsgd", "batch_scale", 0),
    ("lbsgd", "updates_per_epoch", 0), ("lbsgd", "begin_epoch", -1), ("lbsgd", "num_epochs", 0),
    ("lamb", "lower_bound", 0.0), ("lamb", "upper_bound", -1.0), ("lans", "lower_bound", -1.0),
    ("lans", "upper_bound", 0.0), ("dcasgd", "lamda", -0.1), ("sgld", "seed", -1), ("rmsprop", "clip_weights", 0.0),
    ("ftrl", "lamda1", -0.1), ("ftrl", "beta", -1.0), ("nadam", "schedule_decay", -0.1),
    ("groupadagrad", "wd", 0.1), ("adamw", "correct_bias", "yes please"),
]


def _bad_cases():
    for name in sorted(RULES):
        for field, value in COMMON_BAD:
            yield name, field, value
        for field in BETA_FIELDS.get(name, []):
            yield name, field, 1.0
            yield name, field, -0.1
        if name in EPS_FIELDS:
            yield name, EPS_FIELDS[name], 0.0
            yield name, EPS_FIELDS[name], -1e-8
    yield from OTHER_BAD


BAD = list(_bad_cases())


@pytest.mark.parametrize("name,field,value", BAD, ids=[f"{n}.{f}={v!r}" for n, f, v in BAD])
def test_bound_is_enforced_and_error_names_the_field(name, field, value):
    with pytest.raises(ConfigError) as err:
        create_optimizer(name, **{field: value})
    assert field in str(err.value)


@pytest.mark.parametrize("name", sorted(RULES))
def test_unknown_option_is_refused(name):
    with pytest.raises(ConfigError, match="momentun"):
        create_optimizer(name, momentun=0.9)


def test_lower_bound_above_upper_bound():
    for name in ("lamb", "lans"):
        with pytest.raises(ConfigError, match="lower_bound"):
            create_optimizer(name, lower_bound=3.0, upper_bound=1.0)


def test_bad_config_through_the_store_changes_nothing():
    kv = kvframe.create("local")
    kv.init(0, np.ones(3, np.float32))
    kv.set_optimizer("sgd", learning_rate=0.5)
    before = kv.optimizer
    for bad in ({"type": "adam", "beta1": 1.2}, {"type": "nosuch"}, {"beta1": 0.5}):
        with pytest.raises(Exception) as err:
            kv.set_optimizer(bad)
        assert any(s in str(err.value) for s in ("beta1", "nosuch", "type"))
    with pytest.raises(ConfigError, match="momentum"):
        kv.set_optimizer("sgd", momentum=-1)
    assert kv.optimizer is before
    kv.push(0, np.ones(3, np.float32))
    out = np.empty(3, np.float32)
    kv.pull(0, out=out)
    np.testing.assert_allclose(out, 0.5)
