"""Where this process stands in an nccl job: its rank and world size (read by kvframe.jobenv, as
for every multi-process store) and the rendezvous address for the NCCL unique id.

``KVFRAME_ROLE`` / ``DMLC_ROLE``, when set, must be ``worker``: the store has no servers.

The rendezvous address: ``KVFRAME_NCCL_ADDR=host:port`` exactly; else the job's root
(kvframe.jobenv: ``KVFRAME_ROOT_URI``/``KVFRAME_ROOT_PORT``, torchrun's ``MASTER_ADDR``/``MASTER_PORT``,
or ``DMLC_PS_ROOT_URI``/``DMLC_PS_ROOT_PORT``) plus ``KVFRAME_NCCL_PORT_OFFSET`` (default 1:
torchrun's agent, a DMLC scheduler and kvframe-launch already listen on the root port itself).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from kvframe.jobenv import JobEnvError, env_int, parse_address, root_address, validate, worker_rank
from kvframe.jobenv import WorkerRank as LaunchInfo

DEFAULT_PORT_OFFSET = 1
LaunchEnvError = JobEnvError  # the name this module gave it first


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """The rank and world size a launcher set, or None when no launcher variables are present."""
    env = os.environ if env is None else env
    for role_var in ("KVFRAME_ROLE", "DMLC_ROLE"):
        role = env.get(role_var, "").strip()
        if role and role != "worker":
            raise LaunchEnvError(f"{role_var}={role!r}: store 'nccl' runs in worker processes only (it has no "
                                 "servers or scheduler)")
    return worker_rank(env)


def rendezvous_address(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """Where rank 0 serves the NCCL unique id, or None when nothing says so."""
    env = os.environ if env is None else env
    explicit = env.get("KVFRAME_NCCL_ADDR", "").strip()
    if explicit:
        return parse_address(explicit, "KVFRAME_NCCL_ADDR")
    root = root_address(env)
    if root is None:
        return None
    host, port, port_var = root
    offset = env_int(("KVFRAME_NCCL_PORT_OFFSET",), env)
    offset = DEFAULT_PORT_OFFSET if offset is None else offset
    p = port + offset
    if not 0 < p < 65536:
        raise LaunchEnvError(f"{port_var}={port} plus KVFRAME_NCCL_PORT_OFFSET={offset} gives port {p}, "
                             "outside 1..65535")
    return host, p


__all__ = ["LaunchInfo", "LaunchEnvError", "detect_launch", "parse_address", "rendezvous_address", "validate"]
