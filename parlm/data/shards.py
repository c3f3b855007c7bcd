"""Token shards in the challenge format (SPEC 1.2) and the validation stream (SPEC 1.4).

A shard is a 1,024-byte header of 256 little-endian int32 values (magic 20240520, version 1,
token count N, then zeros) followed by N little-endian uint16 token ids, so its size is exactly
1024 + 2*N bytes. Every reader here checks that and raises `ShardError`, whose message is one
line naming the file and the fault.

A byte sidecar `fineweb_val_bytes_NNNNNN.bin` sits beside token shard `fineweb_val_NNNNNN.bin`
(CaseOps data, PR #1729): the same 1,024-byte header layout with its own magic
SIDECAR_MAGIC (20260418), version 1, count N equal to its token shard's count, then N
little-endian uint16 values: the UTF-8 bytes of the ORIGINAL (untransformed) document text
attributed to the token at the same position (0 for BOS). `read_sidecar_header` checks it
like a token shard, plus the length agreement.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parlm.runlog import atomic_path, atomic_write_text

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_SHARD_TOKENS = 2**31 - 1
MAX_ID_CACHE = ".max_token_ids.json"  # per-shard max token id, see check_dataset_vocabulary
SIDECAR_MAGIC = 20260418  # the date of PR #1729; distinct from SHARD_MAGIC
SIDECAR_VERSION = 1
SIDECAR_INFIX = "_bytes_"  # fineweb_val_bytes_000000.bin beside fineweb_val_000000.bin


class ShardError(ValueError):
    """A malformed shard; str(error) is one line: '<path>: <fault>'."""

    def __init__(self, path: str | os.PathLike, fault: str):
        self.path = str(path)
        self.fault = fault
        super().__init__(f"{self.path}: {fault}")


@dataclass(frozen=True)
class ShardHeader:
    """The validated header of one shard: token count and the file's byte size."""

    path: str
    num_tokens: int
    file_bytes: int


