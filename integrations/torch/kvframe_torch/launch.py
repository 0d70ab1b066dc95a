"""The store a training script should use, from the launcher that started it.

=======================================  =========================================================
started by                               store
=======================================  =========================================================
``KVFRAME_CONFIG`` set                   ``kvframe.create_from_config()`` (store, compression and
                                         optimizer from the file; ``kvframe-launch --config``)
``kvframe-launch`` (or MXNet's ``DMLC``  ``dist_sync``: servers sum (and may run the optimizer)
variables)
``kvframe-launch -s 0`` (no servers)     ``nccl``, as under torchrun
``torchrun`` (``RANK``, ``WORLD_SIZE``,  ``nccl``, one GPU per process (``LOCAL_RANK``'s, made the
``LOCAL_RANK``, ``MASTER_ADDR``)         current device); NCCL's rendezvous at the job's root
                                         port + 1
anything else                            ``local`` (one process)
=======================================  =========================================================
"""

from __future__ import annotations

import os
import sys
from typing import Any

import kvframe

_DIST_VARS = ("KVFRAME_ROOT_PORT", "DMLC_PS_ROOT_PORT")


def launcher(env: Any = None) -> str:
    """'config', 'kvframe-launch', 'kvframe-launch-workers' (``-s 0``: no servers), 'torchrun' or
    'none': what started this process."""
    env = os.environ if env is None else env
    if env.get("KVFRAME_CONFIG"):
        return "config"
    if env.get("KVFRAME_NUM_SERVERS", "").strip() == "0":
        return "kvframe-launch-workers"
    if any(env.get(v) for v in _DIST_VARS) or env.get("DMLC_ROLE"):
        return "kvframe-launch"
    if env.get("WORLD_SIZE") and env.get("RANK"):
        return "torchrun"
    return "none"


def create_store(name: str | None = None, **options: Any) -> kvframe.KVStore:
    """``kvframe.create(name, **options)``, or without a name the store the launcher implies (see
    the module's table). Under torchrun this also makes ``LOCAL_RANK``'s GPU the current device."""
    if name is not None:
        return kvframe.create(name, **options)
    how = launcher()
    if how == "config":
        if options:
            raise TypeError("KVFRAME_CONFIG names the store's config file; give options there, not here")
        return kvframe.create_from_config()
    if how == "kvframe-launch":
        return kvframe.create("dist_sync", **options)
    workers_only = how == "kvframe-launch-workers" and int(os.environ.get("KVFRAME_WORLD_SIZE", "1")) > 1
    if workers_only or (how == "torchrun" and int(os.environ["WORLD_SIZE"]) > 1):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "without servers (torchrun, or kvframe-launch -s 0) kvframe-torch all-reduces with store 'nccl', which "
                "needs CUDA GPUs (and cupy); for CPU training start the job with servers (store dist_sync): "
                f"kvframe-launch -n {os.environ.get('WORLD_SIZE') or os.environ.get('KVFRAME_WORLD_SIZE')} -s 1 -- "
                f"python {os.path.basename(sys.argv[0] or 'train.py')}")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return kvframe.create("nccl", **options)
    return kvframe.create("local", **options)


__all__ = ["create_store", "launcher"]
