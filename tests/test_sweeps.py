"""Sweeps: Hydra multirun with the basic and joblib launchers, W&B groups, experiments, Optuna, W&B sweep specs."""

import json
import os
import re

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from gpt_exp.compare import compare_table, load_runs
from gpt_exp.config import RunConfig, register_schema, schema_keys, validate
from gpt_exp.rundir import claim_dir, overrides_name
from tests.helpers import read_metrics, run_cli, run_cli_async, wandb_records

register_schema()
TINY = ["model=tiny", "train.max_steps=4", "optim.warmup_steps=1", "logger.mode=offline"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(tmp_path, cache_dir, *args):
    result = run_cli("run", "-m", *TINY, f"data.cache_dir={cache_dir}", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [sweep_dir] = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    return result, sweep_dir


def wandb_run_record(run_dir):
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    [record] = [r["run"] for r in wandb_records(offline) if r["type"] == "run"]
    return record


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_two_job_sweep(tmp_path, cache_dir, launcher):
    result, sweep_dir = sweep(tmp_path, cache_dir, "optim.lr=1e-3,1e-2", f"hydra/launcher={launcher}",
                              "hydra.launcher.n_jobs=2" if launcher == "joblib" else "logger.tags=[smoke]")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", "/".join(sweep_dir.parts[-2:]))
    assert not (tmp_path / "multirun").exists()
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    records = [wandb_run_record(sweep_dir / job) for job in ("0", "1")]
    group = "multirun/" + "/".join(sweep_dir.parts[-2:])
    assert [r["run_group"] for r in records] == [group, group]  # one W&B group for the whole sweep
    assert [r["display_name"] for r in records] == ["lr=0.001", "lr=0.01"]  # named by what the sweep varies
    assert records[0]["run_id"] != records[1]["run_id"]  # jobs in one process never merge into one W&B run
    assert [r["config"]["update"]["optim"]["lr"] for r in records] == [0.001, 0.01]
    assert "optim.lr=0.001" in records[0]["config"]["update"]["overrides"]
    if launcher == "basic":
        assert records[0]["tags"] == ["smoke"]
    else:  # two jobs side by side on this machine share its cores; their interleaved lines say whose they are
        assert "[job 0] done: 4 steps" in result.stdout and "[job 1] done: 4 steps" in result.stdout
        log = (sweep_dir / "0" / "run.log").read_text()
        assert f"({max(1, os.cpu_count() // 2)} CPU threads)" in log

    rows = {row["optim.lr"]: row for row in compare_table(load_runs([str(sweep_dir)]))}
    for job, lr in (("0", 0.001), ("1", 0.01)):
        metrics = read_metrics(sweep_dir / job)
        assert len(metrics) == 4
        assert rows[lr]["final_loss"] == metrics[-1]["loss"]
        assert rows[lr]["best_loss"] == min(m["loss"] for m in metrics)
        assert rows[lr]["tokens"] == 4 * 128 and rows[lr]["status"] == "completed"


def test_compare_cli_on_a_real_sweep_with_a_failed_job(tmp_path, cache_dir):
    _, sweep_dir = sweep(tmp_path, cache_dir, "train.seed=1,2")
    summary = sweep_dir / "1" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "failed"}))
    result = run_cli("compare", str(sweep_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 completed" not in result.stdout and "1 completed, 1 failed" in result.stdout
    assert (sweep_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    [row] = json.loads((sweep_dir / "compare.json").read_text())
    assert row["final_loss"] == read_metrics(sweep_dir / "0")[-1]["loss"]  # the completed seed only


def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path, cache_dir):
    base = str(tmp_path / "outputs" / "2026-01-01" / "10-00-00")
    assert [claim_dir(base) for _ in range(3)] == [base, base + "_1", base + "_2"]
    procs = [
        run_cli_async("run", *TINY, "train.max_steps=1", "logger.mode=disabled", f"data.cache_dir={cache_dir}", cwd=tmp_path)
        for _ in range(3)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.jsonl")]
    assert len(run_dirs) == 3 and all(len(read_metrics(d)) == 1 for d in run_dirs)


def test_overrides_name():
    overrides = ["model=tiny", "optim.lr=0.0003", "B=8", "logger.mode=offline", "data.cache_dir=/x", "+experiment=a"]
    assert overrides_name(overrides, {"optim.lr", "B"}) == "lr=0.0003,B=8"
    assert overrides_name(overrides) == "model=tiny,lr=0.0003,B=8"


def compose_experiment(name, *overrides, hydra_config=True):
    with initialize_config_module("gpt_exp.conf", version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}", *overrides], return_hydra_config=hydra_config)


@pytest.mark.parametrize("name", ["tiny_smoke", "shakespeare_grid", "optuna_search", "gpt2_124m_fineweb"])
def test_experiments_compose_and_validate(name):
    overrides = ["data.path=/corpus"] if name == "gpt2_124m_fineweb" else []
    params = compose_experiment(name, *overrides).hydra.sweeper.params or {}
    assert set(params) <= set(schema_keys())  # every swept key exists
    run_cfg: RunConfig = OmegaConf.to_object(compose_experiment(name, *overrides, hydra_config=False))
    validate(run_cfg)
    if name == "gpt2_124m_fineweb":
        assert (run_cfg.B * run_cfg.T, run_cfg.train.total_batch_size, run_cfg.train.max_steps) == (65536, 524288, 19073)
        assert (run_cfg.optim.warmup_steps, run_cfg.model.n_layer) == (715, 12)


def test_optuna_config_targets_the_sweeper():
    cfg = compose_experiment("optuna_search")
    assert "optuna" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"optim.lr", "optim.warmup_steps", "optim.weight_decay"}


def test_optuna_search_runs_two_trials(tmp_path, cache_dir):
    _, sweep_dir = sweep(tmp_path, cache_dir, "+experiment=optuna_search", "hydra.sweeper.n_trials=2",
                         "train.max_steps=3", "logger.mode=disabled")
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    finals = [read_metrics(sweep_dir / job)[-1]["loss"] for job in ("0", "1")]
    assert results["best_value"] == pytest.approx(min(finals))  # the run returns its final loss to the sweeper


def test_slurm_launcher_config_has_the_cluster_knobs():
    with initialize_config_module("gpt_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.account=lab"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", "lab", 1, 240)


def test_wandb_sweep_spec_passes_hydra_overrides():
    with open(os.path.join(REPO, "experiments", "wandb_sweeps", "lr_warmup.yaml")) as f:
        spec = yaml.safe_load(f)
    assert spec["command"][-1] == "${args_no_hyphens}" and spec["command"][2:4] == ["-m", "gpt_exp.run"]
    assert spec["metric"] == {"name": "best_val_loss", "goal": "minimize"}  # a key every run's W&B summary holds
    assert spec["early_terminate"]["type"] == "hyperband"
    assert "data.val_fraction=0.1" in spec["command"] and "train.eval_every=50" in spec["command"]
    assert set(spec["parameters"]) <= set(schema_keys())


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path, cache_dir):
    _, sweep_dir = sweep(tmp_path, cache_dir, "optim.lr=1e-3,1e-2", "hydra/launcher=submitit_local")
    assert all(len(read_metrics(sweep_dir / job)) == 4 for job in ("0", "1"))


def test_names_round_floats_and_named_experiments_group_by_name(tmp_path):
    from gpt_exp.rundir import sweep_group, swept_keys

    trial = ["optim.lr=0.001373357564531546", "optim.weight_decay=0.1036785641195", "train.max_steps=30", "B=8"]
    params = {"optim.lr": "tag(log, interval(1e-4, 3e-2))", "optim.weight_decay": "interval(0.0, 0.2)"}
    keys = swept_keys(tmp_path, params)  # Optuna writes no multirun.yaml: its search space is what varies
    assert overrides_name(trial, keys) == "lr=0.001373,weight_decay=0.1037"
    assert overrides_name(["B=16", "optim.lr=3e-4"]) == "B=16,lr=0.0003"
    sweep_dir = tmp_path / "outputs" / "multirun" / "2026-11-25" / "10-00-00"
    assert sweep_group(sweep_dir, ["+experiment=tiny_smoke", "optim.lr=1e-3"]) == "tiny_smoke/2026-11-25/10-00-00"
    assert sweep_group(sweep_dir, ["optim.lr=1e-3,2e-3"]) == "multirun/2026-11-25/10-00-00"


def test_a_requeued_sweep_continues_each_job_and_refuses_a_reordered_one(tmp_path, cache_dir):
    """A sweep resubmitted into its own dir with resume=auto (a requeued array job) goes on from each job's own
    checkpoint; resubmitted with its values in another order, every job is refused (it would continue another
    configuration's run) and the sweep exits non-zero, its results untouched; without resume=auto, refused whole."""
    common = ["model=tiny", "B=2", "T=16", "train.ckpt_every=2", "logger.mode=disabled", "resume=auto",
              f"data.cache_dir={cache_dir}", "hydra.sweep.dir=sweep"]
    first = run_cli("run", "-m", *common, "train.max_steps=4", "optim.lr=1e-3,2e-3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli("run", "-m", *common, "train.max_steps=6", "optim.lr=1e-3,2e-3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for job, lr in (("0", 1e-3), ("1", 2e-3)):
        assert [r["step"] for r in read_metrics(tmp_path / "sweep" / job)] == list(range(6))
        assert yaml.safe_load((tmp_path / "sweep" / job / ".hydra" / "config.yaml").read_text())["optim"]["lr"] == lr
    assert "resumed from" in (tmp_path / "sweep" / "1" / "run.log").read_text()

    before = {job: (tmp_path / "sweep" / job / "metrics.jsonl").read_bytes() for job in ("0", "1")}
    reordered = run_cli("run", "-m", *common, "train.max_steps=8", "optim.lr=2e-3,1e-3", cwd=tmp_path)
    assert reordered.returncode != 0
    assert ("error: job 0 (" in reordered.stderr
            and "job 0's dir holds another configuration of the sweep (optim.lr: 0.001 -> 0.002)" in reordered.stderr)
    assert "this time jobs 0, 1 failed beside earlier results" in reordered.stderr
    assert {job: (tmp_path / "sweep" / job / "metrics.jsonl").read_bytes() for job in ("0", "1")} == before

    plain = run_cli("run", "-m", *[c for c in common if c != "resume=auto"], "optim.lr=1e-3,2e-3", cwd=tmp_path)
    assert plain.returncode != 0 and "or resubmit that very sweep there with resume=auto" in plain.stderr