def write_shard(path: str | os.PathLike, tokens, magic: int = SHARD_MAGIC) -> None:
    """Write `tokens` (ints in [0, 65535]) as a challenge shard at `path` (a byte sidecar
    with magic=SIDECAR_MAGIC).

    The file is written beside its destination and renamed into place, so a reader never
    sees a half-written shard.
    """
    path = Path(path)
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"{path}: tokens must be one-dimensional, got shape {array.shape}")
    if array.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {array.size} tokens do not fit an int32 header count")
    if array.dtype != TOKEN_DTYPE:
        if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
            raise ValueError(f"{path}: token ids must lie in [0, 65535] to fit uint16 shards")
        array = array.astype(TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, SHARD_VERSION, array.size
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(np.ascontiguousarray(array).tobytes())


def read_header(path: str | os.PathLike, magic: int = SHARD_MAGIC) -> ShardHeader:
    """Read and check the header of `path` against SPEC 1.2 and the file size.

    Raises ShardError for: a missing file, a file shorter than the header, a bad magic, a bad
    version, a negative count, a truncated payload (file shorter than 1024 + 2*N) or a size
    mismatch (file longer than 1024 + 2*N).
    """
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(path, "no such file") from None
    if file_bytes < HEADER_BYTES:
        raise ShardError(path, f"truncated header: file has {file_bytes} bytes, a shard header needs {HEADER_BYTES}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    found, version, num_tokens = int(header[0]), int(header[1]), int(header[2])
    if found != magic:
        kind = "byte sidecar" if magic == SIDECAR_MAGIC else "challenge shard"
        raise ShardError(path, f"bad magic {found} (expected {magic}); not a {kind}")
    if version != SHARD_VERSION:
        raise ShardError(path, f"bad version {version} (expected {SHARD_VERSION})")
    if num_tokens < 0:
        raise ShardError(path, f"bad token count {num_tokens} in header")
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * num_tokens
    if file_bytes < expected:
        present = (file_bytes - HEADER_BYTES) // TOKEN_DTYPE.itemsize
        raise ShardError(path, f"truncated payload: header says {num_tokens} tokens ({expected} bytes) "
                               f"but the file has {file_bytes} bytes ({present} tokens)")
    if file_bytes != expected:
        raise ShardError(path, f"size mismatch: header says {num_tokens} tokens = {expected} bytes "
                               f"but the file has {file_bytes} bytes ({file_bytes - expected} extra)")
    return ShardHeader(str(path), num_tokens, file_bytes)


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Header-checked read-only uint16 memmap of the payload of `path` (no copy)."""
    header = read_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # np.memmap refuses empty maps
    return np.memmap(path, mode="r", dtype=TOKEN_DTYPE, offset=HEADER_BYTES, shape=(header.num_tokens,))


def check_token_range(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int,
                      chunk_tokens: int = 1 << 24) -> int:
    """The largest token id in `tokens` (-1 when empty), read in chunks; ShardError when it is
    >= vocab_size, naming the first such id and its position, the max id and the vocab size."""
    largest, first = -1, None
    for start in range(0, len(tokens), chunk_tokens):
        chunk = np.asarray(tokens[start:start + chunk_tokens])
        if not chunk.size:
            continue
        top = int(chunk.max())
        largest = max(largest, top)
        if first is None and top >= vocab_size:
            offset = int(np.argmax(chunk >= vocab_size))
            first = (int(chunk[offset]), start + offset)
    if first is not None:
        raise ShardError(path, f"token id {first[0]} at position {first[1]} >= vocab_size {vocab_size} "
                               f"(max id {largest}); the shard comes from a larger vocabulary: use its "
                               f"tokenizer and vocab_size, or rebuild the dataset")
    return largest


def load_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """All tokens of `path` as a uint16 array (header checked; ids < vocab_size if given)."""
    header = read_header(path)
    tokens = np.fromfile(path, dtype=TOKEN_DTYPE, count=header.num_tokens, offset=HEADER_BYTES)
    if tokens.size != header.num_tokens:  # the file changed under us
        raise ShardError(path, f"short read: {tokens.size} of {header.num_tokens} tokens")
    if vocab_size is not None:
        check_token_range(path, tokens, vocab_size)
    return tokens


def validate_shard(path: str | os.PathLike, vocab_size: int | None = None) -> ShardHeader:
    """Check header, size and (if vocab_size is given) every token id; return the header."""
    header = read_header(path)
    if vocab_size is not None:
        check_token_range(path, open_shard(path), vocab_size)
    return header


def check_dataset_vocabulary(dataset_dir: str | os.PathLike, vocab_size: int) -> None:
    """Every `fineweb_{train,val}_*.bin` shard of `dataset_dir` holds only ids < vocab_size, else
    ShardError (`check_token_range`), so a mismatched dataset fails before training, not inside
    the embedding. Each shard's max id is cached in `<dataset_dir>/.max_token_ids.json` by
    (size, mtime), so a checked dataset costs one stat per shard afterwards; a read-only folder
    is checked without the cache."""
    dataset_dir = Path(dataset_dir)
    cache_path = dataset_dir / MAX_ID_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    changed = False
    shards = [*dataset_dir.glob("fineweb_train_*.bin"), *dataset_dir.glob("fineweb_val_*.bin")]
    # fineweb_val_*.bin also matches the byte sidecars, which hold byte counts, not token ids
    for path in sorted(p for p in shards if SIDECAR_INFIX not in p.name):
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(path.name)
        if isinstance(entry, list) and entry[:2] == key and entry[2] < vocab_size:
            continue
        cache[path.name] = key + [check_token_range(path, open_shard(path), vocab_size)]
        changed = True
    if changed:
        try:
            atomic_write_text(cache_path, json.dumps(cache, sort_keys=True))
        except OSError:  # a shared read-only dataset: the next check scans again
            pass


def shard_files(pattern: str | os.PathLike) -> list[Path]:
    """Files matching the glob `pattern` in sorted order; FileNotFoundError when none match."""
    files = [Path(p) for p in sorted(glob.glob(str(pattern)))]
    if SIDECAR_INFIX not in Path(pattern).name:  # fineweb_val_*.bin also matches the sidecars
        files = [f for f in files if SIDECAR_INFIX not in f.name]
    if not files:
        raise FileNotFoundError(f"no shard files match {pattern}; build or download the dataset "
                                f"first (python -m parlm.data build|download --help)")
    return files


def load_validation_tokens(pattern: str | os.PathLike, seq_len: int, max_tokens: int = 0) -> "torch.Tensor":
    """The validation stream of SPEC 1.4 as a CPU torch.int32 tensor.

    All files matching `pattern` are concatenated in sorted order; when max_tokens > 0 only
    the first max_tokens+1 tokens are kept; then the stream is cut to usable+1 tokens with
    usable = ((N-1) // seq_len) * seq_len, so the last (N-1) mod seq_len tokens are never scored.
    """
    import torch  # here, so that shard tools (`python -m parlm.data inspect`) start without torch

    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    pieces = []
    kept = 0
    limit = max_tokens + 1 if max_tokens > 0 else None
    for path in shard_files(pattern):
        tokens = open_shard(path)
        if limit is not None:
            tokens = tokens[: limit - kept]
        pieces.append(np.asarray(tokens, dtype=np.int32))
        kept += len(pieces[-1])
        if limit is not None and kept >= limit:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    usable = (len(stream) - 1) // seq_len * seq_len
    if usable <= 0:
        raise ValueError(f"validation stream {pattern} has {len(stream)} tokens, too short for "
                         f"seq_len={seq_len} (needs at least {seq_len + 1})")
    return torch.from_numpy(np.ascontiguousarray(stream[: usable + 1]))


def token_statistics(path: str | os.PathLike, bos_id: int = 1) -> dict:
    """Header and token statistics of one shard: count, min, max, distinct ids, BOS count
    (= documents in a BOS-prefixed export), and the ten most frequent ids."""
    header = read_header(path)
    tokens = open_shard(path)
    counts = np.bincount(np.asarray(tokens), minlength=65536) if header.num_tokens else np.zeros(65536, np.int64)
    present = np.flatnonzero(counts)
    top = np.argsort(-counts, kind="stable")[:10]
    return {
        "path": header.path,
        "magic": SHARD_MAGIC,
        "version": SHARD_VERSION,
        "num_tokens": header.num_tokens,
        "file_bytes": header.file_bytes,
        "min_id": int(present[0]) if present.size else None,
        "max_id": int(present[-1]) if present.size else None,
        "distinct_ids": int(present.size),
        "bos_count": int(counts[bos_id]) if 0 <= bos_id < counts.size else 0,
        "top_ids": [[int(i), int(counts[i])] for i in top if counts[i] > 0],
    }


# --------------------------------------------------------------------------------------
# Byte sidecars (module docstring)
def sidecar_path(token_shard: str | os.PathLike) -> Path:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin (same folder)."""
    token_shard = Path(token_shard)
    split, _, index = token_shard.name.rpartition("_")
    return token_shard.with_name(f"{split}{SIDECAR_INFIX}{index}")


def write_sidecar(path: str | os.PathLike, byte_counts) -> None:
    """Write per-token original byte counts (ints in [0, 65535]) as a byte sidecar."""
    write_shard(path, byte_counts, magic=SIDECAR_MAGIC)


def read_sidecar_header(path: str | os.PathLike, token_shard: str | os.PathLike | None = None) -> ShardHeader:
    """Check a sidecar's header and size like `read_header` (magic SIDECAR_MAGIC), and that
    its count equals the count of `token_shard` (when given); ShardError names the file."""
    header = read_header(path, magic=SIDECAR_MAGIC)
    if token_shard is not None:
        tokens = read_header(token_shard).num_tokens
        if tokens != header.num_tokens:
            raise ShardError(path, f"length mismatch: sidecar has {header.num_tokens} entries but its token "
                                   f"shard {Path(token_shard).name} has {tokens} tokens; rebuild the dataset")
    return header


def load_validation_byte_counts(pattern: str | os.PathLike, length: int | None = None) -> np.ndarray:
    """The sidecar values of the validation stream (int32), aligned with
    `load_validation_tokens(pattern, ...)`: the sidecars of the token shards matching
    `pattern`, each checked against its shard, concatenated and cut to `length` entries
    (None: all).
    Raises FileNotFoundError naming the missing sidecar."""
    pieces, kept = [], 0
    length = np.iinfo(np.int64).max if length is None else length
    for token_shard in shard_files(pattern):
        path = sidecar_path(token_shard)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: byte sidecar of {token_shard.name} not found; this dataset has no "
                                    f"sidecar, so use byte_accounting=tables or rebuild it with a sidecar")
        header = read_sidecar_header(path, token_shard)
        values = np.fromfile(path, dtype=TOKEN_DTYPE, count=header.num_tokens, offset=HEADER_BYTES)
        pieces.append(values[: max(length - kept, 0)].astype(np.int32))
        kept += len(pieces[-1])
        if kept >= length:
            break
    if kept < length and length != np.iinfo(np.int64).max:
        raise ValueError(f"sidecars of {pattern} hold {kept} entries, fewer than the {length} tokens scored")
    return np.concatenate(pieces)


class ShardWriter:
    """Accumulates a split's token stream and writes `fineweb_<split>_NNNNNN.bin` shards of
    exactly `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, directory: Path, shard_tokens: int, sidecar_splits: tuple[str, ...] = ()):
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.sidecar_splits = sidecar_splits  # splits whose shards get a byte sidecar
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.sidecar = np.zeros(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.split = "val"
        self.files: dict[str, list[str]] = {"val": [], "train": []}

    def add(self, split: str, tokens: np.ndarray, byte_counts: np.ndarray | None = None) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        position = 0
        while position < len(tokens):
            take = min(self.shard_tokens - self.fill, len(tokens) - position)
            self.buffer[self.fill:self.fill + take] = tokens[position:position + take]
            if byte_counts is not None:
                self.sidecar[self.fill:self.fill + take] = byte_counts[position:position + take]
            self.fill += take
            position += take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = f"fineweb_{self.split}_{len(self.files[self.split]):06d}.bin"
        write_shard(self.directory / name, self.buffer[:self.fill])
        if self.split in self.sidecar_splits:
            write_sidecar(sidecar_path(self.directory / name), self.sidecar[:self.fill])
        self.files[self.split].append(name)
        self.fill = 0
