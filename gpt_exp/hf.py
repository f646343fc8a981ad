"""Hugging Face GPT-2 checkpoints: load a `GPT2LMHeadModel` dir (any size) into our GPT, and write ours as one; a
Llama-shaped GPT of ours (rope, RMSNorm, SwiGLU, GQA: model.* settings) is written as a `LlamaForCausalLM` dir.

`transformers` is not needed: weights are read and written with the `safetensors` library, and the tokenizer
files an export carries are the gpt2 BPE files gpt_exp ships, under their Hugging Face names. A padded model
(model.pad_vocab) is exported without its padding, as GPT-2's 50257 tokens, and an import can be padded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt_exp.atomic import atomic_path, atomic_write_bytes, make_temp_dir, remove_stale_temp_files
from gpt_exp.errors import ConfigError, UserError
from gpt_exp.model import RMS_EPS, GPT, GPTConfig, fit_padding, padded_vocab
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_bpe_files

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"  # what save_pretrained writes for a sharded (large) model
PYTORCH_BIN = "pytorch_model.bin"
STEP_KEY = "gpt_exp_step"  # in config.json: the training step a run's weights are from (transformers ignores it)
_FIX = "give a Hugging Face GPT-2 dir (config.json + model.safetensors), e.g. one `python -m gpt_exp.export` writes"
# HF's GPT-2 uses Conv1D, which stores these weights as (in, out): nn.Linear's transpose.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers older GPT-2 files carry: not weights, our attention builds its mask.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # HF's names for the GELU our MLP uses


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file. safe_open maps the file into memory (a 6 GB model is not read into
    Python bytes) and validates its header and offsets; a damaged file is one line naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise ConfigError(f"{path} is not a readable safetensors file ({reason}); "
                          f"export or download it again") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e}); check the file and its permissions") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`tensors` as a .safetensors file, written atomically; `format: pt` is what transformers checks for."""
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(cpu, tmp, metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors (a full disk) carry the errno only in the text
            errno = re.search(r"\(os error (\d+)\)", str(e))
            if errno is None:
                raise
            raise OSError(int(errno[1]), os.strerror(int(errno[1])), str(path)) from None


def gpt_config(shape: dict, source: str, fix: str, padded_vocab_size: int | None = None) -> GPTConfig:
    """A GPTConfig from `shape`: the block size, vocab size, n_layer, n_head and n_embd in that order, named as
    the file names them, each checked, or one line naming the bad value (not a crash inside the model).
    `padded_vocab_size`: the embedding rows, if more than the vocab size (fewer are ignored: the weights' check
    then names the mismatch)."""
    bad = {k: v for k, v in shape.items() if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)}
    if bad:
        raise ConfigError(f"{source} lacks the GPT-2 shape ({', '.join(f'{k}={v!r}' for k, v in bad.items())} "
                          f"must be positive integers); {fix}")
    if shape["n_embd"] % shape["n_head"]:
        raise ConfigError(f"{source} has n_embd={shape['n_embd']}, not divisible by n_head={shape['n_head']}; {fix}")
    rows = padded_vocab_size if padded_vocab_size and padded_vocab_size > shape["vocab_size"] else None
    return GPTConfig(*shape.values(), padded_vocab_size=rows)


def load_checked_weights(model: GPT, state: object, source: str, fix: str) -> None:
    """`state` (a state_dict in our names) into `model`, or one line saying how it differs from the model's shape:
    the weights of another model, or not a state_dict at all. lm_head may be left out: it is tied to wte. The
    embedding's padding may differ from the model's (fit_padding): a Hugging Face file's loads into a padded model."""
    if not isinstance(state, dict):
        raise ConfigError(f"{source} holds a {type(state).__name__}, not a model's weights; {fix}")
    state = fit_padding(state, model.config)
    expected = model.state_dict()
    tied = "lm_head.weight" not in state
    if tied:
        del expected["lm_head.weight"]
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong_shape = [n for n in expected.keys() & state.keys()
                   if not isinstance(state[n], torch.Tensor) or state[n].shape != expected[n].shape]
    if missing or unexpected or wrong_shape:
        first = sorted(missing)[:1] + sorted(map(str, unexpected))[:1] + sorted(wrong_shape)[:1]
        raise ConfigError(f"{source} ({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} of "
                          f"another shape, e.g. {', '.join(first)}); {fix}")
    # load_state_dict copies into our fp32 parameters, so fp16/bf16 files load too
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]} if tied else state)


