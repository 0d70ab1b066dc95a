"""Models, data and single-process reference training shared by the torch tests and their dist job.

The reference is plain torch on one process: the combined batch of every step (what all workers
see together), mean cross-entropy, torch.optim.SGD. A kvframe run with W workers gives worker r
the r-th of W equal parts of each batch; averaged gradients then equal the reference's.
"""

from __future__ import annotations

import torch
from torch import nn

STEPS = 5
BATCH = 32  # global
LR = 0.1
MOMENTUM = 0.9


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def data(steps: int = STEPS, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(steps, batch, 8, generator=g), torch.randint(0, 3, (steps, batch), generator=g)


def share(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    return t.tensor_split(n)[rank]


def flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def reference(steps: int = STEPS, lr: float = LR, momentum: float = MOMENTUM, clip: float | None = None,
              seed: int = 0, start: int = 0) -> dict:
    """Single-process training on the combined batches: the loss before each step and the
    parameters after each step."""
    x, y = data()
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses, params = [], []
    for s in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, x[s], y[s])
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
        params.append(flat(model))
    return {"losses": losses, "params": params}
