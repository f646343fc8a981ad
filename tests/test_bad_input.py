"""Every mistake a user can make on the command line or in their data: one line naming the problem and the fix,
exit code 2, no traceback, and nothing lost or left behind that a later run could take for complete.

Mistakes that the config checks catch run in-process (compose + to_object + validate, as `run` does before any
work); the rest, and a sample of the config ones, run `python -m gpt_exp.run` the way a user does.
"""

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from gpt_exp.config import register_schema, validate
from gpt_exp.cli import is_user_error, user_error_line
from tests.helpers import cli_env, only_run_dir, read_metrics, run_cli

register_schema()

# Files of the user's that share the folder with the runs: a failed run must never take them with it.
USER_FILES = {"notes.txt": "my notes", ".git/HEAD": "ref: refs/heads/main\n",
              "outputs/old_run/metrics.jsonl": '{"step": 0, "loss": 10.9}\n'}


def _xfail(reason: str, case: str, args: list[str], expected: str):
    return pytest.param(case, args, expected, id=case, marks=pytest.mark.xfail(strict=False, reason=reason))


# (case, extra arguments, the line's expected text); {tmp} is the test's own folder
CLI_CASES = [
    ("wrong type", ["B=abc"], "error: B=abc is invalid: the batch size must be an integer >= 1, e.g. B=4, or B=auto"),
    ("auto probe without time", ["B=auto", "train.total_batch_size=256", "train.autobatch_probe_s=0"], "error: train.autobatch_probe_s=0.0 is invalid: it must be > 0 seconds, e.g. 120 on a busy machine"),
    ("auto without a step size", ["B=auto"], "error: train.total_batch_size=null is invalid: B=auto keeps the tokens per step: give them as a multiple of T=32, e.g. train.total_batch_size=2048"),
    ("unknown key", ["train.max_step=3"], "error: unknown config key 'train.max_step'; did you mean train.max_steps?"),
    ("added unknown key", ["+train.max_step=5"], "error: unknown config key 'train.max_step'; did you mean train.max_steps?"),
    ("group without +", ["experiment=tiny_smoke"], "error: Could not override 'experiment'. No match in the defaults list. To append to your default list use +experiment=tiny_smoke"),
    ("sweep without -m", ["optim.lr=1e-4,3e-4"], "error: Ambiguous value for argument 'optim.lr=1e-4,3e-4' 1. To use it as a list, use key=[value1,value2] 2. To use it as string, quote the value: key='value1,value2' 3. To sweep over it, add --multirun to your command line"),
    ("null group", ["batch=null"], "error: batch=null: a config group takes an option name; use batch=OPTION (--help lists them) or ~batch"),
    ("bad syntax", ["optim.lr=[1"], "error: cannot parse the command line: no viable alternative at input '[1'"),
    ("B beyond the data", ["B=100000000"], "error: the data has 338,025 tokens but one batch needs B*T+1 = 3,200,000,001; lower B or T"),
    ("no cuda", ["device=cuda"], "error: device=cuda but CUDA is not available"),
    ("no mps", ["device.type=mps"], "error: device=mps but Apple MPS is not available on this machine; use device=cpu"),
    ("missing corpus", ["data=text", "data.path={tmp}/nope.txt"], "error: data.path={tmp}/nope.txt does not exist"),
    ("empty corpus", ["data=text", "data.path={tmp}/empty.txt"], "error: the corpus at {tmp}/empty.txt is empty"),
    ("corpus too short", ["data=text", "data.path={tmp}/short.txt"], "error: the data has 4 tokens but one batch needs B*T+1 = 129; lower B or T"),
    ("not UTF-8", ["data=text", "data.path={tmp}/latin1.txt"], "error: {tmp}/latin1.txt is not UTF-8 (byte 3: b'\\xe9')"),
    ("no .txt in dir", ["data=text", "data.path={tmp}/no_text"], "error: data.path={tmp}/no_text holds no .txt files"),
    ("resume missing", ["resume={tmp}/nope"], "error: resume={tmp}/nope does not exist; give a run dir"),
    ("resume without ckpt", ["resume={tmp}/no_text"], "error: resume={tmp}/no_text holds no checkpoint (checkpoints/step_*.pt)"),
    ("run dir unwritable", ["hydra.run.dir={tmp}/short.txt/run"], "error: cannot write {tmp}/short.txt/run (Not a directory); free disk space"),
    ("cache dir unwritable", ["data=text", "data.path={tmp}/latin1_fixed.txt", "data.cache_dir={tmp}/short.txt/c"], "error: cannot write the token cache in {tmp}/short.txt/c (Not a directory)"),
    ("resume corrupt", ["resume={tmp}/broken.pt"], "error: resume: {tmp}/broken.pt is not a readable gpt_exp checkpoint"),
    # the run dir is the user's folder, or holds their earlier runs: a failed run must leave every file of theirs
    ("run dir is the folder", ["B=0", "hydra.run.dir=."], "error: B=0 is invalid: the batch size must be an integer >= 1"),
    ("run dir is outputs", ["T=2048", "hydra.run.dir=outputs"], "error: T=2048 is invalid: it exceeds model.block_size=1024"),
    ("interpolation", ["data=text", "data.path=${{HOME}}/x"], "error: data.path=${{HOME}}/x: ${{HOME}} is not a config key; for an environment variable write ${{oc.env:HOME}}"),
]

