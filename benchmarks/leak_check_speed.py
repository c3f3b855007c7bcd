"""Speed of the token-level leak check (`parlm.data.leak.token_leak_count`) against the
per-token path it replaced (`token_document_hashes` over every train token), on random shards.

Stream: --tokens train tokens and --val-tokens validation tokens in challenge-format shards of
--shard-tokens tokens (FineWeb's train shards hold 100M), ids uniform in [2, 1024), each
document a BOS (id 1) and a lognormal number of tokens (median 600, sigma 1.2: a mean of about
1,230, the order of a FineWeb document in sp1024 tokens). --copies validation documents are
copied into train (the check must find each) and as many near-copies (the last token changed:
same key, so they are hashed in full and rejected). The shards are written to --dir (default: a
temporary folder, removed afterwards) and read back from the page cache by both paths.

    python benchmarks/leak_check_speed.py [--tokens 200000000] [--val-tokens 2000000]
        [--shard-tokens 100000000] [--copies 20] [--repeats 1] [--dir DIR]

Printed per path: the wall time (the minimum over --repeats) and nanoseconds per train token;
for the new check also its validation part alone (every validation token is still hashed in
full), and the leak count of both paths, which must agree.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parlm.data import leak  # noqa: E402
from parlm.data.shards import write_shard  # noqa: E402

BOS = 1
VOCAB = 1024


def random_stream(rng, num_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, document starts, document lengths, BOS included) of a random stream of
    exactly num_tokens tokens; the last document is cut at the end."""
    expected = int(num_tokens / 1000) + 16  # more documents than needed: mean length > 1000
    lengths = 1 + np.minimum(rng.lognormal(np.log(600), 1.2, size=expected), 100_000).astype(np.int64)
    while lengths.sum() < num_tokens:
        lengths = np.concatenate([lengths, lengths])
    starts = np.cumsum(lengths) - lengths
    keep = starts < num_tokens
    starts, lengths = starts[keep], np.minimum(lengths[keep], num_tokens - starts[keep])
    tokens = rng.integers(2, VOCAB, size=num_tokens, dtype=np.uint16)
    tokens[starts] = BOS
    return tokens, starts, lengths


def plant(rng, train, val, copies: int) -> None:
    """Overwrite the beginning of `copies` long train documents with a validation document and
    its own end with a BOS (an exact copy), and of `copies` more with a near-copy."""
    train_tokens, train_starts, train_lengths = train
    val_tokens, val_starts, val_lengths = val
    usable = (val_lengths > 1) & (val_lengths < np.median(train_lengths))
    sources = rng.choice(np.flatnonzero(usable), size=2 * copies, replace=False)
    targets = rng.choice(np.flatnonzero(train_lengths > np.median(train_lengths) + 1), size=2 * copies, replace=False)
    for number, (source, target) in enumerate(zip(sources, targets)):
        start, length = train_starts[target], val_lengths[source]
        document = val_tokens[val_starts[source]:val_starts[source] + length]
        train_tokens[start:start + length] = document
        train_tokens[start + length] = BOS  # the rest of the target is a document of its own
        if number >= copies:
            train_tokens[start + length - 1] = 2 + (int(document[-1]) - 1) % (VOCAB - 2)


def write_shards(directory: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[Path]:
    paths = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        paths.append(directory / f"fineweb_{split}_{index:06d}.bin")
        write_shard(paths[-1], tokens[start:start + shard_tokens])
    return paths


def timed(function, repeats: int):
    """(the minimum wall time over `repeats` calls, the last call's result)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(directory: Path, arguments) -> None:
    rng = np.random.default_rng(arguments.seed)
    train, val = random_stream(rng, arguments.tokens), random_stream(rng, arguments.val_tokens)
    plant(rng, train, val, arguments.copies)
    train_paths = write_shards(directory, "train", train[0], arguments.shard_tokens)
    val_paths = write_shards(directory, "val", val[0], arguments.shard_tokens)
    del train, val
    tokens = arguments.tokens
    print(f"{tokens:,} train tokens in {len(train_paths)} shard(s), {arguments.val_tokens:,} validation tokens, "
          f"{arguments.copies} copies + {arguments.copies} near-copies planted")

    old_seconds, train_hashes = timed(lambda: leak.token_document_hashes(train_paths), arguments.repeats)
    val_hashes = leak.token_document_hashes(val_paths)
    old_leaked = int(np.isin(val_hashes, train_hashes).sum())
    print(f"old per-token path, token_document_hashes over train: {old_seconds:8.3f} s "
          f"{1e9 * old_seconds / tokens:8.2f} ns/token  (leaked {old_leaked} of {len(val_hashes)})")
    new_seconds, (val_docs, leaked) = timed(lambda: leak.token_leak_count(val_paths, train_paths), arguments.repeats)
    val_seconds, _ = timed(lambda: leak.token_leak_count(val_paths, []), arguments.repeats)
    print(f"new check, token_leak_count (val + train):           {new_seconds:8.3f} s "
          f"{1e9 * new_seconds / tokens:8.2f} ns/token  (leaked {leaked} of {val_docs})")
    print(f"  of which the validation split alone:                {val_seconds:8.3f} s; train part "
          f"{1e9 * (new_seconds - val_seconds) / tokens:.2f} ns/token")
    print(f"speedup over the train tokens: {old_seconds / max(new_seconds - val_seconds, 1e-9):.1f}x; "
          f"whole check {(old_seconds + val_seconds) / new_seconds:.1f}x")
    if (val_docs, leaked) != (len(val_hashes), old_leaked) or leaked < arguments.copies:
        raise SystemExit("the two paths disagree or a planted copy was missed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000_000, help="train tokens")
    parser.add_argument("--val-tokens", type=int, default=2_000_000, help="validation tokens")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--copies", type=int, default=20, help="validation documents copied into train")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per path (the minimum is printed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="write the shards here (default: a temporary folder)")
    arguments = parser.parse_args(argv)
    if arguments.dir is not None:
        arguments.dir.mkdir(parents=True, exist_ok=True)
        measure(arguments.dir, arguments)
        return
    with tempfile.TemporaryDirectory() as directory:
        measure(Path(directory), arguments)


if __name__ == "__main__":
    main()
