"""One resolution step: the composed config, the checkpoint a run resumes or the weights it starts from, B=auto's
probe and the device become the complete, validated RunConfig the run trains with. Nothing changes it afterwards.

What a run records (.hydra/config.yaml, every checkpoint, W&B, summary.json) is this config, so a chain of resumes of
any length trains with the original settings plus what each resume changed. Settings read from a file (a checkpoint)
are data: a value holding `${...}` there is refused, never resolved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from gpt_exp.autobatch import AutoBatch
from gpt_exp.checkpoint import Resume, init_weights, list_checkpoints, open_resume
from gpt_exp.config import MAPPINGS, MODEL_SHAPE, RunConfig, flatten, known_settings, unflatten, validate
from gpt_exp.device import Runtime, resolve_runtime
from gpt_exp.errors import ConfigError, Finished
from gpt_exp.launch import Dist
from gpt_exp.trainer import probe_B

log = logging.getLogger("gpt_exp")

# Settings that exclude each other: the one a command gives wins over the other's default (both given: an error).
EXCLUSIVE = (("train.max_steps", "train.max_tokens"),)
# Where a run lives and what it starts from: never carried from a checkpoint into the run that resumes it.
_NOT_CARRIED = ("hydra", "resume", "init_from")


@dataclass(frozen=True)
class Resolved:
    """What a run trains with, and where it starts from."""

    cfg: RunConfig
    config: dict  # cfg as plain data: what the run records everywhere
    runtime: Runtime
    resumed: Resume | None = None
    init: tuple[torch.nn.Module, str] | None = None  # init_from's weights and where they came from
    autobatch: AutoBatch | None = None  # how B=auto chose B


def resolve_run(cfg: RunConfig, dict_cfg: DictConfig, overrides: tuple[str, ...], run_dir: Path, d: Dist,
                threads: int | None) -> Resolved:
    """The run's config from the command's own (`cfg`, checked), the checkpoint or weights it names, and B=auto."""
    resumed, init = resume_target(cfg, run_dir), None
    notes = {**(saved_notes(resumed.config) if resumed is not None else {}), **user_notes(cfg)}
    if resumed is not None:
        cfg = resumed_settings(resumed, dict_cfg, overrides)
    elif cfg.resume is not None:  # resume=auto in a dir without a run yet: the command's own settings
        validate(cfg)
    elif cfg.init_from:
        init = init_weights(cfg.init_from)
        if cfg.init_from.startswith("hf:"):
            cfg = adopt_shape(cfg, {key: getattr(init[0].config, key) for key in MODEL_SHAPE}, cfg.init_from, overrides)
    runtime = resolve_runtime(cfg.device, threads, local_rank=d.local_rank)
    autobatch = probe_B(cfg, runtime, d) if cfg.B == "auto" else None
    if autobatch is not None:
        cfg = _build({**flatten(as_dict(cfg)), "B": autobatch.B})
    config = {**as_dict(cfg), **notes}
    if resumed is not None:
        resumed.check(config)
    return Resolved(cfg, config, runtime, resumed, init, autobatch)


def resume_target(cfg: RunConfig, run_dir: Path) -> Resume | None:
    """The checkpoint to continue from: resume=RUN_DIR or PATH.pt, or resume=auto: this run dir's newest complete
    checkpoint when it has one (a requeued SLURM job goes on), a fresh start in a dir without a run."""
    if cfg.resume and cfg.init_from:
        raise ConfigError(f"resume={cfg.resume} and init_from={cfg.init_from} exclude each other: resume continues a "
                          f"run (its optimizer, data position, step), init_from starts a new one from weights; give one")
    if cfg.resume != "auto":
        return open_resume(cfg.resume, run_dir) if cfg.resume else None
    if list_checkpoints(run_dir):
        return open_resume(str(run_dir), run_dir)
    if (run_dir / "summary.json").exists() or (run_dir / "metrics.jsonl").exists():
        status = _status(run_dir)
        if status == "completed":
            raise Finished(f"resume=auto: the run in {run_dir} has finished; nothing to do")
        raise ConfigError(f"resume=auto: {run_dir} holds a run ({status}) without a checkpoint to continue from; give a "
                          f"new dir (train.ckpt_every=N keeps checkpoints to continue from)")
    log.info("resume=auto: no checkpoint in %s yet; starting fresh", run_dir)
    return None


def _status(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "summary.json").read_text()).get("status", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "no summary"


def given_keys(overrides: tuple[str, ...] | list[str]) -> set[str]:
    """The keys and groups a command line sets ('optim.lr'; 'model' for model=tiny), by Hydra's own parser."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group for o in parsed if not o.is_delete()}


def _touched(key: str, given: set[str]) -> bool:
    return any(key == g or key.startswith(g + ".") for g in given)


