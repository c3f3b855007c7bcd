"""Training batches with the reference's sampling semantics (SPEC 1.5, "ShuffledSequenceLoader").

Each rank owns the shards `sorted(train files)[rank::world_size]`. Every shard is cut, from a
random phase in [0, min(seq_len-1, N-seq_len-1)], into floor((N-1-phase)/seq_len) windows of
seq_len+1 tokens whose order is a random permutation consumed from its end. A sequence is
drawn by picking a shard with probability proportional to its remaining windows and popping
one window; when every shard of the rank is exhausted, all are re-phased and re-permuted.

The only change from the reference is the seed: with data_order "seed_and_rank" the generator
is PCG64([seed, rank]), so SEED changes the data order; "rank" uses PCG64(rank) exactly as the
reference does (every seed then sees the same token stream). The random draws happen in the
reference's order (integers, permutation per shard; one `choice` per sequence), so "rank" mode
reproduces the reference's windows exactly.

Progressive training context (#2014, `train_seq_schedule`): `train_seq_len_at` gives the
length of each training fraction, and `ShuffledSequenceLoader.set_seq_len` re-cuts the windows
that are still unused at the new length, so a length change repeats no token of the pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from parlm.data.shards import open_shard, shard_files


def sampler_generator(data_order: str, seed: int, rank: int) -> np.random.Generator:
    """The per-rank NumPy generator: PCG64([seed, rank]) for "seed_and_rank", PCG64(rank) for
    "rank" (the reference)."""
    if data_order == "seed_and_rank":
        return np.random.Generator(np.random.PCG64([int(seed), int(rank)]))
    if data_order == "rank":
        return np.random.Generator(np.random.PCG64(int(rank)))
    raise ValueError(f"data_order={data_order!r} must be 'seed_and_rank' or 'rank'")


def train_seq_len_at(config, fraction: float) -> int:
    """Training sequence length at training progress `fraction` (#2014 TRAIN_SEQ_SCHEDULE):
    the length of the first stage (fraction_i, len_i) of `config.train_seq_stages()` (sorted,
    the last at 1.0) with fraction <= fraction_i, the last length past 1.0. With an empty
    schedule, train_seq_len. #2014: "1024@0.1,2048@0.7,3072@1.0" -> 1024 up to 10% of the
    budget, 2048 up to 70%, then 3072."""
    stages = config.train_seq_stages()
    for threshold, length in stages:
        if fraction <= threshold:
            return length
    return stages[-1][1]


class ShuffledSequenceLoader:
    """Draws [B, seq_len] (x, y) training batches from this rank's shards (SPEC 1.5).

    Reads are slice copies out of cached memmaps; on CUDA the batch is staged in pinned host
    memory and copied with non_blocking=True, so the host does not wait for the transfer.
    """

    def __init__(self, config, rank: int = 0, world_size: int = 1, device="cpu"):
        self.seq_len = train_seq_len_at(config, 0.0)  # train_seq_len without a schedule
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.device = torch.device(device)
        all_files = shard_files(config.train_files)
        self.files: list[Path] = all_files[rank::world_size]
        if not self.files:
            raise ValueError(f"rank {rank} of {world_size} gets no training shard: only "
                             f"{len(all_files)} files match {config.train_files}; use at most "
                             f"{len(all_files)} processes or more, smaller shards")
        self.rng = sampler_generator(config.data_order, config.seed, rank)
        self.memmaps = [open_shard(path) for path in self.files]
        self.num_tokens = [len(m) for m in self.memmaps]
        self.start_inds: list[np.ndarray] = [np.zeros(0, np.int64)] * len(self.files)
        self.remaining = np.zeros(len(self.files), dtype=np.int64)
        self.epochs = 0  # how many times the shards were (re-)phased
        self._reset_all()
        self._pin = self.device.type == "cuda"

    def _reset_shard(self, shard: int) -> None:
        """New random phase and window permutation for one shard (reference draw order)."""
        num_tokens = self.num_tokens[shard]
        max_phase = min(self.seq_len - 1, max(0, num_tokens - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        num_sequences = max(0, (num_tokens - 1 - phase) // self.seq_len)
        order = self.rng.permutation(num_sequences)
        self.start_inds[shard] = phase + order.astype(np.int64) * self.seq_len
        self.remaining[shard] = num_sequences

    def _reset_all(self) -> None:
        for shard in range(len(self.files)):
            self._reset_shard(shard)
        self.epochs += 1
        if self.remaining.sum() == 0:
            raise ValueError(f"no shard of rank {self.rank} holds a full window of "
                             f"{self.seq_len + 1} tokens ({self.files})")

    def set_seq_len(self, seq_len: int) -> None:
        """Continue the pass with windows of `seq_len` + 1 tokens (progressive context, #2014).

        The unused windows of each shard form runs of consecutive old windows; a run of r
        windows covers r*old_len + 1 tokens, cut again from its start into floor(r*old_len /
        seq_len) windows of the new length (the tail shorter than a window is skipped until
        the next pass), in a fresh random order. Tokens already drawn in this pass are not
        drawn again; later passes are cut at the new length from a new random phase."""
        seq_len = int(seq_len)
        if seq_len == self.seq_len:
            return
        old_len, self.seq_len = self.seq_len, seq_len
        for shard in range(len(self.files)):
            unused = np.sort(self.start_inds[shard][:self.remaining[shard]])
            if len(unused) == 0:
                continue
            run_breaks = np.flatnonzero(np.diff(unused) != old_len) + 1
            run_starts = unused[np.r_[0, run_breaks]]
            run_counts = np.diff(np.r_[0, run_breaks, len(unused)]) * old_len // seq_len
            offsets = np.arange(run_counts.sum()) - np.repeat(np.cumsum(run_counts) - run_counts, run_counts)
            starts = np.repeat(run_starts, run_counts) + offsets * seq_len
            self.start_inds[shard] = starts[self.rng.permutation(len(starts))].astype(np.int64)
            self.remaining[shard] = len(starts)
        if self.remaining.sum() == 0:
            self._reset_all()

    def state_dict(self) -> dict:
        """Where the stream stands: the generator state, every shard's remaining windows
        (phase and permutation included) and the epoch count. `load_state_dict` of it makes
        the following batches those the original loader would have drawn."""
        return {"rng": self.rng.bit_generator.state, "epochs": self.epochs,
                "remaining": self.remaining.copy(),
                "start_inds": [inds.copy() for inds in self.start_inds],
                "files": [str(path) for path in self.files], "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream of `state_dict()` (the same shard files, in the same order)."""
        if state["files"] != [str(path) for path in self.files]:
            raise ValueError(f"loader state was saved for shards {state['files']}, "
                             f"this loader reads {[str(p) for p in self.files]}")
        self.rng.bit_generator.state = state["rng"]
        self.seq_len = int(state.get("seq_len", self.seq_len))  # progressive context (#2014)
        self.epochs = int(state["epochs"])
        self.remaining = np.asarray(state["remaining"], dtype=np.int64).copy()
        self.start_inds = [np.asarray(inds, dtype=np.int64).copy() for inds in state["start_inds"]]

    def batch_size(self, global_tokens: int, grad_accum_steps: int) -> int:
        """Sequences per rank per micro-step: global_tokens // (world_size*grad_accum) // seq_len."""
        device_tokens = global_tokens // (self.world_size * grad_accum_steps)
        size = device_tokens // self.seq_len
        if size <= 0:
            raise ValueError(f"global_tokens={global_tokens} gives no full sequence of {self.seq_len} "
                             f"per rank with world_size={self.world_size}, grad_accum={grad_accum_steps}")
        return size

    def next_windows(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw `batch_size` windows: (shard index, start offset) int64 arrays, in draw order."""
        shards = np.empty(batch_size, dtype=np.int64)
        starts = np.empty(batch_size, dtype=np.int64)
        remaining = self.remaining.astype(np.float64)
        count = len(self.files)
        for index in range(batch_size):
            total = remaining.sum()
            if total <= 0:
                self._reset_all()
                remaining = self.remaining.astype(np.float64)
                total = remaining.sum()
            shard = int(self.rng.choice(count, p=remaining / total))
            remaining[shard] -= 1
            self.remaining[shard] -= 1
            shards[index] = shard
            starts[index] = self.start_inds[shard][self.remaining[shard]]  # pop from the end
        return shards, starts

    def gather(self, shards: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Windows of seq_len+1 tokens as a uint16 [B, seq_len+1] array (one slice copy per row
        out of the cached memmaps; cheaper than a fancy-index gather)."""
        width = self.seq_len + 1
        windows = np.empty((len(starts), width), dtype=np.uint16)
        for row, (shard, start) in enumerate(zip(shards.tolist(), starts.tolist())):
            windows[row] = self.memmaps[shard][start:start + width]
        return windows

    def next_batch(self, global_tokens: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [B, seq_len] on the device, B = batch_size(global_tokens, grad_accum):
        x = window[:-1], y = window[1:] (next-token targets).

        On CUDA the windows travel once, as int32 from pinned memory with non_blocking=True,
        and are widened and split on the device; on CPU they are split in NumPy.
        """
        shards, starts = self.next_windows(self.batch_size(global_tokens, grad_accum_steps))
        windows = self.gather(shards, starts)
        if self._pin:
            staged = torch.empty(windows.shape, dtype=torch.int32, pin_memory=True)
            staged.numpy()[...] = windows
            on_device = staged.to(self.device, non_blocking=True)
            return (on_device[:, :-1].to(torch.int64, memory_format=torch.contiguous_format),
                    on_device[:, 1:].to(torch.int64, memory_format=torch.contiguous_format))
        x = torch.from_numpy(windows[:, :-1].astype(np.int64))
        y = torch.from_numpy(windows[:, 1:].astype(np.int64))
        return x.to(self.device), y.to(self.device)
