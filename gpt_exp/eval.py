"""Evaluations of a model: `python -m gpt_exp.eval hellaswag path=hellaswag_val.jsonl resume=RUN_DIR`.

The scoring is gpt_exp/hellaswag.py's; this command parses the options, prints and saves the scores, and turns
failures into one line.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt_exp.atomic import atomic_write_bytes
from gpt_exp.cli import command, parse_options
from gpt_exp.config import DeviceType
from gpt_exp.errors import ConfigError, UserError
from gpt_exp.generation import describe, inference_device, model_source
from gpt_exp.hellaswag import OFFICIAL, hellaswag_scores, load_hellaswag

log = logging.getLogger(__name__)

TASKS = ("hellaswag",)


@dataclass
class EvalArgs:
    path: str | None = None  # the examples, one JSON object per line
    resume: str | None = None  # a run dir (its newest checkpoint) or a checkpoint file
    hf: str | None = None  # or a Hugging Face GPT-2 dir
    limit: int = 0  # score only the first N examples; 0: all
    device: DeviceType = DeviceType.auto  # a GPU where there is one, as `run` does


def _check_task(argv: list[str]) -> None:
    if not argv or argv[0] not in TASKS:
        got = f"unknown eval '{argv[0]}'" if argv else "no eval named"
        raise ConfigError(f"{got}; choose one of: {', '.join(TASKS)} (python -m gpt_exp.eval hellaswag path=FILE "
                          f"resume=RUN_DIR)")


@command
def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        parse_options("eval hellaswag", argv, EvalArgs)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _check_task(argv)
    args = parse_options("eval hellaswag", argv[1:], EvalArgs)
    if args is None:
        return 0
    if args.path is None:
        raise ConfigError(f"hellaswag needs path=FILE; {OFFICIAL}")
    if args.limit < 0:
        raise ConfigError(f"limit={args.limit} is invalid: it must be >= 0 (0: every example)")
    device = inference_device(args.device)
    examples = load_hellaswag(Path(args.path).expanduser(), args.limit)
    model, info = model_source(args.resume, args.hf)
    log.info("%s, on %s: %d examples", describe(info), device, len(examples))
    scores = hellaswag_scores(model.to(device), examples, device)
    print(f"hellaswag: {scores['examples']} examples, acc_norm {scores['acc_norm']:.4f}, acc {scores['acc']:.4f}")
    if args.resume and (saved := save_result(Path(args.resume).expanduser(), info, args, scores)) is not None:
        print(f"saved in {saved}")
    return 0


def save_result(target: Path, info: dict, args: EvalArgs, scores: dict) -> Path | None:
    """The scores into the run's eval.json (beside what other evals saved there) when `resume=` names a run dir or
    one of its checkpoints; None for a lone checkpoint file."""
    run_dir = target if target.is_dir() else target.parent.parent if target.parent.name == "checkpoints" else None
    if run_dir is None:
        return None
    path = run_dir / "eval.json"
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        saved = {}  # a damaged eval.json is replaced whole: it holds only results this command can make again
    saved = saved if isinstance(saved, dict) else {}
    saved["hellaswag"] = {**scores, "path": str(Path(args.path).expanduser()), "limit": args.limit,
                          "model": info["source"], "step": info["step"]}
    try:
        atomic_write_bytes(path, json.dumps(saved, indent=1).encode())
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); the scores are printed above") from None
    return path


if __name__ == "__main__":
    sys.exit(main())
