"""dist_sync on loopback, side by side with Apache MXNet 1.9.1's ps-lite store.

2 workers, 1 and 2 servers; each round every worker pushes and pulls (i) one key of 2^22 float32,
(ii) 100 keys of 1024 float32.  Two server-side updates, the same on both sides: none (servers
assign the sum) and the 'test' optimizer (weight += summed gradient: MXNet's
``mx.optimizer.Test``, the anchor's default; kvframe_optimizers' 'test').  MXNet runs
through ../shared/anchors/mx_dist_launch.sh (its venv's bin first on PATH); kvframe through
kvframe-launch with the same worker loop, once with its defaults (large shards through a private
/dev/shm directory, everything else over zmq/TCP) and once with ``--no-shm`` (everything over
zmq/TCP, as ps-lite).  Each figure is the best of ``--tries`` jobs (the machine is shared).

Usage: python benchmarks/bench_dist.py [--quick] [--no-mxnet] [--tries N]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import ANCHORS, mxnet_python, table  # noqa: E402

WORKER = """
import os, time
import numpy as np
import kvframe
kv = kvframe.create(os.environ.get("KVTYPE", "dist_sync"))
size = int(os.environ.get("SIZE", 1 << 22)); nkeys = int(os.environ.get("NKEYS", 1))
reps = int(os.environ.get("REPS", 10))
if os.environ.get("OPT") == "test":
    kv.set_optimizer("test", rescale_grad=1.0)
keys = list(range(nkeys))
kv.init(keys, [np.zeros(size, np.float32)] * nkeys)
vals = [np.ones(size, np.float32) for _ in keys]; outs = [np.zeros(size, np.float32) for _ in keys]
kv.push(keys, vals); kv.pull(keys, out=outs)
kv.barrier()
t = time.perf_counter()
for _ in range(reps):
    kv.push(keys, vals); kv.pull(keys, out=outs)
dt = (time.perf_counter() - t) / reps
if kv.rank == 0:
    print(f"kvframe: {dt*1e3:.3f} ms/round", flush=True)
kv.close()
"""

RE_MS = re.compile(r"([\d.]+) ms/round")


def _ms(text: str) -> float | None:
    m = RE_MS.search(text)
    return float(m.group(1)) if m else None


def run_mxnet(servers: int, size: int, nkeys: int, reps: int, opt: str) -> float | None:
    py = mxnet_python()
    script = ANCHORS / "mx_dist_launch.sh"
    if py is None or not script.exists():
        return None
    env = {**os.environ, "PATH": f"{py.parent}{os.pathsep}{os.environ.get('PATH', '')}", "SIZE": str(size),
           "NKEYS": str(nkeys), "REPS": str(reps), "OPT": opt, "KVTYPE": "dist_sync"}
    env.pop("PYTHONPATH", None)
    try:
        res = subprocess.run(["bash", str(script), "2", str(servers)], capture_output=True, text=True, env=env,
                             timeout=300, start_new_session=True)
    except subprocess.TimeoutExpired:
        print("  (MXNet run timed out)", file=sys.stderr)
        return None
    return _ms(res.stdout)


def run_kvframe(servers: int, size: int, nkeys: int, reps: int, opt: str, shm: bool, script: Path) -> float | None:
    launch = [sys.executable, "-m", "kvframe_dist.launch", "-n", "2", "-s", str(servers)]
    if not shm:
        launch.append("--no-shm")
    env = {**os.environ, "SIZE": str(size), "NKEYS": str(nkeys), "REPS": str(reps), "OPT": opt}
    env.pop("KVFRAME_SHM_DIR", None)
    try:
        res = subprocess.run([*launch, "--", sys.executable, str(script)], capture_output=True, text=True, env=env,
                             timeout=300)
    except subprocess.TimeoutExpired:
        print("  (kvframe run timed out)", file=sys.stderr)
        return None
    if res.returncode != 0:
        print(f"  kvframe run failed ({res.returncode}):\n{res.stdout[-2000:]}", file=sys.stderr)
    return _ms(res.stdout)


def best(fn, tries: int, *args) -> float | None:
    got = [x for x in (fn(*args) for _ in range(tries)) if x is not None]
    return min(got) if got else None


def _fmt(ms: float | None) -> str:
    return f"{ms:.2f}" if ms else "-"


def main(argv: list[str]) -> str:
    quick = "--quick" in argv
    no_mx = "--no-mxnet" in argv
    tries = int(argv[argv.index("--tries") + 1]) if "--tries" in argv else (1 if quick else 2)
    workloads = [("1 key x 2^22 floats", 1 << 22, 1, 10 if quick else 30, 3),
                 ("100 keys x 1024 floats", 1024, 100, 50 if quick else 200, 5)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "kv_dist_worker.py"
        script.write_text(WORKER)
        for name, size, nkeys, reps, target in workloads:
            payload = 2 * 4 * size * nkeys
            for opt in ("none", "test"):
                for servers in (1, 2):
                    mx = None if no_mx else best(run_mxnet, tries, servers, size, nkeys, max(10, reps // 4), opt)
                    kv = best(run_kvframe, tries, servers, size, nkeys, reps, opt, True, script)
                    kv_tcp = best(run_kvframe, tries, servers, size, nkeys, reps, opt, False, script)
                    gbs = [f"{payload / (ms / 1e3) / 1e9:.2f}" if ms else "-" for ms in (mx, kv, kv_tcp)]
                    ratios = [f"{mx / ms:.1f}x" if mx and ms else "-" for ms in (kv, kv_tcp)]
                    rows.append([name, servers, opt, _fmt(mx), _fmt(kv), _fmt(kv_tcp), *gbs, *ratios,
                                 f">={target}x"])
                    print(f"  {name}, {servers} server(s), optimizer {opt}: MXNet {mx} ms, kvframe {kv} ms "
                          f"(tcp only {kv_tcp} ms)", file=sys.stderr)
    text = ("dist_sync, 2 workers on loopback, push+pull per round (GB/s: push+pull payload per worker)\n\n" +
            table(["workload", "servers", "optimizer", "MXNet ms/round", "kvframe ms/round",
                   "kvframe tcp-only ms/round", "MXNet GB/s", "kvframe GB/s", "kvframe tcp GB/s", "ratio",
                   "ratio tcp-only", "target"], rows))
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
