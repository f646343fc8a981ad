"""Hugging Face GPT-2 checkpoints: load a `GPT2LMHeadModel` dir (any size) into our GPT, and write ours as one.

`transformers` is not needed: safetensors is read and written here (a JSON header and raw little-endian bytes).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from gpt_exp.atomic import atomic_path, atomic_write_bytes
from gpt_exp.config import ConfigError, UserError
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.tokenizer import EOT_TOKEN

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"  # what save_pretrained writes for a sharded (large) model
PYTORCH_BIN = "pytorch_model.bin"
_FIX = "give a Hugging Face GPT-2 dir (config.json + model.safetensors), e.g. one `python -m gpt_exp.export` writes"
# HF's GPT-2 uses Conv1D, which stores these weights as (in, out): nn.Linear's transpose.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers older GPT-2 files carry: not weights, our attention builds its mask.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # HF's names for the GELU our MLP uses


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file: an 8-byte header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the tensors' bytes."""
    # one writable copy of the file, which the tensors share (torch.frombuffer warns on read-only bytes)
    data = bytearray(path.stat().st_size)
    with open(path, "rb") as f:
        f.readinto(data)
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        start = 8 + header_len
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = _DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or start + end > len(data):
                raise ValueError(f"tensor {name} does not fit its data_offsets")
            if count == 0:  # torch.frombuffer refuses an empty slice
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin).reshape(shape)
        return tensors
    except (struct.error, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not a readable safetensors file ({e}); export or download it again") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`tensors` as a .safetensors file, written atomically; `format: pt` is what transformers checks for."""
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in cpu.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header so the tensor data is 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for t in cpu.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _read_config(path: Path) -> GPTConfig:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} has no config.json, so it is not a Hugging Face model dir; {_FIX}") from None
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}/config.json cannot be read ({e}); {_FIX}") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "gpt2":
        raise ConfigError(f"{path} holds a model_type={kind} model, not GPT-2; {_FIX}")
    shape = {key: config.get(key) for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")}
    if not all(isinstance(v, int) and v > 0 for v in shape.values()):
        raise ConfigError(f"{path}/config.json lacks the GPT-2 shape ({shape}); {_FIX}")
    # Settings our GPT does not implement would load without error and give other logits.
    differs = {"activation_function": config.get("activation_function", "gelu_new") not in _TANH_GELU,
               "n_inner": config.get("n_inner") not in (None, 4 * shape["n_embd"]),
               "layer_norm_epsilon": abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12,
               "scale_attn_by_inverse_layer_idx": bool(config.get("scale_attn_by_inverse_layer_idx")),
               "tie_word_embeddings": config.get("tie_word_embeddings", True) is False}
    unsupported = [f"{key}={config.get(key)}" for key, bad in differs.items() if bad]
    if unsupported:
        raise ConfigError(f"{path}/config.json sets {', '.join(unsupported)}, which gpt_exp's GPT does not implement; "
                          f"only standard GPT-2 models (gpt2, gpt2-medium, -large, -xl and their fine-tunes) load")
    return GPTConfig(block_size=shape["n_positions"], vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                     n_head=shape["n_head"], n_embd=shape["n_embd"])


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS).is_file():
        return read_safetensors(path / SAFETENSORS)
    if (path / SAFETENSORS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"{path / SAFETENSORS_INDEX} cannot be read ({e!r}); download it again") from None
        return {name: t for shard in shards for name, t in read_safetensors(path / shard).items()}
    if (path / PYTORCH_BIN).is_file():
        try:
            return torch.load(path / PYTORCH_BIN, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: whatever torch raises is the user's
            raise ConfigError(f"{path / PYTORCH_BIN} is not a readable PyTorch weights file ({type(e).__name__}); "
                              f"download or export it again") from None
    raise ConfigError(f"{path} has config.json but no weights ({SAFETENSORS} or {PYTORCH_BIN}); "
                      f"copy the weight file into it, or export the model again")


def _to_gpt_state_dict(hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names and layouts -> ours: the `transformer.` prefix, Linear (out, in) weights, no mask buffers."""
    state = {}
    for name, tensor in hf_weights.items():
        if name.endswith(_BUFFERS) or name == "lm_head.weight":  # lm_head is tied to wte, which we load
            continue
        name = name if name.startswith("transformer.") else f"transformer.{name}"
        state[name] = tensor.t() if name.endswith(_CONV1D) else tensor
    return state


def load_hf_gpt2(path: str | Path) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 dir (config.json + model.safetensors or pytorch_model.bin)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist; {_FIX}")
    model = GPT(_read_config(path))
    state = _to_gpt_state_dict(_read_weights(path))
    expected = {name: p.shape for name, p in model.state_dict().items() if name != "lm_head.weight"}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong_shape = [n for n in expected.keys() & state.keys() if state[n].shape != expected[n]]
    if missing or unexpected or wrong_shape:
        first = sorted(missing)[:1] + sorted(unexpected)[:1] + sorted(wrong_shape)[:1]
        raise ConfigError(f"{path}'s weights do not match its config.json ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected, {len(wrong_shape)} of another shape, e.g. {', '.join(first)}); "
                          f"the weight file belongs to another model")
    # load_state_dict copies into our fp32 parameters, so fp16/bf16 files load too
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})
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


def save_hf_gpt2(model: GPT, out_dir: str | Path) -> Path:
    """Write `model` as a Hugging Face GPT-2 dir (config.json + model.safetensors) that
    `GPT2LMHeadModel.from_pretrained(out_dir)` loads; returns the dir."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a dir to write config.json and {SAFETENSORS} into")
    tensors = {name: t.t() if name.endswith(_CONV1D) else t
               for name, t in model.state_dict().items() if name != "lm_head.weight"}  # tied: HF re-ties it to wte
    try:
        write_safetensors(tensors, out_dir / SAFETENSORS)
        atomic_write_bytes(out_dir / "config.json", (json.dumps(hf_config(model.config), indent=2) + "\n").encode())
    except OSError as e:
        raise UserError(f"cannot write {e.filename or out_dir} ({e.strerror}); free disk space, fix its permissions, "
                        f"or export elsewhere") from None
    return out_dir
