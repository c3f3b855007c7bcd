"""Corpus builder: documents -> tokenizer -> challenge shards + manifest (SPEC 1.1).

Layout written under an output root DIR (the `data_dir` of a Config):

    DIR/datasets/<name>/fineweb_val_000000.bin ...     first `num_val_docs` documents
    DIR/datasets/<name>/fineweb_train_000000.bin ...   the rest, `shard_tokens` per shard
    DIR/datasets/<name>/fineweb_val_bytes_000000.bin ... byte sidecars (CaseOps / byte_sidecar)
    DIR/datasets/<name>/train_doc_hashes.u64            the leak guard's train hashes
    DIR/datasets/<name>/manifest.json                   counts, checksums, versions, val hashes
    DIR/tokenizers/<model>.model                        the tokenizer the shards use

As in the official export, every document is encoded and prefixed with BOS (id 1), no EOS is
appended, and the stream is cut into shards of exactly `shard_tokens` tokens (the last one of
each split shorter). Encoding runs in worker processes over consecutive batches of documents
whose results are consumed in input order, so the output does not depend on the worker count.
A dataset is built in a hidden folder and renamed into place after its manifest is written,
so a folder named like a dataset is always complete.
"""
from __future__ import annotations

import io
import json
import lzma
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from tqdm.auto import tqdm

from parlm.data import caseops, leak
from parlm.data.accounting import token_original_bytes
from parlm.data.shards import ShardWriter, check_dataset_vocabulary, shard_files, sidecar_path
from parlm.data.tokenizer import ByteTables, NoTrainingText, load_tokenizer, train_tokenizer
from parlm.runlog import atomic_path, file_sha256

DEFAULT_SHARD_TOKENS = 10_000_000
STDLIB_CORPUS = "stdlib"  # the --docs value that selects the embedded corpus
STDLIB_CORPUS_NAME = "stdlib_docs"
STDLIB_SHUFFLE_SEED = 1337
# First documents of the shuffled stdlib corpus held out for validation (>= 32k val tokens at
# vocab 1024, which the demo preset's val_max_tokens needs; checked by the tests).
STDLIB_NUM_VAL_DOCS = 50
BATCH_BYTES = 1 << 20  # documents are sent to encoder workers in batches of about 1 MiB


class DatasetExistsError(FileExistsError):
    """The output dataset (or tokenizer) already exists and overwrite was not requested."""


# --------------------------------------------------------------------------------------
# Document readers
def _open_text(path: Path, raw):
    if path.name.endswith(".xz"):
        return lzma.open(raw, "rt", encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def read_line_batches(path: str | os.PathLike, batch_bytes: int = BATCH_BYTES,
                      progress: bool = False) -> Iterator[list[str]]:
    """Non-blank lines of a `.jsonl` or `.jsonl.xz` file in batches of about `batch_bytes`
    characters (JSON not parsed yet); a tqdm bar follows the bytes read from disk."""
    path = Path(path)
    with open(path, "rb") as raw, _open_text(path, raw) as text, \
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"encode {path.name}",
                 disable=not progress, mininterval=1.0) as bar:
        batch, size = [], 0
        for line in text:
            if not line.strip():
                continue
            batch.append(line)
            size += len(line)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
                bar.update(raw.tell() - bar.n)
        if batch:
            yield batch
        bar.update(raw.tell() - bar.n)


