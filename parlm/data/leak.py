"""Train/validation leak guard (Issue #2127: a data-prep default put ~80% of the CaseOps
validation documents into training in 15 of 34 PRs; two records were struck).

Two checks, one verdict:
- by text, at build: every document is hashed, sha256(normalize(text)) with `normalize` =
  NFC, whitespace runs collapsed to one space, stripped. The manifest stores the
  validation hashes; the train hashes go to `train_doc_hashes.u64` (the first 8 bytes of
  each sha256, little-endian uint64, sorted), so a load re-checks them in milliseconds.
- by tokens, for datasets without those hashes (downloads): every BOS-delimited token
  sequence of the val and train shards is hashed with a 64-bit polynomial hash
  h = Σ_i (t_i + 1) · P^i mod 2^64 (P odd, i the position in the document) together with
  its length, vectorized over whole shards; a document cut by a shard boundary is joined.
Any validation document found in train raises LeakError naming the count and the fix.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from parlm.data.shards import TOKEN_DTYPE, open_shard, shard_files

TRAIN_HASHES_FILE = "train_doc_hashes.u64"
TOKEN_CHECK_FILE = "leak_check.json"  # the cached token-level verdict of a dataset without hashes
_POLYNOMIAL = np.uint64(0x9E3779B97F4A7C15)
_WHITESPACE = re.compile(r"\s+")


class LeakError(ValueError):
    """Validation documents appear in the training data."""


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, stripped: a copy that differs only in spacing or
    Unicode composition still counts as the same document."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def document_hash(text: str) -> str:
    """sha256 hex digest of normalize(text) in UTF-8."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def hash_prefix(hex_digests) -> np.ndarray:
    """The first 8 bytes of each sha256 hex digest as little-endian uint64, sorted."""
    raw = b"".join(bytes.fromhex(h)[:8] for h in hex_digests)
    return np.sort(np.frombuffer(raw, dtype="<u8"))


def leak_message(count: int, total: int, where: str) -> str:
    return (f"leak guard: {count} of the {total} validation documents also appear in the train "
            f"data of {where}; fix: rebuild with train documents taken only after the validation "
            f"documents (python -m parlm.data build --num-val-docs K, the same K as the validation "
            f"split) or deduplicate the corpus; do not train on this dataset")


def check_hashes(val_hashes, train_prefixes: np.ndarray, where: str) -> None:
    """Raise LeakError when any validation hash's prefix is among `train_prefixes`."""
    val = hash_prefix(val_hashes)
    count = int(np.isin(val, train_prefixes).sum())
    if count:
        raise LeakError(leak_message(count, len(val), where))


def write_train_hashes(directory: Path, prefixes: np.ndarray) -> str:
    """Write sorted uint64 train prefixes to directory/TRAIN_HASHES_FILE; returns the name."""
    np.sort(np.asarray(prefixes, dtype="<u8")).tofile(directory / TRAIN_HASHES_FILE)
    return TRAIN_HASHES_FILE


def token_document_hashes(paths, bos_id: int = 1) -> np.ndarray:
    """Hashes of the BOS-delimited documents of the shards `paths` read as one stream (a
    document is the tokens after a BOS up to the next BOS; tokens before the first BOS are
    ignored), as a sorted uint64 array mixing the polynomial hash and the length."""
    hashes, carry = [], np.zeros(0, dtype=TOKEN_DTYPE)
    for path in paths:
        tokens = np.concatenate([carry, np.asarray(open_shard(path))])
        starts = np.flatnonzero(tokens == bos_id)
        if not starts.size:
            continue  # only possible with an empty carry: tokens before any BOS
        complete = tokens[starts[0]:starts[-1]]
        hashes.append(_sequence_hashes(complete, starts[:-1] - starts[0], bos_id))
        carry = tokens[starts[-1]:]
    if carry.size and carry[0] == bos_id:
        hashes.append(_sequence_hashes(carry, np.array([0]), bos_id))
    return np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.uint64)


def _sequence_hashes(tokens: np.ndarray, starts: np.ndarray, bos_id: int) -> np.ndarray:
    """Hash of each document tokens[starts[k] : starts[k+1]] (BOS included at offset 0)."""
    if not starts.size:
        return np.zeros(0, dtype=np.uint64)
    lengths = np.diff(np.concatenate([starts, [len(tokens)]]))
    offsets = np.arange(len(tokens)) - np.repeat(starts, lengths)
    powers = np.ones(int(lengths.max()), dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers[1:] = _POLYNOMIAL
        powers = np.cumprod(powers, dtype=np.uint64)  # P^i mod 2^64
        terms = (tokens.astype(np.uint64) + np.uint64(1)) * powers[offsets]
        sums = np.add.reduceat(terms, starts)
        return sums ^ (lengths.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93))


def check_token_leak(dataset_dir: Path, bos_id: int = 1) -> dict:
    """Token-level check of a dataset folder (val vs train shards); raises LeakError. The
    verdict is cached in dataset_dir/TOKEN_CHECK_FILE keyed by every shard's name, size
    and mtime, so a later load of the same files does not rescan them."""
    val_files = shard_files(dataset_dir / "fineweb_val_*.bin")
    train_files = shard_files(dataset_dir / "fineweb_train_*.bin")
    key = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in val_files + train_files]
    cache = dataset_dir / TOKEN_CHECK_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            if cached["leaked"]:
                raise LeakError(leak_message(cached["leaked"], cached["val_docs"], dataset_dir))
            return cached
    val = token_document_hashes(val_files, bos_id)
    train = token_document_hashes(train_files, bos_id)
    leaked = int(np.isin(val, train).sum())
    verdict = {"key": key, "method": "token sequences", "val_docs": int(len(val)), "leaked": leaked}
    try:
        cache.write_text(json.dumps(verdict))
    except OSError:  # a read-only dataset folder: check again next time
        pass
    if leaked:
        raise LeakError(leak_message(leaked, len(val), dataset_dir))
    return verdict


def check_dataset(dataset_dir: str | Path, manifest: dict | None, bos_id: int = 1) -> dict:
    """The load-time guard: with manifest hashes, val hashes vs the stored train prefixes;
    else the token-level check. Returns {"method", "val_docs", "leaked": 0}; raises LeakError."""
    dataset_dir = Path(dataset_dir)
    guard = (manifest or {}).get("leak_guard") or {}
    hashes_file = dataset_dir / guard.get("train_hashes_file", TRAIN_HASHES_FILE)
    if guard.get("val_doc_sha256") is not None and hashes_file.is_file():
        check_hashes(guard["val_doc_sha256"], np.fromfile(hashes_file, dtype="<u8"), dataset_dir)
        return {"method": "document sha256", "val_docs": len(guard["val_doc_sha256"]), "leaked": 0}
    verdict = check_token_leak(dataset_dir, bos_id)
    return {k: verdict[k] for k in ("method", "val_docs", "leaked")}


def check_config(config) -> dict:
    """`check_dataset` for the dataset of a Config (its manifest, if it has one)."""
    manifest_path = Path(config.datasets_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    return check_dataset(config.datasets_dir, manifest)