def _read_config(path: Path) -> GPTConfig:
    try:
        config = json.loads((path / "config.json").read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path} has no config.json, so it is not a Hugging Face model dir; {_FIX}") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise ConfigError(f"{path}/config.json is not JSON ({e}); {_FIX}") from None
    except OSError as e:
        raise ConfigError(f"{path}/config.json cannot be read ({e.strerror}); {_FIX}") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "gpt2":
        raise ConfigError(f"{path} holds a model_type={kind} model, not GPT-2; {_FIX}")
    shape = {key: config.get(key) for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")}
    gpt = gpt_config(shape, f"{path}/config.json", _FIX)
    epsilon = config.get("layer_norm_epsilon", 1e-5)
    if not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)):
        raise ConfigError(f"{path}/config.json has layer_norm_epsilon={epsilon!r}, not a number; {_FIX}")
    # Settings our GPT does not implement would load without error and give other logits.
    differs = {"activation_function": config.get("activation_function", "gelu_new") not in _TANH_GELU,
               "n_inner": config.get("n_inner") not in (None, 4 * gpt.n_embd),
               "layer_norm_epsilon": abs(epsilon - 1e-5) > 1e-12,
               "scale_attn_by_inverse_layer_idx": bool(config.get("scale_attn_by_inverse_layer_idx")),
               "tie_word_embeddings": config.get("tie_word_embeddings", True) is False}
    unsupported = [f"{key}={config.get(key)}" for key, bad in differs.items() if bad]
    if unsupported:
        raise ConfigError(f"{path}/config.json sets {', '.join(unsupported)}, which gpt_exp's GPT does not implement; "
                          f"only standard GPT-2 models (gpt2, gpt2-medium, -large, -xl and their fine-tunes) load")
    return gpt


def recorded_step(path: Path) -> int | None:
    """The training step save_hf_gpt2 recorded in `path`/config.json; None when it recorded none (an older gpt_exp,
    another tool's dir) or the file cannot say (the loader names what is wrong with it)."""
    try:
        step = json.loads((path / "config.json").read_bytes()).get(STEP_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return step if type(step) is int and step >= 0 else None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS).is_file():
        return read_safetensors(path / SAFETENSORS)
    if (path / SAFETENSORS_INDEX).is_file():
        index = path / SAFETENSORS_INDEX
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not all(isinstance(s, str) for s in shards):
                raise ValueError("its weight_map names a shard that is not a file name")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{index} cannot be read ({type(e).__name__}: {e}); download it again") from None
        absent = [shard for shard in shards if not (path / shard).is_file()]
        if absent:
            raise ConfigError(f"{path} is a partial download: {len(absent)} of the {len(shards)} shards that "
                              f"{SAFETENSORS_INDEX} names are missing (e.g. {absent[0]}); download them again")
        return {name: t for shard in shards for name, t in read_safetensors(path / shard).items()}
    if (path / PYTORCH_BIN).is_file():
        try:
            weights = torch.load(path / PYTORCH_BIN, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: whatever torch raises is the user's
            raise ConfigError(f"{path / PYTORCH_BIN} is not a readable PyTorch weights file ({type(e).__name__}); "
                              f"download or export it again") from None
        if not isinstance(weights, dict):
            raise ConfigError(f"{path / PYTORCH_BIN} holds a {type(weights).__name__}, not a model's weights; "
                              f"download or export it again")
        return weights
    raise ConfigError(f"{path} has config.json but no weights ({SAFETENSORS} or {PYTORCH_BIN}); "
                      f"copy the weight file into it, or export the model again")


def _to_gpt_state_dict(hf_weights: dict) -> dict:
    """HF names and layouts -> ours: the `transformer.` prefix, Linear (out, in) weights, no mask buffers."""
    state = {}
    for name, tensor in hf_weights.items():
        name = str(name)
        if name.endswith(_BUFFERS) or name == "lm_head.weight":  # lm_head is tied to wte, which we load
            continue
        name = name if name.startswith("transformer.") else f"transformer.{name}"
        conv1d = name.endswith(_CONV1D) and isinstance(tensor, torch.Tensor) and tensor.dim() == 2
        state[name] = tensor.t() if conv1d else tensor
    return state


def load_hf_gpt2(path: str | Path, pad_vocab: bool = False) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 dir (config.json + model.safetensors or pytorch_model.bin);
    `pad_vocab`: its embedding padded with zero rows to a multiple of 64 (the logits stay the same)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist; {_FIX}")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not a dir; {_FIX}")
    config = _read_config(path)
    model = GPT(dataclasses.replace(config, padded_vocab_size=padded_vocab(config.vocab_size, pad_vocab)))
    state = _to_gpt_state_dict(_read_weights(path))
    load_checked_weights(model, state, f"{path}'s weights do not match its config.json",
                         "the weight file belongs to another model: download or export the dir again")
    return model


