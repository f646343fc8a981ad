"""Checkpoint files: written atomically, the newest K kept, found and read back, checked against the run resuming.

A checkpoint is the Trainer's state_dict() (model, optimizer, loader position, RNG states, step, tokens) plus the
config and the W&B run id, so that a resumed run continues exactly where the original stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt_exp import atomic
from gpt_exp.atomic import atomic_path
from gpt_exp.config import MODEL_FIXED, MODEL_SHAPE, RunConfig, flatten, known_settings, unflatten
from gpt_exp.errors import ConfigError, UserError
from gpt_exp.hf import gpt_config, load_checked_weights, load_hf_gpt2, recorded_step
from gpt_exp.metrics import read_metrics
from gpt_exp.model import GPT, scale_settings
from gpt_exp.shapes import arch_settings

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
WEIGHTS_DIR = "model"  # the weights every run leaves (train.save_model), as a Hugging Face GPT-2 dir
_CKPT_NAME = re.compile(r"step_(\d+)\.pt")
# Resuming with any of these changed cannot load the saved weights, or loads them as another model.
FIXED_KEYS = tuple(f"model.{key}" for key in MODEL_FIXED)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a write in progress is a hidden temp file, never listed)."""
    paths = [p for p in (run_dir / CKPT_DIR).glob("step_*.pt") if _CKPT_NAME.fullmatch(p.name)]
    return sorted(paths, key=lambda p: int(_CKPT_NAME.fullmatch(p.name).group(1)))


def save_checkpoint(run_dir: Path, state: dict, keep: int) -> Path:
    """Write `state` for its step atomically (temp file, fsync, rename), then drop all but the newest `keep`."""
    path = checkpoint_path(run_dir, state["step"])
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)  # through our file object, so that a failed write leaves its OSError behind
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (a full disk, a file-size limit) as a RuntimeError of its zip writer,
        # raised while handling the file's OSError; any other RuntimeError is a bug and stays one
        os_error = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if not isinstance(os_error, OSError):
            raise
        reason = os_error.strerror or str(os_error)
        previous = list_checkpoints(run_dir)
        raise UserError(f"cannot write checkpoint {path} ({reason}); free disk space or fix permissions, then "
                        f"resume from {previous[-1] if previous else 'the start (no earlier checkpoint)'}") from None
    prune(run_dir, keep)
    return path


