"""Bytes saved by `compressor: per_group` on a real artifact (issue 17).

    python benchmarks/per_group_compression.py runs/<id>/seed_<s>/final_model.int6.ptz

Re-packs the artifact's quantised state and compresses it both ways (the stage's chunked
brotli-11 and the per-group choice), checks the per-group file decodes to the same payload,
and prints the sizes per stream, the chosen codec+ordering per stream and the seconds taken.
"""
from __future__ import annotations

import sys
import time

from parlm.quant.artifact import compress, decompress, pack, read_artifact
from parlm.quant.compression import compress_per_group


def main(path: str) -> None:
    weights, methods = read_artifact(path)
    payload, stream_sizes = pack(weights, methods)
    started = time.perf_counter()
    plain, plain_sizes = compress(payload, "brotli", stream_sizes=stream_sizes)
    brotli_seconds = time.perf_counter() - started
    started = time.perf_counter()
    grouped, grouped_sizes, choices = compress_per_group(payload)
    grouped_seconds = time.perf_counter() - started
    assert decompress(grouped) == payload
    for name in ["header", *stream_sizes]:
        print(f"{name:12s} brotli {plain_sizes.get(name, 0):>12,d}  per_group {grouped_sizes.get(name, 0):>12,d}  "
              f"{choices.get(name, '')}")
    print(f"total        brotli {len(plain):>12,d}  per_group {len(grouped):>12,d}  saved {len(plain) - len(grouped):,d} "
          f"bytes (brotli {brotli_seconds:.1f}s, per_group {grouped_seconds:.1f}s)")


if __name__ == "__main__":
    main(sys.argv[1])
