"""Who this process is in its job (rank, world size, local rank), from the launcher's environment: torchrun's
RANK/WORLD_SIZE/LOCAL_RANK or, under a bare srun, SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. torch-free, so that
every command's error boundary can ask whether it speaks for the job."""

from __future__ import annotations

import os
from dataclasses import dataclass


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
    """This process's place in the job; a plain process is rank 0 of 1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun started one process per task
        return Dist(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Dist()


def is_main_process() -> bool:
    """Rank 0 of a torchrun or srun job, or a plain process: the one that speaks for the job."""
    return launch_env().is_main
