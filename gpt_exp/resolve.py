"""One resolution step: the composed config, the checkpoint a run resumes or the Hugging Face dir it starts from, and
the command's own overrides become the complete, validated RunConfig the run trains with. Nothing changes it after.

What a run records (.hydra/config.yaml, every checkpoint, W&B, summary.json) is this config, so a chain of resumes of
any length trains with the original settings plus what each resume changed. Settings read from a file (a checkpoint)
are data: a value holding `${...}` there is refused, never resolved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from gpt_exp.config import MODEL_SHAPE, RunConfig, flatten, schema_keys, validate
from gpt_exp.errors import ConfigError

log = logging.getLogger("gpt_exp")

# Settings that exclude each other: the one a command gives wins over the other's default (both given: an error).
EXCLUSIVE = (("train.max_steps", "train.max_tokens"),)
# Where a run lives and what it starts from: never carried from a checkpoint into the run that resumes it.
_NOT_CARRIED = ("hydra", "resume", "init_from")


def given_keys(overrides: tuple[str, ...] | list[str]) -> set[str]:
    """The keys and groups a command line sets ('optim.lr'; 'model' for model=tiny), by Hydra's own parser."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group for o in parsed if not o.is_delete()}


def _touched(key: str, given: set[str]) -> bool:
    return any(key == g or key.startswith(g + ".") for g in given)


def _set(tree: dict, key: str, value: object) -> None:
    *sections, leaf = key.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[leaf] = value


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        _set(tree, key, value)
    return tree


def explicit_beats_default(flat: dict, given: set[str]) -> dict:
    """Of two settings that exclude each other, the one given on the command line wins over the other's value."""
    for a, b in EXCLUSIVE:
        a_given, b_given = a in given and flat.get(a) is not None, b in given and flat.get(b) is not None
        if a_given and b_given:
            raise ConfigError(f"{a}={flat[a]} and {b}={flat[b]} exclude each other; give one of them")
        if a_given:
            flat[b] = None
        elif b_given:
            flat[a] = None
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
    cfg: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), _unflatten(flat)))
    validate(cfg)
    return cfg


def fresh(dict_cfg: DictConfig, overrides: tuple[str, ...]) -> RunConfig:
    """The config of a run that starts from scratch: what Hydra composed, with explicit-beats-default applied."""
    given = given_keys(overrides)
    for a, b in EXCLUSIVE:
        a_given = a in given and OmegaConf.select(dict_cfg, a) is not None
        b_given = b in given and OmegaConf.select(dict_cfg, b) is not None
        if a_given and b_given:
            raise ConfigError(f"{a}={OmegaConf.select(dict_cfg, a)} and {b}={OmegaConf.select(dict_cfg, b)} exclude "
                              f"each other; give one of them")
        if a_given or b_given:
            OmegaConf.update(dict_cfg, b if a_given else a, None)
    cfg: RunConfig = OmegaConf.to_object(dict_cfg)
    validate(cfg)
    return cfg


def resumed(saved: dict, saved_B: object, dict_cfg: DictConfig, overrides: tuple[str, ...], where: str) -> RunConfig:
    """The config a resumed run trains with: the checkpoint's resolved settings, then what this command changes (the
    keys and groups it names, and what an experiment it adds sets), which win."""
    given = given_keys(overrides)
    current = flatten(OmegaConf.to_container(dict_cfg, resolve=True, enum_to_str=True))
    defaults = flatten(OmegaConf.to_container(compose("config"), resolve=False, enum_to_str=True))
    changed = {k for k, v in current.items() if _touched(k, given) or defaults.get(k, v) != v}
    known = set(schema_keys())
    saved_flat = flatten(settings_from_file(saved, where))
    dropped = sorted(k for k in saved_flat if k not in known)
    if dropped:  # a checkpoint of an older version: settings that no longer exist
        log.info("resume: the checkpoint's settings %s no longer exist; ignored", ", ".join(dropped))
    flat = {k: v for k, v in saved_flat.items() if k in known and not k.startswith(_NOT_CARRIED)}
    flat.update({k: v for k, v in current.items() if k in changed or k.startswith(_NOT_CARRIED) or k not in flat})
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
    flat = flatten(as_dict(cfg))
    flat.update({f"model.{k}": shape[k] for k in MODEL_SHAPE}, **{"model.name": Path(init_from[3:]).name or "hf"})
    return _build(flat)


def settings_of_checkpoint(saved: dict) -> RunConfig:
    """A checkpoint's settings as a RunConfig, as they were (its own version's keys that still exist), unchecked."""
    known = set(schema_keys())
    flat = {k: v for k, v in flatten(saved).items() if k in known}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), _unflatten(flat)))


def with_B(cfg: RunConfig, B: int) -> RunConfig:
    """The config with B=auto's choice in place of `auto`: what the run trains with, and so what it records."""
    return _build({**flatten(as_dict(cfg)), "B": B})


def as_dict(cfg: RunConfig) -> dict:
    """The config as plain data (enums as their names), for records, checkpoints and W&B."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
