"""parlm.train on CPU: schedule values, EMA, warmup reset, end-to-end runs, stops and failures.

Expected values come from hand computation (SPEC 3.4-3.6) or from an independent rerun, never
from the code under test. Training runs use tiny models on synthetic shards."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from parlm import runlog
from parlm.config import Config, ConfigError
from parlm.data.shards import write_shard
from parlm.train.optim import lr_multiplier, muon_momentum
from parlm.train.loop import main, train_run, training_fraction
from parlm.train.state import (ExponentialMovingAverage, StepTimer, TrainingDiverged,
                               TrainingSnapshot, steady_state_rate)


pytestmark = pytest.mark.usefixtures("single_thread")


def synthetic_config(base: Config, root, stream: np.ndarray, val: np.ndarray, name: str, **overrides) -> Config:
    """`base` pointed at two train shards holding `stream` and one val shard holding `val`."""
    folder = root / "datasets" / name
    for index in range(2):
        write_shard(folder / f"fineweb_train_{index:06d}.bin", stream)
    write_shard(folder / "fineweb_val_000000.bin", val)
    return base.replace(data_dir=str(root), dataset_name=name, **overrides)


@pytest.fixture(scope="module")
def pattern_config(tiny_dataset_config, tmp_path_factory) -> Config:
    """A period-97 random token pattern, repeated: a tiny model can learn it in a few steps."""
    pattern = np.random.default_rng(0).integers(4, 1024, size=97)
    return synthetic_config(tiny_dataset_config, tmp_path_factory.mktemp("pattern"),
                            np.tile(pattern, 200), np.tile(pattern, 45), "pattern",
                            ema_decay=0.9, warmup_steps=1, val_max_tokens=2048)


def train_losses(run_dir) -> list[float]:
    return [row["train_loss"] for row in runlog.read_metrics(run_dir, "train")]


# ---- schedule ------------------------------------------------------------------------------

def test_lr_multiplier_hand_values():
    config = Config()  # warmdown_frac 0.72, min_lr 0
    assert lr_multiplier(config, 0.0) == 1.0
    assert lr_multiplier(config, 0.2799) == 1.0
    assert lr_multiplier(config, 0.28) == pytest.approx(1.0)
    assert lr_multiplier(config, 0.64) == pytest.approx(0.5)  # (1 - 0.64) / 0.72
    assert lr_multiplier(config, 0.82) == pytest.approx(0.25)
    assert lr_multiplier(config, 1.0) == 0.0
    assert lr_multiplier(config, 1.3) == 0.0  # clamped at min_lr
    floor = config.replace(min_lr=0.1)
    assert lr_multiplier(floor, 0.9) == pytest.approx(0.1 / 0.72)
    assert lr_multiplier(floor, 0.95) == pytest.approx(0.1)
    assert lr_multiplier(config.replace(warmdown_frac=0.0), 0.99) == 1.0


def test_muon_momentum_warmup_hand_values():
    config = Config()  # 0.92 -> 0.99 over 1500 steps
    assert muon_momentum(config, 0) == pytest.approx(0.92)
    assert muon_momentum(config, 750) == pytest.approx(0.955)
    assert muon_momentum(config, 300) == pytest.approx(0.92 * 0.8 + 0.99 * 0.2)
    assert muon_momentum(config, 1500) == pytest.approx(0.99)
    assert muon_momentum(config, 9000) == pytest.approx(0.99)
    assert muon_momentum(config.replace(muon_momentum_warmup_steps=0), 0) == pytest.approx(0.99)


def test_training_fraction_uses_wallclock_minus_gptq_reserve():
    config = Config().replace(max_wallclock_seconds=100, gptq_reserve_seconds=10)  # 90 s budget
    assert training_fraction(config, 3, 45_000) == pytest.approx(0.5)
    assert training_fraction(Config(), 0, 588_000) == pytest.approx(1.0)  # SPEC 3.4
    no_budget = config.replace(max_wallclock_seconds=0, iterations=20)
    assert training_fraction(no_budget, 5, 1e9) == pytest.approx(0.25)


def test_steady_state_rate_skips_phase_starts():
    durations = [(500.0, False)] + [(100.0, False)] * 4 + [(900.0, True)] + [(200.0, True)] * 3
    rate, used = steady_state_rate(durations, False, tokens_per_step=1000, skip=1)
    assert used == 4 and rate == pytest.approx(4000 / 0.4)
    rate, used = steady_state_rate(durations, True, tokens_per_step=1000, skip=1)
    assert used == 3 and rate == pytest.approx(3000 / 0.6)
    assert steady_state_rate([(100.0, False)], True, 1000) == (None, 0)


def test_step_timer_excludes_time_between_steps_and_resume():
    import time

    timer = StepTimer(torch.device("cpu"))
    timer.resume()
    time.sleep(0.01)
    timer.step_done(False)
    time.sleep(0.2)  # e.g. validation
    timer.resume()
    timer.step_done(True)
    (first, loop_a), (second, loop_b) = timer.durations_ms()
    assert 5 < first < 150 and second < 50 and (loop_a, loop_b) == (False, True)


# ---- EMA and snapshot -----------------------------------------------------------------------

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4))
        self.e = torch.nn.Parameter(torch.randn(5).bfloat16())
        self.register_buffer("b", torch.randn(2))


def test_ema_equals_hand_recursion_and_freezes_on_non_finite():
    torch.manual_seed(0)
    model, decay = Toy(), 0.9
    ema = ExponentialMovingAverage(model, decay)
    expected = {n: t.double().clone() for n, t in model.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.copy_(torch.randn_like(tensor.float()))
        ema.update(step)
        for name, tensor in model.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * tensor.double()
    averaged = ema.state_dict()
    for name, tensor in model.state_dict().items():
        assert averaged[name].dtype == tensor.dtype
        flat = ema.views[ema.float_names.index(name)]
        assert torch.allclose(flat.double().view_as(expected[name]), expected[name], atol=1e-6)
    assert ema.is_healthy() and int(ema.first_bad_step) == -1

    frozen = ema.flat.clone()
    with torch.no_grad():
        model.w[0, 0] = float("nan")
    ema.update(6)
    with torch.no_grad():
        model.w[0, 0] = 1.0  # finite again: the guard is sticky
    ema.update(7, grad_norm=torch.tensor(1.0))
    assert torch.equal(ema.flat, frozen)
    assert not ema.is_healthy() and int(ema.first_bad_step) == 6
    fresh = ExponentialMovingAverage(Toy(), decay)
    fresh.update(1, grad_norm=torch.tensor(float("inf")))
    assert not fresh.is_healthy() and int(fresh.first_bad_step) == 1


def test_snapshot_restores_weights_and_optimizer_state_exactly(tiny_config):
    from parlm.model.gpt import build_model
    from parlm.train.optim import Optimizers

    torch.manual_seed(0)
    model = build_model(tiny_config, "cpu")
    optimizers = Optimizers(tiny_config, model)
    x = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.train_seq_len))

    def step(scale):
        optimizers.set_schedule(scale, 0.95)
        model(x, x).backward()
        optimizers.step()

    step(1.0)
    step(1.0)  # optimizer states are non-empty now
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    states = [json.dumps({k: str(v) for k, v in opt.state_dict()["param_groups"][0].items()}) for opt in optimizers]
    buffers = [{k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)} for k, s in opt.state_dict()["state"].items()}
               for opt in optimizers]
    snapshot = TrainingSnapshot.capture(model, optimizers)
    model.looping_active = True
    for _ in range(3):
        step(0.3)
    snapshot.restore(model, optimizers)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    for opt, groups, saved in zip(optimizers, states, buffers):
        state = opt.state_dict()
        assert json.dumps({k: str(v) for k, v in state["param_groups"][0].items()}) == groups
        for key, entries in saved.items():
            for name, value in entries.items():
                assert torch.equal(state["state"][key][name], value)
        assert all(p.grad is None for group in opt.param_groups for p in group["params"])


# ---- end-to-end runs ----------------------------------------------------------------------------

def test_warmup_and_reset_match_a_run_without_warmup(pattern_config, tmp_path):
    config = pattern_config.replace(iterations=3, val_loss_every=0)
    train_run(config.replace(warmup_steps=3), tmp_path / "with_warmup")
    train_run(config.replace(warmup_steps=0), tmp_path / "without")
    with_warmup, without = train_losses(tmp_path / "with_warmup"), train_losses(tmp_path / "without")
    assert len(with_warmup) == 3 and with_warmup == without  # same first batch, same weights
    a = torch.load(tmp_path / "with_warmup" / "final_model.pt")
    b = torch.load(tmp_path / "without" / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "loop_warmup_step: 3/3" in (tmp_path / "with_warmup" / "train.log").read_text()


def test_training_end_to_end_writes_outputs_and_learns(pattern_config, tmp_path):
    from parlm.model.gpt import build_model

    run_dir = tmp_path / "run"
    config = pattern_config.replace(iterations=25, val_loss_every=10, train_log_every=5)
    result = train_run(config, run_dir)
    for name in ("config.yaml", "train.log", "metrics.jsonl", "final_model.pt", "train.json"):
        assert (run_dir / name).exists(), name
    summary = runlog.read_json(run_dir / "train.json")
    assert summary == json.loads(json.dumps(result, default=float))
    for key in ("steps", "train_seconds", "live_val_bpb", "prequant_bpb", "prequant_seconds",
                "peak_memory_mib", "tok_per_sec_before_loop", "tok_per_sec_after_loop", "looping_step",
                "world_size", "device", "attention_backend"):
        assert key in summary, key
    assert summary["steps"] == 25 and summary["world_size"] == 1 and not summary["diverged"]
    # No wallclock budget: frac = step / 25 first reaches 0.35 at step 9 (8/25 = 0.32).
    assert summary["looping_step"] == 9
    train = runlog.read_metrics(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 10, 15, 20, 25]
    assert all({"train_loss", "lr_scale", "tok_per_sec", "tok_per_sec_interval", "looping", "memory_mib"} <= set(r)
               for r in train)
    assert [r["looping"] for r in train] == [False] * 5 + [True] * 4
    # lr multiplier at the step's frac = (step - 1) / 25: (1 - 0.96) / 0.72 at the last step.
    assert train[-1]["lr_scale"] == pytest.approx(0.04 / 0.72)
    assert [r["step"] for r in runlog.read_metrics(run_dir, "val")] == [0, 10, 20, 25]
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 3.0  # ~6.9 -> well under 3.9
    assert summary["live_val_bpb"] < runlog.read_metrics(run_dir, "val")[0]["val_bpb"] / 2
    log = (run_dir / "train.log").read_text()
    for line in ("torch:", "attention_backend:math", "layer_loop:enabled step:9", "25/25 train_loss:",
                 "pre-quantization post-ema val_loss:", "ema:applying EMA weights"):
        assert line in log, line
    model = build_model(config, "cpu")
    model.load_state_dict(torch.load(run_dir / "final_model.pt"), strict=True)


def test_wallclock_budget_stops_training(pattern_config, tmp_path):
    config = pattern_config.replace(max_wallclock_seconds=1.6, gptq_reserve_seconds=1.0,
                                    iterations=100_000, val_loss_every=0, train_log_every=1000)
    summary = train_run(config, tmp_path)
    assert summary["stopped_by"] == "wallclock" and 1 <= summary["steps"] < 100_000
    assert 0.6 <= summary["train_seconds"] < 10.0  # the budget plus at most the step that crossed it
    log = (tmp_path / "train.log").read_text()
    assert "stopping_early: wallclock_cap" in log and "gptq:reserving 1s, effective=600ms" in log
    last = runlog.read_metrics(tmp_path, "train")[-1]
    assert last["step"] == summary["steps"]  # the last step is always logged


def test_config_error_fails_before_training(pattern_config, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=2048 but the tokenizer has 1024"):
        train_run(pattern_config.replace(vocab_size=2048), tmp_path / "a")
    with pytest.raises(ConfigError, match="micro_batches_per_step"):
        train_run(pattern_config.replace(micro_batches_per_step=3), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="data stage"):
        train_run(pattern_config.replace(dataset_name="stdlib_docs_missing"), tmp_path / "c")
    assert not any((tmp_path / d / "train.log").exists() for d in "abc")
    assert main(["--run-dir", str(tmp_path / "d"), "--preset", "demo", "--set", "micro_batches_per_step=3"]) == 1


def test_non_finite_loss_stops_and_keeps_last_good_ema(pattern_config, tmp_path):
    from parlm import pipeline

    config = pattern_config.replace(iterations=20, val_loss_every=0, tied_embed_lr=1e30)
    with pytest.raises(TrainingDiverged, match="at step [12];") as caught:
        train_run(config, tmp_path / "run")
    # A huge finite LR (non-finite rates are refused by the config) blows the weights up in the
    # first update, so the loss is non-finite at step 1 or, at the latest, step 2.
    assert caught.value.step in (1, 2)
    summary = runlog.read_json(tmp_path / "run" / "train.json")
    assert summary["diverged"] is True and summary["diverged_step"] == caught.value.step and summary["steps"] < 20
    state = torch.load(tmp_path / "run" / "final_model.pt")
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    assert "training diverged" in (tmp_path / "run" / "train.log").read_text()
    # Through the pipeline the stage fails and is not marked done.
    with pytest.raises(TrainingDiverged):
        pipeline.ensure(config, tmp_path / "pipe", "train")
    assert not runlog.stage_done(tmp_path / "pipe", "train")


def test_real_text_run_and_second_attempt(tiny_dataset_config, tmp_path):
    config = tiny_dataset_config.replace(iterations=4, val_loss_every=2, ema_decay=0.5, val_max_tokens=2048)
    first = train_run(config, tmp_path)
    assert math.isfinite(first["prequant_bpb"]) and first["steps"] == 4
    (tmp_path / "train.json").unlink()  # an unfinished attempt: no stage marker
    train_run(config, tmp_path)
    assert (tmp_path / "train.log.prev").exists()
    assert [r["step"] for r in runlog.read_metrics(tmp_path, "val")] == [0, 2, 4]
    runlog.mark_stage_done(tmp_path, "train")
    with pytest.raises(FileExistsError, match="already holds a finished training"):
        train_run(config, tmp_path)


def test_out_of_memory_becomes_a_clear_error_before_training(pattern_config, tmp_path, monkeypatch):
    from parlm.train import loop as train
    from parlm.train.state import InsufficientMemoryError

    def exhausted(self, step, lr_scale):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.Trainer, "step", exhausted)
    with pytest.raises(InsufficientMemoryError) as caught:
        train_run(pattern_config.replace(warmup_steps=2), tmp_path)
    message = str(caught.value)
    # tiny config: 256 tokens per step / (1 rank x 2 micro-steps) = 4 sequences of 32
    assert "compile warmup (warmup_step 1/2)" in message and "4 sequences x 32 tokens" in message
    assert "micro_batches_per_step=4" in message
    assert not runlog.read_metrics(tmp_path, "train") and not (tmp_path / "final_model.pt").exists()


def test_cli_help():
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