def explicit_beats_default(flat: dict, given: set[str]) -> dict:
    """Of two settings that exclude each other, the one given on the command line wins over the other's value."""
    for a, b in EXCLUSIVE:
        a_given, b_given = a in given and flat.get(a) is not None, b in given and flat.get(b) is not None
        if a_given and b_given:
            raise ConfigError(f"{a}={flat[a]} and {b}={flat[b]} exclude each other; give one of them")
        if a_given or b_given:
            flat[b if a_given else a] = None
    return flat


def settings_from_file(tree: object, where: str) -> dict:
    """A config read from a file (a checkpoint): its values as data. A value holding `${...}` is refused: resolving
    it could read this machine's environment (a secret) into the run's logs and W&B."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where} holds no settings (a mapping); it is damaged or not gpt_exp's")
    for key, value in flatten(tree).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "${" in v for v in values):
            raise ConfigError(f"{where}: {key}={value!r} holds an interpolation, which gpt_exp never resolves from a "
                              f"file (it could read this machine's environment); use a checkpoint you trust")
    return tree


def _build(flat: dict) -> RunConfig:
    cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), unflatten(flat)))
    validate(cfg)
    return cfg


def fresh(dict_cfg: DictConfig, overrides: tuple[str, ...]) -> RunConfig:
    """The command's own config: what Hydra composed, with explicit-beats-default applied; checked unless it resumes
    (a resume's settings are the checkpoint's with this command's on top: those are checked once merged)."""
    flat = explicit_beats_default({a: OmegaConf.select(dict_cfg, a) for pair in EXCLUSIVE for a in pair},
                                  given_keys(overrides))
    for key, value in flat.items():
        OmegaConf.update(dict_cfg, key, value)
    cfg: RunConfig = OmegaConf.to_object(dict_cfg)
    if cfg.resume is None:
        validate(cfg)
    return cfg


def resumed_settings(resumed: Resume, dict_cfg: DictConfig, overrides: tuple[str, ...]) -> RunConfig:
    """The config a resumed run trains with: the checkpoint's resolved settings, then what this command changes (the
    keys and groups it names, and what an experiment it adds sets), which win."""
    given = given_keys(overrides)
    current = flatten(OmegaConf.to_container(dict_cfg, resolve=True, enum_to_str=True))
    defaults = flatten(OmegaConf.to_container(compose("config"), resolve=False, enum_to_str=True))
    changed = {k for k, v in current.items() if _touched(k, given) or defaults.get(k, v) != v}
    saved = flatten(settings_from_file(resumed.config, f"resume: {resumed.path}"))
    resumed.settings  # noqa: B018 -- their types checked now, naming the file, before any work
    known = known_settings(resumed.config)
    schema = {f.name for f in dataclasses.fields(RunConfig)}
    if dropped := sorted(k for k in saved.keys() - known.keys() if k.split(".")[0] in schema):  # an older version's
        log.info("resume: the checkpoint's settings %s no longer exist; ignored", ", ".join(dropped))
    # a mapping the command gives whole (data.sources='{...}', or data=mix) replaces the checkpoint's, key for key
    replaced = tuple(f"{m}." for m in MAPPINGS if _touched(m, given))
    flat = {k: v for k, v in known.items() if not k.startswith(_NOT_CARRIED) and not k.startswith(replaced)}
    flat.update({k: v for k, v in known_settings(unflatten(current)).items()
                 if k in changed or k.startswith(_NOT_CARRIED) or k not in flat})
    saved_B = resumed.state.get("B")
    if flat.get("B") == "auto" and isinstance(saved_B, int) and "B" not in changed:  # keep the B it chose
        flat["B"] = saved_B
    return _build(explicit_beats_default(flat, changed))


def adopt_shape(cfg: RunConfig, shape: dict, init_from: str, overrides: tuple[str, ...]) -> RunConfig:
    """init_from=hf:DIR trains a model of that dir's shape; a model setting on the command line that says otherwise
    is refused in one line rather than silently overruled."""
    given = given_keys(overrides)
    clash = [k for k, v in shape.items() if getattr(cfg.model, k) != v and _touched(f"model.{k}", given)]
    if clash:
        asked = ", ".join(f"model.{k}={getattr(cfg.model, k)}" for k in clash)
        raise ConfigError(f"{asked} contradicts init_from={init_from} ({', '.join(f'{k}={shape[k]}' for k in clash)}); "
                          f"drop the model override to take the shape of the weights")
    adopted = {f"model.{k}": shape[k] for k in MODEL_SHAPE}
    return _build({**flatten(as_dict(cfg)), **adopted, "model.name": Path(init_from[3:]).name or "hf"})


def user_notes(cfg: RunConfig) -> dict:
    """The command's own top-level keys that no setting has (`+note=baseline`, `+arm=rope`): the user's labels,
    recorded beside the settings so that compare can group and pick runs by them. The run never reads them."""
    schema = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in vars(cfg).items() if k not in schema}


def saved_notes(config: dict) -> dict:
    """A checkpoint's recorded labels (its top-level keys that no setting has), carried into the run resuming it."""
    schema = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in config.items() if k not in schema}


def as_dict(cfg: RunConfig) -> dict:
    """The config as plain data (enums as their names), for records, checkpoints and W&B."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
