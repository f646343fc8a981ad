"""The optimizer a run trains with, built from `optim`: AdamW (the lecture's), or Muon for the transformer blocks'
matrices with AdamW for the rest, as modded-nanogpt and Moonlight split them.

optim.lr is AdamW's peak lr (with optim=muon: the AdamW part's, the embeddings, gains and biases), optim.muon_lr the
Muon matrices'. The Trainer sets `group["lr"] = schedule(step) * group.get("lr_scale", 1.0)`: Muon's group carries
optim.muon_lr / optim.lr, so the matrices follow the same warmup and decay to their own peak.
"""

from __future__ import annotations

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
    c_proj: 4 per block) are hidden-layer matrices, Muon's; the embeddings (wte, tied to lm_head, and wpe), the
    gains and the biases are AdamW's. parameters() lists the tied weight once."""
    blocks = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in blocks], [p for p in params if id(p) not in blocks]


class MuonAdamW:
    """torch.optim.Muon and torch.optim.AdamW as one optimizer: one step(), one zero_grad(), one state_dict().

    param_groups are the two optimizers' own group dicts (Muon's first), so the Trainer's write to group["lr"]
    reaches the optimizer that reads it. state_dict() is {"muon": ..., "adamw": ...}, each loaded by its own
    optimizer's load_state_dict, bitwise. AdamW is not fused: skipping a non-finite step on the GPU (found_inf) is
    a fused-AdamW feature that Muon lacks, so the Trainer checks on the host instead.
    """

    def __init__(self, model: GPT, cfg: OptimConfig):
        matrices, others = muon_parameters(model)
        self.muon_lr_scale = cfg.muon_lr / cfg.lr  # the schedule gives optim.lr's curve; Muon's peak is muon_lr
        self.muon = torch.optim.Muon(
            [{"params": matrices, "lr_scale": self.muon_lr_scale}], lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, adjust_lr_fn=cfg.muon_adjust_lr.value)
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
