import numpy as np
import pytest
import torch

from gpt_exp.data import cache as cache_module
from gpt_exp.data import filehash
from gpt_exp.config import DataConfig, DataSource
from gpt_exp.errors import DataError
from gpt_exp.data.cache import ShardedTokens, prepare_tokens, split_tokens
from gpt_exp.data.loader import BatchLoader, DeviceBatches
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding


@pytest.fixture(scope="module")
def shakespeare(cache_dir):
    return prepare_tokens(DataConfig(source=DataSource.shakespeare, cache_dir=str(cache_dir))).load()


def text_cfg(path, cache_dir) -> DataConfig:
    return DataConfig(source=DataSource.text, path=str(path), cache_dir=str(cache_dir))


def test_shakespeare_cache_is_uint16_memmap(shakespeare, cache_dir):
    assert isinstance(shakespeare, ShardedTokens) and len(shakespeare.shards) == 1
    assert isinstance(shakespeare.shards[0], np.memmap) and shakespeare.shards[0].dtype == np.uint16
    assert len(shakespeare) == 338_025
    assert shakespeare[:6].tolist() == [5962, 22307, 25, 198, 8421, 356]
    cache = prepare_tokens(DataConfig(source=DataSource.shakespeare, cache_dir=str(cache_dir)))
    [shard] = cache.shard_paths
    assert shard.parent == cache_dir and shard.stat().st_size == 2 * 338_025


