"""The one boundary of every command (run, prepare, sample, eval, export, compare): a mistake the user can fix
(config, overrides, data, files) becomes one `error:` line that names the fix, and its exit code; Ctrl-C is
"interrupted" and 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import functools
import os
import re
import signal
import sys
import threading
from enum import Enum
from typing import Callable, NoReturn, TypeVar

import yaml
from hydra import compose, initialize_config_module

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import (InterpolationKeyError, InterpolationResolutionError, InterpolationValidationError,
                              OmegaConfBaseException, ValidationError)

from gpt_exp.config import ConfigError, RunConfig, register_schema, schema_keys, unknown_key, validate
from gpt_exp.errors import EXIT_USER_ERROR, UserError
from gpt_exp.launch import is_main_process

_PLUGIN_HINT = " (joblib and optuna come with pip install -e '.[sweeps]', submitit with '.[slurm]')"
# Where each command can be told to write instead (the run's dirs unless named here).
_WRITE_ELSEWHERE = {"compare": "--out DIR", "coord_check": "--out DIR", "scaling": "--out DIR",
                    "export": "another OUT dir", "prepare": "data.cache_dir=DIR"}
_RUN_WRITES = "hydra.run.dir=DIR, data.cache_dir=DIR"
# A write that fails for want of room, whatever file it was: the fix is the user's, not a bug.
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space, or write elsewhere ({where})",
    errno.EDQUOT: "free space within your disk quota, or write elsewhere ({where})",
    errno.EFBIG: "free disk space or raise the file-size limit (ulimit -f), or write elsewhere ({where})",
    errno.EROFS: "write elsewhere ({where})",
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


def _io_error(e: OSError, command: str) -> str:
    what = f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
    fix = _WRITE_FIXES.get(e.errno, "free disk space, fix its permissions, or write elsewhere ({where})")
    fix = fix.format(where=_WRITE_ELSEWHERE.get(command, _RUN_WRITES))
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


def user_error_line(e: BaseException, command: str = "run") -> str:
    """The one line a user's mistake ends with (`command`: whose options the fix may name, e.g. "scaling")."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MissingConfigException):
        return _missing_option(e)
    if (os_error := _os_error(e)) is not None:
        return _io_error(os_error, command)
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


def fail(e: BaseException) -> NoReturn:
    """End on a user's mistake: one `error:` line on stderr (rank 0's: every rank meets the same mistake), its code."""
    if is_main_process():
        print(f"error: {user_error_line(e)}", file=sys.stderr)
    raise SystemExit(getattr(e, "exit_code", EXIT_USER_ERROR))


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The validated config that `python -m gpt_exp.run OVERRIDES` would train with, composed in this process (for
    the commands that take the run's overrides: prepare, and tests)."""
    register_schema()
    with initialize_config_module("gpt_exp.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=list(overrides)))
    validate(cfg)
    return cfg


def command(main: Callable[[list[str]], int | None]) -> Callable[..., int]:
    """A command's `main(argv)` inside the boundary: its user errors end as one `error:` line and their exit code
    (returned, so tests can call it too), Ctrl-C as "interrupted" and 130. `python -m` calls `sys.exit(main())`."""

    @functools.wraps(main)
    def bounded(argv: list[str] | None = None) -> int:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises its composition errors to us: we print one line
        restore_ctrl_c()
        try:
            return main(sys.argv[1:] if argv is None else list(argv)) or 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if not is_user_error(e):
                raise
            if is_main_process():
                print(f"error: {user_error_line(e, _command_name(main))}", file=sys.stderr)
            return getattr(e, "exit_code", EXIT_USER_ERROR)

    return bounded


def restore_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt again once a command starts (gpt_exp/__init__.py quiets it while it imports)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler and is_main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _command_name(main: Callable) -> str:
    """"scaling" for gpt_exp/scaling.py's main, also under `python -m`, where its module is called __main__."""
    spec = main.__globals__.get("__spec__")
    return (spec.name if spec is not None else main.__module__).rsplit(".", 1)[-1]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line user errors (`error: ...`, exit code 2) instead of usage + message, for
    the commands that take paths and --flags (compare, export)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: {message}; `{self.prog} --help` lists the arguments\n")


Options = TypeVar("Options")
_KIND = {int: "an integer", float: "a number", str: "a string"}


def parse_options(command: str, argv: list[str], schema: type[Options]) -> Options | None:
    """`key=value` options, the way `run` takes its overrides, into the dataclass `schema` (each value converted to
    the type of its field's default). `--help` prints every key and its default, `--cfg job` the options as they
    would run; both return None."""
    if {"-h", "--help"} & set(argv):
        keys = " ".join(f"[{f.name}={f.name.upper() if f.default is None else getattr(f.default, 'value', f.default)}]"
                        for f in dataclasses.fields(schema))
        print(f"usage: python -m gpt_exp.{command} {keys}   (--cfg job: print the options and stop)")
        return None
    show = argv[-2:] == ["--cfg", "job"]
    # Not OmegaConf's dotlist parser: it reads a value as YAML (prompt=1e-3 becomes "0.001", prompt=null None), and
    # a prompt must reach the model as typed.
    fields = {f.name: f for f in dataclasses.fields(schema)}
    values = {}
    for arg in argv[:-2] if show else argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"cannot parse '{arg}'; write key=value, keys: {', '.join(fields)}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{key}'; {hint}")
        values[key] = _convert(key, value, fields[key].default)
    options = schema(**values)
    if show:
        plain = {k: getattr(v, "value", v) for k, v in dataclasses.asdict(options).items()}
        print(yaml.safe_dump(plain, sort_keys=False), end="")
        return None
    return options


def _convert(key: str, value: str, default: object) -> object:
    kind = str if default is None else type(default)
    try:
        return kind(value)
    except ValueError:
        expected = f"one of {', '.join(m.value for m in kind)}" if issubclass(kind, Enum) else _KIND[kind]
        raise ConfigError(f"{key}={value} is invalid: it must be {expected}") from None
