"""One BPB accounting for every kind of data: the bytes each scored token is charged.

    bpb = Σ nll (nats) / (ln 2 · Σ bytes)

- plain SentencePiece data: `ByteTables` (SPEC 1.6), bytes from the token and its
  predecessor;
- CaseOps data (PR #1729) and any dataset built with a byte sidecar: `SidecarBytes`, the raw
  UTF-8 bytes of the ORIGINAL text attributed to the token at each stream position, read from
  the validation sidecars (parlm.data.shards), so Σ bytes over the validation stream is the
  raw byte count of its documents (BOS charged 0).

Both have the same call shape: `count_bytes(target, prev, positions)` (positions = stream
index of each target, or an int: the position of target.flatten()[0], the rest following
contiguously), `stream_bytes(tokens)` for a stream prefix, and `to_torch(device)`.
`byte_accounting(config)` returns the one a config selects; every scorer, TTT, validation
during training and the PPM denominator take it from there.

`token_original_bytes` is the build-side rule that produces the sidecar values.
"""
from __future__ import annotations

import numpy as np

from parlm.data import caseops
from parlm.data.shards import load_validation_byte_counts
from parlm.data.tokenizer import ByteTables, _is_tensor

ACCOUNTINGS = ("tables", "sidecar")


class SidecarBytes:
    """Per-position byte counts of the validation stream (int32 array or tensor), plus the
    tokenizer's ByteTables (kept for the PPM byte stream's token bytes)."""

    def __init__(self, target_bytes, tables: ByteTables | None = None):
        self.target_bytes = target_bytes
        self.tables = tables
        self._device_copies: dict = {}

    @classmethod
    def from_files(cls, val_pattern: str, tables: ByteTables | None = None,
                   length: int | None = None) -> "SidecarBytes":
        """The sidecars of the validation shards matching `val_pattern` (checked: magic,
        version, size, count equal to the token shard's), first `length` entries (all if None)."""
        return cls(load_validation_byte_counts(val_pattern, length), tables)

    def __len__(self) -> int:
        return int(self.target_bytes.shape[0])

    def to_torch(self, device) -> "SidecarBytes":
        """A SidecarBytes whose counts are an int32 tensor on `device` (cached per device)."""
        import torch

        device = torch.device(device)
        if _is_tensor(self.target_bytes) and self.target_bytes.device == device:
            return self
        key = str(device)
        if key not in self._device_copies:
            values = torch.as_tensor(np.asarray(self.target_bytes), dtype=torch.int32).to(device)
            self._device_copies[key] = SidecarBytes(values, self.tables)
        return self._device_copies[key]

    def count_bytes(self, target, prev, positions=None):
        """bytes(position) = sidecar[position] for each target (int64, target's shape, torch on
        target's device for torch input). Positions past the stream are clamped: callers mask
        them (padded windows). `prev` is unused: the sidecar already knows the context."""
        if positions is None:
            raise ValueError("byte_accounting=sidecar charges bytes by stream position; pass "
                             "count_bytes(target, prev, positions)")
        if _is_tensor(target):
            import torch

            values = self.to_torch(target.device).target_bytes
            if isinstance(positions, int):
                positions = torch.arange(target.numel(), device=target.device).view(target.shape) + positions
            index = torch.as_tensor(positions, device=target.device).long().clamp(0, len(self) - 1)
            return values[index].long()
        values = np.asarray(self.target_bytes.cpu() if _is_tensor(self.target_bytes) else self.target_bytes)
        target = np.asarray(target)
        if isinstance(positions, (int, np.integer)):
            positions = np.arange(target.size).reshape(target.shape) + int(positions)
        return values[np.clip(np.asarray(positions, dtype=np.int64), 0, len(self) - 1)].astype(np.int64)

    def stream_bytes(self, tokens) -> int:
        """Total bytes of a stream prefix tokens[0..n) scored from position 1 on: sum of sidecar[1:n]."""
        if len(tokens) < 2:
            return 0
        return int(self.count_bytes(np.asarray(tokens[1:]), None, 1).sum())


