"""metrics.jsonl, the run's source of truth: one JSON row per optimizer step (and per evaluation), and its reader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_exp.errors import UserError


class MetricsError(UserError):
    """A metrics.jsonl line that is not a row (damaged by hand, by a disk, or not ours)."""


@dataclass
class StepMetrics:
    """One optimizer step's row."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    dt_ms: float
    tok_per_s: float
    tokens: int  # cumulative tokens trained on
    source_tokens: dict[str, int] | None = None  # data=mix: cumulative tokens of each source (a row's tokens/NAME)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def row_problem(row: Any) -> str | None:
    """Why a parsed metrics line is not a row the tracker writes, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if not (isinstance(row.get("step"), int) and not isinstance(row["step"], bool)):
        return f"step={row.get('step')!r} is not an integer"
    for key in ("loss", "val_loss", "tokens", "tok_per_s"):
        if key in row and not is_number(row[key]):
            return f"{key}={row[key]!r} is not a number"
    return None


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl, each checked. A last line cut short (no newline yet, as a write in progress or a killed
    run leaves it) is skipped; any other line that is not a row is an error naming it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = [(i, line) for i, line in enumerate(data.splitlines(keepends=True), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
            if i == lines[-1][0] and not line.endswith(b"\n") and line.startswith(b"{"):
                break
            raise MetricsError(f"{path} line {i} is not JSON; repair or delete that line") from None
        if (problem := row_problem(row)) is not None:
            raise MetricsError(f"{path} line {i} is not a metrics row ({problem}); repair or delete that line")
        rows.append(row)
    return rows
