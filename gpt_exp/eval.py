"""Evaluations of a model: `python -m gpt_exp.eval hellaswag path=hellaswag_val.jsonl resume=RUN_DIR`, or
`python -m gpt_exp.eval core bundle=EVAL_BUNDLE_DIR resume=RUN_DIR`.

The scoring is gpt_exp/hellaswag.py's and gpt_exp/core.py's; this command parses the options, prints and saves the
scores, and turns failures into one line.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt_exp.atomic import atomic_write_bytes
from gpt_exp.checkpoint import CKPT_DIR
from gpt_exp.cli import command, parse_options
from gpt_exp.config import DeviceType
from gpt_exp.core import BUNDLE, evaluate_core, load_bundle
from gpt_exp.errors import ConfigError, UserError
from gpt_exp.generation import describe, inference_device, model_source
from gpt_exp.hellaswag import OFFICIAL, hellaswag_scores, load_hellaswag

log = logging.getLogger(__name__)

TASKS = ("hellaswag", "core")
RESULTS = "eval.json"  # in the run dir, every eval's scores
RESULTS_ELSEWHERE = "eval.gpt_exp.json"  # where they go when the run dir's eval.json is the user's own file
MARKER = "gpt_exp_eval"  # in every file this command writes: a file without it is not ours to replace


@dataclass
class EvalArgs:
    path: str | None = None  # hellaswag: the examples, one JSON object per line
    bundle: str | None = None  # core: the DCLM eval bundle's dir (core.yaml, eval_meta_data.csv, eval_data/)
    resume: str | None = None  # a run dir (its newest checkpoint) or a checkpoint file
    hf: str | None = None  # or a Hugging Face GPT-2 dir
    limit: int = 0  # score only the first N examples (core: of each task, after its shuffle); 0: all
    device: DeviceType = DeviceType.auto  # a GPU where there is one, as `run` does


def _check_task(argv: list[str]) -> None:
    if not argv or argv[0] not in TASKS:
        got = f"unknown eval '{argv[0]}'" if argv else "no eval named"
        raise ConfigError(f"{got}; choose one of: {', '.join(TASKS)} (python -m gpt_exp.eval hellaswag path=FILE "
                          f"resume=RUN_DIR, python -m gpt_exp.eval core bundle=DIR resume=RUN_DIR)")


@command
def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        parse_options(f"eval {argv[0] if argv and argv[0] in TASKS else 'hellaswag|core'}", argv, EvalArgs)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _check_task(argv)
    task = argv[0]
    args = parse_options(f"eval {task}", argv[1:], EvalArgs)
    if args is None:
        return 0
    other, wanted = ("bundle", "path=FILE") if task == "hellaswag" else ("path", "bundle=DIR")
    if getattr(args, other) is not None:  # the other eval's option: a mix-up, not something to ignore
        raise ConfigError(f"{other}={getattr(args, other)} is not read by eval {task}; give {wanted}")
    if task == "hellaswag" and args.path is None:
        raise ConfigError(f"hellaswag needs path=FILE; {OFFICIAL}")
    if task == "core" and args.bundle is None:
        raise ConfigError(f"core needs bundle=DIR; {BUNDLE}")
    if args.limit < 0:
        raise ConfigError(f"limit={args.limit} is invalid: it must be >= 0 (0: every example)")
    device = inference_device(args.device)
    if task == "core":
        tasks = load_bundle(Path(args.bundle).expanduser(), args.limit)
        model, info = model_source(args.resume, args.hf)
        log.info("%s, on %s: %d tasks, %d examples", describe(info), device, len(tasks),
                 sum(len(t.examples) for t in tasks))
        scores = evaluate_core(model.to(device), tasks, device)
        for label, r in scores["tasks"].items():
            print(f"core {label} ({r['type']}, {r['examples']} examples): acc {r['acc']:.4f}, centered "
                  f"{r['centered']:.4f}")
        print(f"core: CORE {scores['core']:.4f} over {len(tasks)} tasks, {scores['examples']} examples")
        source = {"bundle": str(Path(args.bundle).expanduser())}
    else:
        examples = load_hellaswag(Path(args.path).expanduser(), args.limit)
        model, info = model_source(args.resume, args.hf)
        log.info("%s, on %s: %d examples", describe(info), device, len(examples))
        scores = hellaswag_scores(model.to(device), examples, device)
        print(f"hellaswag: {scores['examples']} examples, acc_norm {scores['acc_norm']:.4f}, acc {scores['acc']:.4f}")
        source = {"path": str(Path(args.path).expanduser())}
    if args.resume:
        print(save_result(Path(args.resume).expanduser(), info, task, {**scores, **source, "limit": args.limit}))
    return 0


def _read_ours(path: Path) -> dict | None:
    """What an earlier eval saved in `path`: {} when there is no file, None when the file is not one this command
    wrote (the user's own eval.json, a list, a CSV, a damaged file): it is never replaced."""
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        saved = json.loads(path.read_bytes()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError, RecursionError):
        return None
    return saved if isinstance(saved, dict) and saved.get(MARKER) == 1 else None


def save_result(target: Path, info: dict, task: str, scores: dict) -> str:
    """The scores into the run dir `resume=` names (or holds the checkpoint it names): its eval.json, beside what
    other evals saved there, or RESULTS_ELSEWHERE when eval.json is not one this command wrote. The line to print."""
    run_dir = target if target.is_dir() else target.parent.parent if target.parent.name == CKPT_DIR else None
    if run_dir is None or not (run_dir / ".hydra" / "config.yaml").is_file():  # what every run dir holds
        return f"not saved: {target} is not in a gpt_exp run dir (no .hydra/config.yaml beside its {CKPT_DIR}/)"
    for name in (RESULTS, RESULTS_ELSEWHERE):
        path = run_dir / name
        saved = _read_ours(path)
        if saved is not None:
            break
    else:
        return f"not saved: {run_dir / RESULTS} and {RESULTS_ELSEWHERE} are not files gpt_exp's eval wrote"
    saved[MARKER] = 1
    saved[task] = {**scores, "model": info["source"], "step": info["step"]}
    try:
        atomic_write_bytes(path, json.dumps(saved, indent=1).encode())
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); the scores are printed above") from None
    if name == RESULTS:
        return f"saved in {path}"
    return f"saved in {path} ({run_dir / RESULTS} is not one gpt_exp's eval wrote: left as it is)"


if __name__ == "__main__":
    sys.exit(main())
