"""A valid token-level mixture: neural softmax + a count model of already-scored tokens.

Unlike the legacy byte mixture (parlm.ppm.reference_mixture, not a distribution), this defines, before
token x_{p+1} is scored, one full normalized distribution over the vocabulary that depends
only on the artifact and the strict prefix (Issue #1017 C1-C4):

    p_mix(v) = (1 - λ) q(v) + λ P(v)

- q = softmax of the model's softcapped logits (the neural distribution), in float64.
- P = an interpolated Witten-Bell (PPM escape method C, blended, no exclusion) token n-gram
  model over the targets of positions < the advanced point a (positions scored in earlier TTT
  chunks). For contexts of k = K..0 previous tokens (K = `mixture_order`), with n_k the
  context's count, u_k its number of distinct successors and c_k(v) the successor counts:
      P_k(v) = (c_k(v) + u_k P_{k-1}(v)) / (n_k + u_k)  if n_k > 0,  P_k = P_{k-1} otherwise,
      P_{-1}(v) = 1 / V.
  Unrolled: P(v) = Σ_k β_k c_k(v)/n_k + β_{-1}/V with a_k = n_k/(n_k+u_k), b_k = u_k/(n_k+u_k),
  β_K = a_K, β_{k} = a_k Π_{j>k} b_j, β_{-1} = Π_k b_k, so Σ_v P(v) = Σ β = 1 exactly.
- λ = a learned gate table indexed by the prefix only: the highest context order with
  n_k > 0 and its confidence a_k (`mixture_gate_bins` bins). Each bucket's λ is an online EM
  estimate over earlier chunks: λ_b = (prior·λ_init + Σ r) / (prior + N_b), with r = λP(x)/p_mix(x)
  the responsibility at each scored position of bucket b. Accumulated while a chunk is scored
  and folded in only at `advance` (summed across ranks), so a chunk never sees its own tokens.

`nll` returns -log p_mix(target); it needs only the target's count and the softmax normalizer,
but the full distribution exists and `distribution` materializes it (tests check Σ_v = 1 and
that nll is -log of it at the target).

Counts live on the device: unigram counts dense [V]; each order k >= 1 as sorted unique int64
keys (context tokens and successor packed exactly, ceil(log2 V) bits per token) with counts
and prefix sums, so a context's successors are one contiguous segment found by two
searchsorted calls. `advance` merges a chunk's new keys by searchsorted + scatter (linear in
the table size, no re-sort of old keys).
"""
from __future__ import annotations

import math

import torch

from parlm import dist
from parlm.config import Config, ConfigError


class SortedCounts:
    """Counts of int64 keys: `keys` sorted unique, `counts` int64, `cumulative` [M+1] prefix sums."""

    def __init__(self, device):
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)
        self.cumulative = torch.zeros(1, dtype=torch.int64, device=device)

    def add(self, new_keys: torch.Tensor) -> None:
        """Add one occurrence of every key in `new_keys` (any order, repeats allowed)."""
        if new_keys.numel() == 0:
            return
        unique, counts = torch.unique_consecutive(torch.sort(new_keys).values, return_counts=True)
        old = self.keys.numel()
        index = torch.searchsorted(self.keys, unique)
        in_range = index < old
        exists = torch.zeros_like(in_range)
        exists[in_range] = self.keys[index[in_range]] == unique[in_range]
        if exists.any():
            self.counts.index_add_(0, index[exists], counts[exists])
        fresh = ~exists
        inserted = int(fresh.sum())
        if inserted:
            fresh_index = index[fresh]
            # old key i moves right by the number of new keys inserted at or before it
            shift = torch.cumsum(torch.bincount(fresh_index, minlength=old + 1), 0)[:old]
            total = old + inserted
            keys = torch.empty(total, dtype=torch.int64, device=self.keys.device)
            values = torch.empty(total, dtype=torch.int64, device=self.keys.device)
            old_positions = torch.arange(old, device=self.keys.device) + shift
            new_positions = fresh_index + torch.arange(inserted, device=self.keys.device)
            keys[old_positions] = self.keys
            values[old_positions] = self.counts
            keys[new_positions] = unique[fresh]
            values[new_positions] = counts[fresh]
            self.keys, self.counts = keys, values
        self.cumulative = torch.cat([self.counts.new_zeros(1), torch.cumsum(self.counts, 0)])

    def count(self, keys: torch.Tensor) -> torch.Tensor:
        """Count of each query key (0 when absent)."""
        if self.keys.numel() == 0:
            return torch.zeros_like(keys)
        index = torch.searchsorted(self.keys, keys).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[index] == keys, self.counts[index], 0)

    def segment(self, low: torch.Tensor, high: torch.Tensor):
        """(first index, end index, Σ counts) of keys in [low, high) for each query."""
        first = torch.searchsorted(self.keys, low)
        end = torch.searchsorted(self.keys, high)
        return first, end, self.cumulative[end] - self.cumulative[first]


