"""Train/validation leak guard (Issue #2127: a data-prep default put ~80% of the CaseOps
validation documents into training in 15 of 34 PRs; two records were struck).

Two checks, one verdict:
- by text, at build: every document is hashed, sha256(normalize(text)) with `normalize` =
  NFC, whitespace runs collapsed to one space, stripped. The manifest stores the
  validation hashes; the train hashes go to `train_doc_hashes.u64` (the first 8 bytes of
  each sha256, little-endian uint64, sorted), so a load re-checks them in milliseconds.
- by tokens, for datasets without those hashes (downloads): a leaked document is an exact
  copy of a BOS-delimited validation token sequence. Every validation document is hashed
  with a 64-bit polynomial hash h = Σ_i (t_i + 1) · P^i mod 2^64 (P odd, i the position in
  the document) mixed with its length; a train document is hashed in full only when its
  cheap key (its length and the same hash over its first PREFIX_TOKENS tokens) equals a
  validation document's key, as every exact copy's does (`token_leak_count`). Each shard is
  read once; a document cut by a shard boundary is joined.
Any validation document found in train raises LeakError naming the count and the fix.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from parlm.data.shards import open_shard, shard_files

TRAIN_HASHES_FILE = "train_doc_hashes.u64"
TOKEN_CHECK_FILE = "leak_check.json"  # the cached token-level verdict of a dataset without hashes
_POLYNOMIAL = np.uint64(0x9E3779B97F4A7C15)
_LENGTH_MIX = np.uint64(0xD6E8FEB86659FD93)
PREFIX_TOKENS = 16  # tokens of a document, its BOS included, in the token check's prefilter key
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
    ignored), as a sorted uint64 array mixing the polynomial hash and the length. Hashes every
    token: the reference that `token_leak_count` filters down to its candidates."""
    hashes = [_full_hashes(*batch) for batch in _document_batches(paths, bos_id)]
    return np.sort(_concatenate(hashes))


def token_leak_count(val_paths, train_paths, bos_id: int = 1) -> tuple[int, int]:
    """(validation documents, how many of them occur in train): a validation document counts
    when an exact copy of it (the same BOS-delimited token sequence, as `token_document_hashes`
    splits the streams) is among the train documents; a repeated one counts each time.

    Only candidates are hashed in full. Every train document first gets a cheap key (its
    length and a hash of its first PREFIX_TOKENS tokens, `_document_keys`); the candidates
    are the train documents whose key is a validation document's key, and a validation
    document counts when its full hash (`_sequence_hashes`) is among the candidates' full
    hashes. The prefilter cannot miss a leak: the key is a function of the length and the
    first tokens alone, so an exact copy has its original's key and is always a candidate. A
    key shared by different documents only adds candidates, which the full hash rejects.
    Hashing every train document would differ only by counting a train document whose full
    hash collides with a validation hash while its key does not (a false leak)."""
    val_keys, val_hashes = [], []
    for batch in _document_batches(val_paths, bos_id):
        val_keys.append(_document_keys(*batch))
        val_hashes.append(_full_hashes(*batch))
    val_keys, val_hashes = np.unique(_concatenate(val_keys)), _concatenate(val_hashes)
    found = []
    for tokens, starts, lengths in _document_batches(train_paths, bos_id):
        candidate = np.isin(_document_keys(tokens, starts, lengths), val_keys)
        found.append(_full_hashes(tokens, starts[candidate], lengths[candidate]))
    return len(val_hashes), int(np.isin(val_hashes, _concatenate(found)).sum())


