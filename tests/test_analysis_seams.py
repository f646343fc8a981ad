"""The facts the analysis tools share with training, each owned once: the model's parameter and FLOP counts
(gpt_exp/shapes.py) and a run's summary statistics (gpt_exp/run_reader.py)."""

from __future__ import annotations

import pytest
import torch

from gpt_exp import scaling
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.shapes import flops_per_token, param_counts


@pytest.mark.parametrize("block, vocab, padded, n_layer, n_head, n_embd", [
    (1024, 50257, None, 12, 12, 768),  # gpt2, 124M
    (1024, 50257, 50304, 12, 12, 768),  # gpt2 with its vocabulary padded to a multiple of 64
    (256, 50257, None, 2, 2, 32),  # conf/model/tiny.yaml
    (256, 50257, 50304, 2, 2, 32),
    (64, 101, 128, 3, 4, 48),
])
def test_shapes_count_the_models_own_weights(block, vocab, padded, n_layer, n_head, n_embd):
    """On the meta device (no memory): the real model's weights, each tied tensor once, less the padded rows."""
    with torch.device("meta"):
        model = GPT(GPTConfig(block, vocab, n_layer, n_head, n_embd, padded_vocab_size=padded))
    weights = sum(p.numel() for p in model.parameters())
    padding = ((padded or vocab) - vocab) * n_embd
    non_embedding, total = param_counts(n_layer, n_embd, vocab, block)
    assert total == weights - padding == model.num_params()
    embeddings = vocab * n_embd + model.transformer.wpe.weight.numel()
    assert non_embedding == total - embeddings
    if (block, vocab, n_layer, n_embd) == (1024, 50257, 12, 768):
        assert (total, non_embedding) == (124_439_808, 85_056_000)  # GPT-2 small as the papers count it
    matmul_weights = total - model.transformer.wpe.weight.numel()
    assert model.flops_per_token(block) == flops_per_token(n_layer, n_embd, vocab, block, block)
    assert flops_per_token(n_layer, n_embd, vocab, block, block) == 6 * matmul_weights + 12 * n_layer * n_embd * block


def test_scaling_has_no_copy_of_the_counts():
    assert scaling.param_counts is param_counts and scaling.flops_per_token is flops_per_token
