"""The parameter and FLOP counts of gpt_exp/model.py's GPT, from its shape alone (no torch): what the model reports,
MFU, compare and scaling all count with."""

from __future__ import annotations


def param_counts(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> tuple[int, int]:
    """(non-embedding, total) parameters. A block holds 12 C^2 + 13 C (attention 4 C^2 + 4 C, MLP 8 C^2 + 5 C, two
    layernorms 4 C), ln_f 2 C; the token embedding (tied with lm_head, V C) and the position embedding (block_size C)
    are the embedding. Padded vocabulary rows are not counted: they are the shape a matmul runs at, not the model."""
    non_embedding = n_layer * (12 * n_embd**2 + 13 * n_embd) + 2 * n_embd
    return non_embedding, non_embedding + (vocab_size + block_size) * n_embd


def flops_per_token(n_layer: int, n_embd: int, vocab_size: int, block_size: int, T: int) -> int:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B: 6 per weight of the matmuls
    (all but the position embedding, a lookup; lm_head's weight is the tied token embedding) plus the attention
    scores, 12 L C T."""
    total = param_counts(n_layer, n_embd, vocab_size, block_size)[1]
    return 6 * (total - block_size * n_embd) + 12 * n_layer * n_embd * T
