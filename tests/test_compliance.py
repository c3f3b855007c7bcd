"""Issue #1017's conditions on the scored pass (SPEC 9.2), each checked independently on a
tiny CPU model:

C1 strict causal dependence: changing tokens after position t leaves every earlier score
   unchanged (sliding and TTT);
C2 full normalised distribution: each scored NLL is −log of one softmax distribution over the
   whole vocabulary, fixed before the realised token is seen (also for the valid mixture);
C3 score before update: TTT trains only on targets already scored (instrumented model);
C4 single pass: every position is scored exactly once (sliding and TTT).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parlm.eval.scoring import eval_val_sliding
from parlm.eval.token_mixture import TokenNgramMixture
from parlm.eval.ttt import eval_val_ttt

from test_eval import (CPU, synthetic_byte_tables, tiny_eval_config, tiny_model,  # noqa: F401
                       token_stream)

pytestmark = pytest.mark.usefixtures("single_thread")

TOTAL = 448  # 4 TTT chunks of 128 (the last one partial), 53 windows of 32 with stride 8


def run_ttt(config, model, tokens, **kwargs):
    return eval_val_ttt(config, copy.deepcopy(model), tokens, synthetic_byte_tables(config.vocab_size),
                        CPU, **kwargs)


def perturb_after(tokens: torch.Tensor, first_changed: int, seed: int = 7) -> torch.Tensor:
    """A copy whose tokens at indices >= first_changed are all different."""
    rng = np.random.default_rng(seed)
    changed = tokens.clone()
    tail = changed[first_changed:].numpy()
    changed[first_changed:] = torch.from_numpy(
        ((tail + rng.integers(1, 1023, tail.shape)) % 1024).astype(np.int32))
    return changed


# ----------------------------------------------------------------------------------------
# C1

@pytest.mark.parametrize("first_changed", [100, 129, 300, 447])
def test_c1_ttt_scores_do_not_depend_on_future_tokens(first_changed):
    """Neural TTT scores and the valid mixture's scores (which adapt its counts and gate)."""
    config = tiny_eval_config(eval_batch_seqs=6, ttt_lr=0.05, mixture_enabled=True, mixture_order=2)
    model = tiny_model(config)

    def scores(stream):
        result = run_ttt(config, model, stream, mixture=TokenNgramMixture(config, stream, 1024, "cpu"))
        return result.nll, result.nll_mix

    tokens = token_stream(TOTAL, config.vocab_size)
    for base, changed in zip(scores(tokens), scores(perturb_after(tokens, first_changed))):
        # Position p scores token p+1 from tokens <= p: entries p < first_changed - 1 must not move.
        np.testing.assert_array_equal(changed[:first_changed - 1], base[:first_changed - 1])
        assert np.abs(changed[first_changed - 1:] - base[first_changed - 1:]).max() > 1e-3


def test_c1_sliding_scores_do_not_depend_on_future_tokens():
    config = tiny_eval_config(eval_batch_seqs=4)
    model = tiny_model(config)
    tokens = token_stream(TOTAL, config.vocab_size)
    tables = synthetic_byte_tables(config.vocab_size)

    def scores(stream):
        out = np.full(TOTAL, np.nan)
        eval_val_sliding(config, model, stream, tables, CPU,
                         on_score=lambda pos, nll: out.__setitem__(pos.numpy(), nll.double().numpy()))
        return out

    base = scores(tokens)
    for first_changed in (40, 201, 400):
        changed = scores(perturb_after(tokens, first_changed))
        np.testing.assert_array_equal(changed[:first_changed - 1], base[:first_changed - 1])
        assert np.abs(changed[first_changed - 1:] - base[first_changed - 1:]).max() > 1e-3


# ----------------------------------------------------------------------------------------
# C2

