"""Who am I in a multi-process job: rank, world size, local rank and the rendezvous address,
read from the variables that launchers set. Pure Python, so it is tested without a GPU.

Precedence (the first family that gives a world size wins, and must then give a rank):

1. ``KVFRAME_RANK`` / ``KVFRAME_WORLD_SIZE`` (or ``KVFRAME_NUM_WORKERS``, as kvframe-launch sets it) /
   ``KVFRAME_LOCAL_RANK``
2. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun, torch.distributed.launch, many schedulers)
3. ``OMPI_COMM_WORLD_RANK`` / ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_LOCAL_RANK`` (Open MPI's mpirun)
4. ``DMLC_WORKER_ID`` (or ``KVFRAME_RANK``) / ``DMLC_NUM_WORKER`` (MXNet's DMLC variables)

``KVFRAME_ROLE`` / ``DMLC_ROLE``, when set, must be ``worker``.

The rendezvous address for the NCCL unique id: ``KVFRAME_NCCL_ADDR=host:port`` exactly; else
``MASTER_ADDR`` (or kvframe-launch's ``KVFRAME_ROOT_URI``, or ``DMLC_PS_ROOT_URI``) with ``MASTER_PORT``
(or ``KVFRAME_ROOT_PORT``, ``DMLC_PS_ROOT_PORT``) plus
``KVFRAME_NCCL_PORT_OFFSET`` (default 1: torchrun's agent and a DMLC scheduler already listen on
that port themselves; so does kvframe-launch's scheduler).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT_OFFSET = 1

# (name, rank variables, world-size variables, local-rank variable); the first variable set wins
FAMILIES = (
    ("KVFRAME", ("KVFRAME_RANK",), ("KVFRAME_WORLD_SIZE", "KVFRAME_NUM_WORKERS"), "KVFRAME_LOCAL_RANK"),
    ("torchrun", ("RANK",), ("WORLD_SIZE",), "LOCAL_RANK"),
    ("Open MPI", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("DMLC", ("DMLC_WORKER_ID", "KVFRAME_RANK"), ("DMLC_NUM_WORKER",), None),
)


class LaunchEnvError(ValueError):
    """The launcher's variables are inconsistent or incomplete; the message names them."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int | None
    source: str  # which family of variables (or 'config') gave them


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={raw!r} must be an integer") from None


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str | None, int | None]:
    for name in names:
        value = _int(env, name)
        if value is not None:
            return name, value
    return None, None


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The rank and world size a launcher set, or None when no launcher variables are present."""
    env = os.environ if env is None else env
    for role_var in ("KVFRAME_ROLE", "DMLC_ROLE"):
        role = env.get(role_var, "").strip()
        if role and role != "worker":
            raise LaunchEnvError(f"{role_var}={role!r}: store 'nccl' runs in worker processes only (it has no "
                                 "servers or scheduler)")
    for source, rank_vars, world_vars, local_var in FAMILIES:
        world_var, world = _first(env, world_vars)
        if world is None:
            continue
        _, rank = _first(env, rank_vars)
        if rank is None:
            if source == "KVFRAME" and env.get("KVFRAME_RANK_FROM_MPI"):
                continue  # kvframe-launch --launcher mpi: the MPI variables give the rank
            hint = ""
            if source == "DMLC":
                hint = " (DMLC launchers number workers through the scheduler: set KVFRAME_RANK)"
            raise LaunchEnvError(f"{world_var}={world} is set but {' / '.join(rank_vars)} is not: set the rank of "
                                 f"each process in {rank_vars[0]} or KVFRAME_RANK{hint}")
        local = _int(env, local_var) if local_var else None
        if local is None and source != "KVFRAME":
            local = _int(env, "KVFRAME_LOCAL_RANK")
        return validate(rank, world, local, source)
    if _int(env, "KVFRAME_RANK") is not None or _int(env, "RANK") is not None:
        which = "KVFRAME_RANK" if _int(env, "KVFRAME_RANK") is not None else "RANK"
        raise LaunchEnvError(f"{which} is set but no world size is: set KVFRAME_WORLD_SIZE (or WORLD_SIZE) too")
    return None


def validate(rank: int, world_size: int, local_rank: int | None, source: str) -> LaunchInfo:
    if world_size < 1:
        raise LaunchEnvError(f"world size must be at least 1; {source} gave {world_size}")
    if not 0 <= rank < world_size:
        raise LaunchEnvError(f"rank must lie in [0, {world_size}); {source} gave rank {rank}")
    if local_rank is not None and local_rank < 0:
        raise LaunchEnvError(f"local rank must be >= 0; {source} gave {local_rank}")
    return LaunchInfo(rank, world_size, local_rank, source)


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all interfaces / localhost) into (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise LaunchEnvError(f"{what} {text!r} is not '[ipv6]:port'")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise LaunchEnvError(f"{what} {text!r} must be 'host:port'")
    try:
        p = int(port)
    except ValueError:
        raise LaunchEnvError(f"{what} {text!r}: port {port!r} is not an integer") from None
    if not 0 < p < 65536:
        raise LaunchEnvError(f"{what} {text!r}: port {p} is outside 1..65535")
    return host or "127.0.0.1", p


def rendezvous_address(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """Where rank 0 serves the NCCL unique id, or None when nothing says so."""
    env = os.environ if env is None else env
    explicit = env.get("KVFRAME_NCCL_ADDR", "").strip()
    if explicit:
        return parse_address(explicit, "KVFRAME_NCCL_ADDR")
    for host_var, port_var in (("MASTER_ADDR", "MASTER_PORT"), ("KVFRAME_ROOT_URI", "KVFRAME_ROOT_PORT"),
                               ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT")):
        host = env.get(host_var, "").strip()
        port = _int(env, port_var)
        if host and port is not None:
            offset = _int(env, "KVFRAME_NCCL_PORT_OFFSET")
            offset = DEFAULT_PORT_OFFSET if offset is None else offset
            p = port + offset
            if not 0 < p < 65536:
                raise LaunchEnvError(f"{port_var}={port} plus KVFRAME_NCCL_PORT_OFFSET={offset} gives port {p}, "
                                     "outside 1..65535")
            return host, p
    return None


__all__ = ["LaunchInfo", "LaunchEnvError", "detect_launch", "parse_address", "rendezvous_address", "validate"]
