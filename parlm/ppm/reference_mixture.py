"""The legacy PPM byte mixture of PR #1858 (`_ppm_mixture_bpb`), reproduced exactly and fast.

NOT A NORMALIZED DISTRIBUTION. The numbers this computes are what the reference logs, not a
valid bits-per-byte (SPEC 6.6, 8.4): the neural side p_tok^(1/n) is not a distribution over
bytes, the anti-hijack gate picks the mixture weight from the realised token's own
probability, and the PPM side (escape method C without exclusion) is sub-normalised.
`parlm.ppm.audit` measures how far from 1 the implied totals are.

Per byte of the SPEC 6.2 stream, with neural log-prob ℓ = -NLL_t/n and PPM log-prob π
(`byte_model.legacy_logp`, confidence from the first existing context):
    λ = lambda_lo if confidence >= conf_threshold else lambda_hi      (binary gate)
    λ = 1 if -ℓ < anti_hijack_nats  (counted as a gate skip; <= 0 disables the gate)
    log p_mix = π if λ <= 0, ℓ if λ >= 1, else LSE(log λ + ℓ, log(1-λ) + π)
    (LSE(a, c) = max(a, c) + log1p(exp(-|a - c|)), the reference's stable form)
and then the PPM counts are updated with the byte. Results:
    mix_bpb = Σ -log p_mix / (bytes · ln 2), ppm_only_bpb = Σ -π / (...), nn_only_bpb = Σ -ℓ / (...)
summed in stream order in float64, as the reference does.

The kernel walks tokens and expands their bytes on the fly (no per-byte arrays), keeps all
counts in one hash table (`counts.py`), and also gathers exact aggregates and a subsampled
per-byte trace for plots.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from parlm.ppm.byte_model import apply_update_unjournaled as apply_update
from parlm.ppm.byte_model import insert_successors, legacy_logp, shift_window
from parlm.ppm.audit import AuditResult, PositionAuditor
from parlm.ppm.bytestream import TokenByteLayout
from parlm.ppm.counts import CAPACITY, DENSE_MAX_LENGTH, MAX_ORDER, USED, CountTable, context_rows, prefetch_successors

LOG2 = math.log(2.0)
NOT_NORMALIZED_NOTE = (
    "legacy PR #1858 byte mixture: NOT a normalized distribution and not a valid BPB "
    "(SPEC 6.6): p_tok^(1/n) per byte is not a byte distribution, the anti-hijack gate uses the "
    "realised token's probability, and the PPM (method C, no exclusion) is sub-normalised")
CONFIDENCE_BINS = 100
MAX_TOKEN_POSITION = 32  # positions >= 31 share the last bucket
LAMBDA_LO, LAMBDA_HI, LAMBDA_SKIP = 0, 1, 2
# state vector of the kernel
_WINDOW, _WINDOW_LENGTH, _BYTES, _SKIPS, _LO, _HI, _TRACE_COUNT, _CURVE_COUNT = range(8)
TRACE_FLOAT_FIELDS = ("confidence", "lambda", "nn_logp", "ppm_logp", "mix_logp")
TRACE_INT_FIELDS = ("byte_index", "token_position", "token_id", "position_in_token", "byte",
                    "lambda_choice")
TRACE_INT_DTYPES = {"byte_index": np.int32, "token_position": np.int32, "token_id": np.int32,
                    "position_in_token": np.int16, "byte": np.uint8, "lambda_choice": np.int8}


PREFETCH_DISTANCE = 4  # bytes of look-ahead for the hash-row prefetch


@numba.njit(cache=True, inline="always")
def token_span(i, target, prev, offsets, has_space_table, boundary_table):
    """(first byte offset in `data`, n bytes, include_space) of scored position i (SPEC 6.2)."""
    vocab = offsets.shape[0] - 1
    t = target[i]
    p = prev[i]
    lo = 0
    hi = 0
    has_space = False
    if t >= 0 and t < vocab:
        lo = offsets[t]
        hi = offsets[t + 1]
        has_space = has_space_table[t]
    prev_boundary = True
    if p >= 0 and p < vocab:
        prev_boundary = boundary_table[p]
    include_space = 1 if (has_space and not prev_boundary) else 0
    return lo, hi - lo + include_space, include_space


@numba.njit(cache=True, inline="always")
def token_byte(data, lo, j, include_space):
    """Byte j of a token's stream bytes (the leading space first when included)."""
    if include_space == 1 and j == 0:
        return np.int64(0x20)
    return np.int64(data[lo + j - include_space])


