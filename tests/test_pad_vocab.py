"""model.pad_vocab through the Trainer: a padded run trains as the unpadded one and resumes padded."""

import torch

from gpt_exp.checkpoint import list_checkpoints, load_model
from tests.helpers import Collect, make_trainer, only_run_dir, read_metrics, run_cli

RUN = ["model=tiny", "train.max_steps=6", "optim.warmup_steps=2", "logger.mode=disabled"]


def test_padded_trainer_trains_as_the_unpadded_one(cache_dir):
    losses = {}
    for pad in ("false", "true"):
        trainer = make_trainer(cache_dir, "train.max_steps=4", f"model.pad_vocab={pad}")
        tracker = Collect()
        assert trainer.fit(tracker) == "completed"
        losses[pad] = tracker.losses
        assert trainer.model.lm_head.weight.shape[0] == (50304 if pad == "true" else 50257)
    assert losses["true"] == losses["false"]
    assert not trainer.model.lm_head.weight[50257:].any()


def test_padded_checkpoint_resumes_padded(tmp_path, cache_dir):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run_cli("run", *RUN, "model.pad_vocab=true", f"data.cache_dir={cache_dir}", cwd=straight).returncode == 0
    first = tmp_path / "first"
    first.mkdir()
    result = run_cli("run", *RUN, "train.max_steps=6", "train.ckpt_every=3", "model.pad_vocab=true",
                     f"data.cache_dir={cache_dir}", cwd=first)
    assert result.returncode == 0, result.stderr
    ckpt = list_checkpoints(only_run_dir(first))[0]
    assert torch.load(ckpt, weights_only=True)["model"]["transformer.wte.weight"].shape == (50304, 24)
    assert load_model(str(ckpt))[0].lm_head.weight.shape == (50304, 24)
    second = tmp_path / "second"
    second.mkdir()
    result = run_cli("run", *RUN, "model.pad_vocab=true", f"resume={ckpt}", f"data.cache_dir={cache_dir}", cwd=second)
    assert result.returncode == 0, result.stderr
    want = [r["loss"] for r in read_metrics(only_run_dir(straight))]
    got = [r["loss"] for r in read_metrics(only_run_dir(second))]
    assert got == want and len(want) == 6
