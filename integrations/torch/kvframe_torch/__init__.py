"""kvframe-torch: PyTorch data-parallel training on kvframe, in Horovod's shape.

    import kvframe_torch
    store = kvframe_torch.create_store()                       # from the launcher (kvframe-launch, torchrun)
    optimizer = kvframe_torch.DistributedOptimizer(optimizer, store, model.named_parameters())
    kvframe_torch.broadcast_parameters(model.state_dict(), store)
    kvframe_torch.broadcast_optimizer_state(optimizer, store)
    avg_loss = kvframe_torch.allreduce(loss.detach(), store, "loss")

See the README of integrations/torch.
"""

from kvframe_torch.collectives import (
    allreduce,
    allreduce_,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from kvframe_torch.compression import Compression
from kvframe_torch.launch import create_store, launcher
from kvframe_torch.optimizer import DistributedOptimizer, is_distributed

__version__ = "0.1.0"
__all__ = ["DistributedOptimizer", "is_distributed", "broadcast_parameters", "broadcast_optimizer_state",
           "broadcast_object", "allreduce", "allreduce_", "Compression", "create_store", "launcher"]
