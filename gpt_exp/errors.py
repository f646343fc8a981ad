"""Turns the mistakes a user can make (config, overrides, data) into one line that names the fix."""

from __future__ import annotations

import dataclasses
import difflib
import re

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException, ValidationError

from gpt_exp.config import ConfigError, RunConfig

_PLUGIN_HINT = " (joblib and optuna come with pip install -e '.[sweeps]', submitit with '.[slurm]')"
_LIST_KEYS = "`python -m gpt_exp.run --cfg job` lists every key"


def is_user_error(e: BaseException) -> bool:
    return isinstance(
        e, (ConfigError, ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException)
    )


def _schema_keys(node: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):  # a section
            keys += _schema_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _first_line(text: str) -> str:
    return " ".join(str(text).split("\n")[0].split())


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, _schema_keys(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"check the spelling; {_LIST_KEYS}"
    return f"unknown config key '{key}'; {hint}"


def _missing_option(e: MissingConfigException) -> str:
    text = str(e)
    found = re.search(r"Could not find '([^']+)'", text)
    what = found.group(1) if found else _first_line(text)
    options = re.findall(r"^\t([\w.-]+)$", text, flags=re.M)
    if options and "/" in what:
        group, option = what.rsplit("/", 1)
        plugins = _PLUGIN_HINT if group.startswith("hydra/") else ""
        return f"unknown option {group}={option}; choose one of: {', '.join(options)}{plugins}"
    return f"cannot find config '{what}'; `python -m gpt_exp.run --help` lists the groups and their options"


def user_error_line(e: BaseException) -> str:
    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, MissingConfigException):
        return _missing_option(e)
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line: {_first_line(e)}; write overrides as key=value (quote lists: 'key=[a,b]')"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    msg = _first_line(cause)
    if key and re.search(r"Key '[^']+' (is )?not in", msg):
        return _unknown_key(key)
    if isinstance(cause, ValidationError) and key:
        override = re.search(r"override (\S+=\S*)", str(e))
        return f"{override.group(1) if override else key}: {msg}; fix the value of {key}"
    return f"{key + ': ' if key else ''}{msg}"