# Mistakes that validation catches before any work: (case, arguments, the line's expected text).
# The line must also name the key of the last argument.
CONFIG_CASES = [
    ("empty value", ["T="], "error: T=: Value '' of type 'str' could not be converted to Integer; fix the value of T"),
    ("float for int", ["train.max_steps=1.5"], "error: train.max_steps=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    ("zero batch", ["B=0"], "error: B=0 is invalid: the batch size must be an integer >= 1, e.g. B=4, or B=auto"),
    ("zero seq len", ["T=0"], "error: T=0 is invalid: the sequence length must be >= 1, e.g. T=32"),
    ("T > block size", ["T=2048"], "error: T=2048 is invalid: it exceeds model.block_size=1024; use T<=1024"),
    ("T > tiny block", ["model=tiny", "T=512"], "error: T=512 is invalid: it exceeds model.block_size=256; use T<=256"),
    ("lr zero", ["optim.lr=0"], "error: optim.lr=0.0 is invalid: the learning rate must be > 0, e.g. optim.lr=6e-4"),
    ("lr negative", ["optim.lr=-3e-4"], "error: optim.lr=-0.0003 is invalid: the learning rate must be > 0"),
    ("lr text", ["optim.lr=fast"], "error: optim.lr=fast: Value 'fast' of type 'str' could not be converted to Float"),
    ("min lr ratio", ["optim.min_lr_ratio=1.5"], "error: optim.min_lr_ratio=1.5 is invalid: it must be in [0, 1]"),
    ("negative warmup", ["optim.warmup_steps=-1"], "error: optim.warmup_steps=-1 is invalid: it must be >= 0"),
    ("zero steps", ["train.max_steps=0"], "error: train.max_steps=0 is invalid: it must be >= 1"),
    ("steps and tokens", ["train.max_tokens=1000"], "error: train.max_tokens=1000 is invalid: give exactly one of train.max_steps (now 1) and train.max_tokens: e.g. train.max_tokens=1000000 alone"),
    ("neither steps nor tokens", ["train.max_steps=null"], "error: train.max_tokens=null is invalid: give exactly one of train.max_steps (now null) and train.max_tokens"),
    ("zero tokens", ["train.max_steps=null", "train.max_tokens=0"], "error: train.max_tokens=0 is invalid: it must be >= 1"),
    ("eval without val split", ["train.eval_every=10"], "error: train.eval_every=10 is invalid: there is no val split (data.val_fraction=0.0); set data.val_fraction=0.1"),
    ("negative ckpt_every", ["train.ckpt_every=-5"], "error: train.ckpt_every=-5 is invalid: it must be >= 0 (0: no checkpoints)"),
    ("grad accumulation", ["train.total_batch_size=1000"], "error: train.total_batch_size=1000 is invalid: it must be a positive multiple of B*T=128"),
    ("bad schedule", ["optim.schedule=linear"], "error: optim.schedule=linear: Invalid value 'linear', expected one of [cosine, constant, wsd]"),
    ("bad cpu matmul", ["device.cpu_matmul=mkl"], "error: device.cpu_matmul=mkl: Invalid value 'mkl', expected one of [onednn, blas]"),
    ("unknown group option", ["model=gpt3"], "error: unknown option model=gpt3; choose one of: gpt2, gpt2-large, gpt2-medium, gpt2-xl, modern, modern_tiny, tiny"),
    ("unknown experiment", ["+experiment=nope"], "error: unknown option experiment=nope; choose one of:"),
    ("text without path", ["data=text"], "error: data.path=null is invalid: data=text needs data.path=FILE_OR_DIR"),
    # seeds: numpy takes [0, 2**32); a bad data.shuffle_seed would fail only at the first epoch wrap, hours in
    ("negative seed", ["train.seed=-1"], "error: train.seed=-1 is invalid: it must be in [0, 2**32) = [0, 4294967295], e.g. 1337"),
    ("seed too large", ["train.seed=4294967296"], "error: train.seed=4294967296 is invalid: it must be in [0, 2**32)"),
    ("float seed", ["train.seed=1.0"], "error: train.seed=1.0: Value '1.0' of type 'float' could not be converted to Integer"),
    ("negative shuffle seed", ["data.shuffle_seed=-1"], "error: data.shuffle_seed=-1 is invalid: it must be in [0, 2**32) = [0, 4294967295], or null for the stored order"),
    ("shuffle seed too large", ["data.shuffle_seed=4294967296"], "error: data.shuffle_seed=4294967296 is invalid: it must be in [0, 2**32)"),
    # the embedding must hold every token id of the gpt2 encoding
    ("vocab too small", ["model.vocab_size=100"], "error: model.vocab_size=100 is invalid: the gpt2 tokenizer has 50257 tokens; use model.vocab_size>=50257 (to pad the embedding for speed, keep it and set model.pad_vocab=true)"),
    ("vocab one short", ["model.vocab_size=50256"], "error: model.vocab_size=50256 is invalid: the gpt2 tokenizer has 50257 tokens"),
    # non-finite floats (nan fails every comparison, inf passes `>= 0`)
    ("eps inf", ["optim.eps=inf"], "error: optim.eps=inf is invalid: it must be a finite number >= 1.2e-38 (smaller rounds to 0 in float32), e.g. 1e-8"),
    ("eps nan", ["optim.eps=nan"], "error: optim.eps=nan is invalid: it must be a finite number >= 1.2e-38"),
    ("eps below float32", ["optim.eps=1e-300"], "error: optim.eps=1e-300 is invalid: it must be a finite number >= 1.2e-38"),
    ("lr nan", ["optim.lr=nan"], "error: optim.lr=nan is invalid: the learning rate must be > 0"),
    ("lr inf", ["optim.lr=inf"], "error: optim.lr=inf is invalid: the learning rate must be > 0"),
    ("min lr ratio nan", ["optim.min_lr_ratio=nan"], "error: optim.min_lr_ratio=nan is invalid: it must be in [0, 1]"),
    ("weight decay inf", ["optim.weight_decay=inf"], "error: optim.weight_decay=inf is invalid: it must be a finite number >= 0, e.g. 0.1"),
    ("weight decay nan", ["optim.weight_decay=nan"], "error: optim.weight_decay=nan is invalid: it must be a finite number >= 0"),
    ("beta nan", ["optim.betas=[nan,0.9]"], "error: optim.betas=[nan, 0.9] is invalid: give two values in [0, 1)"),
    ("beta inf", ["optim.betas=[0.9,inf]"], "error: optim.betas=[0.9, inf] is invalid: give two values in [0, 1)"),
    ("grad clip inf", ["train.grad_clip=inf"], "error: train.grad_clip=inf is invalid: it must be a finite number >= 0 (0 disables clipping)"),
    ("grad clip nan", ["train.grad_clip=nan"], "error: train.grad_clip=nan is invalid: it must be a finite number >= 0"),
    ("val fraction nan", ["data.val_fraction=nan"], "error: data.val_fraction=nan is invalid: it must be in [0, 1)"),
    ("val fraction negative", ["data.val_fraction=-0.1"], "error: data.val_fraction=-0.1 is invalid: it must be in [0, 1)"),
    # keys that `+`/`++` add where the run would never read them
    ("added with ++", ["++train.max_step=5"], "error: unknown config key 'train.max_step'; did you mean train.max_steps?"),
    ("added to the wrong section", ["+optim.seed=1"], "error: unknown config key 'optim.seed'; did you mean train.seed?"),
    ("added at the top", ["+seed=3"], "error: unknown config key 'seed'; did you mean train.seed?"),
    ("added, nested", ["+model.dropout.p=0.1"], "error: unknown config key 'model.dropout'"),
    ("added existing key", ["+B=3"], "error: Could not append to config. An item is already at 'B'. Either remove + prefix: 'B=3' Or add a second + to add or override 'B': '++B=3'"),
    # a path the chosen source never reads
    ("path without data=text", ["data.path={tmp}/short.txt"], "error: data.path={tmp}/short.txt is invalid: data=shakespeare reads no path; add data=text to train on {tmp}/short.txt"),
    ("empty path", ["data=text", "data.path="], "error: data.path= is invalid: data=text needs data.path=FILE_OR_DIR"),
    # interpolations that do not resolve
    ("not a config key", ["data=text", "data.path=${{HOME}}/x"], "error: data.path=${{HOME}}/x: ${{HOME}} is not a config key; for an environment variable write ${{oc.env:HOME}}"),
    ("config key typo", ["data=text", "data.path=${{optim.lrr}}"], "error: data.path=${{optim.lrr}}: ${{optim.lrr}} is not a config key; did you mean ${{optim.lr}}?"),
    ("unset env var", ["data=text", "data.path=${{oc.env:GPT_EXP_NOPE}}"], "error: data.path=${{oc.env:GPT_EXP_NOPE}}: the environment variable GPT_EXP_NOPE is not set; set it, or give a default: ${{oc.env:GPT_EXP_NOPE,DEFAULT}}"),
    ("unknown resolver", ["data=text", "data.path=${{nope:1}}"], "error: data.path=${{nope:1}}: Unsupported interpolation type nope; write ${{KEY}} for a config key"),
    ("interpolated wrong type", ["B=${{optim.lr}}"], "error: B=0.0006 is invalid: the batch size must be an integer >= 1, e.g. B=4, or B=auto"),
    # other values out of range
    ("negative T", ["T=-1"], "error: T=-1 is invalid: the sequence length must be >= 1"),
    ("zero total batch", ["train.total_batch_size=0"], "error: train.total_batch_size=0 is invalid: it must be a positive multiple of B*T=128"),
    ("keep no checkpoint", ["train.keep_ckpts=0"], "error: train.keep_ckpts=0 is invalid: keep at least 1 checkpoint"),
    ("log every 0", ["train.log_every=0"], "error: train.log_every=0 is invalid: it must be >= 1"),
    ("no eval batches", ["train.eval_batches=0"], "error: train.eval_batches=0 is invalid: it must be >= 1"),
    ("negative overfit", ["train.overfit_batches=-1"], "error: train.overfit_batches=-1 is invalid: it must be >= 0 (0: off)"),
    ("zero heads", ["model.n_head=0"], "error: model.n_head=0 is invalid: it must be >= 1"),
    ("zero layers", ["model.n_layer=0"], "error: model.n_layer=0 is invalid: it must be >= 1"),
    ("zero block size", ["model.block_size=0"], "error: model.block_size=0 is invalid: it must be >= 1"),
    ("heads do not divide", ["model.n_embd=25"], "error: model.n_embd=25 is invalid: it must be divisible by model.n_head=12"),
    ("zero device threads", ["device.threads=0"], "error: device.threads=0 is invalid: it must be >= 1, or null for all cores"),
    ("zero data threads", ["data.threads=0"], "error: data.threads=0 is invalid: it must be >= 1, or null for one per core"),
    ("zero shard tokens", ["data.shard_tokens=0"], "error: data.shard_tokens=0 is invalid: it must be >= 1"),
    ("beta of 1", ["optim.betas=[1,0.9]"], "error: optim.betas=[1.0, 0.9] is invalid: give two values in [0, 1), e.g. 'optim.betas=[0.9,0.95]'"),
    ("one beta", ["optim.betas=[0.9]"], "error: optim.betas=[0.9] is invalid: give two values in [0, 1)"),
    ("betas not numbers", ["optim.betas=[a,b]"], "error: optim.betas=[a,b]: Value 'a' of type 'str' could not be converted to Float; fix the value of optim.betas[0]"),
    # a list where a scalar goes, a scalar where a list goes, a section or a group given the wrong kind of value
    ("list for a scalar", ["B=[1,2]"], "error: B=[1, 2] is invalid: the batch size must be an integer >= 1, e.g. B=4, or B=auto"),
    ("scalar for a list", ["optim.betas=0.9"], "error: optim.betas=0.9: Invalid value assigned: float is not a ListConfig, list or tuple.; fix the value of optim.betas"),
    ("list for a section", ["train=[1]"], "error: train=[1]: Cannot merge DictConfig with ListConfig; fix the value of train"),
    ("number for a section", ["train=3"], "error: train=3: Invalid type assigned: int is not a subclass of TrainConfig."),
    ("group given keys", ["model={{n_layer:0}}"], "error: model.n_layer=0 is invalid: it must be >= 1"),
    ("null group", ["model=null"], "error: model=null: a config group takes an option name; use model=OPTION (--help lists them) or ~model"),
    ("empty group option", ["data="], "error: unknown option data=; choose one of: fineweb_edu, mix, shakespeare, text"),
    ("float in exponent form", ["B=1e3"], "error: B=1000.0 is invalid: the batch size must be an integer >= 1, e.g. B=4, or B=auto"),
]

# Edge values that validation accepts: each must run to the end (test_accepted_edges_run_to_the_end).
ACCEPTED = ["train.seed=0", "train.seed=4294967295", "data.shuffle_seed=4294967295", "data.shuffle_seed=null",
            "model.vocab_size=50304", "optim.betas=[0,0]", "optim.eps=1.2e-38", "train.grad_clip=0",
            "optim.min_lr_ratio=0", "optim.warmup_steps=100", "+note=baseline", "+experiment=tiny_smoke",
            "model={{n_layer:1}}"]
ACCEPTED_DATA = [["data=fineweb_edu", "data.path={tmp}/short.txt"], ["data=text", "data.path=${{oc.env:HOME}}"]]


def _user_files(folder: Path) -> dict:
    return {p: p.read_text() for p in (folder / name for name in USER_FILES)}


@pytest.fixture
def workdir(tmp_path):
    """The folder a user runs in: their own files, and the broken inputs of the cases."""
    for name, text in USER_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short.\n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path / "latin1_fixed.txt").write_text("caf\u00e9, now in UTF-8")
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "notes.md").write_text("markdown is not read")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    return tmp_path