def hf_config(config: GPTConfig) -> dict:
    """A GPT2Config as transformers writes it, for our model: no dropout (we train without), GPT-2's tanh GELU."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "use_cache": True,
    }


def llama_blockers(config: GPTConfig) -> list[str]:
    """The settings of `config` that transformers' LlamaForCausalLM cannot represent (empty: it exports as Llama).
    Llama is rotary positions, RMSNorm (a gain-less one exports with gains of 1), SwiGLU, any n_kv_head, biases in
    every projection or none, tied or untied; ReLU^2, QK-norm (Qwen3's), softcapping (Gemma 2's, with other parts),
    value embeddings and muP's scales have no stock class that combines them with the rest."""
    wanted = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False, "logit_softcap": None,
              "value_embeddings": False, "parametrization": "sp"}
    return [f"model.{key}={_setting(getattr(config, key))}" for key, value in wanted.items()
            if getattr(config, key) != value]


def _setting(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def llama_config(config: GPTConfig) -> dict:
    """A LlamaConfig as transformers 5 writes it, for our Llama-shaped model (llama_blockers empty)."""
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.block_size, "rms_norm_eps": RMS_EPS,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"}, "rope_theta": config.rope_theta,
        "attention_bias": config.bias, "mlp_bias": config.bias, "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN,
    }


def llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our Llama-shaped model's weights under LlamaForCausalLM's names: c_attn split into q, k, v, c_fc into gate and
    up (our order), the real vocabulary's rows only, gains of 1 for gain-less norms."""
    c = model.config
    state = model.state_dict()
    kv_dim = c.n_kv_head * c.head_dim
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"][: c.vocab_size]}

    def norm(ours: str, theirs: str) -> None:
        out[f"{theirs}.weight"] = state.get(f"{ours}.weight", torch.ones(c.n_embd))

    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}", f"model.layers.{i}"
        norm(f"{ours}.ln_1", f"{theirs}.input_layernorm")
        norm(f"{ours}.ln_2", f"{theirs}.post_attention_layernorm")
        sizes = (c.n_embd, kv_dim, kv_dim)
        for kind in ("weight", "bias") if c.bias else ("weight",):
            for name, t in zip(("q_proj", "k_proj", "v_proj"), state[f"{ours}.attn.c_attn.{kind}"].split(sizes)):
                out[f"{theirs}.self_attn.{name}.{kind}"] = t
            out[f"{theirs}.self_attn.o_proj.{kind}"] = state[f"{ours}.attn.c_proj.{kind}"]
            gate, up = state[f"{ours}.mlp.c_fc.{kind}"].chunk(2)
            out.update({f"{theirs}.mlp.gate_proj.{kind}": gate, f"{theirs}.mlp.up_proj.{kind}": up,
                        f"{theirs}.mlp.down_proj.{kind}": state[f"{ours}.mlp.c_proj.{kind}"]})
    norm("transformer.ln_f", "model.norm")
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][: c.vocab_size]
    return out


def save_hf(model: GPT, out_dir: str | Path, step: int | None = None) -> Path:
    """`model` as the Hugging Face dir of its architecture: GPT-2's (save_hf_gpt2) or Llama's (rope, RMSNorm,
    SwiGLU: LlamaForCausalLM); any other is refused in one line naming the settings no transformers class holds."""
    if model.config.is_gpt2:
        return save_hf_gpt2(model, out_dir, step)
    if blockers := llama_blockers(model.config):
        raise ConfigError(f"export writes GPT-2's or Llama's architecture, and no transformers class represents "
                          f"{', '.join(blockers)}; sample and eval read its checkpoints directly")
    return _write_hf_dir(llama_tensors(model), hf_files(model.config, step, llama_config(model.config)), out_dir)


