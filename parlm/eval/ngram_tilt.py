"""Token-only n-gram tilt of the scored distribution (PR #2130/#2135, after #1145).

An online n-gram over the validation prefix proposes at most one "hinted" token h_t for each
scored position t; the model's distribution p (after TTT) is tilted towards it and
renormalized over the whole vocabulary:

    p'(a) = p(a) · exp(β·1[a = h_t]) / Z_t,   Z_t = 1 + p(h_t)·(e^β − 1)
    −log p'(y) = −log p(y) − β·1[y = h_t] + log1p(p(h_t)·(e^β − 1))

Position t (input token x_t, predicting x_{t+1}) has the context c_t = x_{t−n+2..t} (the last
n−1 tokens, n = `tilt_order`). Over the earlier positions s < t with c_s = c_t, the next
tokens x_{s+1} (all ≤ x_t, already scored) are counted; h_t is their most frequent token (the
first to reach the top count on ties) and q_t its frequency. The tilt fires (β = `tilt_boost`)
where q_t ≥ `tilt_threshold`, else β = 0 and p' = p. So (h_t, β_t) depend on x_{0..t} only,
never on the realized token x_{t+1}: the within-word and word-start channels of #1420, whose
gates read whether the *target* starts a word (a leak worth a fake −0.0029), are not
implemented at all. Contexts are compared by a 64-bit polynomial hash, as #2135's
native helper does.

The hints are precomputed in one vectorized pass over the stream (sorts and cumulative
maxima, no per-token loop); the stage counts that time inside the evaluation clock.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

# Odd 63-bit multipliers of the context hash (any fixed distinct odd constants work).
_HASH_SEED = 0x9E3779B97F4A7C15 & 0x7FFFFFFFFFFFFFFF


def context_hashes(tokens: torch.Tensor, context_len: int) -> torch.Tensor:
    """h_t = fold over j < context_len of h ← h·1000003 + x_{t−j}·K_j (int64, wrapping; K_j
    fixed odd constants), at every t of tokens;
    entries t < context_len − 1 (an incomplete context) are meaningless, callers mask them."""
    tokens = tokens.to(torch.int64)
    hashes = torch.zeros_like(tokens)
    generator = torch.Generator().manual_seed(_HASH_SEED)
    multipliers = torch.randint(1, 2**62, (context_len,), generator=generator) * 2 + 1
    for j in range(context_len):  # context_len vector ops over the stream, not a token loop
        shifted = torch.zeros_like(tokens)
        shifted[j:] = tokens[:tokens.numel() - j]
        hashes = hashes * 1_000_003 + shifted * int(multipliers[j])
    return hashes


def _group_starts(sorted_keys: torch.Tensor) -> torch.Tensor:
    """Index of the first element of each element's run of equal keys (keys sorted)."""
    index = torch.arange(sorted_keys.numel(), device=sorted_keys.device)
    is_start = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.cummax(torch.where(is_start, index, 0), 0).values


