"""Where a run's numbers go: metrics.jsonl (every step), the terminal (progress bar), and W&B (if it works).

Logging never kills a run: a W&B failure is one warning line and the local files stay complete.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gpt_exp.atomic import atomic_write_bytes
from gpt_exp.config import LoggerConfig, LoggerMode
from gpt_exp.errors import UserError, first_line
from gpt_exp.plots import plot_loss_curve
from gpt_exp.metrics import StepMetrics
from gpt_exp.run_reader import run_stats

log = logging.getLogger(__name__)


def _wandb_host() -> tuple[str, int]:
    """The W&B server's host and port (WANDB_BASE_URL, else the installed wandb's default server)."""
    import wandb  # imported here: ~0.3 s that a run with logger.mode=disabled never pays

    url = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def wandb_credentials_present() -> bool:
    """True when `wandb login` or WANDB_API_KEY has provided a key (never read into our own state)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(_wandb_host()[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the W&B server cannot be reached, or None. W&B itself would retry for a minute before giving up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None  # behind a proxy a direct connection says nothing; let W&B try
    host, port = _wandb_host()
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return None
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


def resolve_wandb_mode(mode: LoggerMode) -> str:
    if mode != LoggerMode.auto:
        return mode.value
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_present() else "offline"


# W&B by default waits 90 s for wandb.init and without end for run.finish's upload; a run waits a few seconds, then
# keeps its history on disk (offline, or the online run's own file), where `wandb sync` uploads it later.
_INIT_TIMEOUT_S = 5
_FINISH_TIMEOUT_S = 5
_START_WAIT_S = 30  # only a guard: the start ends within the reachability check, the init timeout and an offline start


class WandbRun:
    """A W&B run that falls back to offline, then to nothing, when W&B fails; metrics.jsonl is the source of truth.

    W&B starts in a background thread (about a second: its import, its service process, a reachability check; at
    most _INIT_TIMEOUT_S more when the server fails), so training starts at once: rows logged meanwhile wait in
    memory and go to W&B, in order, once it has started. finish() waits at most _FINISH_TIMEOUT_S for the upload.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: Path, name: str, group: str | None, config: dict,
                 resume_id: str | None = None):
        self._run = None
        self._starting: threading.Thread | None = None
        self._pending: list[tuple[dict, int]] = []  # rows logged while W&B starts
        self._abandoned = False
        self.mode = resolve_wandb_mode(cfg.mode)
        if self.mode == "disabled":
            return
        # W&B reports its own failures to the same server at process exit, waiting ~20 s on one that does not
        # answer; set here, before any thread of ours reads the environment
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        init_args = dict(dir=str(run_dir), project=cfg.project, entity=cfg.entity, group=group, name=name,
                         tags=list(cfg.tags), config=config)
        if resume_id:  # continue the W&B run of the checkpoint: same id, history appended
            init_args.update(id=resume_id, resume="allow")
        self._starting = threading.Thread(target=self._start, args=(init_args,), name="wandb-init", daemon=True)
        self._starting.start()

    def _start(self, init_args: dict) -> None:
        import wandb  # here, in the start thread: ~0.3 s that training does not wait for

        if self.mode == "online" and not wandb_credentials_present():
            log.warning("logger.mode=online but no W&B API key (run `wandb login` or set WANDB_API_KEY); "
                        "logging offline instead")
            self.mode = "offline"
        elif self.mode == "online" and (reason := wandb_unreachable_reason()):
            log.warning("W&B server unreachable (%s); logging offline instead", reason)
            self.mode = "offline"
        # a failed online init (bad key, server error) still keeps the history, offline and syncable later
        modes = [self.mode, "offline"] if self.mode == "online" else [self.mode]
        wandb_dir = Path(init_args["dir"]) / "wandb"
        failures = []
        for mode in modes:
            before = set(wandb_dir.glob("run-*"))
            try:
                self._run, self.mode = _wandb_init(mode, init_args), mode
                _define_metrics(self._run)
                break
            except Exception as e:  # noqa: BLE001 -- whatever W&B raises, the run goes on
                failures.append(f"{mode}: {type(e).__name__}: {first_line(e, 200)}")
            if mode == "online":
                # The failed online run still holds its id in W&B's service process ("run ID is in use"): end that
                # process (the next init starts another). Its folder, run-<time>-<id>, holds no history yet: the
                # offline run takes its id (so `wandb sync` continues that run) and the folder goes (this process
                # created it just now), so that one W&B run dir remains.
                wandb.teardown()
                for stray in set(wandb_dir.glob("run-*")) - before:
                    init_args.setdefault("id", stray.name.rsplit("-", 1)[-1])
                    shutil.rmtree(stray, ignore_errors=True)  # a leftover would be harmless
        if failures:
            outcome = "logging offline instead" if self._run else "continuing with local logs only"
            log.warning("W&B init failed (%s); %s", "; ".join(failures), outcome)

    @property
    def run(self):
        """The W&B run once it has started (None if disabled or failed); waits for the start, within bounds."""
        if self._starting is not None:
            self._starting.join(_START_WAIT_S)
            if self._starting.is_alive():  # stuck past W&B's own timeouts: give up; W&B's exit hook ends it
                log.warning("W&B did not start in %d s; continuing with local logs only", _START_WAIT_S)
                self._abandoned = True
            self._starting = None
        return None if self._abandoned else self._run

    def log(self, row: dict, step: int) -> None:
        if self.mode == "disabled":
            return
        self._pending.append((row, step))
        if self._starting is not None and self._starting.is_alive():
            return  # W&B is still starting: the row waits for it, training does not
        self._send_pending()

    def log_table(self, key: str, columns: list[str], data: list[list], step: int) -> None:
        """A W&B Table (e.g. samples), queued like any row while W&B starts."""
        if self.mode == "disabled":
            return
        import wandb  # already imported by the start thread: free here

        self.log({key: wandb.Table(columns=columns, data=data)}, step=step)

    def _send_pending(self) -> None:
        rows, self._pending = self._pending, []
        if self.run is None:
            return
        try:
            for row, step in rows:
                self._run.log(row, step=step)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging failed (%s); continuing with local logs only", first_line(e, 200))
            self._run = None

    def finish(self, summary: dict | None = None) -> None:
        """Send what is pending, then `summary` (status, best losses, what ran) as the run's W&B summary."""
        self._send_pending()
        if self.run is None:
            return
        try:
            # loss, val_loss and val_bpb keep W&B's min summary (define_metric); the rest describes the run
            self._run.summary.update({k: v for k, v in (summary or {}).items()
                                      if k not in ("loss", "val_loss", "val_bpb")})
        except Exception as e:  # noqa: BLE001
            log.warning("W&B summary failed (%s)", first_line(e, 200))
        run, self._run = self._run, None
        run_dir = Path(run.dir).parent  # .../wandb/offline-run-*/files -> the run's folder
        try:
            run.finish()
        except TimeoutError:  # finish_timeout_raises: the unsent rest stays in run_dir
            log.warning("W&B upload did not finish in %d s; upload the rest with: wandb sync %s",
                        _FINISH_TIMEOUT_S, run_dir)
            return
        except Exception as e:  # noqa: BLE001
            log.warning("W&B finish failed (%s: %s)", type(e).__name__, first_line(e, 200))
        if self.mode == "offline":
            log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)


def _define_metrics(run) -> None:
    """Curves against tokens (runs with other batch shapes stay comparable), and loss summaries that keep the best
    value instead of the last, noisy one."""
    run.define_metric("tokens")
    for name, summary in (("loss", "min"), ("val_loss", "min"), ("val_bpb", "min"), ("lr", None), ("grad_norm", None),
                          ("val_loss/*", "min"), ("val_bpb/*", "min")):  # a mixture's, per source
        run.define_metric(name, step_metric="tokens", **({"summary": summary} if summary else {}))


def _wandb_init(mode: str, init_args: dict):
    import wandb

    # console="off": the run's own log file has the console; W&B's capture would fight the progress bar
    settings = wandb.Settings(console="off", silent=True, init_timeout=_INIT_TIMEOUT_S,
                              finish_timeout=_FINISH_TIMEOUT_S, finish_timeout_raises=True)
    return wandb.init(mode=mode, settings=settings, **init_args)


class ProgressBar:
    """On a terminal, tqdm's bar redrawn in place (other log lines printed above it, through its logging redirect),
    while run.log still gets every step's line; elsewhere (files, CI, a joblib worker) a plain log line per update."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self.bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, unit="step", dynamic_ncols=True,
                            bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def update(self, m: StepMetrics) -> None:
        done = m.step + 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, done - self.start) * (self.total - done)
        text = (f"step {done}/{self.total} | loss {m.loss:.4f} | lr {m.lr:.2e} | norm {m.grad_norm:.3f} "
                f"| {m.dt_ms:.0f} ms | {m.tok_per_s:,.0f} tok/s | ETA {_clock(eta)}")
        if self.bar is None:
            log.info(text)
            return
        self.bar.set_postfix_str(f"loss {m.loss:.4f} | lr {m.lr:.2e} | {m.tok_per_s:,.0f} tok/s", refresh=False)
        self.bar.update(done - self.bar.n)
        _to_log_files(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None


def _to_log_files(text: str) -> None:
    """A log line for the run's log files only (run.log): the terminal shows the bar instead."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Tracker:
    """Sends each step to metrics.jsonl, the progress bar and W&B; writes loss.png and a summary at the end."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, name: str, group: str | None, config: dict, total_steps: int,
                 log_every: int = 1, started_at: float | None = None, previous_rows: list[dict] | None = None,
                 wandb_id: str | None = None, summary_extra: dict | None = None, flops_per_token: float = 0.0,
                 peak_flops: float | None = None, runtime: dict | None = None):
        """previous_rows: the history of the run this one resumes (copied into metrics.jsonl, counted in the
        summary); wandb_id: the W&B run to continue."""
        self.t0 = started_at if started_at is not None else time.perf_counter()  # wall time counts from here
        self.run_dir, self.name, self.log_every = run_dir, name, log_every
        self.rows: list[dict] = list(previous_rows or [])
        self.summary_extra = summary_extra or {}
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops  # peak of all ranks together
        self.runtime = runtime or {}
        # a resumed run's clock goes on from where its history ends, so `elapsed_s` is one axis across restarts
        self.elapsed_before = next((r["elapsed_s"] for r in reversed(self.rows) if "elapsed_s" in r), 0.0)
        # The history this run continues is written whole first (atomically: a resume into the run's own dir replaces
        # its file, rows past the checkpoint included), then every step is appended as one line.
        metrics_path = run_dir / "metrics.jsonl"
        try:
            atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
            # until it ends, the run's summary says it is running: a resumed run killed mid-way leaves no stale
            # `completed` beside its longer history
            write_summary(run_dir, {"status": "running", **self.summary_extra})
            self.metrics_file = open(metrics_path, "a", buffering=1)  # line-buffered: a crash loses no row
        except OSError as e:
            raise UserError(f"cannot write {metrics_path} ({e.strerror}); free disk space or fix permissions of "
                            f"{run_dir}") from None
        start_step = self.rows[-1]["step"] + 1 if self.rows else 0
        self.progress = ProgressBar(total_steps, start_step)
        self.total_steps = total_steps
        self.wandb = WandbRun(cfg, run_dir, name, group, {**config, "runtime": self.runtime}, resume_id=wandb_id)

    @property
    def elapsed_s(self) -> float:
        """The run's wall time so far, over all its segments (a resume's clock goes on from its history's)."""
        return self.elapsed_before + time.perf_counter() - self.t0

    @property
    def tokens_seen(self) -> int:
        return next((r["tokens"] for r in reversed(self.rows) if "tokens" in r), 0)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.run.id if self.wandb.run is not None else None

    def log_step(self, m: StepMetrics) -> None:
        row = asdict(m)
        row.update({f"tokens/{name}": n for name, n in (row.pop("source_tokens") or {}).items()})
        # the axes runs are compared on: wall time since the run started, and the training FLOPs so far
        row["elapsed_s"] = round(self.elapsed_s, 3)
        row["flops"] = m.tokens * self.flops_per_token
        if self.peak_flops:  # model FLOPs utilization: achieved FLOP/s over the devices' dense peak
            row["mfu"] = m.tok_per_s * self.flops_per_token / self.peak_flops
        self.rows.append(row)
        self._write(row)
        self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=m.step)
        if (m.step + 1) % self.log_every == 0 or m.step + 1 == self.total_steps:
            self.progress.update(m)

    def log_eval(self, step: int, val_loss: float, val_bpb: float, by_source: dict | None = None) -> None:
        """A val_loss row with its bits per byte, and a mixture's val_loss/NAME and val_bpb/NAME (no `loss` key: rows
        are counted as training steps by `loss`)."""
        row = {"step": step, "val_loss": val_loss, "val_bpb": val_bpb, **(by_source or {}), "tokens": self.tokens_seen}
        self.rows.append(row)
        self._write(row)
        self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        log.info("step %d | val loss %.4f | val bpb %.4f%s", step + 1, val_loss, val_bpb,
                 "".join(f" | {k} {v:.4f}" for k, v in (by_source or {}).items()))

    def _write(self, row: dict) -> None:
        try:
            self.metrics_file.write(json.dumps(row) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.metrics_file.name} ({e.strerror}); free disk space, then resume "
                            f"from the last checkpoint") from None

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Texts sampled during training: run.log, samples.jsonl (one row each) and a W&B table."""
        rows = [{"step": step, "tokens": self.tokens_seen, **sample} for sample in samples]
        try:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        except OSError as e:
            raise UserError(f"cannot write {self.run_dir / 'samples.jsonl'} ({e.strerror}); free disk space") from None
        for row in rows:
            log.info("step %d sample: %r", step + 1, row["text"])
        self.wandb.log_table("samples", ["step", "tokens", "prompt", "text"], [list(r.values()) for r in rows],
                             step=step)

    def log_hellaswag(self, step: int, scores: dict) -> None:
        self._log_scores(step, scores)
        log.info("step %d | hellaswag acc_norm %.4f (%d examples)", step + 1, scores["hellaswag_acc_norm"],
                 scores["hellaswag_examples"])

    def log_core(self, step: int, scores: dict) -> None:
        self._log_scores(step, scores)
        log.info("step %d | CORE %.4f (%d tasks, %d examples)", step + 1, scores["core"],
                 sum(k.startswith("core_acc/") for k in scores), scores["core_examples"])

    def _log_scores(self, step: int, scores: dict) -> None:
        """An evaluation during training (HellaSwag, CORE): a metrics row (no `loss`: not a training step), W&B, and
        the summary's last scores."""
        row = {"step": step, "tokens": self.tokens_seen, **scores}
        self.rows.append(row)
        self._write(row)
        self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def log_skip(self, step: int, reason: str) -> None:
        """A step that was not applied (non-finite loss or gradient norm): a row without `loss`, and a warning."""
        row = {"step": step, "skipped": reason}
        self.rows.append(row)
        self._write(row)
        log.warning("step %d skipped: %s", step + 1, reason)

    def close(self, status: str = "completed", reason: str | None = None, raise_errors: bool = True) -> dict:
        """Finish every sink; write summary.json (status: completed, failed, interrupted or diverged, and the one-line
        reason of a failure); return it. Every sink is tried even when one cannot be written; then, with raise_errors,
        the first failure is one UserError (without: the error that ended the run is the one to report, not this)."""
        problems = []

        def attempt(what: str, write) -> None:
            try:
                write()
            except (OSError, UserError) as e:
                problems.append(f"cannot write {what} ({getattr(e, 'strerror', None) or e})")

        self.progress.close()
        attempt(self.metrics_file.name, self.metrics_file.close)
        wall = time.perf_counter() - self.t0
        # wall_s: the whole run over its segments; segment_wall_s: this process's part of it
        summary: dict = {"status": status, "steps": 0, "wall_s": round(self.elapsed_before + wall, 3),
                         "segment_wall_s": round(wall, 3), **self.summary_extra}
        if reason:
            summary["error"] = reason
        for marker, prefix in (("hellaswag_acc_norm", "hellaswag"), ("core", "core")):  # the last scores of each eval
            if scored := [r for r in self.rows if marker in r]:
                summary.update({k: v for k, v in scored[-1].items() if k.startswith(prefix)})
        stats = run_stats(self.rows)
        summary.update({k: v for k, v in stats.items() if v is not None})
        if stats["steps"]:
            log.info(
                "%s: %d steps, final loss %.4f%s, median %s tok/s, wall %.1f s, run dir %s",
                "done" if status == "completed" else status, stats["steps"], summary["final_loss"],
                f", val loss {stats['final_val_loss']:.4f}" if stats["final_val_loss"] is not None else "",
                f"{summary['median_tok_per_s']:,.0f}", wall, self.run_dir,
            )
        summary.update(flops_per_token=self.flops_per_token, runtime=self.runtime)
        # the record first: a second Ctrl-C or SIGTERM during the slow sinks after it (the plot, W&B's upload) must
        # not leave a summary that says `running` beside a run that has ended
        attempt(str(self.run_dir / "summary.json"), lambda: write_summary(self.run_dir, summary))
        if stats["steps"]:
            attempt(str(self.run_dir / "loss.png"),
                    lambda: plot_loss_curve(self.rows, self.run_dir / "loss.png", title=self.name))
        self.wandb.finish(summary)
        if problems and raise_errors:
            raise UserError(f"{problems[0]}; free disk space or fix permissions (metrics.jsonl holds every step)")
        return summary


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=1).encode())


class RankTracker:
    """The tracker of a rank other than 0 under DDP: it writes nothing, since rank 0 alone owns the run's outputs."""

    wandb_id = None
    elapsed_s = 0.0

    def __init__(self) -> None:
        self.tokens_seen = 0

    def log_step(self, m: StepMetrics) -> None:
        self.tokens_seen = m.tokens

    def log_eval(self, step: int, val_loss: float, val_bpb: float, by_source: dict | None = None) -> None:
        pass

    def log_skip(self, step: int, reason: str) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict]) -> None:
        pass

    def log_hellaswag(self, step: int, scores: dict) -> None:
        pass

    def log_core(self, step: int, scores: dict) -> None:
        pass

    def close(self, status: str = "completed", reason: str | None = None, raise_errors: bool = True) -> dict:
        return {}
