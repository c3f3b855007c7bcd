"""Normalization audit of the legacy mixture: the total probability it implies at a position.

At a sampled scored position i (target t, previous token p, legacy PPM state S before t's
bytes, neural token distribution q over the vocabulary, gate parameters of the legacy mixture):

Byte level (the next byte b in 0..255; λ(S) = lambda_lo if confidence(S) >= threshold else
lambda_hi, replaced by 1 when the anti-hijack condition holds):
  - ppm_total          = Σ_b P_ppm(b | S)                        (legacy PPM alone; <= 1)
  - constant_total     = Σ_b [λ e^ℓt + (1-λ) P_ppm(b | S)]       (the rule as implemented: the
                          neural share ℓt = log q(t)/n(t) is the same for every candidate byte;
                          anti-hijack on -ℓt; = 256 λ e^ℓt + (1-λ) ppm_total)
  - nn_first_total     = Σ_b P1(b), P1(b) = Σ_{v: first byte of s(v) is b} q(v)^(1/n(v))
                          (the natural extension of SPEC 6.6(a): p^(1/n) charged to the first byte)
  - first_total        = Σ_b [λ_b P1(b) + (1-λ_b) P_ppm(b | S)], λ_b = 1 when -log P1(b) < 0.277
  - ppmd_total         = Σ_b P_ppmD(b | S): a true PPM-D with exclusion on the same counts (= 1)
Token level (what the legacy scorer would charge each candidate token v had it been realised):
  - token_total = Σ_{v: n(v) >= 1} Π_{j=1..n(v)} [λ_j q(v)^(1/n(v)) + (1-λ_j) P_ppm(c_j | S ⊕ c_1..c_{j-1})]
    with s(v) = c_1..c_n the bytes of v after p (SPEC 6.2: leading space iff has_leading_space[v]
    and p is not a boundary), S ⊕ c the state after the legacy full update with those bytes,
    λ_j the confidence gate of that state, and λ_j = 1 for all j when -log q(v)/n(v) < 0.277.
    Zero-byte candidates (boundary ids) are dropped by the legacy stream: their cost is 0, i.e.
    an implied probability of 1 each; `zero_byte_candidates` counts them (not in token_total).
A normalized model would give exactly 1 for each total; the legacy mixture does not (SPEC 6.6).

The neural q comes from the caller: real log-softmax rows at the sampled positions, or the
"spread" stand-in (q(t) = exp(-NLL_t), the rest uniform over the other ids) that needs only the
NLL dump: it matches the realised token's NLL, which is all the legacy mixture ever reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from parlm.ppm.byte_model import (apply_update, find_successors, insert_successors, legacy_confidence,
                                  legacy_logp, mix_log_weights, mix_logp, ppmd_distribution,
                                  roll_back_update, shift_window)
from parlm.ppm.bytestream import SPACE_BYTE, TokenByteLayout


@numba.njit(cache=True, inline="always")
def _mix_log(lam, nn_log_p, ppm_log_p):
    """log(λ e^ℓ + (1-λ) e^π) in the legacy scorer's exact arithmetic (byte_model.mix_logp)."""
    log_weight, log_one_minus = mix_log_weights(lam)
    return mix_logp(lam, log_weight, log_one_minus, nn_log_p, ppm_log_p)


@numba.njit(cache=True)
def _byte_level(slots, regions, contexts, packed, window_length, realised_ell, first_nn,
                lambda_hi, lambda_lo, conf_threshold, anti_hijack_nats, out):
    """out = [ppm_total, constant_total, nn_first_total, first_total, ppmd_total]."""
    order = contexts.shape[0] - 1
    successors = np.empty(order + 1, dtype=np.int64)
    confidence = legacy_confidence(slots, contexts, window_length)
    base = lambda_lo if confidence >= conf_threshold else lambda_hi
    constant_lambda = 1.0 if (anti_hijack_nats > 0.0 and -realised_ell < anti_hijack_nats) else base
    ppm_total = 0.0
    constant_total = 0.0
    nn_first_total = 0.0
    first_total = 0.0
    for b in range(256):
        find_successors(slots, regions, packed, window_length, b, successors)
        ppm_log_p, conf = legacy_logp(slots, contexts, successors, window_length)
        p = math.exp(ppm_log_p)
        ppm_total += p
        constant_total += constant_lambda * math.exp(realised_ell) + (1.0 - constant_lambda) * p
        nn_first_total += first_nn[b]
        lam = base
        if anti_hijack_nats > 0.0 and first_nn[b] > 0.0 and -math.log(first_nn[b]) < anti_hijack_nats:
            lam = 1.0
        first_total += lam * first_nn[b] + (1.0 - lam) * p
    distribution = np.empty(256, dtype=np.float64)
    ppmd_distribution(slots, regions, contexts, packed, window_length, distribution)
    out[0] = ppm_total
    out[1] = constant_total
    out[2] = nn_first_total
    out[3] = first_total
    out[4] = distribution.sum()


