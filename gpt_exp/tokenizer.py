"""The gpt2 BPE tokenizer, built offline from the BPE files shipped in gpt_exp/assets.

tiktoken.get_encoding("gpt2") would download the same two files; a run must never wait on the network.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import tiktoken
import tiktoken_ext.openai_public
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = 50256  # <|endoftext|>, written between documents
# sha256 of OpenAI's files (identical to what tiktoken downloads): a changed asset fails loudly.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# Part of every token cache key: a different tokenizer must never reuse a cache.
TOKENIZER_ID = f"tiktoken-gpt2-{_VOCAB_BPE_SHA256[:12]}-{_ENCODER_JSON_SHA256[:12]}"


def gpt2_bpe_files() -> dict[str, bytes]:
    """The two shipped BPE files, {"encoder.json": ..., "vocab.bpe": ...}, checked against OpenAI's: what a
    Hugging Face export writes as its vocab.json and merges.txt (the same files under their HF names)."""
    files = {}
    for name, sha256 in (("encoder.json", _ENCODER_JSON_SHA256), ("vocab.bpe", _VOCAB_BPE_SHA256)):
        data = (resources.files("gpt_exp") / "assets" / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"gpt_exp/assets/{name} is not OpenAI's gpt2 file (sha256 differs); reinstall gpt_exp")
        files[name] = data
    return files


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    assets = resources.files("gpt_exp") / "assets"
    with resources.as_file(assets / "vocab.bpe") as vocab, resources.as_file(assets / "encoder.json") as encoder:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab),
            encoder_json_file=str(encoder),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=50257,
    )


def encode_text(text: str) -> list[int]:
    """Tokens of a user's text (a prompt, an eval example). `<|endoftext|>` in it becomes the end-of-text token,
    which is what the text means; tiktoken's plain `encode` raises on it instead."""
    return gpt2_encoding().encode(text, allowed_special={"<|endoftext|>"})


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> tuple[int, ...]:
    """The UTF-8 length in bytes of each gpt2 token id (what bits per byte divides by); `<|endoftext|>` counts 0
    bytes: it marks a document boundary and is no text. A token may hold part of a character: its own bytes count."""
    enc = gpt2_encoding()
    return tuple(0 if i == EOT_TOKEN else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab))