def ngram_hints(tokens: torch.Tensor, total: int, order: int, threshold: float,
                boost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hint [T] int64, beta [T] float32) for positions t = 0..T−1 of the stream tokens[0..T]
    (module docstring): beta = boost where the top next-token frequency of the context c_t over
    earlier positions is >= threshold, else 0 (hint then 0 and unused)."""
    device = tokens.device
    context_len = order - 1
    stream = tokens[:total + 1].to(torch.int64)
    hashes = context_hashes(stream[:total], context_len)
    nexts = stream[1:total + 1]
    positions = torch.arange(context_len - 1, total, device=device)  # complete contexts
    hint = torch.zeros(total, dtype=torch.int64, device=device)
    beta = torch.zeros(total, dtype=torch.float32, device=device)
    if positions.numel() == 0:
        return hint, beta
    ctx = hashes[positions]
    ctx_sorted, order_ctx = torch.sort(ctx, stable=True)  # by context, then by position
    pos_sorted = positions[order_ctx]
    next_sorted = nexts[pos_sorted]
    n = ctx_sorted.numel()
    index = torch.arange(n, device=device)
    ctx_start = _group_starts(ctx_sorted)
    # Running count of (context, next) after each event: rank inside its pair group + 1.
    pair_key = ctx_sorted * 65_537 + next_sorted
    pair_sorted, order_pair = torch.sort(pair_key, stable=True)  # stable keeps position order
    count_in_pair = torch.empty(n, dtype=torch.int64, device=device)
    count_in_pair[order_pair] = index - _group_starts(pair_sorted) + 1
    # Running max of the counts within each context group (offset keeps groups apart).
    group_id = torch.cumsum((index == ctx_start).to(torch.int64), 0)
    offset = group_id * (n + 1)
    running_max = torch.cummax(count_in_pair + offset, 0).values - offset
    previous_max = torch.where(index == ctx_start, 0, torch.roll(running_max, 1))
    record = count_in_pair > previous_max  # strictly new top count: its token becomes the top
    top_index = torch.cummax(torch.where(record, index, -1), 0).values
    # The query at event i reads the state after event i−1 of the same context.
    has_history = index > ctx_start
    prev = (index - 1).clamp(min=0)
    seen = (index - ctx_start).to(torch.float64)
    frequency = torch.where(has_history, running_max[prev].to(torch.float64) / seen.clamp(min=1), 0.0)
    fires = has_history & (frequency >= threshold)
    hint[pos_sorted] = torch.where(fires, next_sorted[top_index[prev]], 0)
    beta[pos_sorted] = torch.where(fires, float(boost), 0.0).to(torch.float32)
    return hint, beta


def tilted_log_probs(logits: torch.Tensor, hint: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log p'(a) over the whole vocabulary [n, V] (float64): log_softmax(logits) + β·1[a = h]
    − log1p(p(h)·(e^β − 1)). Rows with β = 0 are the model's own log-probabilities."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    beta = beta.double()
    hinted = log_probs.gather(1, hint[:, None])[:, 0]
    log_norm = torch.log1p(hinted.exp() * torch.expm1(beta))
    return log_probs + beta[:, None] * F.one_hot(hint, logits.shape[-1]) - log_norm[:, None]


def tilted_nll(logits: torch.Tensor, targets: torch.Tensor, hint: torch.Tensor,
               beta: torch.Tensor) -> torch.Tensor:
    """−log p'(y) in closed form (float64 [n]): CE(logits, y) − β·1[y = h] +
    log1p(p(h)·(e^β − 1)); equal to −tilted_log_probs(...)[y] without the [n, V] table."""
    logits = logits.float()
    log_norm_logits = torch.logsumexp(logits, dim=-1)
    nll = (log_norm_logits - logits.gather(1, targets[:, None])[:, 0]).double()
    log_hinted = (logits.gather(1, hint[:, None])[:, 0] - log_norm_logits).double()
    beta = beta.double()
    return nll - beta * (targets == hint) + torch.log1p(log_hinted.exp() * torch.expm1(beta))


class NgramTilt:
    """The tilt as a scoring overlay: `nll(logits, positions)` returns −log p'(x_{t+1}) for the
    scored positions t (the `mixture` interface of `WindowScorer.score`), `advance` is a no-op
    (the hints were fixed from the prefix in one pass). `precompute_seconds` is the hint pass's
    wall time, which the evaluation clock counts."""

    def __init__(self, config, tokens: torch.Tensor, device):
        device = torch.device(device)
        self.tokens = tokens.to(device=device, dtype=torch.int64)
        self.total = self.tokens.numel() - 1
        start = time.perf_counter()
        self.hint, self.beta = ngram_hints(self.tokens, self.total, config.tilt_order,
                                           config.tilt_threshold, config.tilt_boost)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.precompute_seconds = time.perf_counter() - start
        self.fired = int((self.beta > 0).sum())

    def distribution(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """p'(·) [n, V] (float64) at the given positions, before their tokens are seen."""
        positions = positions.to(self.hint.device)
        return tilted_log_probs(logits, self.hint[positions], self.beta[positions]).exp()

    def nll(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.to(self.hint.device)
        return tilted_nll(logits, self.tokens[positions + 1], self.hint[positions], self.beta[positions])

    def advance(self, upto: int) -> None:
        """Nothing to update: the hints already are the prefix counts."""

