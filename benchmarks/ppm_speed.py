"""Single-core speed of the legacy PPM byte mixture on a FineWeb-validation-sized stream.

Stream: real text, the wiki2015 corpus (../shared/corpus/wiki2015, 143.9 MB) tokenized with the
SP8192 tokenizer, each document prefixed with BOS (the proxy recipe), concatenated and
repeated from its start until the stream holds exactly --bytes bytes (default 151,078,222, the
FineWeb validation byte count; the last few bytes are filled with byte-fallback tokens so the
total is exact). The repeated head (~5% of the bytes) is easier for PPM than unseen text.
NLLs are synthetic (exponential, mean 2.5 nats/token, seeded): they only feed the mixing
arithmetic, whose cost does not depend on their values. The tokenized corpus is cached in
--cache (default data/benchmarks/) so later runs skip the ~1-2 minutes of tokenization.

numba runs the kernel on one thread; the script pins itself to one CPU (os.sched_setaffinity)
and reports every repeat and the minimum wall time (other work may share the cores, so the
process CPU time is reported beside it).

    python benchmarks/ppm_speed.py [--bytes 151078222] [--repeats 3] [--json]

`--mixture` instead times the valid token mixture (`parlm.eval.token_mixture.TokenNgramMixture`) as one
rank of a score-first TTT pass sees it: every chunk of --chunk-tokens positions, this rank
scores 1/--ranks of them in batches of --batch positions (random logits over the 8192 ids,
real wiki2015 tokens as the stream, from --shards or by tokenizing --docs) and then advances
the counts by the whole chunk:

    python benchmarks/ppm_speed.py --mixture --device cuda \
        --shards 'data/datasets/wiki2015_sp8192/fineweb_train_*.bin' [--tokens 40540160 --ranks 8]
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
FINEWEB_VAL_BYTES = 151_078_222
DEFAULT_DOCS = REPO_ROOT.parent / "shared" / "corpus" / "wiki2015" / "docs_selected.jsonl.xz"
DEFAULT_TOKENIZER = REPO_ROOT.parent / "shared" / "tokenizers" / "fineweb_8192_bpe.model"


def tokenized_corpus(docs: Path, tokenizer: Path, cache: Path) -> np.ndarray:
    """BOS + tokens of every document, concatenated (uint16), cached as .npy."""
    path = cache / f"{docs.name.split('.')[0]}_{tokenizer.stem}_tokens.npy"
    if path.exists():
        return np.load(path)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = [json.loads(line)["text"] for line in lzma.open(docs, "rt", encoding="utf-8")]
    started = time.perf_counter()
    pieces = []
    for start in range(0, len(texts), 500):
        for ids in sp.encode(texts[start:start + 500], num_threads=os.cpu_count() or 1):
            pieces.append(np.array([1] + ids, dtype=np.uint16))
    tokens = np.concatenate(pieces)
    print(f"tokenized {len(texts)} docs into {len(tokens):,} tokens in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, tokens)
    return tokens


def build_stream(tokens: np.ndarray, layout, n_bytes: int, seed: int = 0):
    """(target, prev, nll) holding exactly n_bytes bytes of SPEC 6.2 stream."""
    stream = tokens.astype(np.int64)
    target, prev = stream[1:], stream[:-1]
    counts = layout.byte_counts(target, prev)
    per_pass = int(counts.sum())
    repeats = n_bytes // per_pass + 1
    target = np.tile(target, repeats)
    prev = np.tile(prev, repeats)
    cumulative = np.cumsum(np.tile(counts, repeats))
    keep = int(np.searchsorted(cumulative, n_bytes, side="right"))
    missing = n_bytes - (int(cumulative[keep - 1]) if keep else 0)
    filler = 3 + 0x61  # an `<0x61>` byte-fallback id ("a"): one byte, never a leading space
    target = np.concatenate([target[:keep], np.full(missing, filler)])
    prev = np.concatenate([prev[:keep], np.full(missing, filler)])
    rng = np.random.default_rng(seed)
    nll = rng.exponential(2.5, size=len(target))
    assert int(layout.byte_counts(target, prev).sum()) == n_bytes
    return target, prev, nll


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=FINEWEB_VAL_BYTES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / "data" / "benchmarks")
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--mixture", action="store_true", help="time TokenNgramMixture instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=40_540_160, help="stream length (--mixture)")
    parser.add_argument("--chunk-tokens", type=int, default=32768)
    parser.add_argument("--ranks", type=int, default=8, help="simulated world size (--mixture)")
    parser.add_argument("--batch", type=int, default=2048, help="positions per nll call (--mixture)")
    parser.add_argument("--mixture-order", type=int, default=3)
    parser.add_argument("--shards", default="", help="token stream from challenge-format shards "
                        "(e.g. 'data/datasets/wiki2015_sp8192/fineweb_train_*.bin') instead of "
                        "tokenizing --docs (--mixture)")
    args = parser.parse_args(argv)
    if args.mixture:
        return mixture_benchmark(args)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numba

    numba.set_num_threads(1)
    from parlm.data.tokenizer import ByteTables
    from parlm.ppm import TokenByteLayout, legacy_mixture

    layout = TokenByteLayout.from_byte_tables(ByteTables.from_tokenizer(args.tokenizer))
    tokens = tokenized_corpus(args.docs, args.tokenizer, args.cache)
    target, prev, nll = build_stream(tokens, layout, args.bytes)
    print(f"stream: {len(target):,} tokens, {args.bytes:,} bytes", file=sys.stderr)
    legacy_mixture(target[:2000], prev[:2000], nll[:2000], layout, order=args.order)  # JIT / cache load
    times, cpu_times, result = [], [], None
    for repeat in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = legacy_mixture(target, prev, nll, layout, order=args.order, trace_max=1_000_000)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        print(f"repeat {repeat}: wall {times[-1]:.2f} s ({1e9 * times[-1] / result.bytes:.0f} ns/byte), "
              f"process CPU {cpu_times[-1]:.2f} s, "
              f"mix_bpb={result.mix_bpb:.6f} ppm_only={result.ppm_only_bpb:.6f} "
              f"gate_skip={100 * result.gate_skip:.2f}% table={result.table_bytes / 2**20:.0f} MiB",
              file=sys.stderr)
    summary = {"bytes": result.bytes, "tokens": result.tokens, "seconds_min": min(times),
               "seconds_all": times, "cpu_seconds_min": min(cpu_times), "cpu_seconds_all": cpu_times, "ns_per_byte": 1e9 * min(times) / result.bytes,
               "target_seconds": 60.0, "meets_target": min(times) < 60.0,
               "ppm_only_bpb": result.ppm_only_bpb, "table_rows": result.table_rows,
               "table_bytes": result.table_bytes, "stream": "wiki2015 sp8192 (real text), synthetic NLL"}
    print(json.dumps(summary) if args.json else
          f"min {min(times):.2f} s over {args.repeats} runs for {result.bytes:,} bytes "
          f"({summary['ns_per_byte']:.0f} ns/byte; process CPU min {min(cpu_times):.2f} s); "
          f"target < 60 s: {summary['meets_target']}")
    return 0


def mixture_benchmark(args) -> int:
    """Per-chunk cost of TokenNgramMixture.nll (this rank's share) and .advance (module doc)."""
    import torch

    from parlm.config import Config
    from parlm.eval.token_mixture import TokenNgramMixture

    device = torch.device(args.device)
    if args.shards:
        from parlm.data.shards import load_shard, shard_files

        tokens = np.concatenate([load_shard(path) for path in shard_files(args.shards)]).astype(np.int64)
    else:
        tokens = tokenized_corpus(args.docs, args.tokenizer, args.cache).astype(np.int64)
    tokens = np.tile(tokens, args.tokens // len(tokens) + 1)[: args.tokens + 1]
    config = Config().replace(mixture_order=args.mixture_order)
    mixture = TokenNgramMixture(config, torch.as_tensor(tokens), 8192, device)
    total = len(tokens) - 1
    chunks = -(-total // args.chunk_tokens)
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.batch, 8192, device=device, generator=generator) * 3

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    nll_seconds = advance_seconds = 0.0
    per_chunk = []
    for ci in range(chunks):
        start, end = ci * args.chunk_tokens, min((ci + 1) * args.chunk_tokens, total)
        share = -(-(end - start) // args.ranks)
        sync()
        t0 = time.perf_counter()
        for first in range(start, min(start + share, end), args.batch):
            positions = torch.arange(first, min(first + args.batch, start + share, end), device=device)
            mixture.nll(logits[: len(positions)], positions)
        sync()
        t1 = time.perf_counter()
        mixture.advance(end)
        sync()
        t2 = time.perf_counter()
        nll_seconds += t1 - t0
        advance_seconds += t2 - t1
        per_chunk.append((t1 - t0, t2 - t1))
        if ci % 100 == 0:
            print(f"chunk {ci}/{chunks}: nll {1e3 * (t1 - t0):.1f} ms, advance {1e3 * (t2 - t1):.1f} ms, "
                  f"keys {[t.keys.numel() for t in mixture.tables]}", file=sys.stderr)
    last = np.array(per_chunk[-100:])
    summary = {"device": str(device), "tokens": total, "chunks": chunks, "ranks": args.ranks,
               "order": args.mixture_order, "nll_seconds": nll_seconds, "advance_seconds": advance_seconds,
               "seconds_per_chunk": (nll_seconds + advance_seconds) / chunks,
               "last100_nll_ms": 1e3 * float(last[:, 0].mean()),
               "last100_advance_ms": 1e3 * float(last[:, 1].mean()),
               "keys_per_order": [t.keys.numel() for t in mixture.tables]}
    if device.type == "cuda":
        summary["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        summary["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
