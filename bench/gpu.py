"""Benchmark 5 (needs a CUDA GPU): GPT-2 at T=1024 with bf16 autocast, TF32, SDPA flash attention, torch.compile and
fused AdamW, through the real run path (`python -m gpt_exp.run` in a child process); prints tok/s, MFU against the
GPU's dense bf16 peak (gpt_exp/device.py) and the peak of torch.cuda.max_memory_allocated. Goal on one H100: MFU >= 55%.
    python bench/gpu.py [--model gpt2] [--B 16 32 64 auto] [--steps 30] [overrides...]
    python bench/gpu.py --check      # every GPU figure in one go (bench/gpu_check.sh runs it after the CUDA tests)
--check: the main job on device=cuda, 124M at B=16/32/64 (and B=auto where this gpt_exp has it), model=modern at
B=16 (rope, RMSNorm, QK-norm, ReLU^2, softcap, value embeddings: tok/s, MFU and peak memory beside GPT-2's), gpt2-medium,
and a resume across a restart (SIGTERM at the first checkpoint, resume, losses against the straight run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt_exp.cli import compose_run_config, user_error_line
from gpt_exp.config import DType
from gpt_exp.device import peak_flops

# Runs gpt_exp.run as `python -m` would, and writes the process's CUDA memory peaks to a file at exit.
CHILD = """import atexit, json, runpy, sys, torch
peak_file = sys.argv.pop(1)
def write_peaks():
    if torch.cuda.is_initialized():
        json.dump({"max_memory_allocated": torch.cuda.max_memory_allocated(),
                   "max_memory_reserved": torch.cuda.max_memory_reserved()}, open(peak_file, "w"))
atexit.register(write_peaks)
runpy.run_module("gpt_exp.run", run_name="__main__", alter_sys=True)
"""
GiB = 2**30
NAMES = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1.5B", "tiny": "tiny",
         "modern": "modern 124M-shape (nanochat's architecture)"}


class Jobs:
    """Child runs of gpt_exp.run, each in a dir of its own under `work`, their output appended to `log`; with
    dry_run, only their command lines are printed."""

    def __init__(self, work: Path, log: Path, dry_run: bool, timeout_s: float, device: str = "cuda"):
        self.work, self.log, self.dry_run, self.timeout_s, self.count = work, log, dry_run, timeout_s, 0
        self.device = device  # cpu only to smoke-test this script
        self.cache = work / "tokens"  # one token cache: the corpus is tokenized once

    def command(self, overrides: list[str], peak_file: Path) -> list[str]:
        return [sys.executable, "-c", CHILD, str(peak_file), "logger.mode=disabled", f"data.cache_dir={self.cache}",
                *overrides]

    def start(self, name: str, overrides: list[str]) -> tuple[subprocess.Popen | None, Path]:
        self.count += 1
        cwd = self.work / f"{self.count:02d}-{name}"
        cmd = self.command(overrides, cwd / "peak.json")
        if self.dry_run:
            print(f"+ (cd {cwd} && python -m gpt_exp.run {' '.join(map(shlex.quote, cmd[4:]))})", flush=True)
            return None, cwd
        cwd.mkdir(parents=True)
        with open(self.log, "a") as log:  # the child keeps its own handle on the file
            log.write(f"\n=== {name}: python -m gpt_exp.run {shlex.join(cmd[4:])} (in {cwd})\n")
            log.flush()
            env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT), cwd

    def run(self, name: str, overrides: list[str]) -> dict | None:
        """Run to the end; what it left: rc, run_dir, rows (training rows of metrics.jsonl), summary, peaks."""
        proc, cwd = self.start(name, overrides)
        if proc is None:
            return None
        try:
            rc = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        return result(cwd, rc)


def result(cwd: Path, rc: int) -> dict:
    dirs = sorted(p.parent for p in cwd.glob("outputs/*/*/.hydra"))
    run_dir = dirs[-1] if dirs else None
    rows, summary, peaks = [], {}, {}
    if run_dir and (run_dir / "metrics.jsonl").exists():
        rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    if run_dir and (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    if (cwd / "peak.json").exists():
        peaks = json.loads((cwd / "peak.json").read_text())
    return {"rc": rc, "run_dir": run_dir, "rows": rows, "summary": summary, "peaks": peaks}


def failed(name: str, r: dict, log: Path) -> bool:
    if r["rc"] == 0 and r["rows"]:
        return False
    print(f"{name}: FAILED (exit code {r['rc']}, {len(r['rows'])} steps; see {log})", flush=True)
    return True


def peak_text(r: dict) -> str:
    allocated = r["peaks"].get("max_memory_allocated")
    return f"peak {allocated / GiB:.1f} GiB allocated" if allocated is not None else "peak unknown"


def throughput(jobs: Jobs, model: str, B: str, T: int, steps: int, warmup: int, extra: list[str]) -> None:
    """One line: tok/s, MFU and peak memory of `model` at sequence length T and micro-batch B (a number, or auto)."""
    name = f"{NAMES.get(model, model)} B={B} T={T}{' bf16 compile' if jobs.device == 'cuda' else ''}"
    r = jobs.run(f"{model}-B{B}", [f"model={model}", f"device={jobs.device}", f"B={B}", f"T={T}",
                                   f"train.max_steps={steps}", *extra])
    if r is None or failed(name, r, jobs.log):
        return
    rows = r["rows"][warmup:] or r["rows"]
    tok_per_s = statistics.median(row["tok_per_s"] for row in rows)
    mfu = f"MFU {statistics.median(row['mfu'] for row in rows):.1%}" if "mfu" in rows[0] else "MFU unknown (no peak)"
    runtime = r["summary"].get("runtime", {})
    chosen = f" -> B={runtime.get('B')} x {runtime.get('grad_accum_steps')} micro-steps" if B == "auto" else ""
    goal = " (goal >= 55% on H100)" if model == "gpt2" else ""
    print(f"{name}{chosen}: {tok_per_s:,.0f} tok/s, {mfu}{goal}, {peak_text(r)} (median of steps {warmup}-{steps - 1})",
          flush=True)


def main_job(jobs: Jobs, name: str, main: list[str], extra: list[str]) -> dict | None:
    """The README's main job (124M, B=4, T=32, 50 steps on tiny shakespeare) on the GPU."""
    r = jobs.run("main", [f"device={jobs.device}", *main, *extra])
    if r is None or failed(name, r, jobs.log):
        return None
    s = r["summary"]
    print(f"{name}: {s['status']}, final loss {s['final_loss']:.4f}, median {s['median_tok_per_s']:,.0f} tok/s, "
          f"wall {s['wall_s']:.1f} s, {peak_text(r)}", flush=True)
    return r


