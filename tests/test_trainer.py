"""The Trainer's schedule and what a run leaves: wsd, the lr note on a resume that reshapes the schedule, the final
weights that sample, export and eval read with no extra flag."""

import json

import pytest

from gpt_exp import eval as evals
from gpt_exp import export, sample
from gpt_exp.config import Schedule
from gpt_exp.trainer import LRSchedule
from tests.helpers import cpp_compiler_works, only_run_dir, read_metrics, run_cli


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
    saved = json.loads((run_dir / "eval.json").read_text())["hellaswag"]  # the result stays with the run
    assert saved["examples"] == 1 and saved["acc_norm"] in (0.0, 1.0) and saved["step"] == 3


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=[  # compile: ~40 s on 2 cores
    pytest.mark.slow, pytest.mark.skipif(not cpp_compiler_works(), reason="torch.compile on a CPU needs a C++ compiler")])])
def test_samples_and_hellaswag_during_training(tmp_path, cache_dir, compiled):
    from tests.helpers import wandb_records

    examples = tmp_path / "hellaswag.jsonl"
    endings = ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
               "starts pulling up roofing on a roof."]
    examples.write_text("".join(json.dumps({"ctx": "A man is sitting on a roof. he", "label": i % 4,
                                            "endings": endings}) + "\n" for i in range(8)))
    result = run_cli("run", "model=tiny", "train.max_steps=4", "train.sample_every=2", "train.hellaswag_every=2",
                     f"eval.hellaswag_path={examples}", "sample.max_new_tokens=6", "sample.prompts=[ROMEO:]",
                     f"device.compile={str(compiled).lower()}", "logger.mode=offline", f"data.cache_dir={cache_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["tokens"], s["prompt"]) for s in samples] == [(1, 256, "ROMEO:")] * 2 + [(3, 512, "ROMEO:")] * 2
    assert all(s["text"].startswith("ROMEO:") and len(s["text"]) > len("ROMEO:") for s in samples)
    assert "step 4 sample: 'ROMEO:" in (run_dir / "run.log").read_text()
    hellaswag = [r for r in read_metrics(run_dir) if "hellaswag_acc_norm" in r]
    assert [(r["step"], r["hellaswag_examples"]) for r in hellaswag] == [(1, 8), (3, 8)]
    assert all(r["hellaswag_acc_norm"] * 8 == round(r["hellaswag_acc_norm"] * 8) for r in hellaswag)  # counts of 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["hellaswag_acc_norm"] == hellaswag[-1]["hellaswag_acc_norm"]
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in wandb_records(offline) if r["type"] == "history"]
    assert [h["hellaswag_acc_norm"] for h in history if "hellaswag_acc_norm" in h] == [r["hellaswag_acc_norm"] for r in hellaswag]
    tables = [(h["samples.nrows"], h["samples.ncols"]) for h in history if "samples.nrows" in h]
    assert tables == [(2, 4), (2, 4)]  # the W&B table (step, tokens, prompt, text), at steps 2 and 4


def test_hellaswag_during_training_without_its_file_is_one_line_before_step_0(tmp_path, cache_dir):
    result = run_cli("run", "model=tiny", "train.hellaswag_every=2", "logger.mode=disabled",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: train.hellaswag_every=2 is invalid: it needs")
    missing = run_cli("run", "model=tiny", "train.hellaswag_every=2", f"eval.hellaswag_path={tmp_path / 'nope.jsonl'}",
                      "logger.mode=disabled", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.jsonl" in missing.stderr
    assert not list(tmp_path.glob("outputs/*/*"))


def test_on_a_terminal_the_bar_draws_and_run_log_still_gets_every_step(tmp_path, cache_dir):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.helpers import cli_env

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "gpt_exp.run", "model=tiny", "train.max_steps=5",
                             "logger.mode=disabled", f"data.cache_dir={cache_dir}"], cwd=tmp_path, env=cli_env(tmp_path),
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=300) == 0
    terminal = out.decode(errors="replace")
    assert "5/5" in terminal and "|" in terminal and "step 5/5 | loss" not in terminal  # tqdm's bar, not log lines
    log = (only_run_dir(tmp_path) / "run.log").read_text()
    assert [f"step {i}/5 | loss" in log for i in range(1, 6)] == [True] * 5