def parse_document(line: str) -> str:
    """The text of one JSON line `{"text": ...}`; ValueError says what is wrong."""
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"expected a JSON object with a string 'text' field, got {line[:80]!r}")
    return record["text"]


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Document texts of a `.jsonl` / `.jsonl.xz` file of `{"text": ...}` lines, in order."""
    for batch in read_line_batches(path):
        yield from (parse_document(line) for line in batch)


def write_documents(texts: Iterable[str], path: str | os.PathLike) -> Path:
    """Write texts as a `{"text": ...}` JSON-lines file (atomically); returns the path."""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def stdlib_corpus(path: str | os.PathLike) -> Path:
    """Write (if absent) the embedded default corpus as JSON lines at `path` and return it.

    The documents of `parlm.data.stdlib_docs` are extracted in a child process (imports have
    side effects the caller must not see) and put in a fixed shuffled order (seed 1337), so
    the leading validation documents are a random sample of modules and topics.
    """
    path = Path(path)
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as scratch:
        extracted = Path(scratch) / "docs.jsonl"
        # -I: isolated interpreter that imports nothing of parlm (or torch) and does not put
        # the script's folder on sys.path.
        script = Path(__file__).with_name("stdlib_docs.py")
        result = subprocess.run([sys.executable, "-I", str(script), str(extracted)],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"extracting the stdlib corpus failed: {result.stderr.strip()[-2000:]}")
        texts = list(iter_documents(extracted))
    order = np.random.default_rng(STDLIB_SHUFFLE_SEED).permutation(len(texts))
    return write_documents((texts[i] for i in order), path)



# --------------------------------------------------------------------------------------
# Parallel encoding
_WORKER: dict = {}


def _init_worker(model_path: str, options: dict) -> None:
    sp = spm.SentencePieceProcessor(model_file=model_path)
    _WORKER["sp"] = sp
    _WORKER["tables"] = ByteTables.from_tokenizer(sp)
    _WORKER.update(options)


def _encode_batch(job: tuple[int, list[str]]):
    """Encode one batch (index of its first document, JSON lines): (uint16 BOS-prefixed
    token stream, per-document token counts, UTF-8 text bytes, bytes charged by the SPEC 1.6
    tables, the stream's original bytes per token (zeros unless the document is a
    validation document of a build with sidecars), per-document leak-guard hashes)."""
    sp, tables, transform = _WORKER["sp"], _WORKER["tables"], _WORKER["text_transform"]
    first, lines = job
    texts = [parse_document(line) for line in lines]
    hashes = [leak.document_hash(text) for text in texts]
    sidecar_docs = _WORKER["num_val_docs"] - first if _WORKER["byte_sidecar"] else 0
    originals = [token_original_bytes(sp, text, transform) for text in texts[:max(sidecar_docs, 0)]]
    rest = [caseops.apply(transform, text) for text in texts[len(originals):]]
    encoded = [ids.tolist() for ids, _ in originals]
    encoded += sp.encode(rest, out_type=int, num_threads=1)  # parallelism comes from the workers
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    stream = np.empty(int(lengths.sum()), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream[starts] = sp.bos_id()
    for start, ids in zip(starts, encoded):
        stream[start + 1:start + 1 + len(ids)] = ids
    charged = np.zeros(len(stream), dtype=np.int64)
    charged[1:] = tables.count_bytes(stream[1:], stream[:-1])  # BOS targets cost 0 bytes
    scored = np.add.reduceat(charged, starts) if len(stream) else np.zeros(0, np.int64)
    text_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    original = np.zeros(len(stream), dtype=np.int64)
    for start, (_, counts) in zip(starts, originals):
        original[start + 1:start + 1 + len(counts)] = counts
    if original.size and original.max() > 65535:
        raise ValueError("a token stands for more than 65535 bytes of text; the uint16 sidecar cannot hold it")
    return stream.astype(np.uint16), lengths, text_bytes, scored, original.astype(np.uint16), hashes


def _numbered(batches: Iterable[list[str]]) -> Iterator[tuple[int, list[str]]]:
    done = 0
    for batch in batches:
        yield done, batch
        done += len(batch)


def encode_batches(batches: Iterable[list[str]], model_path: str, workers: int, options: dict | None = None):
    """Yield `_encode_batch` results in input order, using `workers` processes (1 = inline).
    options: text_transform, byte_sidecar, num_val_docs (default: plain text, no sidecar)."""
    options = dict(dict(text_transform="none", byte_sidecar=False, num_val_docs=0), **(options or {}))
    batches = _numbered(batches)
    if workers <= 1:
        _init_worker(model_path, options)
        yield from map(_encode_batch, batches)
        return
    # fork: "spawn"/"forkserver" workers re-import the caller's __main__ (a script without a
    # main guard would run again; `python -` cannot be re-imported at all). The children only
    # run sentencepiece and NumPy, so the usual fork hazards (locks held by other threads of
    # the parent) do not reach them.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (model_path, options)) as pool:
        yield from pool.imap(_encode_batch, batches)


# --------------------------------------------------------------------------------------
# Building a dataset
def default_dataset_name(docs: str | os.PathLike, vocab_size: int) -> str:
    """`<corpus>_sp<vocab>`; the corpus is the file name without `.jsonl[.xz]`, or its folder's
    name for the challenge's generic `docs_selected` (so wiki2015/docs_selected -> wiki2015)."""
    if str(docs) == STDLIB_CORPUS:
        return f"{STDLIB_CORPUS_NAME}_sp{vocab_size}"
    path = Path(docs)
    stem = path.name.split(".jsonl")[0]
    if stem == "docs_selected" and path.resolve().parent.name:
        stem = path.resolve().parent.name
    return f"{stem}_sp{vocab_size}"


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise DatasetExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to "
                                 f"replace it, or choose another --out/--name")


