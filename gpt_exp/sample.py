"""Text from a trained model: the lecture's top-k sampling, from a run's checkpoint or a Hugging Face GPT-2 dir.

`python -m gpt_exp.sample resume=RUN_DIR prompt="ROMEO:"` (`--help` lists the options). The sampling itself is
gpt_exp/generation.py's; this command parses the options, prints the texts and turns failures into one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from gpt_exp.cli import command, parse_options
from gpt_exp.config import DeviceType
from gpt_exp.errors import UserError, first_line
from gpt_exp.generation import SampleArgs, describe, encode_prompt, inference_device, model_source, sample_texts


@dataclass
class SampleOptions(SampleArgs):
    """The command's options: how to sample (SampleArgs), which model, and where."""

    resume: str | None = None  # a run dir (its newest weights) or a checkpoint file
    hf: str | None = None  # or a Hugging Face GPT-2 dir
    device: DeviceType = DeviceType.auto  # a GPU where there is one, as `run` does


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError on a GPU, the CPU allocator's plain RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


@command
def main(argv: list[str]) -> int:
    args = parse_options("sample", argv, SampleOptions)
    if args is None:
        return 0
    device = inference_device(args.device)
    model, info = model_source(args.resume, args.hf)
    encode_prompt(args.prompt, model.config.block_size)  # a prompt too long is refused before any sampling
    print(f"{describe(info)}, on {device}", file=sys.stderr)
    try:
        texts = sample_texts(model.to(device), args, device)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        elsewhere = "" if device.type == "cpu" else " or sample with device=cpu"
        raise UserError(f"out of memory on {device} sampling num_samples={args.num_samples} x "
                        f"max_new_tokens={args.max_new_tokens} ({first_line(e, 120)}); lower num_samples or "
                        f"max_new_tokens{elsewhere}") from None
    for i, text in enumerate(texts, 1):
        print(f"--- sample {i}/{len(texts)} ---\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
