"""The optimizer a run trains with, built from `optim`: AdamW (the lecture's), or Muon for the transformer blocks'
matrices with AdamW for the rest, as modded-nanogpt and Moonlight split them. Muon orthogonalizes a fused projection
(c_attn: q, k, v) one block at a time, as modded-nanogpt does with its separate q, k and v.

optim.lr is AdamW's peak lr (with optim=muon: the AdamW part's, the embeddings, gains and biases), optim.muon_lr the
Muon matrices'. The Trainer sets `group["lr"] = schedule(step) * group.get("lr_scale", 1.0)`: Muon's group carries
optim.muon_lr / optim.lr, so the matrices follow the same warmup and decay to their own peak.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gpt_exp.config import MUON_FSDP_ERROR, OptimConfig, OptimizerName
from gpt_exp.errors import ConfigError
from gpt_exp.model import GPT


def build_optimizer(model: GPT, cfg: OptimConfig, device_type: str,
                    sharded: bool) -> torch.optim.Optimizer | MuonAdamW:
    """optim=adamw: GPT.configure_optimizer's AdamW, unchanged (fused where torch has the kernel, foreach on FSDP's
    DTensor shards). optim=muon: a MuonAdamW; refused under FSDP, whose shards Newton-Schulz cannot orthogonalize."""
    if cfg.name == OptimizerName.adamw:
        return model.configure_optimizer(cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.eps, device_type,
                                         fused=not sharded)
    if sharded:
        raise ConfigError(MUON_FSDP_ERROR)
    return MuonAdamW(model, cfg)


def describe_optimizer(cfg: OptimConfig) -> str:
    """The optimizer and its peak lrs, for the run's startup line."""
    if cfg.name == OptimizerName.muon:
        return (f"optim muon: matrices peak lr {cfg.muon_lr:.3g}, AdamW part (embeddings, gains, biases) peak lr "
                f"{cfg.lr:.3g}")
    return f"optim adamw: peak lr {cfg.lr:.3g}"


def muon_parameters(model: GPT) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon's, AdamW's): the 2-D weights inside the transformer blocks (attention c_attn and c_proj, MLP c_fc and
    c_proj: 4 per block, whatever model.mlp and model.n_kv_head; with model.value_embeddings, the gates too, as
    nanochat has them) are hidden-layer matrices, Muon's; the embeddings (wte, wpe, the value embeddings), lm_head
    (tied to wte or not), the gains (norms, qk_norm) and the biases are AdamW's. parameters() lists a tied weight
    once."""
    blocks = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in blocks], [p for p in params if id(p) not in blocks]


def row_blocks(model: GPT) -> dict[torch.nn.Parameter, int | tuple[int, ...]]:
    """The fused projections among Muon's matrices and their row blocks: a Linear tagged ROW_BLOCKS, a count of equal
    blocks (c_attn: 3, its q, k and v projections; SwiGLU's c_fc: 2, gate and up) or the rows of each (c_attn under
    GQA: (C, kv, kv)); every other matrix is one block."""
    return {m.weight: m.ROW_BLOCKS for m in model.transformer.h.modules() if hasattr(m, "ROW_BLOCKS")}


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Newton-Schulz's quintic iteration towards the nearest semi-orthogonal matrix (U S' V^T, S' ~ 1), in bfloat16, as
    torch.optim.Muon and modded-nanogpt run it: the Frobenius norm bounds the spectral norm by 1 first."""
    a, b, c = coefficients
    x = update.to(torch.bfloat16, copy=True)  # a copy even of a bf16 update: it is divided in place below
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    """The lr of one orthogonalized block of `shape` (rows, cols): match_rms_adamw gives it AdamW's RMS (Moonlight's
    0.2 * sqrt(max(rows, cols))), original Keller Jordan's sqrt(max(1, rows / cols))."""
    rows, cols = shape
    return lr * (0.2 * math.sqrt(max(rows, cols)) if rule == "match_rms_adamw" else math.sqrt(max(1, rows / cols)))


class BlockwiseMuon(torch.optim.Muon):
    """torch.optim.Muon whose step orthogonalizes each row block of a fused projection on its own.

    c_attn stacks q, k and v (3C x C): orthogonalized whole, the block with the largest gradient (v, early on) takes
    most of the update's spectrum and q and k barely move. Per block, each gets the update an unfused C x C matrix
    would. Momentum and weight decay are elementwise, so they are the whole matrix's. Settings, checks and
    state_dict (one momentum_buffer per matrix) are torch.optim.Muon's: a checkpoint of either loads in the other.
    """

    def __init__(self, params, blocks: dict[torch.nn.Parameter, int], **settings: Any):
        super().__init__(params, **settings)
        self.row_blocks = blocks  # the model's structure (row_blocks(model)), not state: not in state_dict
        for p, n in blocks.items():
            if isinstance(n, int) and p.size(0) % n or not isinstance(n, int) and sum(n) != p.size(0):
                raise ValueError(f"a {tuple(p.shape)} matrix cannot hold the row blocks {n}")

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])
                n = self.row_blocks.get(p, 1)
                rows = p.size(0) // n if isinstance(n, int) else list(n)  # equal blocks, or each one's rows
                for block, block_update in zip(p.split(rows), update.split(rows)):
                    orthogonal = orthogonalize(block_update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                    block.add_(orthogonal, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], block.shape))


class MuonAdamW:
    """BlockwiseMuon and torch.optim.AdamW as one optimizer: one step(), one zero_grad(), one state_dict().

    param_groups are the two optimizers' own group dicts (Muon's first), so the Trainer's write to group["lr"]
    reaches the optimizer that reads it. state_dict() is {"muon": ..., "adamw": ...}, each loaded by its own
    optimizer's load_state_dict, bitwise. AdamW is not fused: skipping a non-finite step on the GPU (found_inf) is
    a fused-AdamW feature that Muon lacks, so the Trainer checks on the host instead.
    """

    def __init__(self, model: GPT, cfg: OptimConfig):
        matrices, others = muon_parameters(model)
        self.muon_lr_scale = cfg.muon_lr / cfg.lr  # the schedule gives optim.lr's curve; Muon's peak is muon_lr
        self.muon = BlockwiseMuon(
            [{"params": matrices, "lr_scale": self.muon_lr_scale}], row_blocks(model), lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
            adjust_lr_fn=cfg.muon_adjust_lr.value)
        self.adamw = torch.optim.AdamW(
            [{"params": [p for p in others if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
             {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=False)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # read anew: load_state_dict replaces the group dicts
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:  # an optim=adamw checkpoint resumed with optim=muon
            raise ConfigError("resume: the checkpoint's optimizer is optim=adamw's; resume it with optim=adamw, or "
                              "take only its weights with init_from=CHECKPOINT")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        for group in self.muon.param_groups:  # this run's optim.muon_lr, not the saved run's
            group["lr_scale"] = self.muon_lr_scale
