"""Text from a model: the lecture's top-k sampling, its settings, and the model a run dir or a HF dir holds.

The library behind `python -m gpt_exp.sample` and the samples a run logs while it trains; it never imports the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gpt_exp.checkpoint import load_model
from gpt_exp.config import DeviceConfig, DeviceType, DType
from gpt_exp.device import resolve_runtime
from gpt_exp.errors import ConfigError
from gpt_exp.model import GPT, KVCache
from gpt_exp.tokenizer import EOT_TOKEN, encode_text, gpt2_encoding

# A temperature below this samples the most likely token, as vLLM does: the distribution is greedy to float
# precision there, and logits / temperature would overflow to inf (softmax: NaN).
GREEDY_TEMPERATURE = 1e-5
SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes



@dataclass
class SampleArgs:
    """How to sample: the command's options and the `sample` section a run samples with while it trains."""

    prompt: str = "Hello, I'm a language model,"  # the lecture's; "" starts from <|endoftext|>, token 50256
    max_new_tokens: int = 100
    num_samples: int = 3
    top_k: int = 50
    temperature: float = 1.0
    seed: int = 1337

    def __post_init__(self):
        for key in ("max_new_tokens", "num_samples", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} is invalid: it must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 and finite, e.g. 1.0 "
                              f"(lower: safer text; below {GREEDY_TEMPERATURE:g}: always the most likely token)")
        if not SEEDS[0] <= self.seed <= SEEDS[1]:
            raise ConfigError(f"seed={self.seed} is invalid: it must fit in 64 bits, e.g. 0 to {SEEDS[1]}")


def inference_device(device: DeviceType) -> torch.device:
    """The device to run on (auto: CUDA, else MPS, else the CPU), fp32 and uncompiled (a one-line error for
    device=cuda without a GPU)."""
    return resolve_runtime(DeviceConfig(type=device, dtype=DType.fp32, compile=False)).device


def model_source(resume: str | None, hf: str | None) -> tuple[GPT, dict]:
    """The model `resume=` or `hf=` names (exactly one of them), on the CPU in eval mode."""
    if bool(resume) == bool(hf):  # `resume=` with nothing after it names no model either
        raise ConfigError("name one model: resume=RUN_DIR (or a checkpoint .pt file) or hf=HF_GPT2_DIR")
    return load_model(resume, hf=False) if resume else load_model(hf, hf=True)


def describe(info: dict) -> str:
    step = f", step {info['step']}" if info["step"] is not None else ""
    return f"model {info['name']} ({info['params'] / 1e6:.2f}M params{step}) from {info['source']}"


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, top_k: int = 50, temperature: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """`idx` (B, T) with `max_new_tokens` sampled tokens appended to each row: softmax over the `top_k` most
    likely next tokens, the context cropped to the model's block_size.

    use_cache: a KV cache, so each new token runs through the model alone, attending to the keys and values kept
    from before; without it every step reruns the whole context. The two compute the same logits up to float
    rounding (other matmul shapes). Once the context outgrows block_size the window slides, and positions count
    from its new start, as the uncached path sees them: each such step refills the cache from the cropped context."""
    block_size = model.config.block_size
    vocab = gpt2_encoding().n_vocab  # a HF dir padded to 50304 rows has logits for ids the tokenizer cannot decode
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        elif cache is None or cache.pos >= block_size:  # the prompt, or a window that slid: fill the cache anew
            cache = KVCache(model.config.n_layer)
            logits, _ = model(idx[:, -block_size:], cache=cache)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)
        logits = logits[:, -1, :vocab]
        if temperature < GREEDY_TEMPERATURE:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            top_logits, top_indices = torch.topk(logits / temperature, min(top_k, logits.size(-1)), dim=-1)
            choice = torch.multinomial(F.softmax(top_logits, dim=-1), 1, generator=generator)
            next_token = torch.gather(top_indices, -1, choice)
        idx = torch.cat((idx, next_token), dim=1)
    return idx


def encode_prompt(prompt: str, block_size: int) -> list[int]:
    """The prompt's tokens (an empty prompt: <|endoftext|>, where a document starts); a prompt longer than the model
    can see is refused, since generation would silently drop its start."""
    tokens = encode_text(prompt) or [EOT_TOKEN]
    if len(tokens) > block_size:
        raise ConfigError(f"prompt is {len(tokens)} tokens, more than the model's block_size={block_size} that it "
                          f"can see; shorten the prompt")
    return tokens


def sample_texts(model: GPT, args: SampleArgs, device: torch.device) -> list[str]:
    """`args.num_samples` texts, each the prompt followed by `args.max_new_tokens` sampled tokens."""
    enc = gpt2_encoding()
    prompt = encode_prompt(args.prompt, model.config.block_size)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rows = generate(model, idx, args.max_new_tokens, args.top_k, args.temperature, generator).tolist()
    skip = 0 if args.prompt else 1  # the <|endoftext|> start is not part of the text
    return [enc.decode(row[skip:]) for row in rows]
