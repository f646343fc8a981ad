"""DDP on CPU (gloo): 2 processes of B/2 give the losses of 1 process of B; rank 0 alone owns the outputs."""

import os
import subprocess
import sys

import pytest

from gpt_exp.cli import is_main_process
from gpt_exp.launch import Dist, launch_env
from tests.helpers import cli_env, only_run_dir, read_metrics, run_cli

RUN = ["model=tiny", "train.max_steps=6", "optim.warmup_steps=2", "logger.mode=offline"]


def torchrun(cwd, *args):
    (cwd / "tmp").mkdir(exist_ok=True)
    env = cli_env(cwd, {"TMPDIR": str(cwd / "tmp")})  # where the other ranks keep their scratch Hydra dirs
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "gpt_exp.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# one micro-step, and 2 accumulated micro-steps (each a torchrun of ~10 s: the second behind the slow marker)
@pytest.mark.parametrize("total_batch", ["null", pytest.param("512", marks=pytest.mark.slow)])
def test_two_ranks_match_one_process(tmp_path, cache_dir, total_batch):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single_dir.mkdir(), ddp_dir.mkdir()
    common = [*RUN, "T=64", f"train.total_batch_size={total_batch}", f"data.cache_dir={cache_dir}"]
    single = run_cli("run", *common, "B=4", cwd=single_dir)
    assert single.returncode == 0, single.stderr
    ddp = torchrun(ddp_dir, *common, "B=2")
    assert ddp.returncode == 0, ddp.stderr

    expected = read_metrics(only_run_dir(single_dir))
    rows = read_metrics(only_run_dir(ddp_dir))  # exactly one run dir: rank 0's
    assert len(rows) == 6
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, expected)) < 1e-3
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in expected]  # tokens count every rank
    log = (only_run_dir(ddp_dir) / "run.log").read_text()
    accum = 1 if total_batch == "null" else 2
    assert f"tokens/step = 2 x 64 x {accum} micro-steps x 2 ranks" in log
    assert len(list(only_run_dir(ddp_dir).glob("wandb/offline-run-*"))) == 1  # one W&B run, rank 0's
    assert not list((ddp_dir / "tmp").glob("gpt_exp-rank*"))  # rank 1's scratch dir is gone
    assert ddp.stderr.count("done: 6 steps") + ddp.stdout.count("done: 6 steps") == 1  # one console


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_any_world_size(tmp_path, cache_dir):
    """Checkpoints hold the full model once (rank 0's); a DDP run stopped at step 4 resumes with 2 ranks or with
    1 process and gives the losses of a single process that never stopped."""
    common = [*RUN, "optim.schedule=constant", f"data.cache_dir={cache_dir}"]
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    assert run_cli("run", *common, "B=4", cwd=straight_dir).returncode == 0
    expected = [r["loss"] for r in read_metrics(only_run_dir(straight_dir))]

    ddp = torchrun(tmp_path, *common, "B=2", "train.max_steps=4", "train.ckpt_every=2")
    assert ddp.returncode == 0, ddp.stderr
    run_dir = only_run_dir(tmp_path)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002.pt", "step_0000004.pt"]
    for how in ("ddp", "single"):
        cwd = tmp_path / how
        cwd.mkdir()
        args = [*common, f"resume={run_dir}"]
        result = torchrun(cwd, *args, "B=2") if how == "ddp" else run_cli("run", *args, "B=4", cwd=cwd)
        assert result.returncode == 0, result.stderr
        rows = read_metrics(only_run_dir(cwd))
        assert [r["step"] for r in rows] == list(range(6))
        assert max(abs(r["loss"] - e) for r, e in zip(rows, expected)) < 1e-3, how


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(tmp_path, cache_dir):
    """train.strategy=fsdp shards parameters, gradients and optimizer state over 2 CPU ranks (gloo); its losses
    are those of one process, and its gathered checkpoint resumes with FSDP and loads into a plain model."""
    import torch

    from gpt_exp.checkpoint import list_checkpoints
    from gpt_exp.model import GPT, GPTConfig

    common = [*RUN, "optim.schedule=constant", "T=64", "train.total_batch_size=512", f"data.cache_dir={cache_dir}"]
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    assert run_cli("run", *common, "B=4", cwd=straight_dir).returncode == 0
    expected = [r["loss"] for r in read_metrics(only_run_dir(straight_dir))]

    fsdp = torchrun(tmp_path, *common, "B=2", "train.strategy=fsdp", "train.max_steps=4", "train.ckpt_every=2")
    assert fsdp.returncode == 0, fsdp.stderr
    run_dir = only_run_dir(tmp_path)
    assert "x 2 ranks (fsdp)" in (run_dir / "run.log").read_text()
    assert max(abs(r["loss"] - e) for r, e in zip(read_metrics(run_dir), expected)) < 1e-3

    state = torch.load(list_checkpoints(run_dir)[-1], weights_only=True)
    GPT(GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=24)).load_state_dict(state["model"])  # whole tensors

    cwd = tmp_path / "resumed"
    cwd.mkdir()
    resumed = torchrun(cwd, *common, "B=2", "train.strategy=fsdp", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    rows = read_metrics(only_run_dir(cwd))
    assert [r["step"] for r in rows] == list(range(6))
    assert max(abs(r["loss"] - e) for r, e in zip(rows, expected)) < 1e-3

    single = run_cli("run", *common, "B=4", f"resume={run_dir}", cwd=cwd)
    assert single.returncode == 2 and "resume it with train.strategy=fsdp under torchrun" in single.stderr


@pytest.mark.parametrize("env, expected", [
    ({}, Dist(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Dist(3, 4, 1)),  # torchrun
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, Dist(5, 8, 1)),  # a bare srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, Dist(0, 1, 0)),  # sbatch's one task: a plain process
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, Dist(1, 2, 0)),  # torchrun inside srun
])
def test_launch_env_and_who_speaks_for_the_job(monkeypatch, env, expected):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_env() == expected
    assert is_main_process() == (expected.rank == 0)  # the error boundary's rule is the run's rule
    assert "RANK" not in env or os.environ["RANK"] == env["RANK"]  # reading the job's place changes nothing
    assert ("RANK" in os.environ) == ("RANK" in env)
