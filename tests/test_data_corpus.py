"""Corpus builder: shard contents vs an obvious re-encoding, determinism across worker counts,
no silent overwrite, readers, the embedded stdlib corpus and ensure_dataset."""
from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parlm.config import Config
from parlm.data.__main__ import main as data_main
from parlm.data.corpus import (STDLIB_NUM_VAL_DOCS, DatasetExistsError, build_dataset, ensure_dataset,
                               iter_documents, stdlib_corpus)
from parlm.data.shards import load_shard, load_validation_tokens
from parlm.data.tokenizer import ByteTables, load_tokenizer


@pytest.fixture(scope="module")
def tiny_inputs(tiny_dataset_config):
    root = Path(tiny_dataset_config.data_dir)
    return root / "corpus" / "tiny_stdlib.jsonl", Path(tiny_dataset_config.resolved_tokenizer_path)


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.bin"))}


def test_shards_equal_obvious_encoding(tmp_path, tiny_inputs):
    docs, model = tiny_inputs
    manifest = build_dataset(docs, tmp_path, num_val_docs=5, tokenizer=model, name="t",
                             shard_tokens=7777, workers=1, progress=False)
    sp = load_tokenizer(model)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    encoded = [[1] + sp.encode(text) for text in texts]
    expected_val = [t for doc in encoded[:5] for t in doc]
    expected_train = [t for doc in encoded[5:] for t in doc]
    out = tmp_path / "datasets" / "t"
    val = [load_shard(p) for p in sorted(out.glob("fineweb_val_*.bin"))]
    train = [load_shard(p) for p in sorted(out.glob("fineweb_train_*.bin"))]
    assert np.concatenate(val).tolist() == expected_val
    assert np.concatenate(train).tolist() == expected_train
    assert all(len(s) == 7777 for s in train[:-1]) and 0 < len(train[-1]) <= 7777
    assert len(train) == -(-len(expected_train) // 7777)
    splits = manifest["splits"]
    assert (splits["val"]["docs"], splits["train"]["docs"]) == (5, len(texts) - 5)
    assert (splits["val"]["tokens"], splits["train"]["tokens"]) == (len(expected_val), len(expected_train))
    assert splits["val"]["text_bytes"] == sum(len(t.encode()) for t in texts[:5])
    tables = ByteTables.from_tokenizer(sp)
    assert splits["train"]["scored_bytes"] == sum(tables.stream_bytes(doc) for doc in encoded[5:])
    assert manifest["tokenizer"] == f"tokenizers/{model.name}"
    assert (tmp_path / "tokenizers" / model.name).read_bytes() == model.read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert len(manifest["input_sha256"]) == 64 and manifest["versions"]["sentencepiece"]


def test_output_independent_of_worker_count(tmp_path, tiny_inputs):
    docs, model = tiny_inputs
    for workers in (1, 2, 3):
        build_dataset(docs, tmp_path / f"w{workers}", num_val_docs=3, tokenizer=model, name="t",
                      shard_tokens=5000, workers=workers, progress=False)
    reference = shard_bytes(tmp_path / "w1" / "datasets" / "t")
    assert len(reference) > 4
    assert shard_bytes(tmp_path / "w2" / "datasets" / "t") == reference
    assert shard_bytes(tmp_path / "w3" / "datasets" / "t") == reference


def test_refuses_to_overwrite_without_flag(tmp_path, tiny_inputs, capsys):
    docs, model = tiny_inputs
    build_dataset(docs, tmp_path, num_val_docs=3, tokenizer=model, name="t", workers=1, progress=False)
    out = tmp_path / "datasets" / "t"
    before = shard_bytes(out)
    with pytest.raises(DatasetExistsError, match="--overwrite"):
        build_dataset(docs, tmp_path, num_val_docs=4, tokenizer=model, name="t", workers=1, progress=False)
    status = data_main(["build", "--docs", str(docs), "--tokenizer", str(model), "--num-val-docs", "4",
                        "--out", str(tmp_path), "--name", "t", "--quiet"])
    assert status == 1 and "already exists" in capsys.readouterr().err
    assert shard_bytes(out) == before
    # With the flag the dataset is replaced and no staging folder is left behind.
    build_dataset(docs, tmp_path, num_val_docs=4, tokenizer=model, name="t", overwrite=True, workers=1,
                  progress=False)
    assert json.loads((out / "manifest.json").read_text())["num_val_docs"] == 4
    assert shard_bytes(out) != before
    assert sorted(p.name for p in out.parent.iterdir()) == ["t"]


def test_trained_tokenizer_not_overwritten(tmp_path, tiny_inputs):
    docs, _ = tiny_inputs
    build_dataset(docs, tmp_path, num_val_docs=3, vocab_size=512, name="a", workers=1, progress=False)
    model = tmp_path / "tokenizers" / "tiny_stdlib_512_bpe.model"
    assert load_tokenizer(model).vocab_size() == 512
    with pytest.raises(DatasetExistsError, match="tiny_stdlib_512_bpe.model"):
        build_dataset(docs, tmp_path, num_val_docs=3, vocab_size=512, name="b", workers=1, progress=False)
    assert not (tmp_path / "datasets" / "b").exists()


def test_failed_build_leaves_nothing(tmp_path, tiny_inputs, monkeypatch):
    docs, model = tiny_inputs
    with pytest.raises(ValueError, match="fewer than num_val_docs"):
        build_dataset(docs, tmp_path, num_val_docs=10_000, tokenizer=model, name="t", workers=1, progress=False)
    assert list((tmp_path / "datasets").iterdir()) == []
    with pytest.raises(ValueError, match="no training text after the first num_val_docs=10000"):
        build_dataset(docs, tmp_path, num_val_docs=10_000, vocab_size=512, name="t", workers=1, progress=False)
    assert list((tmp_path / "datasets").iterdir()) == [] and list((tmp_path / "tokenizers").iterdir()) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("parlm.data.corpus._write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):  # stopped after training, while encoding
        build_dataset(docs, tmp_path, num_val_docs=3, vocab_size=512, name="t", workers=1, progress=False)
    assert list((tmp_path / "datasets").iterdir()) == [] and list((tmp_path / "tokenizers").iterdir()) == []


def test_readers_plain_and_xz_agree(tmp_path):
    records = [{"text": "first doc"}, {"text": "zweites Dokument \u00fc\n\nwith lines"}, {"text": ""}]
    body = "".join(json.dumps(r) + "\n" for r in records) + "\n"  # a blank line is skipped
    (tmp_path / "d.jsonl").write_text(body)
    with lzma.open(tmp_path / "d.jsonl.xz", "wt") as handle:
        handle.write(body)
    expected = [r["text"] for r in records]
    assert list(iter_documents(tmp_path / "d.jsonl")) == expected
    assert list(iter_documents(tmp_path / "d.jsonl.xz")) == expected
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        list(iter_documents(tmp_path / "bad.jsonl"))


def test_stdlib_corpus_is_deterministic_english_without_side_effects(tiny_dataset_config, tmp_path):
    first = Path(tiny_dataset_config.data_dir) / "corpus" / "stdlib_docs.jsonl"
    loaded_before = set(sys.modules)
    second = stdlib_corpus(tmp_path / "again.jsonl")
    assert first.read_bytes() == second.read_bytes()
    assert not {"tkinter", "antigravity", "this", "idlelib", "turtle"} & (set(sys.modules) - loaded_before)
    texts = list(iter_documents(second))
    total = sum(len(t.encode()) for t in texts)
    assert len(texts) > 300 and total > 1_500_000
    words = " ".join(texts).split()
    assert words.count("the") > 0.02 * len(words)  # real English prose


def test_ensure_dataset_builds_stdlib_demo_once(tmp_path, monkeypatch):
    config = Config.from_preset("demo").replace(data_dir=str(tmp_path / "data"),
                                                tokenizer_path=str(tmp_path / "data" / "tokenizers" / "sd.model"))
    manifest = ensure_dataset(config)
    assert manifest["name"] == "stdlib_docs_sp1024" and manifest["num_val_docs"] == STDLIB_NUM_VAL_DOCS
    assert load_tokenizer(config.resolved_tokenizer_path).vocab_size() == 1024
    val = load_validation_tokens(config.val_files, config.eval_seq_len, config.val_max_tokens)
    assert len(val) - 1 == config.val_max_tokens // config.eval_seq_len * config.eval_seq_len
    monkeypatch.setattr("parlm.data.corpus.build_dataset", lambda *a, **k: pytest.fail("rebuilt"))
    assert ensure_dataset(config) == manifest


def test_ensure_dataset_missing_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m parlm.data download --variant sp8192"):
        ensure_dataset(Config.from_preset("fineweb").replace(data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="python -m parlm.data build"):
        ensure_dataset(Config.from_preset("proxy").replace(data_dir=str(tmp_path)))


def test_cli_help_for_every_command():
    for command in ([], ["build"], ["inspect"], ["download"], ["tokenizer"]):
        result = subprocess.run([sys.executable, "-m", "parlm.data", *command, "--help"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout


def test_caseops_overview_for_notebook(tmp_path):
    """The notebook-01 CaseOps summary on two tiny builds (plain with a sidecar, CaseOps)."""
    from parlm.config import Config
    from parlm.data.corpus import build_dataset, write_documents
    from parlm.data.plots import caseops_overview, format_caseops_overview, plot_bytes_per_token

    texts = ["The NASA Launch", "iPhone OpenAI Tested"] + [f"Doc {i} About The Thing {i}." for i in range(20)]
    docs = write_documents(texts, tmp_path / "tiny.jsonl")
    configs = {}
    for transform in ("none", "caseops"):
        manifest = build_dataset(docs, tmp_path, num_val_docs=2, vocab_size=300, workers=1, progress=False,
                                 text_transform=transform, byte_sidecar=True)
        configs[transform] = Config().replace(
            data_dir=str(tmp_path), dataset_name=manifest["name"], vocab_size=300, byte_accounting="sidecar",
            text_transform=transform, tokenizer_path=str(tmp_path / manifest["tokenizer"]))
    overview = caseops_overview(configs["none"], configs["caseops"])
    raw = len("The NASA Launch".encode()) + len("iPhone OpenAI Tested".encode())
    assert overview["bytes_per_token"]["plain"]["raw_bytes"] == raw == overview["bytes_per_token"]["caseops"]["raw_bytes"]
    assert all(row["round_trip"] for row in overview["examples"])
    assert overview["examples"][0]["caseops"] == "⟨T⟩the ⟨A⟩nasa ⟨T⟩launch"
    assert overview["leak_guard"]["caseops"]["ok"] and overview["leak_guard"]["plain"]["leaked"] == 0
    assert "leak guard, caseops: no validation document" in format_caseops_overview(overview)
    plot_bytes_per_token(overview)


def test_caseops_pair_builds_the_twin_once(tmp_path):
    """Notebook 01's twin: the same documents and split in the other kind, built on first use."""
    from parlm.config import Config
    from parlm.data.corpus import build_dataset, write_documents
    from parlm.data.plots import caseops_pair

    texts = ["The NASA Launch", "iPhone OpenAI Tested"] + [f"Doc {i} About The Thing {i}." for i in range(20)]
    manifest = build_dataset(write_documents(texts, tmp_path / "tiny.jsonl"), tmp_path, num_val_docs=2,
                             vocab_size=300, workers=1, progress=False)
    plain = Config().replace(data_dir=str(tmp_path), dataset_name=manifest["name"], vocab_size=300,
                             tokenizer_path=str(tmp_path / manifest["tokenizer"]))
    first, twin = caseops_pair(plain, manifest)
    assert first is plain and (twin.text_transform, twin.byte_accounting) == ("caseops", "sidecar")
    built = json.loads((Path(twin.datasets_dir) / "manifest.json").read_text())
    assert built["name"] == "tiny_caseops_sp300" and built["num_val_docs"] == 2
    assert built["splits"]["val"]["sidecar_bytes"] == sum(len(t.encode()) for t in texts[:2])
    assert Path(twin.resolved_tokenizer_path).is_file()
    stamp = (Path(twin.datasets_dir) / "manifest.json").stat().st_mtime_ns
    again_plain, again = caseops_pair(plain, manifest)
    assert (Path(again.datasets_dir) / "manifest.json").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    back_plain, back_caseops = caseops_pair(twin, built)  # from the CaseOps side: the plain twin
    assert back_caseops is twin and back_plain.text_transform == "none" and back_plain.byte_accounting == "tables"
    assert back_plain.dataset_name == "tiny_sp300"
    assert caseops_pair(plain, {"name": "download", "splits": {}}) is None
