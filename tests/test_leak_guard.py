"""The train/validation leak guard (Issue #2127): hashes at build, re-checked at load."""
from __future__ import annotations

import json

import numpy as np
import pytest

from parlm.data import leak
from parlm.data.corpus import build_dataset, write_documents
from parlm.data.leak import LeakError
from parlm.data.shards import write_shard

DOCS = [f"Document number {i}: some text about topic {i % 7} and a few words more." for i in range(30)]


def _build(tmp_path, docs, name="tiny", **options):
    path = write_documents(docs, tmp_path / f"{name}.jsonl")
    return build_dataset(path, tmp_path, num_val_docs=5, vocab_size=300, workers=1, progress=False,
                         name=name, **options)


def test_normalization_and_hash_by_hand():
    import hashlib

    assert leak.normalize("  a\u0301  b\n\tc ") == "\u00e1 b c"
    assert leak.document_hash("x  y") == hashlib.sha256(b"x y").hexdigest()


@pytest.mark.parametrize("transform", ["none", "caseops"])
def test_leaked_build_fails_and_writes_nothing(tmp_path, transform):
    leaked = DOCS + [DOCS[2]]  # one validation document copied into train
    with pytest.raises(LeakError) as info:
        _build(tmp_path, leaked, text_transform=transform)
    message = str(info.value)
    assert "1 of the 5 validation documents" in message and "fix:" in message and "\n" not in message
    assert not (tmp_path / "datasets" / "tiny").exists()
    assert not (tmp_path / "datasets" / "tiny_caseops").exists()


def test_whitespace_variant_of_a_validation_document_counts_as_leak(tmp_path):
    with pytest.raises(LeakError, match="2 of the 5"):
        _build(tmp_path, DOCS + ["  " + DOCS[0].replace(" ", "   "), DOCS[4] + "\n"])


def test_clean_build_records_hashes_and_load_checks_them(tmp_path):
    from parlm.config import Config
    from parlm.data.corpus import ensure_dataset

    manifest = _build(tmp_path, DOCS)
    directory = tmp_path / "datasets" / "tiny"
    guard = manifest["leak_guard"]
    assert guard["val_doc_sha256"] == [leak.document_hash(t) for t in DOCS[:5]]
    assert guard["train_docs"] == 25 and guard["leaked"] == 0
    stored = np.fromfile(directory / leak.TRAIN_HASHES_FILE, dtype="<u8")
    assert sorted(stored.tolist()) == sorted(int.from_bytes(bytes.fromhex(leak.document_hash(t))[:8], "little")
                                             for t in DOCS[5:])
    config = Config().replace(data_dir=str(tmp_path), dataset_name="tiny", vocab_size=300,
                              tokenizer_path=str(tmp_path / "tokenizers" / "tiny_300_bpe.model"))
    ensure_dataset(config)
    assert leak.check_config(config)["method"] == "document sha256"
    # a train hash file tampered to hold a validation document: the load fails
    np.sort(np.append(stored, leak.hash_prefix([leak.document_hash(DOCS[1])]))).tofile(
        directory / leak.TRAIN_HASHES_FILE)
    with pytest.raises(LeakError, match="1 of the 5"):
        ensure_dataset(config)


def _hand_hashes(stream, bos=1):
    """Documents of a token stream as tuples, the slow obvious way."""
    docs, current = [], None
    for token in stream:
        if token == bos:
            if current is not None:
                docs.append(tuple(current))
            current = []
        elif current is not None:
            current.append(int(token))
    if current is not None:
        docs.append(tuple(current))
    return docs


