import numpy as np
import pytest
import torch

from gpt_exp.data import cache as cache_module
from gpt_exp.data import filehash
from gpt_exp.config import DataConfig, DataOrder, DataSource
from gpt_exp.errors import DataError
from gpt_exp.data.cache import ShardedTokens, prepare_tokens, split_tokens
from gpt_exp.data.loader import BatchLoader, BlockOrder, DeviceBatches
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding
from tests.helpers import compose_config


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


# ---- data.order=shuffled: each seed its own block order, every block once an epoch, exact resume ----


def block_starts(loader: BatchLoader, steps: int) -> list[int]:
    """Where each batch of an np.arange stream starts, checking that it is one B*T+1 buffer: y is x shifted by one."""
    starts = []
    for _ in range(steps):
        x, y = loader.next_batch()
        start = x[0, 0].item()
        n = loader.B * loader.T
        assert x.flatten().tolist() == list(range(start, start + n))
        assert y.flatten().tolist() == list(range(start + 1, start + n + 1))
        starts.append(start)
    return starts


def shuffled(tokens, B=2, T=5, seed=7, **kwargs) -> BatchLoader:
    return BatchLoader(tokens, B, T, order=DataOrder.shuffled, order_seed=seed, **kwargs)


def test_shuffled_seeds_read_different_batches_and_a_seed_the_same(shakespeare):
    a, again, other = (shuffled(shakespeare, 4, 32, seed=s) for s in (1337, 1337, 1338))
    assert a.batches_per_epoch == 2_640  # the same blocks as sequential, in another order
    first = a.next_batch()[0]
    assert torch.equal(first, again.next_batch()[0]) and not torch.equal(first, other.next_batch()[0])
    for _ in range(5):
        assert torch.equal(a.next_batch()[0], again.next_batch()[0])
    block = BlockOrder(2_640, 1337, 0)[0]  # (338,025 - 1) // 128 blocks
    assert first.flatten().tolist() == shakespeare[block * 128 : block * 128 + 128].tolist()
    assert not torch.equal(first, BatchLoader(shakespeare, 4, 32).next_batch()[0])


def test_shuffled_epoch_reads_every_block_once_in_a_new_order_each_epoch():
    tokens = np.arange(1_005, dtype=np.uint16)  # 100 blocks of B*T = 10 (+1 target); the last 4 tokens never fit
    loader = shuffled(tokens)
    first = block_starts(loader, 100)
    assert sorted(first) == list(range(0, 1_000, 10)) and first != sorted(first)
    assert loader.epoch == 1 and loader.position == 0
    second = block_starts(loader, 100)
    assert sorted(second) == sorted(first) and second != first
    assert first == [10 * BlockOrder(100, 7, 0)[i] for i in range(100)]


def test_block_order_is_a_permutation_for_any_size():
    for n in (1, 2, 3, 4, 5, 17, 64, 1_000):
        assert sorted(BlockOrder(n, 3, 1)[i] for i in range(n)) == list(range(n))
    with pytest.raises(IndexError):
        BlockOrder(5, 3, 1)[5]


