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
from parlm.ppm.byte_model import insert_successors, legacy_logp, mix_log_weights, mix_logp, shift_window
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


@numba.njit(cache=True, inline="always")
def _tokens_before_growth(regions, room_per_token):
    """How many tokens may be scored before a hashed region could run out of rows: each token
    adds at most `room_per_token` rows per region, so min over regions of
    (capacity - used) // room_per_token, less one; <= 0: grow the table first."""
    headroom = np.int64(1) << 62
    for length in range(DENSE_MAX_LENGTH + 1, regions.shape[0]):
        headroom = min(headroom, regions[length, CAPACITY] - regions[length, USED])
    return headroom // room_per_token - 1


@numba.njit(cache=True, inline="always")
def _mix_byte(nn_log_p, ppm_log_p, confidence, gate, log_weights):
    """(λ, choice, log p_mix) of one byte (module docstring): λ = lambda_lo (LAMBDA_LO) when
    confidence >= conf_threshold else lambda_hi (LAMBDA_HI); λ = 1 (LAMBDA_SKIP) when
    anti_hijack_nats > 0 and -ℓ < anti_hijack_nats; then `byte_model.mix_logp` of ℓ and π.
    gate = (lambda_lo, lambda_hi, conf_threshold, anti_hijack_nats); log_weights = (log λlo,
    log(1-λlo), log λhi, log(1-λhi)), computed once per kernel call."""
    lambda_lo, lambda_hi, conf_threshold, anti_hijack_nats = gate
    if confidence >= conf_threshold:
        lam, choice = lambda_lo, LAMBDA_LO
        log_weight, log_one_minus = log_weights[0], log_weights[1]
    else:
        lam, choice = lambda_hi, LAMBDA_HI
        log_weight, log_one_minus = log_weights[2], log_weights[3]
    if anti_hijack_nats > 0.0 and -nn_log_p < anti_hijack_nats:
        lam, choice = 1.0, LAMBDA_SKIP
    return lam, choice, mix_logp(lam, log_weight, log_one_minus, nn_log_p, ppm_log_p)


@numba.njit(cache=True, inline="always")
def _count_byte(confidence_hist, position_stats, token_stats, confidence, j, t, choice):
    """The exact aggregates of one byte: confidence_hist[min(⌊confidence · bins⌋, bins - 1)],
    position_stats[min(j, last row), choice] and token_stats[t, choice], each += 1."""
    n_bins = confidence_hist.shape[0]
    bin_index = int(confidence * n_bins)
    if bin_index >= n_bins:
        bin_index = n_bins - 1
    confidence_hist[bin_index] += 1
    last_position = position_stats.shape[0] - 1
    position_stats[j if j < last_position else last_position, choice] += 1
    token_stats[t, choice] += 1


@numba.njit(cache=True, inline="always")
def _write_row(table, row, values):
    """table[row, c] = values[c] for each c (a tuple of one type)."""
    for c in range(len(values)):
        table[row, c] = values[c]


@numba.njit(cache=True, inline="always")
def _window_scratch(order):
    """Per-order scratch rows of one byte: its successor rows, which of them were inserted,
    the next window's context rows (order + 1 each)."""
    return (np.empty(order + 1, dtype=np.int64), np.empty(order + 1, dtype=np.bool_),
            np.empty(order + 1, dtype=np.int64))


@numba.njit(cache=True, inline="always")
def _update_and_shift(slots, contexts, successors, next_contexts, packed, window_length, byte, order):
    """After scoring `byte`: count it in every context 0..w (the legacy full update), shift it
    into the window and make contexts[k] the row of the new last k bytes; (packed, length)."""
    apply_update(slots, contexts, successors, window_length)
    packed, window_length = shift_window(packed, window_length, byte, order, contexts, successors,
                                         next_contexts)
    for k in range(window_length + 1):
        contexts[k] = next_contexts[k]
    return packed, window_length


