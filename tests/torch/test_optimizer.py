"""kvframe-torch in one process (stores 'local' and 'device'): behaviour a torch user relies on,
checked against plain torch; errors that name the fix. The cross-process behaviour is test_dist.py's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the torch tests need PyTorch (requirements-dev.txt pins torch==2.13.0)")
kvframe_torch = pytest.importorskip("kvframe_torch", reason="kvframe-torch is not installed (make installs it)")

from torch_helpers import LR, MOMENTUM, STEPS, data, flat, loss_of, make_model, reference  # noqa: E402

import kvframe  # noqa: E402
from kvframe.errors import NotSupportedError  # noqa: E402


def run(opt, model, steps=range(STEPS)):
    x, y = data()
    losses = []
    for s in steps:
        opt.zero_grad()
        loss = loss_of(model, x[s], y[s])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def wrap(store, model, lr=LR, **kw):
    return kvframe_torch.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM), store,
                                              model.named_parameters(), **kw)


@pytest.mark.parametrize("on_store", [False, True])
def test_both_modes_follow_plain_torch(on_store):
    store = kvframe.create("local")
    if on_store:
        store.set_optimizer("sgd", learning_rate=LR, momentum=MOMENTUM)
    model = make_model()
    opt = wrap(store, model, update_on_store=on_store)
    assert isinstance(opt, torch.optim.SGD) and kvframe_torch.is_distributed(opt)
    losses = run(opt, model)
    ref = reference()
    assert losses == pytest.approx(ref["losses"], abs=1e-6)
    assert flat(model) == pytest.approx(ref["params"][-1], abs=1e-6)
    names = [n for n, _ in model.named_parameters()]
    if on_store:
        assert set(store.keys()) == set(names)  # the store's keys are the parameters' names
    else:
        assert all(kvframe.is_sum_key(k) for k in store.keys())


def test_lr_scheduler_and_param_groups_are_the_wrapped_optimizers():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    opt = kvframe_torch.DistributedOptimizer(base, kvframe.create("local"), model.named_parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, model, range(2))
    sched.step()
    assert opt.param_groups[0]["lr"] == base.param_groups[0]["lr"] == LR / 2
    with pytest.raises(NotSupportedError, match="before wrapping"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_update_on_store_needs_the_stores_optimizer():
    model = make_model()
    with pytest.raises(ValueError, match="set_optimizer"):
        wrap(kvframe.create("local"), model, update_on_store=True)


def test_parameter_names_are_checked():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="lacks 2 of the optimizer's parameters"):
        kvframe_torch.DistributedOptimizer(opt, kvframe.create("local"), list(model.named_parameters())[:2])
    dup = [("w", p) for _, p in model.named_parameters()]
    with pytest.raises(ValueError, match="given twice"):
        kvframe_torch.DistributedOptimizer(opt, kvframe.create("local"), dup)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        kvframe_torch.DistributedOptimizer(model, kvframe.create("local"))
    int_store = kvframe.create("local")
    int_store.init(3, torch.zeros(2))
    with pytest.raises(TypeError, match="int keys"):
        kvframe_torch.DistributedOptimizer(opt, int_store)
    wrapped = kvframe_torch.DistributedOptimizer(opt, kvframe.create("local"))  # numbered names
    with pytest.raises(ValueError, match="already"):
        kvframe_torch.DistributedOptimizer(wrapped, kvframe.create("local"))


def test_zero_grad_while_sums_are_in_flight_and_extra_backward_passes_are_refused():
    x, y = data()
    model = make_model()
    opt = wrap(kvframe.create("local"), model)
    loss_of(model, x[0], y[0]).backward()
    with pytest.raises(RuntimeError, match="call step\\(\\) first"):
        opt.zero_grad()
    with pytest.raises(RuntimeError, match="computed 2 times"):
        loss_of(model, x[1], y[1]).backward()
    opt.synchronize()
    with pytest.raises(RuntimeError, match="after synchronize"):
        loss_of(model, x[1], y[1]).backward()
    opt.step()
    opt.zero_grad()  # fine after the step


def test_backward_passes_per_step_accumulates_like_torch():
    x, y = data()
    model = make_model()
    opt = wrap(kvframe.create("local"), model, backward_passes_per_step=2)
    for s in range(STEPS):
        opt.zero_grad()
        for xs, ys in zip(x[s].tensor_split(2), y[s].tensor_split(2)):
            (loss_of(model, xs, ys) / 2).backward()
        opt.step()
    assert flat(model) == pytest.approx(reference()["params"][-1], abs=1e-6)


def test_unused_parameters_still_take_part():
    """A parameter without a gradient this step gets zeros (every worker must push every key)."""
    model = make_model()
    extra = torch.nn.Parameter(torch.ones(3))
    opt = kvframe_torch.DistributedOptimizer(torch.optim.SGD([*model.parameters(), extra], lr=LR),
                                             kvframe.create("local"))
    run(opt, model, range(2))
    assert torch.equal(extra.grad, torch.zeros(3)) and torch.equal(extra.detach(), torch.ones(3))


def test_checkpoint_round_trip_with_the_stores_optimizer():
    """update_on_store: the store holds the weights and the optimizer states; state_dict carries the
    states, and a new store, model and optimizer resume the run exactly."""
    def fresh(seed=0):
        store = kvframe.create("local")
        store.set_optimizer("sgd", learning_rate=LR, momentum=MOMENTUM)
        model = make_model(seed)
        return store, model, wrap(store, model, update_on_store=True)

    store, model, opt = fresh()
    run(opt, model, range(3))
    sd = opt.state_dict()
    assert isinstance(sd[kvframe_torch.optimizer.STORE_STATES], bytes)
    saved = {"model": model.state_dict(), "opt": sd}

    store2, model2, opt2 = fresh(seed=5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])  # before the first backward pass: applied when the keys are made
    run(opt2, model2, range(3, STEPS))
    assert flat(model2) == pytest.approx(reference()["params"][-1], abs=1e-6)
    with pytest.raises(NotSupportedError, match="made at the first backward pass"):
        opt2.load_state_dict(saved["opt"])
    plain = wrap(kvframe.create("local"), make_model())
    with pytest.raises(ValueError, match="update_on_store=False"):
        plain.load_state_dict(saved["opt"])


def test_lbfgs_closure_is_summed_each_evaluation():
    x, y = data()

    def train(make_opt):
        model = make_model()
        opt = make_opt(model)

        def closure():
            opt.zero_grad()
            loss = loss_of(model, x[0], y[0])
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        return flat(model)

    plain = train(lambda m: torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4))
    dist = train(lambda m: kvframe_torch.DistributedOptimizer(torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4),
                                                              kvframe.create("local"), m.named_parameters()))
    assert dist == pytest.approx(plain, abs=1e-6)


def test_bfloat16_parameters_travel_as_float32():
    x, y = data()

    def train(dist):
        model = make_model().to(torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        if dist:
            opt = kvframe_torch.DistributedOptimizer(opt, kvframe.create("local"), model.named_parameters())
        for s in range(2):
            opt.zero_grad()
            loss_of(model, x[s].to(torch.bfloat16), y[s]).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(True), train(False)))


def test_single_worker_collectives_and_compression_rules():
    store = kvframe.create("device")
    store.set_optimizer("sgd", learning_rate=1.0)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(kvframe_torch.allreduce(t, store, "m"), t)
    assert torch.equal(kvframe_torch.allreduce(t, store, "m"), t)  # again: the key exists, the optimizer never ran
    assert float(kvframe_torch.allreduce(3, store, "n", average=False)) == 3
    model = make_model()
    before = flat(model)
    kvframe_torch.broadcast_parameters(model.state_dict(), store)
    kvframe_torch.broadcast_optimizer_state(torch.optim.SGD(model.parameters(), lr=1.0), store)
    assert flat(model) == before and kvframe_torch.broadcast_object({"a": 1}, store) == {"a": 1}
    with pytest.raises(ValueError, match="root_rank"):
        kvframe_torch.broadcast_parameters(model.state_dict(), store, root_rank=1)

    store.set_gradient_compression(kvframe_torch.Compression.twobit)  # small float32 tensors stay exact
    assert torch.equal(kvframe_torch.allreduce(t, store, "m"), t)
    with pytest.raises(NotSupportedError, match="inexact"):
        kvframe_torch.allreduce(torch.ones(1000), store, "big")
    mxnet_style = kvframe.create("device")
    mxnet_style.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    with pytest.raises(NotSupportedError, match="threshold_scale"):
        kvframe_torch.allreduce(t, mxnet_style, "m")


def test_scale_free_2bit_trains_without_tuning():
    """The same untuned setting on a toy model: the scale-free 2bit ends near uncompressed training,
    while MXNet's default absolute threshold (0.5, in gradient units) ends above the start."""
    x, y = data()
    whole = x.reshape(-1, 8), y.reshape(-1)

    def final_loss(compression):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
        store = kvframe.create("device")
        opt = kvframe_torch.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                                                 store, model.named_parameters(), compression=compression)
        start = float(loss_of(model, *whole).detach())
        for _ in range(20):
            run(opt, model)
        return start, float(loss_of(model, *whole).detach()), store.gradient_compression

    start, plain, _ = final_loss(None)
    _, rms, cfg = final_loss("2bit")
    assert (cfg.type, cfg.threshold_scale, cfg.threshold) == ("2bit", "rms", 1.0)
    _, rms_all, _ = final_loss({"type": "2bit", "threshold_scale": "rms", "raw_below": 0})  # biases too
    _, absolute, _ = final_loss({"type": "2bit", "threshold": 0.5})
    assert plain < 0.7 * start
    assert rms <= 1.03 * plain and rms_all <= 1.03 * plain
    assert absolute > start