def test_shuffled_ranks_read_disjoint_blocks_interleaved_as_one_process_would():
    tokens = np.arange(1_001, dtype=np.uint16)  # 100 blocks: 50 steps of W=2
    single = block_starts(shuffled(tokens), 100)
    ranks = [shuffled(tokens, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 50
    per_rank = [block_starts(loader, 50) for loader in ranks]
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(single)
    assert per_rank[0] == single[0::2] and per_rank[1] == single[1::2]  # rank r: positions r, r+W, r+2W, ...
    assert all(loader.epoch == 1 and loader.position == 0 for loader in ranks)


def test_shuffled_resumes_exactly_mid_epoch_and_across_the_epoch_boundary():
    tokens = np.arange(1_001, dtype=np.uint16)
    never_stopped = block_starts(shuffled(tokens), 330)
    for stop in (37, 99, 100, 250):  # mid-epoch, the last step of an epoch, an epoch's first, mid third epoch
        loader = shuffled(tokens)
        block_starts(loader, stop)
        state = loader.state_dict()
        assert state == {"position": 10 * (stop % 100), "batches_in_cycle": stop, "epoch": stop // 100,
                         "order": "shuffled", "order_seed": 7, "block_tokens": 10}
        resumed = shuffled(tokens)
        resumed.load_state_dict(state)
        assert block_starts(resumed, 330 - stop) == never_stopped[stop:]


def test_shuffled_state_of_two_ranks_resumes_in_one_process_and_back():
    tokens = np.arange(1_001, dtype=np.uint16)
    never_stopped = block_starts(shuffled(tokens), 200)
    ranks = [shuffled(tokens, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        block_starts(loader, 30)  # 60 blocks
    assert ranks[0].state_dict() == ranks[1].state_dict()  # no rank's offset in the state
    one = shuffled(tokens)
    one.load_state_dict(ranks[0].state_dict())
    assert block_starts(one, 140) == never_stopped[60:]
    stopped = shuffled(tokens)
    block_starts(stopped, 41)  # an odd position: two ranks read blocks 41 and 42, then 43 and 44
    again = [shuffled(tokens, rank=r, world_size=2) for r in range(2)]
    for loader in again:
        loader.load_state_dict(stopped.state_dict())
    assert [block_starts(loader, 3) for loader in again] == [never_stopped[41:47:2], never_stopped[42:47:2]]
    # 29 steps of two ranks from block 41 read blocks 41..98; a 30th needs block 100, which is not there: a new epoch
    block_starts(again[0], 25)
    assert again[0].epoch == 0
    assert block_starts(again[0], 1) == [never_stopped[97]] and (again[0].epoch, again[0].position) == (1, 0)


def sharded(sizes: list[int]) -> ShardedTokens:
    """Shards that hold 0, 1, 2, ... in order, so a batch read across them is still a run of consecutive numbers."""
    starts = np.cumsum([0, *sizes])
    return ShardedTokens([np.arange(a, a + n, dtype=np.uint16) for a, n in zip(starts, sizes)])


def test_shuffled_blocks_read_across_shard_boundaries():
    tokens = sharded([37, 50, 23, 91])  # 201 tokens, 20 blocks of 10; blocks 3, 8 and 10 (its target) cross a boundary
    loader = shuffled(tokens)
    starts = block_starts(loader, 20)  # each is checked to be 11 consecutive tokens, wherever it lies
    assert sorted(starts) == list(range(0, 200, 10)) and loader.epoch == 1
    assert loader.tokens is tokens  # the blocks' order replaces the shard shuffle (shuffle_seed) of sequential
    resumed = shuffled(tokens, shuffle_seed=0)
    resumed.load_state_dict(loader.state_dict())
    assert block_starts(resumed, 20) == block_starts(loader, 20) != starts


def test_shuffled_overfit_cycles_the_first_batches_of_its_seeds_order():
    tokens = np.arange(1_001, dtype=np.uint16)
    first = block_starts(shuffled(tokens), 3)
    assert block_starts(shuffled(tokens, overfit_batches=3), 7) == first + first + first[:1]
    assert block_starts(shuffled(tokens, seed=8, overfit_batches=3), 3) != first


def test_sequential_ranks_wrap_together():
    # 899 tokens of B*T = 100 under two ranks: 4 steps an epoch (the 4th reads tokens 600..800 and 801)
    ranks = [BatchLoader(np.arange(900, dtype=np.uint16), 1, 100, rank=r, world_size=2) for r in range(2)]
    assert [block_starts(loader, 4) for loader in ranks] == [[0, 200, 400, 600], [100, 300, 500, 700]]
    assert [(loader.epoch, loader.position) for loader in ranks] == [(1, 0), (1, 0)]


def test_a_checkpoint_from_before_data_order_resumes_sequential(shakespeare):
    a = BatchLoader(shakespeare, B=4, T=32)
    for _ in range(7):
        a.next_batch()
    assert a.state_dict() == {"position": 896, "batches_in_cycle": 7, "epoch": 0, "order": "sequential"}
    b = BatchLoader(shakespeare, B=4, T=32)
    b.load_state_dict({"position": 896, "batches_in_cycle": 7, "epoch": 0})
    assert torch.equal(b.next_batch()[0], a.next_batch()[0])


def test_resume_with_another_order_seed_or_block_size_is_one_error():
    tokens = np.arange(1_001, dtype=np.uint16)
    sequential_state = BatchLoader(tokens, 2, 5).state_dict()
    with pytest.raises(DataError, match=r"^resume: the checkpoint read its data with data.order=sequential; resume "
                                        r"with data.order=sequential$"):
        shuffled(tokens).load_state_dict({k: v for k, v in sequential_state.items() if k != "order"})
    with pytest.raises(DataError, match="with data.order=shuffled; resume with data.order=shuffled"):
        BatchLoader(tokens, 2, 5).load_state_dict(shuffled(tokens).state_dict())
    with pytest.raises(DataError, match=r"drawn from train.seed=7; resume with train.seed=7"):
        shuffled(tokens, seed=8).load_state_dict(shuffled(tokens).state_dict())
    with pytest.raises(DataError, match=r"blocks of B\*T = 10 tokens, not 20; resume with the checkpoint's B and T"):
        shuffled(tokens, B=4).load_state_dict(shuffled(tokens).state_dict())


def test_data_order_key():
    assert compose_config().data.order == DataOrder.sequential
    assert compose_config("data=text", "data.path=x.txt").data.order == DataOrder.sequential
    assert compose_config("data.order=shuffled").data.order == DataOrder.shuffled
