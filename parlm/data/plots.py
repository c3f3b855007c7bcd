"""Statistics and figures for the data notebook (01_data): split sizes, bytes per token,
document lengths, frequent pieces, a byte-table check on the shards themselves, and CaseOps
(PR #1729) beside plain data: the transform on examples, raw bytes per token of both kinds of
the same dataset (`caseops_pair` builds the missing kind), and the leak guard's verdicts."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from parlm.data.shards import open_shard, shard_files
from parlm.data.tokenizer import ByteTables


def split_table(manifest: dict) -> list[dict]:
    """One row per split: docs, tokens, UTF-8 text bytes, scored bytes (SPEC 1.6 tables) and
    scored bytes per token (the factor that turns nats/token into bits/byte, times 1/ln 2)."""
    rows = []
    for split in ("val", "train"):
        s = manifest["splits"][split]
        row = {"split": split, "docs": s.get("docs"), "tokens": s["tokens"], "shards": len(s["files"]),
               "text_bytes": s.get("text_bytes"), "scored_bytes": s.get("scored_bytes")}
        row["bytes_per_token"] = s["scored_bytes"] / s["tokens"] if s.get("scored_bytes") else None
        rows.append(row)
    return rows


def format_split_table(rows: list[dict]) -> str:
    """The split table as aligned text."""
    lines = [f"{'split':6s}{'docs':>9s}{'tokens':>14s}{'shards':>8s}{'text bytes':>15s}"
             f"{'scored bytes':>15s}{'bytes/token':>13s}"]
    for r in rows:
        per = f"{r['bytes_per_token']:.4f}" if r["bytes_per_token"] else "-"
        lines.append(f"{r['split']:6s}{r['docs'] or 0:>9,}{r['tokens']:>14,}{r['shards']:>8}"
                     f"{r['text_bytes'] or 0:>15,}{r['scored_bytes'] or 0:>15,}{per:>13s}")
    return "\n".join(lines)


def split_documents(tokens: np.ndarray, bos_id: int = 1) -> list[np.ndarray]:
    """Cut a BOS-prefixed stream into documents (each starting with its BOS)."""
    starts = np.flatnonzero(tokens == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.split(tokens, starts[1:])


def document_lengths(pattern: str | os.PathLike, bos_id: int = 1) -> np.ndarray:
    """Token count of every document (BOS included) in the shards matching `pattern`; a
    document cut by a shard boundary counts as two."""
    lengths = []
    for path in shard_files(pattern):
        tokens = np.asarray(open_shard(path))
        starts = np.flatnonzero(tokens == bos_id)
        if starts.size == 0 or starts[0] != 0:
            starts = np.concatenate([[0], starts])
        lengths.append(np.diff(np.append(starts, len(tokens))))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def piece_frequencies(pattern: str | os.PathLike, sp, top: int = 20, max_tokens: int = 50_000_000) -> list[tuple]:
    """The `top` most frequent token ids in (up to `max_tokens` of) the shards: (id, piece,
    count, share of tokens)."""
    counts = np.zeros(int(sp.vocab_size()), dtype=np.int64)
    seen = 0
    for path in shard_files(pattern):
        tokens = np.asarray(open_shard(path)[: max(0, max_tokens - seen)])
        counts += np.bincount(tokens, minlength=counts.size)[: counts.size]
        seen += len(tokens)
    order = np.argsort(-counts, kind="stable")[:top]
    return [(int(i), sp.id_to_piece(int(i)), int(counts[i]), counts[i] / max(seen, 1)) for i in order]


def byte_table_check(pattern: str | os.PathLike, sp, max_docs: int = 200) -> dict:
    """For up to `max_docs` documents of the shards: bytes charged by the SPEC 1.6 tables
    (prev = preceding token, BOS first) vs the UTF-8 length of sp.decode of the document's
    tokens, taken per run between <unk>s (an <unk> is a boundary in SPEC 1.6).

    Returns {docs, matching, counted_bytes, decoded_bytes, first_mismatch}."""
    tables = ByteTables.from_tokenizer(sp)
    tokens = np.concatenate([np.asarray(open_shard(f)) for f in shard_files(pattern)]).astype(np.int64)
    result = {"docs": 0, "matching": 0, "counted_bytes": 0, "decoded_bytes": 0, "first_mismatch": None}
    for document in split_documents(tokens, sp.bos_id())[:max_docs]:
        if len(document) < 2:
            continue
        counted = int(tables.count_bytes(document[1:], document[:-1]).sum())
        ids = document[1:].tolist()
        runs = [list(r) for is_unk, r in itertools.groupby(ids, lambda i: i == sp.unk_id()) if not is_unk]
        decoded = sum(len(sp.decode(run).encode("utf-8")) for run in runs)
        result["docs"] += 1
        result["matching"] += counted == decoded
        result["counted_bytes"] += counted
        result["decoded_bytes"] += decoded
        if counted != decoded and result["first_mismatch"] is None:
            result["first_mismatch"] = sp.decode(ids)[:200]
    return result


def plot_document_lengths(lengths_by_split: dict, path: str | os.PathLike | None = None):
    """Histogram (log-spaced bins, % of each split) of document lengths in tokens, one series per split."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    everything = np.concatenate([v for v in lengths_by_split.values() if len(v)])
    bins = np.logspace(np.log10(max(1, everything.min())), np.log10(everything.max() + 1), 40)
    for split, lengths in lengths_by_split.items():
        if len(lengths):
            axis.hist(lengths, bins=bins, alpha=0.55, weights=np.full(len(lengths), 100 / len(lengths)),
                      label=f"{split} ({len(lengths):,} docs, median {int(np.median(lengths)):,})")
    axis.set_xscale("log")
    axis.set_xlabel("document length (tokens, BOS included)")
    axis.set_ylabel("% of the split's documents")
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def plot_piece_frequencies(rows: list[tuple], path: str | os.PathLike | None = None):
    """Horizontal bars of the most frequent pieces (share of all tokens)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 0.25 * len(rows) + 1))
    labels = [f"{piece!r} ({token_id})" for token_id, piece, _, _ in rows][::-1]
    axis.barh(labels, [100 * share for *_, share in rows][::-1])
    axis.set_xlabel("% of tokens")
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    return figure


# ---- CaseOps (PR #1729) ---------------------------------------------------------------------
CASEOPS_EXAMPLES = ("The NASA Launch", "iPhone OpenAI", "ΣΊΣΥΦΟΣ and Straße (ß, İ, ǅ kept)",
                    "an operator \ue001 in the text")
OPERATOR_LABELS = {"\ue001": "⟨T⟩", "\ue002": "⟨A⟩", "\ue003": "⟨C⟩", "\ue004": "⟨E⟩"}


def show_operators(text: str) -> str:
    """CaseOps text with its operators written as ⟨T⟩ TITLE, ⟨A⟩ ALLCAPS, ⟨C⟩ CAPNEXT, ⟨E⟩ ESC."""
    return "".join(OPERATOR_LABELS.get(c, c) for c in text)


def caseops_pair(config, manifest: dict):
    """(plain config, CaseOps config) of `config`'s dataset and its twin, or None when the
    dataset has no source documents to rebuild from (a download).

    The twin has the same documents and validation split (the manifest's docs_file and
    num_val_docs), a tokenizer of the same size trained on the other kind of train text, and
    validation byte sidecars; it is built under config.data_dir on first use
    (`build_or_load_dataset`, the dataset name with or without `_caseops`), loaded after."""
    from parlm.data.corpus import build_or_load_dataset

    docs = manifest.get("docs_file")
    if not docs or not Path(docs).is_file() or manifest.get("num_val_docs") is None:
        return None
    is_caseops = config.text_transform == "caseops"
    vocab, name = int(manifest["vocab_size"]), manifest["name"]
    suffix = f"_sp{vocab}"
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    twin_name = (stem.replace("_caseops", "") if is_caseops else f"{stem}_caseops") + suffix
    tokenizer = Path(config.data_dir) / "tokenizers" / f"{twin_name}.model"
    built = build_or_load_dataset(docs, config.data_dir, num_val_docs=int(manifest["num_val_docs"]),
                                  vocab_size=vocab, name=twin_name, tokenizer_out=tokenizer, progress=False,
                                  text_transform="none" if is_caseops else "caseops", byte_sidecar=True)
    twin = config.replace(dataset_name=built["name"], tokenizer_path=str(Path(config.data_dir) / built["tokenizer"]),
                          text_transform="none" if is_caseops else "caseops",
                          byte_accounting="tables" if is_caseops else "sidecar")
    return (twin, config) if is_caseops else (config, twin)


def caseops_overview(plain_config, caseops_config, examples=CASEOPS_EXAMPLES) -> dict:
    """What notebook 01 shows for CaseOps, from two built datasets (plain and CaseOps):

    - examples: text, its CaseOps form, the round trip, and the token count with each tokenizer;
    - bytes per token of each validation split: raw text bytes / tokens (CaseOps: the sidecar
      sum, which equals the documents' raw bytes; plain: the manifest's text_bytes), beside
      the SentencePiece-piece bytes / tokens of the tables;
    - the leak guard's verdict on each dataset (parlm.data.leak.check_config).
    """
    from parlm.data import caseops, leak
    from parlm.data.corpus import read_manifest
    from parlm.data.tokenizer import load_tokenizer

    plain_sp = load_tokenizer(plain_config.resolved_tokenizer_path)
    caseops_sp = load_tokenizer(caseops_config.resolved_tokenizer_path)
    rows = []
    for text in examples:
        encoded = caseops.encode(text)
        rows.append({"text": text, "caseops": show_operators(encoded), "round_trip": caseops.decode(encoded) == text,
                     "plain_tokens": len(plain_sp.encode(text)), "caseops_tokens": len(caseops_sp.encode(encoded))})
    splits, verdicts = {}, {}
    for label, config in (("plain", plain_config), ("caseops", caseops_config)):
        manifest = read_manifest(config.datasets_dir) or {}
        val = manifest.get("splits", {}).get("val", {})
        raw = val.get("sidecar_bytes", val.get("text_bytes"))
        splits[label] = {"tokens": val.get("tokens"), "raw_bytes": raw, "piece_bytes": val.get("scored_bytes"),
                         "raw_bytes_per_token": raw / val["tokens"] if raw and val.get("tokens") else None,
                         "piece_bytes_per_token": (val["scored_bytes"] / val["tokens"]
                                                   if val.get("scored_bytes") and val.get("tokens") else None)}
        try:
            verdicts[label] = dict(leak.check_config(config), ok=True)
        except leak.LeakError as error:
            verdicts[label] = {"ok": False, "message": str(error)}
    return {"examples": rows, "bytes_per_token": splits, "leak_guard": verdicts}


def format_caseops_overview(overview: dict) -> str:
    """The overview as text: examples, bytes per token before/after, leak-guard verdicts."""
    lines = ["CaseOps examples (⟨T⟩ title, ⟨A⟩ all caps, ⟨C⟩ capital next, ⟨E⟩ escape):"]
    for row in overview["examples"]:
        lines.append(f"  {row['text']!r} -> {row['caseops']!r}  round trip {'ok' if row['round_trip'] else 'FAILED'}"
                     f"  tokens plain {row['plain_tokens']} / caseops {row['caseops_tokens']}")
    lines.append("validation bytes per token (raw text bytes; SentencePiece piece bytes):")
    for label, s in overview["bytes_per_token"].items():
        raw = f"{s['raw_bytes_per_token']:.4f}" if s["raw_bytes_per_token"] else "n/a"
        piece = f"{s['piece_bytes_per_token']:.4f}" if s["piece_bytes_per_token"] else "n/a"
        lines.append(f"  {label:8s} tokens={s['tokens'] or 0:,} raw_bytes={s['raw_bytes'] or 0:,} "
                     f"raw/token={raw} pieces/token={piece}")
    for label, verdict in overview["leak_guard"].items():
        text = (f"no validation document in train ({verdict['val_docs']:,} checked by {verdict['method']})"
                if verdict["ok"] else verdict["message"])
        lines.append(f"leak guard, {label}: {text}")
    return "\n".join(lines)


def plot_bytes_per_token(overview: dict, path: str | os.PathLike | None = None):
    """Bars of raw text bytes per validation token, plain vs CaseOps."""
    import matplotlib.pyplot as plt

    labels = list(overview["bytes_per_token"])
    values = [overview["bytes_per_token"][k]["raw_bytes_per_token"] or 0 for k in labels]
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.bar(labels, values, color=["tab:gray", "tab:blue"][:len(labels)])
    for index, value in enumerate(values):
        axis.text(index, value, f"{value:.3f}", ha="center", va="bottom")
    axis.set_ylabel("raw text bytes per validation token")
    figure.tight_layout()
    return _save(figure, path)
