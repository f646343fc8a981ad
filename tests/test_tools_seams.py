"""The seams of the tools that do not train (sample, eval, export, coord_check): the library below them never
imports a command, and what the commands read and write at those seams."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_exp import atomic, coord_check, export
from gpt_exp.checkpoint import load_model, save_checkpoint
from gpt_exp.errors import ConfigError
from gpt_exp.hf import load_hf_gpt2, recorded_step, save_hf_gpt2
from gpt_exp.model import GPT, GPTConfig


def test_the_library_imports_no_command():
    """Training samples and scores HellaSwag through gpt_exp.generation and gpt_exp.hellaswag, which never import
    the CLI layer (the sample and eval commands, or cli.py below them)."""
    code = ("import sys, gpt_exp.trainer, gpt_exp.generation, gpt_exp.hellaswag; "
            "print(sorted(m for m in ('gpt_exp.cli', 'gpt_exp.sample', 'gpt_exp.eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def killed_export(parent: Path) -> Path:
    """The temp dir of an export into PARENT/out that was killed (SIGKILL) after writing part of its weights."""
    code = ("import os, signal, sys; from pathlib import Path; from gpt_exp.atomic import make_temp_dir; "
            "tmp = make_temp_dir(Path(sys.argv[1]) / 'out'); (tmp / 'model.safetensors').write_bytes(b'w' * 2**20); "
            "print(tmp, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code, str(parent)], capture_output=True, text=True)
    assert out.returncode == -signal.SIGKILL, out.stderr
    return Path(out.stdout.strip())


def test_an_export_removes_the_temp_dirs_of_killed_exports_and_nothing_else(tmp_path, capsys):
    parent = tmp_path / "exports"
    parent.mkdir()
    stale = [killed_export(parent), killed_export(parent)]
    assert all(p.name.startswith(".out.") and p.name.endswith(".tmp") and p.is_dir() for p in stale)
    live = atomic.make_temp_dir(parent / "other")  # this process's: a writer that still runs
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("the user's")
    dead_pid = stale[0].name.rsplit(".", 4)[2]
    link = parent / f".link.{atomic._HOST}.{dead_pid}.abc.tmp"  # our naming, a dead writer, but a symlink
    link.symlink_to(tmp_path / "theirs")
    elsewhere = parent / f".out.otherhost.{dead_pid}.abc.tmp"  # another host's writer may be alive
    elsewhere.mkdir()
    mine = parent / ".out.notes"  # the user's own hidden dir
    mine.mkdir()

    model = GPT(GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=2, n_embd=8))
    assert export.main([str(_ckpt(tmp_path, model)), str(parent / "new")]) == 0
    assert sorted(p.name for p in parent.iterdir()) == sorted([live.name, link.name, elsewhere.name, mine.name, "new"])
    assert (tmp_path / "theirs" / "keep.txt").read_text() == "the user's" and link.is_symlink()
    capsys.readouterr()


def _ckpt(tmp_path: Path, model: GPT) -> Path:
    path = tmp_path / "ckpt.pt"
    c = model.config
    torch.save({"step": 1, "model": model.state_dict(),
                "config": {"model": {"name": "t", "block_size": c.block_size, "vocab_size": c.vocab_size,
                                     "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd}}}, path)
    return path


def test_coord_check_refuses_a_width_past_the_machines_memory_before_allocating():
    """The widest model's weights, gradients and Adam moments (16 bytes a parameter), counted on the meta device,
    against the memory given: width 512 (32.1M parameters, 0.48 GiB) fits 1 GiB; 1024 (76.7M, 1.14 GiB) does not."""
    setup = coord_check.Setup()
    with torch.device("meta"):
        assert GPT(coord_check.model_config(512, "sp", setup)).num_params() == 32_070_144
    coord_check.check_fits([64, 512], setup, memory=2**30)
    with pytest.raises(ConfigError, match=r"^--widths: width 1024 is 77M parameters, ~1.1 GiB to train .* more than "
                                          r"this machine's 1.0 GiB of memory; give smaller widths"):
        coord_check.check_fits([1024, 64], setup, memory=2**30)


TINY = dict(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)


def tiny(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()


def same_weights(a: GPT, b: GPT) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def run_with(tmp_path: Path, model_step: int | None, ckpt_step: int) -> tuple[Path, GPT, GPT]:
    """A run dir whose model/ (weights A, recording `model_step`) and newest checkpoint (weights B at `ckpt_step`)
    disagree, and whose summary.json says 300 steps (the count of another part of its history)."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model:\n  name: tiny\n")
    (run / "summary.json").write_text(json.dumps({"status": "completed", "steps": 300}))
    a, b = tiny(1), tiny(2)
    save_checkpoint(run, {"step": ckpt_step, "model": b.state_dict(), "config": {"model": {"name": "tiny", **TINY}}},
                    keep=2)
    save_hf_gpt2(a, run / "model", step=model_step)
    return run, a, b


def test_the_step_save_hf_gpt2_is_given_is_recorded_in_config_json(tmp_path):
    save_hf_gpt2(tiny(1), tmp_path / "with", step=7)
    save_hf_gpt2(tiny(1), tmp_path / "without")
    assert json.loads((tmp_path / "with" / "config.json").read_text())["gpt_exp_step"] == 7
    assert "gpt_exp_step" not in json.loads((tmp_path / "without" / "config.json").read_text())
    assert (recorded_step(tmp_path / "with"), recorded_step(tmp_path / "without")) == (7, None)
    assert load_model(str(tmp_path / "with"), hf=True)[1]["step"] == 7


def test_a_newer_checkpoint_wins_over_a_stale_model_dir_and_is_labelled_with_its_step(tmp_path, capsys):
    run, _, b = run_with(tmp_path, model_step=100, ckpt_step=200)
    model, info = load_model(str(run))
    assert same_weights(model, b) and info["step"] == 200 and info["source"].endswith("checkpoints/step_0000200.pt")
    assert export.main([str(run), str(tmp_path / "out")]) == 0
    assert "(0.40M params, step 200) from " in capsys.readouterr().out
    assert recorded_step(tmp_path / "out") == 200 and same_weights(load_hf_gpt2(tmp_path / "out"), b)


def test_a_model_dir_newer_than_every_checkpoint_wins_with_its_own_step(tmp_path):
    run, a, _ = run_with(tmp_path, model_step=250, ckpt_step=200)
    model, info = load_model(str(run))
    assert same_weights(model, a) and (info["step"], info["source"]) == (250, str(run / "model"))  # not summary's 300


@pytest.mark.parametrize("model_written_last", [False, True])
def test_a_model_dir_that_records_no_step_is_compared_by_when_it_was_written(tmp_path, model_written_last):
    run, a, b = run_with(tmp_path, model_step=None, ckpt_step=200)
    ckpt, weights = run / "checkpoints" / "step_0000200.pt", run / "model" / "config.json"
    os.utime(ckpt, (1_000_000, 1_000_000) if model_written_last else (3_000_000, 3_000_000))
    os.utime(weights, (2_000_000, 2_000_000))
    model, info = load_model(str(run))
    assert same_weights(model, a if model_written_last else b)
    assert info["step"] == (300 if model_written_last else 200)  # model/ written last: the run's end, in its summary
