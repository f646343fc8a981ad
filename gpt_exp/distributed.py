"""torch.distributed for DDP and FSDP: joining the job (`launch.Dist` says who this process is), the few collectives
the run needs, and whole state dicts gathered from shards."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from gpt_exp.errors import ConfigError
from gpt_exp.launch import Dist


def init_process_group(d: Dist, device_type: str) -> None:
    """Join the job: NCCL between GPUs, gloo between CPU processes (so DDP runs and is tested on CPU too)."""
    if not d.enabled or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError("a multi-process job needs MASTER_ADDR (torchrun sets it; under srun export "
                          "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))")
    # torch's env:// init reads these; under a bare srun only SLURM's variables are set
    os.environ.setdefault("MASTER_PORT", "29500")
    for key, value in (("RANK", d.rank), ("WORLD_SIZE", d.world_size), ("LOCAL_RANK", d.local_rank)):
        os.environ.setdefault(key, str(value))
    if device_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= d.world_size
    return t


def all_reduce_min(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
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


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 in place: each transformer block is a unit (gathered just before it runs), the rest the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks on this backward or not (off for all but the last micro-step)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    else:  # DDP reads this in its forward
        model.require_backward_grad_sync = enabled


def full_model_state(model: torch.nn.Module, sharded: bool) -> dict:
    """The model's whole tensors (gathered from the shards under FSDP: every rank must call this)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts as whole tensors on the CPU, gathered from the shards under FSDP (every rank
    must call this then; rank 0 writes the result), so that any world size can load them."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_model_state(model: torch.nn.Module, state: dict, sharded: bool) -> None:
    """Load whole weights (a checkpoint's) into the model, or into this rank's shards under FSDP."""
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a gathered optimizer state (from `full_state` of a sharded run) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
