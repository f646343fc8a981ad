"""torch.distributed for DDP: who this process is (rank, world size) and the few collectives the run needs.

Launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or by SLURM's srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gpt_exp.config import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> Dist:
    """This process's place in the job, from torchrun's variables or, under a bare srun, from SLURM's."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        # srun started one process per task; torch.distributed's env:// init reads RANK and WORLD_SIZE
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        return launch_env()
    return Dist()


def init_process_group(d: Dist, device_type: str) -> None:
    """Join the job: NCCL between GPUs, gloo between CPU processes (so DDP runs and is tested on CPU too)."""
    if not d.enabled or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError("a multi-process job needs MASTER_ADDR (torchrun sets it; under srun export "
                          "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))")
    if device_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= d.world_size
    return t


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank (e.g. the run dir, which rank 0 alone decides)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
