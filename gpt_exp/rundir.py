"""The run and sweep dirs under outputs/: who creates them, who owns one, what a run may remove, and the names W&B
shows for them.

This module is the one owner of a run dir's life. One process at a time owns a run dir: it holds the dir's lock from
before Hydra writes there until the run ends, and a second process (a requeue while the job still runs) is refused
in one line naming the holder. A run never removes what it did not create: a start that fails removes only the
entries it recorded as it made them. It refuses a dir that holds another run or files a run would replace, unless
it resumes that very run in place. Under torchrun only rank 0 writes there. Dirs are named by time to the second; a
second run in the same second gets a suffix (`_1`) instead of sharing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gpt_exp.atomic import atomic_write_bytes
from gpt_exp.errors import ConfigError
from gpt_exp.launch import is_main_process

log = logging.getLogger(__name__)

# Overrides that say where a run writes, not what it learns: left out of W&B names.
_NOT_IN_NAMES = ("hydra.", "hydra/", "logger.", "data.cache_dir", "+experiment", "experiment")
# Every name a run (or a sweep) writes in its dir: a dir holding any of them holds another run, or files a run
# would overwrite or replace (a project's own model/ or loss.png), so the guard refuses it.
_RUN_OUTPUTS = (".hydra", "metrics.jsonl", "summary.json", "checkpoints", "run.log", "multirun.yaml", "loss.png",
                "model", "model_best", "samples.jsonl", "eval.json", "wandb")
RECORD = Path(".hydra") / "config.yaml"  # the config a run trained with: what every reader of a run dir reads
LOCK = ".gpt_exp.lock"  # held (flock) by the one process that owns a run dir, for the run's whole life
_JOB_LOG = "run.log"  # Hydra's job log, ${hydra.job.name}.log


@dataclass
class _Claim:
    """What this process knows of a dir it runs in: whether it created it and which entries it created there."""

    created: bool
    created_entries: list[str] = field(default_factory=list)  # names this process put into the dir, in order
    new_parents: tuple[str, ...] = ()  # the folders above it that claim_dir made too (outputs/, its date), deepest first
    started: bool = False  # the run has begun writing results: from now on nothing in it is removed


_claims: dict[str, _Claim] = {}
_fresh: set[str] = set()  # dirs claim_dir has just made, not yet checked by a guard
_locks: dict[str, int] = {}  # run dir -> the open file descriptor holding its lock
sweep_failures: list[str] = []  # "3 jobs: 2 completed, 1 diverged" when a sweep of this process had a failed job
# Jobs of this process's sweep that failed where an earlier attempt's summary.json stays (a requeued sweep's job
# refused): their dirs' summaries do not show this attempt's failure, so the tally adds them.
jobs_failed_beside_results: list[int] = []


def _key(path: str | Path) -> str:
    return os.path.abspath(str(path))  # no ~ expansion: Hydra writes hydra.run.dir="~/r" into ./~/r, so guard that


def claim_dir(path: str) -> str:
    """Create `path` (or `path_1`, `path_2`, ...) atomically and return the one this process now owns.

    Registered with use_cache=True, so it runs once per config: Hydra copies the resolver cache from the
    sweep's config to each job's, so every job of a sweep sees the same sweep dir.
    """
    candidate, n = path, 0
    while True:
        new_parents = _missing_parents(candidate)
        try:
            os.makedirs(candidate)
            _claims[_key(candidate)] = _Claim(created=True, new_parents=new_parents)
            _fresh.add(_key(candidate))
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{path}_{n}"


def _missing_parents(path: str) -> tuple[str, ...]:
    parents = []
    for parent in Path(_key(path)).parents:
        if parent.exists():
            break
        parents.append(str(parent))
    return tuple(parents)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("claim_dir"):
        OmegaConf.register_new_resolver("claim_dir", claim_dir, use_cache=True)


def holds_run(path: Path) -> list[str]:
    """The entries of `path` a run or sweep writes ([] for a fresh or unrelated dir)."""
    return sorted(name for name in _RUN_OUTPUTS if (path / name).exists()) if path.is_dir() else []


def is_run_dir(path: Path) -> bool:
    """A dir a gpt_exp run wrote: its recorded config beside its metrics, summary or checkpoints."""
    return (path / RECORD).is_file() and any((path / n).exists() for n in ("metrics.jsonl", "summary.json", "checkpoints"))


def _resume_dir(resume: str | None) -> Path | None:
    """The run dir a `resume=` target belongs to (RUN_DIR, or RUN_DIR/checkpoints/step_N.pt)."""
    if not resume:
        return None
    target = Path(resume).expanduser()
    return target.parent.parent if target.suffix == ".pt" else target


def guard(path: str | Path, resume: str | None = None) -> None:
    """Before Hydra writes anything into the run dir `path`: take its lock (one process per run dir), and refuse a
    dir that holds another run or files a run would replace, unless this run resumes that very run into it."""
    key = _key(path)
    existing = Path(key)
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"hydra.run.dir={path} is a file, not a dir; give a new dir or leave hydra.run.dir unset")
    fresh = key in _fresh  # claim_dir created it just now, empty
    _fresh.discard(key)
    if not fresh:
        _claims[key] = _Claim(created=not existing.exists(), new_parents=_missing_parents(key))  # this start's own
        existing.mkdir(parents=True, exist_ok=True)
    lock(existing)  # first: a dir another process holds is refused naming the holder, whatever it holds now
    markers = [] if fresh else holds_run(existing)
    resume_dir = existing if resume == "auto" else _resume_dir(resume)  # auto: this dir's own run goes on
    in_place = resume_dir is not None and _key(resume_dir) == key
    if markers and in_place and not is_run_dir(existing):
        raise ConfigError(f"hydra.run.dir={path} holds files a run writes ({', '.join(markers)}) but no gpt_exp run "
                          f"to continue (no {RECORD} beside metrics, summary or checkpoints); give a new dir")
    if markers and not in_place:
        raise ConfigError(f"hydra.run.dir={path} already holds another run or the files one writes "
                          f"({', '.join(markers)}); continue that run with resume={path} hydra.run.dir={path}, or "
                          f"give a new dir (or leave hydra.run.dir unset)")
    if not (existing / _JOB_LOG).exists():
        created(existing, _JOB_LOG)  # Hydra opens it next


def guard_sweep(path: str | Path, resume: str | None = None) -> None:
    """Before a sweep starts: its dir must not hold another sweep, whose job dirs the new jobs would write into.
    With resume=auto it may hold this sweep, resubmitted (a requeued array job): each job goes on from its own dir's
    checkpoint, and a job whose dir holds another configuration is refused (job.same_job)."""
    key = _key(path)
    existing = Path(key)
    if key in _fresh:  # claim_dir created it just now, empty
        _fresh.discard(key)
    else:
        jobs = [p.name for p in existing.iterdir() if holds_run(p)] if existing.is_dir() else []
        requeued = resume == "auto" and (existing / "multirun.yaml").is_file()
        if (holds_run(existing) or jobs) and not requeued:
            raise ConfigError(f"hydra.sweep.dir={path} already holds a sweep or run "
                              f"({', '.join(holds_run(existing) + jobs)}); give a new dir (or leave hydra.sweep.dir "
                              f"unset), or resubmit that very sweep there with resume=auto")
        _claims[key] = _Claim(created=not existing.exists())
    if not (existing / "multirun.yaml").exists():
        created(existing, "multirun.yaml")  # the launcher writes it next


def created(path: str | Path, name: str) -> None:
    """Record that this process put entry `name` into dir `path`: a failed start removes exactly these."""
    claim = _claims.setdefault(_key(path), _Claim(created=False))
    if name not in claim.created_entries:
        claim.created_entries.append(name)


def lock(run_dir: Path) -> None:
    """Hold `run_dir`'s lock for this process's run, or refuse in one line naming the holder (host, pid, start).

    The lock is an flock, so a holder that dies (kill -9, a lost node) releases it; the file says who holds it.
    """
    key = _key(run_dir)
    if key in _locks:
        return
    path = Path(key) / LOCK
    while True:
        is_new = not path.exists()
        try:  # never through a link: the lock's JSON would overwrite what it points to
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot take {path}, the run dir's lock ({e.strerror}); it must be a file gpt_exp makes: "
                              f"remove it if no gpt_exp process runs there, or give a new dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise ConfigError(f"{run_dir} is in use by another gpt_exp process ({_holder(path)}); wait for it to end "
                              f"or stop it, or give a new dir") from None
        if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break
        os.close(fd)  # the holder removed the file as we opened it: try the new one
    previous = _holder(path)
    if previous != "unknown":
        log.warning("%s: took over the lock of a process that is gone (%s)", run_dir, previous)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _locks[key] = fd
    if is_new:
        created(run_dir, LOCK)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def unlock(run_dir: str | Path) -> None:
    """Give up `run_dir`'s lock (the file goes first, so a waiting process finds the next one's)."""
    fd = _locks.pop(_key(run_dir), None)
    if fd is None:
        return
    try:
        os.unlink(Path(_key(run_dir)) / LOCK)
    except OSError:
        pass  # a dir that is gone or read-only: the flock still ends with the descriptor
    os.close(fd)


def record(run_dir: Path, config: dict, overrides: tuple[str, ...] | list[str]) -> None:
    """Write what the run trains with, `config` (resolved: no interpolation left), and this command's overrides into
    RUN_DIR/.hydra, where every reader of a run dir looks; written atomically once the run is about to train, so
    that a start that failed never replaces the record of the run it meant to continue."""
    folder = run_dir / RECORD.parent
    if not folder.exists():
        folder.mkdir()
        created(run_dir, RECORD.parent.name)
    atomic_write_bytes(run_dir / RECORD, yaml.safe_dump(config, sort_keys=False).encode())
    atomic_write_bytes(folder / "overrides.yaml", yaml.safe_dump(list(overrides)).encode())


def mark_started(path: str | Path) -> None:
    """The run has begun writing its results into `path`: whatever fails from now on, its files stay."""
    _claims.setdefault(_key(path), _Claim(created=False)).started = True


def discard(path: str | Path) -> None:
    """Remove what this run created in `path`, after a mistake found before training: the entries it recorded as it
    created them, then the dir and its new parents when it created them and they are empty. Nothing once the run
    has started, and nothing another process or the user put there meanwhile."""
    claim = _claims.get(_key(path))
    run_dir = Path(_key(path))
    unlock(run_dir)
    if claim is None or claim.started or not run_dir.exists():
        return
    is_sweep = "multirun.yaml" in claim.created_entries
    if is_sweep and any(any(run_dir.glob(f"*/{name}")) for name in (".hydra", "summary.json", "metrics.jsonl")):
        return  # a sweep whose jobs have started keeps its multirun.yaml beside their results
    for name in reversed(claim.created_entries):
        entry = run_dir / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    if claim.created:
        for folder in (str(run_dir), *claim.new_parents):  # rmdir: a folder someone has put something into stays
            try:
                os.rmdir(folder)
            except OSError:
                break


def discard_all() -> None:
    """`discard` every dir this process claimed, after a mistake found outside a run (e.g. by Hydra itself)."""
    for path in list(_claims):
        discard(path)


def scratch_argv(argv: list[str]) -> tuple[list[str], str]:
    """A rank other than 0 composes the config too, but must never write into (or remove from) the run or sweep
    dir: its Hydra files go to a scratch dir of its own, which it alone removes at the end."""
    scratch = tempfile.mkdtemp(prefix=f"gpt_exp-rank{os.environ.get('RANK', '?')}-")
    kept = [a for a in argv if not a.lstrip("+~").startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return kept + [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}"], scratch


def sweep_tally(sweep_dir: Path) -> tuple[str, bool]:
    """('4 jobs: 3 completed, 1 diverged', any failed) from the summary.json of each job dir of a sweep."""
    counts: dict[str, int] = {}
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir() or (p / "summary.json").is_file()),
                  key=lambda p: p.name)
    for job in jobs:
        try:
            status = json.loads((job / "summary.json").read_text()).get("status", "unknown")
        except (OSError, ValueError, AttributeError):
            status = "no summary"  # killed before it could write one
        counts[status] = counts.get(status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: (kv[0] != "completed", kv[0])))
    failed = any(status != "completed" for status in counts) or not jobs
    return f"{len(jobs)} job{'s' * (len(jobs) != 1)}: {parts or 'none ran'}", failed


class Refused(BaseException):
    """A user's error (a ConfigError, or an OSError of a dir it cannot write) from a Hydra callback. Hydra turns a
    callback's Exception into a warning and carries on (into the very dir it should not touch), so the refusal
    travels as a BaseException to the entry point."""

    def __init__(self, error: ConfigError | OSError):
        super().__init__(str(error))
        self.error = error


class RunDirGuard(Callback):
    """Hydra calls this before it creates or writes into a run or sweep dir, and once after a sweep's last job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_main_process():
            try:
                guard(config.hydra.run.dir, OmegaConf.select(config, "resume"))
            except (ConfigError, OSError) as e:  # OSError: a dir it cannot make or write (read-only, a file in its path)
                raise Refused(e) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_main_process():
            jobs_failed_beside_results.clear()
            try:
                guard_sweep(config.hydra.sweep.dir, OmegaConf.select(config, "resume"))
            except ConfigError as e:
                raise Refused(e) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        tally, failed = sweep_tally(sweep_dir)
        if jobs_failed_beside_results:
            tally += (f"; this time job{'s' * (len(jobs_failed_beside_results) > 1)} "
                      f"{', '.join(map(str, jobs_failed_beside_results))} failed beside earlier results")
            failed = True
        print(f"{tally}; compare them with: python -m gpt_exp.compare {sweep_dir}", file=sys.stderr)
        if failed:
            sweep_failures.append(tally)


