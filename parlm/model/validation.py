"""Plain validation of a model in bits per byte (SPEC 5.1), the score every stage reports.

Bits per byte makes models with different tokenizers comparable: the summed negative
log-likelihood of the validation tokens, in bits, divided by the number of UTF-8 bytes those
tokens stand for (SPEC 1.6-1.7):

    val_loss = sum(NLL nats) / N_tokens
    val_bpb  = sum(NLL nats) / (ln 2 * sum(bytes(target | prev)))

Sums are float64 and all-reduced across ranks; bytes come from the one byte accounting,
`parlm.data.accounting.byte_accounting(config)`: the SentencePiece tables for plain data, the
raw-text sidecar for CaseOps data, called alike as `count_bytes(target, prev, positions)`.
Training's periodic validation, the quantization statistics and the eval stage all call
`eval_val`; the sliding-window and TTT scorers of the eval stage live in `parlm.eval.scoring`
and `parlm.eval.ttt`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from parlm import dist
from parlm.config import Config
from parlm.dist import autocast_context, synchronize

LN2 = math.log(2.0)


@dataclass
class EvalResult:
    """One evaluation: mean NLL in nats per token, bits per byte, the token and byte counts
    behind them, and the wall time of the scoring loop in seconds (compile excluded when the
    caller warmed up first)."""

    loss: float
    bpb: float
    tokens: float
    bytes: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def loss_and_bpb(loss_sum: float, token_count: float, byte_count: float) -> tuple[float, float]:
    """(val_loss, val_bpb) = (Σnll/N, Σnll/(ln2·Σbytes)) from float sums (SPEC 1.7)."""
    if token_count <= 0 or byte_count <= 0:
        raise ValueError(f"nothing was scored (tokens={token_count}, bytes={byte_count}); "
                         f"the validation stream is too short for this seq_len/stride")
    return loss_sum / token_count, loss_sum / (LN2 * byte_count)


def device_byte_tables(byte_tables, device: torch.device):
    """The byte tables as torch tensors on `device` (accepts numpy-backed `ByteTables` or an
    object already converted with `.to_torch`)."""
    to_torch = getattr(byte_tables, "to_torch", None)
    return to_torch(device) if callable(to_torch) else byte_tables


# ----------------------------------------------------------------------------------------
# Plain evaluation (SPEC 5.1)

def plain_batch_plan(config: Config, total_tokens: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(first sequence, end sequence, sequences per batch) of this rank's plain evaluation.

    total_tokens // eval_seq_len non-overlapping sequences are split contiguously across
    ranks; each batch holds val_batch_tokens / (world_size · grad_accum_steps) tokens."""
    seq_len = config.eval_seq_len
    local_batch_tokens = config.val_batch_tokens // (world_size * config.grad_accum_steps(world_size))
    if local_batch_tokens < seq_len:
        raise ValueError(
            f"val_batch_tokens={config.val_batch_tokens} gives {local_batch_tokens} tokens per rank "
            f"per batch (world_size={world_size}, grad_accum_steps="
            f"{config.grad_accum_steps(world_size)}), less than one eval_seq_len={seq_len} "
            f"sequence; raise val_batch_tokens to at least "
            f"{seq_len * world_size * config.grad_accum_steps(world_size)}")
    total_seqs = total_tokens // seq_len
    seq_start, seq_end = dist.contiguous_share(total_seqs, rank, world_size)
    return seq_start, seq_end, local_batch_tokens // seq_len


def eval_val(config: Config, model, val_tokens: torch.Tensor, byte_tables, ctx) -> EvalResult:
    """Plain validation (SPEC 5.1): every position scored once with its in-sequence prefix.

    The stream val_tokens[0..T] (T+1 tokens) is cut into T // eval_seq_len sequences
    x = tokens[i·L : (i+1)·L], y = tokens[i·L+1 : (i+1)·L+1], split contiguously across
    ranks. `model(x, y)` returns the mean CE of a batch (bf16 autocast on CUDA), so
    Σnll += mean·n_tokens; bytes = count_bytes(y, x, positions of y in the stream). Returns
    loss = Σnll/N and bpb = Σnll/(ln2·Σbytes) over all ranks (float64 sums, all-reduced).
    `model` may be compiled; its train/eval mode is restored afterwards."""
    device = ctx.device
    seq_len = config.eval_seq_len
    total_tokens = val_tokens.numel() - 1
    seq_start, seq_end, batch_seqs = plain_batch_plan(config, total_tokens, ctx.rank, ctx.world_size)
    tables = device_byte_tables(byte_tables, device)
    local = val_tokens[seq_start * seq_len: seq_end * seq_len + 1].to(device=device, dtype=torch.int64)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    was_training = model.training
    model.eval()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for first in range(0, seq_end - seq_start, batch_seqs):
            last = min(first + batch_seqs, seq_end - seq_start)
            chunk = local[first * seq_len: last * seq_len + 1]
            x = chunk[:-1].reshape(-1, seq_len)
            y = chunk[1:].reshape(-1, seq_len)
            with autocast_context(device):
                batch_loss = model(x, y).detach()
            sums[0] += batch_loss.to(torch.float64) * y.numel()
            sums[1] += y.numel()
            # y starts at stream position (seq_start + first)·L + 1 and runs on contiguously
            first_target = (seq_start + first) * seq_len + 1
            sums[2] += tables.count_bytes(y, x, first_target).to(torch.float64).sum()
    dist.all_reduce_sum(sums)
    synchronize(device)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    nll_sum, tokens, nbytes = (float(v) for v in sums.tolist())
    loss, bpb = loss_and_bpb(nll_sum, tokens, nbytes)
    return EvalResult(loss=loss, bpb=bpb, tokens=tokens, bytes=nbytes, seconds=seconds)