def hf_files(config: GPTConfig, step: int | None = None, model_config: dict | None = None) -> dict[str, bytes]:
    """Every file of an export but the weights: the model's config, its generation defaults, and GPT-2's tokenizer
    (gpt_exp's own BPE files), so that `AutoTokenizer` and `pipeline("text-generation", model=DIR)` work on the
    dir. transformers 5 given a dir without them builds an empty tokenizer and generates nothing, without error."""
    eot = "<|endoftext|>"
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    tokenizer = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size, **special,
                 "add_prefix_space": False}
    generation = {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}
    bpe = gpt2_bpe_files()
    model_config = model_config or hf_config(config)  # GPT-2's unless given (llama_config)
    model_config = model_config if step is None else {**model_config, STEP_KEY: step}
    return {"config.json": _json_bytes(model_config), "generation_config.json": _json_bytes(generation),
            "vocab.json": bpe["encoder.json"], "merges.txt": bpe["vocab.bpe"],
            "tokenizer_config.json": _json_bytes(tokenizer), "special_tokens_map.json": _json_bytes(special)}


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` if a new export may go there: it does not exist yet, or is an empty dir. A dir with files in it
    is refused: they may be the user's (another model, notes), and an export never overwrites or mixes with them."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a new dir to write config.json and {SAFETENSORS} into")
    above = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())  # "/": itself
    if not above.is_dir():
        raise ConfigError(f"{above} is a file, so {out_dir} cannot be created; give a new dir to export into")
    if out_dir.is_dir() and (held := sorted(p.name for p in out_dir.iterdir())):
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ConfigError(f"{out_dir} already holds files ({shown}); export into a new or empty dir, so that "
                          f"nothing in it is overwritten")
    return out_dir


def save_hf_gpt2(model: GPT, out_dir: str | Path, step: int | None = None,
                 elsewhere: str = "export elsewhere") -> Path:
    """Write `model` as a Hugging Face GPT-2 dir (model.safetensors, config.json, generation_config.json and the
    tokenizer's vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) that
    `GPT2LMHeadModel.from_pretrained(out_dir)`, `AutoTokenizer` and `pipeline` load; returns the dir. `out_dir` must
    be new or empty; the files are written into a hidden temp dir beside it, renamed into place once all are whole,
    so an export that fails midway (a full disk, Ctrl-C) leaves no dir that looks complete. `step`: the training step
    the weights are from, recorded in config.json (recorded_step reads it back); `elsewhere`: the last fix a failed
    write names (a run writes its weights elsewhere with hydra.run.dir, not by exporting)."""
    if not model.config.is_gpt2:
        raise ConfigError("export writes GPT-2's architecture only, and this model has another (model.pos, "
                          "model.norm, model.mlp, ... not GPT-2's); sample and eval read its checkpoints directly")
    tensors = {name: t.t() if name.endswith(_CONV1D) else t
               for name, t in model.state_dict().items() if name != "lm_head.weight"}  # tied: HF re-ties it to wte
    # GPT-2's vocabulary exactly: a padded model's zero rows are no tokens (config.json says vocab_size 50257)
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][: model.config.vocab_size]
    return _write_hf_dir(tensors, hf_files(model.config, step), out_dir, elsewhere)


def _write_hf_dir(tensors: dict[str, torch.Tensor], files: dict[str, bytes], out_dir: str | Path,
                  elsewhere: str = "export elsewhere") -> Path:
    """`tensors` and `files` into `out_dir` (new or empty), all or nothing: a hidden temp dir renamed into place."""
    out_dir = check_out_dir(out_dir)
    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(out_dir.parent):  # a killed export's dir holds a whole model
            log.info("removed %s, left by an export that was killed", stale)
        tmp = make_temp_dir(out_dir)
        write_safetensors(tensors, tmp / SAFETENSORS)
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        os.replace(tmp, out_dir)  # onto a missing or empty dir only: check_out_dir refused any other
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {e.filename or out_dir} ({e.strerror}); free disk space, fix its permissions, "
                        f"or {elsewhere}") from None
    finally:
        if tmp is not None:  # this call created it: nothing of the user's is inside
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
