"""The facts the analysis tools share with training, each owned once: the model's parameter and FLOP counts
(gpt_exp/shapes.py) and a run's summary statistics (gpt_exp/run_reader.py)."""

from __future__ import annotations

import math

import pytest
import torch

from gpt_exp import compare, scaling
from gpt_exp.config import LoggerConfig, LoggerMode
from gpt_exp.metrics import StepMetrics, read_metrics
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.run_reader import load_run, run_stats
from gpt_exp.shapes import flops_per_token, param_counts
from gpt_exp.tracking import Tracker
from tests.test_compare import make_run


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


def test_tracker_and_the_reader_compute_the_same_summary(tmp_path):
    """summary.json (Tracker.close) and what compare reads from metrics.jsonl alone (a run still going) are one
    function's numbers: a resumed step counted once, its later row winning, a non-finite loss never the best."""
    previous = [{"step": 0, "loss": math.nan, "tok_per_s": 10.0, "tokens": 64},
                {"step": 1, "loss": 9.0, "tok_per_s": 30.0, "tokens": 128}]  # step 1 is trained again below
    tracker = Tracker(tmp_path, LoggerConfig(mode=LoggerMode.disabled), "t", None, {}, total_steps=4,
                      previous_rows=previous)
    for step, loss in ((1, 6.0), (2, 5.0), (3, 5.5)):
        tracker.log_step(StepMetrics(step=step, loss=loss, lr=1e-3, grad_norm=1.0, dt_ms=10.0,
                                     tok_per_s=20.0 * step, tokens=64 * (step + 1)))
    tracker.log_eval(3, 5.25, 2.5)
    summary = tracker.close()
    expected = {"steps": 4, "final_loss": 5.5, "best_loss": 5.0, "tokens": 256, "median_tok_per_s": 30.0,
                "final_val_loss": 5.25, "best_val_loss": 5.25, "final_val_bpb": 2.5, "best_val_bpb": 2.5}
    assert {k: summary[k] for k in expected} == expected
    assert run_stats(read_metrics(tmp_path / "metrics.jsonl")) == expected
    (tmp_path / "summary.json").unlink()  # what compare shows of a run that is still going
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("train:\n  seed: 1\n")
    run = load_run(tmp_path)
    assert (run.steps, run.final_loss, run.best_loss, run.tokens, run.median_tok_per_s, run.final_val_loss,
            run.final_val_bpb) == (4, 5.5, 5.0, 256, 30.0, 5.25, 2.5)


@pytest.mark.parametrize("tool", [compare, scaling])
def test_a_run_config_is_data_its_interpolations_are_refused(tmp_path, monkeypatch, capsys, tool):
    """A run dir from elsewhere whose config reads an environment variable: the tools refuse it in one line naming
    the run dir and the key, and the variable's value reaches no output, no file."""
    secret = "s3cr3t-7f3a9c1e5b"
    monkeypatch.setenv("SECRET_TOKEN", secret)
    make_run(tmp_path / "sweep" / "0", [3.0, 2.0])
    leaky = make_run(tmp_path / "sweep" / "1", [3.0, 2.5], config={"data": {"name": "${oc.env:SECRET_TOKEN}"}})
    code = tool.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (f"error: {leaky}: data.name=${{oc.env:SECRET_TOKEN}} in .hydra/config.yaml is an interpolation; a "
                   f"run dir is data and gpt_exp resolves nothing in it (${{oc.env:...}} would read this machine's "
                   f"environment): write the value the run trained with, or leave the run out\n")
    assert not (tmp_path / "out").exists()
    assert not any(secret.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_an_interpolation_inside_a_list_is_refused_too(tmp_path, capsys):
    run = make_run(tmp_path / "run", [3.0], config={"data": {"mix": [{"path": "${oc.env:HOME}", "weight": 1}]}})
    assert compare.main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run}: data.mix=${{oc.env:HOME}} in .hydra/config.yaml is an "
                                              f"interpolation;")


def test_scaling_counts_a_modern_models_own_parameters():
    """N of a run with architecture settings is its model's own count, not GPT-2's at the same shape."""
    import torch

    from gpt_exp.config import ModelConfig
    from gpt_exp.model import GPT, GPTConfig
    from gpt_exp.run_reader import architecture
    from gpt_exp.shapes import param_counts

    settings = {"n_layer": 2, "n_embd": 24, "n_head": 2, "block_size": 256, "tie_embeddings": False, "mlp": "swiglu",
                "pos": "rope"}
    params = {f"model.{k}": v for k, v in settings.items()} | {"model.vocab_size": 50257}
    with torch.device("meta"):
        model = GPT(GPTConfig.from_model_config(ModelConfig(**settings), "cpu"))
    counted = param_counts(2, 24, 50257, 256, **architecture(params))
    assert counted[1] == sum(p.numel() for p in model.parameters())
    assert counted != param_counts(2, 24, 50257, 256)
    assert architecture({"model.n_head": 2})["mlp"] == "gelu"  # a config from before the settings: GPT-2's
