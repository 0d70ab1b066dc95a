"""Data-parallel PyTorch training through kvframe: a small CNN on scikit-learn's digits.

A plain single-process torch training script, turned into a kvframe one by the lines marked
``# kvframe``: create the store (from the launcher and the config file), wrap the optimizer,
broadcast the initial parameters, and take this worker's share of every batch. Everything else is
ordinary torch (``zero_grad``, ``backward``, ``step``, gradient clipping, a learning-rate scheduler).

    python examples/train_torch.py                                         # store 'local', 1 process
    python examples/train_torch.py --config examples/configs/torch_dist_sync.toml  # 2 workers + 1 server
    python examples/train_torch.py --config examples/configs/torch_2bit.toml       # ... with 2bit compression
    python examples/train_torch.py --config examples/configs/torch_dist_store.toml # SGD on the server

A dist config started directly re-launches itself with ``kvframe-launch -n 2 -s 1 --config FILE``
on loopback (``[app] workers/servers`` or --workers/--servers choose the sizes). Without an
``[optimizer]`` section the store sums the gradients (averaged over the workers) and torch's SGD
runs on every worker; with one, the store's optimizer updates the weights (``update_on_store``).
Each global batch is split over the workers, so every run follows the single-process trajectory
(up to float rounding) unless gradients are compressed.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_digits import load_data, progress, under_launcher  # noqa: E402  (the numpy demo's helpers)

import kvframe  # noqa: E402
from kvframe.configfile import ENV_CONFIG, load_config  # noqa: E402
from kvframe.errors import KVFrameError  # noqa: E402

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - the tests skip without torch
    sys.exit("this example needs PyTorch: pip install torch (the CPU build is enough)")

import kvframe_torch  # noqa: E402

DEFAULT_CONFIG = HERE / "configs" / "torch_local.toml"


def make_cnn() -> nn.Module:
    """Two 3x3 convolutions, a 2x2 max-pool and two dense layers for 8x8 images (151k parameters)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def relaunch(config_path: Path, workers: int, servers: int, argv: list[str]) -> int:
    launcher = shutil.which("kvframe-launch", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")]))
    if launcher is None:
        sys.exit("a dist store needs the kvframe-launch command: pip install 'kvframe[dist]' (or kvframe-launch)")
    cmd = [launcher, "-n", str(workers), "-s", str(servers), "--config", str(config_path), "--",
           sys.executable, str(Path(__file__).resolve()), *argv]
    print(f"launching {workers} workers and {servers} server(s) on loopback: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def train(args: argparse.Namespace, cfg) -> dict:
    app = cfg.app
    epochs = args.epochs or int(app.get("epochs", 10))
    batch = args.batch_size or int(app.get("batch_size", 64))
    lr = args.lr if args.lr is not None else float(app.get("lr", 0.05))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test = load_data(args.seed)
    x_train, x_test = (torch.from_numpy(a).reshape(-1, 1, 8, 8) for a in (x_train, x_test))
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)

    model = make_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    on_store = cfg.optimizer is not None

    store = kvframe.create_from_config(cfg)                                         # kvframe
    optimizer = kvframe_torch.DistributedOptimizer(optimizer, store, model.named_parameters(),  # kvframe
                                                   update_on_store=on_store)
    kvframe_torch.broadcast_parameters(model.state_dict(), store)                   # kvframe
    rank, nworkers = store.rank, store.num_workers
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 2), gamma=0.5)

    quiet = args.quiet or rank != 0
    say = (lambda *a, **k: None) if quiet else print
    comp = cfg.compression
    say(f"kvframe store {store.type!r}: {nworkers} worker(s); compression: "
        f"{json.dumps({'type': comp.type, **comp.model_dump(exclude_defaults=True)}) if comp else 'none'}; optimizer: "
        f"{cfg.optimizer.type + ' on the store' if on_store else 'torch SGD on the workers'}; "
        f"{len(x_train)} training / {len(x_test)} test images, global batch {batch}", flush=True)

    steps = len(x_train) // batch
    show_bar = not quiet and not args.no_progress and (args.progress or sys.stderr.isatty())
    bar = progress(epochs * steps, f"epoch 1/{epochs}", disable=not show_bar)
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.from_numpy(np.random.default_rng([args.seed, epoch]).permutation(len(x_train)))
        bar.set_description(f"epoch {epoch}/{epochs}")
        model.train()
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            idx = idx.tensor_split(store.num_workers)[store.rank]                   # kvframe: my share
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            if args.clip and not on_store:
                optimizer.synchronize()  # the averaged gradients, then clip them, then step
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                with optimizer.skip_synchronize():
                    optimizer.step()
            else:
                optimizer.step()
            bar.update(1)
            if s % 5 == 4:
                avg = kvframe_torch.allreduce(loss.detach(), store, "loss")  # a metric, whatever the store runs
                bar.set_postfix_str(f"loss {float(avg):.3f}")
        scheduler.step()
        model.eval()
        train_loss, train_acc = evaluate(model, x_train, y_train)
        test_loss, test_acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch, "loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
                        "accuracy": test_acc})
        line = (f"epoch {epoch:>2}/{epochs}  loss {train_loss:.4f}  train acc {train_acc:6.2%}  "
                f"test loss {test_loss:.4f}  test acc {test_acc:6.2%}")
        if show_bar:
            bar.write(line)
        else:
            say(line, flush=True)
    bar.close()
    elapsed = time.perf_counter() - t0
    store.barrier()
    store.close()
    final = history[-1]
    result = {"store": store.type, "rank": rank, "num_workers": nworkers, "epochs": epochs,
              "compression": {"type": comp.type, **comp.model_dump(exclude_defaults=True)} if comp else None,
              "optimizer": cfg.optimizer.type if on_store else "torch-sgd", "loss": final["loss"],
              "accuracy": final["accuracy"], "train_accuracy": final["train_accuracy"], "seconds": elapsed,
              "history": history, "params": [p.detach().reshape(-1)[:8].tolist() for p in model.parameters()]}
    if rank == 0:
        print(f"final: store={store.type} workers={nworkers} compression={comp.type if comp else 'none'} "
              f"loss={final['loss']:.4f} accuracy={final['accuracy']:.4f} ({elapsed:.1f} s, "
              f"{epochs * steps * batch / elapsed:,.0f} samples/s)", flush=True)
    return result


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Data-parallel PyTorch CNN on scikit-learn's digits through kvframe.")
    ap.add_argument("--config", help=f"kvframe config file (default: ${ENV_CONFIG}, else {DEFAULT_CONFIG.name})")
    ap.add_argument("--epochs", type=positive_int, help="epochs (default: [app] epochs, else 10)")
    ap.add_argument("--batch-size", type=positive_int, help="global batch size ([app] batch_size, else 64)")
    ap.add_argument("--lr", type=float, help="learning rate of torch's SGD ([app] lr, else 0.05)")
    ap.add_argument("--clip", type=float, default=0.0, help="clip the gradients' norm (torch SGD on the workers)")
    ap.add_argument("--workers", type=positive_int, help="dist stores: workers to launch ([app] workers, else 2)")
    ap.add_argument("--servers", type=positive_int, help="dist stores: servers to launch ([app] servers, else 1)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--seed", type=int, default=0)
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
        workers = args.workers or int(cfg.app.get("workers", 2))
        servers = args.servers or int(cfg.app.get("servers", 1))
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