def prune(run_dir: Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints: only regular files inside the run dir. A checkpoints/ that is a
    link (to scratch storage, say) is written through, but nothing is deleted there."""
    folder = run_dir / CKPT_DIR
    if folder.is_symlink() or folder.resolve().parent != run_dir.resolve():
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.is_file() and not old.is_symlink():
            old.unlink(missing_ok=True)


def remove_stale_temp_files(run_dir: Path) -> None:
    """Remove the temp files that writes killed mid-way (kill -9, a crash) left in a run dir and its checkpoints."""
    for folder in (run_dir, run_dir / CKPT_DIR):
        for path in atomic.remove_stale_temp_files(folder):
            log.info("removed %s, left by a write that was killed", path)


def find_checkpoint(target: str, key: str = "resume") -> Path:
    """The checkpoint `key=` (resume or init_from) names: a checkpoint file, or the newest complete one of a run dir."""
    path = Path(target).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise ConfigError(f"{key}={target} does not exist; give a run dir (outputs/<date>/<time>) or a checkpoint file")
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"{key}={target} holds no checkpoint ({CKPT_DIR}/step_*.pt); "
                          f"runs write them with train.ckpt_every=N")
    return found[-1]


def load_checkpoint(path: Path, key: str = "resume") -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: whatever torch raises, it is the user's file
        siblings = list_checkpoints(path.parent.parent) if path.parent.name == CKPT_DIR else []
        older = [p for p in siblings if p.resolve() != path.resolve()]
        if older and path.resolve() == siblings[-1].resolve():
            # the newest of its run: resume=RUN_DIR (and resume=auto) would pick it again, and an older one is
            # refused in the run's own dir as another history, so the way on is to move this one aside
            fix = f"move it out of {path.parent} and the run continues from {older[-1].name}"
        else:
            fix = f"use another one in {path.parent}"
        raise ConfigError(f"{key}: {path} is not a readable gpt_exp checkpoint ({type(e).__name__}); {fix}") from None


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for each setting that differs; raises if a change makes the weights unloadable."""
    old, new = flatten(saved), flatten(current)
    # a setting only one version has (new since the checkpoint, or gone from this version) is not a change
    changes = [_change(k, old[k], new[k]) for k in sorted(old.keys() & new.keys())
               if k not in ("resume", "init_from") and old[k] != new[k]]
    fixed = [c for c in changes if c.split(":")[0] in FIXED_KEYS]
    if fixed:
        raise ConfigError(f"resume: the checkpoint's model has another shape or parametrization ({'; '.join(fixed)}); "
                          f"resume with the original model settings, or start a new run from its weights with "
                          f"init_from=")
    if old.get("optim.name", "adamw") != new.get("optim.name", "adamw"):  # its state is another optimizer's
        raise ConfigError(f"resume: the checkpoint was trained with optim={old.get('optim.name', 'adamw')}; resume "
                          f"with it, or start a new run from its weights with init_from=")
    return changes


def _change(key: str, old: object, new: object) -> str:
    """'key: old -> new', quoted where the two would print alike ('2' in a hand-edited checkpoint against 2)."""
    if str(old) == str(new):
        return f"{key}: {old!r} -> {new!r}"
    return f"{key}: {old} -> {new}"


class Resume:
    """A run continued from a checkpoint: its state (for Trainer.load_state_dict), the settings and overrides it was
    trained with, and the original run's history."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state
        self.step: int = state["step"]
        self.wandb_id: str | None = state.get("wandb_id")
        self.config: dict = state["config"]
        self.changes: list[str] = []
        # checkpoints live in RUN_DIR/checkpoints/; a file copied elsewhere has no run dir to take metrics from
        self.source_run_dir = path.parent.parent if path.parent.name == CKPT_DIR else None

    @functools.cached_property
    def settings(self) -> RunConfig:
        """The checkpoint's settings as they were (its version's keys that still exist): what it trained with. Their
        types are checked (a damaged or hand-edited file is one line naming it); their values were, when it ran."""
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig),
                                                       unflatten(known_settings(self.config))))
        except OmegaConfBaseException as e:
            raise ConfigError(f"resume: {self.path} is damaged: its setting {e.full_key}={e.child_node!r} does not fit "
                              f"its type; resume from another checkpoint of the run") from None

    def check(self, current_config: dict) -> None:
        """What this run changes against the checkpoint's settings; a change the weights cannot take is refused."""
        self.changes = config_changes(self.config, current_config)

    def metrics_before(self) -> list[dict]:
        """The original run's metrics rows before the checkpoint's step, so the new run dir has the whole curve
        (a last line cut short by a kill is dropped; a broken line before it is refused, by compare's reader)."""
        if self.source_run_dir is None:
            return []
        return [r for r in read_metrics(self.source_run_dir / "metrics.jsonl") if r.get("step", self.step) < self.step]

    def summary(self) -> dict:
        return {"resumed_from": str(self.path), "resumed_at_step": self.step}


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# What each field of a training checkpoint must be, so that a damaged or foreign one is refused in one line before
# any of it is used (the tensors themselves are checked against the model as they load).
_FIELDS = {
    "step": (_is_count, "a whole number >= 0"),
    "tokens": (_is_count, "a whole number >= 0"),
    "config": (lambda v: isinstance(v, dict) and isinstance(v.get("model"), dict), "the run's settings (a mapping)"),
    "model": (lambda v: isinstance(v, dict) and len(v) > 0, "the model's tensors"),
    "optimizer": (lambda v: isinstance(v, dict) and len(v) > 0 and (
        "param_groups" not in v or isinstance(v["param_groups"], list) and len(v["param_groups"]) > 0),
        "an optimizer state with its param groups"),
    "loader": (lambda v: isinstance(v, dict) and all(_is_count(x) for x in v.values() if isinstance(x, (int, float))),
               "the loader's position (whole numbers >= 0)"),
    "rng": (lambda v: isinstance(v, dict) and {"python", "numpy", "torch"} <= v.keys(), "the python, numpy and torch "
            "generator states"),
}


def _is_loss(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


# Fields a checkpoint of an older version may lack; when present they must be what the trainer reads back.
_OPTIONAL_FIELDS = {
    "skipped": (_is_count, "a whole number >= 0"),
    "best_val_loss": (_is_loss, "a number (inf before the first eval)"),
    "weights_at": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_count(s) for k, s in v.items()),
                   "the steps of model/ and model_best/ (names to whole numbers)"),
}


def check_fields(state: dict, path: Path) -> None:
    optional = {key: check for key, check in _OPTIONAL_FIELDS.items() if key in state}
    for key, (ok, what) in {**_FIELDS, **optional}.items():
        if not ok(state.get(key)):
            raise ConfigError(f"resume: {path} is damaged: its {key} is {_short(state.get(key))}, where {what} belongs; "
                              f"resume from another checkpoint of the run")


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else f"a {type(value).__name__} of {len(value)}"
    return text if len(text) <= 40 else text[:37] + "..."


_RESUME_KEYS = set(_FIELDS)


def open_resume(target: str, run_dir: Path) -> Resume:
    """The checkpoint `resume=` names: a gpt_exp training checkpoint and, when the run continues in the checkpoint's
    own dir, its newest one, so that two histories never mix. (Resume.check compares the settings.)"""
    path = find_checkpoint(target)
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not _RESUME_KEYS <= state.keys():
        raise ConfigError(f"resume: {path} is not a gpt_exp training checkpoint (it lacks step, model, optimizer, "
                          f"loader, rng and config); give a run dir or a checkpoints/step_*.pt file of one")
    check_fields(state, path)
    if path.parent.name == CKPT_DIR:
        remove_stale_temp_files(path.parent.parent)
    if path.parent.name == CKPT_DIR and path.parent.parent.resolve() == run_dir.resolve():
        newest = list_checkpoints(run_dir)[-1]
        if newest.resolve() != path.resolve():
            raise ConfigError(f"resume={target} into its own run dir would mix two histories: {newest.name} is newer; "
                              f"resume into a new dir (leave hydra.run.dir unset) to branch from {path.name}")
    return Resume(path, state)


