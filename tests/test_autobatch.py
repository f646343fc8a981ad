"""B=auto: exact candidates, the CUDA search (a fake GPU that runs out of memory), the CPU probe (an injected clock
and memory), and a real tiny GPT probed on the CPU whose weights and optimizer state come back bitwise; the GPU
check script (bench/gpu_check.sh, bench/gpu.py --check) as far as a CPU machine can run it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_exp.autobatch import (FIRST_WARMUP, AutoBatch, candidates, choose_micro_batch, oom_hint, predict_growth,
                               preserve_state, training_step_fn)
from gpt_exp.cpu import apply_cpu_fast_paths
from gpt_exp.errors import ConfigError
from gpt_exp.model import GPT, GPTConfig

MiB = 2**20


def test_candidates_are_the_exact_divisors_that_are_powers_of_two_and_the_largest():
    assert candidates(524_288, 1024) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert candidates(524_288, 1024, world_size=8) == [1, 2, 4, 8, 16, 32, 64]
    assert candidates(524_288, 1024, max_B=64) == [1, 2, 4, 8, 16, 32, 64]
    assert candidates(480 * 1024, 1024, max_B=64) == [1, 2, 4, 8, 16, 32, 60]  # 60: 480's largest divisor <= 64
    assert candidates(3 * 32, 32) == [1, 3]  # 2 does not divide 3
    for total, T, world in [(524_288, 1024, 1), (480 * 1024, 1024, 2), (96, 32, 1)]:
        assert all(total % (B * T * world) == 0 for B in candidates(total, T, world))


@pytest.mark.parametrize("total, T, world, message", [
    (None, 32, 1, "B=auto needs train.total_batch_size"),
    (1000, 32, 1, "train.total_batch_size=1000 is invalid: B=auto needs a positive multiple of T*world_size = 32*1 = 32"),
    (1024, 1024, 2, "train.total_batch_size=1024 is invalid: B=auto needs a positive multiple of T*world_size = 1024*2"),
])
def test_candidates_refuse_a_step_that_no_micro_batch_divides(total, T, world, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")) as e:
        candidates(total, T, world)
    assert "\n" not in str(e.value)


class FakeGPU:
    """A 100 MiB GPU on which a step at micro-batch B peaks at peak_per_B * B bytes."""

    def __init__(self, peak_per_B: int, total: int = 100 * MiB):
        self.peak_per_B, self._total, self.last_B, self.released = peak_per_B, total, 0, 0

    def total(self) -> int:
        return self._total

    def reset_peak(self) -> None:
        self.last_B = 0

    def peak(self) -> int:
        return self.peak_per_B * self.last_B

    def release(self) -> None:
        self.released += 1


def oom_above(limit: int, gpu: FakeGPU, calls: list[int]):
    def step(B: int) -> None:
        calls.append(B)
        if B > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {B} GiB")
        gpu.last_B = B
    return step


def test_cuda_search_takes_the_largest_micro_batch_that_fits():
    gpu, calls = FakeGPU(peak_per_B=5 * MiB), []
    choice = choose_micro_batch(oom_above(8, gpu, calls), [1, 2, 4, 8, 16, 32], torch.device("cuda"),
                                total_batch_size=64 * 1024, T=1024, memory=gpu)
    assert (choice.B, choice.grad_accum_steps) == (8, 8)  # 8 * 1024 tokens x 8 micro-steps = 65,536
    assert calls == [32, 16, 8]  # the largest first; nothing smaller is tried once one fits
    assert gpu.released == 4  # after every try (the failed ones too) and once before training
    assert choice.measured == {"32": {"status": "out of memory"}, "16": {"status": "out of memory"},
                               "8": {"status": "fits", "peak_gib": 0.04, "peak_share": 0.4}}
    assert choice.line() == ("B=auto: B=8 (x8 micro-steps): the largest of 1, 2, 4, 8, 16, 32 that fits cuda "
                             "(100 MiB): out of memory at B=16, 32; B=8 peaks at 40 MiB (40%)")


def test_cuda_search_steps_one_size_down_when_the_largest_that_fits_is_too_close_to_full():
    gpu, calls = FakeGPU(peak_per_B=12 * MiB), []  # B=8 peaks at 96 of 100 MiB
    choice = choose_micro_batch(oom_above(8, gpu, calls), [1, 2, 4, 8, 16], torch.device("cuda"),
                                total_batch_size=16 * 128, T=128, memory=gpu)
    assert (choice.B, choice.grad_accum_steps) == (4, 4) and calls == [16, 8]
    assert "B=8 fits but peaks at 96% > 90%, so one size down" in choice.reason


def test_cuda_search_with_nothing_that_fits_is_one_error_line():
    gpu = FakeGPU(peak_per_B=MiB)
    with pytest.raises(ConfigError, match=r"B=auto: even B=1 runs out of memory on cuda \(100 MiB\); use a smaller"):
        choose_micro_batch(oom_above(0, gpu, []), [1, 2, 4], torch.device("cuda"), total_batch_size=4 * 64, T=64,
                           memory=gpu)


class FakeHost:
    """A process whose resident set grows by fixed + grow_per_B * B during a step at micro-batch B, from 1 GiB, with
    a probe budget of `budget` bytes."""

    peak_resets = True

    def __init__(self, grow_per_B: int, budget: int | None, fixed: int = 0):
        self.grow_per_B, self.budget, self.fixed, self.last_B = grow_per_B, budget, fixed, 0

    def total(self) -> int | None:
        return self.budget

    def current(self) -> int:
        return 2**30

    def reset_peak(self) -> None:
        self.last_B = 0

    def peak(self) -> int:
        return 2**30 + (self.fixed + self.grow_per_B * self.last_B if self.last_B else 0)

    def release(self) -> None:
        pass


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed_steps(s_per_token: dict[int, float], T: int, clock: FakeClock, host: FakeHost, calls: list[int]):
    def step(B: int) -> None:
        calls.append(B)
        clock.now += B * T * s_per_token[B]
        host.last_B = max(host.last_B, B)
    return step


def test_cpu_probe_takes_the_fastest_per_token():
    s_per_token = {1: 4e-4, 2: 2e-4, 4: 1.0e-4, 8: 0.8e-4, 16: 0.9e-4, 32: 1.5e-4}  # fastest: B=8
    clock, host, calls = FakeClock(), FakeHost(grow_per_B=MiB, budget=None), []
    choice = choose_micro_batch(timed_steps(s_per_token, 32, clock, host, calls), list(s_per_token),
                                torch.device("cpu"), total_batch_size=32 * 32, T=32, memory=host, clock=clock,
                                warmup=1, steps=3)
    assert (choice.B, choice.grad_accum_steps) == (8, 4)
    # smallest first: one warm-up step (FIRST_WARMUP more for the first) and 3 timed steps
    assert calls == [1] * (4 + FIRST_WARMUP) + [B for B in list(s_per_token)[1:] for _ in range(4)]
    assert choice.measured["8"] == {"status": "timed", "tok_per_s": 12_500.0, "ms_per_step": 20.48,
                                    "growth_gib": 0.008}
    assert choice.line() == ("B=auto: B=8 (x4 micro-steps): the fastest per token of 1, 2, 4, 8, 16, 32 on cpu "
                             "(12,500 tok/s; memory unknown)")
    assert json.loads(json.dumps(choice.as_dict())) == choice.as_dict()


def test_cpu_probe_leaves_out_candidates_over_the_memory_budget():
    s_per_token = {1: 4e-4, 2: 2e-4, 4: 1.5e-4, 8: 1.2e-4, 16: 1e-4, 32: 0.5e-4}  # 32 would be fastest
    clock, calls = FakeClock(), []
    host = FakeHost(grow_per_B=MiB, budget=20 * MiB)  # B=16 grows 16 MiB; B=32 would grow 32 MiB
    choice = choose_micro_batch(timed_steps(s_per_token, 64, clock, host, calls), list(s_per_token),
                                torch.device("cpu"), total_batch_size=32 * 64, T=64, memory=host, clock=clock)
    assert choice.B == 16 and 32 not in calls  # predicted from B=16's growth, never run
    assert choice.measured["32"] == {"status": "over the memory budget", "predicted_gib": 0.03}
    assert "(10,000 tok/s; 20 MiB budget; over the memory budget: B=32)" in choice.reason


def test_cpu_probe_stops_before_a_candidate_that_would_pass_its_time():
    s_per_token = {1: 1.2e-3, 2: 1.1e-3, 4: 1e-3, 8: 0.5e-3}  # 8 would be fastest
    clock, host, calls = FakeClock(), FakeHost(grow_per_B=MiB, budget=None), []
    choice = choose_micro_batch(timed_steps(s_per_token, 100, clock, host, calls), list(s_per_token),
                                torch.device("cpu"), total_batch_size=800, T=100, memory=host, clock=clock,
                                max_probe_s=4.0)
    # 6 + 4 + 4 steps: 0.72 + 0.88 + 1.6 s; B=8 predicted from B=4's step (0.4 s) at 4 x 0.8 s, past the 4 s
    assert FIRST_WARMUP == 2 and sorted(set(calls)) == [1, 2, 4] and choice.B == 4
    assert choice.measured["8"] == {"status": "over the probe's time", "predicted_s": 3.2}
    assert choice.reason.endswith("; memory unknown; over the probe's time: B=8)")


def test_memory_growth_is_predicted_as_fixed_plus_per_sample():
    GB = 10**9  # 124M: ~1.5 GB of gradients and AdamW state whatever B is, then activations per sample
    runs = [(1, 1.6 * GB, 0.1), (2, 1.7 * GB, 0.2)]
    assert predict_growth(runs, 8) == pytest.approx(2.3 * GB)
    assert predict_growth(runs[:1], 8) == pytest.approx(12.8 * GB)  # one point: proportional, an overestimate
    assert predict_growth(runs, 8, linear=False) == pytest.approx(6.8 * GB)  # peaks that do not reset: proportional


def test_cpu_probe_runs_what_fixed_costs_would_wrongly_exclude():
    s_per_token = {1: 4e-4, 2: 2e-4, 4: 1.5e-4, 8: 1.2e-4, 16: 1e-4}
    clock, calls = FakeClock(), []
    # B=16 grows 30 + 16 = 46 MiB; in proportion to B=8's 38 MiB it would be 76, over the 70 MiB budget
    host = FakeHost(grow_per_B=MiB, budget=70 * MiB, fixed=30 * MiB)
    choice = choose_micro_batch(timed_steps(s_per_token, 64, clock, host, calls), list(s_per_token),
                                torch.device("cpu"), total_batch_size=16 * 64, T=64, memory=host, clock=clock)
    assert choice.B == 16 and choice.measured["16"]["growth_gib"] == round(46 * MiB / 2**30, 3)


def test_oom_hint_is_one_line_naming_b_auto_and_the_step():
    assert oom_hint(64, 1024, 524_288) == (
        "out of GPU memory at B=64, T=1024 (65,536 tokens a micro-batch); use B=auto train.total_batch_size=524288 "
        "to train with the largest micro-batch that fits and the same 524,288 tokens per step, or a smaller B, e.g. "
        "B=32 train.total_batch_size=524288")
    assert "B=auto train.total_batch_size=131072 " in oom_hint(64, 1024, None, world_size=2)


def test_a_real_tiny_gpt_probe_leaves_weights_optimizer_and_rng_bitwise_unchanged():
    torch.manual_seed(0)  # a small vocabulary keeps the 8 probe steps fast; the restore is what is tested
    model = GPT(GPTConfig(block_size=64, vocab_size=1024, n_layer=2, n_head=2, n_embd=24))
    apply_cpu_fast_paths(model)  # as the Trainer does on a CPU: oneDNN, sparse embedding gradient
    optimizer = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), 1e-8, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    step = training_step_fn(model, optimizer, T=32, vocab_size=1024, device=torch.device("cpu"),
                            clip=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    with preserve_state(model, optimizer):
        choice = choose_micro_batch(step, candidates(8 * 32, 32, max_B=8), torch.device("cpu"), total_batch_size=256,
                                    T=32, steps=1)
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the probe trained
    assert isinstance(choice, AutoBatch) and choice.B in (1, 2, 4, 8) and choice.B * choice.grad_accum_steps == 8
    assert {m["status"] for m in choice.measured.values()} == {"timed"}
    assert all(m["tok_per_s"] > 0 and m["growth_gib"] >= 0 for m in choice.measured.values())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert optimizer.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # the restored optimizer trains as a fresh one would: its first step is the same as an untouched model's
    twin = GPT(GPTConfig(block_size=64, vocab_size=1024, n_layer=2, n_head=2, n_embd=24))
    twin.load_state_dict(before)
    apply_cpu_fast_paths(twin)
    twin_optimizer = twin.configure_optimizer(6e-4, 0.1, (0.9, 0.95), 1e-8, "cpu")
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        training_step_fn(m, opt, T=32, vocab_size=1024, device=torch.device("cpu"), seed=7)(2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real CUDA search needs a GPU")
def test_cuda_probe_on_a_real_gpu_backs_off_restores_and_releases():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=50304, n_layer=2, n_head=4, n_embd=128)).to(device)
    optimizer = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), 1e-8, "cuda")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    allocated = torch.cuda.memory_allocated(device)
    step = training_step_fn(model, optimizer, T=1024, vocab_size=50304, device=device,
                            autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    with preserve_state(model, optimizer):
        choice = choose_micro_batch(step, candidates(512 * 1024, 1024), device, total_batch_size=512 * 1024, T=1024)
    # B=512: 512 x 1024 x 50304 logits are ~100 GiB in fp32 alone, beyond any single GPU today
    assert choice.measured["512"] == {"status": "out of memory"} and choice.B < 512
    fits = choice.measured.get(str(choice.B), {})  # a step one size down was not measured itself
    assert fits.get("status") == "fits" and fits["peak_share"] <= 0.9 or "one size down" in choice.reason
    assert choice.B * choice.grad_accum_steps == 512
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())
    assert torch.cuda.memory_allocated(device) - allocated < 64 * MiB  # the probe's memory is given back
    assert torch.cuda.max_memory_allocated(device) == torch.cuda.memory_allocated(device)  # peak stats reset


# bench/gpu_check.sh and bench/gpu.py --check: what a machine without a GPU can check of them

BENCH = Path(__file__).resolve().parent.parent / "bench"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def sh(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_gpu_check_script_parses():
    assert sh("-n", str(BENCH / "gpu_check.sh")).returncode == 0


@no_gpu
def test_gpu_check_without_a_gpu_is_one_error_line_and_exit_code_2():
    result = sh(str(BENCH / "gpu_check.sh"))
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(r"error: no CUDA device: torch \S+ \(CUDA \S+\) sees no GPU; run this on a GPU machine "
                        r"\(--dry-run prints the commands\)\n", result.stderr)


def test_gpu_check_dry_run_prints_the_installs_tests_and_runs_without_running_them():
    result = sh(str(BENCH / "gpu_check.sh"), "--dry-run", "--site", "/tmp/site-x")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"\+ python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-x "
                        r"\S+/\.gpu_wheels/\*\.whl", lines[0])
    assert re.fullmatch(r"\+ python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile "
                        r"--upgrade --target /tmp/site-x \S+", lines[1])
    assert re.fullmatch(r"\+ python3 -P -m pytest .* -k cuda .*tests/test_autobatch.py .*tests/test_data.py ?", lines[2])
    runs = [line for line in lines if "python -m gpt_exp.run" in line]
    assert all("logger.mode=disabled" in line and "device=cuda" in line for line in runs)
    # B=auto runs where the config takes it, else one line says it was skipped
    auto = [line for line in runs if " B=auto " in line] or [line for line in lines if line.startswith("124M B=auto:")]
    assert len(auto) == 1 and ("train.total_batch_size=131072" in auto[0] or "skipped" in auto[0])
    runs = [line for line in runs if " B=auto " not in line]
    assert [re.search(r"model=(\S+)", line).group(1) for line in runs] == \
        ["gpt2"] * 4 + ["modern", "gpt2-medium"] + ["gpt2"] * 2  # nanochat's architecture beside GPT-2's
    assert [re.search(r" B=(\d+) T=1024", line).group(1) for line in runs[1:6]] == ["16", "32", "64", "16", "16"]
    assert "train.ckpt_every=10" in runs[6] and "resume=" in runs[7]


def test_gpu_check_stage_copies_the_wheels_into_a_git_excluded_folder(tmp_path):
    repo, wheels = tmp_path / "repo", tmp_path / "wheels"
    (repo / "bench").mkdir(parents=True)
    wheels.mkdir()
    (wheels / "omegaconf-2.3.1-py3-none-any.whl").write_bytes(b"PK")
    (repo / "bench" / "gpu_check.sh").write_bytes((BENCH / "gpu_check.sh").read_bytes())
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for _ in range(2):  # twice: the exclude line is added once
        result = sh(str(repo / "bench" / "gpu_check.sh"), "--stage", str(wheels))
        assert result.returncode == 0, result.stderr
    assert (repo / ".gpu_wheels" / "omegaconf-2.3.1-py3-none-any.whl").read_bytes() == b"PK"
    assert (repo / ".git" / "info" / "exclude").read_text().count("/.gpu_wheels/\n") == 1
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert status == "?? bench/gpu_check.sh\n"  # the wheels do not show: they cannot be committed by mistake
    missing = sh(str(repo / "bench" / "gpu_check.sh"), "--stage", str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: no wheels in ")


@pytest.mark.slow
def test_gpu_check_figures_on_a_cpu_with_the_tiny_model(tmp_path):
    """bench/gpu.py --check end to end with --device cpu (~1 minute on 2 cores): every line it prints on a GPU,
    the resume across a SIGTERM included."""
    result = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--check", "--device", "cpu", "--main-model", "tiny", "--main-steps",
         "10", "--model", "tiny", "--B", "2", "auto", "--medium-B", "--T", "64", "--steps", "3", "--warmup", "1",
         "--auto-total", "256", "--modern-model", "modern_tiny", "--modern-B", "2", "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"main job on cpu \(tiny, B=4 T=32, 10 steps\): completed, final loss 10\.\d+, median [\d,]+ "
                        r"tok/s, wall [\d.]+ s, peak unknown", lines[0])
    assert re.fullmatch(r"tiny B=2 T=64: [\d,]+ tok/s, MFU unknown \(no peak\), peak unknown \(median of steps 1-2\)",
                        lines[1])
    assert lines[2].startswith("tiny B=auto")
    assert re.fullmatch(r"modern_tiny B=2 T=64: [\d,]+ tok/s, MFU unknown \(no peak\), peak unknown \(median of steps "
                        r"1-2\)", lines[3])  # nanochat's architecture beside GPT-2's
    assert re.fullmatch(r"resume across a restart on cpu: stopped by SIGTERM at step \d \(exit code 143\), resumed to "
                        r"step 9: max \|loss - straight run's\| = 0 over \d steps after the restart: bitwise equal",
                        lines[4])
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
