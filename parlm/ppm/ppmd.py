"""A true PPM-D byte model with exclusion: a normalized next-byte distribution (contrast to
the legacy model, which is escape method C without exclusion and sums to < 1; SPEC 6.3).

Method D (Howard): in a context with n' occurrences of u' distinct not-excluded bytes,
P(c) = (2·count(c) - 1) / (2n') and escape = u' / (2n'); bytes offered by a higher order are
excluded from every lower one; the order -1 fallback is uniform over the never-offered bytes.
Counts use the same full update as the legacy model (every order 0..K is incremented), so the
two share one count table and differ only in how they turn counts into probabilities.
`byte_model.ppmd_distribution` computes the full 256-way distribution (256 probes per order),
so scoring a stream costs ~1-2 µs per byte: meant for samples and audits, not 151 M bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from parlm.ppm.byte_model import apply_update, insert_successors, ppmd_distribution, shift_window
from parlm.ppm.counts import CountTable, context_rows

LOG2 = math.log(2.0)


@numba.njit(cache=True)
def _ppmd_kernel(values, order, slots, regions, contexts, log_probs, totals, keep_rows, kept):
    successors = np.empty(order + 1, dtype=np.int64)
    inserted = np.empty(order + 1, dtype=np.bool_)
    saved = np.empty((order + 1, 2), dtype=np.int64)
    next_contexts = np.empty(order + 1, dtype=np.int64)
    distribution = np.empty(256, dtype=np.float64)
    packed = 0
    window_length = 0
    for t in range(values.shape[0]):
        b = np.int64(values[t])
        ppmd_distribution(slots, regions, contexts, packed, window_length, distribution)
        log_probs[t] = math.log(distribution[b])
        total = 0.0
        for c in range(256):
            total += distribution[c]
        totals[t] = total
        if keep_rows[t] >= 0:
            for c in range(256):
                kept[keep_rows[t], c] = distribution[c]
        insert_successors(slots, regions, packed, window_length, b, successors, inserted)
        apply_update(slots, contexts, successors, window_length, saved)
        packed, window_length = shift_window(packed, window_length, b, order, contexts, successors,
                                             next_contexts)
        for k in range(window_length + 1):
            contexts[k] = next_contexts[k]


@dataclass
class PPMDResult:
    """Per-byte log P(actual byte), the distribution total at every byte (1 up to rounding),
    bits per byte, and the full distributions at the requested positions."""

    log_probs: np.ndarray
    totals: np.ndarray
    bpb: float
    distributions: np.ndarray
    positions: np.ndarray


def ppmd_score(values, order: int = 5, keep_positions=None) -> PPMDResult:
    """Score a byte stream (uint8 array) with PPM-D + exclusion; bpb = Σ -log P / (B ln 2)."""
    values = np.ascontiguousarray(np.asarray(values, dtype=np.uint8))
    table = CountTable(order, len(values))
    table.ensure_room(len(values) + 1)  # no rehash needed mid-stream
    contexts = np.zeros(order + 1, dtype=np.int64)
    context_rows(table.slots, table.regions, 0, 0, contexts)
    positions = np.unique(np.asarray(keep_positions if keep_positions is not None else [], dtype=np.int64))
    keep_rows = np.full(len(values), -1, dtype=np.int64)
    keep_rows[positions] = np.arange(len(positions))
    kept = np.zeros((len(positions), 256), dtype=np.float64)
    log_probs = np.zeros(len(values), dtype=np.float64)
    totals = np.zeros(len(values), dtype=np.float64)
    _ppmd_kernel(values, order, table.slots, table.regions, contexts, log_probs, totals, keep_rows, kept)
    bpb = float(-log_probs.sum() / max(len(values), 1) / LOG2)
    return PPMDResult(log_probs, totals, bpb, kept, positions)
