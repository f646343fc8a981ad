"""A run owns only what it creates: user errors, reused dirs, torchrun ranks, sweeps with failing jobs, write failures."""

import json
import os
import resource
import socket
import subprocess
import sys

import pytest
import torch

from gpt_exp.atomic import atomic_write_bytes, remove_stale_temp_files
from gpt_exp.checkpoint import list_checkpoints
from gpt_exp.compare import compare_table, load_runs
from gpt_exp.rundir import LOCK, claim_dir, discard, guard, record, sweep_tally
from tests.helpers import cli_env, read_metrics, run_cli

TINY = ["model=tiny", "logger.mode=disabled", "optim.warmup_steps=1", "optim.schedule=constant"]


def user_files(folder):
    """A working dir a user might point hydra.run.dir at: a repo, notes, earlier runs."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "outputs" / "2026-01-01" / "10-00-00").mkdir(parents=True)
    (folder / "outputs" / "2026-01-01" / "10-00-00" / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n')
    return snapshot(folder)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def assert_kept(folder, before):
    after = snapshot(folder)
    for path, content in before.items():
        assert path in after, f"{path} was removed"
        assert after[path] == content, f"{path} was changed"


def one_error_line(result, code=2):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("args", [["B=0"], ["-m", "optim.lr=1e-3,abc"]], ids=["run", "sweep refused before any job"])
def test_user_error_in_a_fresh_folder_leaves_it_as_it_was(tmp_path, cache_dir, args):
    (tmp_path / "notes.txt").write_text("my notes\n")
    result = run_cli("run", *args[:-1], *TINY, f"data.cache_dir={cache_dir}", args[-1], cwd=tmp_path)
    one_error_line(result)
    assert snapshot(tmp_path) == {"notes.txt": b"my notes\n"}  # not even an empty outputs/ or outputs/YYYY-MM-DD


def test_a_failed_start_keeps_the_date_folder_another_run_has_written_into(tmp_path, cache_dir):
    first = run_cli("run", *TINY, f"data.cache_dir={cache_dir}", "train.max_steps=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path)
    one_error_line(run_cli("run", *TINY, f"data.cache_dir={cache_dir}", "B=0", cwd=tmp_path))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args", [["B=0", "hydra.run.dir=."], ["T=2048", "hydra.run.dir=outputs"],
                                  ["data=text", "data.path=missing.txt", "hydra.run.dir=outputs/2026-01-01"]])
def test_user_error_in_an_existing_dir_removes_nothing(tmp_path, cache_dir, args):
    before = user_files(tmp_path)
    result = run_cli("run", *TINY, f"data.cache_dir={cache_dir}", *args, cwd=tmp_path)
    one_error_line(result)
    assert_kept(tmp_path, before)
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "run.log").exists()  # what it made is gone
    assert not (tmp_path / "outputs" / ".hydra").exists()


def test_user_error_in_a_fresh_dir_leaves_no_run_dir(tmp_path, cache_dir):
    result = run_cli("run", *TINY, f"data.cache_dir={cache_dir}", "B=0", cwd=tmp_path)
    one_error_line(result)
    assert not list(tmp_path.glob("outputs/*/*"))


def test_run_in_a_dir_with_files_keeps_them(tmp_path, cache_dir):
    before = user_files(tmp_path)
    result = run_cli("run", *TINY, "train.max_steps=3", f"data.cache_dir={cache_dir}", "hydra.run.dir=.", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_kept(tmp_path, before)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_a_dir_holding_another_run_is_refused(tmp_path, cache_dir):
    run_dir = tmp_path / "r"
    common = [*TINY, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "train.ckpt_every=2"]
    assert run_cli("run", *common, "train.max_steps=4", cwd=tmp_path).returncode == 0
    before = snapshot(run_dir)
    line = one_error_line(run_cli("run", *common, "train.max_steps=2", cwd=tmp_path))
    assert f"hydra.run.dir={run_dir} already holds another run" in line and f"resume={run_dir}" in line
    assert_kept(run_dir, before)
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]  # not 0..3, 0..1


def test_resume_into_its_own_dir_continues_without_duplicate_rows(tmp_path, cache_dir):
    run_dir = tmp_path / "r"
    common = [*TINY, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "train.ckpt_every=2"]
    straight = tmp_path / "straight"
    assert run_cli("run", *TINY, f"data.cache_dir={cache_dir}", f"hydra.run.dir={straight}", "train.max_steps=6",
                   cwd=tmp_path).returncode == 0
    assert run_cli("run", *common, "train.max_steps=4", "optim.lr=6e-4", cwd=tmp_path).returncode == 0
    # rows past the newest checkpoint (a run killed after it) are replaced, not duplicated
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 99.0}) + "\n")
    result = run_cli("run", *common, "train.max_steps=6", f"resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(straight)]  # bitwise, as a straight run
    # branching from an older checkpoint into the same dir would mix two histories
    line = one_error_line(run_cli("run", *common, "train.max_steps=8",
                                  f"resume={run_dir}/checkpoints/step_0000004.pt", cwd=tmp_path))
    assert "would mix two histories: step_0000006.pt is newer" in line


def test_discard_removes_only_what_this_process_created(tmp_path):
    """A failed start removes the entries it recorded as it made them, not whatever a listing taken at its start
    lacks: a file the user (or another job) saved into the dir meanwhile stays."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    guard(work)
    assert (work / LOCK).is_file()  # held while the start runs
    (work / "run.log").write_text("log")  # Hydra's job log, which the guard expects
    (work / "paper.tex").write_text("saved during the start")
    record(work, {"B": 4}, ["B=4"])
    discard(work)
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "paper.tex"]
    fresh = claim_dir(str(tmp_path / "fresh"))
    guard(fresh)
    (tmp_path / "fresh" / "run.log").write_text("log")
    discard(fresh)
    assert not (tmp_path / "fresh").exists()
    again = claim_dir(str(tmp_path / "again"))
    guard(again)
    (tmp_path / "again" / "notes.md").write_text("mine")
    discard(again)
    assert [p.name for p in (tmp_path / "again").iterdir()] == ["notes.md"]  # the dir it made stays for the note


