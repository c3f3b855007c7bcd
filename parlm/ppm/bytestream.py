"""The byte stream the PPM mixtures score (SPEC 6.2), laid out for compiled kernels.

For each scored position with target id t and previous id p:

    bytes(t | p) = [0x20 if has_leading_space[t] and not is_boundary[p]] + token_bytes[t]

where token_bytes[t] is the piece without its leading `▁` (UTF-8), the raw byte of a
`<0xNN>` fallback id, and b"" for boundary ids. n = len(bytes(t | p)); positions with n = 0
(BOS targets, ...) are skipped entirely, and every byte of a token carries the same neural
log-probability ℓ = -NLL_t / n ("the per-byte spread", p_NN(byte) = p_tok^(1/n)).

Out-of-range ids follow the reference: a target outside the tables has no bytes and no
leading space; a previous id that is negative or outside the tables counts as a boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SPACE_BYTE = 0x20


@dataclass(frozen=True)
class TokenByteLayout:
    """Per-token byte strings flattened into `offsets` (int64[V+1]) and `data` (uint8), plus
    the `has_leading_space` and `is_boundary` tables (bool[V]); what the numba kernels read."""

    offsets: np.ndarray
    data: np.ndarray
    has_leading_space: np.ndarray
    is_boundary: np.ndarray

    @classmethod
    def from_tables(cls, token_bytes: Sequence[bytes], has_leading_space, is_boundary) -> "TokenByteLayout":
        """Build from a list of byte strings and two boolean tables of the same length."""
        token_bytes = [bytes(b) for b in token_bytes]
        has_leading_space = np.ascontiguousarray(np.asarray(has_leading_space, dtype=np.bool_))
        is_boundary = np.ascontiguousarray(np.asarray(is_boundary, dtype=np.bool_))
        if not len(token_bytes) == len(has_leading_space) == len(is_boundary):
            raise ValueError(f"token_bytes ({len(token_bytes)}), has_leading_space "
                             f"({len(has_leading_space)}) and is_boundary ({len(is_boundary)}) "
                             f"must cover the same ids")
        lengths = np.fromiter((len(b) for b in token_bytes), dtype=np.int64, count=len(token_bytes))
        offsets = np.zeros(len(token_bytes) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(b"".join(token_bytes), dtype=np.uint8).copy()
        return cls(offsets, data, has_leading_space, is_boundary)

    @classmethod
    def from_byte_tables(cls, tables) -> "TokenByteLayout":
        """Build from `parlm.data.tokenizer.ByteTables` (its token_bytes, has_leading_space,
        is_boundary)."""
        return cls.from_tables(tables.token_bytes, _numpy(tables.has_leading_space),
                               _numpy(tables.is_boundary))

    @property
    def vocab_size(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def max_token_bytes(self) -> int:
        """Longest byte string one token can produce (its piece plus a leading space)."""
        if self.vocab_size == 0:
            return 1
        return int(np.max(np.diff(self.offsets))) + 1

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            return b""
        return self.data[self.offsets[token_id]:self.offsets[token_id + 1]].tobytes()

    def include_space(self, target, prev) -> np.ndarray:
        """bool per position: has_leading_space[t] and not is_boundary[p] (out-of-range rules)."""
        target = np.asarray(target, dtype=np.int64)
        prev = np.asarray(prev, dtype=np.int64)
        size = self.vocab_size
        target_ok = (target >= 0) & (target < size)
        prev_ok = (prev >= 0) & (prev < size)
        has_space = np.zeros(target.shape, dtype=np.bool_)
        has_space[target_ok] = self.has_leading_space[target[target_ok]]
        prev_boundary = np.ones(prev.shape, dtype=np.bool_)
        prev_boundary[prev_ok] = self.is_boundary[prev[prev_ok]]
        return has_space & ~prev_boundary

    def byte_counts(self, target, prev) -> np.ndarray:
        """n per position: len(token_bytes[t]) + include_space (int64)."""
        target = np.asarray(target, dtype=np.int64)
        size = self.vocab_size
        ok = (target >= 0) & (target < size)
        lengths = np.zeros(target.shape, dtype=np.int64)
        lengths[ok] = np.diff(self.offsets)[target[ok]]
        return lengths + self.include_space(target, prev)

    def byte_stream(self, target, prev, nll=None) -> "ByteStream":
        """The whole byte stream of SPEC 6.2, vectorised (for tests, audits and plots; the
        scoring kernels expand tokens on the fly instead of materialising it)."""
        target = np.asarray(target, dtype=np.int64)
        counts = self.byte_counts(target, prev)
        space = self.include_space(target, prev)
        total = int(counts.sum())
        token_index = np.repeat(np.arange(len(target), dtype=np.int64), counts)
        starts = np.zeros(len(target) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        position = np.arange(total, dtype=np.int64) - starts[token_index]
        token_space = space[token_index]
        values = np.full(total, SPACE_BYTE, dtype=np.uint8)
        piece = ~(token_space & (position == 0))
        source = self.offsets[np.clip(target[token_index[piece]], 0, None)] + position[piece] \
            - token_space[piece].astype(np.int64)
        values[piece] = self.data[source]
        nn_logp = None
        if nll is not None:
            nll = np.asarray(nll, dtype=np.float64)
            nn_logp = (-nll)[token_index] / counts[token_index]
        return ByteStream(values, token_index, position.astype(np.int64), nn_logp)


@dataclass(frozen=True)
class ByteStream:
    """A materialised byte stream: `values` (uint8), the scored position each byte came from
    (`token_index`), its position within that token's bytes, and ℓ = -NLL/n per byte."""

    values: np.ndarray
    token_index: np.ndarray
    position_in_token: np.ndarray
    nn_logp: np.ndarray | None

    def __len__(self) -> int:
        return int(self.values.shape[0])


def _numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    return np.asarray(array)