def resume_check(jobs: Jobs, straight: dict | None, main: list[str], steps: int, extra: list[str]) -> None:
    """The main job again, stopped by SIGTERM at its first checkpoint (it checkpoints and exits 143), resumed in a
    new process from its newest checkpoint; the losses must be the straight run's."""
    name = f"resume across a restart on {jobs.device}"
    proc, cwd = jobs.start("stopped", [f"device={jobs.device}", *main, f"train.ckpt_every={max(1, steps // 5)}",
                                       "train.keep_ckpts=10", *extra])
    if proc is None:
        print("  (stopped by SIGTERM once its first checkpoint is written, then resumed:)")
        jobs.run("resumed", [f"device={jobs.device}", *main, *extra, "resume=<the stopped run's newest checkpoint>"])
        return
    deadline = time.monotonic() + jobs.timeout_s
    while proc.poll() is None and not list(cwd.glob("outputs/*/*/checkpoints/step_*.pt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    stopped = result(cwd, rc)
    checkpoints = sorted((stopped["run_dir"] / "checkpoints").glob("step_*.pt")) if stopped["run_dir"] else []
    checkpoints = [p for p in checkpoints if int(p.stem.split("_")[1]) < steps]
    if not checkpoints:
        print(f"{name}: FAILED (the stopped run, exit code {rc}, wrote no checkpoint before step {steps}; see "
              f"{jobs.log})", flush=True)
        return
    resumed = jobs.run("resumed", [f"device={jobs.device}", *main, *extra, f"resume={checkpoints[-1]}"])
    at = int(checkpoints[-1].stem.split("_")[1])
    if failed(name, resumed, jobs.log):
        return
    if straight is None:
        print(f"{name}: stopped at step {at} (exit code {rc}) and resumed to step {len(resumed['rows'])}; no straight "
              f"run to compare with (the main job failed)")
        return
    want = {row["step"]: row["loss"] for row in straight["rows"]}
    got = {row["step"]: row["loss"] for row in resumed["rows"] if row["step"] >= at}
    diffs = [abs(loss - want[step]) for step, loss in got.items() if step in want]
    worst = max(diffs) if diffs else float("nan")
    verdict = "bitwise equal" if worst == 0 else "PASS" if worst < 1e-2 else "FAIL"
    print(f"{name}: stopped by SIGTERM at step {at} (exit code {rc}), resumed to step {max(got, default=at)}: "
          f"max |loss - straight run's| = {worst:.3g} over {len(diffs)} steps after the restart: {verdict}", flush=True)


def auto_missing() -> str | None:
    """Why this gpt_exp cannot run B=auto (its config rejects it), or None when it can."""
    try:
        compose_run_config(["B=auto", "T=32", "train.total_batch_size=1024"])
        return None
    except Exception as e:  # a config that rejects B=auto, whatever the error's type
        return user_error_line(e)


def check(jobs: Jobs, args: argparse.Namespace, extra: list[str]) -> None:
    """Every figure of the GPU check, one line each, skipping what would pass the time budget."""
    start = time.monotonic()
    missing = auto_missing() if "auto" in args.B + args.medium_B else None

    def due(what: str) -> bool:
        if time.monotonic() - start > args.budget_s:
            print(f"{what}: skipped (past the --budget-s {args.budget_s:.0f} s)", flush=True)
            return False
        return True

    main = [f"model={args.main_model}", f"train.max_steps={args.main_steps}"]
    label = f"main job on {jobs.device} ({NAMES.get(args.main_model, args.main_model)}, B=4 T=32, {args.main_steps} steps)"
    straight = main_job(jobs, label, main, extra) if due("main job") else None
    for model, Bs in ((args.model, args.B), (args.modern_model, args.modern_B), (args.medium_model, args.medium_B)):
        for B in Bs:
            if B == "auto" and missing:
                print(f"{NAMES.get(model, model)} B=auto: skipped (this gpt_exp has no B=auto yet: {missing})",
                      flush=True)
            elif due(f"{NAMES.get(model, model)} B={B}"):
                auto = [f"train.total_batch_size={args.auto_total}"] if B == "auto" else []
                throughput(jobs, model, B, args.T, args.steps, args.warmup, [*auto, *extra])
    if due("resume across a restart"):
        resume_check(jobs, straight, main, args.main_steps, extra)
    if not jobs.dry_run:
        print(f"gpu check: {time.monotonic() - start:.0f} s; the runs' output is in {jobs.log}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="model config (gpt2, gpt2-medium, ...)")
    parser.add_argument("--B", nargs="+", default=None,
                        help="micro-batches, `auto` for B=auto (default: 16 32 64, and auto with --check)")
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out (compilation, allocator warm-up)")
    parser.add_argument("--check", action="store_true", help="every GPU figure: main job, 124M, medium, resume")
    parser.add_argument("--modern-model", default="modern", help="--check: nanochat's architecture beside GPT-2's")
    parser.add_argument("--modern-B", nargs="*", default=["16"], help="--check: its micro-batches (none: skip it)")
    parser.add_argument("--medium-model", default="gpt2-medium", help="--check: the second model")
    parser.add_argument("--medium-B", nargs="*", default=["16"], help="--check: its micro-batches (none: skip it)")
    parser.add_argument("--main-model", default="gpt2", help="--check: the main job's model (B=4, T=32)")
    parser.add_argument("--main-steps", type=int, default=50, help="--check: the main job's and resume's steps")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script on a CPU")
    parser.add_argument("--auto-total", type=int, default=131072, help="train.total_batch_size of the B=auto runs")
    parser.add_argument("--budget-s", type=float, default=420, help="--check: skip what starts later than this")
    parser.add_argument("--timeout-s", type=float, default=300, help="a child run is killed after this")
    parser.add_argument("--log-dir", type=Path, default=None, help="where gpu_check.log goes ($OUT, else a temp dir)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' command lines; run nothing")
    parser.add_argument("overrides", nargs="*", help="more gpt_exp overrides, e.g. data=text data.path=...")
    args = parser.parse_args()
    args.B = args.B or ["16", "32", "64", *(["auto"] if args.check else [])]
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        print(f"error: bench/gpu.py needs a CUDA GPU (torch {torch.__version__} is {build}); --dry-run prints what it "
              f"would run", file=sys.stderr)
        raise SystemExit(2)
    top = Path(tempfile.gettempdir(), "gpu_check-DRYRUN") if args.dry_run else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    log_dir = args.log_dir or Path(os.environ.get("OUT") or top)
    if not args.dry_run:
        log_dir.mkdir(parents=True, exist_ok=True)
    jobs = Jobs(top / "runs", log_dir / "gpu_check.log", args.dry_run, args.timeout_s, args.device)
    if args.device == "cuda" and not args.dry_run:
        name, peak = torch.cuda.get_device_name(), peak_flops(torch.cuda.get_device_name(), DType.bf16, tf32=True)
        peak_line = f"dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "no known peak (no MFU)"
        print(f"device: {name} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB, {peak_line}), "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    try:
        if args.check:
            check(jobs, args, args.overrides)
        else:
            for B in args.B:
                throughput(jobs, args.model, B, args.T, args.steps, args.warmup, args.overrides)
    finally:
        shutil.rmtree(top / "runs", ignore_errors=True)  # run dirs, checkpoints, token cache: made here; the log stays
        if not args.dry_run and not any(top.iterdir()):
            top.rmdir()


if __name__ == "__main__":
    main()
