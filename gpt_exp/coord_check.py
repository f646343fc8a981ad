"""muP's and CompleteP's coordinate checks: train a few steps at several widths (or depths) and record the activations.

Widths: each layer type's mean |activation|. Under muP (model.parametrization=mup) every curve stays flat as the width
grows; under SP the logits (and the attention and MLP outputs, after the first update) grow with the width, which is
why SP's best lr shrinks as the model widens. As in microsoft/mup's coord check: the same batches at every width, Adam
at one fixed lr, depth 2, T=64 on tiny shakespeare; step t's numbers are the forward pass of step t (step 1: the init).

Depths (--depths, at one --width): each block's residual stream on a fixed probe batch, its RMS and the RMS of its
change since the init, after each of the steps. Under CompleteP (model.parametrization=completep, Dey et al. 2025) the
change stays flat as the depth grows; under SP and muP every block's update adds to it, so it grows with the depth
(as in the depth coord check of EleutherAI's nanoGPT-mup, completep branch).

    python -m gpt_exp.coord_check --widths 64,128,256,512 --steps 5 --parametrization both --out coord_check/
    python -m gpt_exp.coord_check --depths 2,4,8,16 --width 128 --steps 5 --parametrization all --out coord_check/
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt_exp.cli import ArgumentParser, command
from gpt_exp.config import PARAMETRIZATIONS, ConfigError, DataConfig, OptimConfig
from gpt_exp.data.cache import prepare_tokens
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.optim import build_optimizer

LAYERS = ("embedding", "attention", "mlp", "logits")  # token embedding output, each block's attn / mlp output
N_HEAD = 4  # fixed: d_head grows with the width, where 1/d_head and 1/sqrt(d_head) differ
BYTES_PER_PARAM = 16  # fp32 weights, their gradients and AdamW's two moments: the least a width's training holds


@dataclass(frozen=True)
class Setup:
    n_layer: int = 2
    T: int = 64
    B: int = 8
    lr: float = 1e-2
    base_width: int = 64
    seed: int = 0
    depth_base: int = 2  # CompleteP's L_base (under completep only)
    depth_alpha: float = 1.0


def load_tokens(cache_dir: str | None) -> np.ndarray:
    """Tiny shakespeare's GPT-2 tokens (the token cache, built on first use)."""
    return np.asarray(prepare_tokens(DataConfig(cache_dir=cache_dir)).load()[:], dtype=np.int64)


