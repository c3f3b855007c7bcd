"""CaseOps (PR #1729): the lossless transform, the byte sidecar and the raw-byte BPB accounting."""
from __future__ import annotations

import json
import lzma
import math
import struct
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from parlm.data import caseops
from parlm.data.accounting import SidecarBytes, token_original_bytes
from parlm.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode
from parlm.data.shards import ShardError, load_validation_byte_counts, read_sidecar_header, write_shard

ADVERSARIAL = [
    "", "a", "A", "I", "The NASA Launch", "iPhone OpenAI", "HTTPServer XMLHttpRequest", "aB", "Ab", "AB",
    "ß STRASSE Straße ẞ", "İstanbul İ i̇", "ΣΊΣΥΦΟΣ Σίσυφος ς σ Σ", "ǅemal ǅ ǄEMAL ǆ", "Ǉ ǈ ǉ",
    "E\u0301COLE École e\u0301", "K Kelvin \u212a \u2126", "Ⅻ ⅻ Ⓐⓐ", "x2 X2 2X 42 ١٢٣ Ab1Cd",
    "日本語 テキスト", "ÀÉÎÕÜ àéîõü", "ΑΒΓ αβγ", "ПРИВЕТ Привет", "ﬁ ﬂ ﬃ", "ŉ ǰ ΐ", "Ⱥ ⱥ Ⱦ",
    TITLE, ALLCAPS, CAPNEXT, ESC, ESC + ESC, TITLE + "a", ESC + TITLE + "A", "A" + ESC, "\ue000\ue005",
    "mixed\tWhite\nSpace  TWO  \r\n", "\x00NUL\x00", "emoji 😀 Ǳ 🅰", "_Under_Score_ snake_Case",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_adversarial(text):
    assert decode(encode(text)) == text
    assert caseops.original_byte_weights(encode(text), "caseops").sum() == len(text.encode("utf-8"))


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
       | st.text(alphabet="aAbBßẞİıΣσςǅǄǆ\u0301 1" + "".join(caseops.OPERATORS), max_size=40))
def test_round_trip_random(text):
    assert decode(encode(text)) == text
    assert caseops.original_byte_weights(encode(text), "caseops").sum() == len(text.encode("utf-8"))