@numba.njit(cache=True)
def _legacy_kernel(target, prev, nll, offsets, data, has_space_table, boundary_table,
                   order, lambda_hi, lambda_lo, conf_threshold, anti_hijack_nats,
                   slots, regions, room_per_token, contexts, state, sums,
                   start, stop, confidence_hist, position_stats, token_stats,
                   curve, curve_every, trace_float, trace_int, trace_stride):
    """Score tokens [start, stop); returns the index of the first token not processed (early
    when the table needs to grow). All running state lives in the array arguments."""
    successors = np.empty(order + 1, dtype=np.int64)
    inserted = np.empty(order + 1, dtype=np.bool_)
    next_contexts = np.empty(order + 1, dtype=np.int64)
    packed = state[_WINDOW]
    window_length = state[_WINDOW_LENGTH]
    log_lambda_lo = math.log(lambda_lo) if lambda_lo > 0.0 else 0.0
    log_one_minus_lo = math.log(1.0 - lambda_lo) if lambda_lo < 1.0 else 0.0
    log_lambda_hi = math.log(lambda_hi) if lambda_hi > 0.0 else 0.0
    log_one_minus_hi = math.log(1.0 - lambda_hi) if lambda_hi < 1.0 else 0.0
    n_curve = curve.shape[0]
    n_trace = trace_float.shape[0]
    n_bins = confidence_hist.shape[0]
    last_position = position_stats.shape[0] - 1
    bytes_done = state[_BYTES]
    skip_count = state[_SKIPS]
    lo_count = state[_LO]
    hi_count = state[_HI]
    trace_count = state[_TRACE_COUNT]
    curve_count = state[_CURVE_COUNT]
    # next byte index to trace / to record on the curve (no integer division per byte)
    next_trace = -(-bytes_done // trace_stride) * trace_stride
    next_curve = (bytes_done // curve_every + 1) * curve_every
    mix_nll = sums[0]
    ppm_nll = sums[1]
    nn_nll = sums[2]
    # Look-ahead cursor: prefetches the hashed rows byte t + PREFETCH_DISTANCE will probe, so
    # their cache misses overlap with the work on byte t. It changes speed only, never results.
    # (Written out inline twice: a shared tuple-returning helper is slower in numba.)
    ahead_i = start
    ahead_j = 0
    ahead_lo, ahead_n, ahead_space = 0, 0, 0
    if start < stop:
        ahead_lo, ahead_n, ahead_space = token_span(start, target, prev, offsets, has_space_table, boundary_table)
    ahead_packed = packed
    ahead_length = window_length
    for step in range(PREFETCH_DISTANCE + 1):
        while ahead_i < stop and ahead_j >= ahead_n:
            ahead_i += 1
            ahead_j = 0
            if ahead_i < stop:
                ahead_lo, ahead_n, ahead_space = token_span(ahead_i, target, prev, offsets, has_space_table, boundary_table)
        if ahead_i >= stop or step == PREFETCH_DISTANCE:
            break
        ahead_byte = token_byte(data, ahead_lo, ahead_j, ahead_space)
        prefetch_successors(slots, regions, ahead_packed, ahead_length, ahead_byte)
        ahead_packed = (ahead_packed << 8) | ahead_byte
        ahead_length = ahead_length + 1 if ahead_length < order else order
        ahead_j += 1
    tokens_until_check = 0
    i = start
    while i < stop:
        if tokens_until_check == 0:  # each token adds at most room_per_token rows per region
            headroom = np.int64(1) << 62
            for length in range(DENSE_MAX_LENGTH + 1, regions.shape[0]):
                headroom = min(headroom, regions[length, CAPACITY] - regions[length, USED])
            tokens_until_check = headroom // room_per_token - 1
            if tokens_until_check <= 0:
                break
        tokens_until_check -= 1
        t = target[i]
        lo, n_bytes, include_space = token_span(i, target, prev, offsets, has_space_table, boundary_table)
        if n_bytes == 0:
            i += 1
            continue
        nn_log_p = (-nll[i]) / n_bytes
        for j in range(n_bytes):
            b = token_byte(data, lo, j, include_space)
            if ahead_i < stop:
                ahead_byte = token_byte(data, ahead_lo, ahead_j, ahead_space)
                prefetch_successors(slots, regions, ahead_packed, ahead_length, ahead_byte)
                ahead_packed = (ahead_packed << 8) | ahead_byte
                ahead_length = ahead_length + 1 if ahead_length < order else order
                ahead_j += 1
                while ahead_i < stop and ahead_j >= ahead_n:
                    ahead_i += 1
                    ahead_j = 0
                    if ahead_i < stop:
                        ahead_lo, ahead_n, ahead_space = token_span(ahead_i, target, prev, offsets, has_space_table, boundary_table)
            insert_successors(slots, regions, packed, window_length, b, successors, inserted)
            ppm_log_p, confidence = legacy_logp(slots, contexts, successors, window_length)
            if confidence >= conf_threshold:
                lam = lambda_lo
                choice = 0
            else:
                lam = lambda_hi
                choice = 1
            skipped = anti_hijack_nats > 0.0 and -nn_log_p < anti_hijack_nats
            if skipped:
                lam = 1.0
                choice = 2
            if lam <= 0.0:
                log_mix = ppm_log_p
            elif lam >= 1.0:
                log_mix = nn_log_p
            else:
                if choice == 0:
                    a = log_lambda_lo + nn_log_p
                    c = log_one_minus_lo + ppm_log_p
                else:
                    a = log_lambda_hi + nn_log_p
                    c = log_one_minus_hi + ppm_log_p
                log_mix = max(a, c) + math.log1p(math.exp(-abs(a - c)))
            mix_nll -= log_mix
            ppm_nll -= ppm_log_p
            nn_nll -= nn_log_p
            # aggregates
            if choice == 0:
                lo_count += 1
            elif choice == 1:
                hi_count += 1
            else:
                skip_count += 1
            bin_index = int(confidence * n_bins)
            if bin_index >= n_bins:
                bin_index = n_bins - 1
            confidence_hist[bin_index] += 1
            position = j if j < last_position else last_position
            position_stats[position, choice] += 1
            token_stats[t, choice] += 1
            if bytes_done == next_trace:
                next_trace += trace_stride
                if trace_count < n_trace:
                    trace_float[trace_count, 0] = confidence
                    trace_float[trace_count, 1] = lam
                    trace_float[trace_count, 2] = nn_log_p
                    trace_float[trace_count, 3] = ppm_log_p
                    trace_float[trace_count, 4] = log_mix
                    trace_int[trace_count, 0] = bytes_done
                    trace_int[trace_count, 1] = i
                    trace_int[trace_count, 2] = t
                    trace_int[trace_count, 3] = j
                    trace_int[trace_count, 4] = b
                    trace_int[trace_count, 5] = choice
                    trace_count += 1
            bytes_done += 1
            if bytes_done == next_curve:
                next_curve += curve_every
                if curve_count < n_curve:
                    curve[curve_count, 0] = bytes_done
                    curve[curve_count, 1] = mix_nll
                    curve[curve_count, 2] = ppm_nll
                    curve[curve_count, 3] = nn_nll
                    curve_count += 1
            # update, then shift the window
            apply_update(slots, contexts, successors, window_length)
            packed, window_length = shift_window(packed, window_length, b, order, contexts,
                                                 successors, next_contexts)
            for k in range(window_length + 1):
                contexts[k] = next_contexts[k]
        i += 1
    state[_WINDOW] = packed
    state[_WINDOW_LENGTH] = window_length
    state[_BYTES] = bytes_done
    state[_SKIPS] = skip_count
    state[_LO] = lo_count
    state[_HI] = hi_count
    state[_TRACE_COUNT] = trace_count
    state[_CURVE_COUNT] = curve_count
    sums[0] = mix_nll
    sums[1] = ppm_nll
    sums[2] = nn_nll
    return i


@dataclass
class LegacyResult:
    """What `legacy_mixture` measured. NOT a normalized distribution (module docstring).

    Aggregates are exact over all bytes: `lambda_counts` (lo, hi, skip), `confidence_histogram`
    (CONFIDENCE_BINS bins over [0, 1)), `position_stats[j, choice]` (bytes at position j within
    their token, last row = 31 and beyond), `token_stats[id, choice]`, `curve` rows (bytes,
    cumulative mix/ppm/nn NLL in nats) every `curve_every` bytes. `trace` holds every
    `trace_stride`-th byte (TRACE_FLOAT_FIELDS / TRACE_INT_FIELDS)."""

    mix_bpb: float
    ppm_only_bpb: float
    nn_only_bpb: float
    gate_skip: float
    gate_skip_count: int
    bytes: int
    tokens: int
    tokens_scored: int
    seconds: float
    order: int
    lambda_hi: float
    lambda_lo: float
    conf_threshold: float
    anti_hijack_nats: float
    lambda_counts: np.ndarray
    confidence_histogram: np.ndarray
    position_stats: np.ndarray
    token_stats: np.ndarray
    curve: np.ndarray
    curve_every: int
    trace: dict[str, np.ndarray] = field(default_factory=dict)
    trace_stride: int = 1
    table_rows: int = 0
    table_bytes: int = 0
    audit: Any = None

    def summary(self) -> dict[str, Any]:
        """The JSON-ready headline numbers (with the not-normalized flag and note)."""
        return {
            "mix_bpb": self.mix_bpb, "ppm_only_bpb": self.ppm_only_bpb,
            "nn_only_bpb": self.nn_only_bpb, "gate_skip": self.gate_skip,
            "gate_skip_count": self.gate_skip_count, "bytes": self.bytes,
            "tokens": self.tokens, "tokens_scored": self.tokens_scored,
            "seconds": self.seconds, "order": self.order, "lambda_hi": self.lambda_hi,
            "lambda_lo": self.lambda_lo, "conf_threshold": self.conf_threshold,
            "anti_hijack_nats": self.anti_hijack_nats,
            "lambda_lo_fraction": float(self.lambda_counts[0]) / max(self.bytes, 1),
            "lambda_hi_fraction": float(self.lambda_counts[1]) / max(self.bytes, 1),
            "table_rows": self.table_rows, "table_bytes": self.table_bytes,
            "normalized": False, "note": NOT_NORMALIZED_NOTE,
        }


def legacy_mixture(target, prev, nll, layout: TokenByteLayout, *, order: int = 5,
                   lambda_hi: float = 0.9, lambda_lo: float = 0.05, conf_threshold: float = 0.9,
                   anti_hijack_nats: float = 0.277, subset_tokens: int = 0,
                   trace_max: int = 1_000_000, curve_points: int = 2000,
                   chunk_tokens: int = 2_000_000, progress: bool = False,
                   audit_positions=None, audit_logprobs=None) -> LegacyResult:
    """Run the PR #1858 byte mixture over scored positions (`target`, `prev` ids, `nll` nats,
    in stream order). `subset_tokens` > 0 keeps only the first that many positions (the
    reference's PPM_SUBSET_TOKENS). NOT a normalized distribution (module docstring).

    mix_bpb = Σ -log p_mix / (B ln 2), ppm_only_bpb = Σ -π / (B ln 2), nn_only_bpb = Σ -ℓ / (B ln 2)
    over the B bytes of SPEC 6.2; gate_skip = anti-hijack skips / B. With `audit_positions`
    (strictly increasing indices, after subsetting), the normalization audit of
    `parlm.ppm.audit` runs at each of them from the live state (`audit_logprobs`: optional
    log q rows per audited position) and lands in `result.audit`.
    """
    if not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order={order} is not supported: the byte-string table holds contexts "
                         f"of at most {MAX_ORDER} bytes (order 0..{MAX_ORDER})")
    target = np.ascontiguousarray(np.asarray(target, dtype=np.int64))
    prev = np.ascontiguousarray(np.asarray(prev, dtype=np.int64))
    nll = np.ascontiguousarray(np.asarray(nll, dtype=np.float64))
    if not target.shape == prev.shape == nll.shape or target.ndim != 1:
        raise ValueError(f"target {target.shape}, prev {prev.shape} and nll {nll.shape} must be "
                         f"1-D arrays of one length")
    if subset_tokens and subset_tokens > 0:
        target, prev, nll = target[:subset_tokens], prev[:subset_tokens], nll[:subset_tokens]
    started = time.perf_counter()
    counts_per_token = layout.byte_counts(target, prev)
    total_bytes = int(counts_per_token.sum())
    if total_bytes >= 2**31 - 1:
        raise ValueError(f"{total_bytes} bytes exceed the int32-safe count range of the tables")
    tokens_scored = int(np.count_nonzero(counts_per_token))

    table = CountTable(order, total_bytes)
    contexts = np.zeros(order + 1, dtype=np.int64)
    state = np.zeros(8, dtype=np.int64)
    context_rows(table.slots, table.regions, 0, 0, contexts)
    sums = np.zeros(3, dtype=np.float64)
    vocab = max(layout.vocab_size, int(target.max(initial=-1)) + 1)
    confidence_hist = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
    position_stats = np.zeros((MAX_TOKEN_POSITION, 3), dtype=np.int64)
    token_stats = np.zeros((vocab, 3), dtype=np.int64)
    curve_every = max(1, -(-total_bytes // max(curve_points, 1)))
    curve = np.zeros((total_bytes // curve_every + 1, 4), dtype=np.float64)
    trace_stride = max(1, -(-total_bytes // max(trace_max, 1)))
    n_trace = -(-total_bytes // trace_stride) if trace_max > 0 else 0
    trace_float = np.zeros((n_trace, len(TRACE_FLOAT_FIELDS)), dtype=np.float64)
    trace_int = np.zeros((n_trace, len(TRACE_INT_FIELDS)), dtype=np.int64)
    room_per_token = layout.max_token_bytes + 1  # new rows per region per token, at most

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(target), desc="ppm legacy", unit="tok", unit_scale=True)
    auditor = None
    if audit_positions is not None:
        auditor = PositionAuditor(layout, target, prev, nll, audit_positions, audit_logprobs,
                                  order=order, lambda_hi=float(lambda_hi), lambda_lo=float(lambda_lo),
                                  conf_threshold=float(conf_threshold),
                                  anti_hijack_nats=float(anti_hijack_nats))
    position = 0
    while position < len(target):
        stop = min(len(target), position + chunk_tokens)
        if table.ensure_room(room_per_token * 64):  # rehashed: slot indices moved
            context_rows(table.slots, table.regions, int(state[_WINDOW]), int(state[_WINDOW_LENGTH]),
                         contexts)
        if auditor is not None and auditor.done < len(auditor.positions):
            next_audit = int(auditor.positions[auditor.done])
            if next_audit == position:
                auditor.audit(table.slots, table.regions, contexts, int(state[_WINDOW]),
                              int(state[_WINDOW_LENGTH]))
                continue
            stop = min(stop, next_audit)
        reached = _legacy_kernel(
            target, prev, nll, layout.offsets, layout.data, layout.has_leading_space,
            layout.is_boundary, order, float(lambda_hi), float(lambda_lo), float(conf_threshold),
            float(anti_hijack_nats), table.slots, table.regions, room_per_token, contexts, state, sums, position, stop, confidence_hist,
            position_stats, token_stats, curve, curve_every, trace_float, trace_int, trace_stride)
        if bar is not None:
            bar.update(reached - position)
        position = reached
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    if auditor is not None:
        while auditor.done < len(auditor.positions):  # positions at the very end
            auditor.audit(table.slots, table.regions, contexts, int(state[_WINDOW]), int(state[_WINDOW_LENGTH]))

    if total_bytes == 0:
        mix_bpb = ppm_bpb = nn_bpb = 0.0
    else:
        mix_bpb = sums[0] / total_bytes / LOG2
        ppm_bpb = sums[1] / total_bytes / LOG2
        nn_bpb = sums[2] / total_bytes / LOG2
    n_trace_used = int(state[_TRACE_COUNT])
    trace = {name: trace_float[:n_trace_used, c].astype(np.float32)
             for c, name in enumerate(TRACE_FLOAT_FIELDS)}
    trace.update({name: trace_int[:n_trace_used, c].astype(TRACE_INT_DTYPES[name])
                  for c, name in enumerate(TRACE_INT_FIELDS)})
    skips = int(state[_SKIPS])
    return LegacyResult(
        mix_bpb=float(mix_bpb), ppm_only_bpb=float(ppm_bpb), nn_only_bpb=float(nn_bpb),
        gate_skip=skips / total_bytes if total_bytes else 0.0, gate_skip_count=skips,
        bytes=total_bytes, tokens=int(len(target)), tokens_scored=tokens_scored, seconds=seconds,
        order=order, lambda_hi=float(lambda_hi), lambda_lo=float(lambda_lo),
        conf_threshold=float(conf_threshold), anti_hijack_nats=float(anti_hijack_nats),
        lambda_counts=np.array([state[_LO], state[_HI], state[_SKIPS]], dtype=np.int64),
        confidence_histogram=confidence_hist, position_stats=position_stats,
        token_stats=token_stats, curve=curve[: int(state[_CURVE_COUNT])], curve_every=curve_every,
        trace=trace, trace_stride=trace_stride, table_rows=table.rows_used,
        table_bytes=table.nbytes(), audit=auditor.result() if auditor is not None else None)


def audit_legacy(target, prev, nll, layout: TokenByteLayout, positions, *, token_logprobs=None,
                 order: int = 5, lambda_hi: float = 0.9, lambda_lo: float = 0.05,
                 conf_threshold: float = 0.9, anti_hijack_nats: float = 0.277) -> AuditResult:
    """Audit the legacy mixture at sorted scored `positions` (module docstring).

    `token_logprobs[s, :]` is log q over the vocabulary at positions[s] (e.g. a model's
    log-softmax); None uses the NLL-consistent "spread" stand-in. Runs the legacy scorer up to
    the last position, pausing at each one."""
    positions = np.asarray(positions, dtype=np.int64)
    end = int(positions[-1]) + 1 if len(positions) else 0
    result = legacy_mixture(np.asarray(target)[:end], np.asarray(prev)[:end], np.asarray(nll)[:end],
                            layout, order=order, lambda_hi=lambda_hi, lambda_lo=lambda_lo,
                            conf_threshold=conf_threshold, anti_hijack_nats=anti_hijack_nats,
                            trace_max=0, audit_positions=positions, audit_logprobs=token_logprobs)
    return result.audit
