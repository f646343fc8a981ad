"""The typed run configuration: the schema Hydra composes into, and the checks that run before any work.

Hydra validates key names and types against these dataclasses at composition; `validate` checks the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from gpt_exp.errors import ConfigError
from gpt_exp.tokenizer import EOT_TOKEN, encode_text

GPT2_VOCAB = EOT_TOKEN + 1  # the gpt2 encoding's ids are 0..EOT_TOKEN: a smaller embedding cannot look them up
SEED_END = 2**32  # numpy seeds in [0, 2**32) (torch and random take more): the one range every seed must fit
FP32_TINY = 1.1754944e-38  # the smallest normal float32: a smaller optim.eps rounds to 0 and divides 0 by 0
_LIST_KEYS = "`python -m gpt_exp.run --cfg job` lists every key"


def _require(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={'null' if value is None else value} is invalid: {fix}")  # as the user typed it


class DataSource(str, Enum):
    shakespeare = "shakespeare"  # tiny shakespeare, shipped inside the package
    text = "text"  # data.path: a UTF-8 file, or a folder of .txt, .jsonl, .jsonl.gz and .parquet files
    mix = "mix"  # data.sources: several such corpora, each with a weight (gpt_exp/data/mixture.py)


class DataOrder(str, Enum):
    sequential = "sequential"  # the lecture's DataLoaderLite: the stream front to back, every epoch alike
    shuffled = "shuffled"  # each epoch's (B, T) blocks in an order drawn from (train.seed, epoch)


class DeviceType(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"  # autocast: weights and optimizer stay fp32


class CpuMatmul(str, Enum):
    onednn = "onednn"  # fp32 linears in oneDNN: ~2.2x MKL on AMD CPUs (gpt_exp/cpu.py)
    blas = "blas"  # torch's own path (MKL): bit-for-bit what plain PyTorch computes


class Schedule(str, Enum):
    cosine = "cosine"
    constant = "constant"
    wsd = "wsd"  # warmup, stable, then a linear decay over the last optim.decay_fraction of the steps


class SaveModel(str, Enum):
    final = "final"  # model/ with the final weights (and model_best/ with the best val loss, when evaluating)
    best = "best"  # model/ with the weights of the best val loss (needs train.eval_every)
    none = "none"


class Strategy(str, Enum):
    ddp = "ddp"  # every rank holds the whole model; gradients are averaged
    fsdp = "fsdp"  # parameters, gradients and optimizer state sharded over the ranks (torch's fully_shard)


class LoggerMode(str, Enum):
    auto = "auto"  # online where W&B credentials exist, otherwise offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class SourceConfig:
    """One corpus of a data=mix mixture: what data=text reads at data.path, and its share of the training rows."""

    path: Optional[str] = None  # a UTF-8 file, or a folder of .txt, .jsonl, .jsonl.gz and .parquet files
    weight: float = 1.0  # relative to the other sources' weights; 0: evaluated only, never trained on
    text_key: Optional[str] = None  # the text field of its .jsonl and .parquet files; null: data.text_key

    def check(self, name: str) -> None:
        key = f"data.sources.{name}"
        _require(_SOURCE_NAME.fullmatch(name) is not None, "data.sources", f"{{{name}: ...}}",
                 "name a source with letters, digits, _ and - only (its metrics are keyed val_loss/NAME)")
        _require(bool(self.path), f"{key}.path", self.path, "give the source's text file or folder of files")
        _require(math.isfinite(self.weight) and self.weight >= 0, f"{key}.weight", self.weight,
                 "it must be a finite number >= 0 (0: the source is evaluated, never trained on)")
        _require(self.text_key is None or bool(self.text_key), f"{key}.text_key", "''",
                 "name the field that holds the text, or null for data.text_key")


_SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class DataConfig:
    source: DataSource = DataSource.shakespeare
    path: Optional[str] = None
    cache_dir: Optional[str] = None  # default: $XDG_CACHE_HOME/gpt_exp or ~/.cache/gpt_exp
    # documents held out for validation (spread evenly); a one-document corpus holds out the tail of its tokens
    val_fraction: float = 0.0
    text_key: str = "text"  # the field with a document's text in .jsonl, .jsonl.gz and .parquet files
    shard_tokens: int = 100_000_000  # tokens per cache shard (it ends at the next chunk boundary, <300K tokens later)
    threads: Optional[int] = None  # tokenizer threads when the cache is built; None: one per core
    shuffle_seed: Optional[int] = 0  # the shard order of every epoch after the first; None: the stored order
    order: DataOrder = DataOrder.sequential  # shuffled: each seed reads its own block order (replaces shuffle_seed)
    # data=mix: name -> path and weight, e.g. '{web: {path: a.jsonl.gz, weight: 3}, code: {path: b/, weight: 1}}'
    sources: Dict[str, SourceConfig] = field(default_factory=dict)

    def check(self) -> None:
        _require(self.shard_tokens >= 1, "data.shard_tokens", self.shard_tokens, "it must be >= 1, e.g. 100000000")
        _require(self.threads is None or self.threads >= 1, "data.threads", self.threads,
                 "it must be >= 1, or null for one per core")
        _require(0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction, "it must be in [0, 1)")
        _require(self.shuffle_seed is None or 0 <= self.shuffle_seed < SEED_END, "data.shuffle_seed", self.shuffle_seed,
                 f"it must be in [0, 2**32) = [0, {SEED_END - 1}], or null for the stored order")
        if self.source == DataSource.mix:
            self._check_mix()
            return
        _require(not self.sources, "data.sources", _names(self.sources),
                 f"only data=mix reads data.sources; add data=mix (now data={self.source.value})")
        if self.source == DataSource.text:
            _require(bool(self.path), "data.path", self.path, "data=text needs data.path=FILE_OR_DIR")
        else:
            _require(self.path is None, "data.path", self.path,
                     f"data={self.source.value} reads no path; add data=text to train on {self.path}")

    def _check_mix(self) -> None:
        _require(self.path is None, "data.path", self.path,
                 "data=mix reads each source's own path: data.sources.NAME.path=FILE_OR_DIR, not data.path")
        _require(bool(self.sources), "data.sources", "{}", "data=mix needs sources with weights, e.g. "
                 "data.sources='{web: {path: a.jsonl.gz, weight: 3}, code: {path: b/, weight: 1}}'")
        for name, source in self.sources.items():
            source.check(name)
        weights = {name: source.weight for name, source in self.sources.items()}
        _require(sum(weights.values()) > 0, "data.sources", _names(self.sources, "weight"),
                 "the weights sum to 0: give at least one source a weight > 0 (weight 0 is evaluated only)")

    def source_config(self, name: str) -> "DataConfig":
        """Source `name` of data=mix as a corpus of its own (data=text at its path): cached and split as one."""
        source = self.sources[name]
        return dataclasses.replace(self, source=DataSource.text, path=source.path, sources={},
                                   text_key=source.text_key or self.text_key)


def _names(sources: dict, field_name: str | None = None) -> str:
    """data.sources as the user would type it, e.g. {web: {weight: 0}, code: {weight: 0}}, or {web, code}."""
    if field_name is None:
        return "{" + ", ".join(sources) + "}"
    return "{" + ", ".join(f"{n}: {{{field_name}: {getattr(s, field_name):g}}}" for n, s in sources.items()) + "}"


# model.parametrization's choices; mup's width rules hold under both of the scaled ones
PARAMETRIZATIONS = ("sp", "mup", "completep")
WIDTH_SCALED = ("mup", "completep")

# The settings that fix the shape of a model's weights: a checkpoint loads only into a model with the same ones.
MODEL_SHAPE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")


@dataclass
class ModelConfig:
    name: str = "gpt2"
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # auto|true|false: the embedding padded to a multiple of 64 rows (50304), never sampled; auto: on CUDA only
    pad_vocab: str = "auto"
    # sp: standard GPT-2; mup: maximal-update parametrization (Tensor Programs V), widths measured against
    # mup_base_width, so that the best optim.lr found at the base width transfers to wider models
    parametrization: str = "sp"
    mup_base_width: int = 64
    # muP's base multipliers (microsoft/mup's output_mult, attn_mult and the embedding lr's), tuned at the base width
    # and kept at every width; 1.0: none. Under mup only
    mup_output_mult: float = 1.0  # the logits times mup_output_mult / m
    mup_attn_mult: float = 1.0  # attention scores q.k times mup_attn_mult / d_head
    mup_embed_lr_mult: float = 1.0  # the embeddings' lr (wte, tied to lm_head, and wpe) times this
    # completep: mup's width rules plus CompleteP's depth rules (Dey et al. 2025), depths measured against depth_base,
    # so that the best optim.lr found at the base depth transfers to deeper models. Under completep only
    depth_base: int = 2  # L_base: the n_layer at which completep's residual branches and lrs are mup's
    depth_alpha: float = 1.0  # each residual branch times (depth_base / n_layer)^alpha: 1 CompleteP, 0.5 depth-muP
    # The architecture, each default GPT-2's (conf/model/modern.yaml: nanochat's choices)
    pos: str = "learned"  # learned (a position embedding, wpe) or rope (rotary q and k, no wpe)
    rope_theta: float = 10000.0  # rope's base: the slowest pair turns by 1/rope_theta per position
    norm: str = "layernorm"  # layernorm or rmsnorm, before each block's attention and MLP and before lm_head
    norm_gain: bool = True  # the norms' learned gain (false: nanochat's parameter-free RMSNorm)
    qk_norm: bool = False  # q and k normed per head (the same norm) before the scores
    mlp: str = "gelu"  # gelu or relu2 (hidden 4C), or swiglu (hidden round(8C/3): the 4C MLP's parameters)
    bias: bool = True  # biases in the Linears and LayerNorms
    tie_embeddings: bool = True  # lm_head reuses the token embedding
    logit_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap), e.g. 15; null: none
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query attention); null: n_head
    value_embeddings: bool = False  # nanochat's gated value embeddings (a vocab x kv table) on alternating layers
    zero_init_proj: bool = False  # attention's and the MLP's output projections start at zero

    def check(self) -> None:
        for key in MODEL_SHAPE:
            _require(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "it must be >= 1")
        _require(self.vocab_size >= GPT2_VOCAB, "model.vocab_size", self.vocab_size,
                 f"the gpt2 tokenizer has {GPT2_VOCAB} tokens; use model.vocab_size>={GPT2_VOCAB} "
                 f"(to pad the embedding for speed, keep it and set model.pad_vocab=true)")
        _require(str(self.pad_vocab).lower() in ("auto", "true", "false"), "model.pad_vocab", self.pad_vocab,
                 "use auto (pad on CUDA only), true or false")
        _require(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd,
                 f"it must be divisible by model.n_head={self.n_head}")
        _require(str(self.parametrization) in PARAMETRIZATIONS, "model.parametrization", self.parametrization,
                 "use sp, mup or completep")
        _require(self.mup_base_width >= 1, "model.mup_base_width", self.mup_base_width, "it must be >= 1, e.g. 64")
        for key in ("mup_output_mult", "mup_attn_mult", "mup_embed_lr_mult"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value > 0, f"model.{key}", value, "it must be a finite number > 0, e.g. 1.0")
            _require(value == 1.0 or str(self.parametrization) in WIDTH_SCALED, f"model.{key}", value,
                     "it scales muP's model: set model.parametrization=mup (or completep), or leave it at 1.0")
        _require(self.depth_base >= 1, "model.depth_base", self.depth_base, "it must be >= 1, e.g. 2")
        _require(0.5 <= self.depth_alpha <= 1, "model.depth_alpha", self.depth_alpha,  # nan fails the comparison
                 "it must be in [0.5, 1]: 1 for CompleteP, 0.5 for depth-muP")
        for key, default in (("depth_base", 2), ("depth_alpha", 1.0)):
            _require(getattr(self, key) == default or str(self.parametrization) == "completep", f"model.{key}",
                     getattr(self, key), f"it scales CompleteP's model: set model.parametrization=completep, or "
                                         f"leave it at {default}")
        # the architecture settings, alone and together: an impossible model is one line before any work
        for key, choices in (("pos", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                             ("mlp", ("gelu", "relu2", "swiglu"))):
            _require(str(getattr(self, key)) in choices, f"model.{key}", getattr(self, key), f"use {' or '.join(choices)}")
        n_kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        _require(n_kv >= 1 and self.n_head % n_kv == 0, "model.n_kv_head", self.n_kv_head,
                 f"it must divide model.n_head={self.n_head} (each key/value head serves n_head/n_kv_head queries), "
                 f"e.g. model.n_kv_head={self.n_head}, or null for n_head")
        head_dim = self.n_embd // self.n_head
        _require(str(self.pos) != "rope" or head_dim % 2 == 0, "model.pos", self.pos,
                 f"rope rotates pairs of a head's features, and model.n_embd/model.n_head={head_dim} is odd; "
                 f"use an even head size or model.pos=learned")
        _require(math.isfinite(self.rope_theta) and self.rope_theta > 1, "model.rope_theta", self.rope_theta,
                 "it must be a finite number > 1, e.g. 10000")
        _require(self.logit_softcap is None or (math.isfinite(self.logit_softcap) and self.logit_softcap > 0),
                 "model.logit_softcap", self.logit_softcap, "it must be a finite number > 0, e.g. 15, or null for none")


# Settings a resume cannot change: the weights' shape, and what their values mean (muP's scales are set by its
# parametrization and base width; another would silently rescale the logits and every lr).
MODEL_FIXED = (*MODEL_SHAPE, "parametrization", "mup_base_width", "mup_output_mult", "mup_attn_mult",
               "depth_base", "depth_alpha",  # CompleteP's residual multiplier (and its lrs and Adam eps)
               # the architecture: which weights there are and what they compute (zero_init_proj is the init only)
               "pos", "rope_theta", "norm", "norm_gain", "qk_norm", "mlp", "bias", "tie_embeddings", "logit_softcap",
               "n_kv_head", "value_embeddings")


@dataclass
class DeviceConfig:
    type: DeviceType = DeviceType.auto
    dtype: DType = DType.auto
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs; no effect on CPU
    compile: Optional[bool] = None  # None: torch.compile on CUDA only
    threads: Optional[int] = None  # torch CPU threads; None: the cores, shared out between parallel joblib jobs
    cpu_matmul: CpuMatmul = CpuMatmul.onednn  # which library runs fp32 matmuls on a CPU

    def check(self) -> None:
        _require(self.threads is None or self.threads >= 1, "device.threads", self.threads,
                 "it must be >= 1, or null for all cores")


@dataclass
class TrainConfig:
    max_steps: Optional[int] = 50  # optimizer steps; or null with train.max_tokens (exactly one of the two)
    max_tokens: Optional[int] = None  # a budget in tokens (steps = ceil(max_tokens / tokens per step)), e.g. to compare batch shapes
    ckpt_every: int = 0  # N > 0: a checkpoint every N steps, at the end, and when interrupted; 0: none
    keep_ckpts: int = 2  # the newest K checkpoints are kept
    strategy: Strategy = Strategy.ddp  # with several processes (torchrun): ddp, or fsdp for models too big for one GPU
    seed: int = 1337
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    total_batch_size: Optional[int] = None  # tokens per optimizer step; None: one micro-batch (B*T)
    autobatch_probe_s: float = 60.0  # B=auto on a CPU: the probe's time limit (a busy machine may need more)
    overfit_batches: int = 0  # N > 0: cycle the first N batches (the lecture's "overfit one batch")
    log_every: int = 1  # steps between progress updates; metrics.jsonl gets every step
    eval_every: int = 0  # N > 0: the val loss every N steps and at the end (needs data.val_fraction > 0)
    eval_batches: int = 20  # (B, T) batches of the val split per evaluation
    sample_every: int = 0  # N > 0: a few samples every N steps and at the end (the `sample` section says which)
    hellaswag_every: int = 0  # N > 0: HellaSwag acc every N steps and at the end (needs eval.hellaswag_path)
    core_every: int = 0  # N > 0: CORE every N steps and at the end (needs eval.core_bundle)
    skip_nonfinite: int = 0  # steps with a NaN/inf loss or gradient norm skipped (not applied) before the run stops
    save_model: SaveModel = SaveModel.final  # the weights a run leaves as a Hugging Face GPT-2 dir in its run dir

    def check(self) -> None:
        _require((self.max_steps is None) != (self.max_tokens is None), "train.max_tokens", self.max_tokens,
                 f"give exactly one of train.max_steps (now {'null' if self.max_steps is None else self.max_steps}) "
                 f"and train.max_tokens: e.g. train.max_tokens=1000000 alone")
        for key in ("max_steps", "max_tokens"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"train.{key}", value, "it must be >= 1")
        _require(0 <= self.seed < SEED_END, "train.seed", self.seed,
                 f"it must be in [0, 2**32) = [0, {SEED_END - 1}], e.g. 1337")
        # floats: `nan >= 0` is False but `inf >= 0` is True, so a bound alone lets inf through
        _require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "train.grad_clip", self.grad_clip,
                 "it must be a finite number >= 0 (0 disables clipping)")
        _require(self.overfit_batches >= 0, "train.overfit_batches", self.overfit_batches, "it must be >= 0 (0: off)")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "it must be >= 1")
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every, "it must be >= 0 (0: no evaluation)")
        _require(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, "it must be >= 1")
        _require(self.skip_nonfinite >= 0, "train.skip_nonfinite", self.skip_nonfinite,
                 "it must be >= 0 (0: stop at the first)")
        _require(self.ckpt_every >= 0, "train.ckpt_every", self.ckpt_every, "it must be >= 0 (0: no checkpoints)")
        _require(self.keep_ckpts >= 1, "train.keep_ckpts", self.keep_ckpts, "keep at least 1 checkpoint")
        _require(self.autobatch_probe_s > 0, "train.autobatch_probe_s", self.autobatch_probe_s,
                 "it must be > 0 seconds, e.g. 120 on a busy machine")
        for key in ("sample_every", "hellaswag_every", "core_every"):
            _require(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "it must be >= 0 (0: never)")
        _require(self.save_model != SaveModel.best or self.eval_every > 0, "train.save_model", self.save_model.value,
                 "best needs a val loss: set train.eval_every=N (and data.val_fraction), or train.save_model=final")

    def steps(self, tokens_per_step: int) -> int:
        """The optimizer steps of the run: train.max_steps, or the steps that reach train.max_tokens at this batch
        shape (the last step may pass it)."""
        return self.max_steps or math.ceil(self.max_tokens / tokens_per_step)


class OptimizerName(str, Enum):
    adamw = "adamw"  # AdamW on every parameter (the lecture's)
    muon = "muon"  # Muon on the blocks' 2-D matrices, AdamW on embeddings, gains and biases (gpt_exp/optim.py)


class MuonAdjustLR(str, Enum):
    # torch.optim.Muon's adjust_lr_fn: how the orthogonalized update is scaled for a matrix's shape
    match_rms_adamw = "match_rms_adamw"  # Moonlight's 0.2*sqrt(max(A, B)): updates of AdamW's RMS, so AdamW's lr fits
    original = "original"  # Keller Jordan's sqrt(max(1, A/B)): lr ~0.02 as in modded-nanogpt


MUON_FSDP_ERROR = "optim=muon is not supported with train.strategy=fsdp; use train.strategy=ddp or optim=adamw"


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: Schedule = Schedule.cosine
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps that decays to min_lr
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # optim=muon only (conf/optim/muon.yaml says what they mean)
    # the Muon matrices' peak lr (optim.lr is the AdamW part's; the schedule scales both alike). Optional only so that
    # the config of a run from before, which kept null here, still reads; validate refuses null with optim=muon
    muon_lr: Optional[float] = 0.01
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_adjust_lr: MuonAdjustLR = MuonAdjustLR.match_rms_adamw

    def check(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", self.lr,
                 "the learning rate must be > 0, e.g. optim.lr=6e-4")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "it must be in [0, 1]")  # nan fails
        _require(0 < self.decay_fraction <= 1, "optim.decay_fraction", self.decay_fraction,
                 "it must be in (0, 1], e.g. 0.2")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "it must be >= 0")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
                 "it must be a finite number >= 0, e.g. 0.1")
        _require(math.isfinite(self.eps) and self.eps >= FP32_TINY, "optim.eps", self.eps,
                 f"it must be a finite number >= {FP32_TINY:.2g} (smaller rounds to 0 in float32), e.g. 1e-8")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),  # nan and inf fail the comparison
                 "optim.betas", list(self.betas), "give two values in [0, 1), e.g. 'optim.betas=[0.9,0.95]'")
        if self.name == OptimizerName.muon:
            _require(self.muon_lr is not None, "optim.muon_lr", self.muon_lr, "give the matrices' own peak lr, e.g. "
                     "optim.muon_lr=0.01 (optim.lr is the AdamW part's: embeddings, gains, biases)")
        _require(self.muon_lr is None or (math.isfinite(self.muon_lr) and self.muon_lr > 0), "optim.muon_lr",
                 self.muon_lr, "it must be > 0, e.g. 0.01")
        _require(0 <= self.muon_momentum < 1, "optim.muon_momentum", self.muon_momentum,
                 "it must be in [0, 1), e.g. 0.95")


@dataclass
class SampleConfig:
    """What train.sample_every writes (run.log, samples.jsonl, a W&B table)."""

    prompts: List[str] = field(default_factory=lambda: ["Hello, I'm a language model,"])
    max_new_tokens: int = 32
    num_samples: int = 2  # per prompt
    top_k: int = 50
    temperature: float = 1.0
    seed: int = 42  # the same seed each time: samples differ only because the model learned

    def check(self) -> None:
        _require(len(self.prompts) >= 1, "sample.prompts", list(self.prompts),
                 "give at least one, e.g. 'sample.prompts=[ROMEO:]'")
        for key in ("max_new_tokens", "num_samples", "top_k"):
            _require(getattr(self, key) >= 1, f"sample.{key}", getattr(self, key), "it must be >= 1")
        _require(math.isfinite(self.temperature) and self.temperature > 0, "sample.temperature", self.temperature,
                 "it must be > 0 and finite, e.g. 1.0 (below 1e-5: always the likeliest token)")
        _require(0 <= self.seed < SEED_END, "sample.seed", self.seed, f"it must be in [0, 2**32) = [0, {SEED_END - 1}]")


@dataclass
class EvalConfig:
    hellaswag_path: Optional[str] = None  # a local copy of the official hellaswag_val.jsonl
    hellaswag_limit: int = 0  # the first N examples (0: all 10,042)
    core_bundle: Optional[str] = None  # a local DCLM eval bundle dir (core.yaml, eval_meta_data.csv, eval_data/)
    core_limit: int = 0  # N > 0: each task's first N rows after a fixed shuffle (0: all)

    def check(self) -> None:
        _require(self.hellaswag_limit >= 0, "eval.hellaswag_limit", self.hellaswag_limit, "it must be >= 0 (0: all)")
        _require(self.core_limit >= 0, "eval.core_limit", self.core_limit, "it must be >= 0 (0: every row)")


@dataclass
class LoggerConfig:
    mode: LoggerMode = LoggerMode.auto
    project: str = "gpt_exp"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None  # default: the run dir, relative to outputs/
    tags: List[str] = field(default_factory=list)


@dataclass
class RunConfig:
    B: Any = 4  # micro-batch size (sequences), or auto: the largest that fits (CUDA), the fastest per token (CPU)
    T: int = 32  # sequence length (tokens)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: Optional[str] = None  # a run dir or checkpoint file to continue from; auto: this run dir's newest, if any
    init_from: Optional[str] = None  # weights only (fresh optimizer, step 0): RUN_DIR, a checkpoint .pt, or hf:DIR


def register_schema() -> None:
    """Make `run_schema` available to conf/config.yaml's defaults list. Hydra closes every mapping to new keys (struct
    mode); data.sources is left open to the user's source names, each still checked as a SourceConfig."""
    schema = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(schema.data.sources, False)
    ConfigStore.instance().store(name="run_schema", node=schema)


