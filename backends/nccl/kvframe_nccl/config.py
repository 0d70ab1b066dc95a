"""Options of store 'nccl' (``kvframe.create('nccl', **options)``), validated without a GPU."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kvframe.config import StoreConfig
from kvframe_nccl.launch_env import LaunchEnvError, parse_address


class NcclConfig(StoreConfig):
    type: Literal["nccl"] = "nccl"
    devices: int | list[int] | None = Field(
        None, description="GPUs this process drives: a list of device ids, or a count (the first N). Default: "
                          "every visible GPU in single-process mode; the local rank's GPU in multi-process mode "
                          "(where exactly one may be given)")
    mode: Literal["auto", "single", "multi"] = Field(
        "auto", description="'single': one process drives all its GPUs (MXNet's nccl). 'multi': one GPU per "
                            "process, ranks from the launcher's variables. 'auto': 'multi' when a launcher set a "
                            "world size (KVFRAME_WORLD_SIZE, WORLD_SIZE, OMPI_COMM_WORLD_SIZE, DMLC_NUM_WORKER)")
    algorithm: Literal["auto", "reduce_broadcast"] = Field(
        "auto", description="'auto': pushpull without an updater is one all-reduce; push is a reduce to the first "
                            "GPU, pull a broadcast from it. 'reduce_broadcast': always reduce then broadcast, as "
                            "MXNet does (single-process mode only; multi-process mode always all-reduces)")
    bucket_bytes: int = Field(4 << 20, ge=0, description="largest bucket small keys are packed into (0: no packing)")
    pack_threshold_bytes: int = Field(256 << 10, ge=0, description="keys of at most this many bytes are packed")
    pushpull_stores: bool = Field(
        True, description="pushpull also keeps the sum in the store, so a later pull sees it (MXNet's contract). "
                          "False skips that device-to-device copy when the store only all-reduces gradients; a "
                          "pull of such a key then raises instead of returning a stale value")
    rank: int | None = Field(None, ge=0, description="this process's rank (default: from the launcher's variables)")
    world_size: int | None = Field(None, ge=1, description="number of processes (default: from the launcher)")
    local_rank: int | None = Field(None, ge=0, description="picks this process's GPU (default: LOCAL_RANK etc.)")
    rendezvous: str | None = Field(
        None, description="host:port where rank 0 serves the NCCL unique id (default: KVFRAME_NCCL_ADDR, else "
                          "MASTER_ADDR with MASTER_PORT+1)")
    rendezvous_timeout: float = Field(120.0, gt=0, le=86400, description="seconds to wait for the unique-id exchange")
    token: str | None = Field(None, description="shared secret checked at the rendezvous (default: the job's "
                                                "KVFRAME_SECRET)")
    timeout: float | None = Field(None, gt=0, description="seconds a wait on the GPU may take before it fails "
                                                          "(default: KVFRAME_TIMEOUT, 120)")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v):
        if v is None:
            return v
        if isinstance(v, int):
            if v < 1:
                raise ValueError("a device count must be at least 1")
            return v
        if not v:
            raise ValueError("the device list is empty")
        if any(d < 0 for d in v):
            raise ValueError(f"device ids must be >= 0; got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"device ids must be distinct; got {v}")
        return v

    @field_validator("rendezvous")
    @classmethod
    def _address(cls, v):
        if v is None:
            return v
        try:
            parse_address(v, "rendezvous")
        except LaunchEnvError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.bucket_bytes and self.pack_threshold_bytes > self.bucket_bytes:
            raise ValueError(f"pack_threshold_bytes ({self.pack_threshold_bytes}) must not exceed bucket_bytes "
                             f"({self.bucket_bytes})")
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} must be below world_size {self.world_size}")
        if (self.rank is None) != (self.world_size is None):
            raise ValueError("give rank and world_size together (or neither, to read them from the launcher)")
        multi_hint = self.mode == "multi" or self.world_size is not None
        if multi_hint and self.mode == "single":
            raise ValueError("rank/world_size are for mode 'multi' (or 'auto'); mode 'single' has one process")
        if multi_hint and isinstance(self.devices, list) and len(self.devices) != 1:
            raise ValueError(f"multi-process mode drives one GPU per process; got devices={self.devices}")
        if multi_hint and isinstance(self.devices, int) and self.devices != 1:
            raise ValueError(f"multi-process mode drives one GPU per process; got devices={self.devices}")
        return self


__all__ = ["NcclConfig"]