@numba.njit(cache=True)
def _token_level(slots, regions, contexts, packed, window_length, offsets, data, ell,
                 candidate_ids, realised, lambda_hi, lambda_lo, conf_threshold, anti_hijack_nats):
    """(Σ_v Π_j mix, log Π_j mix of the realised candidate) over sorted candidate strings; the
    shared prefixes are walked once (a depth-first trie walk with journaled updates)."""
    order = contexts.shape[0] - 1
    max_depth = 1
    for c in range(offsets.shape[0] - 1):
        max_depth = max(max_depth, offsets[c + 1] - offsets[c])
    ctx = np.empty((max_depth + 1, order + 1), dtype=np.int64)
    succ = np.empty((max_depth + 1, order + 1), dtype=np.int64)
    inserted = np.zeros((max_depth + 1, order + 1), dtype=np.bool_)
    saved = np.empty((max_depth + 1, order + 1, 2), dtype=np.int64)
    packed_at = np.empty(max_depth + 1, dtype=np.int64)
    length_at = np.empty(max_depth + 1, dtype=np.int64)
    base_lambda = np.empty(max_depth + 1, dtype=np.float64)
    ppm_log = np.empty(max_depth + 1, dtype=np.float64)
    path = np.empty(max_depth + 1, dtype=np.int64)
    for k in range(window_length + 1):
        ctx[0, k] = contexts[k]
    packed_at[0] = packed
    length_at[0] = window_length
    depth = 0
    total = 0.0
    realised_log = math.nan
    for c in range(offsets.shape[0] - 1):
        lo = offsets[c]
        n = offsets[c + 1] - lo
        common = 0
        while common < depth and common < n and path[common] == data[lo + common]:
            common += 1
        while depth > common:
            depth -= 1
            roll_back_update(slots, regions, ctx[depth], succ[depth], inserted[depth],
                             length_at[depth], saved[depth])
        while depth < n:
            b = np.int64(data[lo + depth])
            w = length_at[depth]
            insert_successors(slots, regions, packed_at[depth], w, b, succ[depth], inserted[depth])
            log_p, confidence = legacy_logp(slots, ctx[depth], succ[depth], w)
            ppm_log[depth] = log_p
            base_lambda[depth] = lambda_lo if confidence >= conf_threshold else lambda_hi
            apply_update(slots, ctx[depth], succ[depth], w, saved[depth])
            packed_at[depth + 1], length_at[depth + 1] = shift_window(
                packed_at[depth], w, b, order, ctx[depth], succ[depth], ctx[depth + 1])
            path[depth] = b
            depth += 1
        nn_log_p = ell[c]
        skip = anti_hijack_nats > 0.0 and -nn_log_p < anti_hijack_nats
        log_product = 0.0
        for j in range(n):
            log_product += _mix_log(1.0 if skip else base_lambda[j], nn_log_p, ppm_log[j])
        total += math.exp(log_product)
        if candidate_ids[c] == realised:
            realised_log = log_product
    while depth > 0:
        depth -= 1
        roll_back_update(slots, regions, ctx[depth], succ[depth], inserted[depth], length_at[depth],
                         saved[depth])
    return total, realised_log


@dataclass
class Candidates:
    """Candidate token byte strings after a previous token of one boundary kind, sorted."""

    offsets: np.ndarray
    data: np.ndarray
    token_ids: np.ndarray
    lengths: np.ndarray
    first_byte: np.ndarray
    zero_byte_ids: np.ndarray


def candidates(layout: TokenByteLayout, prev_is_boundary: bool) -> Candidates:
    """s(v) for every id with at least one byte, sorted bytewise (shared prefixes adjacent)."""
    strings = []
    zero = []
    for v in range(layout.vocab_size):
        s = layout.token_bytes(v)
        if layout.has_leading_space[v] and not prev_is_boundary:
            s = bytes([SPACE_BYTE]) + s
        if s:
            strings.append((s, v))
        else:
            zero.append(v)
    strings.sort()
    lengths = np.array([len(s) for s, _ in strings], dtype=np.int64)
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(s for s, _ in strings), dtype=np.uint8).copy()
    return Candidates(offsets, data, np.array([v for _, v in strings], dtype=np.int64), lengths,
                      np.array([s[0] for s, _ in strings], dtype=np.int64), np.array(zero, dtype=np.int64))