def test_B_auto_keeps_the_tokens_per_step_and_a_resume_keeps_its_choice(tmp_path, cache_dir):
    common = ["model=tiny", "B=auto", "train.total_batch_size=256", "logger.mode=disabled", f"data.cache_dir={cache_dir}",
              "train.ckpt_every=2"]
    first = run_cli("run", *common, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    chosen = summary["runtime"]["autobatch"]
    assert chosen["B"] in (1, 2, 4, 8) and set(chosen["measured"]) <= {"1", "2", "4", "8"}
    assert chosen["grad_accum_steps"] * chosen["B"] * 32 == 256  # the step keeps train.total_batch_size
    assert [r["tokens"] for r in read_metrics(tmp_path / "a")] == [256, 512]
    log = (tmp_path / "a" / "run.log").read_text()
    assert f"B=auto: B={chosen['B']} (x{chosen['grad_accum_steps']} micro-steps): the fastest per token of" in log
    resumed = run_cli("run", f"resume={tmp_path / 'a'}", "train.max_steps=4", "logger.mode=disabled",
                      f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    log = (tmp_path / "b" / "run.log").read_text()
    assert "B=auto:" not in log and f"= {chosen['B']} x 32 x {chosen['grad_accum_steps']} micro-steps" in log


def test_B_auto_keeps_to_its_probe_time(cache_dir):
    """train.autobatch_probe_s bounds the CPU probe: with a millisecond, the first candidate is timed (a choice needs
    one) and every other is predicted past the limit, so B is the smallest."""
    from tests.helpers import make_trainer

    trainer = make_trainer(cache_dir, "B=auto", "train.total_batch_size=256", "train.autobatch_probe_s=0.001")
    measured = trainer.autobatch.measured
    assert trainer.cfg.B == 1 and measured["1"]["status"] == "timed"
    assert {b: m["status"] for b, m in measured.items() if b != "1"} == {b: "over the probe's time" for b in ("2", "4", "8")}
    assert trainer.grad_accum_steps == 256 // 32


def test_deferred_reads_change_nothing_but_when_the_host_waits(tmp_path, cache_dir):
    """On a GPU a step's loss is read after the next step is queued; the numbers, rows and checkpoints are the same
    as reading each step at once (checked here on the CPU, where deferring is off by default)."""
    import torch

    from tests.helpers import Collect, make_trainer

    runs = {}
    for defer in (False, True):
        trainer = make_trainer(cache_dir, "train.max_steps=7", "train.ckpt_every=3", "train.sample_every=5",
                               "sample.max_new_tokens=3", run_dir=tmp_path / str(defer))
        trainer.defer = defer
        tracker = Collect()
        assert trainer.fit(tracker) == "completed"
        ckpts = sorted(p.name for p in (tmp_path / str(defer) / "checkpoints").glob("*.pt"))
        weights = torch.load(tmp_path / str(defer) / "checkpoints" / "step_0000006.pt", weights_only=True)["model"]
        runs[defer] = ([(m.step, m.loss, m.grad_norm, m.tokens) for m in tracker.steps], tracker.samples, ckpts, weights)
    (rows, samples, ckpts, weights), (rows_d, samples_d, ckpts_d, weights_d) = runs[False], runs[True]
    assert rows_d == rows and len(rows) == 7  # bitwise: deferring moves the read, not the arithmetic
    assert samples_d == samples and [s for s, _ in samples] == [4, 6]
    assert ckpts_d == ckpts == ["step_0000006.pt", "step_0000007.pt"]
    assert all(torch.equal(weights[k], weights_d[k]) for k in weights)  # the checkpoint holds step 6, not step 7


def test_deferred_reads_skip_and_stop_on_nonfinite_steps_as_at_once(cache_dir):
    import torch

    from gpt_exp.errors import Diverged
    from tests.helpers import Collect, make_trainer

    for skip, defer in ((2, True), (0, True)):
        trainer = make_trainer(cache_dir, "B=2", "T=16", "train.max_steps=6", "optim.warmup_steps=0",
                               f"train.skip_nonfinite={skip}")
        trainer.defer = defer
        calls = iter(range(100))
        trainer.model.transformer.wte.register_forward_hook(
            lambda module, inputs, out: out * float("inf") if next(calls) in (2, 3) else out)
        tracker = Collect()
        if skip:
            assert trainer.fit(tracker) == "completed"
            assert [m.step for m in tracker.steps] == [0, 1, 4, 5] and [s for s, _ in tracker.skips] == [2, 3]
        else:
            with pytest.raises(Diverged, match="at step 2 "):
                trainer.fit(tracker)
            assert [m.step for m in tracker.steps] == [0, 1]
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
