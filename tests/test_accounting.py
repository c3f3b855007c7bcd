"""One BPB accounting for every scorer (Issue 20 item 2): on a tiny CaseOps dataset, every BPB
the stages report divides by the raw UTF-8 bytes of the original validation documents, counted
here from the documents themselves (never from the sidecar or the code under test)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parlm.data import caseops
from parlm.data.corpus import build_dataset, write_documents
from parlm.data.tokenizer import ByteTables, load_tokenizer

from conftest import TINY_MODEL

LN2 = math.log(2.0)
SEQ_LEN = 16  # eval_seq_len; the validation stream is made to hold a whole number of sequences
VAL_DOCS = ["The NASA Launch was LOUD.", "iPhone and OpenAI met in Zürich; ÉCOLE ß İ.",
            "  Spaces   and\ttabs \n\n New Lines  "]
TRAIN_DOCS = [f"Train Document {i}: The Quick Brown FOX jumps over the lazy dog number {i}, "
              f"SAID the Narrator of Story {i % 5}." for i in range(60)]


pytestmark = pytest.mark.usefixtures("single_thread")


def stream_length(sp, documents) -> int:
    """Tokens of a BOS-prefixed CaseOps validation stream (test setup only)."""
    return sum(1 + len(sp.encode(caseops.encode(text))) for text in documents)


@pytest.fixture(scope="module")
def caseops_run(tmp_path_factory):
    """(config, raw validation bytes, validation documents) of a tiny CaseOps dataset whose
    validation stream is T + 1 tokens with T a multiple of SEQ_LEN, so that every scorer scores
    every validation token and the denominator must be the documents' whole raw byte count."""
    root = tmp_path_factory.mktemp("accounting")
    first = build_dataset(write_documents(VAL_DOCS + ["Filler."] + TRAIN_DOCS, root / "first.jsonl"),
                          root / "first", num_val_docs=4, vocab_size=320, workers=1, progress=False,
                          text_transform="caseops", name="first")
    tokenizer = root / "first" / first["tokenizer"]
    sp = load_tokenizer(tokenizer)
    # a last validation document whose length makes the stream T + 1 tokens, T = k · SEQ_LEN
    filler = next(text for text in (f"Filler {'ab ' * k}End." for k in range(400))
                  if (stream_length(sp, VAL_DOCS + [text]) - 1) % SEQ_LEN == 0)
    val_docs = VAL_DOCS + [filler]
    manifest = build_dataset(write_documents(val_docs + TRAIN_DOCS, root / "tiny.jsonl"), root, num_val_docs=4,
                             tokenizer=str(tokenizer), workers=1, progress=False, text_transform="caseops",
                             name="tiny_caseops")
    tokens = manifest["splits"]["val"]["tokens"]
    assert (tokens - 1) % SEQ_LEN == 0 and (tokens - 1) // SEQ_LEN >= 4
    config = tiny_config_for(root, manifest)
    raw = sum(len(text.encode("utf-8")) for text in val_docs)
    # the SentencePiece pieces spell the transformed text: the tables would give another number
    assert manifest["splits"]["val"]["scored_bytes"] != raw
    return config, raw, tokens - 1


def tiny_config_for(root, manifest):
    from parlm.config import Config

    tiny = {**TINY_MODEL, "vocab_size": 320, "eval_seq_len": SEQ_LEN, "eval_stride": 8, "train_seq_len": 16,
            "rope_train_seq_len": 16, "ttt_chunk_tokens": 32, "val_batch_tokens": 64, "iterations": 2,
            "lora_ttt_chunk_tokens": 8, "ppm_subset_tokens": 0}
    return Config().replace(**tiny, data_dir=str(root), dataset_name=manifest["name"], text_transform="caseops",
                            byte_accounting="sidecar", tokenizer_path=str(root / manifest["tokenizer"]))


def denominator(loss: float, tokens: float, bpb: float) -> float:
    """The bytes behind a reported (loss, bpb): bpb = loss · tokens / (ln 2 · bytes)."""
    return loss * tokens / (LN2 * bpb)


@pytest.fixture(scope="module")
def stages(caseops_run, tmp_path_factory):
    """Train (2 steps), quantize, evaluate (plain, sliding, chunk TTT) and run the PPM stage."""
    from parlm.eval.stage import evaluate_run
    from parlm.ppm.stage import ppm_run
    from parlm.quant.stage import quantize_run
    from parlm.runlog import read_json
    from parlm.train.loop import train_run

    config, raw, total = caseops_run
    run_dir = tmp_path_factory.mktemp("run")
    train_run(config.replace(val_loss_every=1), run_dir)
    quantize_run(config, run_dir)
    evaluate_run(config, run_dir)
    ppm_run(config, run_dir, audit_count=2, audit_neural="spread", progress=False)
    return run_dir, {name: read_json(run_dir / f"{name}.json") for name in ("train", "eval", "ppm")}


def test_training_validation_divides_by_raw_bytes(caseops_run, stages):
    from parlm.runlog import read_metrics

    _, raw, total = caseops_run
    run_dir, results = stages
    rows = read_metrics(run_dir, "val") + read_metrics(run_dir, "prequant")
    assert len(rows) >= 2
    for row in rows:
        assert denominator(row["val_loss"], total, row["val_bpb"]) == pytest.approx(raw, rel=1e-9)
    train = results["train"]
    assert denominator(train["prequant_loss"], total, train["prequant_bpb"]) == pytest.approx(raw, rel=1e-9)