def schema_keys(node: type = RunConfig, prefix: str = "") -> list[str]:
    """Every key of the schema, e.g. ["B", "T", "data.source", ...]."""
    keys = []
    for f in dataclasses.fields(node):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):  # a section
            keys += schema_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def unknown_key(key: str) -> str:
    """The line for a key the schema lacks, with the key the user most likely meant."""
    keys = schema_keys()
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]  # `seed` for `train.seed`
    close = same_name or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"check the spelling; {_LIST_KEYS}"
    return f"unknown config key '{key}'; {hint}"


def _added_keys(node: object, prefix: str = "") -> list[str]:
    """Keys that `+key=value` or `++key=value` added: Hydra lets them through and the run would never read them.
    At the top level only a schema key's name counts (`+seed=1`); other new top-level keys are the user's notes."""
    fields = {f.name for f in dataclasses.fields(node)}
    added = [prefix + k for k in vars(node) if k not in fields]
    if not prefix:
        leaf_names = {k.rsplit(".", 1)[-1] for k in schema_keys()}
        added = [k for k in added if k in leaf_names]
    for name in fields:
        if dataclasses.is_dataclass(section := getattr(node, name)):
            added += _added_keys(section, f"{prefix}{name}.")
    return added


def validate(cfg: RunConfig) -> None:
    """Check every value that types alone cannot, before any work starts: each section's own checks, then the few
    that span sections."""
    if added := _added_keys(cfg):
        raise ConfigError(unknown_key(added[0]))
    m, t, o = cfg.model, cfg.train, cfg.optim
    for section in (cfg.data, m, cfg.device, t, o, cfg.sample, cfg.eval):
        section.check()
    _require(not (str(m.parametrization) in WIDTH_SCALED and o.name == OptimizerName.muon), "model.parametrization",
             m.parametrization, f"muP's per-width AdamW lrs are not defined for optim=muon (Muon scales its updates "
             f"by shape itself): use optim=adamw with {m.parametrization}, or sp with muon")
    if o.name == OptimizerName.muon and t.strategy == Strategy.fsdp:
        raise ConfigError(MUON_FSDP_ERROR)  # Newton-Schulz needs whole matrices, not FSDP's row shards
    auto_B = cfg.B == "auto"
    _require(auto_B or (isinstance(cfg.B, int) and not isinstance(cfg.B, bool) and cfg.B >= 1), "B", cfg.B,
             "the batch size must be an integer >= 1, e.g. B=4, or B=auto")
    _require(cfg.T >= 1, "T", cfg.T, "the sequence length must be >= 1, e.g. T=32")
    _require(cfg.T <= m.block_size, "T", cfg.T, f"it exceeds model.block_size={m.block_size}; use T<={m.block_size}")
    if auto_B:
        _require(t.total_batch_size is not None and t.total_batch_size >= cfg.T and t.total_batch_size % cfg.T == 0,
                 "train.total_batch_size", t.total_batch_size, f"B=auto keeps the tokens per step: give them as a "
                 f"multiple of T={cfg.T}, e.g. train.total_batch_size={64 * cfg.T}")
    elif t.total_batch_size is not None:
        micro = cfg.B * cfg.T
        _require(t.total_batch_size >= micro and t.total_batch_size % micro == 0, "train.total_batch_size",
                 t.total_batch_size, f"it must be a positive multiple of B*T={micro} (or null for one micro-batch)")
    _require(t.overfit_batches == 0 or cfg.data.source != DataSource.mix, "train.overfit_batches", t.overfit_batches,
             "it cycles one corpus's first batches; with data=mix use train.overfit_batches=0")
    _require(t.eval_every == 0 or cfg.data.val_fraction > 0, "train.eval_every", t.eval_every,
             f"there is no val split (data.val_fraction={cfg.data.val_fraction}); set data.val_fraction=0.1")
    _require(t.hellaswag_every == 0 or cfg.eval.hellaswag_path is not None, "train.hellaswag_every", t.hellaswag_every,
             "it needs the examples: eval.hellaswag_path=PATH/hellaswag_val.jsonl (the official file, local)")
    _require(t.core_every == 0 or cfg.eval.core_bundle is not None, "train.core_every", t.core_every,
             "it needs the tasks: eval.core_bundle=DIR (a local DCLM eval bundle: core.yaml, eval_meta_data.csv, "
             "eval_data/)")
    if t.sample_every:
        for prompt in cfg.sample.prompts:  # a prompt must leave room for new tokens in the model's context
            n = len(encode_text(prompt)) if len(prompt.encode()) >= m.block_size else 0  # tokens <= bytes
            _require(n < m.block_size, "sample.prompts", f"[{prompt[:20]}...]", f"a prompt of {n} tokens fills "
                     f"model.block_size={m.block_size}; give a shorter one")


