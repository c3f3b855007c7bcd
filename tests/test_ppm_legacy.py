"""The fast legacy mixture against a slow, obvious re-implementation of SPEC 6.2-6.4."""
from __future__ import annotations

import math

import numpy as np
import pytest

from parlm.ppm import TokenByteLayout, legacy_mixture
from parlm.ppm.reference_mixture import LAMBDA_HI, LAMBDA_LO, LAMBDA_SKIP


# ---------------------------------------------------------------------------------------------
# Slow reference: written from SPEC 6.2-6.4 only (dict of dicts, one byte at a time).
def slow_legacy(target, prev, nll, token_bytes, has_space, is_boundary, order=5, lambda_hi=0.9,
                lambda_lo=0.05, conf_threshold=0.9, anti_hijack=0.277):
    vocab = len(token_bytes)
    stream = []  # (byte, per-byte neural log-prob)
    for t, p, loss in zip(target, prev, nll):
        t, p = int(t), int(p)
        piece = token_bytes[t] if 0 <= t < vocab else b""
        space = bool(has_space[t]) if 0 <= t < vocab else False
        prev_boundary = True if (p < 0 or p >= vocab) else bool(is_boundary[p])
        data = (b" " if space and not prev_boundary else b"") + piece
        if not data:
            continue
        for byte in data:
            stream.append((byte, -float(loss) / len(data)))
    contexts: dict[bytes, dict[int, int]] = {}
    history = b""
    mix = ppm = nn = 0.0
    skips = 0
    for byte, ell in stream:
        window = history[-order:] if order > 0 else b""
        escape = 0.0
        confidence = None
        log_p = None
        for k in range(len(window), -1, -1):
            ctx = window[len(window) - k:]
            table = contexts.get(ctx)
            if table is None:
                continue
            n = sum(table.values())
            u = len(table)
            if confidence is None:
                confidence = max(table.values()) / (n + u)
            if byte in table:
                log_p = escape + math.log(table[byte] / (n + u))
                break
            escape += math.log(u / (n + u))
        if log_p is None:
            log_p = escape + math.log(1 / 256)
        lam = lambda_lo if (confidence or 0.0) >= conf_threshold else lambda_hi
        if anti_hijack > 0 and -ell < anti_hijack:
            lam = 1.0
            skips += 1
        if lam >= 1.0:
            log_mix = ell
        elif lam <= 0.0:
            log_mix = log_p
        else:
            a, c = math.log(lam) + ell, math.log(1 - lam) + log_p
            log_mix = max(a, c) + math.log1p(math.exp(-abs(a - c)))
        mix -= log_mix
        ppm -= log_p
        nn -= ell
        for k in range(len(window) + 1):
            ctx = window[len(window) - k:]
            contexts.setdefault(ctx, {})
            contexts[ctx][byte] = contexts[ctx].get(byte, 0) + 1
        history = (history + bytes([byte]))[-max(order, 1):]
    n_bytes = len(stream)
    if n_bytes == 0:
        return dict(mix=0.0, ppm=0.0, nn=0.0, bytes=0, skips=0)
    ln2 = math.log(2)
    return dict(mix=mix / n_bytes / ln2, ppm=ppm / n_bytes / ln2, nn=nn / n_bytes / ln2,
                bytes=n_bytes, skips=skips)


# ---------------------------------------------------------------------------------------------
def random_vocab(rng, vocab_size=40, alphabet=b"ab c\xc3\xa9\n"):
    """Ids 0..2 boundary (pad/bos/eos), 3..10 byte fallback, the rest short pieces, some with ▁."""
    token_bytes, has_space, is_boundary = [], [], []
    for token_id in range(vocab_size):
        if token_id < 3:
            token_bytes.append(b"")
            has_space.append(False)
            is_boundary.append(True)
        elif token_id < 11:
            token_bytes.append(bytes([int(rng.integers(0, 256))]))
            has_space.append(False)
            is_boundary.append(False)
        else:
            length = int(rng.integers(0, 5))
            piece = bytes(alphabet[int(i)] for i in rng.integers(0, len(alphabet), size=length))
            space = bool(rng.random() < 0.4) or length == 0
            token_bytes.append(piece)
            has_space.append(space)
            is_boundary.append(False)
    return token_bytes, np.array(has_space), np.array(is_boundary)