def test_c2_scored_nll_is_minus_log_of_a_normalised_distribution():
    config = tiny_eval_config()
    model = tiny_model(config)
    tables = synthetic_byte_tables(config.vocab_size)
    total = 64
    tokens = token_stream(total, config.vocab_size)
    position = 50  # scored by the window starting at 24 (its last 8 positions are 48..55)
    window_start = 24
    x = tokens[window_start:window_start + 32].long()[None]
    with torch.no_grad():
        logits = model.forward_logits(x)[0, position - window_start].double()
    assert logits.abs().max() <= config.logit_softcap  # the soft-capped logits are scored
    log_probs = torch.log_softmax(logits, dim=-1)
    assert float(log_probs.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # Whatever token is realised at position+1, the score is -log p(token) of that same p.
    for candidate in (0, 1, 5, 77, 512, 1023, int(tokens[position + 1])):
        stream = tokens.clone()
        stream[position + 1] = candidate
        seen = {}
        eval_val_sliding(config, model, stream, tables, CPU,
                         on_score=lambda pos, nll: seen.update(zip(pos.tolist(), nll.tolist())))
        assert seen[position] == pytest.approx(-float(log_probs[candidate]), abs=2e-5)


class CheckedMixture(TokenNgramMixture):
    """The valid mixture, checking at every scoring call that its full distribution over the
    vocabulary sums to 1 and that the returned NLL is −log of it at the realised token."""

    checked = 0

    def nll(self, logits, positions):
        distribution = self.distribution(logits, positions)
        assert (distribution >= 0).all()
        torch.testing.assert_close(distribution.sum(-1), torch.ones(len(positions), dtype=torch.float64))
        values = super().nll(logits, positions)
        expected = -torch.log(distribution.gather(1, self.tokens[positions + 1][:, None])[:, 0])
        torch.testing.assert_close(values, expected, rtol=1e-9, atol=1e-9)
        CheckedMixture.checked += len(positions)
        return values


def test_c2_valid_mixture_scores_a_normalised_distribution():
    config = tiny_eval_config(eval_batch_seqs=6, mixture_enabled=True, mixture_order=2)
    tokens = token_stream(TOTAL, config.vocab_size)
    CheckedMixture.checked = 0
    result = run_ttt(config, tiny_model(config), tokens, mixture=CheckedMixture(config, tokens, 1024, "cpu"))
    assert CheckedMixture.checked == TOTAL
    assert np.abs(result.nll_mix - result.nll).max() > 1e-3  # the counts really take part


# ----------------------------------------------------------------------------------------
# C3

def test_c3_ttt_trains_only_on_scored_targets():
    """Tokens are distinct ids, so every token seen by the model names its stream index.
    The scoring forward records the largest target index it can score (last input index + 1);
    every training forward must only use targets at indices already scored."""
    config = tiny_eval_config(eval_batch_seqs=6, ttt_lr=0.05)
    model = copy.deepcopy(tiny_model(config))
    rng = np.random.default_rng(3)
    tokens = torch.from_numpy(rng.permutation(np.arange(1, 1024))[:TOTAL + 1].astype(np.int32))
    index_of = torch.full((1024,), -1, dtype=torch.long)
    index_of[tokens.long()] = torch.arange(TOTAL + 1)
    state = {"max_scorable_target": -1}
    scored_positions: set[int] = set()
    updates = []

    score_forward, train_forward = model.forward_hidden, model.forward

    def instrumented_forward_hidden(x):
        indices = index_of[x.flatten()]
        state["max_scorable_target"] = max(state["max_scorable_target"], int(indices.max()) + 1)
        return score_forward(x)

    def instrumented_forward(x, y):
        targets = index_of[y.flatten()]
        assert (targets >= 0).all()
        updates.append((int(targets.max()), state["max_scorable_target"], set((targets - 1).tolist())))
        return train_forward(x, y)

    model.forward_hidden = instrumented_forward_hidden
    model.forward = instrumented_forward
    eval_val_ttt(config, model, tokens, synthetic_byte_tables(config.vocab_size), CPU, warmup=False,
                 on_score=lambda pos, nll: scored_positions.update(pos.tolist()),
                 on_train=lambda first, last: updates.append(("positions", first, last, set(scored_positions))))
    trained = [u for u in updates if u[0] != "positions"]
    hooks = [u for u in updates if u[0] == "positions"]
    assert len(trained) == 3 * config.ttt_epochs  # chunks 0..2 train, the last chunk never does
    for max_target, max_scored, _ in trained:
        assert max_target <= max_scored
    for _, first, last, scored_before in hooks:
        assert set(range(first, last + 1)) <= scored_before
    # The check has teeth: training reaches the end of each trained chunk.
    assert [t[0] for t in trained[::config.ttt_epochs]] == [128, 256, 384]


# ----------------------------------------------------------------------------------------
# C4

def test_c4_each_position_scored_exactly_once():
    config = tiny_eval_config(eval_batch_seqs=5)
    model = tiny_model(config)
    tables = synthetic_byte_tables(config.vocab_size)
    for total in (TOTAL, 445):
        tokens = token_stream(total, config.vocab_size)
        for name in ("sliding", "ttt"):
            counts = np.zeros(total + 8, dtype=int)

            def count(pos, nll):
                np.add.at(counts, pos.numpy(), 1)

            if name == "sliding":
                result = eval_val_sliding(config, model, tokens, tables, CPU, on_score=count)
            else:
                result = eval_val_ttt(config, copy.deepcopy(model), tokens, tables, CPU, on_score=count).result
            assert (counts[:total] == 1).all(), name
            assert counts[total:].sum() == 0, name
            assert result.tokens == total, name


class RecordingMixture:
    """A stand-in valid mixture that records how eval drives it (positions scored, advances)
    and returns the neural NLL (a normalised distribution) so scores are checkable."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens.long()
        self.advanced = 0
        self.calls: list[tuple[str, object]] = []

    def nll(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert logits.shape == (positions.numel(), 1024)
        assert int(positions.min()) >= self.advanced  # never scores an already-counted position
        self.calls.append(("nll", positions.tolist()))
        return F.cross_entropy(logits.double(), self.tokens[positions + 1], reduction="none")

    def advance(self, upto: int) -> None:
        self.calls.append(("advance", upto))
        self.advanced = upto


def test_mixture_driven_score_first_and_once():
    config = tiny_eval_config(eval_batch_seqs=6, ttt_lr=0.05)
    tokens = token_stream(TOTAL, config.vocab_size)
    mixture = RecordingMixture(tokens)
    result = run_ttt(config, tiny_model(config), tokens, mixture=mixture)
    seen: list[int] = []
    for kind, value in mixture.calls:
        if kind == "nll":
            seen.extend(value)
        else:  # every position below the advance point was scored before it was counted
            assert set(range(value)) <= set(seen)
    assert sorted(seen) == list(range(TOTAL))
    assert [v for k, v in mixture.calls if k == "advance"] == [128, 256, 384, TOTAL]
    # With the neural NLL as "mixture", the mixed score equals the neural score.
    np.testing.assert_allclose(result.nll_mix, result.nll, rtol=1e-6, atol=1e-6)
    assert result.mix.bpb == pytest.approx(result.result.bpb, rel=1e-6)


# ----------------------------------------------------------------------------------------
# Frontier switches (issue 21): per-document LoRA TTT, n-gram tilt, warm-up inputs

from parlm.eval.lora_ttt import eval_val_lora_ttt  # noqa: E402
from parlm.eval.ngram_tilt import NgramTilt  # noqa: E402
from parlm.eval.ttt import TTTTrainer, warmup_tokens  # noqa: E402

FRONTIER_TOTAL = 160


def frontier_stream(total: int = FRONTIER_TOTAL, seed: int = 4) -> torch.Tensor:
    """Documents of 20-50 tokens (BOS = 1 at each start), other ids in 4..1023."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 1024, total + 1)
    position = 0
    while position <= total:
        tokens[position] = 1
        position += int(rng.integers(20, 50))
    return torch.from_numpy(tokens.astype(np.int32))


def frontier_config(**overrides):
    """Every LoRA TTT option on: short-document chunks, no_qv, local LR factor, one phase."""
    base = dict(lora_ttt_enabled=True, lora_ttt_rank=2, lora_ttt_chunk_tokens=8, lora_ttt_batch_docs=4,
                lora_ttt_lr=0.02, lora_ttt_short_chunks="16:4", lora_ttt_no_qv=True,
                lora_ttt_local_lr_factor=0.75, lora_ttt_phases=1, lora_ttt_prefix_docs=2,
                lora_ttt_global_lr=0.05, ttt_chunk_tokens=64, tilt_enabled=True, tilt_order=2,
                tilt_threshold=0.2)
    return tiny_eval_config(**{**base, **overrides})


def perturb_keeping_documents(tokens: torch.Tensor, first_changed: int, seed: int = 9) -> torch.Tensor:
    """A copy whose non-BOS tokens at indices >= first_changed all take other non-BOS ids."""
    rng = np.random.default_rng(seed)
    changed = tokens.clone().numpy()
    tail = np.arange(first_changed, len(changed))
    tail = tail[changed[tail] != 1]
    changed[tail] = 4 + (changed[tail] - 4 + rng.integers(1, 1019, len(tail))) % 1020
    return torch.from_numpy(changed)


@pytest.mark.parametrize("first_changed", [30, 95])
def test_c1_lora_ttt_and_tilt_scores_do_not_depend_on_future_tokens(first_changed):
    config = frontier_config()
    model = tiny_model(config)

    def scores(stream):
        result = eval_val_lora_ttt(config, copy.deepcopy(model), stream, synthetic_byte_tables(1024), CPU,
                                   tilt=NgramTilt(config, stream, "cpu"))
        return result.nll, result.nll_mix

    tokens = frontier_stream()
    for base, changed in zip(scores(tokens), scores(perturb_keeping_documents(tokens, first_changed))):
        np.testing.assert_array_equal(changed[:first_changed - 1], base[:first_changed - 1])
        assert np.abs(changed[first_changed - 1:] - base[first_changed - 1:]).max() > 1e-3


def test_c1_tilt_hints_do_not_depend_on_future_tokens():
    config = frontier_config(tilt_order=3, tilt_threshold=0.0)
    tokens = token_stream(TOTAL, 8)  # a small alphabet: contexts repeat, hints fire often
    base = NgramTilt(config, tokens, "cpu")
    for first_changed in (50, 200):
        changed = tokens.clone()
        changed[first_changed:] = (changed[first_changed:] + 1) % 8
        other = NgramTilt(config, changed, "cpu")
        # hint/beta at t read x_0..x_t: entries t < first_changed are fixed
        assert torch.equal(other.hint[:first_changed], base.hint[:first_changed])
        assert torch.equal(other.beta[:first_changed], base.beta[:first_changed])
        assert not torch.equal(other.hint[first_changed:], base.hint[first_changed:])
    assert base.fired > TOTAL // 2


class CheckedTilt(NgramTilt):
    """The tilt, checking at every scoring call that its distribution over the whole
    vocabulary is >= 0 and sums to 1, and that the NLL is −log of it at the realised token."""

    checked: set[int] = set()

    def nll(self, logits, positions):
        distribution = self.distribution(logits, positions)
        assert (distribution >= 0).all() and distribution.shape[1] == 1024
        torch.testing.assert_close(distribution.sum(-1), torch.ones(len(positions), dtype=torch.float64))
        values = super().nll(logits, positions)
        expected = -torch.log(distribution.gather(1, self.tokens[positions + 1][:, None])[:, 0])
        torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)
        CheckedTilt.checked.update(positions.tolist())
        return values


