"""GPT-2 as in the lecture: pre-norm transformer blocks, tied token embedding, SDPA causal attention.

The init follows GPT-2: normal(0, 0.02), with residual projections scaled by 1/sqrt(2 * n_layer). The CPU fast paths
(oneDNN matmuls, sparse embedding gradients) are applied from outside, by gpt_exp/cpu.py.

Under model.parametrization=mup (maximal-update parametrization, Yang et al. 2022, "Tensor Programs V", as in
EleutherAI's nanoGPT-mup) widths are measured against mup_base_width, m = n_embd / base: the hidden matrices (the
blocks' c_attn, c_proj, c_fc) are drawn with std 0.02 / sqrt(m) and train with AdamW lr / m and weight decay * m
(the decay per step, lr * weight decay, stays), attention scores are q.k / d_head instead of q.k / sqrt(d_head), the
query projection starts at zero, and the logits are multiplied by 1 / m. microsoft/mup's base multipliers, tuned at
the base width and kept at every width, are settings (1.0 by default, which is the above): mup_output_mult (logits *
output_mult / m), mup_attn_mult (q.k * attn_mult / d_head) and mup_embed_lr_mult (the embeddings' lr). The embedding
stays tied to the readout (as in nanoGPT-mup): a tied readout cannot start at zero, so only its logits are scaled;
the embedding, gains and biases keep SP's init and lr. At m = 1 the init and the lrs are SP's, but for the zero
query and the attention scale (nanoGPT-mup instead drops the residual projections' 1/sqrt(2 * n_layer) under muP and
has no zero query, which microsoft/mup recommends).

The vocabulary can be padded (model.pad_vocab): the tied embedding gets zero rows up to a multiple of 64 (50304 for
GPT-2's 50257), so that the lm_head matmul has shapes CUDA kernels tile well (~4% faster in the lecture). The padded
rows are never a token: forward returns the logits of the real vocabulary only, so the loss, sampling and evaluation
never give them probability, and they get no gradient, so they stay zero through training.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt_exp.errors import ConfigError
from gpt_exp.shapes import flops_per_token, param_counts

if TYPE_CHECKING:
    from gpt_exp.config import ModelConfig

PAD_MULTIPLE = 64  # embedding rows padded to a multiple of this: 50257 -> 50304 (= 786 * 64)
_PAD_CHOICES = {"auto": None, "true": True, "false": False}


def pad_vocab_on(pad_vocab: object, device_type: str) -> bool:
    """Whether model.pad_vocab (auto, true or false) pads on `device_type`. auto pads on CUDA only: there the padded
    lm_head matmul is faster; on a CPU it is 0.1% more FLOPs and the loss of a sliced view costs more than it saves."""
    choice = _PAD_CHOICES.get(str(pad_vocab).lower(), "bad")  # YAML and the command line make true/false bools
    if choice == "bad":
        raise ConfigError(f"model.pad_vocab={pad_vocab} is invalid: use auto (pad on CUDA only), true or false")
    return device_type == "cuda" if choice is None else choice


def padded_vocab(vocab_size: int, pad: bool) -> int:
    """The embedding rows for `vocab_size` tokens: the next multiple of PAD_MULTIPLE if `pad`."""
    return math.ceil(vocab_size / PAD_MULTIPLE) * PAD_MULTIPLE if pad else vocab_size


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # the real tokens: what the logits, the loss, sampling and exports cover
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    padded_vocab_size: int | None = None  # rows of the tied embedding / lm_head, >= vocab_size; None: vocab_size
    parametrization: str = "sp"  # sp (GPT-2) or mup (see the module docstring)
    mup_base_width: int = 64  # under mup: the n_embd at which mup's init and lrs equal sp's
    mup_output_mult: float = 1.0  # under mup: the logits times this / m
    mup_attn_mult: float = 1.0  # under mup: attention scores times this / d_head
    mup_embed_lr_mult: float = 1.0  # under mup: the embeddings' (wte = lm_head, wpe) lr times this

    def __post_init__(self):
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")

    @property
    def padded(self) -> bool:
        return self.padded_vocab_size > self.vocab_size

    @property
    def mup(self) -> bool:
        return self.parametrization == "mup"

    @property
    def width_mult(self) -> float:
        """muP's width multiplier m = n_embd / mup_base_width; 1 under sp (nothing is scaled)."""
        return self.n_embd / self.mup_base_width if self.mup else 1.0

    @classmethod
    def from_model_config(cls, m: ModelConfig, device_type: str, saved_rows: int | None = None) -> GPTConfig:
        """The model `m` describes on `device_type`, padded as m.pad_vocab says. `saved_rows`: the embedding rows of
        the weights about to be loaded into it (a checkpoint's, when resuming), which decide instead, so that a
        padded checkpoint resumes padded (and an unpadded one unpadded) on any device."""
        pad = pad_vocab_on(m.pad_vocab, device_type)
        rows = saved_rows if saved_rows is not None else padded_vocab(m.vocab_size, pad)
        return cls(m.block_size, m.vocab_size, m.n_layer, m.n_head, m.n_embd, rows,
                   str(getattr(m, "parametrization", "sp")), getattr(m, "mup_base_width", 64),
                   getattr(m, "mup_output_mult", 1.0), getattr(m, "mup_attn_mult", 1.0),
                   getattr(m, "mup_embed_lr_mult", 1.0))


