"""Sliding-window validation in bits per byte (SPEC 5.2); plain scoring (SPEC 5.1) is
`parlm.model.validation.eval_val`.

The BPB formula and why it is tokenizer-agnostic: `parlm.model.validation`.
Sums are float64 and all-reduced across ranks; bytes come from the one byte accounting,
`parlm.data.accounting.byte_accounting(config)` (tables or raw-text sidecar), charged by the
stream position of each target. Score-first TTT (SPEC 5.3) lives in `parlm.eval.ttt`;
`evaluate_run` (the pipeline's "eval" stage, `python -m parlm.eval --run-dir DIR`) is
implemented in `parlm.eval.stage`.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from parlm import dist
from parlm.config import Config, compile_enabled
from parlm.dist import autocast_context, synchronize
# The plain scorer is shared with training and quantization, so it lives below them; it is
# imported here too because the eval stage scores plain, sliding and TTT side by side.
from parlm.model.validation import (EvalResult, device_byte_tables, eval_val,  # noqa: F401
                                    loss_and_bpb, plain_batch_plan)

# ----------------------------------------------------------------------------------------
# Sliding windows (SPEC 5.2): planning is pure arithmetic

def count_windows(total_tokens: int, seq_len: int, stride: int) -> int:
    """Number of window starts ws = 0, stride, 2·stride, ... with ws + (seq_len − stride) < T."""
    context = seq_len - stride
    if total_tokens <= context:
        return 0
    return -(-(total_tokens - context) // stride)


def window_starts(total_tokens: int, seq_len: int, stride: int) -> np.ndarray:
    """All window starts (int64): ws = k·stride for k < count_windows(T, seq_len, stride)."""
    return np.arange(count_windows(total_tokens, seq_len, stride), dtype=np.int64) * stride


def scored_span(window_start: int, total_tokens: int, seq_len: int, stride: int) -> tuple[int, int]:
    """[first, end) input positions scored by one window: the first window scores
    [0, min(L, T)); window ws > 0 scores its last stride positions [ws+L−stride, min(ws+L, T)).
    Position p predicts target token p+1."""
    end = min(window_start + seq_len, total_tokens)
    return (0 if window_start == 0 else window_start + seq_len - stride), end


def plan_ttt_chunks(total_tokens: int, seq_len: int, stride: int, chunk_tokens: int) -> np.ndarray:
    """Window-index bounds of the TTT chunks (SPEC 5.3): chunk ci owns windows
    bounds[ci]:bounds[ci+1], those whose first scored position s has
    min(s // chunk_tokens, num_chunks − 1) == ci, with num_chunks = ceil(T / chunk_tokens).
    Windows are in stream order, so every chunk's windows are a contiguous index range."""
    num_chunks = -(-total_tokens // chunk_tokens)
    starts = window_starts(total_tokens, seq_len, stride)
    first_scored = np.where(starts == 0, 0, starts + seq_len - stride)
    chunk_of_window = np.minimum(first_scored // chunk_tokens, num_chunks - 1)
    return np.searchsorted(chunk_of_window, np.arange(num_chunks + 1), side="left").astype(np.int64)


# ----------------------------------------------------------------------------------------
# Window scorer shared by sliding evaluation and TTT scoring

class WindowScorer:
    """Scores runs of sliding windows with the LM head and cross-entropy computed only at
    scored positions, in fixed-shape batches built on the device (no host syncs).

    Window ws reads x = tokens[ws : ws+L] and y = tokens[ws+1 : ws+L+1] (positions past T are
    zero, as in the reference; causal attention keeps them out of scored positions). Every
    window contributes its last `stride` positions; window 0 also contributes [0, L−stride)
    from the same forward pass. Per position: nll = CE(float(softcap logits), y) with the
    forward under bf16 autocast on CUDA, i.e. the reference's `forward_logits` + fp32 CE,
    restricted to the rows that are scored. A short final batch is padded to the fixed batch
    size with masked rows, so the compiled forward (`forward_hidden`, one graph) and the two
    small head graphs (last `stride` rows of every window; first L−stride rows of window 0)
    each see one shape.
    """

    def __init__(self, config: Config, model, tokens: torch.Tensor, byte_tables, device,
                 batch_seqs: int | None = None, compile: bool | None = None,
                 compile_mode: str | None = None):
        self.model = model
        self.device = torch.device(device)
        self.tokens = tokens.to(device=self.device, dtype=torch.int64)  # [T+1]
        self.total_tokens = self.tokens.numel() - 1
        self.seq_len = config.eval_seq_len
        self.stride = config.eval_stride
        self.context = self.seq_len - self.stride
        self.batch_seqs = batch_seqs or config.eval_batch_seqs
        self.tables = device_byte_tables(byte_tables, self.device)
        self.offsets = torch.arange(self.seq_len + 1, device=self.device)
        self.slots = torch.arange(self.batch_seqs, device=self.device)
        self.tail_offsets = torch.arange(self.context, self.seq_len, device=self.device)
        self.head_offsets = torch.arange(0, self.context, device=self.device)
        self.mixture_seconds = 0.0  # time spent inside mixture.nll (synchronized)
        self.compiled = compile_enabled(config, self.device) if compile is None else compile
        mode = compile_mode or config.eval_compile_mode
        if self.compiled:
            kwargs = dict(dynamic=False, fullgraph=True)
            if mode and mode != "default":
                kwargs["mode"] = mode
            self._hidden_fn = torch.compile(model.forward_hidden, **kwargs)
            self._tail_fn = torch.compile(self._score_tail, dynamic=False, fullgraph=True)
            self._head_fn = torch.compile(self._score_head, dynamic=False, fullgraph=True)
        else:
            self._hidden_fn = model.forward_hidden
            self._tail_fn, self._head_fn = self._score_tail, self._score_head

    # -- head + cross-entropy at the scored rows (compiled when enabled) ---------------------
    def _score_tail(self, hidden: torch.Tensor, y: torch.Tensor):
        logits = self.model.logits_from_hidden(hidden[:, self.context:])
        nll = F.cross_entropy(logits.float().flatten(0, 1), y[:, self.context:].flatten(), reduction="none")
        return nll.view(hidden.shape[0], self.stride), logits

    def _score_head(self, hidden: torch.Tensor, y: torch.Tensor):
        logits = self.model.logits_from_hidden(hidden[:1, :self.context])
        nll = F.cross_entropy(logits.float().flatten(0, 1), y[:1, :self.context].flatten(), reduction="none")
        return nll.view(1, self.context), logits

    # -- batches -----------------------------------------------------------------------------
    def _windows(self, starts: torch.Tensor):
        """x, y [B, L] for window starts [B]; zero where the position is >= T (as the
        reference's zero-filled short windows)."""
        index = starts[:, None] + self.offsets[None, :]
        tokens = self.tokens[index.clamp(max=self.total_tokens)]
        valid = index[:, :-1] < self.total_tokens
        return torch.where(valid, tokens[:, :-1], 0), torch.where(valid, tokens[:, 1:], 0)

    def warmup(self) -> None:
        """Compile the three graphs on a dummy batch of token id 0 (no-op when not compiled)."""
        if not self.compiled:
            return
        x = torch.zeros(self.batch_seqs, self.seq_len, dtype=torch.int64, device=self.device)
        with torch.no_grad(), autocast_context(self.device):
            hidden = self._hidden_fn(x)
            self._tail_fn(hidden, x)
            self._head_fn(hidden, x)
        synchronize(self.device)

    def score(self, first_window: int, end_window: int, sums: torch.Tensor,
              nll_out: torch.Tensor | None = None, mixture=None, mix_out: torch.Tensor | None = None,
              on_score: Callable | None = None, progress=None) -> None:
        """Score windows with indices [first_window, end_window) (start = index·stride).

        Adds Σnll, token count and Σbytes into `sums` (float64 [3], or [4] with Σ mixed nll when
        `mixture` is given). `nll_out` (float32 [T+1]) receives each scored position's NLL at
        its position (index T is a scratch slot for masked rows). With `mixture`, its
        `.nll(logits, positions)` scores the same positions into `mix_out` (float64 [T+1]).
        `on_score(positions, nll)` is an instrumentation hook called with the valid scored
        positions of every batch (tests use it to count positions)."""
        outputs = (sums, nll_out, mixture, mix_out, on_score)
        for batch_first in range(first_window, end_window, self.batch_seqs):
            count = min(self.batch_seqs, end_window - batch_first)
            live = self.slots < count
            starts = torch.where(live, self.slots + batch_first, first_window) * self.stride
            x, y = self._windows(starts)
            with torch.no_grad():
                with autocast_context(self.device):
                    hidden = self._hidden_fn(x)
                    nll, logits = self._tail_fn(hidden, y)
                self._collect(nll, logits, starts, self.tail_offsets, live, x, y, *outputs)
                if batch_first == 0:  # window 0 also scores its first L - stride positions
                    with autocast_context(self.device):
                        nll, logits = self._head_fn(hidden, y)
                    self._collect(nll, logits, starts[:1], self.head_offsets, live[:1], x[:1], y[:1], *outputs)
            if progress is not None:
                progress.update(count)

    def _collect(self, nll, logits, starts, offsets, live, x, y, sums, nll_out, mixture, mix_out, on_score):
        """Accumulate one graph's scored rows (masked: padded windows, positions >= T)."""
        positions = starts[:, None] + offsets[None, :]
        mask = live[:, None] & (positions < self.total_tokens)
        weight = mask.to(torch.float64)
        # input position p predicts the token at stream position p + 1
        n_bytes = self.tables.count_bytes(y[:, offsets], x[:, offsets], positions + 1)
        sums[:3] += torch.stack([(nll.to(torch.float64) * weight).sum(), weight.sum(),
                                 (n_bytes.to(torch.float64) * weight).sum()])
        if nll_out is not None:
            slot = torch.where(mask, positions, self.total_tokens).flatten()
            nll_out.index_copy_(0, slot, nll.flatten().to(nll_out.dtype))
        if mixture is not None or on_score is not None:
            flat = mask.flatten()
            kept = positions.flatten()[flat]
            if mixture is not None:
                synchronize(self.device)
                mixture_start = time.perf_counter()
                mixed = mixture.nll(logits.flatten(0, 1)[flat].float(), kept)
                mixed = torch.as_tensor(mixed, dtype=torch.float64, device=self.device)
                synchronize(self.device)
                self.mixture_seconds += time.perf_counter() - mixture_start
                sums[3] += mixed.sum()
                if mix_out is not None:
                    mix_out[kept] = mixed
            if on_score is not None:
                on_score(kept, nll.flatten()[flat])


def eval_val_sliding(config: Config, model, val_tokens: torch.Tensor, byte_tables, ctx,
                     scorer: WindowScorer | None = None, on_score: Callable | None = None,
                     nll_out: torch.Tensor | None = None, show_progress: bool = False) -> EvalResult:
    """Sliding-window validation (SPEC 5.2): windows of L = eval_seq_len tokens every
    stride = eval_stride tokens, starts ws with ws + L − stride < T; window 0 scores [0, L),
    every other window its last `stride` positions, so the scored positions tile [0, T)
    exactly once. Windows are split contiguously across ranks. loss = Σnll/N,
    bpb = Σnll/(ln2·Σbytes) (float64 sums, all-reduced). Pass a warmed-up `scorer` to keep
    compile time out of `seconds`; `nll_out` (float32 [T+1]) receives per-position NLLs."""
    device = ctx.device
    scorer = scorer or WindowScorer(config, model, val_tokens, byte_tables, device)
    total = scorer.total_tokens
    n_windows = count_windows(total, scorer.seq_len, scorer.stride)
    first, end = dist.contiguous_share(n_windows, ctx.rank, ctx.world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    progress = None
    if show_progress and ctx.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=end - first, desc="sliding windows", unit="win", leave=False)
    synchronize(device)
    t0 = time.perf_counter()
    scorer.score(first, end, sums, nll_out=nll_out, on_score=on_score, progress=progress)
    dist.all_reduce_sum(sums)
    synchronize(device)
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    model.train(was_training)
    nll_sum, tokens, nbytes = (float(v) for v in sums.tolist())
    loss, bpb = loss_and_bpb(nll_sum, tokens, nbytes)
    return EvalResult(loss=loss, bpb=bpb, tokens=tokens, bytes=nbytes, seconds=seconds)