@pytest.mark.parametrize("method", ["sgd", "lora"])
def test_c2_tilted_scores_are_a_normalised_distribution(method):
    config = frontier_config(eval_batch_seqs=6, ttt_chunk_tokens=128, tilt_threshold=0.0)
    tokens = frontier_stream()
    tilt = CheckedTilt(config, tokens, "cpu")
    CheckedTilt.checked = set()
    model = copy.deepcopy(tiny_model(config))
    tables = synthetic_byte_tables(1024)
    if method == "sgd":
        result = eval_val_ttt(config, model, tokens, tables, CPU, mixture=tilt)
    else:
        result = eval_val_lora_ttt(config, model, tokens, tables, CPU, tilt=tilt)
    assert CheckedTilt.checked == set(range(FRONTIER_TOTAL))  # every scored position was checked
    assert tilt.fired > 0 and np.abs(result.nll_mix - result.nll).max() > 1e-3


def test_c2_tilted_distribution_does_not_depend_on_the_target():
    """The #1420 leak gated channels on the realised token; here, at random positions t, any
    change of x_{t+1} leaves the whole tilted distribution at t unchanged."""
    config = frontier_config(tilt_order=2, tilt_threshold=0.0)
    tokens = token_stream(TOTAL, 8)
    logits = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    base = NgramTilt(config, tokens, "cpu")
    for t in rng.choice(np.flatnonzero(base.beta.numpy() > 0), 6, replace=False):
        position = torch.tensor([int(t)])
        before = base.distribution(logits, position)
        for candidate in (0, 3, 7):
            stream = tokens.clone()
            stream[t + 1] = candidate
            after = NgramTilt(config, stream, "cpu").distribution(logits, position)
            torch.testing.assert_close(after, before, rtol=0, atol=0)
        assert float(before.sum()) == pytest.approx(1.0, abs=1e-12)


