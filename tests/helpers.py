"""Helpers for tests that run the CLI the way a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def cli_env(cwd: Path, env: dict | None = None) -> dict:
    """The environment of a fresh user: no W&B credentials (unless `env` gives them), HOME in `cwd`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update(HOME=str(cwd), PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    full_env.update(env or {})
    return full_env


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """`python -m gpt_exp.<module> ARGS` in `cwd`, to completion."""
    return subprocess.run([sys.executable, "-m", f"gpt_exp.{module}", *args], cwd=cwd, env=cli_env(cwd, env),
                          capture_output=True, text=True, timeout=timeout)


def run_cli_async(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m gpt_exp.<module> ARGS` in `cwd`, started in the background (output in cwd/cli-N.log)."""
    log = open(cwd / f"cli-{len(list(cwd.glob('cli-*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-m", f"gpt_exp.{module}", *args], cwd=cwd, env=cli_env(cwd, env),
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def only_run_dir(cwd: Path) -> Path:
    """The single run dir a `python -m gpt_exp.run` in `cwd` created."""
    dirs = [p.parent for p in (cwd / "outputs").glob("*/*/.hydra")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_records(wandb_run_dir: Path) -> list[dict]:
    """Every record of an offline W&B run, read back with `wandb leet inspect --json`."""
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(wandb_run_dir)], capture_output=True, text=True,
                         check=True, env={**os.environ, "WANDB_SILENT": "true"})
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
