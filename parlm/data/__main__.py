"""`python -m parlm.data {build,inspect,download,tokenizer}`: the data stage's command line."""
from __future__ import annotations

import argparse
import json
import sys

from parlm.data.shards import ShardError


def _build(args) -> int:
    from parlm.data.corpus import build_dataset
    manifest = build_dataset(args.docs, args.out, num_val_docs=args.num_val_docs, tokenizer=args.tokenizer,
                             vocab_size=args.vocab_size, name=args.name, overwrite=args.overwrite,
                             workers=args.workers, shard_tokens=args.shard_tokens,
                             tokenizer_train_docs=args.tokenizer_train_docs, progress=not args.quiet,
                             text_transform=args.text_transform, byte_sidecar=args.byte_sidecar,
                             tokenizer_out=args.tokenizer_out)
    splits = manifest["splits"]
    print(f"dataset {manifest['name']} in {args.out}/datasets/{manifest['name']} "
          f"(tokenizer {manifest['tokenizer']}, vocab {manifest['vocab_size']})")
    for split in ("val", "train"):
        s = splits[split]
        print(f"  {split:5s} docs={s['docs']:,} tokens={s['tokens']:,} text_bytes={s['text_bytes']:,} "
              f"scored_bytes={s['scored_bytes']:,} shards={len(s['files'])}"
              + (f" sidecar_bytes={s['sidecar_bytes']:,}" if "sidecar_bytes" in s else ""))
    guard = manifest["leak_guard"]
    print(f"  leak guard: {len(guard['val_doc_sha256']):,} validation documents, none in the "
          f"{guard['train_docs']:,} train documents")
    return 0


def _inspect(args) -> int:
    from parlm.data.shards import check_token_range, open_shard, token_statistics
    status = 0
    for path in args.shards:
        try:
            stats = token_statistics(path, bos_id=args.bos_id)
            if args.vocab_size is not None:
                check_token_range(path, open_shard(path), args.vocab_size)
        except ShardError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps(stats))
            continue
        print(f"{stats['path']}: magic={stats['magic']} version={stats['version']} "
              f"tokens={stats['num_tokens']:,} bytes={stats['file_bytes']:,}")
        print(f"  ids {stats['min_id']}..{stats['max_id']} distinct={stats['distinct_ids']:,} "
              f"bos(id {args.bos_id})={stats['bos_count']:,}")
        print("  most frequent ids: " + ", ".join(f"{i}x{c:,}" for i, c in stats["top_ids"]))
    return status