@numba.njit(cache=True)
def _legacy_kernel(stream, nll, gate, order, slots, regions, room_per_token, contexts, state, sums,
                   start, stop, confidence_hist, position_stats, token_stats,
                   curve, curve_every, trace_float, trace_int, trace_stride):
    """Score tokens [start, stop) of `stream` = (target, prev, offsets, data, has_space,
    is_boundary) under `gate` = (lambda_lo, lambda_hi, conf_threshold, anti_hijack_nats); return
    the first token not scored (early when the table must grow). Running state lives in the
    arrays (`state`, `sums` = mix, ppm, nn NLL in nats). Per byte: the legacy PPM log-prob and
    confidence, `_mix_byte`, the sums and aggregates, trace and curve rows, the update."""
    target, prev, offsets, data, has_space_table, boundary_table = stream
    successors, inserted, next_contexts = _window_scratch(order)
    log_weights = mix_log_weights(gate[0]) + mix_log_weights(gate[1])
    packed, window_length, bytes_done = state[_WINDOW], state[_WINDOW_LENGTH], state[_BYTES]
    choice_counts = np.array([state[_LO], state[_HI], state[_SKIPS]])
    trace_count, curve_count = state[_TRACE_COUNT], state[_CURVE_COUNT]
    # next byte index to trace / to record on the curve (no integer division per byte)
    next_trace = -(-bytes_done // trace_stride) * trace_stride
    next_curve = (bytes_done // curve_every + 1) * curve_every
    mix_nll, ppm_nll, nn_nll = sums[0], sums[1], sums[2]
    # A look-ahead cursor (token, byte, token_span, window) PREFETCH_DISTANCE bytes ahead
    # prefetches the rows its byte will probe (speed only, never results); it starts before
    # token `start` with nothing left to read, and the first byte moves it the whole way.
    ahead_i, ahead_j, ahead_lo, ahead_n, ahead_space = start - 1, 0, 0, 0, 0
    ahead_packed, ahead_length = packed, window_length
    ahead_steps = PREFETCH_DISTANCE + 1
    tokens_until_check = 0
    i = start
    while i < stop:
        if tokens_until_check == 0:
            tokens_until_check = _tokens_before_growth(regions, room_per_token)
            if tokens_until_check <= 0:
                break
        tokens_until_check -= 1
        lo, n_bytes, include_space = token_span(i, target, prev, offsets, has_space_table, boundary_table)
        nn_log_p = (-nll[i]) / n_bytes if n_bytes > 0 else 0.0  # a zero-byte token scores nothing
        for j in range(n_bytes):
            b = token_byte(data, lo, j, include_space)
            for _ in range(ahead_steps):
                while ahead_i < stop and ahead_j >= ahead_n:  # past the tokens it has read
                    ahead_i += 1
                    ahead_j = 0
                    if ahead_i < stop:
                        ahead_lo, ahead_n, ahead_space = token_span(ahead_i, target, prev, offsets,
                                                                    has_space_table, boundary_table)
                if ahead_i < stop:
                    ahead_byte = token_byte(data, ahead_lo, ahead_j, ahead_space)
                    prefetch_successors(slots, regions, ahead_packed, ahead_length, ahead_byte)
                    ahead_packed = (ahead_packed << 8) | ahead_byte
                    ahead_length = ahead_length + 1 if ahead_length < order else order
                    ahead_j += 1
            ahead_steps = 1
            insert_successors(slots, regions, packed, window_length, b, successors, inserted)
            ppm_log_p, confidence = legacy_logp(slots, contexts, successors, window_length)
            lam, choice, log_mix = _mix_byte(nn_log_p, ppm_log_p, confidence, gate, log_weights)
            mix_nll -= log_mix
            ppm_nll -= ppm_log_p
            nn_nll -= nn_log_p
            choice_counts[choice] += 1
            _count_byte(confidence_hist, position_stats, token_stats, confidence, j, target[i], choice)
            if bytes_done == next_trace:
                next_trace += trace_stride
                if trace_count < trace_float.shape[0]:
                    _write_row(trace_float, trace_count, (confidence, lam, nn_log_p, ppm_log_p, log_mix))
                    _write_row(trace_int, trace_count, (bytes_done, i, target[i], j, b, choice))
                    trace_count += 1
            bytes_done += 1
            if bytes_done == next_curve:
                next_curve += curve_every
                if curve_count < curve.shape[0]:
                    _write_row(curve, curve_count, (float(bytes_done), mix_nll, ppm_nll, nn_nll))
                    curve_count += 1
            packed, window_length = _update_and_shift(slots, contexts, successors, next_contexts,
                                                      packed, window_length, b, order)
        i += 1
    state[_WINDOW], state[_WINDOW_LENGTH], state[_BYTES] = packed, window_length, bytes_done
    state[_LO], state[_HI], state[_SKIPS] = choice_counts[0], choice_counts[1], choice_counts[2]
    state[_TRACE_COUNT], state[_CURVE_COUNT] = trace_count, curve_count
    sums[0], sums[1], sums[2] = mix_nll, ppm_nll, nn_nll
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


def _scored_positions(target, prev, nll, order: int, subset_tokens: int):
    """(target, prev, nll) as contiguous 1-D int64/int64/float64 arrays of one length, cut to
    the first `subset_tokens` when > 0; ValueError for an unsupported order or mismatched
    arrays."""
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
    return target, prev, nll


@dataclass
class _KernelBuffers:
    """The arrays `_legacy_kernel` carries from one call to the next: the count table and the
    window's context rows, `state` (_WINDOW.._CURVE_COUNT), `sums` (mix, ppm, nn NLL), the
    aggregates, the curve (a row every `curve_every` bytes) and the trace (every
    `trace_stride`-th byte)."""

    table: CountTable
    contexts: np.ndarray
    state: np.ndarray
    sums: np.ndarray
    confidence_hist: np.ndarray
    position_stats: np.ndarray
    token_stats: np.ndarray
    curve: np.ndarray
    curve_every: int
    trace_float: np.ndarray
    trace_int: np.ndarray
    trace_stride: int

    @classmethod
    def allocate(cls, order: int, total_bytes: int, vocab: int, trace_max: int,
                 curve_points: int) -> "_KernelBuffers":
        """Empty buffers for a stream of `total_bytes` bytes over ids < `vocab`: about
        `curve_points` curve rows and at most `trace_max` trace rows (0: no trace)."""
        table = CountTable(order, total_bytes)
        contexts = np.zeros(order + 1, dtype=np.int64)
        context_rows(table.slots, table.regions, 0, 0, contexts)
        curve_every = max(1, -(-total_bytes // max(curve_points, 1)))
        trace_stride = max(1, -(-total_bytes // max(trace_max, 1)))
        n_trace = -(-total_bytes // trace_stride) if trace_max > 0 else 0
        return cls(table=table, contexts=contexts, state=np.zeros(8, dtype=np.int64),
                   sums=np.zeros(3, dtype=np.float64),
                   confidence_hist=np.zeros(CONFIDENCE_BINS, dtype=np.int64),
                   position_stats=np.zeros((MAX_TOKEN_POSITION, 3), dtype=np.int64),
                   token_stats=np.zeros((vocab, 3), dtype=np.int64),
                   curve=np.zeros((total_bytes // curve_every + 1, 4), dtype=np.float64),
                   curve_every=curve_every,
                   trace_float=np.zeros((n_trace, len(TRACE_FLOAT_FIELDS)), dtype=np.float64),
                   trace_int=np.zeros((n_trace, len(TRACE_INT_FIELDS)), dtype=np.int64),
                   trace_stride=trace_stride)

    def window(self) -> tuple[int, int]:
        """(packed, length) of the window after the bytes scored so far."""
        return int(self.state[_WINDOW]), int(self.state[_WINDOW_LENGTH])

    def make_room(self, rows: int) -> None:
        """Grow the table for `rows` more rows per region; after a rehash (rows moved) find the
        window's context rows again."""
        if self.table.ensure_room(rows):
            context_rows(self.table.slots, self.table.regions, *self.window(), self.contexts)

    def audit(self, auditor: PositionAuditor) -> None:
        """The auditor's next position, audited from the live state (before its bytes)."""
        auditor.audit(self.table.slots, self.table.regions, self.contexts, *self.window())

    def score(self, stream, nll, gate, order: int, room_per_token: int, start: int, stop: int) -> int:
        """`_legacy_kernel` over tokens [start, stop); the first token it did not score."""
        return _legacy_kernel(stream, nll, gate, order, self.table.slots, self.table.regions,
                              room_per_token, self.contexts, self.state, self.sums, start, stop,
                              self.confidence_hist, self.position_stats, self.token_stats,
                              self.curve, self.curve_every, self.trace_float, self.trace_int,
                              self.trace_stride)

    def trace(self) -> dict[str, np.ndarray]:
        """The trace rows written, one array per field (float32 and TRACE_INT_DTYPES)."""
        used = int(self.state[_TRACE_COUNT])
        trace = {name: self.trace_float[:used, c].astype(np.float32)
                 for c, name in enumerate(TRACE_FLOAT_FIELDS)}
        trace.update({name: self.trace_int[:used, c].astype(TRACE_INT_DTYPES[name])
                      for c, name in enumerate(TRACE_INT_FIELDS)})
        return trace


def _score_chunks(buffers: _KernelBuffers, layout: TokenByteLayout, target, prev, nll, gate,
                  order: int, chunk_tokens: int, auditor, progress: bool) -> None:
    """Score every position in chunks of at most `chunk_tokens` (growing the table between
    them); with an `auditor`, stop at each of its positions and audit the live state first."""
    stream = (target, prev, layout.offsets, layout.data, layout.has_leading_space, layout.is_boundary)
    room_per_token = layout.max_token_bytes + 1  # new rows per region per token, at most
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(target), desc="ppm legacy", unit="tok", unit_scale=True)
    position = 0
    while position < len(target):
        stop = min(len(target), position + chunk_tokens)
        buffers.make_room(room_per_token * 64)
        if auditor is not None and auditor.done < len(auditor.positions):
            next_audit = int(auditor.positions[auditor.done])
            if next_audit == position:
                buffers.audit(auditor)
                continue
            stop = min(stop, next_audit)
        reached = buffers.score(stream, nll, gate, order, room_per_token, position, stop)
        if bar is not None:
            bar.update(reached - position)
        position = reached
    if bar is not None:
        bar.close()


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
    target, prev, nll = _scored_positions(target, prev, nll, order, subset_tokens)
    started = time.perf_counter()
    counts_per_token = layout.byte_counts(target, prev)
    total_bytes = int(counts_per_token.sum())
    if total_bytes >= 2**31 - 1:
        raise ValueError(f"{total_bytes} bytes exceed the int32-safe count range of the tables")
    gate = (float(lambda_lo), float(lambda_hi), float(conf_threshold), float(anti_hijack_nats))
    vocab = max(layout.vocab_size, int(target.max(initial=-1)) + 1)
    buffers = _KernelBuffers.allocate(order, total_bytes, vocab, trace_max, curve_points)
    auditor = None
    if audit_positions is not None:
        auditor = PositionAuditor(layout, target, prev, nll, audit_positions, audit_logprobs,
                                  order=order, lambda_hi=gate[1], lambda_lo=gate[0],
                                  conf_threshold=gate[2], anti_hijack_nats=gate[3])
    _score_chunks(buffers, layout, target, prev, nll, gate, order, chunk_tokens, auditor, progress)
    seconds = time.perf_counter() - started
    if auditor is not None:
        while auditor.done < len(auditor.positions):  # positions at the very end
            buffers.audit(auditor)
    state, sums = buffers.state, buffers.sums
    mix_bpb, ppm_bpb, nn_bpb = (sums / total_bytes / LOG2) if total_bytes else (0.0, 0.0, 0.0)
    skips = int(state[_SKIPS])
    return LegacyResult(
        mix_bpb=float(mix_bpb), ppm_only_bpb=float(ppm_bpb), nn_only_bpb=float(nn_bpb),
        gate_skip=skips / total_bytes if total_bytes else 0.0, gate_skip_count=skips,
        bytes=total_bytes, tokens=int(len(target)),
        tokens_scored=int(np.count_nonzero(counts_per_token)), seconds=seconds, order=order,
        lambda_hi=gate[1], lambda_lo=gate[0], conf_threshold=gate[2], anti_hijack_nats=gate[3],
        lambda_counts=np.array([state[_LO], state[_HI], state[_SKIPS]], dtype=np.int64),
        confidence_histogram=buffers.confidence_hist, position_stats=buffers.position_stats,
        token_stats=buffers.token_stats, curve=buffers.curve[: int(state[_CURVE_COUNT])],
        curve_every=buffers.curve_every, trace=buffers.trace(), trace_stride=buffers.trace_stride,
        table_rows=buffers.table.rows_used, table_bytes=buffers.table.nbytes(),
        audit=auditor.result() if auditor is not None else None)


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
