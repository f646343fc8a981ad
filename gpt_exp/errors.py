"""Turns the mistakes a user can make (config, overrides, data) into one line that names the fix."""

from __future__ import annotations

import re

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from gpt_exp.config import ConfigError

_HINT_KEYS = "`python -m gpt_exp.run --cfg job` lists every key"


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, (ConfigError, ConfigCompositionException, MissingConfigException, OverrideParseException,
                          OmegaConfBaseException))


def _flat(text: str) -> str:
    return " ".join(str(text).split())


def _missing_option(e: MissingConfigException) -> str:
    text = str(e)
    found = re.search(r"Could not find '([^']+)'", text)
    what = found.group(1) if found else _flat(text)
    options = re.findall(r"^\t(\S+)$", text, flags=re.M)
    group = what.split("/")[0]
    if options:
        return f"unknown option {what.replace('/', '=', 1)}; available {group} options: {', '.join(options)}"
    return f"cannot find config '{what}'; `python -m gpt_exp.run --help` lists the config groups and options"


def _omegaconf_error(e: OmegaConfBaseException, override: str | None) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = _flat(getattr(e, "msg", None) or str(e).split("\n")[0])
    if isinstance(e, ConfigKeyError) or "not in struct" in msg:
        return f"unknown config key '{key}'; check the spelling ({_HINT_KEYS})"
    if isinstance(e, ValidationError):
        value = override.split("=", 1)[1] if override and "=" in override else None
        shown = f"{key}={value}" if value is not None else key
        return f"{shown} has the wrong type: {msg}; {_HINT_KEYS} with their types' defaults"
    return f"{key}: {msg}"


def user_error_line(e: BaseException) -> str:
    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, MissingConfigException):
        return _missing_option(e)
    override_match = re.search(r"override (\S+)", str(e))
    override = override_match.group(1) if override_match else None
    if isinstance(e.__cause__, OmegaConfBaseException):
        return _omegaconf_error(e.__cause__, override)
    if isinstance(e, OmegaConfBaseException):
        return _omegaconf_error(e, override)
    return _flat(str(e))