def test_c3_lora_ttt_trains_only_on_scored_positions():
    """Every LoRA step and every global-phase step trains on positions (whose next token is
    the target) that were scored before the step."""
    config = frontier_config(tilt_enabled=False)
    tokens = frontier_stream()
    scored: set[int] = set()
    steps = []

    def on_train(positions):
        trained = set(positions.tolist())
        assert trained and trained <= scored, sorted(trained - scored)[:5]
        steps.append(len(trained))

    eval_val_lora_ttt(config, copy.deepcopy(tiny_model(config)), tokens, synthetic_byte_tables(1024), CPU,
                      on_score=lambda pos, nll: scored.update(pos.tolist()), on_train=on_train)
    assert len(steps) > 10 and max(steps) >= 32  # LoRA steps and the global phase's steps


def test_c4_lora_ttt_scores_each_position_exactly_once():
    config = frontier_config(tilt_enabled=False, lora_ttt_lr=0.0, lora_ttt_phases=0)
    for total in (FRONTIER_TOTAL, 157):
        tokens = frontier_stream(total)
        counts = np.zeros(total + 8, dtype=int)
        result = eval_val_lora_ttt(config, tiny_model(config), tokens, synthetic_byte_tables(1024), CPU,
                                   on_score=lambda pos, nll: np.add.at(counts, pos.numpy(), 1))
        assert (counts[:total] == 1).all() and counts[total:].sum() == 0
        assert result.result.tokens == total


def test_ttt_compile_warmup_uses_random_tokens_and_leaves_weights_alone():
    """#1530: the warm-up must not read validation data. The compiled path is forced on CPU
    with a recording forward: its inputs are the seeded random batch whatever the stream."""
    config = tiny_eval_config()
    model = tiny_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TTTTrainer(config, model, CPU, compile=False)
    seen = []

    def recording_forward(x, y):
        seen.append((x.clone(), y.clone()))
        return model(x, y)

    trainer.compiled, trainer.forward = True, recording_forward
    trainer.warmup({2, 3})
    x, y = warmup_tokens(2, config.eval_seq_len, config.vocab_size, "cpu")
    assert [s[0].shape[0] for s in seen] == [2, 3]
    assert torch.equal(seen[0][0], x) and torch.equal(seen[0][1], y)
    assert len(torch.unique(x)) > config.eval_seq_len  # random ids, not a constant or a stream
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