def test_operators_by_hand():
    assert encode("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert encode("iPhone OpenAI") == f"i{CAPNEXT}phone {CAPNEXT}open{CAPNEXT}a{CAPNEXT}i"
    assert encode("I") == f"{TITLE}i"
    assert encode(f"a{TITLE}b") == f"a{ESC}{TITLE}b"
    # not invertible, kept: ß (upper SS), İ (lower is two characters), ǅ (titlecase), Kelvin sign
    for kept in ("ß", "İ", "ǅ", "\u212a"):
        assert encode(kept) == kept
    assert encode("1ST") == f"1{ALLCAPS}st"  # digits end words


def test_no_case_left_in_lexical_stream():
    text = "The NASA Launch of iPhone: ΣΊΣΥΦΟΣ and École"
    stripped = "".join(c for c in encode(text) if c not in caseops.OPERATORS)
    assert not any(caseops.is_invertible_capital(c) for c in stripped)


@pytest.mark.parametrize("bad", [TITLE, f"a{ALLCAPS}", f"{ALLCAPS} x", ESC, f"{ESC}a", f"{TITLE}{CAPNEXT}a"])
def test_decode_rejects_dangling_operators(bad):
    with pytest.raises(CaseOpsError):
        decode(bad)


def test_byte_weights_by_hand():
    # "Ⱥb": Ⱥ (U+023A, 2 bytes) lowers to ⱥ (U+2C65, 3 bytes); TITLE is 0 bytes of the original
    assert caseops.original_byte_weights(encode("Ⱥb"), "caseops").tolist() == [0, 2, 1]
    assert caseops.original_byte_weights(f"{ESC}{TITLE}", "caseops").tolist() == [0, 3]
    assert caseops.original_byte_weights(f"é{TITLE}", "none").tolist() == [2, 3]


@pytest.mark.slow
def test_round_trip_every_wiki2015_document(wiki_docs_path):
    """Every proxy document (9,000) survives the transform, and its byte weights sum to its
    UTF-8 length."""
    count = 0
    with lzma.open(wiki_docs_path, "rt", encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            encoded = encode(text)
            assert decode(encoded) == text, count
            assert caseops.original_byte_weights(encoded, "caseops").sum() == len(text.encode("utf-8"))
            count += 1
    assert count == 9000


# ---- per-token original bytes -------------------------------------------------------------
def test_token_original_bytes_sum_to_document_bytes(sp1024_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp1024_path))
    for text in ADVERSARIAL + ["  leading and trailing  ", "NFKC ﬁ ① ＡＢＣ"]:
        for transform in ("none", "caseops"):
            ids, counts = token_original_bytes(sp, text, transform)
            assert len(ids) == len(counts)
            if len(ids):
                assert counts.sum() == len(text.encode("utf-8")), (text, transform)


# ---- sidecar format -------------------------------------------------------------------------
def hand_made_sidecar(path, values, magic=20260418, version=1, count=None, extra=b""):
    count = len(values) if count is None else count
    header = struct.pack("<256i", magic, version, count, *([0] * 253))
    path.write_bytes(header + struct.pack(f"<{len(values)}H", *values) + extra)
    return path


SIDECAR_FAULTS = {
    "wrong magic": (dict(magic=20240520), [0, 1, 2, 3], "bad magic 20240520"),
    "truncated": (dict(count=9), [0, 1, 2, 3], "truncated payload"),
    "length mismatch": ({}, [0, 1, 2], "length mismatch"),
    "bad version": (dict(version=7), [0, 1, 2, 3], "bad version 7"),
}


@pytest.mark.parametrize("fault", sorted(SIDECAR_FAULTS))
def test_sidecar_faults_give_one_line_error_naming_file(tmp_path, fault):
    kwargs, values, expected = SIDECAR_FAULTS[fault]
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 6, 7]))
    path = hand_made_sidecar(tmp_path / "fineweb_val_bytes_000000.bin", values, **kwargs)
    for call in (lambda: read_sidecar_header(path, tmp_path / "fineweb_val_000000.bin"),
                 lambda: load_validation_byte_counts(tmp_path / "fineweb_val_*.bin", 4)):
        with pytest.raises(ShardError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(path) + ": ") and expected in message


def test_sidecar_is_not_read_as_a_token_shard(tmp_path):
    from parlm.data.shards import shard_files

    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5]))
    hand_made_sidecar(tmp_path / "fineweb_val_bytes_000000.bin", [0, 3])
    assert [p.name for p in shard_files(tmp_path / "fineweb_val_*.bin")] == ["fineweb_val_000000.bin"]
    assert load_validation_byte_counts(tmp_path / "fineweb_val_*.bin", 2).tolist() == [0, 3]


# ---- raw-byte BPB on a tiny CaseOps build ---------------------------------------------------
TINY_DOCS = ["The NASA Launch was LOUD.", "iPhone and OpenAI met in Zürich; ÉCOLE ß İ.",
             "  Spaces   and\ttabs \n\n New Lines  "] + [
    f"Train Document {i}: The Quick Brown FOX jumps over the lazy dog number {i}." for i in range(40)]


@pytest.fixture(scope="module")
def tiny_caseops(tmp_path_factory):
    from parlm.data.corpus import build_dataset, write_documents

    root = tmp_path_factory.mktemp("caseops")
    docs = write_documents(TINY_DOCS, root / "tiny.jsonl")
    manifest = build_dataset(docs, root, num_val_docs=3, vocab_size=320, workers=1, progress=False,
                             text_transform="caseops", shard_tokens=50)
    return root, manifest


