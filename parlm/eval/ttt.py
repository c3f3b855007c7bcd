"""Score-first test-time training (SPEC 5.3), the headline metric.

The validation stream is cut into chunks of `ttt_chunk_tokens` scored positions. For each
chunk, in stream order:

1. **Score** its sliding windows (SPEC 5.2; eval mode, no grad, compiled), split
   contiguously across ranks. These NLLs are the score; nothing later revises them.
2. **Then train** on the chunk (never on the last one): its ⌊(end − start)/L⌋ aligned
   L-token sequences, split contiguously across ranks, `ttt_epochs` passes, one SGD step per
   minibatch of `ttt_batch_seqs` sequences: bf16-autocast forward/backward, gradients averaged
   across ranks, global-norm clip `ttt_grad_clip_norm`, SGD(momentum `ttt_momentum`) at
   lr_ci = ttt_lr · ½(1 + cos(π·ci/(num_chunks − 1))). All parameters train; one optimizer
   (one momentum buffer) serves the whole pass.

Training targets are positions [chunk_start, chunk_start + n·L] ⊂ positions already scored,
so every score depends only on the artifact and the strict prefix (Issue #1017 C1-C4).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist

from parlm import dist
from parlm.config import Config, compile_enabled
from parlm.dist import autocast_context, synchronize
from parlm.eval.scoring import WindowScorer, plan_ttt_chunks
from parlm.model.validation import EvalResult, loss_and_bpb


@dataclass
class TTTResult:
    """Outcome of one score-first TTT pass.

    `result` is the neural score. `chunks` has one dict per chunk: chunk, start, end, tokens,
    bytes, loss, bpb (scored before the chunk's update: these numbers make up the score), lr
    (0 for the untrained last chunk) and, only when the diagnostic was requested,
    `diagnostic_bpb_after_update` (the chunk re-scored after training on it; never part of the
    score). On rank 0, `nll` (float64 [T], nats, stream order) and `nll_mix`; `mix` is the
    valid mixture's score when one ran."""

    result: EvalResult
    chunks: list[dict]
    nll: np.ndarray | None = None
    nll_mix: np.ndarray | None = None
    mix: EvalResult | None = None
    extra: dict = field(default_factory=dict)


def chunk_learning_rate(config: Config, chunk_index: int, num_chunks: int) -> float:
    """lr_ci = ttt_lr · ½(1 + cos(π·ci / max(num_chunks − 1, 1))) (cosine across chunks)."""
    return config.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * chunk_index / max(num_chunks - 1, 1)))


