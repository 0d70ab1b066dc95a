"""Data-parallel training of a small MLP, in numpy, through kvframe.

The dataset is scikit-learn's handwritten digits (1,797 8x8 images, shipped inside scikit-learn).
Each worker simulates N devices: every step, the global batch is split over the workers, then over
each worker's devices; every device computes its gradients, the per-device gradient lists are
pushed to the store (which sums them, and across workers in a dist store), the optimizer runs on
the store, and every device pulls the new weights.  The store, the gradient compression and the
optimizer come from a config file:

    python examples/train_digits.py                                    # 'local' (examples/configs/local.toml)
    python examples/train_digits.py --config examples/configs/device.toml
    python examples/train_digits.py --config examples/configs/2bit.toml
    python examples/train_digits.py --config examples/configs/dist_sync.toml   # 2 workers + 1 server

A dist config started directly re-launches itself through ``kvframe-launch -n 2 -s 1 --config
FILE`` on loopback (``[app] workers/servers`` or --workers/--servers choose the sizes); started by
kvframe-launch it runs as one worker.  Every split is deterministic (seeded), and a gradient is the
sum over the global batch whatever the split, so a dist run follows the local run's trajectory up
to float rounding and reaches the same accuracy.

Without an ``[optimizer]`` section the store only sums, and each worker applies SGD with momentum
itself (MXNet's update_on_kvstore=False).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import kvframe
from kvframe.configfile import ENV_CONFIG, load_config
from kvframe.errors import KVFrameError

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "local.toml"
KEYS = ["w1", "b1", "w2", "b2"]


# data and model -------------------------------------------------------------------------------

def load_data(seed: int, test_fraction: float = 0.2):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this demo needs scikit-learn for its dataset: pip install scikit-learn "
                 "(or pip install 'kvframe[examples]'; `make demo` installs it)")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def init_params(seed: int, n_in: int, hidden: int, n_out: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32),
        np.zeros(hidden, np.float32),
        (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32),
        np.zeros(n_out, np.float32),
    ]


def forward(params, x):
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    logits = h @ w2 + b2
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return h, p


def loss_and_grads(params, x, y):
    """Summed (not averaged) cross-entropy over the samples and its gradients: summing over devices
    and workers gives the global batch's gradient; the optimizer's rescale_grad averages it."""
    w1, b1, w2, b2 = params
    if len(x) == 0:
        return 0.0, [np.zeros_like(p) for p in params]
    h, p = forward(params, x)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).sum())
    d = p
    d[np.arange(len(y)), y] -= 1.0
    dw2 = h.T @ d
    db2 = d.sum(axis=0)
    dh = (d @ w2.T) * (1.0 - h * h)
    dw1 = x.T @ dh
    db1 = dh.sum(axis=0)
    return loss, [g.astype(np.float32, copy=False) for g in (dw1, db1, dw2, db2)]


def evaluate(params, x, y) -> tuple[float, float]:
    _, p = forward(params, x)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    acc = float((p.argmax(axis=1) == y).mean())
    return loss, acc


# progress ---------------------------------------------------------------------------------------

class SimpleBar:
    """A tiny progress bar on stderr, used when tqdm is not installed."""

    def __init__(self, total: int, desc: str, disable: bool):
        self.total, self.desc, self.disable, self.n, self.postfix = total, desc, disable, 0, ""

    def _draw(self) -> None:
        if not self.disable:
            filled = int(30 * self.n / self.total)
            sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {self.n}/{self.total}"
                             f"{'  ' + self.postfix if self.postfix else ''}")
            sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def write(self, line: str) -> None:
        if not self.disable:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        print(line, flush=True)
        self._draw()

    def close(self) -> None:
        if not self.disable:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress(total: int, desc: str, disable: bool):
    """One bar over the whole run (tqdm when installed); epoch lines go through ``bar.write``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return SimpleBar(total, desc, disable)
    return tqdm(total=total, desc=desc, disable=disable, ncols=100, file=sys.stderr, unit="step",
                mininterval=0.05)


# launching --------------------------------------------------------------------------------------

def under_launcher() -> bool:
    return any(os.environ.get(v) for v in ("KVFRAME_ROOT_PORT", "DMLC_PS_ROOT_PORT"))


