"""kvframe plugin: store 'nccl' (cupy + NVIDIA NCCL; one process many GPUs, or one GPU per process).

Importing this module needs neither cupy nor a GPU: ``kvframe.create('nccl')`` checks for them and
says what is missing and how to install it.
"""

from kvframe import hookimpl
from kvframe_nccl.config import NcclConfig
from kvframe_nccl.cuda import NcclUnavailableError


def _create(config: NcclConfig):
    from kvframe_nccl.store import NcclStore

    return NcclStore(config)


@hookimpl
def kvframe_register_stores(register):
    register("nccl", _create, NcclConfig)


__all__ = ["NcclConfig", "NcclUnavailableError"]
