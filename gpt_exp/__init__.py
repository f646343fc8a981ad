"""gpt_exp: GPT-2 pretraining experiments with Hydra configs, cached pretokenization and W&B logging."""

import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"


def _interrupted_while_starting(signum, frame):  # noqa: ARG001
    print("interrupted", file=_sys.stderr, flush=True)
    _os._exit(130)  # mid-import: nothing is written yet, and an exception here could leave a module half-imported


# `python -m gpt_exp.X` imports this package first, then the command's own (torch takes seconds): Ctrl-C in that time
# ends the command as "interrupted", not an import's traceback. Each command's boundary puts Python's handler back.
# (Python names the module being run "-m" in argv until it starts; a library import leaves the handler alone.)
if _sys.argv[:1] == ["-m"]:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
