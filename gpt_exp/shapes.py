"""The parameter and FLOP counts of gpt_exp/model.py's GPT, from its shape alone (no torch): what the model reports,
MFU, compare and scaling all count with."""

from __future__ import annotations

# The architecture settings (model.pos, model.norm, ...) and GPT-2's choice of each: every default of ModelConfig
# and GPTConfig. A model with all of them is what a Hugging Face GPT-2 dir holds.
GPT2_ARCH = {
    "pos": "learned", "rope_theta": 10000.0, "norm": "layernorm", "norm_gain": True, "qk_norm": False, "mlp": "gelu",
    "bias": True, "tie_embeddings": True, "logit_softcap": None, "n_kv_head": None, "value_embeddings": False,
    "zero_init_proj": False,
}
VE_GATE_CHANNELS = 32  # the value embeddings' gate reads the first 32 channels of a block's input (nanochat)


def arch_settings(m: object) -> dict:
    """The architecture settings of `m` (a ModelConfig, a GPTConfig or a checkpoint's model dict), each missing one
    GPT-2's: a checkpoint of a version without them is a GPT-2."""
    get = m.get if isinstance(m, dict) else lambda key, default: getattr(m, key, default)
    return {key: get(key, default) for key, default in GPT2_ARCH.items()}


def mlp_hidden(mlp: str, n_embd: int) -> int:
    """The MLP's hidden width: 4C for gelu and relu2 (two C x 4C matrices, 8 C^2); SwiGLU's three matrices (gate, up,
    down) take round(2/3 * 4C) = round(8C/3), so it has the same 8 C^2 weights (2048 at C=768, as Llama's rule)."""
    return round(8 * n_embd / 3) if mlp == "swiglu" else 4 * n_embd


def value_embedding_layers(n_layer: int) -> list[int]:
    """The layers with a value embedding (model.value_embeddings): every other one, the last always among them."""
    return [layer for layer in range(n_layer) if layer % 2 == (n_layer - 1) % 2]


def _norm_params(dim: int, norm: str, norm_gain: bool, bias: bool) -> int:
    if not norm_gain:
        return 0
    return dim * (2 if norm == "layernorm" and bias else 1)  # gain (and LayerNorm's bias)


def param_counts(n_layer: int, n_embd: int, vocab_size: int, block_size: int, n_head: int | None = None,
                 **arch) -> tuple[int, int]:
    """(non-embedding, total) parameters. GPT-2 (the defaults): a block holds 12 C^2 + 13 C (attention 4 C^2 + 4 C,
    MLP 8 C^2 + 5 C, two layernorms 4 C), ln_f 2 C; the token embedding (tied with lm_head, V C) and the position
    embedding (block_size C) are the embedding. `arch`: the architecture settings (GPT2_ARCH's keys); GQA's key/value
    width needs `n_head`. The embedding is every table of vocabulary or position rows: wte, wpe (pos=learned), the
    value embeddings and an untied lm_head. Padded vocabulary rows are not counted: they are the shape a matmul runs
    at, not the model."""
    a = {**GPT2_ARCH, **arch}
    C, b = n_embd, int(a["bias"])
    head_dim = C // n_head if n_head else C
    kv_dim = a["n_kv_head"] * head_dim if a["n_kv_head"] else C  # n_kv_head None: n_head, so C
    hidden = mlp_hidden(a["mlp"], C)
    fused = 2 if a["mlp"] == "swiglu" else 1

    def norm(dim: int) -> int:
        return _norm_params(dim, a["norm"], a["norm_gain"], a["bias"])

    attention = C * (C + 2 * kv_dim) + b * (C + 2 * kv_dim) + C * C + b * C
    if a["qk_norm"]:
        attention += 2 * norm(head_dim)
    mlp = C * fused * hidden + b * fused * hidden + hidden * C + b * C
    ve_layers = value_embedding_layers(n_layer) if a["value_embeddings"] else []
    gates = len(ve_layers) * min(VE_GATE_CHANNELS, C) * (kv_dim // head_dim)  # one gate per kv head
    non_embedding = n_layer * (attention + mlp + 2 * norm(C)) + gates + norm(C)
    embedding = vocab_size * C * (1 if a["tie_embeddings"] else 2) + len(ve_layers) * vocab_size * kv_dim
    if a["pos"] == "learned":
        embedding += block_size * C
    return non_embedding, non_embedding + embedding


def flops_per_token(n_layer: int, n_embd: int, vocab_size: int, block_size: int, T: int, n_head: int | None = None,
                    **arch) -> int:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B: 6 per weight that a token
    multiplies through (2 forward, 4 backward: the 6N rule, i.e. the forward matmuls' FLOPs x 3), counting every
    parameter but the tables that are only looked up (wpe, the value embeddings, and wte when lm_head is untied; a
    tied wte is lm_head's matmul), plus the attention scores and their weighted sum, 12 L C T (q.k and the sum
    over all T keys, 4 C T forward, x 3; the causal mask's half is not subtracted). The gains and biases are counted
    at 6 each too, as PaLM does (their elementwise work is not a matmul: tests see the counts differ by exactly
    that); rope, the gates, the norms and the softcap's elementwise work are not counted."""
    a = {**GPT2_ARCH, **arch}
    C = n_embd
    total = param_counts(n_layer, n_embd, vocab_size, block_size, n_head, **arch)[1]
    lookups = block_size * C if a["pos"] == "learned" else 0
    if a["value_embeddings"]:
        kv_dim = a["n_kv_head"] * (C // n_head) if a["n_kv_head"] else C
        lookups += len(value_embedding_layers(n_layer)) * vocab_size * kv_dim
    if not a["tie_embeddings"]:
        lookups += vocab_size * C
    return 6 * (total - lookups) + 12 * n_layer * n_embd * T
