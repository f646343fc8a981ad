"""Turns the mistakes a user can make (config, overrides, data) into one line that names the fix."""

from __future__ import annotations

import difflib
import errno
import re

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import (InterpolationKeyError, InterpolationResolutionError, InterpolationValidationError,
                              OmegaConfBaseException, ValidationError)

from gpt_exp.config import UserError, schema_keys, unknown_key

_schema_keys = schema_keys  # the name tests/test_sweeps.py imports
_PLUGIN_HINT = " (joblib and optuna come with pip install -e '.[sweeps]', submitit with '.[slurm]')"
_WRITE_ELSEWHERE = "write elsewhere (hydra.run.dir=DIR, data.cache_dir=DIR)"
# A write that fails for want of room, whatever file it was: the fix is the user's, not a bug.
_WRITE_FIXES = {
    errno.ENOSPC: f"free disk space, or {_WRITE_ELSEWHERE}",
    errno.EDQUOT: f"free space within your disk quota, or {_WRITE_ELSEWHERE}",
    errno.EFBIG: f"free disk space or raise the file-size limit (ulimit -f), or {_WRITE_ELSEWHERE}",
    errno.EROFS: _WRITE_ELSEWHERE,
}


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (itself, or what it was raised from, e.g. by a resolver creating the run dir) that
    names a file or a full or read-only disk."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (e.filename or e.errno in _WRITE_FIXES):
            return e
        e = e.__cause__ or e.__context__
    return None


def _null_group(e: BaseException) -> str | None:
    """`GROUP=null`, which Hydra 1.3 rejects with a bare ValueError; the override is a local of the raising frame."""
    if not (isinstance(e, ValueError) and str(e).startswith("Config group override must be a string or a list")):
        return None
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    written = getattr(tb.tb_frame.f_locals.get("override") if tb else None, "input_line", None) or "GROUP=null"
    group = written.split("=")[0].lstrip("+~")
    return f"{written}: a config group takes an option name; use {group}=OPTION (--help lists them) or ~{group}"


def is_user_error(e: BaseException) -> bool:
    """Mistakes and conditions the user can fix: config and data errors, and files that cannot be written
    (a full disk, a read-only or wrong output dir)."""
    hydra_or_ours = (UserError, ConfigCompositionException, MissingConfigException, OverrideParseException,
                     OmegaConfBaseException)  # MissingConfigException is an OSError too: test these first
    return isinstance(e, hydra_or_ours) or _os_error(e) is not None or _null_group(e) is not None


def _io_error(e: OSError) -> str:
    what = f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
    fix = _WRITE_FIXES.get(e.errno, f"free disk space, fix its permissions, or {_WRITE_ELSEWHERE}")
    return f"cannot write {e.filename} ({e.strerror}); {fix}" if e.filename else f"cannot write: {what}; {fix}"


def _first_line(text: object) -> str:
    return " ".join(str(text).split("\n")[0].split())


def _all_lines(text: object) -> str:
    """Hydra's message in one line: its later lines hold the fix (`use +experiment=NAME`, `add --multirun`)."""
    text = str(text).replace("\\'", "'")  # the CLI's copy escapes its quotes
    return " ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _interpolation(e: InterpolationResolutionError, key: str) -> str:
    """`${...}` that does not resolve: name the key, what was written and the way to write it."""
    written = f"{key}={e.child_node}" if e.child_node is not None else key
    msg = _first_line(e)
    if isinstance(e, InterpolationKeyError) and (found := re.search(r"Interpolation key '([^']+)'", msg)):
        name = found.group(1)
        close = difflib.get_close_matches(name, schema_keys(), n=1, cutoff=0.6)
        fix = f"did you mean ${{{close[0]}}}?" if close else f"for an environment variable write ${{oc.env:{name}}}"
        return f"{written}: ${{{name}}} is not a config key; {fix}"
    if found := re.search(r"Environment variable '([^']+)' not found", msg):
        name = found.group(1)
        return f"{written}: the environment variable {name} is not set; set it, or give a default: ${{oc.env:{name},DEFAULT}}"
    return (f"{written}: {msg}; write ${{KEY}} for a config key or ${{oc.env:NAME}} for an environment variable "
            f"(quote the override: 'KEY=${{...}}')")


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
    if (null_group := _null_group(e)) is not None:
        return null_group
    if isinstance(e, OverrideParseException):
        return f"cannot parse the command line: {_first_line(e)}; write overrides as key=value (quote lists: 'key=[a,b]')"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    msg = _first_line(cause)
    if key and re.search(r"Key '[^']+' (is )?not in", msg):
        return unknown_key(key)
    if isinstance(cause, InterpolationResolutionError) and key and not isinstance(cause, InterpolationValidationError):
        return _interpolation(cause, key)
    override = re.search(r"override (\S+=\S*)", str(e))  # Hydra's "Error merging override train=[1]"
    if key and (override or isinstance(cause, ValidationError)):
        written = f"{key}={cause.child_node}" if isinstance(cause, InterpolationValidationError) else key
        return f"{override.group(1) if override else written}: {msg}; fix the value of {key}"
    if isinstance(e, ConfigCompositionException) and cause is e:
        return _all_lines(e)
    return f"{key + ': ' if key else ''}{msg}"