def test_token_level_check_without_manifest(tmp_path):
    rng = np.random.default_rng(0)
    val_docs = [rng.integers(4, 300, size=n).tolist() for n in (5, 9, 3)]
    train_docs = [rng.integers(4, 300, size=n).tolist() for n in (7, 4, 12, 6)]
    flat = lambda docs: [t for d in docs for t in [1] + d]
    write_shard(tmp_path / "fineweb_val_000000.bin", flat(val_docs))
    train = flat(train_docs)
    write_shard(tmp_path / "fineweb_train_000000.bin", train[:10])  # documents cross shard boundaries
    write_shard(tmp_path / "fineweb_train_000001.bin", train[10:])
    assert leak.check_dataset(tmp_path, None) == {"method": "token sequences", "val_docs": 3, "leaked": 0}
    paths = [tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"]
    assert len(set(leak.token_document_hashes(paths).tolist())) == len(set(_hand_hashes(train)))
    # leak a validation document into the middle of train, split across the shard boundary
    leaked = flat(train_docs[:1]) + [1] + val_docs[1] + flat(train_docs[1:])
    write_shard(tmp_path / "fineweb_train_000000.bin", leaked[:12])
    write_shard(tmp_path / "fineweb_train_000001.bin", leaked[12:])
    with pytest.raises(LeakError, match="1 of the 3 validation documents"):
        leak.check_dataset(tmp_path, None)
    cached = json.loads((tmp_path / leak.TOKEN_CHECK_FILE).read_text())
    assert cached["leaked"] == 1
    with pytest.raises(LeakError):  # the cached verdict, same files
        leak.check_token_leak(tmp_path)


def test_token_check_speed_on_proxy_sized_stream(tmp_path):
    """38M tokens (the proxy's train split) are checked in seconds: here 2M tokens."""
    import time

    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 8192, size=2_000_000).astype(np.uint16)
    tokens[rng.choice(len(tokens), size=500, replace=False)] = 1
    tokens[0] = 1
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    start = time.perf_counter()
    hashes = leak.token_document_hashes([tmp_path / "fineweb_train_000000.bin"])
    assert time.perf_counter() - start < 5
    assert len(hashes) == int((tokens == 1).sum())


