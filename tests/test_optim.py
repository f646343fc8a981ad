"""gpt_exp/optim.py: optim=adamw is GPT.configure_optimizer's AdamW bit for bit; optim=muon puts the blocks' matrices
in Muon (torch.optim.Muon's step, per row block of c_attn) and the rest in AdamW, learns, resumes bitwise from its
state_dict, and is refused under FSDP."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from gpt_exp.cli import user_error_line
from gpt_exp.config import MUON_FSDP_ERROR, MuonAdjustLR, OptimConfig, OptimizerName
from gpt_exp.errors import ConfigError
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.optim import BlockwiseMuon, MuonAdamW, build_optimizer, describe_optimizer, muon_parameters, row_blocks
from gpt_exp.trainer import LRSchedule, clip_gradients
from tests.helpers import compose_config, make_trainer

TINY = GPTConfig(block_size=32, vocab_size=96, n_layer=3, n_head=2, n_embd=24)
MUON = OptimConfig(name=OptimizerName.muon, lr=3e-3, muon_lr=1e-2, warmup_steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices this small run in microseconds on one thread; two threads on a shared machine wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def fixed_batch(B: int = 4, T: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(TINY.vocab_size, (B, T + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def train(model: GPT, optimizer, steps: range, schedule: LRSchedule, batch=None) -> list[float]:
    """The Trainer's step: zero_grad, forward, backward, clip, the scheduled lr times each group's lr_scale, step."""
    losses = []
    for step in steps:
        x, y = batch or fixed_batch(seed=step)
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        clip_gradients(model, 1.0, on_cpu=True)
        for group in optimizer.param_groups:
            group["lr"] = schedule(step) * group.get("lr_scale", 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def names(model: GPT, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


@pytest.mark.parametrize("sharded", [False, True])  # True: configure_optimizer's foreach path (fused=False)
def test_adamw_is_configure_optimizer_bit_for_bit(sharded):
    a, b = tiny_model(), tiny_model()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, betas=[0.8, 0.9], eps=1e-7)
    ours = build_optimizer(a, cfg, "cpu", sharded=sharded)
    theirs = b.configure_optimizer(1e-3, 0.05, (0.8, 0.9), 1e-7, "cpu", fused=not sharded)
    assert type(ours) is torch.optim.AdamW and len(ours.param_groups) == len(theirs.param_groups) == 2
    for g_ours, g_theirs in zip(ours.param_groups, theirs.param_groups):
        settings = [{k: v for k, v in g.items() if k != "params"} for g in (g_ours, g_theirs)]
        assert settings[0] == settings[1]
        assert names(a, g_ours["params"]) == names(b, g_theirs["params"])
    assert ours.param_groups[0]["fused"] is (not sharded)
    x, y = fixed_batch()
    for model, optimizer in ((a, ours), (b, theirs)):
        for _ in range(2):
            optimizer.zero_grad()
            model(x, y)[1].backward()
            optimizer.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert str(ours.state_dict()) == str(theirs.state_dict())


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    matrices, others = muon_parameters(model)
    kinds = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert names(model, matrices) == [f"transformer.h.{i}.{k}" for i in range(TINY.n_layer) for k in kinds]
    assert len(matrices) == 4 * TINY.n_layer == 12
    optimizer = build_optimizer(model, MUON, "cpu", sharded=False)
    assert isinstance(optimizer, MuonAdamW)
    muon_group, decay, no_decay = optimizer.param_groups
    assert [p for p in muon_group["params"]] == matrices
    assert names(model, decay["params"]) == ["transformer.wte.weight", "transformer.wpe.weight"]  # wte is lm_head
    # per block: ln_1, ln_2 (gain, bias) and 4 linear biases; then ln_f
    assert len(no_decay["params"]) == 8 * TINY.n_layer + 2 and all(p.dim() == 1 for p in no_decay["params"])
    every = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters()) and len(set(every)) == len(every)
    assert muon_group["momentum"] == 0.95 and muon_group["nesterov"] is True
    assert muon_group["adjust_lr_fn"] == "match_rms_adamw"
    assert (muon_group["lr"], muon_group["weight_decay"]) == (1e-2, 0.1)
    assert muon_group["lr_scale"] == pytest.approx(1e-2 / 3e-3)
    assert (decay["lr"], decay["lr_scale"], decay["weight_decay"], no_decay["weight_decay"]) == (3e-3, 1.0, 0.1, 0.0)
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8
    assert not any(g.get("fused") for g in optimizer.param_groups)  # so the Trainer checks non-finite steps on the host


def test_optim_lr_is_only_the_adamw_parts_and_muon_lr_the_matrices():
    """optim.lr once set Muon's matrices too when optim.muon_lr was null: an arm at lr 1e-2 trained the embeddings,
    gains and biases at 10x AdamW's best. Each part now takes its own lr, whatever the other's."""
    cfg = OptimConfig(name=OptimizerName.muon, lr=2e-3, muon_momentum=0.9, muon_nesterov=False,
                      muon_adjust_lr=MuonAdjustLR.original)
    muon_group, decay, no_decay = build_optimizer(tiny_model(), cfg, "cpu", sharded=False).param_groups
    assert (muon_group["lr"], muon_group["lr_scale"]) == (1e-2, pytest.approx(5.0))  # the default muon_lr, 0.01
    assert (decay["lr"], no_decay["lr"], decay["lr_scale"], no_decay["lr_scale"]) == (2e-3, 2e-3, 1.0, 1.0)
    assert (muon_group["momentum"], muon_group["nesterov"], muon_group["adjust_lr_fn"]) == (0.9, False, "original")
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, "cpu", sharded=False)
    schedule = LRSchedule(cfg.lr, 2, 5)
    train(model, optimizer, range(1), schedule)  # step 0 of the warmup: both parts at the same fraction of their peak
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * schedule(0) / 2e-3)
    assert [g["lr"] for g in optimizer.param_groups[1:]] == [schedule(0)] * 2


def test_startup_line_shows_both_muon_lrs():
    assert describe_optimizer(OptimConfig(name=OptimizerName.muon, lr=1e-3, muon_lr=2e-2)) == (
        "optim muon: matrices peak lr 0.02, AdamW part (embeddings, gains, biases) peak lr 0.001")
    assert describe_optimizer(OptimConfig(lr=6e-4)) == "optim adamw: peak lr 0.0006"


def muon_pair(ours: list, theirs: list, rule: str, nesterov: bool = True, blocks: dict | None = None):
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=rule)
    return BlockwiseMuon(ours, blocks or {}, **settings), torch.optim.Muon(theirs, **settings)


@pytest.mark.parametrize("rule", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_on_unfused_matrices_the_step_is_torch_muons(rule, nesterov):
    torch.manual_seed(0)
    shapes = [(48, 24), (24, 96), (24, 24)]  # tall, wide (transposed for Newton-Schulz), square
    ours = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a, b = muon_pair(ours, theirs, rule, nesterov)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            assert torch.allclose(p, q, rtol=0, atol=1e-7)  # measured: bitwise, the same ops in the same order
    for p, q in zip(ours, theirs):
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])


@pytest.mark.parametrize("rule", ["match_rms_adamw", "original"])
def test_each_row_block_of_a_fused_matrix_steps_as_that_block_alone(rule):
    """c_attn (3C x C) stacks q, k, v: each block must move as an unfused C x C matrix of its own would, even when
    one block's gradient dwarfs the others' (early in training v's does)."""
    torch.manual_seed(0)
    C = 24
    fused = torch.nn.Parameter(torch.randn(3 * C, C) * 0.02)
    alone = [torch.nn.Parameter(block.detach().clone()) for block in fused.chunk(3)]
    a, b = muon_pair([fused], alone, rule, blocks={fused: 3})
    whole = torch.nn.Parameter(fused.detach().clone())
    start = fused.detach().clone()
    c = torch.optim.Muon([whole], lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn=rule)  # the fused step
    for _ in range(3):
        grads = [torch.randn(C, C) * scale for scale in (0.01, 0.1, 1.0)]
        fused.grad, whole.grad = torch.cat(grads), torch.cat(grads)
        for p, g in zip(alone, grads):
            p.grad = g.clone()
        a.step()
        b.step()
        c.step()
        for block, p in zip(fused.chunk(3), alone):
            assert torch.allclose(block, p, rtol=0, atol=1e-7)
    moved = [(block - s).pow(2).mean().sqrt().item() for block, s in zip(fused.detach().chunk(3), start.chunk(3))]
    moved_whole = [(block - s).pow(2).mean().sqrt().item() for block, s in zip(whole.detach().chunk(3), start.chunk(3))]
    assert min(moved) / max(moved) > 0.8  # every block moves alike
    assert moved_whole[0] / moved_whole[2] < 0.2  # orthogonalized whole, the small-gradient block barely moves


def test_c_attn_is_tagged_with_its_three_blocks_and_nothing_else_is():
    model = tiny_model()
    tagged = row_blocks(model)
    assert names(model, tagged) == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(TINY.n_layer)]
    assert set(tagged.values()) == {3}
    held = build_optimizer(model, MUON, "cpu", sharded=False).muon.row_blocks  # what the step splits
    assert [id(p) for p in held] == [id(p) for p in tagged] and list(held.values()) == [3] * TINY.n_layer


