"""The frontier's optimizer and schedule switches (issue 17) against float64 transcriptions and
hand-worked values: Polar Express Newton-Schulz (#1344/#1787), the MIN_LR warmdown floor
(#1787), progressive training context and its LR re-warmup (#2014), and the loader's re-cut."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parlm.config import Config, ConfigError
from parlm.data.loader import ShuffledSequenceLoader, train_seq_len_at
from parlm.data.shards import write_shard
from parlm.model.gpt import GPT
from parlm.train.optim import Muon, Optimizers, lr_multiplier, seq_change_warmup_scale, zeropower_via_newtonschulz5

# The five (a, b, c) of #1344's Polar Express, one per iteration, as printed in that PR.
PUBLISHED_POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
FRONTIER_SCHEDULE = "1024@0.1,2048@0.7,3072@1.0"  # #2014


def polar_express_float64(G: torch.Tensor, coefficients) -> torch.Tensor:
    X = G.double() / (G.double().norm() + 1e-7)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for a, b, c in coefficients:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


def test_polar_express_tracks_its_float64_transcription():
    generator = torch.Generator().manual_seed(1)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        G = torch.randn(shape, generator=generator)
        fast = zeropower_via_newtonschulz5(G, 5, coefficients="polar_express")
        slow = polar_express_float64(G, PUBLISHED_POLAR_EXPRESS)
        assert fast.dtype == torch.bfloat16 and fast.shape == G.shape
        assert ((fast.double() - slow).norm() / slow.norm()).item() < 0.06, shape
        # The reference coefficients applied 5 times are a different map (> 30% away).
        reference = zeropower_via_newtonschulz5(G, 5).double()
        assert ((reference - slow).norm() / slow.norm()).item() > 0.1


def test_polar_express_repeats_its_last_tuple_past_five_steps():
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    seven = PUBLISHED_POLAR_EXPRESS + [PUBLISHED_POLAR_EXPRESS[-1]] * 2
    fast = zeropower_via_newtonschulz5(G, 7, coefficients="polar_express").double()
    slow = polar_express_float64(G, seven)
    assert ((fast - slow).norm() / slow.norm()).item() < 0.06


def test_muon_groups_carry_the_configured_coefficients(tiny_config):
    config = tiny_config.replace(muon_newton_schulz_coefficients="polar_express")
    optimizers = Optimizers(config, GPT(config))
    assert [g["newton_schulz_coefficients"] for g in optimizers.muon.param_groups] == ["polar_express"]
    # One Muon step on one matrix applies -lr * polar_express(momentum-Nesterov gradient).
    weight = torch.nn.Parameter(torch.zeros(16, 32))
    weight.grad = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    Muon([weight], lr=0.5, momentum=0.0, newton_schulz_coefficients="polar_express").step()
    expected = -0.5 * polar_express_float64(weight.grad, PUBLISHED_POLAR_EXPRESS)
    assert ((weight.double() - expected).norm() / expected.norm()).item() < 0.06
    with pytest.raises(ConfigError, match="muon_newton_schulz_coefficients"):
        tiny_config.replace(muon_newton_schulz_coefficients="quintic").validate()


def test_min_lr_floors_the_warmdown_at_a_fraction_of_peak():
    """#1787 MIN_LR=0.1 with #1855's warmdown_frac 0.85: hand-worked multipliers."""
    config = Config().replace(warmdown_frac=0.85, min_lr=0.1)
    assert lr_multiplier(config, 0.10) == 1.0  # before the warmdown (starts at 0.15)
    assert lr_multiplier(config, 0.50) == pytest.approx(0.5 / 0.85)
    assert lr_multiplier(config, 0.90) == pytest.approx(0.1 / 0.85)  # 0.1176: still above the floor
    assert lr_multiplier(config, 0.95) == pytest.approx(0.1)  # 0.05/0.85 = 0.0588 -> floored
    assert lr_multiplier(config, 1.00) == pytest.approx(0.1)
    assert lr_multiplier(Config().replace(warmdown_frac=0.85), 1.0) == 0.0  # the reference's floor


def test_train_seq_len_at_follows_the_2014_schedule():
    config = Config().replace(train_seq_schedule=FRONTIER_SCHEDULE, train_seq_len=3072)
    expected = {0.0: 1024, 0.05: 1024, 0.1: 1024, 0.1001: 2048, 0.5: 2048, 0.7: 2048,
                0.7001: 3072, 1.0: 3072, 1.3: 3072}
    assert {f: train_seq_len_at(config, f) for f in expected} == expected
    assert train_seq_len_at(Config(), 0.5) == 2048  # no schedule: train_seq_len
    # A schedule ending before 1.0 keeps its last length (#2014's parser).
    short = Config().replace(train_seq_schedule="2048@0.5,1024@0.2")
    assert [train_seq_len_at(short, f) for f in (0.1, 0.3, 0.9)] == [1024, 2048, 2048]
    config.validate()