def _assert_one_error_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert expected in stderr, stderr


def _assert_nothing_lost_or_left(workdir: Path, before: set, user_files: dict, cache_dir: Path) -> None:
    after = set(workdir.rglob("*"))
    assert before <= after, f"removed: {sorted(before - after)}"
    assert _user_files(workdir) == user_files
    assert not after - before, f"left behind: {sorted(after - before)}"  # not even the empty outputs/YYYY-MM-DD
    assert not list(cache_dir.glob("*.tmp")) and not list(cache_dir.glob(".*.tmp"))


@pytest.mark.parametrize("case, args, expected", CLI_CASES, ids=[getattr(c, "id", None) or c[0] for c in CLI_CASES])
def test_bad_input_is_one_line(workdir, cache_dir, case, args, expected):
    before, user_files = set(workdir.rglob("*")), _user_files(workdir)
    args = [a.format(tmp=workdir) for a in args]
    result = run_cli("run", "train.max_steps=1", f"data.cache_dir={cache_dir}", "logger.mode=disabled", *args,
                     cwd=workdir)
    assert result.returncode == 2, result.stderr
    _assert_one_error_line(result.stderr, expected.format(tmp=workdir))
    _assert_nothing_lost_or_left(workdir, before, user_files, cache_dir)


def _config_error(args: list[str]) -> BaseException:
    """What composing and validating `args` raises, the way `python -m gpt_exp.run` does before any work."""
    with initialize_config_module("gpt_exp.conf", version_base="1.3"):
        try:
            validate(OmegaConf.to_object(compose("config", overrides=["train.max_steps=1", *args])))
        except Exception as e:  # noqa: BLE001 -- the test asserts what it is
            return e
    pytest.fail(f"{args} passed validation")