def training_minibatches(config: Config, chunk_start: int, chunk_end: int, rank: int,
                         world_size: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of this rank's minibatches for one epoch on a chunk: the
    ⌊(chunk_end − chunk_start)/L⌋ aligned sequences split contiguously across ranks, then cut
    into groups of `ttt_batch_seqs`; a range covers inputs [start, end) and targets shifted by
    one, so the last target position is end (≤ chunk_end)."""
    seq_len = config.eval_seq_len
    chunk_seqs = (chunk_end - chunk_start) // seq_len
    first, end = dist.contiguous_share(chunk_seqs, rank, world_size)
    ranges = []
    for batch_first in range(first, end, config.ttt_batch_seqs):
        batch_end = min(batch_first + config.ttt_batch_seqs, end)
        ranges.append((chunk_start + batch_first * seq_len, chunk_start + batch_end * seq_len))
    return ranges


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average every parameter's gradient across ranks: one flat float32 SUM all-reduce, then
    ÷ world_size and a cast back to each gradient's dtype. Equivalent to the reference's
    per-tensor AVG, but bf16 gradients (the embedding) are summed in float32. Missing
    gradients count as zeros."""
    if world_size <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat.div_(world_size)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def warmup_tokens(batch: int, seq_len: int, vocab_size: int, device, seed: int = 0):
    """(x, y) int64 [batch, seq_len] of uniform random token ids from a fixed seed: the
    compile warm-up's inputs, which by construction carry no validation data (#1530)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (2, batch, seq_len), generator=generator)
    return tokens[0].to(device), tokens[1].to(device)


class PhaseTimer:
    """Summed wall time of labelled phases without host syncs inside the loop: CUDA events
    read once in `totals` on CUDA, perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.spans: dict[str, list] = {}
        self.open: dict[str, object] = {}

    def start(self, label: str) -> None:
        self.open[label] = dist.timing_mark(self.cuda)

    def stop(self, label: str) -> None:
        self.spans.setdefault(label, []).append((self.open.pop(label), dist.timing_mark(self.cuda)))

    def totals(self) -> dict[str, float]:
        """Seconds per label (synchronizes once on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000.0 for k, v in self.spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.spans.items()}


class TTTTrainer:
    """The training half of TTT: one SGD(momentum) optimizer over all parameters and a
    (optionally compiled) forward `model(x, y) -> mean CE` under bf16 autocast."""

    def __init__(self, config: Config, model, ctx, compile: bool | None = None):
        self.config, self.model, self.ctx = config, model, ctx
        self.params = list(model.parameters())
        for p in self.params:
            p.requires_grad_(True)
        use_compile = compile_enabled(config, ctx.device) if compile is None else compile
        self.compiled = use_compile and config.ttt_compile_train
        self.forward = torch.compile(model, dynamic=False, fullgraph=True) if self.compiled else model
        self.optimizer = torch.optim.SGD(self.params, lr=config.ttt_lr, momentum=config.ttt_momentum)

    def warmup(self, batch_sizes: set[int]) -> None:
        """Compile the train-mode forward/backward for each minibatch size on seeded random
        tokens (`warmup_tokens`: never validation data, #1530) without stepping the optimizer
        (gradients are dropped); no-op when not compiled."""
        if not self.compiled:
            return
        self.model.train()
        for size in sorted(batch_sizes):
            x, y = warmup_tokens(size, self.config.eval_seq_len, self.config.vocab_size, self.ctx.device)
            with autocast_context(self.ctx.device):
                loss = self.forward(x, y)
            loss.backward()
        for p in self.params:
            p.grad = None
        synchronize(self.ctx.device)

    def step(self, tokens: torch.Tensor, start: int, end: int, lr: float,
             on_train: Callable | None = None) -> None:
        """One SGD step on inputs tokens[start:end], targets tokens[start+1:end+1]."""
        seq_len = self.config.eval_seq_len
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if end > start:
            x = tokens[start:end].view(-1, seq_len)
            y = tokens[start + 1:end + 1].view(-1, seq_len)
            if on_train is not None:  # positions start..end-1 (targets start+1..end)
                on_train(start, end - 1)
            with autocast_context(self.ctx.device):
                loss = self.forward(x, y)
            loss.backward()
        average_gradients(self.params, self.ctx.world_size)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.ttt_grad_clip_norm)
        self.optimizer.step()


@dataclass
class _ChunkLoop:
    """One score-first pass over the chunks (module docstring): what it runs (model, scorer,
    trainer, the valid `mixture`, the hooks) and what it gathers on this rank: `chunk_sums[ci]`
    = (Σnll, tokens, bytes[, mixed Σnll]) as scored before chunk ci's update, `after_sums` the
    after-update diagnostic, the per-position buffers `nll_out` / `mix_out`, each chunk's lr,
    the score/train timer and the work counts."""

    config: Config
    model: torch.nn.Module
    scorer: WindowScorer
    trainer: TTTTrainer
    ctx: object
    bounds: np.ndarray  # window index where each chunk starts (plan_ttt_chunks)
    mixture: object = None
    on_score: Callable | None = None
    on_train: Callable | None = None
    diagnostic_after: bool = False
    chunk_sums: torch.Tensor = field(init=False)
    after_sums: torch.Tensor | None = field(init=False)
    nll_out: torch.Tensor = field(init=False)
    mix_out: torch.Tensor | None = field(init=False)
    lrs: list[float] = field(init=False)
    timer: PhaseTimer = field(init=False)
    diagnostic_seconds: float = 0.0
    score_batches: int = 0
    train_sequences: int = 0
    train_steps: int = 0

    def __post_init__(self):
        device, total, chunks = self.ctx.device, self.scorer.total_tokens, self.num_chunks
        width = 4 if self.mixture is not None else 3
        self.chunk_sums = torch.zeros(chunks, width, dtype=torch.float64, device=device)
        self.after_sums = (torch.zeros(chunks, 3, dtype=torch.float64, device=device)
                           if self.diagnostic_after else None)
        self.nll_out = torch.zeros(total + 1, dtype=torch.float32, device=device)
        self.mix_out = (torch.zeros(total + 1, dtype=torch.float64, device=device)
                        if self.mixture is not None else None)
        self.lrs = [0.0] * chunks
        self.timer = PhaseTimer(device)  # score / train split of the loop, for the budget planner

    @property
    def num_chunks(self) -> int:
        return len(self.bounds) - 1

    def windows(self, ci: int) -> tuple[int, int]:
        """[first, end) window indices of chunk ci that this rank scores (a contiguous share)."""
        first, end = dist.contiguous_share(int(self.bounds[ci + 1] - self.bounds[ci]), self.ctx.rank,
                                           self.ctx.world_size)
        return int(self.bounds[ci]) + first, int(self.bounds[ci]) + end

    def chunk_tokens(self, ci: int) -> tuple[int, int]:
        """[start, end) scored positions of chunk ci."""
        chunk_tokens = self.config.ttt_chunk_tokens
        return ci * chunk_tokens, min((ci + 1) * chunk_tokens, self.scorer.total_tokens)

    def trains_after(self, ci: int) -> bool:
        """Whether chunk ci is trained on once scored (every chunk but the last, with epochs)."""
        return ci < self.num_chunks - 1 and self.config.ttt_epochs > 0

    def score(self, ci: int) -> None:
        """Score chunk ci's windows (eval mode) into its sums and the position buffers; then the
        mixture, if any, takes the chunk's tokens into its counts."""
        first, end = self.windows(ci)
        self.model.eval()
        self.timer.start("score")
        self.scorer.score(first, end, self.chunk_sums[ci], nll_out=self.nll_out,
                          mixture=self.mixture, mix_out=self.mix_out, on_score=self.on_score)
        self.timer.stop("score")
        self.score_batches += -(-(end - first) // self.scorer.batch_seqs)
        if self.mixture is not None:
            self.mixture.advance(self.chunk_tokens(ci)[1])

    def train(self, ci: int) -> None:
        """Train on the scored chunk ci at lr_ci (`chunk_learning_rate`, `train_on_chunk`)."""
        self.lrs[ci] = chunk_learning_rate(self.config, ci, self.num_chunks)
        self.timer.start("train")
        sequences, steps = train_on_chunk(self.config, self.model, self.trainer, self.scorer.tokens,
                                          *self.chunk_tokens(ci), self.lrs[ci], self.ctx,
                                          self.on_train)
        self.timer.stop("train")
        self.train_sequences, self.train_steps = self.train_sequences + sequences, self.train_steps + steps

    def rescore(self, ci: int) -> None:
        """The after-update diagnostic: chunk ci scored again, into `after_sums` only (never the
        score), timed apart."""
        self.diagnostic_seconds += _rescore(self.model, self.scorer, *self.windows(ci),
                                            self.after_sums[ci], self.ctx.device)

    def reduce(self) -> None:
        """Sum the per-chunk sums over ranks."""
        dist.all_reduce_sum(self.chunk_sums)
        if self.after_sums is not None:
            dist.all_reduce_sum(self.after_sums)

    def result(self, seconds: float, compile_seconds: float, mixture_seconds: float) -> TTTResult:
        """The TTTResult of the reduced sums (`chunk_records`, `_ttt_result`); its `extra` holds
        the warm-up's, the diagnostic's and the mixture's seconds, this rank's phase seconds and
        work counts."""
        chunks = chunk_records(self.chunk_sums.tolist(),
                               self.after_sums.tolist() if self.after_sums is not None else None,
                               self.lrs, self.config.ttt_chunk_tokens, self.scorer.total_tokens)
        extra = {"compile_seconds": compile_seconds, "num_chunks": self.num_chunks,
                 "diagnostic_seconds": self.diagnostic_seconds, "mixture_seconds": mixture_seconds,
                 **phase_counts(self.timer, self.score_batches, self.train_sequences, self.train_steps)}
        return _ttt_result(self.chunk_sums, chunks, self.nll_out, self.mix_out, seconds,
                           self.scorer.total_tokens, self.ctx, extra)


def eval_val_ttt(config: Config, model, val_tokens: torch.Tensor, byte_tables, ctx,
                 mixture=None, diagnostic_after: bool = False, warmup: bool = True,
                 on_score: Callable | None = None, on_train: Callable | None = None,
                 show_progress: bool = False, scorer: WindowScorer | None = None) -> TTTResult:
    """Score-first TTT over the validation stream (SPEC 5.3; module docstring).

    `model` is adapted in place (pass the artifact's weights, unchanged). loss = Σnll/N and
    bpb = Σnll/(ln2·Σbytes) over the positions as scored before each chunk's update. With a
    valid `mixture` (`TokenNgramMixture`), every rank calls `mixture.nll(logits, positions)`
    on its scored positions and `mixture.advance(chunk_end)` after each chunk, and the mixed
    score is returned in `mix`. Per-position NLLs are reduced to rank 0 (a reduce, not an
    all-reduce). `warmup` compiles on dummy batches first and reports that time separately in
    `extra["compile_seconds"]`. The optional after-update diagnostic is timed apart
    (`extra["diagnostic_seconds"]`, excluded from `result.seconds`); time inside the mixture's
    `nll` is included in `result.seconds` and also reported alone (`extra["mixture_seconds"]`,
    synchronized calls). `on_score(positions, nll)` and `on_train(first_position,
    last_position)` (position p predicts token p+1) are instrumentation hooks for the
    compliance tests. `scorer` may be a WindowScorer already built (and compiled) over this
    `model` and `val_tokens` by the sliding stage: its graphs are reused instead of compiled
    again; the model's weights must still be the artifact's."""
    # The clock stays in this function, the steps behind named calls: what runs on it
    # (synchronize, t0, each chunk's score and train) and what is kept off it (the compile
    # warm-up before, the after-update diagnostic's seconds taken out) read together.
    if scorer is None:
        scorer = WindowScorer(config, model, val_tokens, byte_tables, ctx.device)
    elif scorer.model is not model:
        raise ValueError("eval_val_ttt: the given scorer wraps another model than the one to adapt")
    mixture_seconds_before = scorer.mixture_seconds  # a reused scorer carries its own count
    bounds = plan_ttt_chunks(scorer.total_tokens, config.eval_seq_len, config.eval_stride,
                             config.ttt_chunk_tokens)
    trainer = TTTTrainer(config, model, ctx)
    compile_seconds = (_warm_up(config, model, scorer, trainer, len(bounds) - 1, scorer.total_tokens, ctx)
                       if warmup else 0.0)
    loop = _ChunkLoop(config, model, scorer, trainer, ctx, bounds, mixture, on_score, on_train,
                      diagnostic_after)
    progress = None
    if show_progress and ctx.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=loop.num_chunks, desc="TTT chunks", unit="chunk", leave=False)
    synchronize(ctx.device)
    t0 = time.perf_counter()
    for ci in range(loop.num_chunks):
        loop.score(ci)
        if loop.trains_after(ci):
            loop.train(ci)
            if diagnostic_after:  # diagnostic only: re-scores the chunk, never enters the score
                loop.rescore(ci)
        if progress is not None:
            progress.update(1)
    loop.reduce()
    synchronize(ctx.device)
    seconds = time.perf_counter() - t0 - loop.diagnostic_seconds
    if progress is not None:
        progress.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return loop.result(seconds, compile_seconds, scorer.mixture_seconds - mixture_seconds_before)


def _warm_up(config: Config, model, scorer: WindowScorer, trainer: TTTTrainer, num_chunks: int,
             total: int, ctx) -> float:
    """Compile the scorer and the trainer on dummy batches of every shape the TTT loop will
    use; returns the seconds spent (reported apart from the scoring time)."""
    t0 = time.perf_counter()
    model.eval()
    scorer.warmup()
    chunk_tokens = config.ttt_chunk_tokens
    sizes = {(end - start) // config.eval_seq_len
             for ci in range(num_chunks - 1) if config.ttt_epochs > 0
             for start, end in training_minibatches(
                 config, ci * chunk_tokens, min((ci + 1) * chunk_tokens, total), ctx.rank, ctx.world_size)}
    trainer.warmup({s for s in sizes if s > 0})
    return time.perf_counter() - t0


def train_on_chunk(config: Config, model, trainer: TTTTrainer, tokens: torch.Tensor, chunk_start: int,
                   chunk_end: int, lr: float, ctx, on_train: Callable | None) -> tuple[int, int]:
    """`ttt_epochs` passes of SGD over this rank's minibatches of the already scored chunk; every
    rank takes the same number of synchronous steps (an empty range where it has fewer).
    Returns (sequences trained on, optimizer steps) of this rank."""
    ranges = training_minibatches(config, chunk_start, chunk_end, ctx.rank, ctx.world_size)
    steps = max(len(training_minibatches(config, chunk_start, chunk_end, r, ctx.world_size))
                for r in range(ctx.world_size))  # same synchronous step count on every rank
    model.train()
    sequences = 0
    for _ in range(config.ttt_epochs):
        for index in range(steps):
            start, stop = ranges[index] if index < len(ranges) else (chunk_start, chunk_start)
            trainer.step(tokens, start, stop, lr, on_train=on_train)
            sequences += (stop - start) // config.eval_seq_len
    return sequences, config.ttt_epochs * steps


def _rescore(model, scorer: WindowScorer, first: int, end: int, sums: torch.Tensor, device) -> float:
    """Score windows [first, end) again into `sums` (the after-update diagnostic); its seconds."""
    synchronize(device)
    start = time.perf_counter()
    model.eval()
    scorer.score(first, end, sums)
    synchronize(device)
    return time.perf_counter() - start


def _ttt_result(chunk_sums: torch.Tensor, chunks: list[dict], nll_out: torch.Tensor,
                mix_out: torch.Tensor | None, seconds: float, total: int, ctx, extra: dict) -> TTTResult:
    """The TTTResult from the all-reduced per-chunk sums (nll, tokens, bytes[, mixed nll]) and
    the per-position buffers (reduced to rank 0)."""
    totals = chunk_sums.sum(0).tolist()
    loss, bpb = loss_and_bpb(totals[0], totals[1], totals[2])
    result = EvalResult(loss=loss, bpb=bpb, tokens=totals[1], bytes=totals[2], seconds=seconds)
    mix = None
    if mix_out is not None:
        mix_loss, mix_bpb = loss_and_bpb(totals[3], totals[1], totals[2])
        mix = EvalResult(loss=mix_loss, bpb=mix_bpb, tokens=totals[1], bytes=totals[2], seconds=seconds)
    nll = reduce_to_main(nll_out, ctx)
    nll_mix = reduce_to_main(mix_out, ctx) if mix_out is not None else None
    return TTTResult(result=result, chunks=chunks,
                     nll=None if nll is None else nll[:total].astype(np.float64),
                     nll_mix=None if nll_mix is None else nll_mix[:total].astype(np.float64),
                     mix=mix, extra=extra)


def phase_counts(timer: PhaseTimer, score_batches: int, train_sequences: int, train_steps: int) -> dict:
    """This rank's score/train seconds and work counts (the planner's measured costs)."""
    totals = timer.totals()
    return {"score_seconds": totals.get("score", 0.0), "train_seconds": totals.get("train", 0.0),
            "score_batches": score_batches, "train_sequences": train_sequences, "train_steps": train_steps}


def reduce_to_main(buffer: torch.Tensor, ctx) -> np.ndarray | None:
    """SUM-reduce a per-position buffer (each position written by exactly one rank, zeros
    elsewhere, so the sum is exact) to rank 0; numpy on rank 0, None on other ranks."""
    if ctx.world_size > 1:
        torch_dist.reduce(buffer, dst=0, op=torch_dist.ReduceOp.SUM)
    return buffer.cpu().numpy() if ctx.is_main else None


def chunk_records(sums: list[list[float]], after: list[list[float]] | None, lrs: list[float],
                  chunk_tokens: int, total: int) -> list[dict]:
    """Per-chunk dicts: the scored numbers (before the chunk's update) and, if measured, the
    labelled after-update diagnostic."""
    records = []
    for ci, row in enumerate(sums):
        loss, bpb = loss_and_bpb(row[0], row[1], row[2]) if row[1] > 0 else (float("nan"),) * 2
        record = {"chunk": ci, "start": ci * chunk_tokens, "end": min((ci + 1) * chunk_tokens, total),
                  "tokens": row[1], "bytes": row[2], "loss": loss, "bpb": bpb, "lr": lrs[ci]}
        if len(row) > 3 and row[1] > 0:
            record["mix_bpb"] = loss_and_bpb(row[3], row[1], row[2])[1]
        if after is not None and after[ci][1] > 0:
            record["diagnostic_bpb_after_update"] = loss_and_bpb(*after[ci])[1]
        records.append(record)
    return records