def byte_accounting(config, length: int | None = None):
    """The accounting `config.byte_accounting` selects: "tables" -> ByteTables of the config's
    tokenizer; "sidecar" -> SidecarBytes of config.val_files (required for
    text_transform=caseops, where the tables would count transformed bytes)."""
    tables = ByteTables.from_tokenizer(config.resolved_tokenizer_path, config.vocab_size)
    if config.byte_accounting == "tables":
        return tables
    if config.byte_accounting == "sidecar":
        return SidecarBytes.from_files(config.val_files, tables, length)
    raise ValueError(f"byte_accounting={config.byte_accounting!r}; expected one of {ACCOUNTINGS}")


def piece_tables(accounting) -> ByteTables:
    """The SentencePiece piece tables behind an accounting: the accounting itself for
    "tables", the tokenizer's tables a SidecarBytes carries for "sidecar". The PPM byte stream
    expands tokens into these piece bytes (its denominator is the accounting's, parlm.ppm.stage)."""
    tables = accounting if isinstance(accounting, ByteTables) else getattr(accounting, "tables", None)
    if tables is None:
        raise ValueError("this byte accounting carries no SentencePiece tables; build it with "
                         "byte_accounting(config)")
    return tables


def token_original_bytes(sp, text: str, transform: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, original UTF-8 bytes per token) of one document.

    The document is transformed (`caseops.apply`), encoded with SentencePiece's piece spans
    (byte offsets into the transformed text), and token k is charged the original bytes of
    the transformed text in [end_{k-1}, end_k), with end_{-1} = 0 and the last end set to
    the text's end; so text the normalizer drops (extra spaces) is charged to a neighbour
    and the counts sum to len(text.encode()) whenever the document has a token."""
    transformed = caseops.apply(transform, text)
    ids, ends = piece_ends(sp.encode(transformed, out_type="serialized_proto"))
    if not len(ids):
        return ids, np.zeros(0, dtype=np.int64)
    weights = caseops.original_byte_weights(transformed, transform)
    char_bytes = caseops.utf8_lengths(np.frombuffer(transformed.encode("utf-32-le"), dtype="<u4"))
    # weight of each character placed at its last byte: cumulative[b] = original bytes before byte b
    per_byte = np.zeros(int(char_bytes.sum()), dtype=np.int64)
    per_byte[np.cumsum(char_bytes) - 1] = weights
    cumulative = np.concatenate([[0], np.cumsum(per_byte)])
    ends = np.maximum.accumulate(ends)
    ends[-1] = len(per_byte)
    counts = np.diff(np.concatenate([[0], cumulative[ends]]))
    return ids, counts


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def piece_ends(serialized: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids, end byte offsets) of the pieces of a serialized SentencePieceText (what
    `encode(out_type="serialized_proto")` returns), read from the protobuf wire format
    without the protobuf package: field 2 = repeated piece {2: id, 5: end}."""
    ids, ends, position = [], [], 0
    while position < len(serialized):
        key, position = _varint(serialized, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, position = _varint(serialized, position)
            continue
        if wire != 2:
            raise ValueError(f"unexpected protobuf wire type {wire} in a SentencePieceText")
        length, position = _varint(serialized, position)
        stop = position + length
        if field == 2:  # one piece
            piece_id = piece_end = 0
            while position < stop:
                key, position = _varint(serialized, position)
                if key & 7 == 0:
                    value, position = _varint(serialized, position)
                    if key >> 3 == 2:
                        piece_id = value
                    elif key >> 3 == 5:
                        piece_end = value
                else:  # strings (piece, surface)
                    skip, position = _varint(serialized, position)
                    position += skip
            ids.append(piece_id)
            ends.append(piece_end)
        position = stop
    return np.asarray(ids, dtype=np.int64), np.asarray(ends, dtype=np.int64)