def unflatten(flat: dict) -> dict:
    """{"optim.lr": 0.0006} as {"optim": {"lr": 0.0006}}."""
    tree: dict = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def known_settings(tree: dict) -> dict:
    """The flat settings of `tree` that this version's schema has (a checkpoint of an older one may hold others); the
    keys inside a mapping of the schema (data.sources.web.weight) count as its own."""
    known = set(schema_keys())
    return {k: v for k, v in flatten(tree).items() if k in known or k.startswith(tuple(f"{m}." for m in MAPPINGS))}


MAPPINGS = ("data.sources",)  # the schema's mappings: their keys are the user's names


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as {"optim.lr": 0.0006, ...}, keys in config order."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def inert_settings(flat: dict) -> set[str]:
    """The keys of a flattened run config that the run recorded but did not use: Muon's settings under another
    optimizer, rope_theta without rope, muP's multipliers under sp, CompleteP's depth settings under another
    parametrization. An AdamW run's optim.muon_lr is no setting of it, so runs that differ only there are alike."""
    model = flat.get("model.parametrization", "sp")
    unused = (("optim.muon_", flat.get("optim.name", "adamw") != "muon"),
              ("model.rope_theta", flat.get("model.pos", "learned") != "rope"),
              ("model.mup_", model not in WIDTH_SCALED),
              ("model.depth_", model != "completep"))
    return {key for key in flat for prefix, is_unused in unused if is_unused and key.startswith(prefix)}
