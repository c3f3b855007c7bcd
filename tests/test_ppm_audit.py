"""PPM-D sums to 1; the normalization audit against slow brute-force sums."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from parlm.ppm import TokenByteLayout, legacy_mixture
from parlm.ppm.audit import candidates, spread_logprobs
from parlm.ppm.reference_mixture import audit_legacy
from parlm.ppm.ppmd import ppmd_score
from test_ppm_legacy import random_stream, random_vocab


# ---------------------------------------------------------------------------------------------
# Slow PPM-D with exclusion (dict of dicts), written from the textbook definition.
def slow_ppmd_distribution(contexts, history, order):
    window = history[-order:] if order > 0 else b""
    probs = [0.0] * 256
    excluded = set()
    escape = 1.0
    for k in range(len(window), -1, -1):
        table = contexts.get(window[len(window) - k:])
        if not table:
            continue
        offered = {c: n for c, n in table.items() if c not in excluded}
        if not offered:
            continue
        n = sum(offered.values())
        if len(excluded) + len(offered) == 256:
            for c, count in offered.items():
                probs[c] += escape * count / n
            return probs
        for c, count in offered.items():
            probs[c] += escape * (2 * count - 1) / (2 * n)
        escape *= len(offered) / (2 * n)
        excluded |= set(offered)
    free = [c for c in range(256) if c not in excluded]
    for c in free:
        probs[c] += escape / len(free)
    return probs


def slow_update(contexts, history, byte, order):
    window = history[-order:] if order > 0 else b""
    for k in range(len(window) + 1):
        table = contexts.setdefault(window[len(window) - k:], {})
        table[byte] = table.get(byte, 0) + 1


def text_sample(n=3000):
    return (b"the cat sat on the mat; the cat ate the rat. " * 40 + bytes(range(256)) * 2
            + b"abracadabra " * 30)[:n]


def test_ppmd_sums_to_one_at_every_position_and_matches_slow():
    values = np.frombuffer(text_sample(), dtype=np.uint8)
    order = 4
    positions = np.arange(0, len(values), 37)
    result = ppmd_score(values, order=order, keep_positions=positions)
    assert np.all(np.abs(result.totals - 1.0) < 1e-12), np.abs(result.totals - 1).max()
    contexts, history = {}, b""
    row = 0
    for t, byte in enumerate(values.tobytes()):
        if t in set(positions.tolist()):
            expect = slow_ppmd_distribution(contexts, history, order)
            assert math.fsum(expect) == pytest.approx(1.0, abs=1e-12)
            np.testing.assert_allclose(result.distributions[row], expect, rtol=1e-12, atol=1e-300)
            row += 1
        expect_p = slow_ppmd_distribution(contexts, history, order)[byte] if t < 600 else None
        if expect_p is not None:
            assert result.log_probs[t] == pytest.approx(math.log(expect_p), rel=1e-12)
        slow_update(contexts, history, byte, order)
        history = (history + bytes([byte]))[-order:]


def test_ppmd_on_real_text_sums_to_one(wiki_docs_path):
    import json
    import lzma

    with lzma.open(wiki_docs_path, "rt", encoding="utf-8") as fh:
        text = json.loads(fh.readline())["text"].encode()[:20000]
    result = ppmd_score(np.frombuffer(text, dtype=np.uint8), order=5)
    assert np.abs(result.totals - 1.0).max() < 1e-12
    assert 1.5 < result.bpb < 6.0


# ---------------------------------------------------------------------------------------------
# Slow legacy state + brute-force totals.
def slow_legacy_logp(contexts, history, byte, order):
    window = history[-order:] if order > 0 else b""
    escape, confidence = 0.0, None
    for k in range(len(window), -1, -1):
        table = contexts.get(window[len(window) - k:])
        if table is None:
            continue
        n, u = sum(table.values()), len(table)
        if confidence is None:
            confidence = max(table.values()) / (n + u)
        if byte in table:
            return escape + math.log(table[byte] / (n + u)), confidence
        escape += math.log(u / (n + u))
    return escape + math.log(1 / 256), confidence or 0.0


def slow_state(stream_bytes, order):
    contexts, history = {}, b""
    for byte in stream_bytes:
        slow_update(contexts, history, byte, order)
        history = (history + bytes([byte]))[-order:]
    return contexts, history


def slow_token_total(contexts, history, strings_and_ell, order, hi=0.9, lo=0.05, thr=0.9, anti=0.277):
    total = 0.0
    for data, ell in strings_and_ell:
        ctx, hist = copy.deepcopy(contexts), history
        product = 1.0
        for byte in data:
            log_p, confidence = slow_legacy_logp(ctx, hist, byte, order)
            lam = lo if confidence >= thr else hi
            if -ell < anti:
                lam = 1.0
            product *= lam * math.exp(ell) + (1 - lam) * math.exp(log_p)
            slow_update(ctx, hist, byte, order)
            hist = (hist + bytes([byte]))[-order:]
        total += product
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audit_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    token_bytes, has_space, is_boundary = random_vocab(rng, vocab_size=24)
    target, prev, nll = random_stream(rng, 24, 150)
    layout = TokenByteLayout.from_tables(token_bytes, has_space, is_boundary)
    order = 3
    positions = np.array([0, 17, 60, 149])
    logits = rng.normal(size=(len(positions), 24)) * 2
    logq = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    result = audit_legacy(target, prev, nll, layout, positions, token_logprobs=logq, order=order)
    stream = layout.byte_stream(target, prev)
    for s, position in enumerate(positions):
        before = stream.values[stream.token_index < position].tobytes()
        contexts, history = slow_state(before, order)
        p = int(prev[position])
        boundary = p < 0 or p >= 24 or bool(is_boundary[p])
        strings = []
        for v in range(24):
            data = (b" " if has_space[v] and not boundary else b"") + token_bytes[v]
            if data:
                strings.append((data, logq[s, v] / len(data)))
        expect = slow_token_total(contexts, history, strings, order)
        assert result.token_total[s] == pytest.approx(expect, rel=1e-9)
        ppm = [math.exp(slow_legacy_logp(contexts, history, b, order)[0]) for b in range(256)]
        assert result.ppm_total[s] == pytest.approx(math.fsum(ppm), rel=1e-9)
        assert result.ppmd_total[s] == pytest.approx(1.0, abs=1e-12)
        first = np.zeros(256)
        for data, ell in strings:
            first[data[0]] += math.exp(ell)
        assert result.nn_first_total[s] == pytest.approx(first.sum(), rel=1e-9)
        assert result.zero_byte_candidates[s] == 24 - len(strings)


def test_realised_candidate_equals_legacy_charge():
    """With the NLL-consistent stand-in, the audit's product for the realised token is exactly
    what the legacy scorer charged for that token's bytes."""
    rng = np.random.default_rng(5)
    token_bytes, has_space, is_boundary = random_vocab(rng, vocab_size=30)
    target, prev, nll = random_stream(rng, 30, 300)
    layout = TokenByteLayout.from_tables(token_bytes, has_space, is_boundary)
    counts = layout.byte_counts(target, prev)
    positions = np.flatnonzero(counts > 0)[::23]
    audit = audit_legacy(target, prev, nll, layout, positions)
    legacy = legacy_mixture(target, prev, nll, layout)
    stream = layout.byte_stream(target, prev)
    for s, position in enumerate(positions):
        charged = legacy.trace["mix_logp"][stream.token_index == position].astype(np.float64).sum()
        assert audit.realised_log_product[s] == pytest.approx(charged, rel=1e-6, abs=1e-6)