@pytest.mark.parametrize("case, args, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line(tmp_path, case, args, expected):
    args = [a.format(tmp=tmp_path) for a in args]
    e = _config_error(args)
    assert is_user_error(e), repr(e)  # the entry point prints it and exits 2; anything else is a traceback
    assert getattr(e, "exit_code", 2) == 2
    line = f"error: {user_error_line(e)}\n"
    _assert_one_error_line(line, expected.format(tmp=tmp_path))
    key = args[-1].split("=", 1)[0].lstrip("+~")
    assert key in line or key.rsplit(".", 1)[0] in line, line  # the key, or for `+a.b.c` the key it added


def test_accepted_edges_run_to_the_end(workdir, cache_dir):
    """Values at the edge of what validation accepts train, write their metrics and exit 0."""
    with initialize_config_module("gpt_exp.conf", version_base="1.3"):
        for overrides in [[edge] for edge in ACCEPTED] + ACCEPTED_DATA:
            validate(OmegaConf.to_object(compose("config", overrides=[o.format(tmp=workdir) for o in overrides])))
    result = run_cli("run", "model=tiny", "train.max_steps=2", "B=1", "T=8", f"data.cache_dir={cache_dir}",
                     "logger.mode=disabled", *[a.format(tmp=workdir) for a in ACCEPTED], cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert [row["step"] for row in read_metrics(only_run_dir(workdir))] == [0, 1]


def test_full_disk_is_one_line(workdir, cache_dir):
    """A write that fails without a file name (here EFBIG under a file-size limit, as ENOSPC on a full disk)."""
    before, user_files = set(workdir.rglob("*")), _user_files(workdir)
    result = subprocess.run(
        [sys.executable, "-m", "gpt_exp.run", "train.max_steps=1", f"data.cache_dir={cache_dir}", "logger.mode=disabled"],
        cwd=workdir, env=cli_env(workdir), capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1)),
    )
    assert result.returncode == 2, result.stderr
    _assert_one_error_line(result.stderr, "error: cannot write: File too large (EFBIG); free disk space or raise the "
                                          "file-size limit (ulimit -f), or write elsewhere (hydra.run.dir=DIR")
    _assert_nothing_lost_or_left(workdir, before, user_files, cache_dir)


