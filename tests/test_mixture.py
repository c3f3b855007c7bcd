"""The valid token mixture: normalized (C2), prefix-only (C1), nll consistent with the
distribution, count model equal to a slow dictionary implementation."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from parlm.config import Config, ConfigError
from parlm.eval.token_mixture import SortedCounts, TokenNgramMixture


def slow_count_distribution(tokens, advanced, position, order, vocab):
    """Interpolated Witten-Bell from the definition, over targets of positions < advanced."""
    counts = [dict() for _ in range(order + 1)]  # k -> context tuple -> Counter
    for q in range(advanced):
        for k in range(order + 1):
            if q - k + 1 < 0:
                continue
            ctx = tuple(tokens[q - k + 1:q + 1])
            counts[k].setdefault(ctx, Counter())[tokens[q + 1]] += 1

    def p(k, v):
        if k < 0:
            return 1.0 / vocab
        if position - k + 1 < 0:
            return p(k - 1, v)
        table = counts[k].get(tuple(tokens[position - k + 1:position + 1]))
        if not table:
            return p(k - 1, v)
        n, u = sum(table.values()), len(table)
        return (table.get(v, 0) + u * p(k - 1, v)) / (n + u)

    return np.array([p(order, v) for v in range(vocab)])


def make(tokens, order=2, vocab=13, **kw):
    config = Config().replace(mixture_order=order, **kw)
    return TokenNgramMixture(config, torch.as_tensor(tokens, dtype=torch.int32), vocab, "cpu")


def random_tokens(seed, n=300, vocab=13):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=n)
    motif = rng.integers(0, vocab, size=5)
    repeat = rng.random(n) < 0.5
    tokens[repeat] = motif[np.arange(n)[repeat] % 5]
    return tokens


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_count_model_matches_slow_definition(order):
    tokens = random_tokens(order)
    mixture = make(tokens, order=order)
    for upto in (0, 1, 7, 120, 250):
        mixture.advance(upto)
        positions = torch.tensor([0, 1, 2, 5, 119, 120, 200, 298])
        dense = mixture.count_distribution(positions).numpy()
        for row, position in enumerate(positions.tolist()):
            expect = slow_count_distribution(tokens.tolist(), upto, position, order, 13)
            np.testing.assert_allclose(dense[row], expect, rtol=1e-12, atol=0)
        targets = torch.as_tensor(tokens)[positions + 1]
        np.testing.assert_allclose(mixture.count_probability(positions, targets).numpy(),
                                   dense[np.arange(len(positions)), targets.numpy()], rtol=1e-12)


def test_mixture_sums_to_one_and_nll_is_minus_log_of_it():
    tokens = random_tokens(1, n=400)
    mixture = make(tokens, order=3, mixture_lambda_init=0.3, mixture_gate_prior=5.0)
    torch.manual_seed(0)
    for chunk in range(4):
        positions = torch.arange(chunk * 100, (chunk + 1) * 100 - (chunk == 3))
        logits = torch.randn(len(positions), 13) * 3
        distribution = mixture.distribution(logits, positions)
        assert torch.all(distribution >= 0)
        assert torch.allclose(distribution.sum(1), torch.ones(len(positions), dtype=torch.float64),
                              rtol=0, atol=1e-12)
        targets = torch.as_tensor(tokens)[positions + 1]
        nll = mixture.nll(logits, positions)
        expect = -torch.log(distribution[torch.arange(len(positions)), targets])
        assert torch.allclose(nll, expect, rtol=1e-9, atol=1e-12)
        mixture.advance((chunk + 1) * 100)
    assert mixture.gate.min() >= 0 and mixture.gate.max() <= 1
    assert mixture.gate_positions.sum() == 399  # every scored position fed the gate once


def test_distribution_depends_only_on_prefix():
    """Changing tokens after the scored position (the target and beyond) leaves the
    distribution at that position unchanged (C1)."""
    tokens = random_tokens(2, n=200)
    other = tokens.copy()
    other[151:] = (other[151:] + 5) % 13
    a, b = make(tokens, order=3), make(other, order=3)
    for mixture in (a, b):
        mixture.advance(100)
        mixture.nll(torch.zeros(50, 13), torch.arange(100, 150))  # same gate statistics
        mixture.advance(150)
    positions = torch.arange(150, 151)  # predicts token 151, the first changed one
    logits = torch.randn(1, 13)
    assert torch.equal(a.distribution(logits, positions), b.distribution(logits, positions))
    later = torch.tensor([160])  # its context (tokens 158-160) differs: distributions may differ
    assert not torch.equal(a.count_distribution(later), b.count_distribution(later))


def test_counts_only_from_advanced_positions():
    tokens = random_tokens(3)
    mixture = make(tokens, order=2)
    before = mixture.count_distribution(torch.tensor([50]))
    assert torch.allclose(before, torch.full((1, 13), 1 / 13, dtype=torch.float64))
    mixture.advance(40)
    assert int(mixture.unigram.sum()) == 40
    assert [int(t.counts.sum()) for t in mixture.tables] == [40, 39]  # order 2 needs 2 tokens


def test_zero_gate_is_the_neural_model():
    tokens = random_tokens(4)
    mixture = make(tokens, order=2, mixture_lambda_init=0.0)
    mixture.advance(100)
    logits = torch.randn(30, 13)
    positions = torch.arange(100, 130)
    targets = torch.as_tensor(tokens)[positions + 1]
    expect = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double()
    assert torch.allclose(mixture.nll(logits, positions), expect, atol=1e-6)


def test_gate_is_em_estimate_of_earlier_chunks():
    tokens = random_tokens(5)
    mixture = make(tokens, order=1, mixture_lambda_init=0.2, mixture_gate_prior=10.0, mixture_gate_bins=1)
    mixture.advance(50)
    positions = torch.arange(50, 80)
    logits = torch.randn(30, 13)
    lam_before = mixture.gate.clone()
    nll = mixture.nll(logits, positions)
    assert torch.equal(mixture.gate, lam_before)  # not folded in before advance
    targets = torch.as_tensor(tokens)[positions + 1]
    p_count = mixture.count_probability(positions, targets)
    log_q = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
    bucket = mixture._gate(*mixture._count_terms(positions)[2:])
    lam = lam_before[bucket]
    r = lam * p_count / (lam * p_count + (1 - lam) * log_q.exp())
    assert torch.allclose(torch.exp(-nll), lam * p_count + (1 - lam) * log_q.exp(), rtol=1e-9)
    mixture.advance(80)
    for b in bucket.unique():
        sel = bucket == b
        expect = (10.0 * 0.2 + r[sel].sum()) / (10.0 + sel.sum())
        assert mixture.gate[b].item() == pytest.approx(expect.item(), rel=1e-9)


def test_sorted_counts_merge_against_counter():
    rng = np.random.default_rng(0)
    table, reference = SortedCounts("cpu"), Counter()
    for _ in range(6):
        keys = rng.integers(0, 500, size=int(rng.integers(0, 200)))
        table.add(torch.as_tensor(keys, dtype=torch.int64))
        reference.update(keys.tolist())
        expect_keys = sorted(reference)
        assert table.keys.tolist() == expect_keys
        assert table.counts.tolist() == [reference[k] for k in expect_keys]
        assert table.cumulative[-1].item() == sum(reference.values())
    query = torch.arange(-5, 510)
    assert table.count(query).tolist() == [reference.get(k, 0) for k in range(-5, 510)]


def test_order_too_large_for_exact_keys():
    with pytest.raises(ConfigError, match="mixture_order"):
        make(np.zeros(10, dtype=np.int64), order=4, vocab=8192)
    make(np.zeros(10, dtype=np.int64), order=3, vocab=8192)  # 4 x 13 bits fits
    assert math.isfinite(make(np.zeros(10, dtype=np.int64), order=1, vocab=2).nll(
        torch.zeros(1, 2), torch.tensor([0])).item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    tokens = random_tokens(6, n=3000, vocab=50)
    cpu, gpu = (TokenNgramMixture(Config().replace(mixture_order=3), torch.as_tensor(tokens), 50, d)
                for d in ("cpu", "cuda"))
    logits = torch.randn(500, 50)
    for upto in (1000, 2000):
        for mixture in (cpu, gpu):
            mixture.advance(upto)
        positions = torch.arange(upto, upto + 500)
        a = cpu.nll(logits, positions)
        b = gpu.nll(logits.cuda(), positions.cuda()).cpu()
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