def fit_padding(state: dict, config: GPTConfig) -> dict:
    """`state` with its token embedding (and lm_head, its tie) padded as `config` is: the rows past the real
    vocabulary are padding, so they are appended as zeros (an unpadded model's weights, a Hugging Face file's, for
    a padded model) or cut (a padded model's for an unpadded one). Other shapes are left for the caller to refuse."""
    wte = state.get("transformer.wte.weight")
    if not (isinstance(wte, torch.Tensor) and wte.dim() == 2 and wte.shape[1] == config.n_embd
            and config.vocab_size <= wte.shape[0] != config.padded_vocab_size):
        return state
    extra = config.padded_vocab_size - wte.shape[0]
    fitted = torch.cat([wte, wte.new_zeros(extra, config.n_embd)]) if extra > 0 else wte[: config.padded_vocab_size]
    return {**state, **{name: fitted for name in ("transformer.wte.weight", "lm_head.weight") if name in state}}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        # muP: attn_mult/d_head (q and k become correlated as they train, so q.k grows like d_head, not
        # sqrt(d_head)); None: SDPA's default 1/sqrt(d_head)
        self.scale = config.mup_attn_mult / (config.n_embd // config.n_head) if config.mup else None
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_attn.ROW_BLOCKS = 3  # q, k and v stacked: Muon orthogonalizes each on its own (gpt_exp/optim.py)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # flash where available


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection reuses the token embedding (saves 38.6M params at 124M)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        if config.mup:
            self._mup_init()
        if config.padded:
            self._pad_vocab()

    def _pad_vocab(self) -> None:
        """Zero rows appended to the tied weight after the init: every other weight is drawn exactly as in the
        unpadded model of the same seed, so padding changes the speed, never the numbers. Zero rows stay zero: no
        token looks them up, and their logits are cut before the loss, so no gradient (or weight decay) moves them."""
        c = self.config
        real = self.lm_head.weight.detach()
        weight = nn.Parameter(torch.cat([real, real.new_zeros(c.padded_vocab_size - c.vocab_size, c.n_embd)]))
        self.transformer.wte.weight = self.lm_head.weight = weight
        self.transformer.wte.num_embeddings = self.lm_head.out_features = c.padded_vocab_size

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5  # each block adds to the residual stream twice
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _mup_init(self) -> None:
        """muP after SP's init (so the random stream, and every other weight, is SP's): the hidden matrices' std
        scaled by 1/sqrt(m) (fan-in), the query projection zeroed (the first n_embd rows of c_attn)."""
        scale = self.config.width_mult ** -0.5
        with torch.no_grad():
            for p in self.hidden_matrices():
                p.mul_(scale)
            for block in self.transformer.h:
                block.attn.c_attn.weight[: self.config.n_embd].zero_()

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the transformer blocks (c_attn, c_proj, c_fc, 4 per block): both their dims grow
        with the width, so muP scales their init and lr; the embeddings (wte tied to lm_head, wpe) are not."""
        return [p for p in self.transformer.h.parameters() if p.dim() == 2]

    def num_params(self) -> int:
        """The model's weights, the padded embedding rows not counted (gpt_exp/shapes.py counts them from the shape)."""
        c = self.config
        return param_counts(c.n_layer, c.n_embd, c.vocab_size, c.block_size)[1]

    def flops_per_token(self, T: int) -> int:
        """Training FLOPs per token, forward + backward (gpt_exp/shapes.py)."""
        c = self.config
        return flops_per_token(c.n_layer, c.n_embd, c.vocab_size, c.block_size, T)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of length {T} exceeds block_size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.mup:  # muP's readout multiplier output_mult/m (the tied readout is not zero)
            logits = logits / (self.config.width_mult / self.config.mup_output_mult)
        if self.config.padded:
            # the real tokens' logits, a view: the padded columns take no probability anywhere (the loss, sampling,
            # HellaSwag). Cutting them beats masking them with -inf: the loss of B=4, T=32 costs 9.1 ms (fwd + bwd)
            # on the cut view vs 16.0 ms with masked_fill (3.7 ms unpadded), and the masked tensor is one more copy
            logits = logits[..., : self.config.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.view(-1))
        return logits, loss

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, device_type: str,
        fused: bool = True,
    ) -> torch.optim.AdamW:
        """AdamW that decays only 2-D weights (matmuls, embeddings), never biases or layernorm gains. Under muP the
        hidden matrices get a group of their own with lr / m (its "lr_scale", which the Trainer's schedule keeps) and
        weight_decay * m: AdamW decays by lr * weight_decay per step, which muP keeps the same at every width (as
        microsoft/mup's MuAdamW does); the embeddings' lr is times mup_embed_lr_mult."""
        params = [p for p in self.parameters() if p.requires_grad]
        c = self.config
        if c.mup:
            hidden = {id(p) for p in self.hidden_matrices()}
            scale = 1.0 / c.width_mult
            groups = [
                {"params": [p for p in params if id(p) in hidden], "weight_decay": weight_decay * c.width_mult,
                 "lr": lr * scale, "lr_scale": scale},
                {"params": [p for p in params if p.dim() >= 2 and id(p) not in hidden], "weight_decay": weight_decay,
                 "lr": lr * c.mup_embed_lr_mult, "lr_scale": c.mup_embed_lr_mult},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
        else:
            groups = [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
        # the fused kernel where torch has one for the device (sharded DTensor parameters take the foreach path)
        fused = fused and "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
        if c.mup:
            scales = [group["lr_scale"] for group in optimizer.param_groups[:2]]

            def keep_lr_scales(opt: torch.optim.AdamW) -> None:  # load_state_dict takes the saved groups' settings
                for group, s in zip(opt.param_groups, scales):  # a resumed run keeps this run's multipliers
                    group["lr_scale"] = s

            optimizer.register_load_state_dict_post_hook(keep_lr_scales)
        return optimizer


def init_loss(vocab_size: int) -> float:
    """The loss of a uniform guess over the vocabulary: where a fresh model starts (ln 50257 = 10.82)."""
    return math.log(vocab_size)