def _os_error(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), *([filename] if filename else []))


def _raised_from(inner: BaseException, chained: str) -> BaseException:
    """A RuntimeError raised from `inner` explicitly (`raise ... from`, __cause__) or while handling it (__context__)."""
    try:
        try:
            raise inner
        except OSError as e:
            if chained == "cause":
                raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
            raise RuntimeError("PytorchStreamWriter failed writing file data/0")
    except RuntimeError as outer:
        return outer


# Writes that fail for want of room, whatever file they were: (case, the error, the line's expected text)
WRITE_FAILURES = [
    ("file too large", lambda: _os_error(errno.EFBIG), "cannot write: File too large (EFBIG); free disk space or raise "
     "the file-size limit (ulimit -f), or write elsewhere (hydra.run.dir=DIR, data.cache_dir=DIR)"),
    ("disk full", lambda: _os_error(errno.ENOSPC), "cannot write: No space left on device (ENOSPC); free disk space, or write elsewhere"),
    ("over quota", lambda: _os_error(errno.EDQUOT), "cannot write: Disk quota exceeded (EDQUOT); free space within your disk quota"),
    ("read-only", lambda: _os_error(errno.EROFS), "cannot write: Read-only file system (EROFS); write elsewhere (hydra.run.dir=DIR"),
    ("disk full, named", lambda: _os_error(errno.ENOSPC, "/runs/metrics.jsonl"),
     "cannot write /runs/metrics.jsonl (No space left on device); free disk space, or write elsewhere"),
    ("as __cause__", lambda: _raised_from(_os_error(errno.EFBIG), "cause"), "cannot write: File too large (EFBIG)"),
    ("as __context__", lambda: _raised_from(_os_error(errno.ENOSPC), "context"), "cannot write: No space left on device (ENOSPC)"),
]


@pytest.mark.parametrize("case, make_error, expected", WRITE_FAILURES, ids=[c[0] for c in WRITE_FAILURES])
def test_write_failure_is_one_line(case, make_error, expected):
    e = make_error()
    assert is_user_error(e)
    assert user_error_line(e).startswith(expected), user_error_line(e)


def test_other_errors_stay_bugs():
    """An OSError that is no failed write, and a chain that loops, are bugs: raised with their traceback."""
    assert not is_user_error(_os_error(errno.ECONNREFUSED))
    assert not is_user_error(_raised_from(_os_error(errno.EBADF), "cause"))
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_user_error(a)