def random_stream(rng, vocab_size, n_tokens):
    target = rng.integers(0, vocab_size, size=n_tokens)
    # repetitive structure so high-order contexts and confident predictions happen
    motif = rng.integers(0, vocab_size, size=7)
    repeat = rng.random(n_tokens) < 0.6
    target[repeat] = motif[np.arange(n_tokens)[repeat] % 7]
    target[rng.random(n_tokens) < 0.03] = 1  # BOS
    prev = np.concatenate([[1], target[:-1]])
    prev[rng.random(n_tokens) < 0.02] = -1  # no previous token / out of range
    target[rng.random(n_tokens) < 0.01] = vocab_size + 3  # out-of-range target: no bytes
    nll = rng.exponential(2.0, size=n_tokens)
    tiny = rng.random(n_tokens) < 0.3
    nll[tiny] = rng.uniform(0, 0.5, size=int(tiny.sum()))  # trips the anti-hijack gate
    return target, prev, nll


def rel_close(a, b, tol=1e-9):
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-300)


@pytest.mark.parametrize("case", range(12))
def test_parity_with_slow_reference(case):
    rng = np.random.default_rng(1000 + case)
    token_bytes, has_space, is_boundary = random_vocab(rng, vocab_size=int(rng.integers(12, 60)))
    target, prev, nll = random_stream(rng, len(token_bytes), int(rng.integers(1, 700)))
    order = [5, 5, 5, 1, 2, 3, 4, 6, 0, 5, 5, 5][case]
    params = dict(lambda_hi=float(rng.choice([0.9, 0.7])), lambda_lo=float(rng.choice([0.05, 0.0, 0.2])),
                  conf_threshold=float(rng.choice([0.9, 0.5, 0.3])),
                  anti_hijack=float(rng.choice([0.277, 0.0, 0.6])))
    expect = slow_legacy(target, prev, nll, token_bytes, has_space, is_boundary, order=order, **params)
    layout = TokenByteLayout.from_tables(token_bytes, has_space, is_boundary)
    got = legacy_mixture(target, prev, nll, layout, order=order, lambda_hi=params["lambda_hi"],
                         lambda_lo=params["lambda_lo"], conf_threshold=params["conf_threshold"],
                         anti_hijack_nats=params["anti_hijack"])
    assert got.bytes == expect["bytes"]
    assert got.gate_skip_count == expect["skips"]
    assert rel_close(got.mix_bpb, expect["mix"])
    assert rel_close(got.ppm_only_bpb, expect["ppm"])
    assert rel_close(got.nn_only_bpb, expect["nn"])


def test_parity_with_table_growth_and_chunks():
    """A stream large enough to rehash the table several times, scored in small chunks."""
    rng = np.random.default_rng(7)
    token_bytes, has_space, is_boundary = random_vocab(rng, vocab_size=300,
                                                       alphabet=bytes(range(32, 127)))
    target, prev, nll = random_stream(rng, 300, 6000)
    expect = slow_legacy(target, prev, nll, token_bytes, has_space, is_boundary)
    layout = TokenByteLayout.from_tables(token_bytes, has_space, is_boundary)
    got = legacy_mixture(target, prev, nll, layout, chunk_tokens=777)
    assert got.table_rows > 2000  # grew from the first guess
    assert rel_close(got.mix_bpb, expect["mix"]) and rel_close(got.ppm_only_bpb, expect["ppm"])
    assert got.gate_skip_count == expect["skips"]


def test_subset_is_first_positions():
    rng = np.random.default_rng(3)
    token_bytes, has_space, is_boundary = random_vocab(rng)
    target, prev, nll = random_stream(rng, len(token_bytes), 500)
    layout = TokenByteLayout.from_tables(token_bytes, has_space, is_boundary)
    sub = legacy_mixture(target, prev, nll, layout, subset_tokens=200)
    head = legacy_mixture(target[:200], prev[:200], nll[:200], layout)
    assert sub.mix_bpb == head.mix_bpb and sub.tokens == 200