def test_q_k_and_v_get_updates_of_the_same_rms_at_step_10():
    """The tiny model after 9 steps, then the 10th: each of c_attn's q, k, v blocks moves by ~0.2 * lr in RMS (as
    match_rms_adamw promises a whole matrix). Orthogonalized as one 3C x C matrix (torch.optim.Muon), q and k moved
    0.015-0.025 * lr and v 0.31 * lr."""
    model = tiny_model()
    cfg = dataclasses.replace(MUON, weight_decay=0.0)
    optimizer = build_optimizer(model, cfg, "cpu", sharded=False)
    schedule = LRSchedule(cfg.lr, cfg.warmup_steps, 20)
    train(model, optimizer, range(9), schedule)
    before = [block.attn.c_attn.weight.detach().clone() for block in model.transformer.h]
    train(model, optimizer, range(9, 10), schedule)
    lr = optimizer.param_groups[0]["lr"]
    for block, w in zip(model.transformer.h, before):
        rms = [(d / lr).pow(2).mean().sqrt().item() for d in (block.attn.c_attn.weight.detach() - w).chunk(3)]
        assert all(0.15 < r < 0.21 for r in rms), rms


def test_a_torch_muon_state_dict_loads_and_its_momentum_carries_on():
    """A checkpoint written with torch.optim.Muon (before the per-block step) resumes: same state_dict layout."""
    model = tiny_model()
    matrices, _ = muon_parameters(model)
    theirs = torch.optim.Muon([{"params": matrices, "lr_scale": 1.0}], lr=1e-2, adjust_lr_fn="match_rms_adamw")
    for p in matrices:
        p.grad = torch.randn(p.shape)
    theirs.step()
    ours = build_optimizer(model, MUON, "cpu", sharded=False)
    state = ours.state_dict()
    state["muon"] = theirs.state_dict()
    ours.load_state_dict(state)
    assert all(torch.equal(ours.muon.state[p]["momentum_buffer"], theirs.state[p]["momentum_buffer"]) for p in matrices)
    assert ours.param_groups[0]["lr_scale"] == pytest.approx(1e-2 / 3e-3)  # this run's, not the saved 1.0