def _tokenizer_target(docs_path: Path, out: Path, tokenizer, vocab_size, tokenizer_out) -> Path:
    """Where the dataset's tokenizer goes: `tokenizer_out`, else DIR/tokenizers/<the given
    model's name>, else DIR/tokenizers/<corpus>_<vocab>_bpe.model for a trained one."""
    if tokenizer_out:
        return Path(tokenizer_out)
    if tokenizer is not None:
        return out / "tokenizers" / Path(tokenizer).name
    corpus = STDLIB_CORPUS_NAME if docs_path.name.startswith(STDLIB_CORPUS_NAME) else \
        default_dataset_name(docs_path, vocab_size).rsplit("_sp", 1)[0]
    return out / "tokenizers" / f"{corpus}_{vocab_size}_bpe.model"


def _prepare_tokenizer(docs_path: Path, target: Path, tokenizer, vocab_size, num_val_docs: int,
                       overwrite: bool, tokenizer_train_docs: int | None, text_transform: str = "none") -> None:
    """Copy a given model to `target` (or reuse it there), or train one on the training
    documents (those after the first num_val_docs, so validation text never shapes the
    vocabulary) under `text_transform`; CaseOps reserves its operators as user-defined
    pieces (PR #1729)."""
    if tokenizer is not None:
        source = Path(tokenizer)
        load_tokenizer(source)  # clear error if missing
        if target.exists() and target.resolve() == source.resolve():
            return
        if target.exists() and file_sha256(target) != file_sha256(source):
            _check_target(target, overwrite)
        with atomic_path(target) as temporary:
            shutil.copyfile(source, temporary)
        return
    _check_target(target, overwrite)

    def training_texts():
        for index, text in enumerate(iter_documents(docs_path)):
            if index < num_val_docs:
                continue
            if tokenizer_train_docs is not None and index >= num_val_docs + tokenizer_train_docs:
                break
            yield caseops.apply(text_transform, text)

    overrides = dict(user_defined_symbols=list(caseops.OPERATORS)) if text_transform == "caseops" else {}
    try:
        train_tokenizer(training_texts(), vocab_size, target, **overrides)
    except NoTrainingText:
        raise ValueError(f"{docs_path} has no training text after the first num_val_docs={num_val_docs} "
                         f"documents; lower --num-val-docs") from None