@pytest.mark.parametrize("overrides, message", [
    (dict(train_seq_schedule="1024-0.1"), "must look like"),
    (dict(train_seq_schedule="1024@1.5"), r"fraction in \(0, 1\]"),
    (dict(train_seq_schedule=FRONTIER_SCHEDULE), "set train_seq_len=3072"),
    (dict(train_seq_schedule="1000@0.5,3072@1.0", train_seq_len=3072), r"lengths \[1000\]"),
])
def test_bad_schedules_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config().replace(**overrides).validate()


def test_seq_change_warmup_is_linear_over_the_configured_steps():
    config = Config().replace(seq_change_warmup_steps=32)
    assert seq_change_warmup_scale(config, 100, None) == 1.0
    assert seq_change_warmup_scale(config, 500, 500) == pytest.approx(1 / 32)
    assert seq_change_warmup_scale(config, 515, 500) == pytest.approx(16 / 32)
    assert seq_change_warmup_scale(config, 531, 500) == 1.0
    assert seq_change_warmup_scale(config, 900, 500) == 1.0
    assert seq_change_warmup_scale(Config(), 500, 500) == 1.0


def test_loader_recut_draws_no_token_twice_in_a_pass(tmp_path):
    """Draw part of a pass at length 8, switch to 16 then 24, draw until the pass ends: every
    window is the shard's content, windows of a pass never overlap (beyond the shared target
    token), and the new lengths cover what the first cut left."""
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (1001, 730)]
    folder = tmp_path / "datasets" / "tiny"
    folder.mkdir(parents=True)
    for i, tokens in enumerate(shards):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", tokens)
    config = Config().replace(data_dir=str(tmp_path), dataset_name="tiny", train_seq_len=24,
                              train_seq_schedule="8@0.2,16@0.6,24@1.0", micro_batches_per_step=1,
                              train_batch_tokens=48)
    loader = ShuffledSequenceLoader(config, 0, 1, "cpu")
    covered = [np.zeros(len(t), dtype=np.int64) for t in shards]
    epoch = loader.epochs

    def draw(count):
        shard_ids, starts = loader.next_windows(count)
        windows = loader.gather(shard_ids, starts)
        for shard, start, window in zip(shard_ids.tolist(), starts.tolist(), windows):
            assert len(window) == loader.seq_len + 1
            np.testing.assert_array_equal(window, shards[shard][start:start + loader.seq_len + 1])
            covered[shard][start:start + loader.seq_len] += 1  # the last token is the next's first

    assert loader.seq_len == 8
    draw(60)
    for length in (16, 24):
        loader.set_seq_len(length)
        assert loader.seq_len == length
        draw(10)
    draw(int(loader.remaining.sum()))
    assert loader.epochs == epoch
    assert max(c.max() for c in covered) == 1
    # Left uncovered: the phase and end of each shard (< 8 tokens) and each run's tail shorter
    # than the new window at each re-cut (< 16, then < 24), so no gap reaches 16 + 24 tokens.
    for c in covered:
        edges = np.diff(np.r_[0, (c == 0).astype(np.int8), 0])
        gaps = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        assert gaps.max(initial=0) < 16 + 24


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_training_follows_the_schedule_and_warmup_restores_it(tiny_dataset_config, tmp_path):
    """train_run with "8@0.2,16@0.6,32@1.0" over 10 steps (frac = step / 10): rows of 8 tokens
    for steps 0-2, 16 for 3-6, 32 for 7-9; the LR re-warms over 2 steps after each change; the
    compile warmup (which visits every length) restores the run exactly."""
    from parlm import runlog
    from parlm.train.loop import train_run

    config = tiny_dataset_config.replace(iterations=10, val_loss_every=0, train_log_every=1,
                                         train_seq_schedule="8@0.2,16@0.6,32@1.0",
                                         seq_change_warmup_steps=2, warmup_steps=1, val_max_tokens=256)
    train_run(config, tmp_path / "warm")
    train_run(config.replace(warmup_steps=0), tmp_path / "cold")
    log = (tmp_path / "warm" / "train.log").read_text()
    assert "growth_stage:seq_len:16 step:3 " in log and "growth_stage:seq_len:32 step:7 " in log
    rows = {row["step"]: row for row in runlog.read_metrics(tmp_path / "warm", "train")}
    # Metric row n is step n - 1: frac (n-1)/10, warmdown 0.72 from frac 0.28, re-warm 1/2, 2/2.
    assert rows[4]["lr_scale"] == pytest.approx(0.7 / 0.72 * 0.5)
    assert rows[5]["lr_scale"] == pytest.approx(0.6 / 0.72)
    assert rows[8]["lr_scale"] == pytest.approx(0.3 / 0.72 * 0.5)
    cold = runlog.read_metrics(tmp_path / "cold", "train")
    assert [r["train_loss"] for r in rows.values()] == [r["train_loss"] for r in cold]