def test_create_store_follows_the_launcher(monkeypatch, tmp_path):
    for var in ("KVFRAME_CONFIG", "KVFRAME_ROOT_PORT", "DMLC_PS_ROOT_PORT", "DMLC_ROLE", "WORLD_SIZE", "RANK",
                "KVFRAME_NUM_SERVERS", "KVFRAME_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert kvframe_torch.launcher() == "none" and kvframe_torch.create_store().type == "local"
    assert kvframe_torch.create_store("device").type == "device"
    cfg = tmp_path / "kv.toml"
    cfg.write_text('[store]\ntype = "device"\n[compression]\ntype = "2bit"\nthreshold_scale = "rms"\n')
    monkeypatch.setenv("KVFRAME_CONFIG", str(cfg))
    store = kvframe_torch.create_store()
    assert store.type == "device" and store.gradient_compression.threshold_scale == "rms"
    monkeypatch.delenv("KVFRAME_CONFIG")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert kvframe_torch.launcher() == "torchrun"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="kvframe-launch -n 2"):
            kvframe_torch.create_store()
    assert kvframe_torch.launcher({"KVFRAME_ROOT_PORT": "9000"}) == "kvframe-launch"
    assert kvframe_torch.launcher({"KVFRAME_ROOT_PORT": "9000", "KVFRAME_NUM_SERVERS": "0"}) == "kvframe-launch-workers"
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    for var, value in {"KVFRAME_ROOT_PORT": "9000", "KVFRAME_NUM_SERVERS": "0", "KVFRAME_WORLD_SIZE": "2",
                       "KVFRAME_RANK": "0"}.items():
        monkeypatch.setenv(var, value)
    if not torch.cuda.is_available():  # kvframe-launch -s 0: all-reduce with nccl, which needs GPUs
        with pytest.raises(RuntimeError, match="without servers .* kvframe-launch -n 2 -s 1"):
            kvframe_torch.create_store()