def build_dataset(docs: str | os.PathLike, out: str | os.PathLike, *, num_val_docs: int,
                  tokenizer: str | os.PathLike | None = None, vocab_size: int | None = None,
                  name: str | None = None, overwrite: bool = False, workers: int | None = None,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, tokenizer_out: str | os.PathLike | None = None,
                  tokenizer_train_docs: int | None = None, progress: bool = True,
                  text_transform: str = "none", byte_sidecar: bool = False) -> dict:
    """Tokenize a document file into `out/datasets/<name>/` shards and return the manifest.

    docs: a `.jsonl`/`.jsonl.xz` file of `{"text": ...}` lines, or "stdlib" for the embedded
    corpus (written to `out/corpus/stdlib_docs.jsonl`). Exactly one of `tokenizer` (a model
    to reuse; copied to `out/tokenizers/`) or `vocab_size` (train one with the official recipe)
    is required. The first `num_val_docs` documents form the validation split. An existing
    dataset is replaced (atomically) only when `overwrite` is true.

    text_transform: "none" or "caseops" (PR #1729; implies byte_sidecar). byte_sidecar: write
    the validation shards' byte sidecars (original text bytes per token, parlm.data.shards).
    The leak guard (parlm.data.leak) hashes every document; a train document equal to a
    validation document raises LeakError and no dataset is written.
    """
    if text_transform not in caseops.TRANSFORMS:
        raise ValueError(f"text_transform={text_transform!r}; expected one of {caseops.TRANSFORMS}")
    byte_sidecar = byte_sidecar or text_transform == "caseops"
    out = Path(out)
    if (tokenizer is None) == (not vocab_size):
        raise ValueError("give exactly one of tokenizer (a .model to reuse) or vocab_size (train one)")
    if shard_tokens <= 0 or num_val_docs < 0:
        raise ValueError(f"shard_tokens={shard_tokens} must be > 0 and num_val_docs={num_val_docs} >= 0")
    docs_path = stdlib_corpus(out / "corpus" / f"{STDLIB_CORPUS_NAME}.jsonl") if str(docs) == STDLIB_CORPUS else Path(docs)
    if not docs_path.is_file():
        raise FileNotFoundError(f"document file {docs_path} not found")
    sp_vocab = vocab_size or int(load_tokenizer(tokenizer).vocab_size())
    marker = "_caseops" if text_transform == "caseops" else ""
    name = name or default_dataset_name(docs, sp_vocab).replace("_sp", f"{marker}_sp")
    final = out / "datasets" / name
    _check_target(final, overwrite)
    model_path = _tokenizer_target(docs_path, out, tokenizer, vocab_size, tokenizer_out)
    if marker and tokenizer is None and not tokenizer_out:  # <corpus>_caseops_<vocab>_bpe.model
        model_path = model_path.with_name(model_path.name.replace(f"_{vocab_size}_bpe", f"{marker}_{vocab_size}_bpe"))
    tokenizer_existed = model_path.exists()
    try:
        _prepare_tokenizer(docs_path, model_path, tokenizer, vocab_size, num_val_docs, overwrite,
                           tokenizer_train_docs, text_transform)
        sp = load_tokenizer(model_path)
        if sp.vocab_size() > 65536:
            raise ValueError(f"{model_path} has {sp.vocab_size()} pieces; uint16 shards hold at most 65536")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=final.parent))
        try:
            os.chmod(staging, 0o755)
            options = dict(text_transform=text_transform, byte_sidecar=byte_sidecar, num_val_docs=num_val_docs)
            totals, guard = _write_shards(docs_path, staging, str(model_path), num_val_docs, shard_tokens,
                                          workers or os.cpu_count() or 1, progress, options)
            manifest = _manifest(name, docs, docs_path, model_path, out, sp, num_val_docs, shard_tokens, totals)
            manifest.update(text_transform=text_transform, byte_sidecar=byte_sidecar, leak_guard=guard)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            _check_target(final, overwrite)
            if final.exists():  # swap in the new folder, then delete the old one
                retired = Path(tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=final.parent))
                os.replace(final, retired / name)
                os.replace(staging, final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if not tokenizer_existed:  # a tokenizer written for a build that failed is not kept
            model_path.unlink(missing_ok=True)
            if tokenizer is None:
                model_path.with_suffix(".vocab").unlink(missing_ok=True)
        raise
    return manifest


def _write_shards(docs_path: Path, directory: Path, model_path: str, num_val_docs: int,
                  shard_tokens: int, workers: int, progress: bool, options: dict) -> tuple[dict, dict]:
    """Encode every document into `directory`'s shards; return per-split counts and files,
    and the manifest's leak_guard block (raises LeakError when train holds a val document)."""
    writer = ShardWriter(directory, shard_tokens, ("val",) if options["byte_sidecar"] else ())
    totals = {split: dict(docs=0, tokens=0, text_bytes=0, scored_bytes=0) for split in ("val", "train")}
    if options["byte_sidecar"]:
        totals["val"]["sidecar_bytes"] = 0
    hashes = {"val": [], "train": []}
    batches = read_line_batches(docs_path, progress=progress)
    for stream, lengths, text_bytes, scored, original, doc_hashes in encode_batches(
            batches, model_path, workers, options):
        offset = 0
        done = totals["val"]["docs"] + totals["train"]["docs"]
        for split, lo, hi in _split_ranges(done, len(lengths), num_val_docs):
            count = int(lengths[lo:hi].sum())
            writer.add(split, stream[offset:offset + count], original[offset:offset + count])
            hashes[split].extend(doc_hashes[lo:hi])
            if split == "val" and options["byte_sidecar"]:
                totals["val"]["sidecar_bytes"] += int(original[offset:offset + count].sum(dtype=np.int64))
            offset += count
            totals[split]["docs"] += hi - lo
            totals[split]["tokens"] += count
            totals[split]["text_bytes"] += int(text_bytes[lo:hi].sum())
            totals[split]["scored_bytes"] += int(scored[lo:hi].sum())
    writer.flush()
    if totals["val"]["docs"] < num_val_docs:
        raise ValueError(f"{docs_path} has {totals['val']['docs']} documents, fewer than num_val_docs={num_val_docs}")
    for split in totals:
        totals[split]["files"] = writer.files[split]
    train_prefixes = leak.hash_prefix(hashes["train"])
    leak.check_hashes(hashes["val"], train_prefixes, docs_path)
    guard = {"normalization": "sha256 of NFC text, whitespace runs collapsed, stripped",
             "val_doc_sha256": hashes["val"], "train_docs": len(hashes["train"]),
             "train_hashes_file": leak.write_train_hashes(directory, train_prefixes), "leaked": 0}
    return totals, guard


def _split_ranges(docs_before: int, count: int, num_val_docs: int):
    """(split, lo, hi) index ranges of a batch of `count` documents that starts after
    `docs_before` documents: validation while the document index < num_val_docs."""
    boundary = min(max(num_val_docs - docs_before, 0), count)
    if boundary > 0:
        yield "val", 0, boundary
    if boundary < count:
        yield "train", boundary, count


def _manifest(name, docs, docs_path, model_path, out, sp, num_val_docs, shard_tokens, totals) -> dict:
    try:
        tokenizer_field = str(Path(model_path).resolve().relative_to(Path(out).resolve()))
    except ValueError:
        tokenizer_field = str(model_path)
    return {
        "name": name,
        "format": "challenge shards: 256 x int32 header (20240520, 1, N) + N x uint16",
        "docs": str(docs),
        "docs_file": str(docs_path),
        "input_sha256": file_sha256(docs_path),
        "tokenizer": tokenizer_field,
        "tokenizer_sha256": file_sha256(model_path),
        "vocab_size": int(sp.vocab_size()),
        "bos_id": int(sp.bos_id()),
        "append_eos": False,
        "num_val_docs": num_val_docs,
        "shard_tokens": shard_tokens,
        "splits": totals,
        "versions": {"python": platform.python_version(), "sentencepiece": spm.__version__,
                     "numpy": np.__version__},
    }


def build_or_load_dataset(docs: str | os.PathLike, out: str | os.PathLike, *, num_val_docs: int,
                          tokenizer=None, vocab_size: int | None = None, name: str | None = None,
                          **options) -> dict:
    """The manifest of `out/datasets/<name>` if that dataset exists, else `build_dataset(...)`.
    An existing dataset is returned as is (delete it or use build_dataset(overwrite=True) to
    rebuild it with other settings)."""
    sp_vocab = vocab_size or int(load_tokenizer(tokenizer).vocab_size())
    name = name or default_dataset_name(docs, sp_vocab)
    manifest = read_manifest(Path(out) / "datasets" / name)
    if manifest is not None:
        return manifest
    return build_dataset(docs, out, num_val_docs=num_val_docs, tokenizer=tokenizer, vocab_size=vocab_size,
                         name=name, **options)


def read_manifest(dataset_dir: str | os.PathLike) -> dict | None:
    """The manifest.json of a dataset folder, or None if it has none (e.g. a download)."""
    path = Path(dataset_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_dataset(config) -> dict:
    """Make sure the dataset and tokenizer of `config` exist and return the dataset manifest.

    - shards under config.datasets_dir and the tokenizer present: check the tokenizer's and
      every shard's ids against config.vocab_size (ConfigError / ShardError), check the text
      transform and (byte_accounting=sidecar) every validation sidecar, run the leak guard
      (parlm.data.leak.check_dataset; LeakError on a leak) and return its manifest (for a
      downloaded dataset without one, a manifest made from the shard headers);
    - else, for a `stdlib_docs*` dataset: build the embedded corpus with a tokenizer trained at
      config.vocab_size and written at config.resolved_tokenizer_path (reused if present);
    - else FileNotFoundError naming the command that builds or downloads it.
    """
    dataset_dir = Path(config.datasets_dir)
    tokenizer_path = Path(config.resolved_tokenizer_path)
    has_shards = bool(list(dataset_dir.glob("fineweb_train_*.bin"))) and bool(list(dataset_dir.glob("fineweb_val_*.bin")))
    if has_shards and tokenizer_path.is_file():
        config.check_vocab(load_tokenizer(tokenizer_path).vocab_size())
        check_dataset_vocabulary(dataset_dir, config.vocab_size)
        manifest = read_manifest(dataset_dir)
        if manifest is None:
            manifest = _manifest_from_shards(dataset_dir, tokenizer_path)
        _check_data_kind(config, manifest, dataset_dir)
        leak.check_dataset(dataset_dir, manifest)  # raises LeakError; the manifest is returned as read
        return manifest
    name = config.resolved_dataset_name
    if name.startswith(STDLIB_CORPUS_NAME) and not has_shards:
        reuse = tokenizer_path if tokenizer_path.is_file() else None
        return build_dataset(STDLIB_CORPUS, config.data_dir, num_val_docs=STDLIB_NUM_VAL_DOCS,
                             tokenizer=reuse, vocab_size=None if reuse else config.vocab_size,
                             name=name, tokenizer_out=tokenizer_path, progress=False,
                             text_transform=config.text_transform,
                             byte_sidecar=config.byte_accounting == "sidecar")
    missing = "its tokenizer " + str(tokenizer_path) if has_shards else "shards under " + str(dataset_dir)
    caseops_build = config.text_transform == "caseops"
    if name.startswith("fineweb10B_sp"):
        variant = f"sp{config.vocab_size}_caseops" if caseops_build else f"sp{config.vocab_size}"
        command = f"python -m parlm.data download --variant {variant} --data-dir {config.data_dir}"
    elif caseops_build:
        command = (f"python -m parlm.data build --docs DOCS.jsonl[.xz] --vocab-size {config.vocab_size} "
                   f"--text-transform caseops --num-val-docs K --out {config.data_dir} --name {name} "
                   f"--tokenizer-out {tokenizer_path}  (the wiki2015 proxy: --docs "
                   f"../shared/corpus/wiki2015/docs_selected.jsonl.xz --num-val-docs 250)")
    else:
        command = (f"python -m parlm.data build --docs DOCS.jsonl[.xz] --tokenizer {tokenizer_path} "
                   f"--num-val-docs K --out {config.data_dir} --name {name}  (e.g. the wiki2015 proxy: "
                   f"--docs ../shared/corpus/wiki2015/docs_selected.jsonl.xz --num-val-docs 250)")
    raise FileNotFoundError(f"dataset {name!r} is missing {missing}; create it with: {command}")


def _check_data_kind(config, manifest: dict, dataset_dir: Path) -> None:
    """The dataset's text transform must be the config's, and with byte_accounting=sidecar
    every validation shard needs a valid sidecar of its length (ShardError names the file)."""
    from parlm.data.shards import read_sidecar_header

    built = manifest.get("text_transform")
    if built is not None and built != config.text_transform:
        raise ValueError(f"{dataset_dir} was built with text_transform={built} but the config has "
                         f"text_transform={config.text_transform}; set text_transform={built}")
    if config.byte_accounting == "sidecar":
        for token_shard in shard_files(dataset_dir / "fineweb_val_*.bin"):
            if not sidecar_path(token_shard).is_file():
                raise FileNotFoundError(f"{sidecar_path(token_shard)}: byte sidecar of {token_shard.name} not "
                                        f"found; rebuild with --byte-sidecar or use byte_accounting=tables")
            read_sidecar_header(sidecar_path(token_shard), token_shard)


def _manifest_from_shards(dataset_dir: Path, tokenizer_path: Path) -> dict:
    from parlm.data.shards import read_header
    splits = {}
    for split in ("val", "train"):
        files = shard_files(dataset_dir / f"fineweb_{split}_*.bin")
        splits[split] = {"files": [f.name for f in files],
                         "tokens": sum(read_header(f).num_tokens for f in files)}
    return {"name": dataset_dir.name, "tokenizer": str(tokenizer_path), "splits": splits,
            "tokenizer_sha256": file_sha256(tokenizer_path)}


def data_stage(config, run_dir) -> None:
    """The pipeline's "data" stage: `ensure_dataset(config)`. The dataset lives under
    config.data_dir, shared by every run folder, so `run_dir` receives nothing."""
    ensure_dataset(config)
