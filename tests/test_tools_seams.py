"""The seams of the tools that do not train (sample, eval, export, coord_check): the library below them never
imports a command, and what the commands read and write at those seams."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_exp import atomic, coord_check, export
from gpt_exp.errors import ConfigError
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