def below_outputs(path: Path) -> str:
    """'2026-11-25/09-12-33' for outputs/2026-11-25/09-12-33 (the path itself when it is not under outputs/)."""
    parts = path.parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("outputs") + 1 :]) if "outputs" in parts else str(path)


def swept_keys(sweep_dir: Path, sweeper_params: dict | None) -> set[str] | None:
    """The keys a sweep varies: its sweep overrides (`optim.lr=1e-4,3e-4`) and its sweeper's search space.

    Read from the sweep's multirun.yaml, which the launcher writes before any job starts; None if it is missing.
    """
    path = sweep_dir / "multirun.yaml"
    if not path.exists():  # a sweeper that writes none (Optuna's): its search space is what varies
        return set(sweeper_params) if sweeper_params else None
    # read as data: an override's own ${...} (data.path=${oc.env:DATA}) stays as typed, resolved by no one here
    task = yaml.safe_load(path.read_text())["hydra"]["overrides"]["task"]
    overrides = OverridesParser.create().parse_overrides([str(o) for o in task])
    return {o.key_or_group for o in overrides if o.is_sweep_override()} | set(sweeper_params or {})


def overrides_name(overrides: list[str], keys: set[str] | None = None) -> str:
    """'lr=0.0003,B=8' for ['optim.lr=0.0003', 'B=8']: what a job changed (only `keys`, when given), in short;
    floats to 4 significant digits (an Optuna trial's lr=0.001373357564531546 reads lr=0.001373)."""
    shown = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if (keys is None or key in keys) and not key.startswith(_NOT_IN_NAMES):
            shown.append(f"{key.rsplit('.', 1)[-1]}={_short(value)}")
    return ",".join(shown)


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "e" not in value.lower() else f"{number:.4g}"


def sweep_group(sweep_dir: Path, overrides: list[str]) -> str:
    """A sweep's W&B group: its dir under outputs/, after the named experiment it runs when there is one
    ('tiny_smoke/2026-11-25/10-00-00')."""
    when = below_outputs(sweep_dir)
    experiment = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("experiment=")), None)
    return f"{experiment}/{when.removeprefix('multirun/')}" if experiment else when
