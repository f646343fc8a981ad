"""Helpers for tests that run the CLI the way a user does."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


@functools.cache
def cpp_compiler_works() -> bool:
    """torch.compile on a CPU builds C++ with the system's compiler: is there one that compiles?"""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return False
    probe = subprocess.run([compiler, "-x", "c++", "-fsyntax-only", "-"], input="int main() { return 0; }\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


def cli_env(cwd: Path, env: dict | None = None) -> dict:
    """The environment of a fresh user: no W&B credentials (unless `env` gives them), HOME in `cwd`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update(HOME=str(cwd), PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    full_env.update(env or {})
    return full_env


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """`python -m gpt_exp.<module> ARGS` in `cwd`, to completion. A run that reaches no W&B server, alone or a sweep
    on the basic launcher (which runs its jobs in the calling process anyway), runs in this process: the same
    main(), argv, cwd, environment and captured output, without the ~3 s of a fresh interpreter importing torch."""
    if runs_in_process(module, args):
        return run_in_process(module, list(args), cwd, env)
    return subprocess.run([sys.executable, "-m", f"gpt_exp.{module}", *args], cwd=cwd, env=cli_env(cwd, env),
                          capture_output=True, text=True, timeout=timeout)


def runs_in_process(module: str, args: tuple[str, ...]) -> bool:
    if module != "run":
        return True  # the other commands start no process and no W&B run of their own
    offline = {"logger.mode=disabled", "logger.mode=offline"} & set(args)
    return bool(offline) and not any(arg.startswith("hydra/launcher=") and arg != "hydra/launcher=basic" for arg in args)


def run_in_process(module: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m gpt_exp.MODULE ARGS` as its `main()` in this process; what a fresh process would not share (Hydra's
    global state, the root logger's handlers, cwd, argv, the environment) is set up and put back around it."""
    import contextlib
    import importlib
    import io
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from gpt_exp import rundir

    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_argv, saved_env = os.getcwd(), sys.argv, dict(os.environ)
    fresh_env = cli_env(cwd, env)  # read before the clear: it starts from this process's environment
    os.environ.clear()
    os.environ.update(fresh_env)
    os.chdir(cwd)
    sys.argv = [f"gpt_exp.{module}", *args]
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers.clear()  # pytest's capture handlers: a fresh process has none, and logging.basicConfig adds its own
    main = importlib.import_module(f"gpt_exp.{module}").main
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = (main() if module == "run" else main(args)) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
        rundir.sweep_failures.clear()
        for handler in root.handlers[:]:  # the handlers of this command (Hydra's console and run.log for a run)
            handler.close()
            root.removeHandler(handler)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    return subprocess.CompletedProcess([f"gpt_exp.{module}", *args], code, out.getvalue(), err.getvalue())


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


def compose_config(*overrides: str):
    """The validated RunConfig that `python -m gpt_exp.run OVERRIDES` would train with, composed in this process."""
    from gpt_exp.cli import compose_run_config

    return compose_run_config(list(overrides))


class Collect:
    """A tracker that keeps what the loop reports, for Trainer.fit in a test."""

    wandb_id = None
    elapsed_s = 0.0

    def __init__(self):
        self.steps, self.evals, self.skips, self.samples, self.hellaswag = [], [], [], [], []
        self.val_bpb, self.core, self.by_source = [], [], []

    def log_step(self, m):
        self.steps.append(m)

    def log_eval(self, step, val_loss, val_bpb, by_source=None):
        self.evals.append((step, val_loss))
        self.val_bpb.append((step, val_bpb))
        self.by_source.append((step, by_source or {}))

    def log_skip(self, step, reason):
        self.skips.append((step, reason))

    def log_samples(self, step, samples):
        self.samples.append((step, samples))

    def log_hellaswag(self, step, scores):
        self.hellaswag.append((step, scores))

    def log_core(self, step, scores):
        self.core.append((step, scores))

    @property
    def losses(self):
        return [m.loss for m in self.steps]


def make_trainer(cache_dir: Path, *overrides: str, run_dir: Path | None = None):
    """A Trainer on this CPU, built as `python -m gpt_exp.run OVERRIDES` builds it (the tiny model unless told)."""
    from gpt_exp.device import resolve_runtime
    from gpt_exp.trainer import Trainer

    cfg = compose_config("model=tiny", "logger.mode=disabled", f"data.cache_dir={cache_dir}", *overrides)
    return Trainer(cfg, resolve_runtime(cfg.device), run_dir=run_dir)
