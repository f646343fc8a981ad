"""The lecture's training loop, re-implemented in plain PyTorch as the baseline the benchmarks time us against.

`early`: the loop as first written (GPT-2 124M, fp32, AdamW(lr=3e-4), the B*T+1 loader, loss.item() every step).
`final`: the loop as it ends (bf16 autocast, even on CPU; vocab padded to 50304; AdamW with decay groups, fused only
on CUDA; grad clipping 1.0; warmup + cosine LR). Prints one JSON line per step: {"step", "loss", "dt_ms"}.
    python bench/lecture.py --loop early --steps 30 --B 4 --T 32
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class LectureConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_2, self.mlp = nn.LayerNorm(config.n_embd), MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)) if targets is not None else None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and "cuda" in device
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


class DataLoaderLite:
    def __init__(self, tokens: np.ndarray, B: int, T: int):
        self.B, self.T = B, T
        self.tokens = torch.tensor(tokens.astype(np.int64))
        self.current_position = 0

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.current_position : self.current_position + B * T + 1]
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.current_position += B * T
        if self.current_position + (B * T + 1) > len(self.tokens):
            self.current_position = 0
        return x, y


def shakespeare_tokens() -> np.ndarray:
    """The lecture's input.txt encoded with tiktoken's gpt2 (built offline from the package's BPE files)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpt_exp.tokenizer import gpt2_encoding

    text = (Path(__file__).resolve().parent.parent / "gpt_exp" / "assets" / "tinyshakespeare.txt").read_text()
    return np.array(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)


def get_lr(it: int, max_lr: float = 6e-4, warmup_steps: int = 10, max_steps: int = 50) -> float:
    min_lr = max_lr * 0.1
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["early", "final"], default="early")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--block_size", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(1337)
    loader = DataLoaderLite(shakespeare_tokens(), args.B, args.T)
    final = args.loop == "final"
    config = LectureConfig(block_size=args.block_size, vocab_size=50304 if final else 50257, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config)
    if final:
        optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device="cpu")
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for step in range(args.steps):
        t0 = time.time()
        x, y = loader.next_batch()
        optimizer.zero_grad()
        if final:
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                logits, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, max_steps=args.steps)
        else:
            logits, loss = model(x, y)
            loss.backward()
        optimizer.step()
        loss_value = loss.item()
        print(json.dumps({"step": step, "loss": loss_value, "dt_ms": (time.time() - t0) * 1000}), flush=True)


if __name__ == "__main__":
    main()