def test_sweep_tally_counts_statuses(tmp_path):
    for job, status in enumerate(["completed", "diverged", "completed", None]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        if status:
            (tmp_path / str(job) / "summary.json").write_text(json.dumps({"status": status}))
    assert sweep_tally(tmp_path) == ("4 jobs: 2 completed, 1 diverged, 1 no summary", True)


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sweep_survives_a_diverging_and_an_invalid_job(tmp_path, cache_dir, launcher):
    result = run_cli("run", "-m", *TINY, "train.max_steps=3", "optim.warmup_steps=0", f"data.cache_dir={cache_dir}",
                     "optim.lr=1e-3,1e39,2e-3", "B=4,0", f"hydra/launcher={launcher}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [sweep_dir] = (tmp_path / "outputs" / "multirun").glob("*/*")
    statuses = {}
    for job in sorted(sweep_dir.glob("[0-9]*")):
        summary = json.loads((job / "summary.json").read_text())
        statuses[job.name] = summary["status"]
        if summary["status"] != "completed":
            assert summary["error"]
    # jobs: (lr, B) = (1e-3,4) (1e-3,0) (1e39,4) (1e39,0) (2e-3,4) (2e-3,0)
    assert statuses == {"0": "completed", "1": "failed", "2": "diverged", "3": "failed", "4": "completed",
                        "5": "failed"}
    assert "6 jobs: 2 completed, 1 diverged, 3 failed; compare them with: python -m gpt_exp.compare" in result.stderr
    assert result.stderr.count("error: job ") == 4
    assert "B=0 is invalid" in (sweep_dir / "1" / "summary.json").read_text()
    assert [len(read_metrics(sweep_dir / j)) for j in ("0", "4")] == [3, 3]
    rows = compare_table(load_runs([str(sweep_dir)]))
    assert sorted(r["status"] for r in rows) == ["completed", "completed", "diverged", "failed", "failed", "failed"]


def test_optuna_records_a_failed_trial_and_goes_on(tmp_path, cache_dir):
    result = run_cli("run", "-m", "+experiment=optuna_search", "logger.mode=disabled", "train.max_steps=2",
                     "optim.warmup_steps=0", f"data.cache_dir={cache_dir}", "hydra.sweeper.n_trials=4",
                     'hydra.sweeper.params={optim.lr:"choice(0.001,1e39)"}', cwd=tmp_path)
    [sweep_dir] = (tmp_path / "outputs" / "multirun").glob("*/*")
    statuses = [json.loads((sweep_dir / str(j) / "summary.json").read_text())["status"] for j in range(4)]
    assert len(statuses) == 4 and "diverged" in statuses and "completed" in statuses  # the study went on
    assert result.returncode == 1
    assert f"4 jobs: {statuses.count('completed')} completed, {statuses.count('diverged')} diverged" in result.stderr
    assert "best_value" in (sweep_dir / "optimization_results.yaml").read_text()


def test_nonfinite_run_keeps_only_finite_checkpoints(tmp_path, cache_dir):
    run_dir = tmp_path / "r"
    result = run_cli("run", *TINY, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", "train.max_steps=8",
                     "optim.lr=1e39", "optim.warmup_steps=3", "train.ckpt_every=1", cwd=tmp_path)
    line = one_error_line(result, code=3)
    assert "no longer finite" in line or "the step was not applied" in line
    for path in list_checkpoints(run_dir):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), path
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"


def _file_limit(n_bytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_checkpoint_write_failure_is_one_line_and_leaves_no_temp_file(tmp_path, cache_dir):
    """ulimit -f: the tiny model's checkpoint (~15 MB) cannot be written, the small files can."""
    run_dir = tmp_path / "r"
    result = subprocess.run([sys.executable, "-m", "gpt_exp.run", *TINY, f"data.cache_dir={cache_dir}",
                             f"hydra.run.dir={run_dir}", "train.max_steps=4", "train.ckpt_every=2"],
                            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True,
                            preexec_fn=_file_limit(2_000_000), timeout=300)
    line = one_error_line(result)
    assert line.startswith(f"error: cannot write checkpoint {run_dir}/checkpoints/step_0000002.pt")
    assert not list(run_dir.rglob("*.tmp")) and not list_checkpoints(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "cannot write checkpoint" in summary["error"]
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]


def test_atomic_writes_follow_the_umask_and_stale_temp_files_go(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    host = socket.gethostname().replace(".", "-")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".step_0000002.pt.{host}.{dead.stdout.strip()}.abc123.tmp"
    live = tmp_path / f".step_0000004.pt.{host}.{os.getpid()}.abc123.tmp"
    stale.write_bytes(b"half"), live.write_bytes(b"half")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


def test_torchrun_with_a_set_run_dir_keeps_its_files_and_outputs(tmp_path, cache_dir):
    """Rank 1 composes the same config; it must neither write into nor clean up rank 0's run dir."""
    before = user_files(tmp_path)
    (tmp_path / "tmp").mkdir()
    env = cli_env(tmp_path, {"TMPDIR": str(tmp_path / "tmp")})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "gpt_exp.run", *TINY, "B=2", "train.max_steps=4", "train.ckpt_every=2",
                             f"data.cache_dir={cache_dir}", "hydra.run.dir=."],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert_kept(tmp_path, before)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    for name in (".hydra/config.yaml", "run.log", "summary.json", "loss.png", "checkpoints/step_0000004.pt"):
        assert (tmp_path / name).exists(), name
    assert "done: 4 steps" in (tmp_path / "run.log").read_text()
    assert not list((tmp_path / "tmp").glob("gpt_exp-rank*"))  # rank 1's scratch dir is gone, and only it


def test_a_dir_with_files_a_run_writes_is_refused_not_overwritten(tmp_path, cache_dir):
    """A project's own model/ or loss.png would be replaced by the run's outputs of those names."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.txt").write_text("mine\n")
    (tmp_path / "loss.png").write_bytes(b"my plot")
    before = snapshot(tmp_path)
    line = one_error_line(run_cli("run", *TINY, "train.max_steps=2", f"data.cache_dir={cache_dir}", "hydra.run.dir=.",
                                  cwd=tmp_path))
    assert "already holds another run or the files one writes (loss.png, model)" in line
    assert_kept(tmp_path, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "model"]
