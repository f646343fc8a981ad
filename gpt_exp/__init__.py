"""gpt_exp: GPT-2 pretraining experiments with Hydra configs, cached pretokenization and W&B logging."""

__version__ = "0.1.0"
