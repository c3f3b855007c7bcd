"""parlm.train.optim against SPEC 3.3-3.4: MuonEq-R vs a float64 transcription, the sharded path on
2 gloo processes, the parameter partition, the schedules."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

import parlm.train.optim as optim_module
from parlm.config import Config
from parlm.model.gpt import GPT
from parlm.train.optim import Muon, Optimizers, lr_multiplier, muon_momentum, zeropower_via_newtonschulz5

SHAPES = [(16, 8), (8, 16), (8, 8), (16, 8), (4, 8), (8, 16)]  # tall, wide, square; repeated shapes batch


def newton_schulz_float64(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double() / (G.double().norm() + 1e-7)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


def slow_muon(params, grads_per_step, lr, momentum, weight_decay, orthogonalize=newton_schulz_float64):
    """SPEC 3.3 step by step in float64 for a list of matrices; returns (params, buffers)."""
    params = [p.double().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            buffers[i] = momentum * buffers[i] + g
            d = g + momentum * buffers[i]
            d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-7)
            update = orthogonalize(d) * math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            params[i] = p * (1 - lr * weight_decay) - lr * update
    return params, buffers


def make_problem(seed: int = 0, steps: int = 2):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator) for s in SHAPES]
    grads = [[torch.randn(s, generator=generator) * 0.1 for s in SHAPES] for _ in range(steps)]
    return params, grads


def run_muon(params, grads_per_step, lr=0.05, momentum=0.9, weight_decay=0.1):
    tensors = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = Muon(tensors, lr=lr, momentum=momentum, backend_steps=5, weight_decay=weight_decay,
                     row_normalize=True)
    for grads in grads_per_step:
        for t, g in zip(tensors, grads):
            t.grad = g.clone()
        optimizer.step()
    return tensors, optimizer


# ----------------------------------------------------------------------------------------
def test_newton_schulz_bf16_tracks_float64():
    generator = torch.Generator().manual_seed(1)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        G = torch.randn(shape, generator=generator)
        fast, slow = zeropower_via_newtonschulz5(G), newton_schulz_float64(G)
        assert fast.dtype == torch.bfloat16 and fast.shape == G.shape
        # bf16 rounding through 5 iterations costs ~3-4% (relative Frobenius); a wrong
        # coefficient or step count costs > 30%.
        assert ((fast.double() - slow).norm() / slow.norm()).item() < 0.06, shape
        # NS5 pushes every singular value into a band around 1 (it does not converge exactly).
        singular = torch.linalg.svdvals(slow)
        assert singular.min() > 0.5 and singular.max() < 1.3


def test_batched_newton_schulz_equals_per_matrix():
    G = torch.randn(5, 24, 16, generator=torch.Generator().manual_seed(2))
    batched = zeropower_via_newtonschulz5(G)
    for i in range(5):
        single = zeropower_via_newtonschulz5(G[i])
        assert torch.allclose(batched[i].float(), single.float(), atol=1e-2, rtol=0)


def test_muon_step_matches_float64_transcription():
    params, grads = make_problem()
    tensors, _ = run_muon(params, grads)
    expected, _ = slow_muon(params, grads, lr=0.05, momentum=0.9, weight_decay=0.1)
    for t, want, p in zip(tensors, expected, params):
        step = t.detach().double() - p.double()
        step_expected = want - p.double()
        assert (step - step_expected).norm() / step_expected.norm() < 0.06  # bf16 NS, see above


def test_muon_pre_newton_schulz_pieces_exactly(monkeypatch):
    """With NS replaced by a bf16 cast, momentum, Nesterov, row norm, shape scale, weight
    decay and the bf16 update buffer are checked to bf16 rounding; buffers exactly."""
    monkeypatch.setattr(optim_module, "zeropower_via_newtonschulz5", lambda G, steps: G.bfloat16())
    params, grads = make_problem(seed=3)
    tensors, optimizer = run_muon(params, grads)
    expected, expected_buffers = slow_muon(params, grads, 0.05, 0.9, 0.1, orthogonalize=lambda d: d)
    for t, want, p, g0, g1 in zip(tensors, expected, params, grads[0], grads[1]):
        buffer = optimizer.state[t]["momentum_buffer"]
        assert torch.equal(buffer, (g0 * 0.9) + g1)  # fp32: mu*(0*mu + g0) + g1
        # The update of each step is bf16-rounded: |error| <= lr * scale * |d| * 2^-8 per step.
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        assert torch.allclose(t.detach().double(), want, atol=2 * 0.05 * scale * 2 ** -8, rtol=0)
    assert not any(torch.equal(t.detach(), p) for t, p in zip(tensors, params))


def _sharded_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (as DataLoader workers)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        params, grads = make_problem(seed=4)
        tensors, _ = run_muon(params, grads)
        torch.save([t.detach() for t in tensors], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_muon_on_two_gloo_processes_equals_one_process():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the children inherit the imported torch instead of importing it again (seconds).
        mp.start_processes(_sharded_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="fork")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    params, grads = make_problem(seed=4)
    single, _ = run_muon(params, grads)
    for a, b, s in zip(results[0], results[1], single):
        assert torch.equal(a, b)  # every rank applies every update
        assert torch.allclose(a, s.detach(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------
def test_parameter_partition_of_the_default_model():
    with torch.device("meta"):
        model = GPT(Config())
    optimizers = Optimizers(Config(), model)
    tok, muon, scalar = (opt.param_groups for opt in optimizers)
    assert len(tok[0]["params"]) == 1 and tok[0]["params"][0] is model.tok_emb.weight
    assert len(muon[0]["params"]) == 66
    assert all(p.ndim == 2 and p.shape[1] in (512, 2048) for p in muon[0]["params"])
    assert len(scalar[0]["params"]) == 46
    assert scalar[0]["params"][-2] is model.skip_weights and scalar[0]["params"][-1] is model.skip_gates
    assert (tok[0]["base_lr"], muon[0]["base_lr"], scalar[0]["base_lr"]) == (0.03, 0.022, 0.02)
    assert (tok[0]["weight_decay"], muon[0]["weight_decay"], scalar[0]["weight_decay"]) == (0.085, 0.095, 0.02)
    assert tok[0]["betas"] == (0.9, 0.95) and scalar[0]["eps"] == 1e-8
    assert muon[0]["row_normalize"] and muon[0]["nesterov"] and muon[0]["backend_steps"] == 5
    counted = {id(p) for group in (tok, muon, scalar) for p in group[0]["params"]}
    assert counted == {id(p) for p in model.parameters()}


def test_optimizers_train_a_tiny_model(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    optimizers = Optimizers(tiny_config, model)
    ids = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(6):
        optimizers.set_schedule(lr_multiplier(tiny_config, step / 6), muon_momentum(tiny_config, step))
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizers.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad is None for p in model.parameters())
    assert optimizers.muon.param_groups[0]["momentum"] == pytest.approx(0.92 + 5 / 10 * 0.07)


def test_muon_momentum_warmup():
    config = Config()
    assert muon_momentum(config, 0) == pytest.approx(0.92)
    assert muon_momentum(config, 750) == pytest.approx(0.955)
    assert muon_momentum(config, 1500) == pytest.approx(0.99)
    assert muon_momentum(config, 4000) == pytest.approx(0.99)
    assert muon_momentum(config.replace(muon_momentum_warmup_steps=0), 0) == pytest.approx(0.99)


def test_lr_multiplier_is_the_wallclock_warmdown():
    config = Config()  # warmdown_frac 0.72, min_lr 0
    assert lr_multiplier(config, 0.0) == 1.0
    assert lr_multiplier(config, 0.27) == 1.0
    assert lr_multiplier(config, 0.28) == pytest.approx(1.0)
    assert lr_multiplier(config, 0.64) == pytest.approx(0.5)
    assert lr_multiplier(config, 1.0) == 0.0
    assert lr_multiplier(config.replace(min_lr=0.1), 0.99) == pytest.approx(0.1)
    assert lr_multiplier(config.replace(warmdown_frac=0.0), 0.99) == 1.0
