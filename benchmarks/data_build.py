"""Data-stage benchmarks.

build (default): times the wiki2015_sp8192 proxy build, the issue's acceptance command,

    python -m parlm.data build --docs ../shared/corpus/wiki2015/docs_selected.jsonl.xz \\
        --tokenizer ../shared/tokenizers/fineweb_8192_bpe.model --num-val-docs 250 --out DIR

in a subprocess, checks 1,047,613 validation and 38,682,298 train tokens, and prints the wall
time with the machine's load average (other work on the same cores slows it down).

loader: times ShuffledSequenceLoader.next_batch (the reference's 48 x 2048 per rank) on an
existing dataset, on CUDA when available (pinned, non_blocking copies), else CPU:

    python benchmarks/data_build.py loader --data-dir DIR [--dataset wiki2015_sp8192]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EXPECTED = {"val": 1_047_613, "train": 38_682_298}


def bench_build(args) -> int:
    out = Path(args.out or tempfile.mkdtemp(prefix="parlm_bench_data_"))
    command = [sys.executable, "-m", "parlm.data", "build", "--docs", str(args.docs), "--tokenizer",
               str(args.tokenizer), "--num-val-docs", "250", "--out", str(out), "--overwrite"]
    if args.workers:
        command += ["--workers", str(args.workers)]
    load_before = os.getloadavg()
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    manifest = json.loads((out / "datasets" / "wiki2015_sp8192" / "manifest.json").read_text())
    tokens = {split: manifest["splits"][split]["tokens"] for split in EXPECTED}
    result = {"wall_seconds": round(seconds, 1), "tokens": tokens, "matches_proxy": tokens == EXPECTED,
              "cpus": os.cpu_count(), "loadavg_1m_before": load_before[0], "loadavg_1m_after": load_after[0],
              "out": str(out)}
    print(json.dumps(result, indent=1))
    return 0 if tokens == EXPECTED else 1


def bench_loader(args) -> int:
    import torch

    from parlm.config import Config
    from parlm.data.loader import ShuffledSequenceLoader

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Config().replace(data_dir=args.data_dir, dataset_name=args.dataset, vocab_size=args.vocab_size)
    loader = ShuffledSequenceLoader(config, 0, args.world_size, device)
    grad_accum = config.grad_accum_steps(args.world_size)
    for _ in range(5):  # warm the page cache and the pinned-memory pool
        loader.next_batch(config.train_batch_tokens, grad_accum)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = loader.next_batch(config.train_batch_tokens, grad_accum)
    host_seconds = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
    total_seconds = time.perf_counter() - start
    print(json.dumps({"device": device, "batch": list(x.shape), "micro_batches": args.steps,
                      "host_ms_per_batch": round(1000 * host_seconds / args.steps, 3),
                      "ms_per_batch_synchronized": round(1000 * total_seconds / args.steps, 3)}, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="build", choices=["build", "loader"])
    parser.add_argument("--docs", default=SHARED / "corpus/wiki2015/docs_selected.jsonl.xz")
    parser.add_argument("--tokenizer", default=SHARED / "tokenizers/fineweb_8192_bpe.model")
    parser.add_argument("--out", help="build output root (default: a new temporary folder)")
    parser.add_argument("--workers", type=int, help="encoder processes (default: all cores)")
    parser.add_argument("--data-dir", default="./data/", help="loader: the data root holding the dataset")
    parser.add_argument("--dataset", default="wiki2015_sp8192", help="loader: dataset name")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--world-size", type=int, default=8, help="loader: ranks the batch is split over")
    parser.add_argument("--steps", type=int, default=200, help="loader: micro-batches to time")
    args = parser.parse_args()
    return bench_build(args) if args.mode == "build" else bench_loader(args)


if __name__ == "__main__":
    sys.exit(main())