def test_hand_worked_two_bytes():
    """Token "ab" with NLL 2 ln 2 after BOS: ℓ = -ln 2 per byte; byte 'a' has no context
    (π = ln 1/256, confidence 0 -> λ 0.9); byte 'b' sees order-1 'a' never seen and order 0 {a:1}:
    n=1, u=1 -> escape 1/2 then uniform: π = ln(1/2 · 1/256), confidence 1/2 -> λ 0.9."""
    layout = TokenByteLayout.from_tables([b"", b"", b"ab"], [False, False, False], [True, True, False])
    got = legacy_mixture(np.array([2]), np.array([1]), np.array([2 * math.log(2)]), layout,
                         anti_hijack_nats=0.277)
    ell = -math.log(2)
    pi = [math.log(1 / 256), math.log(0.5 / 256)]
    mix = [math.log(0.9 * math.exp(ell) + 0.1 * math.exp(p)) for p in pi]
    assert got.bytes == 2
    assert got.nn_only_bpb == pytest.approx(1.0, rel=1e-12)
    assert got.ppm_only_bpb == pytest.approx(-sum(pi) / 2 / math.log(2), rel=1e-12)
    assert got.mix_bpb == pytest.approx(-sum(mix) / 2 / math.log(2), rel=1e-12)
    assert got.gate_skip_count == 0


def test_anti_hijack_skips_confident_bytes():
    """NLL 0.1 over a 1-byte token: -ℓ = 0.1 < 0.277, so λ = 1 and mix equals the NN exactly."""
    layout = TokenByteLayout.from_tables([b"", b"x"], [False, False], [True, False])
    got = legacy_mixture(np.array([1, 1, 1]), np.array([0, 1, 1]), np.array([0.1, 0.1, 0.1]), layout)
    assert got.gate_skip_count == 3 and got.gate_skip == 1.0
    assert got.mix_bpb == got.nn_only_bpb
    assert list(got.lambda_counts) == [0, 0, 3]


def test_traces_and_aggregates_are_consistent():
    rng = np.random.default_rng(11)
    token_bytes, has_space, is_boundary = random_vocab(rng)
    target, prev, nll = random_stream(rng, len(token_bytes), 400)
    layout = TokenByteLayout.from_tables(token_bytes, has_space, is_boundary)
    got = legacy_mixture(target, prev, nll, layout, trace_max=10**6, curve_points=10**6)
    stream = layout.byte_stream(target, prev, nll)
    trace = got.trace
    assert len(trace["byte"]) == got.bytes == len(stream)
    np.testing.assert_array_equal(trace["byte"], stream.values)
    np.testing.assert_array_equal(trace["token_position"], stream.token_index)
    np.testing.assert_array_equal(trace["position_in_token"], stream.position_in_token)
    np.testing.assert_allclose(trace["nn_logp"], stream.nn_logp, rtol=1e-6)
    assert got.mix_bpb == pytest.approx(-trace["mix_logp"].astype(np.float64).sum() / got.bytes / math.log(2), rel=1e-6)
    assert got.curve[-1, 0] == got.bytes
    assert got.curve[-1, 1] == pytest.approx(got.mix_bpb * got.bytes * math.log(2), rel=1e-12)
    assert got.confidence_histogram.sum() == got.bytes
    assert got.position_stats.sum() == got.bytes
    assert got.token_stats[:, LAMBDA_SKIP].sum() == got.gate_skip_count
    counts = np.bincount(trace["lambda_choice"], minlength=3)
    assert list(counts) == list(got.lambda_counts)
    assert counts[LAMBDA_LO] + counts[LAMBDA_HI] + counts[LAMBDA_SKIP] == got.bytes


def test_empty_and_zero_byte_streams():
    layout = TokenByteLayout.from_tables([b"", b"a"], [False, False], [True, False])
    got = legacy_mixture(np.array([0, 0]), np.array([1, 1]), np.array([1.0, 2.0]), layout)
    assert got.bytes == 0 and got.mix_bpb == 0.0 and got.tokens_scored == 0
    with pytest.raises(ValueError, match="order"):
        legacy_mixture(np.array([1]), np.array([0]), np.array([1.0]), layout, order=7)
