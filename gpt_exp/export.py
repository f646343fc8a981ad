"""Export a run's model as a Hugging Face GPT-2 dir: `python -m gpt_exp.export RUN_DIR_OR_CKPT OUT_DIR`.

The dir (config.json, model.safetensors, generation_config.json and GPT-2's tokenizer files) loads with
`transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)`, `AutoTokenizer.from_pretrained(OUT_DIR)` and
`pipeline("text-generation", model=OUT_DIR)`.
OUT_DIR must be new or empty: an export never overwrites files, and appears whole or not at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpt_exp.checkpoint import load_model, require_sp
from gpt_exp.cli import ArgumentParser, command
from gpt_exp.errors import ConfigError
from gpt_exp.generation import describe
from gpt_exp.hf import check_out_dir, save_hf


def export(source: str, out_dir: str) -> tuple[Path, dict]:
    """Write the model `source` names (a run dir's newest checkpoint, a checkpoint file, or a HF dir) to `out_dir`."""
    if not Path(source).expanduser().exists():
        raise ConfigError(f"{source} does not exist; give a run dir (outputs/<date>/<time>) or a checkpoint file")
    check_out_dir(out_dir)  # before loading: a big model takes a while to load, only to be refused
    model, info = load_model(source)
    require_sp(model, info["source"], "export")
    return save_hf(model, out_dir, step=info["step"]), info  # GPT-2's dir, or Llama's for a Llama-shaped model


@command
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m gpt_exp.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="RUN_DIR_OR_CKPT", help="a run dir (its newest checkpoint) or a .pt file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face GPT-2 dir to write (new or empty)")
    args = parser.parse_args(argv)
    out_dir, info = export(args.source, args.out_dir)
    print(f"exported {describe(info)} to {out_dir} (model.safetensors, config.json, the GPT-2 tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
