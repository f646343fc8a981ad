"""Turns the mistakes a user can make (config, overrides, data) into one line that names the fix."""

from __future__ import annotations

import dataclasses
import difflib
import re

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException, ValidationError

from gpt_exp.config import RunConfig, UserError

_PLUGIN_HINT = " (joblib and optuna come with pip install -e '.[sweeps]', submitit with '.[slurm]')"
_LIST_KEYS = "`python -m gpt_exp.run --cfg job` lists every key"


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError about a file behind `e` (itself, or what a resolver raised while creating the run dir)."""
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            return e
        e = e.__cause__ or e.__context__
    return None


def is_user_error(e: BaseException) -> bool:
    """Mistakes and conditions the user can fix: config and data errors, and files that cannot be written
    (a full disk, a read-only or wrong output dir)."""
    hydra_or_ours = (UserError, ConfigCompositionException, MissingConfigException, OverrideParseException,
                     OmegaConfBaseException)  # MissingConfigException is an OSError too: test these first
    return isinstance(e, hydra_or_ours) or _os_error(e) is not None


def _io_error(e: OSError) -> str:
    return (f"cannot write {e.filename} ({e.strerror}); free disk space, fix its permissions, or write elsewhere "
            f"(hydra.run.dir=DIR, data.cache_dir=DIR)")


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
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MissingConfigException):
        return _missing_option(e)
    if (os_error := _os_error(e)) is not None:
        return _io_error(os_error)
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