def spread_logprobs(nll_value: float, target: int, vocab_size: int) -> np.ndarray:
    """Stand-in log q: q(target) = exp(-nll), the remaining mass uniform over the other ids."""
    p = math.exp(-nll_value)
    rest = max(1.0 - p, 1e-300) / max(vocab_size - 1, 1)
    out = np.full(vocab_size, math.log(rest), dtype=np.float64)
    out[target] = -nll_value
    return out


AUDIT_FIELDS = ("ppm_total", "constant_total", "nn_first_total", "first_total", "ppmd_total",
                "token_total", "realised_log_product")


@dataclass
class AuditResult:
    """Per sampled position (arrays aligned with `positions`); module docstring defines each."""

    positions: np.ndarray
    ppm_total: np.ndarray
    constant_total: np.ndarray
    nn_first_total: np.ndarray
    first_total: np.ndarray
    ppmd_total: np.ndarray
    token_total: np.ndarray
    zero_byte_candidates: np.ndarray
    realised_log_product: np.ndarray
    neural: str
    notes: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Quantiles of every total (JSON-ready)."""
        out = {"positions": int(len(self.positions)), "neural": self.neural, "normalized": False}
        for name in ("ppm_total", "constant_total", "nn_first_total", "first_total", "ppmd_total",
                     "token_total"):
            values = getattr(self, name)
            if len(values):
                q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
                out[name] = {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]),
                             "p90": float(q[3]), "max": float(q[4]), "mean": float(values.mean())}
        return out


class PositionAuditor:
    """Audits legacy states at chosen positions (`legacy_mixture` calls it mid-stream)."""

    def __init__(self, layout: TokenByteLayout, target, prev, nll, positions, token_logprobs=None,
                 **params):
        self.layout, self.target, self.prev, self.nll = layout, target, prev, nll
        self.positions = np.asarray(positions, dtype=np.int64)
        if len(self.positions) and (np.any(np.diff(self.positions) <= 0) or self.positions[0] < 0
                                    or self.positions[-1] >= len(target)):
            raise ValueError("audit positions must be strictly increasing indices into the scored positions")
        if token_logprobs is not None and len(token_logprobs) != len(self.positions):
            raise ValueError(f"token_logprobs has {len(token_logprobs)} rows for {len(self.positions)} positions")
        self.token_logprobs = token_logprobs
        self.params = params
        self.sets = {False: candidates(layout, False), True: candidates(layout, True)}
        self.values = {name: np.zeros(len(self.positions)) for name in AUDIT_FIELDS}
        self.zero_byte = np.zeros(len(self.positions), dtype=np.int64)
        self.done = 0

    def audit(self, slots, regions, contexts, packed: int, window_length: int) -> None:
        """Audit the next position from the legacy state just before its bytes."""
        s = self.done
        position = int(self.positions[s])
        layout, vocab = self.layout, self.layout.vocab_size
        p, t = int(self.prev[position]), int(self.target[position])
        prev_boundary = bool(p < 0 or p >= vocab or layout.is_boundary[p])
        cand = self.sets[prev_boundary]
        if self.token_logprobs is not None:
            logq = np.asarray(self.token_logprobs[s], dtype=np.float64)
        else:
            logq = spread_logprobs(float(self.nll[position]), t, vocab)
        ell = logq[cand.token_ids] / cand.lengths
        first_nn = np.zeros(256)
        np.add.at(first_nn, cand.first_byte, np.exp(ell))
        n_t = int(layout.byte_counts(np.array([t]), np.array([p]))[0])
        realised_ell = logq[t] / n_t if (n_t > 0 and 0 <= t < vocab) else 0.0
        hi, lo = self.params["lambda_hi"], self.params["lambda_lo"]
        thr, anti = self.params["conf_threshold"], self.params["anti_hijack_nats"]
        byte_out = np.zeros(5)
        _byte_level(slots, regions, contexts, packed, window_length, realised_ell, first_nn,
                    hi, lo, thr, anti, byte_out)
        total, realised_log = _token_level(slots, regions, contexts, packed, window_length,
                                           cand.offsets, cand.data, ell, cand.token_ids, t,
                                           hi, lo, thr, anti)
        for c, name in enumerate(AUDIT_FIELDS[:5]):
            self.values[name][s] = byte_out[c]
        self.values["token_total"][s] = total
        self.values["realised_log_product"][s] = realised_log
        self.zero_byte[s] = len(cand.zero_byte_ids)
        self.done += 1

    def result(self) -> AuditResult:
        return AuditResult(positions=self.positions, zero_byte_candidates=self.zero_byte,
                           neural="model" if self.token_logprobs is not None else "spread",
                           **self.values)