def relaunch(config_path: Path, workers: int, servers: int, argv: list[str]) -> int:
    launcher = shutil.which("kvframe-launch", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")]))
    if launcher is None:
        sys.exit("a dist store needs the kvframe-launch command: pip install 'kvframe[dist]' (or kvframe-launch)")
    cmd = [launcher, "-n", str(workers), "-s", str(servers), "--config", str(config_path), "--",
           sys.executable, str(Path(__file__).resolve()), *argv]
    print(f"launching {workers} workers and {servers} server(s) on loopback: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


# training ---------------------------------------------------------------------------------------

def sgd_on_worker(momentum: float, lr: float, rescale: float):
    """SGD with momentum applied by each worker to its own copies (when the store has no optimizer)."""
    state: dict = {}

    def step(i: int, grad: np.ndarray, weight: np.ndarray) -> None:
        mom = state.get(i)
        if mom is None:
            mom = state[i] = np.zeros_like(weight)
        mom *= momentum
        mom -= lr * rescale * grad
        weight += mom

    return step


def train(args: argparse.Namespace, cfg) -> dict:
    app = cfg.app
    epochs = pick(args.epochs, app, "epochs", 15)
    devices = pick(args.devices, app, "devices", 2)
    batch = pick(args.batch_size, app, "batch_size", 64)
    hidden = pick(args.hidden, app, "hidden", 64)

    x_train, y_train, x_test, y_test = load_data(args.seed)
    if batch > len(x_train):
        raise SystemExit(f"--batch-size {batch} is larger than the {len(x_train)} training images: no step would run")
    on_store = cfg.optimizer is not None
    if on_store and "rescale_grad" in type(cfg.optimizer).model_fields \
            and "rescale_grad" not in cfg.optimizer.model_fields_set:
        cfg.optimizer.rescale_grad = 1.0 / batch  # pushes are sums over the global batch

    kv = kvframe.create_from_config(cfg)  # a path or a dict works too; cfg is already validated
    rank, nworkers = kv.rank, kv.num_workers
    quiet = args.quiet or rank != 0

    def say(*a, **k):
        if not quiet:
            print(*a, **k)

    say(f"kvframe store {kv.type!r}: {nworkers} worker(s) x {devices} device(s); "
        f"compression: {cfg.compression.type if cfg.compression else 'none'}; "
        f"optimizer: {cfg.optimizer.type + ' on the store' if on_store else 'sgd on the workers'}; "
        f"{len(x_train)} training / {len(x_test)} test images, global batch {batch}", flush=True)

    params = init_params(args.seed, x_train.shape[1], hidden, 10)
    kv.init(KEYS, params)  # in a dist store rank 0's values win
    copies = [[np.empty_like(p) for _ in range(devices)] for p in params]  # per key, per device
    kv.pull(KEYS, out=copies)
    worker_sgd = None if on_store else sgd_on_worker(args.momentum, args.lr, 1.0 / batch)

    # the bar goes to a terminal (not to a pipe, e.g. under kvframe-launch), unless --progress
    show_bar = not quiet and not args.no_progress and (args.progress or sys.stderr.isatty())
    steps = len(x_train) // batch  # the last, partial batch is dropped (the order changes every epoch)
    history = []
    bar = progress(epochs * steps, f"epoch 1/{epochs}", disable=not show_bar)

    def epoch_line(line: str) -> None:
        if show_bar:
            bar.write(line)  # above the bar, which stays at the bottom
        else:
            say(line, flush=True)

    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng([args.seed, epoch]).permutation(len(x_train))
        bar.set_description(f"epoch {epoch}/{epochs}")
        running = 0.0
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            mine = np.array_split(idx, nworkers)[rank]
            grads_per_key: list[list[np.ndarray]] = [[] for _ in KEYS]
            for d, part in enumerate(np.array_split(mine, devices)):
                dev_params = [c[d] for c in copies]
                loss, grads = loss_and_grads(dev_params, x_train[part], y_train[part])
                running += loss
                for k, g in enumerate(grads):
                    grads_per_key[k].append(g)
            if on_store:
                kv.push(KEYS, grads_per_key)   # summed over devices (and workers); optimizer on the store
                kv.pull(KEYS, out=copies)      # every device gets the new weights
            else:
                kv.push(KEYS, grads_per_key)
                kv.pull(KEYS, out=grads_per_key)  # the summed gradient, on every device
                for k in range(len(KEYS)):
                    for d in range(devices):
                        worker_sgd((k, d), grads_per_key[k][d], copies[k][d])
            bar.update(1)
            if s % 5 == 4:
                bar.set_postfix_str(f"running loss {running / ((s + 1) * batch / nworkers):.3f}")
        weights = [c[0] for c in copies]
        train_loss, train_acc = evaluate(weights, x_train, y_train)
        test_loss, test_acc = evaluate(weights, x_test, y_test)
        history.append({"epoch": epoch, "loss": train_loss, "train_accuracy": train_acc,
                        "test_loss": test_loss, "accuracy": test_acc})
        epoch_line(f"epoch {epoch:>2}/{epochs}  loss {train_loss:.4f}  train acc {train_acc:6.2%}  "
                   f"test loss {test_loss:.4f}  test acc {test_acc:6.2%}")
    bar.close()
    elapsed = time.perf_counter() - t0
    # every device holds the same weights
    for c in copies:
        for d in range(1, devices):
            assert np.array_equal(c[0], c[d]), "device copies diverged"
    kv.barrier()
    kv.close()
    final = history[-1]
    result = {"store": kv.type, "rank": rank, "num_workers": nworkers, "devices": devices,
              "compression": cfg.compression.type if cfg.compression else None,
              "optimizer": cfg.optimizer.type if on_store else "worker-sgd", "epochs": epochs,
              "loss": final["loss"], "accuracy": final["accuracy"], "train_accuracy": final["train_accuracy"],
              "seconds": elapsed, "history": history}
    if rank == 0:
        print(f"final: store={kv.type} workers={nworkers} devices={devices} "
              f"compression={result['compression'] or 'none'} loss={final['loss']:.4f} "
              f"accuracy={final['accuracy']:.4f} ({elapsed:.1f} s, "
              f"{epochs * steps * batch / elapsed:,.0f} samples/s)", flush=True)
    return result


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def pick(given: int | None, app: dict, key: str, default: int) -> int:
    """The command line wins, then the config's [app] table, then the default."""
    if given is not None:
        return given
    value = int(app.get(key, default))
    if value < 1:
        raise SystemExit(f"[app] {key} must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Data-parallel MLP on scikit-learn's digits through kvframe.")
    ap.add_argument("--config", help=f"kvframe config file (default: ${ENV_CONFIG}, else {DEFAULT_CONFIG.name})")
    ap.add_argument("--epochs", type=positive_int, help="epochs (default: [app] epochs, else 15)")
    ap.add_argument("--devices", type=positive_int, help="simulated devices per worker ([app] devices, else 2)")
    ap.add_argument("--batch-size", type=positive_int, help="global batch size (default: [app] batch_size, else 64)")
    ap.add_argument("--hidden", type=positive_int, help="hidden units (default: [app] hidden, else 64)")
    ap.add_argument("--workers", type=positive_int, help="dist stores: workers to launch ([app] workers, else 2)")
    ap.add_argument("--servers", type=positive_int, help="dist stores: servers to launch ([app] servers, else 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.1, help="learning rate of the worker-side SGD (no [optimizer])")
    ap.add_argument("--momentum", type=float, default=0.9, help="momentum of the worker-side SGD (no [optimizer])")
    ap.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is no terminal")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--quiet", action="store_true", help="print only the final line")
    ap.add_argument("--json", help="write the final metrics and history here ({rank} is replaced by the rank)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    path = Path(args.config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        cfg = load_config(path)
    except KVFrameError as exc:
        print(exc, file=sys.stderr)
        return 2
    if cfg.store.type.startswith("dist") and not under_launcher():
        workers = pick(args.workers, cfg.app, "workers", 2)
        servers = pick(args.servers, cfg.app, "servers", 1)
        if "--config" not in argv:
            argv = ["--config", str(path), *argv]
        return relaunch(path, workers, servers, argv)
    if (args.workers or args.servers) and not cfg.store.type.startswith("dist"):
        print(f"--workers and --servers apply to dist stores; store {cfg.store.type!r} runs in this one process",
              file=sys.stderr)
        return 2
    result = train(args, cfg)
    if args.json:
        Path(args.json.replace("{rank}", str(result["rank"]))).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