def test_caseops_build_sidecar_totals_raw_bytes(tiny_caseops):
    root, manifest = tiny_caseops
    directory = root / "datasets" / manifest["name"]
    assert manifest["name"] == "tiny_caseops_sp320" and manifest["text_transform"] == "caseops"
    raw = sum(len(t.encode("utf-8")) for t in TINY_DOCS[:3])
    assert manifest["splits"]["val"]["sidecar_bytes"] == raw
    assert len(manifest["splits"]["val"]["files"]) > 1  # the sidecar follows shard boundaries
    tokens = np.concatenate([np.fromfile(directory / f, dtype="<u2", offset=1024)
                             for f in manifest["splits"]["val"]["files"]])
    accounting = SidecarBytes.from_files(str(directory / "fineweb_val_*.bin"))
    assert len(accounting) == len(tokens)
    assert accounting.stream_bytes(tokens) == raw
    assert (accounting.count_bytes(tokens, None, 0)[tokens == 1] == 0).all()  # BOS is 0 bytes
    # each document's sidecar sums to its own raw bytes
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    per_doc = [int(accounting.count_bytes(tokens[a:b], None, int(a)).sum()) for a, b in zip(starts, starts[1:])]
    assert per_doc == [len(t.encode("utf-8")) for t in TINY_DOCS[:3]]
    # the text decoded from the tokens is the original
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / "tiny_caseops_320_bpe.model"))
    for operator in caseops.OPERATORS:
        assert len(sp.encode(operator)) == 1  # reserved pieces
    first = tokens[starts[0] + 1:starts[1]].tolist()
    assert decode(sp.decode(first)) == unicodedata.normalize("NFKC", TINY_DOCS[0])


def test_hand_computed_bpb_matches(tiny_caseops):
    """BPB = Σ nll / ln 2 / raw bytes of the validation documents, with made-up NLLs per
    scored position, through the accounting's call shape (targets at positions 1..T)."""
    root, manifest = tiny_caseops
    directory = root / "datasets" / manifest["name"]
    tokens = np.concatenate([np.fromfile(directory / f, dtype="<u2", offset=1024)
                             for f in manifest["splits"]["val"]["files"]]).astype(np.int64)
    nll = np.random.default_rng(0).uniform(0.1, 5.0, size=len(tokens) - 1)
    accounting = SidecarBytes.from_files(str(directory / "fineweb_val_*.bin"))
    charged = accounting.count_bytes(tokens[1:], tokens[:-1], 1)
    bpb = nll.sum() / (math.log(2) * charged.sum())
    by_hand = nll.sum() / math.log(2) / sum(len(t.encode("utf-8")) for t in TINY_DOCS[:3])
    assert bpb == pytest.approx(by_hand, rel=1e-12)
    # torch, in windows with clamped padding positions, gives the same bytes
    import torch

    target = torch.as_tensor(tokens[1:]).view(1, -1)
    positions = torch.arange(1, len(tokens)).view(1, -1)
    assert int(accounting.count_bytes(target, target, positions).sum()) == int(charged.sum())
    assert int(accounting.count_bytes(target, target, 1).sum()) == int(charged.sum())


def test_config_requires_sidecar_for_caseops():
    from parlm.config import Config, ConfigError

    with pytest.raises(ConfigError, match="byte_accounting=sidecar"):
        Config().replace(text_transform="caseops").validate()
    for preset in ("proxy-caseops", "fineweb-caseops"):
        config = Config.from_preset(preset).validate()
        assert config.text_transform == "caseops" and config.byte_accounting == "sidecar"


def test_build_cli_caseops(tmp_path, capsys):
    from parlm.data.__main__ import main as data_main
    from parlm.data.corpus import write_documents

    docs = write_documents(TINY_DOCS, tmp_path / "tiny.jsonl")
    assert data_main(["build", "--docs", str(docs), "--num-val-docs", "3", "--vocab-size", "320", "--out",
                      str(tmp_path), "--text-transform", "caseops", "--workers", "1", "--quiet",
                      "--tokenizer-out", str(tmp_path / "tok" / "c.model")]) == 0
    printed = capsys.readouterr().out
    raw = sum(len(t.encode("utf-8")) for t in TINY_DOCS[:3])
    assert f"sidecar_bytes={raw:,}" in printed and "leak guard: 3 validation documents" in printed
    assert (tmp_path / "tok" / "c.model").is_file()
    assert (tmp_path / "datasets" / "tiny_caseops_sp320" / "fineweb_val_bytes_000000.bin").is_file()


def test_piece_ends_match_sentencepiece(tiny_caseops):
    """The wire-format reader agrees with SentencePiece's own ids and with the piece lengths."""
    import sentencepiece as spm

    from parlm.data.accounting import piece_ends

    root, _ = tiny_caseops
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / "tiny_caseops_320_bpe.model"))
    text = encode("The NASA Launch: ünïcode ß 😀 and spaces")
    ids, ends = piece_ends(sp.encode(text, out_type="serialized_proto"))
    assert ids.tolist() == sp.encode(text)
    assert ends[-1] == len(text.encode("utf-8")) and (np.diff(ends) >= 0).all()