class TokenNgramMixture:
    """p_mix = (1-λ) softmax(logits) + λ P_count over already-scored tokens (module docstring).

    `val_tokens` is the stream (CPU or device, any integer dtype); position p predicts
    val_tokens[p+1]. `nll(logits[N, V], positions[N])` -> float64 [N] on the logits' device;
    `advance(upto)` adds the targets of positions < upto (call identically on every rank)."""

    def __init__(self, config: Config, val_tokens, vocab_size: int, device):
        self.device = torch.device(device)
        self.order = int(config.mixture_order)
        self.vocab_size = int(vocab_size)
        self.bits = max(1, (self.vocab_size - 1).bit_length())
        if self.order < 0 or (self.order + 1) * self.bits > 63:
            raise ConfigError(
                f"mixture_order={self.order} with vocab_size={self.vocab_size} needs "
                f"{(self.order + 1) * self.bits} bits per key; keys are exact int64, so use "
                f"mixture_order <= {63 // self.bits - 1}")
        self.tokens = torch.as_tensor(val_tokens).to(device=self.device, dtype=torch.int64)
        self.unigram = torch.zeros(self.vocab_size, dtype=torch.int64, device=self.device)
        self.unigram_total = 0.0
        self.unigram_unique = 0.0
        self.tables = [SortedCounts(self.device) for _ in range(self.order)]  # orders 1..K
        self.advanced = 0
        self.bins = int(config.mixture_gate_bins)
        self.lambda_init = float(config.mixture_lambda_init)
        self.prior = float(config.mixture_gate_prior)
        if self.bins < 1 or not 0.0 <= self.lambda_init <= 1.0 or self.prior < 0.0:
            raise ConfigError(
                f"mixture_gate_bins={self.bins} must be >= 1, mixture_lambda_init="
                f"{self.lambda_init} in [0, 1] and mixture_gate_prior={self.prior} >= 0")
        buckets = (self.order + 2) * self.bins  # top order -1..K
        self.gate = torch.full((buckets,), self.lambda_init, dtype=torch.float64, device=self.device)
        self.gate_responsibility = torch.zeros(buckets, dtype=torch.float64, device=self.device)
        self.gate_positions = torch.zeros(buckets, dtype=torch.float64, device=self.device)
        self._pending = torch.zeros(2, buckets, dtype=torch.float64, device=self.device)

    # -- keys --------------------------------------------------------------------------------
    def _contexts(self, positions: torch.Tensor, k: int):
        """(packed k-token context ending at each position, valid mask)."""
        valid = positions - k + 1 >= 0
        context = torch.zeros_like(positions)
        for j in range(k):  # oldest token first
            index = (positions - k + 1 + j).clamp(min=0)
            context = (context << self.bits) | self.tokens[index]
        return context, valid

    # -- the count model ---------------------------------------------------------------------
    def _count_terms(self, positions: torch.Tensor):
        """The unrolled interpolation at each position: terms (k, exists mask, segment first,
        segment end, n_k, packed context, weight β_k) for k = K..1 (order 0 as (0, None, None,
        None, n_0, None, β_0) once anything was counted), the uniform weight β_{-1}, and the
        gate's inputs (highest existing order, its a_k = n_k / (n_k + u_k))."""
        n_pos = positions.numel()
        remaining = torch.ones(n_pos, dtype=torch.float64, device=self.device)
        top_order = torch.full((n_pos,), -1, dtype=torch.int64, device=self.device)
        top_conf = torch.zeros(n_pos, dtype=torch.float64, device=self.device)
        terms = []
        for k in range(self.order, 0, -1):
            context, valid = self._contexts(positions, k)
            low = context << self.bits
            first, end, n = self.tables[k - 1].segment(low, low + (1 << self.bits))
            n_float, u = n.to(torch.float64), (end - first).to(torch.float64)
            exists = valid & (n > 0)
            denom = torch.where(exists, n_float + u, 1.0)
            a = torch.where(exists, n_float / denom, 0.0)
            weight = remaining * a
            terms.append((k, exists, first, end, n_float, context, weight))
            newly_top = exists & (top_order < 0)
            top_order = torch.where(newly_top, k, top_order)
            top_conf = torch.where(newly_top, a, top_conf)
            remaining = remaining * torch.where(exists, u / denom, 1.0)
        n0, u0 = self.unigram_total, self.unigram_unique
        if n0 > 0:
            a0 = n0 / (n0 + u0)
            terms.append((0, None, None, None, n0, None, remaining * a0))
            newly_top = top_order < 0
            top_order = torch.where(newly_top, 0, top_order)
            top_conf = torch.where(newly_top, a0, top_conf)
            remaining = remaining * (u0 / (n0 + u0))
        return terms, remaining, top_order, top_conf

    def count_probability(self, positions: torch.Tensor, targets: torch.Tensor, terms=None) -> torch.Tensor:
        """P(target) of the count model (float64)."""
        terms, uniform, _, _ = terms if terms is not None else self._count_terms(positions)
        p = uniform / self.vocab_size
        for k, exists, first, end, n, context, weight in terms:
            if k == 0:
                p = p + weight * self.unigram[targets].to(torch.float64) / n
                continue
            c = self.tables[k - 1].count((context << self.bits) | targets).to(torch.float64)
            p = p + torch.where(exists, weight * c / torch.where(exists, n, 1.0), 0.0)
        return p

    def count_distribution(self, positions: torch.Tensor, terms=None) -> torch.Tensor:
        """The full count-model distribution P(·) [N, V] (float64; rows sum to 1)."""
        positions = positions.to(device=self.device, dtype=torch.int64)
        terms, uniform, _, _ = terms if terms is not None else self._count_terms(positions)
        out = (uniform / self.vocab_size)[:, None].expand(-1, self.vocab_size).clone()
        mask = (1 << self.bits) - 1
        for k, exists, first, end, n, context, weight in terms:
            if k == 0:
                out += weight[:, None] * self.unigram.to(torch.float64)[None, :] / n
                continue
            rows = torch.nonzero(exists).flatten()
            if rows.numel() == 0:
                continue
            lengths = (end - first)[rows]
            row_of = torch.repeat_interleave(rows, lengths)
            starts = torch.repeat_interleave(first[rows] - torch.cumsum(lengths, 0) + lengths, lengths)
            entry = torch.arange(row_of.numel(), device=self.device) + starts
            table = self.tables[k - 1]
            values = weight[row_of] * table.counts[entry].to(torch.float64) / n[row_of]
            out.index_put_((row_of, table.keys[entry] & mask), values, accumulate=True)
        return out

    def _gate(self, top_order: torch.Tensor, top_conf: torch.Tensor) -> torch.Tensor:
        """Bucket index: (top order + 1) * bins + confidence bin (prefix-only)."""
        conf_bin = (top_conf * self.bins).to(torch.int64).clamp(0, self.bins - 1)
        return (top_order + 1) * self.bins + conf_bin

    # -- the mixture -------------------------------------------------------------------------
    def _mixed(self, logits: torch.Tensor, positions: torch.Tensor):
        positions = positions.to(device=self.device, dtype=torch.int64)
        targets = self.tokens[positions + 1]
        log_q = torch.log_softmax(logits.to(device=self.device, dtype=torch.float64), dim=-1)
        terms = self._count_terms(positions)
        bucket = self._gate(terms[2], terms[3])
        lam = self.gate[bucket]
        return positions, targets, log_q, lam, bucket, terms

    @torch.no_grad()
    def nll(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """-log p_mix(val_tokens[p+1]) for each position p (float64 [N], logits' device)."""
        positions, targets, log_q, lam, bucket, terms = self._mixed(logits, positions)
        log_q_target = log_q.gather(1, targets[:, None])[:, 0]
        p_count = self.count_probability(positions, targets, terms)
        neural = torch.where(lam < 1.0, torch.log1p(-lam) + log_q_target, -math.inf)
        counted = torch.where(lam > 0.0, torch.log(lam) + torch.log(p_count), -math.inf)
        log_mix = torch.logaddexp(neural, counted)
        responsibility = torch.exp(counted - log_mix)
        self._pending[0].index_add_(0, bucket, responsibility)
        self._pending[1].index_add_(0, bucket, torch.ones_like(responsibility))
        return (-log_mix).to(logits.device)

    @torch.no_grad()
    def distribution(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The full mixed distribution p_mix [N, V] (float64) at these positions."""
        positions, targets, log_q, lam, bucket, terms = self._mixed(logits, positions)
        count = self.count_distribution(positions, terms)
        return (1.0 - lam)[:, None] * log_q.exp() + lam[:, None] * count

    @torch.no_grad()
    def advance(self, upto: int) -> None:
        """Add the targets of positions [advanced, upto) to the counts, fold the gate
        statistics gathered since the last call (summed over ranks) into λ. Collective when
        distributed: every rank must call it with the same `upto`."""
        upto = min(int(upto), self.tokens.numel() - 1)
        pending = dist.all_reduce_sum(self._pending.clone())
        self._pending.zero_()
        self.gate_responsibility += pending[0]
        self.gate_positions += pending[1]
        weight = self.prior + self.gate_positions
        self.gate = torch.where(weight > 0, (self.prior * self.lambda_init + self.gate_responsibility)
                                / weight.clamp(min=1e-300), self.lambda_init)
        if upto <= self.advanced:
            return
        positions = torch.arange(self.advanced, upto, device=self.device)
        targets = self.tokens[positions + 1]
        self.unigram += torch.bincount(targets, minlength=self.vocab_size)
        self.unigram_total = float(self.unigram.sum())
        self.unigram_unique = float((self.unigram > 0).sum())
        for k in range(1, self.order + 1):
            context, valid = self._contexts(positions, k)
            self.tables[k - 1].add(((context << self.bits) | targets)[valid])
        self.advanced = upto

    def state(self) -> dict:
        """Summary for logs: advanced point, table sizes, learned gate."""
        return {"advanced": self.advanced, "keys_per_order": [t.keys.numel() for t in self.tables],
                "gate": self.gate.tolist(), "gate_positions": self.gate_positions.tolist()}
