"""Every mistake a user can make on the command line or in their data: one line naming the problem and the fix,
exit code 2, no traceback, and nothing left behind that a later run could take for complete."""

import pytest

from tests.helpers import run_cli

# (case, extra arguments, the line's expected text); {tmp} is the test's own folder
CASES = [
    ("wrong type", ["B=abc"], "error: B=abc: Value 'abc' of type 'str' could not be converted to Integer; fix the value of B"),
    ("empty value", ["T="], "error: T=: Value '' of type 'str' could not be converted to Integer; fix the value of T"),
    ("float for int", ["train.max_steps=1.5"], "error: train.max_steps=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    ("zero batch", ["B=0"], "error: B=0 is invalid: the batch size must be >= 1, e.g. B=4"),
    ("zero seq len", ["T=0"], "error: T=0 is invalid: the sequence length must be >= 1, e.g. T=32"),
    ("T > block size", ["T=2048"], "error: T=2048 is invalid: it exceeds model.block_size=1024; use T<=1024"),
    ("T > tiny block", ["model=tiny", "T=512"], "error: T=512 is invalid: it exceeds model.block_size=256; use T<=256"),
    ("lr zero", ["optim.lr=0"], "error: optim.lr=0.0 is invalid: the learning rate must be > 0, e.g. optim.lr=6e-4"),
    ("lr negative", ["optim.lr=-3e-4"], "error: optim.lr=-0.0003 is invalid: the learning rate must be > 0"),
    ("lr text", ["optim.lr=fast"], "error: optim.lr=fast: Value 'fast' of type 'str' could not be converted to Float"),
    ("min lr ratio", ["optim.min_lr_ratio=1.5"], "error: optim.min_lr_ratio=1.5 is invalid: it must be in [0, 1]"),
    ("negative warmup", ["optim.warmup_steps=-1"], "error: optim.warmup_steps=-1 is invalid: it must be >= 0"),
    ("zero steps", ["train.max_steps=0"], "error: train.max_steps=0 is invalid: it must be >= 1"),
    ("eval without val split", ["train.eval_every=10"], "error: train.eval_every=10 is invalid: there is no val split (data.val_fraction=0.0); set data.val_fraction=0.1"),
    ("negative ckpt_every", ["train.ckpt_every=-5"], "error: train.ckpt_every=-5 is invalid: it must be >= 0 (0: no checkpoints)"),
    ("grad accumulation", ["train.total_batch_size=1000"], "error: train.total_batch_size=1000 is invalid: it must be a positive multiple of B*T=128"),
    ("bad schedule", ["optim.schedule=linear"], "error: optim.schedule=linear: Invalid value 'linear', expected one of [cosine, constant]"),
    ("bad cpu matmul", ["device.cpu_matmul=mkl"], "error: device.cpu_matmul=mkl: Invalid value 'mkl', expected one of [onednn, blas]"),
    ("unknown key", ["train.max_step=3"], "error: unknown config key 'train.max_step'; did you mean train.max_steps?"),
    ("unknown group option", ["model=gpt3"], "error: unknown option model=gpt3; choose one of: gpt2, gpt2-large, gpt2-medium, gpt2-xl, tiny"),
    ("unknown experiment", ["+experiment=nope"], "error: unknown option experiment=nope; choose one of:"),
    ("bad syntax", ["optim.lr=[1"], "error: cannot parse the command line: no viable alternative at input '[1'"),
    ("no cuda", ["device=cuda"], "error: device=cuda but CUDA is not available"),
    ("no mps", ["device.type=mps"], "error: device=mps but Apple MPS is not available on this machine; use device=cpu"),
    ("text without path", ["data=text"], "error: data.path=None is invalid: data=text needs data.path=FILE_OR_DIR"),
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
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("Too short.\n")
    (tmp / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp / "latin1_fixed.txt").write_text("caf\u00e9, now in UTF-8")
    (tmp / "no_text").mkdir()
    (tmp / "no_text" / "notes.md").write_text("markdown is not read")
    (tmp / "broken.pt").write_bytes(b"not a checkpoint")
    return tmp


@pytest.mark.parametrize("case, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(workdir, cache_dir, case, args, expected):
    args = [a.format(tmp=workdir) for a in args]
    result = run_cli("run", "train.max_steps=1", f"data.cache_dir={cache_dir}", "logger.mode=disabled", *args,
                     cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert expected.format(tmp=workdir) in result.stderr
    assert not list(workdir.glob("outputs/*/*"))  # no run dir left that could pass for a run
    assert not list(cache_dir.glob("*.tmp")) and not list(cache_dir.glob(".*.tmp"))
