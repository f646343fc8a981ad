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

Under model.parametrization=completep (CompleteP, Dey et al. 2025, "Don't be lazy: CompleteP enables compute-efficient
deep transformers", as EleutherAI's nanoGPT-mup does it on its completep branch) the width rules above hold, and depths
are measured against depth_base, L_m = n_layer / depth_base, with alpha = depth_alpha (1; 0.5 is depth-muP): each
block's two residual branches are multiplied by L_m^-alpha, the blocks' matrices train with lr / m * L_m^(alpha - 1)
and the blocks' gains and biases (and value-embedding gates) with lr * L_m^(alpha - 1), Adam's eps is eps / m *
L_m^-alpha in every group, and the residual projections start with the hidden matrices' std 0.02 / sqrt(m), without
GPT-2's 1/sqrt(2 * n_layer): the residual multiplier is what scales a block's output with depth (the init must not
depend on it). The embeddings, lm_head and the final norm keep mup's lrs. At L_m = 1 completep is mup but for that
init of the residual projections and eps / m.

Architecture settings (model.pos, norm, norm_gain, qk_norm, mlp, bias, tie_embeddings, logit_softcap, n_kv_head,
value_embeddings, zero_init_proj) each default to GPT-2's choice, and at their defaults the model, its state_dict keys
and its init's random stream are GPT-2's above. The others: rotary positions instead of wpe (Su et al., in Llama's
layout, so an export to LlamaForCausalLM computes the same), RMSNorm, q and k normed per head, ReLU^2 or SwiGLU MLPs,
no biases, an untied lm_head, logits capped by tanh (Gemma 2), grouped-query attention (n_kv_head key/value heads),
nanochat's gated value embeddings (a table per alternating layer whose rows are added to v, each kv head gated by
2 sigmoid of a 32-channel projection that starts at zero, so the gate starts at 1) and residual projections that start
at zero. conf/model/modern.yaml is nanochat's combination.
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
from gpt_exp.shapes import (GPT2_ARCH, VE_GATE_CHANNELS, arch_settings, flops_per_token, mlp_hidden, param_counts,
                             value_embedding_layers)

if TYPE_CHECKING:
    from gpt_exp.config import ModelConfig

PAD_MULTIPLE = 64  # embedding rows padded to a multiple of this: 50257 -> 50304 (= 786 * 64)
_PAD_CHOICES = {"auto": None, "true": True, "false": False}


RMS_EPS = 1e-6  # RMSNorm's epsilon (Llama's rms_norm_eps)


