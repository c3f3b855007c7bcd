"""parlm.data: challenge-format shards, SentencePiece tokenizers and byte tables, the corpus
builder, the FineWeb downloader and the training-batch sampler (SPEC section 1), the CaseOps
transform (caseops), the one BPB byte accounting (accounting) and the leak guard (leak).

CLI: `python -m parlm.data {build,inspect,download,tokenizer} --help`. The names below are
imported on first use, so `python -m parlm.data inspect` starts without loading torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ShardError": "shards", "load_validation_tokens": "shards", "open_shard": "shards",
    "read_header": "shards", "validate_shard": "shards", "write_shard": "shards",
    "ByteTables": "tokenizer", "load_tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "ShuffledSequenceLoader": "loader", "build_dataset": "corpus", "ensure_dataset": "corpus",
    "download_dataset": "download",
    "SidecarBytes": "accounting", "byte_accounting": "accounting", "LeakError": "leak",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"parlm.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'parlm.data' has no attribute {name!r}")