@pytest.mark.parametrize("kind", ["document sha256", "token sequences"])
def test_training_stops_on_a_leaked_dataset(tmp_path, monkeypatch, capsys, kind):
    """A dataset whose train split holds one validation document, as a preparation script
    without the guard makes it (here: the build's own check switched off), stops the train
    stage at its input check, before any log is written, with one line naming the count and
    the fix. "token sequences": the same dataset without its manifest (a download)."""
    from conftest import TINY_MODEL
    from parlm.config import Config
    from parlm.train.loop import main, train_run

    monkeypatch.setattr(leak, "check_hashes", lambda *args: None)
    _build(tmp_path, DOCS + [DOCS[2]])
    monkeypatch.undo()
    directory = tmp_path / "datasets" / "tiny"
    if kind == "token sequences":
        (directory / "manifest.json").unlink()
        (directory / leak.TRAIN_HASHES_FILE).unlink()
    config = Config().replace(**{**TINY_MODEL, "vocab_size": 300}, data_dir=str(tmp_path), dataset_name="tiny",
                              tokenizer_path=str(tmp_path / "tokenizers" / "tiny_300_bpe.model"))
    with pytest.raises(LeakError, match="1 of the 5 validation documents") as caught:
        train_run(config, tmp_path / "run")
    assert "fix: rebuild" in str(caught.value) and not (tmp_path / "run" / "train.log").exists()
    # the verdict came from the manifest's hashes, or from hashing token sequences (cached)
    assert (directory / leak.TOKEN_CHECK_FILE).exists() == (kind == "token sequences")
    config.save(tmp_path / "leaked.yaml")
    assert main(["--run-dir", str(tmp_path / "cli"), "--config", str(tmp_path / "leaked.yaml")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error: leak guard: 1 of the 5 validation documents" in lines[0]
    assert "fix: rebuild" in lines[0]


def test_two_process_training_stops_on_a_leaked_dataset(tmp_path, monkeypatch, capsys):
    """Under torchrun rank 0 checks and every rank stops with the same line (none waits)."""
    from conftest import TINY_MODEL
    from parlm.config import Config
    from parlm.dist import launch_torchrun

    monkeypatch.setattr(leak, "check_hashes", lambda *args: None)
    _build(tmp_path, DOCS + [DOCS[2]], shard_tokens=200)  # several train shards: one per rank
    monkeypatch.undo()
    config = Config().replace(**{**TINY_MODEL, "vocab_size": 300}, data_dir=str(tmp_path), dataset_name="tiny",
                              tokenizer_path=str(tmp_path / "tokenizers" / "tiny_300_bpe.model"))
    config.save(tmp_path / "leaked.yaml")
    with pytest.raises(RuntimeError, match="exited with 1"):
        launch_torchrun("parlm.train", ["--run-dir", str(tmp_path / "run"), "--config", str(tmp_path / "leaked.yaml")],
                        nproc=2)
    output = capsys.readouterr().out
    for rank in (0, 1):
        assert f"[rank {rank}] python -m parlm.train: error: leak guard: 1 of the 5 validation documents" in output


def _planted_streams(seed):
    """Random val and train token streams (ids 0 and 2..39, BOS = 1) where train holds exact
    copies of some validation documents (longer and shorter than the prefilter key's
    PREFIX_TOKENS, one of them cut into three shards, one cut inside its first tokens) and
    near-copies that must not count: the last token changed, one token more, one token less.
    Returns (val documents, train stream, train shard cut positions) without BOS in the
    documents."""
    rng = np.random.default_rng(seed)
    key = leak.PREFIX_TOKENS
    draw = lambda n: [int(t) for t in rng.choice([0, *range(2, 40)], size=n)]
    val = [draw(n) for n in [0, 3, key - 2, key - 1, key, key + 1, 40, 90, *rng.integers(0, 60, size=20)]]
    val.append(list(val[7]))  # a repeated validation document counts each time
    copies = [val[i] for i in (0, 1, 2, 3, 5, 6, 7)]
    near = []
    for doc in (val[1], val[4], val[6], val[8]):
        if doc:
            near += [doc[:-1] + [3 if doc[-1] == 2 else 2], doc[:-1]]
        near.append(doc + draw(1))
    train = [draw(int(n)) for n in rng.integers(0, 80, size=40)] + copies + near
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    stream, begins = draw(5), {}  # tokens before the first BOS belong to no document
    for position, doc in zip(order, train):
        begins[position] = len(stream)
        stream += [1] + doc
    long_copy, short_copy = begins[40 + 6], begins[40 + 2]  # copies of val[7] (90) and val[2]
    cuts = {long_copy + 3, long_copy + 30, short_copy + 5, *rng.integers(0, len(stream), size=4)}
    return val, stream, sorted(cuts) + [max(cuts)]  # the repeated cut makes an empty shard


def _write_streams(directory, val, stream, cuts):
    flat = [t for doc in val for t in [1] + doc]
    val_paths = [directory / "fineweb_val_000000.bin", directory / "fineweb_val_000001.bin"]
    write_shard(val_paths[0], flat[:len(flat) // 2])
    write_shard(val_paths[1], flat[len(flat) // 2:])
    train_paths = []
    for index, (start, end) in enumerate(zip([0, *cuts], [*cuts, len(stream)])):
        train_paths.append(directory / f"fineweb_train_{index:06d}.bin")
        write_shard(train_paths[-1], np.array(stream[start:end], dtype=np.uint16))
    return val_paths, train_paths


@pytest.mark.parametrize("seed", range(6))
def test_token_leak_count_matches_a_set_of_token_tuples(tmp_path, seed):
    """The prefiltered check counts what the slow obvious check counts: validation documents
    (as tuples, BOS-delimited) that are in the set of train documents."""
    val, stream, cuts = _planted_streams(seed)
    val_paths, train_paths = _write_streams(tmp_path, val, stream, cuts)
    train_set = set(_hand_hashes(stream))
    expected = sum(tuple(doc) in train_set for doc in val)
    assert expected >= 8  # the planted copies (val[7] twice); chance matches may add more
    assert leak.token_leak_count(val_paths, train_paths) == (len(val), expected)
    with pytest.raises(LeakError, match=f"{expected} of the {len(val)} validation documents"):
        leak.check_dataset(tmp_path, None)


def test_token_check_hashes_only_candidates_in_full(tmp_path, monkeypatch):
    """Train documents are hashed in full only when their length and first PREFIX_TOKENS tokens
    equal a validation document's (counted here on tuples); all validation tokens are."""
    val, stream, cuts = _planted_streams(0)
    val_paths, train_paths = _write_streams(tmp_path, val, stream, cuts)
    key = leak.PREFIX_TOKENS
    prefix = lambda doc: (len(doc), tuple([1, *doc][:key]))
    val_keys = {prefix(doc) for doc in val}
    candidate_tokens = sum(len(doc) + 1 for doc in _hand_hashes(stream) if prefix(doc) in val_keys)
    hashed, original = [], leak._sequence_hashes

    def counting(tokens, starts):
        hashed.append(len(tokens))
        return original(tokens, starts)

    monkeypatch.setattr(leak, "_sequence_hashes", counting)
    assert leak.token_leak_count(val_paths, train_paths)[1] >= 8
    assert sum(hashed) == sum(len(doc) + 1 for doc in val) + candidate_tokens
    assert candidate_tokens < len(stream) // 2