def is_gpt2_arch(m: object) -> bool:
    """Whether `m` (a ModelConfig, GPTConfig or checkpoint's model dict) has GPT-2's architecture, every setting at
    its default: what a Hugging Face GPT-2 dir can hold (muP's scales aside)."""
    settings = arch_settings(m)
    n_head = m["n_head"] if isinstance(m, dict) else m.n_head
    return settings["n_kv_head"] in (None, n_head) and all(
        settings[key] == value for key, value in GPT2_ARCH.items() if key != "n_kv_head")


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
    depth_base: int = 2  # under completep: the n_layer at which its residual branches and lrs are mup's
    depth_alpha: float = 1.0  # under completep: residual branches times (depth_base / n_layer)^depth_alpha
    # the architecture settings (the module docstring; config.ModelConfig says what each does); each default GPT-2's
    pos: str = "learned"  # learned (wpe) or rope (rotary, no wpe)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm or rmsnorm
    norm_gain: bool = True  # the norms' learned gain (and, with bias, LayerNorm's bias)
    qk_norm: bool = False  # q and k normed per head before the scores
    mlp: str = "gelu"  # gelu, relu2 or swiglu
    bias: bool = True  # biases in every Linear and LayerNorm
    tie_embeddings: bool = True  # lm_head is the token embedding
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    n_kv_head: int | None = None  # key/value heads (GQA); None: n_head
    value_embeddings: bool = False  # nanochat's gated value embeddings on alternating layers
    zero_init_proj: bool = False  # the residual projections (attention and MLP c_proj) start at zero

    def __post_init__(self):
        if self.padded_vocab_size is None:
            object.__setattr__(self, "padded_vocab_size", self.vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return mlp_hidden(self.mlp, self.n_embd)

    @property
    def is_gpt2(self) -> bool:
        return is_gpt2_arch(self)

    @property
    def padded(self) -> bool:
        return self.padded_vocab_size > self.vocab_size

    @property
    def mup(self) -> bool:
        """muP's width rules: under mup, and under completep, which adds depth rules to them."""
        return self.parametrization in ("mup", "completep")

    @property
    def completep(self) -> bool:
        return self.parametrization == "completep"

    @property
    def width_mult(self) -> float:
        """muP's width multiplier m = n_embd / mup_base_width; 1 under sp (nothing is scaled)."""
        return self.n_embd / self.mup_base_width if self.mup else 1.0

    @property
    def depth_mult(self) -> float:
        """CompleteP's depth multiplier L_m = n_layer / depth_base; 1 under sp and mup."""
        return self.n_layer / self.depth_base if self.completep else 1.0

    @property
    def residual_mult(self) -> float:
        """What each residual branch's output is multiplied by: L_m^-alpha (1 but under completep)."""
        return self.depth_mult ** -self.depth_alpha

    @classmethod
    def from_model_config(cls, m: ModelConfig, device_type: str, saved_rows: int | None = None) -> GPTConfig:
        """The model `m` describes on `device_type`, padded as m.pad_vocab says. `saved_rows`: the embedding rows of
        the weights about to be loaded into it (a checkpoint's, when resuming), which decide instead, so that a
        padded checkpoint resumes padded (and an unpadded one unpadded) on any device."""
        pad = pad_vocab_on(m.pad_vocab, device_type)
        rows = saved_rows if saved_rows is not None else padded_vocab(m.vocab_size, pad)
        return cls(m.block_size, m.vocab_size, m.n_layer, m.n_head, m.n_embd, rows, **scale_settings(m),
                   **arch_settings(m))


# The parametrization's settings and their defaults (sp's): what a model's scales are, beyond its architecture
SCALE_DEFAULTS = {"parametrization": "sp", "mup_base_width": 64, "mup_output_mult": 1.0, "mup_attn_mult": 1.0,
                  "mup_embed_lr_mult": 1.0, "depth_base": 2, "depth_alpha": 1.0}


def scale_settings(m: object) -> dict:
    """The parametrization settings of `m` (a ModelConfig, GPTConfig or checkpoint's model dict), each missing one
    its default: a checkpoint of a version without them keeps the scales it was trained with."""
    get = m.get if isinstance(m, dict) else lambda key, default: getattr(m, key, default)
    settings = {key: get(key, default) for key, default in SCALE_DEFAULTS.items()}
    return {**settings, "parametrization": str(settings["parametrization"])}


def fit_padding(state: dict, config: GPTConfig) -> dict:
    """`state` with its token embedding (and lm_head, its tie) padded as `config` is: the rows past the real
    vocabulary are padding, so they are appended as zeros (an unpadded model's weights, a Hugging Face file's, for
    a padded model) or cut (a padded model's for an unpadded one). Other shapes are left for the caller to refuse."""
    wte = state.get("transformer.wte.weight")
    if not (isinstance(wte, torch.Tensor) and wte.dim() == 2 and wte.shape[1] == config.n_embd
            and config.vocab_size <= wte.shape[0] != config.padded_vocab_size):
        return state
    extra = config.padded_vocab_size - wte.shape[0]

    def fit(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(extra, config.n_embd)]) if extra > 0 else t[: config.padded_vocab_size]

    fitted = {"transformer.wte.weight": fit(wte)}
    if "lm_head.weight" in state:  # tied: the same tensor; untied (model.tie_embeddings=false): its own rows
        fitted["lm_head.weight"] = fitted["transformer.wte.weight"] if config.tie_embeddings else \
            fit(state["lm_head.weight"])
    return {**state, **fitted}


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The model's norm over the last `dim` features: LayerNorm (GPT-2's: gain and bias) or RMSNorm, each with or
    without its learned gain (model.norm_gain; LayerNorm's bias follows model.bias too)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=RMS_EPS, elementwise_affine=config.norm_gain)
    return nn.LayerNorm(dim, elementwise_affine=config.norm_gain, bias=config.bias)


def rope_cos_sin(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding's (cos, sin) for `positions`, (T, head_dim), computed as Hugging Face's Llama does (the
    frequencies repeated over the two halves of a head), so an export computes the same numbers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated pairwise (feature i with i + D/2) by each position's angles: q.k then depends on the
    positions' offset only."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class KVCache:
    """The keys and values each layer has seen, for generation: one token's step attends to them instead of
    recomputing the context. `pos` is the position of the next token."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.layer = config.n_head, config.n_kv_head, config.head_dim, layer
        # muP: attn_mult/d_head (q and k become correlated as they train, so q.k grows like d_head, not
        # sqrt(d_head)); None: SDPA's default 1/sqrt(d_head)
        self.scale = config.mup_attn_mult / config.head_dim if config.mup else None
        kv_dim = config.n_kv_head * config.head_dim
        # q, k, v for all heads in one matmul; GQA: n_kv_head key/value heads, each shared by n_head/n_kv_head queries
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        # q, k and v stacked: Muon orthogonalizes each on its own (gpt_exp/optim.py); rows of each when they differ
        self.c_attn.ROW_BLOCKS = 3 if kv_dim == config.n_embd else (config.n_embd, kv_dim, kv_dim)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        if config.qk_norm:  # per head, before rope (as Qwen3 does): bounds q.k however large q and k grow
            self.q_norm, self.k_norm = make_norm(config, config.head_dim), make_norm(config, config.head_dim)
        if config.value_embeddings and layer in value_embedding_layers(config.n_layer):
            # nanochat: v += 2 sigmoid(gate(x[:32])) * value_embedding(token), a gate per kv head, zero at init
            self.ve_gate_channels = min(VE_GATE_CHANNELS, config.n_embd)
            self.ve_gate = nn.Linear(self.ve_gate_channels, config.n_kv_head, bias=False)
            self.ve_gate.ZERO_INIT = True

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ve: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split((C, kv_dim, kv_dim), dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))  # (B, T, n_kv_head), in (0, 2)
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = True
        if cache is not None:
            causal = cache.k[self.layer] is None  # the prompt: causal; one new token: it sees every key so far
            k, v = cache.update(self.layer, k, v)
        y = self.attend(q, k, v, causal)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        # flash where available; GQA: SDPA shares each key/value head among its queries
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale,
                                              enable_gqa=k.size(1) != q.size(1))


class MLP(nn.Module):
    """GPT-2's GELU MLP, ReLU^2 (nanochat, modded-nanogpt) or SwiGLU (Llama). The hidden width is 4C for gelu and
    relu2; SwiGLU's three matrices take round(2/3 * 4C) so that it has the parameters of the 4C MLP (shapes.py)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, hidden = config.mlp, config.mlp_hidden
        fused = 2 if config.mlp == "swiglu" else 1  # SwiGLU's gate and up projections stacked in c_fc
        self.c_fc = nn.Linear(config.n_embd, fused * hidden, bias=config.bias)
        if fused == 2:
            self.c_fc.ROW_BLOCKS = 2  # Muon orthogonalizes the gate and the up projection each on its own
        if config.mlp == "gelu":
            self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = self.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.residual_mult = config.residual_mult  # CompleteP: (depth_base / n_layer)^alpha; 1 otherwise

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ve: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if self.residual_mult == 1.0:  # sp and mup: GPT-2's block, without a multiply by 1
            x = x + self.attn(self.ln_1(x), rope, ve, cache)
            return x + self.mlp(self.ln_2(x))
        # CompleteP: L blocks each add L_m^-alpha of their output, so that the residual stream and its updates keep
        # their size as the depth grows
        x = x + self.residual_mult * self.attn(self.ln_1(x), rope, ve, cache)
        return x + self.residual_mult * self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
                       ln_f=make_norm(config, config.n_embd))
        if config.value_embeddings:  # keyed by layer; each (vocab, kv_dim): a token's value added in that layer
            kv_dim = config.n_kv_head * config.head_dim
            modules["ve"] = nn.ModuleDict({str(layer): nn.Embedding(config.vocab_size, kv_dim)
                                           for layer in value_embedding_layers(config.n_layer)})
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
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
        padded = [nn.Parameter(torch.cat([real, real.new_zeros(c.padded_vocab_size - c.vocab_size, c.n_embd)]))
                  for real in (self.transformer.wte.weight.detach(), self.lm_head.weight.detach())]
        self.transformer.wte.weight = padded[0]
        self.lm_head.weight = padded[0] if c.tie_embeddings else padded[1]
        self.transformer.wte.num_embeddings = self.lm_head.out_features = c.padded_vocab_size

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            # each block adds to the residual stream twice; CompleteP scales that sum with its residual multiplier
            # instead, so that the init does not depend on the depth (nanoGPT-mup's completep branch drops it too)
            if getattr(module, "RESIDUAL_SCALE_INIT", False) and not self.config.completep:
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            # zero_init_proj: each block starts as the identity (modded-nanogpt, nanochat); a value embedding's gate
            # starts at 1. Drawn first all the same, so the other weights keep the random stream
            if getattr(module, "ZERO_INIT", False) or (self.config.zero_init_proj
                                                       and getattr(module, "RESIDUAL_SCALE_INIT", False)):
                torch.nn.init.zeros_(module.weight)
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
        """The blocks' projections (c_attn, c_proj, c_fc, 4 per block, whatever the MLP or GQA): both their dims grow
        with the width, so muP scales their init and lr. Not hidden: the embeddings (wte, wpe, the value embeddings)
        and an untied lm_head (one dim is the vocabulary), the value embeddings' gates (32 x n_kv_head: neither dim
        grows), the norms' gains and the biases (vectors)."""
        return [m.weight for block in self.transformer.h for m in (block.attn.c_attn, block.attn.c_proj,
                                                                   block.mlp.c_fc, block.mlp.c_proj)]

    def completep_groups(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
        """CompleteP's AdamW groups (nanoGPT-mup's completep branch, GPT.configure_optimizers), each with its lr_scale
        (the Trainer's schedule keeps it), L_m^(alpha - 1) being 1 at alpha = 1:
        the hidden matrices lr / m * L_m^(alpha - 1), weight decay * m (as under mup);
        the embeddings (wte = lm_head, wpe, the value embeddings) and an untied lm_head lr * mup_embed_lr_mult;
        the blocks' other matrices (the value embeddings' gates: neither dim grows with the width, and they sit in
        a residual branch) lr * L_m^(alpha - 1), decayed; the blocks' gains and biases lr * L_m^(alpha - 1), not
        decayed; the final norm's gain and bias lr, not decayed."""
        c = self.config
        depth_scale = c.depth_mult ** (c.depth_alpha - 1)
        hidden = {id(p) for p in self.hidden_matrices()}
        in_blocks = {id(p) for p in self.transformer.h.parameters()}

        def group(keep, decay: float, scale: float) -> dict:
            return {"params": [p for p in params if keep(p)], "weight_decay": decay, "lr": lr * scale,
                    "lr_scale": scale}

        return [
            group(lambda p: id(p) in hidden, weight_decay * c.width_mult, depth_scale / c.width_mult),
            group(lambda p: p.dim() >= 2 and id(p) not in in_blocks, weight_decay, c.mup_embed_lr_mult),
            group(lambda p: p.dim() >= 2 and id(p) in in_blocks and id(p) not in hidden, weight_decay, depth_scale),
            group(lambda p: p.dim() < 2 and id(p) in in_blocks, 0.0, depth_scale),
            group(lambda p: p.dim() < 2 and id(p) not in in_blocks, 0.0, 1.0),
        ]

    def num_params(self) -> int:
        """The model's weights, the padded embedding rows not counted (gpt_exp/shapes.py counts them from the shape)."""
        c = self.config
        return param_counts(c.n_layer, c.n_embd, c.vocab_size, c.block_size, c.n_head, **arch_settings(c))[1]

    def flops_per_token(self, T: int) -> int:
        """Training FLOPs per token, forward + backward (gpt_exp/shapes.py)."""
        c = self.config
        return flops_per_token(c.n_layer, c.n_embd, c.vocab_size, c.block_size, T, c.n_head, **arch_settings(c))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (B, T, vocab) and the loss against `targets`. `cache`: the positions before these tokens are in
        it (generation); it takes their keys and values."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        assert start + T <= self.config.block_size, \
            f"sequence of length {start + T} exceeds block_size {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_cos_sin(self.config.head_dim, self.config.rope_theta, pos)
        for layer, block in enumerate(self.transformer.h):
            ve = self.transformer.ve[str(layer)](idx) if "ve" in self.transformer and \
                str(layer) in self.transformer.ve else None
            x = block(x, rope, ve, cache)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.mup:  # muP's readout multiplier output_mult/m (the tied readout is not zero)
            logits = logits / (self.config.width_mult / self.config.mup_output_mult)
        if self.config.logit_softcap is not None:  # Gemma 2's tanh cap: |logits| < cap however the weights grow
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
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
        microsoft/mup's MuAdamW does); the embeddings' lr is times mup_embed_lr_mult. CompleteP: completep_groups."""
        params = [p for p in self.parameters() if p.requires_grad]
        c = self.config
        if c.completep:
            groups = self.completep_groups(params, lr, weight_decay)
            # nanoGPT-mup: adam_eps *= (1 / m) * L_m^-alpha, in every group. Adam's update is g / (sqrt(v) + eps), and
            # the gradients of the hidden matrices shrink like 1/m and 1/L_m^alpha: eps must shrink with them, or it
            # swamps sqrt(v) in the wide and deep models and their updates fall short of the rule's
            eps = eps / c.width_mult * c.depth_mult ** -c.depth_alpha
        elif c.mup:
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
            scales = [group.get("lr_scale") for group in optimizer.param_groups]

            def keep_lr_scales(opt: torch.optim.AdamW) -> None:  # load_state_dict takes the saved groups' settings
                for group, s in zip(opt.param_groups, scales):  # a resumed run keeps this run's multipliers
                    if s is not None:
                        group["lr_scale"] = s

            optimizer.register_load_state_dict_post_hook(keep_lr_scales)
        return optimizer


def init_loss(vocab_size: int) -> float:
    """The loss of a uniform guess over the vocabulary: where a fresh model starts (ln 50257 = 10.82)."""
    return math.log(vocab_size)
