"""The seams of the tools that do not train (sample, eval, export, coord_check): the library below them never
imports a command, and what the commands read and write at those seams."""

import subprocess
import sys


def test_the_library_imports_no_command():
    """Training samples and scores HellaSwag through gpt_exp.generation and gpt_exp.hellaswag, which never import
    the CLI layer (the sample and eval commands, or cli.py below them)."""
    code = ("import sys, gpt_exp.trainer, gpt_exp.generation, gpt_exp.hellaswag; "
            "print(sorted(m for m in ('gpt_exp.cli', 'gpt_exp.sample', 'gpt_exp.eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