def test_muon_lowers_the_loss_on_a_fixed_batch():
    model = tiny_model()
    optimizer = build_optimizer(model, MUON, "cpu", sharded=False)
    before = [p.detach().clone() for p in model.parameters()]
    losses = train(model, optimizer, range(15), LRSchedule(MUON.lr, 2, 15), batch=fixed_batch())
    assert losses[0] == pytest.approx(4.56, abs=0.05)  # ln(96): a fresh model's uniform guess
    assert losses[-1] < losses[0] - 0.5 and losses == sorted(losses, reverse=True), losses
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # every group stepped


def test_state_dict_round_trip_is_bitwise():
    """3 steps, a checkpoint through torch.save, 3 more in a fresh model and optimizer = 6 straight steps."""
    schedule = LRSchedule(MUON.lr, MUON.warmup_steps, 6)
    straight = tiny_model()
    straight_losses = train(straight, build_optimizer(straight, MUON, "cpu", sharded=False), range(6), schedule)

    first = tiny_model()
    optimizer = build_optimizer(first, MUON, "cpu", sharded=False)
    losses = train(first, optimizer, range(3), schedule)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["optimizer"]) == {"muon", "adamw"} and len(saved["optimizer"]["muon"]["state"]) == 12

    resumed = tiny_model(seed=5)  # other weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    optimizer = build_optimizer(resumed, MUON, "cpu", sharded=False)
    optimizer.load_state_dict(saved["optimizer"])
    losses += train(resumed, optimizer, range(3, 6), schedule)
    assert losses == straight_losses
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_resume_takes_this_runs_muon_lr_and_refuses_adamw_state():
    model = tiny_model()
    optimizer = build_optimizer(model, MUON, "cpu", sharded=False)
    train(model, optimizer, range(1), LRSchedule(MUON.lr, 2, 5))
    other = build_optimizer(model, dataclasses.replace(MUON, muon_lr=3e-2), "cpu", sharded=False)
    other.load_state_dict(optimizer.state_dict())
    assert other.param_groups[0]["lr_scale"] == pytest.approx(10.0)
    adamw_state = build_optimizer(model, OptimConfig(), "cpu", sharded=False).state_dict()
    with pytest.raises(ConfigError, match="the checkpoint's optimizer is optim=adamw's; resume it with optim=adamw"):
        other.load_state_dict(adamw_state)


def test_muon_is_refused_under_fsdp():
    with pytest.raises(ConfigError) as e:
        build_optimizer(tiny_model(), MUON, "cuda", sharded=True)
    assert str(e.value) == MUON_FSDP_ERROR
    with pytest.raises(ConfigError) as e:
        compose_config("optim=muon", "train.strategy=fsdp")
    assert user_error_line(e.value) == (
        "optim=muon is not supported with train.strategy=fsdp; use train.strategy=ddp or optim=adamw")
    assert compose_config("optim=adamw", "train.strategy=fsdp").optim.name == OptimizerName.adamw