def batches(tokens: np.ndarray, steps: int, B: int, T: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` random (x, y) batches: the same ones for every width and parametrization of a seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - T - 1, size=B)
        buf = torch.from_numpy(np.stack([tokens[s: s + T + 1] for s in starts]))
        out.append((buf[:, :-1].contiguous(), buf[:, 1:].contiguous()))
    return out


def model_config(width: int, parametrization: str, setup: Setup) -> GPTConfig:
    return GPTConfig(block_size=setup.T, vocab_size=50257, n_layer=setup.n_layer, n_head=N_HEAD, n_embd=width,
                     parametrization=parametrization, mup_base_width=setup.base_width, depth_base=setup.depth_base,
                     depth_alpha=setup.depth_alpha)


def build(width: int, parametrization: str, setup: Setup, lr: float):
    """A depth-`setup.n_layer` GPT of `width` and its AdamW (muP's lr groups under mup), seeded by setup.seed."""
    torch.manual_seed(setup.seed)
    model = GPT(model_config(width, parametrization, setup))
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0), "cpu", sharded=False)
    return model, optimizer


def record(model: GPT) -> tuple[dict[str, list[float]], list]:
    """Forward hooks that append each layer type's mean |activation| to the returned dict's lists."""
    seen: dict[str, list[float]] = {name: [] for name in LAYERS}

    def hook(name):
        return lambda module, args, out: seen[name].append(out.detach().abs().mean().item())

    handles = [model.transformer.wte.register_forward_hook(hook("embedding"))]
    for block in model.transformer.h:
        handles.append(block.attn.register_forward_hook(hook("attention")))
        handles.append(block.mlp.register_forward_hook(hook("mlp")))
    handles.append(model.register_forward_hook(lambda module, args, out: seen["logits"].append(
        out[0].detach().abs().mean().item())))
    return seen, handles


def coord_rows(widths: list[int], steps: int, parametrization: str, tokens: np.ndarray,
               setup: Setup = Setup()) -> list[dict]:
    """One row per (width, step, layer): the mean |activation| (averaged over the blocks for attention and mlp)."""
    data = batches(tokens, steps, setup.B, setup.T, setup.seed)
    rows = []
    for width in widths:
        model, optimizer = build(width, parametrization, setup, setup.lr)
        for step, (x, y) in enumerate(data, start=1):
            seen, handles = record(model)
            _, loss = model(x, y)
            for h in handles:
                h.remove()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for layer in LAYERS:
                rows.append({"parametrization": parametrization, "width": width, "step": step, "layer": layer,
                             "mean_abs": float(np.mean(seen[layer])), "loss": loss.item()})
    return rows


def residual_streams(model: GPT, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output (the residual stream after it) on `x`, without a gradient."""
    seen: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
               for block in model.transformer.h]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def rms(t: torch.Tensor) -> float:
    return t.square().mean().sqrt().item()


def depth_rows(depths: list[int], width: int, steps: int, parametrization: str, tokens: np.ndarray,
               setup: Setup = Setup()) -> list[dict]:
    """One row per (depth, step, block): the RMS of the residual stream after the block on a fixed probe batch (the
    first batch), and the RMS of its change since the init, after `step` updates."""
    data = batches(tokens, steps, setup.B, setup.T, setup.seed)
    probe = data[0][0]
    rows = []
    for depth in depths:
        model, optimizer = build(width, parametrization, dataclasses.replace(setup, n_layer=depth), setup.lr)
        start = residual_streams(model, probe)
        for step, (x, y) in enumerate(data, start=1):
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for layer, (h0, h) in enumerate(zip(start, residual_streams(model, probe)), start=1):
                rows.append({"parametrization": parametrization, "depth": depth, "width": width, "step": step,
                             "layer": layer, "rms": rms(h), "update_rms": rms(h - h0), "loss": loss.item()})
    return rows


def last_block(rows: list[dict], key: str, parametrization: str, step: int) -> dict[int, float]:
    """{depth: `key` of the last block} at `step`: what the depth check compares across depths."""
    return {r["depth"]: r[key] for r in rows if r["parametrization"] == parametrization and r["step"] == step
            and r["layer"] == r["depth"]}


def plot_depths(rows: list[dict], path: Path) -> None:
    import matplotlib  # a plotting backend is only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({r["parametrization"] for r in rows}, key=PARAMETRIZATIONS.index)
    keys = (("update_rms", "RMS of its change since the init"), ("rms", "RMS of the residual stream"))
    fig, axes = plt.subplots(len(params), 2, figsize=(9, 3.2 * len(params)), squeeze=False)
    for i, par in enumerate(params):
        for j, (key, label) in enumerate(keys):
            ax = axes[i][j]
            for step in sorted({r["step"] for r in rows}):
                pts = sorted(last_block(rows, key, par, step).items())
                ax.plot(*zip(*pts), marker="o", label=f"step {step}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{par}: last block")
            ax.set_xlabel("depth (n_layer)")
            ax.set_ylabel(label)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # a plotting backend is only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({r["parametrization"] for r in rows}, key=PARAMETRIZATIONS.index)
    fig, axes = plt.subplots(len(params), len(LAYERS), figsize=(4 * len(LAYERS), 3.2 * len(params)), squeeze=False)
    for i, par in enumerate(params):
        for j, layer in enumerate(LAYERS):
            ax = axes[i][j]
            mine = [r for r in rows if r["parametrization"] == par and r["layer"] == layer]
            for step in sorted({r["step"] for r in mine}):
                pts = sorted((r["width"], r["mean_abs"]) for r in mine if r["step"] == step)
                ax.plot(*zip(*pts), marker="o", label=f"step {step}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{par}: {layer}")
            ax.set_xlabel("width (n_embd)")
            if j == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], out: Path, name: str = "coord_check") -> None:
    """NAME.csv, NAME.json and NAME.png in `out`: coord_check (widths) or coord_check_depth (depths)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (plot_depths if "depth" in rows[0] else plot)(rows, out / f"{name}.png")


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or any(w < N_HEAD or w % N_HEAD for w in widths):
        raise ConfigError(f"--widths={text} is invalid: give comma-separated multiples of {N_HEAD}, e.g. 64,128,256")
    return widths


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        depths = []
    if not depths or any(d < 1 for d in depths):
        raise ConfigError(f"--depths={text} is invalid: give comma-separated depths >= 1, e.g. 2,4,8,16")
    return depths


def check_fits(widths: list[int], setup: Setup, memory: int | None = None) -> None:
    """Refuse, before anything is allocated, a width whose weights, gradients and Adam state alone exceed this
    machine's memory (`memory` bytes; default: all of its RAM): it would swap or be killed, not run."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if memory is None else memory
    width = max(widths)
    with torch.device("meta"):  # the shapes only: no memory behind them
        params = GPT(model_config(width, "sp", setup)).num_params()
    need = params * BYTES_PER_PARAM
    if need > memory:
        raise ConfigError(f"--widths: width {width} is {params / 1e6:,.0f}M parameters, ~{need / 2**30:,.1f} GiB to "
                          f"train (weights, gradients, Adam's state), more than this machine's {memory / 2**30:,.1f} "
                          f"GiB of memory; give smaller widths, e.g. 64,128,256,512")


@command
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m gpt_exp.coord_check", description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,128,256,512", help="comma-separated n_embd values")
    parser.add_argument("--steps", type=int, default=5, help="training steps per width")
    parser.add_argument("--depths", default=None, help="comma-separated n_layer values: the depth check at --width")
    parser.add_argument("--width", type=int, default=128, help="the depth check's n_embd")
    parser.add_argument("--parametrization", choices=["sp", "mup", "completep", "both", "all"], default=None,
                        help="both: sp and mup; all: sp, mup and completep (default: both for widths, all for depths)")
    parser.add_argument("--lr", type=float, default=Setup.lr, help="Adam's lr (hidden matrices: lr/m under mup)")
    parser.add_argument("--base-width", type=int, default=Setup.base_width, help="muP's base width")
    parser.add_argument("--depth-base", type=int, default=Setup.depth_base, help="CompleteP's base depth")
    parser.add_argument("--cache-dir", default=None, help="the token cache dir (default: data.cache_dir's)")
    parser.add_argument("--out", default="coord_check", help="where coord_check.{csv,json,png} go")
    args = parser.parse_args(argv)
    depths = _depths(args.depths) if args.depths is not None else None
    widths = _widths(args.widths if depths is None else str(args.width))
    if args.steps < 1:
        raise ConfigError(f"--steps={args.steps} is invalid: it must be >= 1, e.g. --steps 5")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr {args.lr} is invalid: it must be a positive number, e.g. --lr {Setup.lr}")
    if args.base_width < 1:
        raise ConfigError(f"--base-width {args.base_width} is invalid: it must be >= 1, e.g. --base-width "
                          f"{Setup.base_width} (muP's base width)")
    if args.depth_base < 1:
        raise ConfigError(f"--depth-base {args.depth_base} is invalid: it must be >= 1, e.g. --depth-base "
                          f"{Setup.depth_base} (CompleteP's base depth)")
    setup = Setup(lr=args.lr, base_width=args.base_width, depth_base=args.depth_base)
    check_fits(widths, dataclasses.replace(setup, n_layer=max(depths or [setup.n_layer])))
    tokens = load_tokens(args.cache_dir)
    choice = args.parametrization or ("both" if depths is None else "all")
    params = {"both": ["sp", "mup"], "all": list(PARAMETRIZATIONS)}.get(choice, [choice])
    if depths is not None:
        rows = [r for par in params for r in depth_rows(depths, widths[0], args.steps, par, tokens, setup)]
        write(rows, Path(args.out), "coord_check_depth")
        for par in params:
            last = last_block(rows, "update_rms", par, args.steps)
            print(f"{par}: the last block's residual change (RMS) at step {args.steps}: "
                  + ", ".join(f"depth {d}: {v:.3g}" for d, v in sorted(last.items())))
        print(f"wrote {Path(args.out) / 'coord_check_depth.png'}, coord_check_depth.csv, coord_check_depth.json")
        return 0
    rows = [r for par in params for r in coord_rows(widths, args.steps, par, tokens, setup)]
    write(rows, Path(args.out))
    for par in params:
        last = {r["width"]: r["mean_abs"] for r in rows
                if r["parametrization"] == par and r["layer"] == "logits" and r["step"] == args.steps}
        print(f"{par}: logits mean |a| at step {args.steps}: "
              + ", ".join(f"{w}: {v:.3g}" for w, v in sorted(last.items())))
    print(f"wrote {Path(args.out) / 'coord_check.png'}, coord_check.csv, coord_check.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