def _document_batches(paths, bos_id: int):
    """The documents of the shards `paths` read as one stream, each shard read once, as
    batches (tokens, starts, lengths): document k of a batch is tokens[starts[k] :
    starts[k] + lengths[k]], its BOS first. A batch is a shard's complete documents, or one
    document that began in an earlier shard, joined from its pieces."""
    pieces = []  # the document still open at the end of the shards read so far
    for path in paths:
        tokens = open_shard(path)
        starts = np.flatnonzero(tokens == bos_id)
        if pieces:
            pieces.append(np.array(tokens[:starts[0] if starts.size else len(tokens)]))
            if starts.size:
                joined = np.concatenate(pieces)
                yield joined, np.zeros(1, dtype=np.int64), np.array([len(joined)])
        if starts.size:  # else: no document begins here (tokens before any BOS, or a piece)
            lengths = np.diff(starts, append=len(tokens))
            yield tokens, starts[:-1], lengths[:-1]
            pieces = [np.array(tokens[starts[-1]:])]
    if pieces:
        joined = np.concatenate(pieces)
        yield joined, np.zeros(1, dtype=np.int64), np.array([len(joined)])


def _document_keys(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The prefilter key of each document tokens[starts[k] : starts[k] + L_k]: the formula of
    `_sequence_hashes` summed over its first min(PREFIX_TOKENS, L_k) tokens only, mixed with
    the full length L_k (so a document of at most PREFIX_TOKENS tokens keys to its full hash).
    One gather per prefix position over all documents, not a pass over every token."""
    keys = np.zeros(len(starts), dtype=np.uint64)
    power, last = np.uint64(1), max(len(tokens) - 1, 0)
    with np.errstate(over="ignore"):
        for offset in range(min(PREFIX_TOKENS, int(lengths.max(initial=0)))):
            terms = (tokens[np.minimum(starts + offset, last)].astype(np.uint64) + np.uint64(1)) * power
            keys += np.where(lengths > offset, terms, np.uint64(0))
            power = power * _POLYNOMIAL
        return keys ^ (lengths.astype(np.uint64) * _LENGTH_MIX)


def _full_hashes(tokens, starts, lengths, batch_tokens: int = 1 << 24) -> np.ndarray:
    """`_sequence_hashes` of each document tokens[starts[k] : starts[k] + lengths[k]] (any of
    a batch's documents, in order), gathered about batch_tokens tokens at a time so that the
    temporary arrays stay small."""
    offsets = np.cumsum(lengths) - lengths  # where each document begins once gathered
    cuts = np.flatnonzero(np.diff(offsets // batch_tokens)) + 1
    hashes = []
    for group in np.split(np.arange(len(starts)), cuts) if len(starts) else []:
        begins = offsets[group] - offsets[group[0]]
        positions = np.repeat(starts[group] - begins, lengths[group]) + np.arange(lengths[group].sum())
        hashes.append(_sequence_hashes(np.asarray(tokens[positions]), begins))
    return _concatenate(hashes)


def _concatenate(arrays) -> np.ndarray:
    """The uint64 arrays `arrays` end to end (an empty uint64 array when there are none)."""
    return np.concatenate([np.zeros(0, dtype=np.uint64), *arrays])


def _sequence_hashes(tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Hash of each document tokens[starts[k] : starts[k+1]] (BOS included at offset 0):
    h = Σ_i (t_i + 1) · P^i mod 2^64 xor L · M (L its length, M an odd mixing constant)."""
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
        return sums ^ (lengths.astype(np.uint64) * _LENGTH_MIX)


def check_token_leak(dataset_dir: Path, bos_id: int = 1) -> dict:
    """Token-level check of a dataset folder (val vs train shards, `token_leak_count`);
    raises LeakError. The verdict is cached in dataset_dir/TOKEN_CHECK_FILE keyed by every
    shard's name, size and mtime, so a later load of the same files does not rescan them."""
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
    val_docs, leaked = token_leak_count(val_files, train_files, bos_id)
    verdict = {"key": key, "method": "token sequences", "val_docs": val_docs, "leaked": leaked}
    try:
        cache.write_text(json.dumps(verdict))
    except OSError:  # a read-only dataset folder: check again next time
        pass
    if leaked:
        raise LeakError(leak_message(leaked, val_docs, dataset_dir))
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
