import socket
from importlib import resources

import pytest

from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_builds_offline_from_package_files(no_network):
    gpt2_encoding.cache_clear()
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]


def test_tiny_shakespeare_golden_numbers():
    text = (resources.files("gpt_exp") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert len(text) == 1_115_394
    tokens = gpt2_encoding().encode_ordinary(text)
    assert len(tokens) == 338_025
    assert tokens[:6] == [5962, 22307, 25, 198, 8421, 356]  # "First Citizen:\nBefore we"
    assert gpt2_encoding().decode(tokens[:6]) == "First Citizen:\nBefore we"
