"""The Trainer's schedule and what a run leaves: wsd, the lr note on a resume that reshapes the schedule, the final
weights that sample, export and eval read with no extra flag."""

import json

import pytest

from gpt_exp import eval as evals
from gpt_exp import export, sample
from gpt_exp.config import Schedule
from gpt_exp.trainer import LRSchedule
from tests.helpers import only_run_dir, read_metrics, run_cli


def test_wsd_warms_up_holds_then_decays_over_its_last_fraction():
    s = LRSchedule(lr=1e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1, kind=Schedule.wsd, decay_fraction=0.2)
    assert s(0) == pytest.approx(1e-4) and s(9) == pytest.approx(1e-3)
    assert [s(i) for i in (10, 50, 79)] == [1e-3, 1e-3, 1e-3]  # stable
    assert s(80) == pytest.approx(1e-3 - 0.9e-3 / 20) and s(99) == pytest.approx(1e-4)  # linear to min_lr
    longer = LRSchedule(lr=1e-3, warmup_steps=10, max_steps=200, min_lr_ratio=0.1, kind=Schedule.wsd)
    assert all(longer(i) == s(i) for i in range(80))  # a longer run branches off the shorter one without a jump


def test_resume_that_reshapes_the_cosine_says_so(tmp_path, cache_dir):
    common = ["model=tiny", "logger.mode=disabled", f"data.cache_dir={cache_dir}", "optim.warmup_steps=2",
              "train.ckpt_every=6"]
    assert run_cli("run", *common, "train.max_steps=6", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path).returncode == 0
    result = run_cli("run", "train.max_steps=12", f"resume={tmp_path / 'a'}", "logger.mode=disabled",
                     f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    before = LRSchedule(6e-4, 2, 6)(6)
    after = LRSchedule(6e-4, 2, 12)(6)
    assert (f"resume: the lr at step 6 is {after:.3g} (it was {before:.3g} under the checkpoint's schedule, "
            f"train.max_steps 6 -> 12)") in (tmp_path / "b" / "run.log").read_text()
    assert read_metrics(tmp_path / "b")[6]["lr"] == pytest.approx(after)


def test_the_main_job_leaves_weights_that_sample_export_and_eval_read(tmp_path, cache_dir, capsys):
    result = run_cli("run", "model=tiny", "train.max_steps=3", "logger.mode=disabled", f"data.cache_dir={cache_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    assert not (run_dir / "checkpoints").exists()  # no checkpoint asked for: the weights are there anyway
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["vocab_size"]) == (24, 2, 50257)
    assert sample.main([f"resume={run_dir}", "max_new_tokens=4", "num_samples=1", "device=cpu"]) == 0
    assert "--- sample 1/1 ---" in capsys.readouterr().out
    assert export.main([str(run_dir), str(tmp_path / "hf_out")]) == 0
    assert (tmp_path / "hf_out" / "vocab.json").is_file() and (tmp_path / "hf_out" / "model.safetensors").is_file()
    hellaswag = tmp_path / "hellaswag.jsonl"
    hellaswag.write_text(json.dumps({"ctx": "A man is sitting on a roof. he", "label": 0, "endings": [
        "is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
        "starts pulling up roofing on a roof."]}) + "\n")
    assert evals.main(["hellaswag", f"path={hellaswag}", f"resume={run_dir}", "device=cpu"]) == 0
    assert "hellaswag: 1 examples, acc_norm" in capsys.readouterr().out
