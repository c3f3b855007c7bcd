"""The PPM byte model of PR #1858 as compiled primitives over `counts.CountTable` (SPEC 6.3).

State at one position: the window (last <= K bytes, packed, most recent lowest, and its
length w = min(K, bytes seen)) and `context_slots[k]`, the table slot of its last k bytes for
k = 0..w. A context "exists" when its total is > 0 (the reference's dictionary holds exactly
the contexts that were updated at least once).

Legacy probability of byte b (escape method C, no exclusion, the reference's exact rule):
walk k = w..0 over existing contexts with n = total, u = unique; the first one met gives
confidence = max_count / (n + u); if count(b) > 0 then P = escape * count(b) / (n + u) and
stop, else escape *= u / (n + u); if no context holds b, P = escape / 256.
Update (after scoring): count(b) += 1 in every context k = 0..w (full update, unbounded
counts), then the window shifts in b.

Every update can be journaled and rolled back exactly (the normalization audit walks all
candidate tokens from one state).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from parlm.ppm.counts import COUNT, LOW32, TOTAL, UNIQUE_MAX, delete_last_inserted, find_or_insert, find_row

UNIFORM_LOGP = math.log(1.0 / 256.0)


@numba.njit(cache=True, inline="always")
def find_successors(slots, regions, packed, window_length, byte, out):
    """out[k] = row of (last k bytes) + byte, or -1 when absent (read only)."""
    extended = (packed << 8) | byte
    for k in range(window_length + 1):
        out[k] = find_row(slots, regions, extended, k + 1)


@numba.njit(cache=True, inline="always")
def insert_successors(slots, regions, packed, window_length, byte, out, inserted):
    """out[k] = row of (last k bytes) + byte, inserting zero rows; inserted[k] says which."""
    extended = (packed << 8) | byte
    for k in range(window_length + 1):
        out[k], inserted[k] = find_or_insert(slots, regions, extended, k + 1)


@numba.njit(cache=True, inline="always")
def context_counts(slots, context_slot):
    """(n, u, max) of a context row: its total, distinct bytes seen after it, largest count."""
    packed = slots[context_slot, UNIQUE_MAX]
    return slots[context_slot, TOTAL], packed >> 32, packed & LOW32


@numba.njit(cache=True, inline="always")
def legacy_logp(slots, context_slots, successor_slots, window_length):
    """(log P(b), confidence) of the legacy PPM (module docstring); successor slot -1 = count 0."""
    escape_log_prob = 0.0
    confidence = 0.0
    seen_any = False
    for k in range(window_length, -1, -1):
        total, unique, maximum = context_counts(slots, context_slots[k])
        if total == 0:
            continue
        denom = total + unique
        if not seen_any:
            confidence = maximum / denom
            seen_any = True
        ss = successor_slots[k]
        count = slots[ss, COUNT] if ss >= 0 else 0
        if count > 0:
            return escape_log_prob + math.log(count / denom), confidence
        if unique > 0:
            escape_log_prob += math.log(unique / denom)
    return escape_log_prob + UNIFORM_LOGP, confidence


@numba.njit(cache=True, inline="always")
def mix_log_weights(weight):
    """(log λ, log(1-λ)) for `mix_logp`, 0.0 where a log is not needed (λ <= 0 or λ >= 1)."""
    return (math.log(weight) if weight > 0.0 else 0.0,
            math.log(1.0 - weight) if weight < 1.0 else 0.0)


@numba.njit(cache=True, inline="always")
def mix_logp(weight, log_weight, log_one_minus_weight, nn_log_p, ppm_log_p):
    """log(λ e^ℓ + (1-λ) e^π) in the reference's arithmetic: π when λ <= 0, ℓ when λ >= 1, else
    LSE(log λ + ℓ, log(1-λ) + π), LSE(a, c) = max(a, c) + log1p(exp(-|a - c|)); the two logs
    come from `mix_log_weights(λ)` (the kernel computes them once, not per byte)."""
    if weight <= 0.0:
        return ppm_log_p
    if weight >= 1.0:
        return nn_log_p
    a = log_weight + nn_log_p
    c = log_one_minus_weight + ppm_log_p
    return max(a, c) + math.log1p(math.exp(-abs(a - c)))


@numba.njit(cache=True)
def legacy_confidence(slots, context_slots, window_length):
    """max_count / (n + u) of the highest existing context (0 when none exists)."""
    for k in range(window_length, -1, -1):
        total, unique, maximum = context_counts(slots, context_slots[k])
        if total > 0:
            return maximum / (total + unique)
    return 0.0


@numba.njit(cache=True, inline="always")
def apply_update_unjournaled(slots, context_slots, successor_slots, window_length):
    """count(b) += 1 in every context 0..w (full update, SPEC 6.3), keeping each context's
    total, distinct-symbol count and maximum count (packed unique<<32 | max) current."""
    for k in range(window_length + 1):
        cs = context_slots[k]
        ss = successor_slots[k]
        count = slots[ss, COUNT] + 1
        slots[ss, COUNT] = count
        slots[cs, TOTAL] += 1
        packed = slots[cs, UNIQUE_MAX]
        unique = packed >> 32
        maximum = packed & LOW32
        if count == 1:
            unique += 1
        if count > maximum:
            maximum = count
        slots[cs, UNIQUE_MAX] = (unique << 32) | maximum


@numba.njit(cache=True, inline="always")
def apply_update(slots, context_slots, successor_slots, window_length, saved):
    """count(b) += 1 in every context 0..w; saved[k] = (total, unique_max) before (journal)."""
    for k in range(window_length + 1):
        cs = context_slots[k]
        saved[k, 0] = slots[cs, TOTAL]
        saved[k, 1] = slots[cs, UNIQUE_MAX]
    apply_update_unjournaled(slots, context_slots, successor_slots, window_length)


@numba.njit(cache=True)
def roll_back_update(slots, regions, context_slots, successor_slots, inserted, window_length, saved):
    """Undo `apply_update` (and the insertions that preceded it), newest first."""
    for k in range(window_length, -1, -1):
        ss = successor_slots[k]
        slots[ss, COUNT] -= 1
        cs = context_slots[k]
        slots[cs, TOTAL] = saved[k, 0]
        slots[cs, UNIQUE_MAX] = saved[k, 1]
    for k in range(window_length, -1, -1):
        if inserted[k]:
            delete_last_inserted(slots, regions, successor_slots[k], k + 1)


@numba.njit(cache=True, inline="always")
def shift_window(packed, window_length, byte, order, context_slots, successor_slots, next_context_slots):
    """Window after appending `byte`: returns (packed, length) and fills next_context_slots
    (order-k context = the successor slot of order k-1; order 0 = the empty string's slot)."""
    next_context_slots[0] = context_slots[0]
    new_length = window_length + 1 if window_length < order else order
    for k in range(1, new_length + 1):
        next_context_slots[k] = successor_slots[k - 1]
    return (packed << 8) | byte, new_length


@numba.njit(cache=True)
def ppmd_distribution(slots, regions, context_slots, packed, window_length, out):
    """PPM-D with exclusion (a normalised distribution over the 256 bytes), into `out`.

    Walk k = w..0 over existing contexts. With E the bytes excluded so far (those offered by
    higher orders), n' = sum of counts of non-excluded bytes in context k and u' their number:
    P(c) += escape * (2 count(c) - 1) / (2 n') for each such byte, then exclude them and
    escape *= u' / (2 n') (method D; a level whose bytes are all excluded is skipped). The rest
    goes uniformly to the never-offered bytes: escape / (256 - |E|). Sum_c P(c) = 1 exactly
    in exact arithmetic, since sum (2c - 1) + u' = 2 n' at every level. (A level that offers
    every remaining byte has nothing to escape to; it uses count / n' instead.)
    """
    excluded = np.zeros(256, dtype=np.bool_)
    counts = np.zeros(256, dtype=np.int64)
    for c in range(256):
        out[c] = 0.0
    escape = 1.0
    n_excluded = 0
    for k in range(window_length, -1, -1):
        if slots[context_slots[k], TOTAL] == 0:
            continue
        n_free = 0
        u_free = 0
        for c in range(256):
            counts[c] = 0
            if excluded[c]:
                continue
            s = find_row(slots, regions, (packed << 8) | c, k + 1)
            if s >= 0 and slots[s, COUNT] > 0:
                counts[c] = slots[s, COUNT]
                n_free += counts[c]
                u_free += 1
        if u_free == 0:
            continue
        last_level = n_excluded + u_free == 256  # nothing left to escape to: no escape mass
        for c in range(256):
            if counts[c] > 0:
                if last_level:
                    out[c] += escape * counts[c] / n_free
                else:
                    out[c] += escape * (2 * counts[c] - 1) / (2 * n_free)
                excluded[c] = True
                n_excluded += 1
        if last_level:
            escape = 0.0
            break
        escape *= u_free / (2 * n_free)
    remaining = 256 - n_excluded
    if remaining > 0:
        share = escape / remaining
        for c in range(256):
            if not excluded[c]:
                out[c] += share
