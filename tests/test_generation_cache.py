"""Generation with a KV cache: the tokens and logits of the uncached path (each step rerunning the context), under
GPT-2's and the other architectures, before and after the context outgrows block_size."""

import pytest
import torch

from gpt_exp.generation import generate
from gpt_exp.model import GPT, GPTConfig, KVCache

SETTINGS = {
    "gpt2": {},
    "modern": dict(pos="rope", norm="rmsnorm", norm_gain=False, qk_norm=True, mlp="relu2", bias=False,
                   tie_embeddings=False, logit_softcap=15.0, value_embeddings=True),
    "llama_gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1),
}


def model_of(settings: dict, block_size: int = 24) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=4, n_embd=32, **settings)).eval()
    with torch.no_grad():  # larger weights than the init's: logits far apart, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4)
    return model


@pytest.mark.parametrize("name", SETTINGS)
def test_cached_logits_are_the_uncached_ones(name):
    model = model_of(SETTINGS[name])
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.config.n_layer)
    with torch.no_grad():
        prompt_logits, _ = model(idx[:, :5], cache=cache)
        steps = [model(idx[:, t : t + 1], cache=cache)[0][:, -1] for t in range(5, 20)]
        full, _ = model(idx)
    assert cache.pos == 20 and cache.k[0].shape == (2, model.config.n_kv_head, 20, 8)
    torch.testing.assert_close(prompt_logits, full[:, :5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", SETTINGS)
def test_greedy_tokens_with_and_without_the_cache_are_the_same(name):
    model = model_of(SETTINGS[name])
    idx = torch.randint(0, 50257, (3, 6), generator=torch.Generator().manual_seed(2))
    cached = generate(model, idx, 40, top_k=1, use_cache=True)  # 46 tokens: the window slides past block_size 24
    uncached = generate(model, idx, 40, top_k=1, use_cache=False)
    assert cached.shape == (3, 46)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 6:].tolist())) > 3  # not one token repeated: the comparison has something to compare


def test_sampling_draws_the_same_tokens_with_the_cache():
    model = model_of(SETTINGS["gpt2"])
    idx = torch.randint(0, 50257, (2, 4), generator=torch.Generator().manual_seed(3))
    runs = [generate(model, idx, 12, top_k=20, generator=torch.Generator().manual_seed(4), use_cache=use)
            for use in (True, False)]
    assert torch.equal(*runs)
