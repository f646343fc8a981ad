"""Run and sweep dirs under outputs/, and the names W&B shows for them.

Dirs are named by time to the second; a second run in the same second gets a suffix (`_1`) instead of sharing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

# Overrides that say where a run writes, not what it learns: left out of W&B names.
_NOT_IN_NAMES = ("hydra.", "hydra/", "logger.", "data.cache_dir", "+experiment", "experiment")


def claim_dir(path: str) -> str:
    """Create `path` (or `path_1`, `path_2`, ...) atomically and return the one this process now owns.

    Registered with use_cache=True, so it runs once per config: Hydra copies the resolver cache from the
    sweep's config to each job's, so every job of a sweep sees the same sweep dir.
    """
    if int(os.environ.get("RANK", "0")) > 0:
        # under torchrun every rank composes the config; rank 0 alone owns the run dir and tells the others.
        # This rank's Hydra files and log go to a scratch dir, removed when the run ends.
        return tempfile.mkdtemp(prefix=f"gpt_exp-rank{os.environ['RANK']}-")
    candidate, n = path, 0
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{path}_{n}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("claim_dir"):
        OmegaConf.register_new_resolver("claim_dir", claim_dir, use_cache=True)


def below_outputs(path: Path) -> str:
    """'2026-11-25/09-12-33' for outputs/2026-11-25/09-12-33 (the path itself when it is not under outputs/)."""
    parts = path.parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("outputs") + 1 :]) if "outputs" in parts else str(path)


def swept_keys(sweep_dir: Path, sweeper_params: dict | None) -> set[str] | None:
    """The keys a sweep varies: its sweep overrides (`optim.lr=1e-4,3e-4`) and its sweeper's search space.

    Read from the sweep's multirun.yaml, which the launcher writes before any job starts; None if it is missing.
    """
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return None
    overrides = OverridesParser.create().parse_overrides(list(OmegaConf.load(path).hydra.overrides.task))
    return {o.key_or_group for o in overrides if o.is_sweep_override()} | set(sweeper_params or {})


def overrides_name(overrides: list[str], keys: set[str] | None = None) -> str:
    """'lr=0.0003,B=8' for ['optim.lr=0.0003', 'B=8']: what a job changed (only `keys`, when given), in short."""
    shown = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if (keys is None or key in keys) and not key.startswith(_NOT_IN_NAMES):
            shown.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ",".join(shown)
