"""Hydra config groups, installed as the package gpt_exp.conf so that configs ship with a pip install."""
