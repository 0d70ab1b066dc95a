"""Who this process is in a multi-process job, from the variables launchers set: one reader for
every store that runs as several processes (``nccl``, the dist stores) and for ``kvframe-launch``.

**Rank and world size** (the first family that gives a world size wins, and must then give a rank):

1. ``KVFRAME_RANK`` / ``KVFRAME_WORLD_SIZE`` (or ``KVFRAME_NUM_WORKERS``, as kvframe-launch sets it) /
   ``KVFRAME_LOCAL_RANK``
2. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun, torch.distributed.launch, many schedulers)
3. ``OMPI_COMM_WORLD_RANK`` / ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_LOCAL_RANK`` (Open MPI's mpirun)
4. ``DMLC_WORKER_ID`` (or ``KVFRAME_RANK``) / ``DMLC_NUM_WORKER`` (MXNet's DMLC variables)

With ``KVFRAME_RANK_FROM_MPI`` set (kvframe-launch ``--launcher mpi``), kvframe's family gives no
rank: it is the MPI rank (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK`` or ``PMIX_RANK``; :func:`mpi_rank`).

**The job's root** (the dist scheduler, or where rank 0 of an nccl job hands out its unique id):
``KVFRAME_ROOT_URI``/``KVFRAME_ROOT_PORT``, else torchrun's ``MASTER_ADDR``/``MASTER_PORT``, else
MXNet's ``DMLC_PS_ROOT_URI``/``DMLC_PS_ROOT_PORT``.

**The job's secret**: ``KVFRAME_SECRET`` (kvframe-launch makes one per job), for every store.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

# (name, rank variables, world-size variables, local-rank variable); the first variable set wins
FAMILIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str | None], ...] = (
    ("KVFRAME", ("KVFRAME_RANK",), ("KVFRAME_WORLD_SIZE", "KVFRAME_NUM_WORKERS"), "KVFRAME_LOCAL_RANK"),
    ("torchrun", ("RANK",), ("WORLD_SIZE",), "LOCAL_RANK"),
    ("Open MPI", ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("DMLC", ("DMLC_WORKER_ID", "KVFRAME_RANK"), ("DMLC_NUM_WORKER",), None),
)
MPI_RANKS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
ROOTS = (("KVFRAME_ROOT_URI", "KVFRAME_ROOT_PORT"), ("MASTER_ADDR", "MASTER_PORT"),
         ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT"))
OLD_SECRET = "KVFRAME_NCCL_TOKEN"  # the nccl store's own secret before there was one per job


class JobEnvError(ValueError):
    """The launcher's variables are inconsistent or incomplete; the message names them."""


@dataclass(frozen=True)
class WorkerRank:
    rank: int
    world_size: int
    local_rank: int | None
    source: str  # which family of variables (or 'config') gave them


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def env_str(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> str | None:
    """The first of ``names`` that is set and not empty."""
    env = _environ(env)
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def env_int(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> int | None:
    """The first of ``names`` that is set, as an integer (an error names the variable)."""
    env = _environ(env)
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise JobEnvError(f"environment variable {name}={raw!r} must be an integer") from None
    return None


def env_float(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> float | None:
    """The first of ``names`` that is set, as a number (an error names the variable)."""
    env = _environ(env)
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                return float(raw)
            except ValueError:
                raise JobEnvError(f"environment variable {name}={raw!r} must be a number") from None
    return None


def env_flag(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> bool:
    """True when the first of ``names`` that is set is not 0, false or no."""
    value = env_str(names, env)
    return value is not None and value.lower() not in ("0", "false", "no")


def validate(rank: int, world_size: int, local_rank: int | None, source: str) -> WorkerRank:
    if world_size < 1:
        raise JobEnvError(f"world size must be at least 1; {source} gave {world_size}")
    if not 0 <= rank < world_size:
        raise JobEnvError(f"rank must lie in [0, {world_size}); {source} gave rank {rank}")
    if local_rank is not None and local_rank < 0:
        raise JobEnvError(f"local rank must be >= 0; {source} gave {local_rank}")
    return WorkerRank(rank, world_size, local_rank, source)


def mpi_rank(env: Mapping[str, str] | None = None) -> int | None:
    """The MPI rank, when kvframe-launch --launcher mpi says to take it (KVFRAME_RANK_FROM_MPI)."""
    if not env_flag(("KVFRAME_RANK_FROM_MPI",), env):
        return None
    return env_int(MPI_RANKS, env)


def worker_rank(env: Mapping[str, str] | None = None) -> WorkerRank | None:
    """The rank and world size a launcher set, or None when no launcher variables are present."""
    env = _environ(env)
    for source, rank_vars, world_vars, local_var in FAMILIES:
        world = env_int(world_vars, env)
        if world is None:
            continue
        rank = env_int(rank_vars, env)
        if rank is None:
            if source == "KVFRAME" and env_flag(("KVFRAME_RANK_FROM_MPI",), env):
                continue  # the MPI family below gives the rank
            world_var = next(v for v in world_vars if env.get(v, "").strip())
            hint = " (DMLC launchers number workers through the scheduler: set KVFRAME_RANK)" if source == "DMLC" \
                else ""
            raise JobEnvError(f"{world_var}={world} is set but {' / '.join(rank_vars)} is not: set the rank of "
                              f"each process in {rank_vars[0]} or KVFRAME_RANK{hint}")
        local = env_int((local_var,), env) if local_var else None
        if local is None and source != "KVFRAME":
            local = env_int(("KVFRAME_LOCAL_RANK",), env)
        return validate(rank, world, local, source)
    for name in ("KVFRAME_RANK", "RANK"):
        if env_int((name,), env) is not None:
            raise JobEnvError(f"{name} is set but no world size is: set KVFRAME_WORLD_SIZE (or WORLD_SIZE) too")
    return None


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (localhost) into (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise JobEnvError(f"{what} {text!r} is not '[ipv6]:port'")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise JobEnvError(f"{what} {text!r} must be 'host:port'")
    try:
        p = int(port)
    except ValueError:
        raise JobEnvError(f"{what} {text!r}: port {port!r} is not an integer") from None
    if not 0 < p < 65536:
        raise JobEnvError(f"{what} {text!r}: port {p} is outside 1..65535")
    return host or "127.0.0.1", p


def root_address(env: Mapping[str, str] | None = None) -> tuple[str, int, str] | None:
    """The job's root as (host, port, the port variable that gave it), or None when nothing says."""
    env = _environ(env)
    for host_var, port_var in ROOTS:
        host = env_str((host_var,), env)
        port = env_int((port_var,), env)
        if host and port is not None:
            return host, port, port_var
    return None


def job_secret(env: Mapping[str, str] | None = None) -> str | None:
    """The job's secret: ``KVFRAME_SECRET`` (``KVFRAME_NCCL_TOKEN``, its old name for the nccl
    store, is still read, with a DeprecationWarning)."""
    secret = env_str(("KVFRAME_SECRET",), env)
    if secret is None and env_str((OLD_SECRET,), env) is not None:
        warnings.warn(f"{OLD_SECRET} is now KVFRAME_SECRET, the one secret of a job for every store",
                      DeprecationWarning, stacklevel=2)
        secret = env_str((OLD_SECRET,), env)
    return secret


__all__ = ["JobEnvError", "WorkerRank", "worker_rank", "mpi_rank", "validate", "parse_address", "root_address",
           "job_secret", "env_str", "env_int", "env_float", "env_flag", "FAMILIES"]