def test_eval_scorers_divide_by_raw_bytes(caseops_run, stages):
    from parlm.runlog import read_metrics

    _, raw, total = caseops_run
    run_dir, results = stages
    evaluation = results["eval"]
    assert evaluation["bytes"] == raw and evaluation["tokens"] == total
    records = {r["name"]: r for r in read_metrics(run_dir, "eval") if r["name"] in ("quantized", "sliding", "ttt")}
    assert set(records) == {"quantized", "sliding", "ttt"}
    for name, record in records.items():
        assert record["bytes"] == raw and record["tokens"] == total
        assert denominator(evaluation[f"{name}_loss"], total, evaluation[f"{name}_bpb"]) == pytest.approx(raw, rel=1e-9)
    chunks = evaluation["ttt_chunks"]
    assert sum(chunk["bytes"] for chunk in chunks) == raw
    sliding_bytes = [denominator(c["sliding_loss"], c["end"] - c["start"], c["sliding_bpb"]) for c in chunks]
    assert sum(sliding_bytes) == pytest.approx(raw, rel=1e-9)
    for chunk, sliding in zip(chunks, sliding_bytes):
        assert sliding == pytest.approx(chunk["bytes"], rel=1e-9)


def test_quant_statistics_divide_by_raw_bytes(caseops_run, stages):
    from parlm.quant.stats import bpb_before_after

    config, raw, total = caseops_run
    run_dir, results = stages
    numbers = bpb_before_after(config, run_dir, reuse_prequant=False)
    train, evaluation = results["train"], results["eval"]
    assert numbers["prequant"] == pytest.approx(train["prequant_loss"] * total / (LN2 * raw), rel=1e-9)
    assert numbers["quantized"] == pytest.approx(evaluation["quantized_loss"] * total / (LN2 * raw), rel=1e-9)


def test_lora_ttt_divides_by_raw_bytes(caseops_run, stages):
    from parlm.data.accounting import byte_accounting
    from parlm.data.shards import load_validation_tokens
    from parlm.dist import DistContext
    from parlm.eval.lora_ttt import eval_val_lora_ttt
    from parlm.quant.artifact import ARTIFACT_NAME, load_quantized_model

    config, raw, total = caseops_run
    run_dir, _ = stages
    lora = config.replace(lora_ttt_enabled=True)
    model = load_quantized_model(lora, run_dir / ARTIFACT_NAME, "cpu")
    tokens = load_validation_tokens(lora.val_files, lora.eval_seq_len, lora.val_max_tokens)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = eval_val_lora_ttt(lora, model, tokens, byte_accounting(lora, tokens.numel()), ctx).result
    assert result.bytes == raw and result.tokens == total
    assert denominator(result.loss, total, result.bpb) == pytest.approx(raw, rel=1e-9)


def test_ppm_stage_divides_by_raw_bytes(caseops_run, stages):
    from parlm.ppm.bytestream import TokenByteLayout
    from parlm.ppm.reference_mixture import legacy_mixture

    config, raw, total = caseops_run
    run_dir, results = stages
    ppm = results["ppm"]
    dump = np.load(run_dir / "nll.npz")
    assert ppm["bytes"] == raw
    assert ppm["neural_bpb_same_positions"] == pytest.approx(dump["nll"].sum() / (LN2 * raw), rel=1e-12)
    # the mixture predicts the transformed text's piece bytes; its code length is charged to raw bytes
    layout = TokenByteLayout.from_byte_tables(ByteTables.from_tokenizer(config.resolved_tokenizer_path, 320))
    legacy = legacy_mixture(dump["target"], dump["prev"], dump["nll"], layout, order=config.ppm_order,
                            lambda_hi=config.ppm_lambda_hi, lambda_lo=config.ppm_lambda_lo,
                            conf_threshold=config.ppm_conf_threshold, anti_hijack_nats=config.ppm_anti_hijack_nats)
    assert ppm["stream_bytes"] == legacy.bytes != raw
    for key in ("mix_bpb", "ppm_only_bpb", "nn_only_bpb"):
        bits = getattr(legacy, key) * legacy.bytes
        assert ppm[key] == pytest.approx(bits / raw, rel=1e-9)


def test_plain_tables_accounting_is_the_tokenizer_tables(tmp_path):
    """byte_accounting with tables gives the SentencePiece tables themselves, whatever the
    positions passed (the plain data's numbers stay bit for bit what they were)."""
    from parlm.config import Config
    from parlm.data.accounting import byte_accounting, piece_tables

    manifest = build_dataset(write_documents(VAL_DOCS + TRAIN_DOCS, tmp_path / "plain.jsonl"), tmp_path,
                             num_val_docs=3, vocab_size=320, workers=1, progress=False, name="plain")
    config = tiny_config_for(tmp_path, manifest).replace(text_transform="none", byte_accounting="tables")
    accounting = byte_accounting(config)
    reference = ByteTables.from_tokenizer(config.resolved_tokenizer_path, 320)
    assert isinstance(accounting, ByteTables) and piece_tables(accounting) is accounting
    target, prev = np.arange(5, 40), np.arange(4, 39)
    assert np.array_equal(accounting.count_bytes(target, prev, 17), reference.count_bytes(target, prev))
