"""A node's settings from the environment: MXNet's ``DMLC_*`` names and kvframe's own ``KVFRAME_*``,
read with :mod:`kvframe.jobenv` (the one reader of job variables, shared with the nccl store).

``KVFRAME_*`` wins where both are set.  Required for a distributed job: the role, the scheduler's
address (``DMLC_PS_ROOT_URI`` / ``DMLC_PS_ROOT_PORT``) and the numbers of servers and workers.

| kvframe | MXNet / ps-lite | meaning |
|---|---|---|
| KVFRAME_ROLE | DMLC_ROLE | worker, server or scheduler |
| KVFRAME_ROOT_URI | DMLC_PS_ROOT_URI | the scheduler's host |
| KVFRAME_ROOT_PORT | DMLC_PS_ROOT_PORT | the scheduler's port |
| KVFRAME_NUM_SERVERS | DMLC_NUM_SERVER | number of servers |
| KVFRAME_NUM_WORKERS | DMLC_NUM_WORKER | number of workers |
| KVFRAME_RANK | | the rank this node asks for (the launcher sets it; else arrival order) |
| KVFRAME_INTERFACE | DMLC_INTERFACE | the network interface whose address a server announces |
| KVFRAME_NODE_HOST | DMLC_NODE_HOST | the address a server binds and announces (wins over the interface) |
| KVFRAME_TRANSPORT | | the job's transport plugin (default shm; else ``[store] transport`` of KVFRAME_CONFIG) |
| KVFRAME_PORT | PORT | a server's port (default: any free one) |
| KVFRAME_SECRET | | the job's secret: every connection is an authenticated session (kvframe-launch makes one) |
| KVFRAME_INSECURE | | 1: run without a secret on a non-loopback address (refused otherwise) |
| KVFRAME_MAC_DATA | | 1: the MAC covers the data bytes too (default: sequence, header and frame lengths) |
| KVFRAME_HEARTBEAT_INTERVAL | | seconds between heartbeats (default 1) |
| KVFRAME_HEARTBEAT_TIMEOUT | | seconds of silence before a node counts as stopped (default 15) |
| KVFRAME_CONNECT_TIMEOUT | | seconds to wait for every node to register (default 300) |
| KVFRAME_BIGARRAY_BOUND | MXNET_KVSTORE_BIGARRAY_BOUND | arrays this large are split over all servers |
| KVFRAME_LOG_LEVEL | | DEBUG, INFO (the default of servers and the scheduler), WARNING or ERROR (kvframe.log) |
| KVFRAME_TIMELINE | | FILE: every worker and server writes its Chrome-trace timeline (kvframe.timeline) |
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import overload

from kvframe.jobenv import env_flag, env_float, env_int, env_str, job_secret, mpi_rank
from kvframe.log import LogLevelError, configure
from kvframe_dist.address import is_loopback

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_TRANSPORT = "shm"  # tcp plus shared memory where a peer proves it shares the host


@overload
def _get(names: tuple[str, ...], default: str) -> str: ...
@overload
def _get(names: tuple[str, ...], default: None = None) -> str | None: ...
def _get(names: tuple[str, ...], default: str | None = None) -> str | None:
    value = env_str(names)
    return default if value is None else value


@overload
def _int(names: tuple[str, ...], default: int) -> int: ...
@overload
def _int(names: tuple[str, ...], default: None) -> int | None: ...
def _int(names: tuple[str, ...], default: int | None) -> int | None:
    value = env_int(names)
    return default if value is None else value


def _float(names: tuple[str, ...], default: float) -> float:
    value = env_float(names)
    return default if value is None else value


@dataclass
class NodeEnv:
    role: str
    root_uri: str
    root_port: int
    num_servers: int
    num_workers: int
    rank: int | None
    node_host: str | None  # None: found from the interface or the route to the scheduler
    interface: str | None
    transport: str
    port: int
    secret: bytes | None
    mac_data: bool
    heartbeat_interval: float
    heartbeat_timeout: float
    connect_timeout: float
    bigarray_bound: int

    @property
    def scheduler_addr(self) -> str:
        host = f"[{self.root_uri}]" if ":" in self.root_uri else self.root_uri
        return f"tcp://{host}:{self.root_port}"

    @property
    def loopback(self) -> bool:
        return self.root_uri in LOOPBACK


def job_transport() -> str:
    """The job's transport: KVFRAME_TRANSPORT, else ``[store] transport`` of the KVFRAME_CONFIG file,
    else the default. Every node of a job must use the same one."""
    name = _get(("KVFRAME_TRANSPORT",))
    if name is None and _get(("KVFRAME_CONFIG",)):
        from kvframe.configfile import read_file

        store = read_file(str(_get(("KVFRAME_CONFIG",)))).get("store")
        name = store.get("transport") if isinstance(store, dict) else None
    return str(name or DEFAULT_TRANSPORT)


def role_from_env() -> str:
    return (_get(("KVFRAME_ROLE", "DMLC_ROLE"), "worker") or "worker").lower()


def node_env(role: str | None = None) -> NodeEnv:
    role = (role or role_from_env()).lower()
    if role not in ("worker", "server", "scheduler"):
        raise ValueError(f"DMLC_ROLE / KVFRAME_ROLE must be worker, server or scheduler; got {role!r}")
    port = _int(("KVFRAME_ROOT_PORT", "DMLC_PS_ROOT_PORT"), None)
    ns = _int(("KVFRAME_NUM_SERVERS", "DMLC_NUM_SERVER"), None)
    nw = _int(("KVFRAME_NUM_WORKERS", "DMLC_NUM_WORKER"), None)
    if port is None or ns is None or nw is None:
        missing = [n for n, v in (("DMLC_PS_ROOT_PORT (or KVFRAME_ROOT_PORT)", port),
                                  ("DMLC_NUM_SERVER (or KVFRAME_NUM_SERVERS)", ns),
                                  ("DMLC_NUM_WORKER (or KVFRAME_NUM_WORKERS)", nw)) if v is None]
        raise ValueError(f"a distributed {role} needs these environment variables: {', '.join(missing)}; start the job "
                         "with kvframe-launch, or set them as for MXNet's launch.py")
    if ns < 1 or nw < 1:
        raise ValueError(f"need at least one server and one worker; got DMLC_NUM_SERVER={ns}, DMLC_NUM_WORKER={nw}")
    root = _get(("KVFRAME_ROOT_URI", "DMLC_PS_ROOT_URI"), "127.0.0.1")
    secret = job_secret()
    if secret is None and not env_flag(("KVFRAME_INSECURE",)) and not is_loopback(root):
        raise ValueError(f"a {role} of a job on {root} (not loopback) needs the job's secret: set KVFRAME_SECRET to "
                         "the same random string on every node (kvframe-launch makes one per job), or "
                         "KVFRAME_INSECURE=1 to run unauthenticated, open to anyone who can reach the job")
    return NodeEnv(
        role=role, root_uri=root, root_port=port, num_servers=ns, num_workers=nw,
        rank=_int(("KVFRAME_RANK",), None) if not env_flag(("KVFRAME_RANK_FROM_MPI",)) else mpi_rank(),
        node_host=_get(("KVFRAME_NODE_HOST", "DMLC_NODE_HOST")),
        interface=_get(("KVFRAME_INTERFACE", "DMLC_INTERFACE")),
        transport=job_transport(),
        port=_int(("KVFRAME_PORT", "PORT"), 0),
        secret=secret.encode() if secret else None,
        mac_data=env_flag(("KVFRAME_MAC_DATA",)),
        heartbeat_interval=_float(("KVFRAME_HEARTBEAT_INTERVAL",), 1.0),
        heartbeat_timeout=_float(("KVFRAME_HEARTBEAT_TIMEOUT",), 15.0),
        connect_timeout=_float(("KVFRAME_CONNECT_TIMEOUT",), 300.0),
        bigarray_bound=_int(("KVFRAME_BIGARRAY_BOUND", "MXNET_KVSTORE_BIGARRAY_BOUND"), 1_000_000),
    )


def run_role(role: str, start: Callable[[NodeEnv], int]) -> int:
    """The entry point of a scheduler or server process: logging (``KVFRAME_LOG_LEVEL``, default
    INFO), the role's variables, then ``start``. Missing or malformed variables exit with code 2
    and a message naming them."""
    try:
        configure(role, default=logging.INFO)
    except LogLevelError as exc:
        print(f"kvframe {role}: {exc}", file=sys.stderr)
        return 2
    try:
        env = node_env(role)
    except ValueError as exc:
        logging.getLogger(f"kvframe_dist.{role}").error("%s", exc)
        return 2
    return start(env)