def test_pr1905_toy_example_first_byte_total_is_one_and_a_half():
    """Tokens "ax", "ay" (p = 0.25 each) and "b" (p = 0.5): Σ_b P1(b) = 2·0.25^(1/2) + 0.5 = 1.5."""
    layout = TokenByteLayout.from_tables([b"", b"ax", b"ay", b"b"], [False] * 4, [True, False, False, False])
    logq = np.log(np.array([[1e-300, 0.25, 0.25, 0.5]]))
    result = audit_legacy(np.array([1]), np.array([0]), np.array([-math.log(0.25)]), layout, [0],
                          token_logprobs=logq)
    assert result.nn_first_total[0] == pytest.approx(1.5, rel=1e-12)
    # constant rule: every byte gets p^(1/n) = 0.5 with λ = 0.9 and no PPM history: 256·0.45 + 0.1
    assert result.constant_total[0] == pytest.approx(256 * 0.9 * 0.5 + 0.1, rel=1e-12)
    assert result.ppm_total[0] == pytest.approx(1.0, rel=1e-12)  # empty model: uniform


def test_candidates_and_spread():
    layout = TokenByteLayout.from_tables([b"", b"a", b"ab", b"b"], [False, True, False, True],
                                         [True, False, False, False])
    after_text = candidates(layout, prev_is_boundary=False)
    assert [layout.token_bytes(v) for v in after_text.token_ids] == [b"a", b"b", b"ab"]
    assert list(after_text.lengths) == [2, 2, 2] and list(after_text.zero_byte_ids) == [0]
    after_bos = candidates(layout, prev_is_boundary=True)
    assert list(after_bos.lengths) == [1, 2, 1]
    logq = spread_logprobs(0.5, 2, 4)
    assert np.exp(logq).sum() == pytest.approx(1.0) and logq[2] == -0.5