def _download(args) -> int:
    from parlm.data.download import download_dataset
    result = download_dataset(args.variant, args.train_shards, args.data_dir, repo_id=args.repo_id,
                              remote_root=args.remote_root, revision=args.revision,
                              endpoint=args.endpoint, progress=not args.quiet)
    counts: dict[str, int] = {}
    for state in result["files"].values():
        counts[state] = counts.get(state, 0) + 1
    print(f"{result['dataset_dir']} from {result['repo_id']}: "
          + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    if "counts" in result:
        print("published counts match: " + ", ".join(f"{k}={v:,}" for k, v in result["counts"].items()))
    return 0


def _tokenizer(args) -> int:
    import tempfile
    from itertools import islice

    from parlm.data.corpus import STDLIB_CORPUS, iter_documents, stdlib_corpus
    from parlm.data.tokenizer import train_tokenizer
    stop = None if args.max_docs is None else args.skip_docs + args.max_docs
    with tempfile.TemporaryDirectory(prefix="parlm_stdlib_") as scratch:
        docs = stdlib_corpus(f"{scratch}/stdlib_docs.jsonl") if args.docs == STDLIB_CORPUS else args.docs
        sp = train_tokenizer(islice(iter_documents(docs), args.skip_docs, stop), args.vocab_size, args.out)
    print(f"trained {args.out}: {sp.vocab_size()} pieces")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parlm.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="tokenize documents into challenge shards",
                                description="Tokenize a JSON-lines corpus ({\"text\": ...} per line) into "
                                            "DIR/datasets/<name>/fineweb_{val,train}_NNNNNN.bin + manifest.json")
    build.add_argument("--docs", required=True, help="FILE.jsonl or FILE.jsonl.xz, or 'stdlib' for the embedded corpus")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="SentencePiece .model to reuse (copied into DIR/tokenizers)")
    source.add_argument("--vocab-size", type=int, help="train a tokenizer of this size (official recipe)")
    build.add_argument("--num-val-docs", type=int, required=True, help="leading documents that form validation")
    build.add_argument("--out", required=True, help="output root DIR (a Config's data_dir)")
    build.add_argument("--name", help="dataset name (default <corpus>_sp<vocab>)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset/tokenizer")
    build.add_argument("--workers", type=int, default=None, help="encoder processes (default: all cores)")
    build.add_argument("--shard-tokens", type=int, default=10_000_000, help="tokens per shard (default 10,000,000)")
    build.add_argument("--tokenizer-train-docs", type=int, default=None,
                       help="train the tokenizer on only the first N training documents")
    build.add_argument("--tokenizer-out", help="where the dataset's tokenizer goes (default DIR/tokenizers/...)")
    build.add_argument("--text-transform", choices=("none", "caseops"), default="none",
                       help="caseops: the lossless case-operator transform of PR #1729 (implies --byte-sidecar)")
    build.add_argument("--byte-sidecar", action="store_true",
                       help="write fineweb_val_bytes_NNNNNN.bin (original text bytes per token)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(run=_build)

    inspect = commands.add_parser("inspect", help="print a shard's header and token statistics",
                                  description="Check shards (SPEC 1.2) and print header + token stats; exits 1 "
                                              "with a one-line error naming the file and fault.")
    inspect.add_argument("shards", nargs="+", metavar="SHARD")
    inspect.add_argument("--vocab-size", type=int, help="also fail on token ids >= this")
    inspect.add_argument("--bos-id", type=int, default=1, help="id counted as document starts (default 1)")
    inspect.add_argument("--json", action="store_true", help="one JSON object per shard")
    inspect.set_defaults(run=_inspect)

    download = commands.add_parser("download", help="download the cached FineWeb export",
                                   description="Download all validation shards, the first N train shards and the "
                                               "tokenizer of a challenge FineWeb export (resumable, size-checked).")
    download.add_argument("--variant", default="sp8192",
                          help="sp8192 (default), sp1024, sp8192_caseops (PR #1729's CaseOps export), ...")
    download.add_argument("--train-shards", type=int, default=80, help="train shards to fetch (default 80)")
    download.add_argument("--data-dir", default="./data/", help="local root (a Config's data_dir)")
    download.add_argument("--repo-id", help="HF dataset repo (default: kevclark/parameter-golf for sp8192, "
                                            "willdepueoai/parameter-golf otherwise)")
    download.add_argument("--remote-root", default="datasets", help="export folder inside the repo")
    download.add_argument("--revision", help="repo revision (default main)")
    download.add_argument("--endpoint", help="Hub endpoint URL (mirror or test server)")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(run=_download)

    tokenizer = commands.add_parser("tokenizer", help="train a SentencePiece tokenizer (official recipe)",
                                    description="Train a BPE tokenizer with byte_fallback, split_digits, nmt_nfkc, "
                                                "no dummy prefix, coverage 0.999, pad/bos/eos/unk = 0/1/2/3.")
    tokenizer.add_argument("--docs", required=True, help="FILE.jsonl[.xz] or 'stdlib'")
    tokenizer.add_argument("--vocab-size", type=int, required=True)
    tokenizer.add_argument("--out", required=True, help="output .model path")
    tokenizer.add_argument("--skip-docs", type=int, default=0, help="skip the first N documents (validation)")
    tokenizer.add_argument("--max-docs", type=int, default=None, help="use at most N documents")
    tokenizer.set_defaults(run=_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