def test_config_group_and_defaults():
    assert compose_config().optim.name == OptimizerName.adamw
    o = compose_config("optim=muon", "optim.muon_lr=0.02", "optim.muon_adjust_lr=original").optim
    assert (o.name, o.lr, o.muon_lr, o.muon_momentum, o.muon_nesterov, o.muon_adjust_lr) == \
        (OptimizerName.muon, 6e-4, 0.02, 0.95, True, MuonAdjustLR.original)
    o = compose_config("optim=muon").optim
    assert (o.lr, o.muon_lr, o.muon_adjust_lr) == (6e-4, 0.01, MuonAdjustLR.match_rms_adamw)
    assert compose_config("optim=adamw", "optim.muon_lr=null").optim.muon_lr is None  # read, as an old run's config


@pytest.mark.parametrize("overrides, line", [
    (["optim=muon", "optim.muon_momentum=1"], "optim.muon_momentum=1.0 is invalid: it must be in [0, 1), e.g. 0.95"),
    (["optim=muon", "optim.muon_momentum=-0.1"], "optim.muon_momentum=-0.1 is invalid: it must be in [0, 1)"),
    (["optim=muon", "optim.muon_momentum=nan"], "optim.muon_momentum=nan is invalid: it must be in [0, 1)"),
    (["optim=muon", "optim.muon_lr=0"], "optim.muon_lr=0.0 is invalid: it must be > 0, e.g. 0.01"),
    (["optim=muon", "optim.muon_lr=-1e-3"], "optim.muon_lr=-0.001 is invalid: it must be > 0, e.g. 0.01"),
    (["optim=muon", "optim.muon_lr=inf"], "optim.muon_lr=inf is invalid: it must be > 0, e.g. 0.01"),
    (["optim=muon", "optim.muon_lr=null"], "optim.muon_lr=null is invalid: give the matrices' own peak lr, e.g. "
                                           "optim.muon_lr=0.01 (optim.lr is the AdamW part's: embeddings, gains, biases)"),
    (["optim=sgd"], "unknown option optim=sgd; choose one of: adamw, muon"),
    (["optim.name=sgd"], "optim.name=sgd: Invalid value 'sgd', expected one of [adamw, muon]"),
    (["optim=muon", "optim.muon_adjust_lr=keller"], "expected one of [match_rms_adamw, original]"),
])
def test_bad_optim_config_is_one_line(overrides, line):
    with pytest.raises(Exception) as e:
        compose_config(*overrides)
    assert line in user_error_line(e.value)
    assert "\n" not in user_error_line(e.value)


MUON_RUN = ("optim=muon", "optim.lr=3e-3", "optim.muon_lr=0.02", "train.max_steps=6", "train.total_batch_size=256",
            "device.threads=1")  # B=4, T=32: 2 micro-steps of gradient accumulation per step


def test_trainer_resumes_muon_bitwise_with_its_own_lr(cache_dir):
    """Through the Trainer: gradient accumulation, clipping, the schedule times lr_scale, a checkpoint's dict."""
    straight = make_trainer(cache_dir, *MUON_RUN)
    assert isinstance(straight.optimizer, MuonAdamW)
    losses = [straight.train_step().loss for _ in range(6)]
    muon_group, decay, _ = straight.optimizer.param_groups
    assert muon_group["lr"] == pytest.approx(straight.schedule(5) * 0.02 / 3e-3)
    assert decay["lr"] == straight.schedule(5)

    first = make_trainer(cache_dir, *MUON_RUN)
    resumed_losses = [first.train_step().loss for _ in range(3)]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_trainer(cache_dir, *MUON_RUN)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed_losses += [resumed.train_step().loss for _ in range(3)]
    assert resumed_losses == losses
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_trainer_builds_adamw_as_before(cache_dir):
    optimizer = make_trainer(cache_dir, "device.threads=1").optimizer
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["fused"] is True


def test_a_muon_checkpoint_does_not_resume_as_adamw_and_mup_with_muon_is_refused(tmp_path, cache_dir):
    from tests.helpers import run_cli

    common = ["model=tiny", "logger.mode=disabled", f"data.cache_dir={cache_dir}"]
    assert run_cli("run", *common, "optim=muon", "train.max_steps=2", "train.ckpt_every=2",
                   f"hydra.run.dir={tmp_path / 'm'}", cwd=tmp_path).returncode == 0
    result = run_cli("run", f"resume={tmp_path / 'm'}", "optim=adamw", "logger.mode=disabled", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: resume: the checkpoint was trained with optim=muon; resume with it, or start a new run from its "
        "weights with init_from=")
    both = run_cli("run", *common, "optim=muon", "model.parametrization=mup", cwd=tmp_path)
    assert both.returncode == 2 and both.stderr.startswith("error: model.parametrization=mup is invalid: muP's")