def init_weights(target: str) -> tuple[GPT, str]:
    """The model `init_from=` names, on the CPU, and where it came from: hf:DIR (a Hugging Face GPT-2 dir of any
    size), a run dir (its newest weights) or a checkpoint file."""
    if target.startswith("hf:"):
        return load_hf_gpt2(target[3:]), target
    model, info = load_model(target, key="init_from")
    require_sp(model, info["source"], "init_from")
    return model, info["source"]


def require_sp(model: GPT, source: str, reader: str) -> None:
    """Refuse a muP or CompleteP model where only GPT-2's scales fit: a Hugging Face dir (export) holds none of them,
    and the weights alone (init_from) would train under another run's scales. sample and eval read them all."""
    if model.config.parametrization != "sp":
        raise ConfigError(f"{source} is a model.parametrization={model.config.parametrization} model: {reader} reads "
                          f"GPT-2 (sp) models only; resume it with python -m gpt_exp.run instead")


def _run_weights_info(run_dir: Path) -> dict:
    """{name, source, step} of a run dir's model/ weights: the model's name from its config, the step they are from
    as their config.json records it (an older gpt_exp recorded none: its summary's steps, unknown while it runs)."""
    info = {"name": "?", "source": str(run_dir / WEIGHTS_DIR), "step": recorded_step(run_dir / WEIGHTS_DIR)}
    try:
        info["name"] = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["model"]["name"]
        if info["step"] is None:
            info["step"] = json.loads((run_dir / "summary.json").read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        pass  # a description only: the weights themselves are checked by the loader
    return info


def embedding_rows(model_state: object) -> int | None:
    """The token embedding's rows in a checkpoint's weights (more than the vocabulary when it was trained padded,
    model.pad_vocab); None when they cannot be read there (a damaged file: the weights' check names it)."""
    wte = model_state.get("transformer.wte.weight") if isinstance(model_state, dict) else None
    return wte.shape[0] if isinstance(wte, torch.Tensor) and wte.dim() == 2 else None


def load_model(target: str, hf: bool = False, key: str = "resume") -> tuple[GPT, dict]:
    """A GPT for inference (eval mode, CPU) and {name, source, step, params} from a run dir, a checkpoint file,
    or a Hugging Face GPT-2 dir (one with config.json; `hf=True` insists on one, for errors that say so)."""
    path = Path(target).expanduser()
    weights = path / WEIGHTS_DIR / "config.json"
    if not hf and weights.is_file():  # a run dir's weights (train.save_model), unless a checkpoint is newer
        # a run resumed into its own dir and stopped early keeps the model/ of its first end: older weights
        step, checkpoints = recorded_step(path / WEIGHTS_DIR), list_checkpoints(path)
        if checkpoints and step is not None:
            newer = int(_CKPT_NAME.fullmatch(checkpoints[-1].name).group(1)) > step
        else:  # model/ of an older gpt_exp records no step: whichever was written last
            newer = bool(checkpoints) and checkpoints[-1].stat().st_mtime > weights.stat().st_mtime
        if not newer:
            model = load_hf_gpt2(path / WEIGHTS_DIR)
            return model.eval(), {**_run_weights_info(path), "params": model.num_params()}
    if hf or (path / "config.json").is_file():
        model, info = load_hf_gpt2(path), {"name": path.name, "source": str(path), "step": recorded_step(path)}
    else:
        ckpt = find_checkpoint(target, key)
        state = load_checkpoint(ckpt, key)
        config = state.get("config") if isinstance(state, dict) else None
        m = config.get("model") if isinstance(config, dict) else None
        if not isinstance(m, dict) or not {"model", "step"} <= state.keys():  # a foreign .pt: a tensor, a state_dict
            raise ConfigError(f"{ckpt} is not a gpt_exp checkpoint (no model, config and step); give a run dir or a "
                              f"checkpoint file that `python -m gpt_exp.run train.ckpt_every=N` wrote")
        fix = "the checkpoint is damaged: use another one of the run"
        shape = {key: m.get(key) for key in MODEL_SHAPE}
        # padded as it was trained (model.pad_vocab): its embedding's rows say so, whatever device this runs on
        config = gpt_config(shape, f"{ckpt}'s config", fix, padded_vocab_size=embedding_rows(state["model"]))
        # rope, rmsnorm, ..., and muP's and CompleteP's scales: the model computes what it was trained to compute
        model = GPT(dataclasses.replace(config, **arch_settings(m), **scale_settings(m)))
        load_checked_weights(model, state["model"], f"{ckpt}'s weights do not match its config", fix)
        info = {"name": m.get("name", "?"), "source": str(ckpt), "step": state["step"]}
    return model.eval(), {**info, "params": model.num_params()}
