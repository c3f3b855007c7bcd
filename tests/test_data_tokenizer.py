"""Tokenizer recipe (SPEC 1.3) and byte tables (SPEC 1.6), checked against the tokenizer's own
decoding: for every document, the bytes charged over its tokens (prev = preceding token, BOS
first) must equal the UTF-8 length of sp.decode(tokens).

<unk> (only in models without byte fallback, like the 1024 FineWeb model) is a boundary in
SPEC 1.6: it costs 0 bytes and the `▁` of the token after it is not charged, while decode()
renders it as " ⁇ ". So the decoding is taken per run of tokens between <unk>s; decode()
drops the leading `▁` of a run's first piece just as it does after BOS."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from parlm.data.corpus import iter_documents
from parlm.data.tokenizer import ByteTables, load_tokenizer, train_tokenizer


def assert_bytes_match_decoding(sp, documents, tables=None):
    """The independent check: bytes from the tables vs len(decode(ids).encode('utf-8'))."""
    tables = tables or ByteTables.from_tokenizer(sp)
    checked = with_unk = 0
    for text in documents:
        ids = sp.encode(text)
        tokens = np.array([sp.bos_id()] + ids, dtype=np.int64)
        counted = int(tables.count_bytes(tokens[1:], tokens[:-1]).sum())
        runs = [list(run) for is_unk, run in itertools.groupby(ids, lambda i: i == sp.unk_id()) if not is_unk]
        assert counted == sum(len(sp.decode(run).encode("utf-8")) for run in runs), text[:200]
        checked += 1
        with_unk += sp.unk_id() in ids
    assert checked > 0
    return checked, with_unk


def test_byte_tables_stdlib_fresh_tokenizer(tiny_dataset_config):
    config = tiny_dataset_config
    sp = load_tokenizer(config.resolved_tokenizer_path)
    assert sp.vocab_size() == 1024
    documents = list(iter_documents(f"{config.data_dir}/corpus/tiny_stdlib.jsonl"))
    assert assert_bytes_match_decoding(sp, documents) == (len(documents), 0)
    assert len(documents) > 40


@pytest.mark.parametrize("model", ["sp8192_path", "sp1024_path"])
def test_byte_tables_wiki_sample(request, wiki_docs_path, model):
    sp = load_tokenizer(request.getfixturevalue(model))
    documents = itertools.islice(iter_documents(wiki_docs_path), 100)
    checked, with_unk = assert_bytes_match_decoding(sp, documents)
    assert checked == 100
    assert (with_unk == 0) == (model == "sp8192_path")  # byte fallback: never <unk>


def test_byte_tables_hand_worked(tiny_dataset_config):
    sp = load_tokenizer(tiny_dataset_config.resolved_tokenizer_path)
    tables = ByteTables.from_tokenizer(sp, vocab_size=1030)  # 6 padding ids past the model
    assert tables.vocab_size == 1030
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tables.is_boundary[:4].all() and tables.is_boundary[1024:].all()
    assert tables.base_bytes[:4].tolist() == [0, 0, 0, 0]
    byte_a = sp.piece_to_id("<0x41>")
    assert sp.is_byte(byte_a) and tables.base_bytes[byte_a] == 1 and tables.token_bytes[byte_a] == b"A"
    the = sp.piece_to_id("\u2581the")
    assert sp.id_to_piece(the) == "\u2581the"
    assert tables.has_leading_space[the] and tables.base_bytes[the] == 3 and tables.token_bytes[the] == b"the"
    # "▁the" right after BOS costs 3 bytes (no space), after a normal token 4 (space + the),
    # BOS itself 0.
    target = np.array([the, the, 1, the])
    prev = np.array([1, the, the, 1])
    assert tables.count_bytes(target, prev).tolist() == [3, 4, 0, 3]
    on_torch = tables.count_bytes(torch.tensor(target), torch.tensor(prev))
    assert on_torch.dtype == torch.int64 and on_torch.tolist() == [3, 4, 0, 3]
    assert tables.to_torch("cpu").count_bytes(target, prev).tolist() == [3, 4, 0, 3]
    assert tables.stream_bytes([1, the, the, 1, the]) == 10


def test_recipe_behaviour(tmp_path):
    texts = ["the cat sat on the mat in 2024", "ｆｕｌｌ width text and more words"] * 40
    sp = train_tokenizer(texts, 300, tmp_path / "t.model")
    assert sp.vocab_size() == 300
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(300)) == 256  # byte_fallback
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["2", "0", "2", "4"]  # split_digits
    assert not sp.id_to_piece(sp.encode("the cat")[0]).startswith("\u2581")  # no dummy prefix
    assert [sp.id_to_piece(i) for i in sp.encode("\u4e2d")] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    assert sp.decode(sp.encode("ｆｕｌｌ")) == "full"  # nmt_nfkc
    assert (tmp_path / "t.vocab").is_file()


def test_training_is_deterministic(tmp_path, tiny_dataset_config):
    texts = list(iter_documents(f"{tiny_dataset_config.data_dir}/corpus/tiny_stdlib.jsonl"))[:20]
    train_tokenizer(texts, 512, tmp_path / "a.model")
    train_tokenizer(texts, 512, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    one_thread = train_tokenizer(texts, 512, tmp_path / "c.model", num_threads=1)
    pieces = lambda sp: [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]
    assert pieces(one_thread) == pieces(load_tokenizer(tmp_path / "a.model"))


def test_space_piece_required(tmp_path):
    sp = train_tokenizer(["abcdefgh" * 3, "hgfedcba"] * 50, 300, tmp_path / "nospace.model")
    with pytest.raises(ValueError, match="space"):
        ByteTables.from_tokenizer(sp)


def test_missing_tokenizer_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m parlm.data tokenizer"):
        load_tokenizer(tmp_path / "none.model")