def test_second_prepare_does_not_tokenize(shakespeare, cache_dir, monkeypatch):
    def fail(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(cache_module, "build_cache", fail)
    cache = prepare_tokens(DataConfig(source=DataSource.shakespeare, cache_dir=str(cache_dir)))
    assert cache.num_tokens == 338_025


def test_later_runs_read_neither_the_corpus_nor_the_shards_to_hash_them(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    cfg = DataConfig(source=DataSource.text, path=str(corpus), cache_dir=str(tmp_path / "cache"))
    reads = []
    real = filehash.file_sha256
    monkeypatch.setattr(filehash, "file_sha256", lambda path: reads.append(path.name) or real(path))
    first = prepare_tokens(cfg)  # builds: hashes the corpus
    assert reads == ["corpus.txt"] and first.shard_paths
    prepare_tokens(cfg)  # checks the shards written by the first run once
    assert sorted(reads[1:]) == sorted(p.name for p in first.shard_paths)
    reads.clear()
    assert prepare_tokens(cfg).num_tokens == first.num_tokens
    assert reads == []  # nothing changed since: the memo answers
    corpus.write_text(corpus.read_text() + "All: Speak, speak.\n")
    prepare_tokens(cfg)
    assert reads[0] == "corpus.txt"  # a changed corpus is read again (and gets a new entry)


def test_changed_content_gets_a_new_cache_entry(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text("hello world")
    first = prepare_tokens(text_cfg(corpus, tmp_path / "c"))
    corpus.write_text("hello there world")
    second = prepare_tokens(text_cfg(corpus, tmp_path / "c"))
    assert first.shard_paths != second.shard_paths
    assert second.load()[:].tolist() == gpt2_encoding().encode_ordinary("hello there world")


def test_directory_of_txt_files_joined_by_endoftext(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("Second document.")
    (tmp_path / "docs" / "sub" / "a.txt").write_text("First one\n")  # sorted by path: b.txt < sub/a.txt
    (tmp_path / "docs" / "notes.md").write_text("not a .txt: ignored")
    tokens = prepare_tokens(text_cfg(tmp_path / "docs", tmp_path / "c")).load()[:].tolist()
    enc = gpt2_encoding()
    assert tokens == enc.encode_ordinary("Second document.") + [EOT_TOKEN] + enc.encode_ordinary("First one\n")


def test_truncated_cache_is_rebuilt(tmp_path, caplog):
    corpus = tmp_path / "a.txt"
    corpus.write_text("some words " * 100)
    cache = prepare_tokens(text_cfg(corpus, tmp_path / "c"))
    with open(cache.shard_paths[0], "r+b") as f:
        f.truncate(10)
    rebuilt = prepare_tokens(text_cfg(corpus, tmp_path / "c"))
    assert rebuilt.shard_paths[0].stat().st_size == 2 * cache.num_tokens
    assert "truncated" in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [(b"caf\xe9 latin-1", r"is not UTF-8 \(byte 3"), (b"", "is empty")],
)
def test_bad_corpus_is_one_clear_error(tmp_path, content, message):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_tokens(text_cfg(corpus, tmp_path / "c"))
    assert not list((tmp_path / "c").glob("*.json"))  # nothing left that could pass for a cache entry


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_tokens(text_cfg(tmp_path / "nope", tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        prepare_tokens(text_cfg(tmp_path / "empty", tmp_path / "c"))


def test_loader_shift_and_epoch(shakespeare):
    loader = BatchLoader(shakespeare, B=4, T=32)
    assert loader.batches_per_epoch == 2_640
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    flat = torch.from_numpy(shakespeare[: 4 * 32 + 1].astype(np.int64))
    assert torch.equal(x.flatten(), flat[:-1]) and torch.equal(y.flatten(), flat[1:])
    assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one token
    assert loader.position == 128


def test_loader_wraps_after_one_epoch(shakespeare):
    loader = BatchLoader(shakespeare, B=4, T=32)
    first, _ = loader.next_batch()
    for _ in range(2_638):
        loader.next_batch()
    last_x, last_y = loader.next_batch()  # batch 2,640: the last full one
    assert last_y[-1, -1].item() == shakespeare[2_640 * 128].item()
    assert loader.position == 0 and loader.epoch == 1
    again, _ = loader.next_batch()
    assert torch.equal(again, first)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinned-memory copies need a CUDA GPU"))])
def test_device_batches_are_the_loaders_batches(shakespeare, device):
    reference = BatchLoader(shakespeare, B=4, T=32)
    batches = DeviceBatches(BatchLoader(shakespeare, B=4, T=32), torch.device(device))
    assert batches.pinned == (device == "cuda")
    for _ in range(5):  # more batches than host buffers: each is refilled only after its copy is done
        x, y = batches.next_batch()
        want_x, want_y = reference.next_batch()
        assert x.device.type == device and x.dtype == torch.int64 and x.shape == (4, 32)
        assert torch.equal(x.cpu(), want_x) and torch.equal(y.cpu(), want_y)


def test_overfit_batches_cycles(shakespeare):
    loader = BatchLoader(shakespeare, B=2, T=8, overfit_batches=2)
    batches = [loader.next_batch()[0] for _ in range(5)]
    assert torch.equal(batches[0], batches[2]) and torch.equal(batches[1], batches[3])
    assert torch.equal(batches[0], batches[4]) and not torch.equal(batches[0], batches[1])


def test_state_dict_resumes_the_stream(shakespeare):
    a = BatchLoader(shakespeare, B=4, T=32)
    for _ in range(7):
        a.next_batch()
    b = BatchLoader(shakespeare, B=4, T=32)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_ranks_take_interleaved_strides(shakespeare):
    single = BatchLoader(shakespeare, B=2, T=16)
    ranks = [BatchLoader(shakespeare, B=2, T=16, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for rank_loader in ranks:
            assert torch.equal(rank_loader.next_batch()[0], single.next_batch()[0])


def test_too_little_data_for_one_batch():
    with pytest.raises(DataError, match="has 100 tokens but one batch needs B\\*T\\+1 = 129"):
        BatchLoader(np.zeros(100, dtype=np.uint16), B=4, T=32)


def test_val_split_holds_out_the_tail(shakespeare):
    train, val = split_tokens(shakespeare, 0.1)
    assert len(val) == 33_802 and len(train) + len(val) == 338_025
    assert val[0] == shakespeare[len(train)]
    assert len(split_tokens(shakespeare, 0.0)[1]) == 0


def test_corrupt_cache_is_detected_by_checksum_and_rebuilt(tmp_path, caplog):
    corpus = tmp_path / "a.txt"
    corpus.write_text("some words " * 100)
    cache = prepare_tokens(text_cfg(corpus, tmp_path / "c"))
    good = cache.load()[:].tolist()
    with open(cache.shard_paths[0], "r+b") as f:  # same size, one token flipped
        f.seek(10)
        f.write(b"\xff\xff")
    rebuilt = prepare_tokens(text_cfg(corpus, tmp_path / "c"))
    assert "corrupt (checksum mismatch); rebuilding" in caplog.text
    assert rebuilt.load()[:].tolist() == good


def test_resume_position_past_a_smaller_corpus_or_a_larger_batch_is_one_error(shakespeare):
    loader = BatchLoader(shakespeare, B=4, T=32)
    for _ in range(2000):
        loader.next_batch()
    state = loader.state_dict()  # token 256,000 of 338,025
    small = np.arange(200_000, dtype=np.uint16)
    with pytest.raises(DataError, match=r"position \(token 256,000\) plus one batch of B\*T\+1 = 129 tokens runs past "
                                        r"this corpus \(200,000 tokens\)"):
        BatchLoader(small, B=4, T=32).load_state_dict(state)
    with pytest.raises(DataError, match=r"B\*T\+1 = 98,305 tokens runs past this corpus \(338,025 tokens\)"):
        BatchLoader(shakespeare, B=96, T=1024).load_state_dict(state)
    BatchLoader(shakespeare, B=8, T=64).load_state_dict(state)  # a position that still fits is taken
