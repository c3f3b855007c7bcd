"""Evaluation against independent computations: SPEC Appendix B window/chunk figures, slow
obvious loops of the reference semantics (SPEC 5.1-5.3) and a hand-worked BPB example."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parlm.config import Config
from parlm.data.tokenizer import ByteTables
from parlm.dist import DistContext
from parlm.eval.scoring import (EvalResult, count_windows, eval_val, eval_val_sliding, plan_ttt_chunks,
                        scored_span, window_starts)
from parlm.model.gpt import build_model
from parlm.eval.ttt import eval_val_ttt

from conftest import TINY_MODEL

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------
# Shared tiny fixtures (also imported by test_compliance.py)

def tiny_eval_config(**overrides) -> Config:
    """TINY_MODEL (seq_len 32, stride 8, chunks of 128) on CPU without compile."""
    return Config().replace(**{**TINY_MODEL, **overrides})


def tiny_model(config: Config, seed: int = 0):
    """A tiny GPT with looping on and every weight randomised (zero-initialised out
    projections would make the blocks trivial and the causality checks weak)."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    model.looping_active = True
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * (0.3 if param.ndim == 2 else 0.1))
    return model


def synthetic_byte_tables(vocab_size: int, seed: int = 0) -> ByteTables:
    """Byte tables with a few boundary ids, random piece lengths and leading spaces."""
    rng = np.random.default_rng(seed)
    is_boundary = np.zeros(vocab_size, dtype=bool)
    is_boundary[:4] = True
    base_bytes = rng.integers(1, 6, vocab_size).astype(np.int16)
    base_bytes[is_boundary] = 0
    has_leading_space = rng.random(vocab_size) < 0.4
    has_leading_space[is_boundary] = False
    token_bytes = [b"x" * int(n) for n in base_bytes]
    return ByteTables(base_bytes, has_leading_space, is_boundary, token_bytes)


def token_stream(total: int, vocab_size: int, seed: int = 1) -> torch.Tensor:
    """total+1 random token ids (int32, as load_validation_tokens returns), with some BOS (1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, total + 1)
    tokens[rng.random(total + 1) < 0.03] = 1
    return torch.from_numpy(tokens.astype(np.int32))


def slow_bytes(tables: ByteTables, tokens, position: int) -> int:
    """Bytes charged to target tokens[p+1] after tokens[p], written out per SPEC 1.6."""
    target, prev = int(tokens[position + 1]), int(tokens[position])
    space = bool(tables.has_leading_space[target]) and not bool(tables.is_boundary[prev])
    return int(tables.base_bytes[target]) + int(space)


def slow_window_nll(config: Config, model, tokens: torch.Tensor, ws: int) -> dict[int, float]:
    """{position: nll} of one window as the reference computes it: zero-padded x/y of length
    L, full forward_logits, fp32 CE, keep positions [s, wlen)."""
    total, seq_len = tokens.numel() - 1, config.eval_seq_len
    wlen = min(ws + seq_len, total) - ws
    x = torch.zeros(1, seq_len, dtype=torch.int64)
    y = torch.zeros(1, seq_len, dtype=torch.int64)
    x[0, :wlen] = tokens[ws:ws + wlen].long()
    y[0, :wlen] = tokens[ws + 1:ws + wlen + 1].long()
    with torch.no_grad():
        logits = model.forward_logits(x)
    nll = F.cross_entropy(logits[0].float(), y[0], reduction="none")
    first = 0 if ws == 0 else seq_len - config.eval_stride
    return {ws + j: float(nll[j]) for j in range(first, wlen)}


def slow_sliding_nll(config: Config, model, tokens: torch.Tensor) -> np.ndarray:
    total = tokens.numel() - 1
    out = np.full(total, np.nan)
    context = config.eval_seq_len - config.eval_stride
    model.eval()
    for ws in range(0, total, config.eval_stride):
        if ws + context < total:
            for position, value in slow_window_nll(config, model, tokens, ws).items():
                assert np.isnan(out[position])
                out[position] = value
    return out


def slow_ttt_nll(config: Config, model, tokens: torch.Tensor) -> np.ndarray:
    """Score-first TTT written as plainly as possible (one process, SPEC 5.3)."""
    total, seq_len, stride, chunk = (tokens.numel() - 1, config.eval_seq_len, config.eval_stride,
                                     config.ttt_chunk_tokens)
    context = seq_len - stride
    num_chunks = (total + chunk - 1) // chunk
    chunk_windows = [[] for _ in range(num_chunks)]
    for ws in range(0, total, stride):
        if ws + context < total:
            first = 0 if ws == 0 else context
            chunk_windows[min((ws + first) // chunk, num_chunks - 1)].append(ws)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.ttt_lr, momentum=config.ttt_momentum)
    out = np.full(total, np.nan)
    for ci in range(num_chunks):
        model.eval()
        for ws in chunk_windows[ci]:
            for position, value in slow_window_nll(config, model, tokens, ws).items():
                out[position] = value
        if ci == num_chunks - 1:
            continue
        start, end = ci * chunk, min((ci + 1) * chunk, total)
        lr = config.ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / (num_chunks - 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_seqs = (end - start) // seq_len
        model.train()
        for _ in range(config.ttt_epochs):
            for b in range(0, n_seqs, config.ttt_batch_seqs):
                e = min(b + config.ttt_batch_seqs, n_seqs)
                x = tokens[start + b * seq_len: start + e * seq_len].long().view(-1, seq_len)
                y = tokens[start + b * seq_len + 1: start + e * seq_len + 1].long().view(-1, seq_len)
                optimizer.zero_grad()
                model(x, y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.ttt_grad_clip_norm)
                optimizer.step()
    return out


def bpb_from_positions(tables: ByteTables, tokens: torch.Tensor, nll: np.ndarray) -> float:
    total_bytes = sum(slow_bytes(tables, tokens, p) for p in range(len(nll)))
    return float(nll.sum() / (math.log(2) * total_bytes))


# ----------------------------------------------------------------------------------------
# Window planning (pure arithmetic)

def test_window_plan_matches_spec_appendix_b():
    total, seq_len, stride, chunk = 40_540_160, 2048, 64, 32_768
    assert count_windows(total, seq_len, stride) == 633_409
    bounds = plan_ttt_chunks(total, seq_len, stride, chunk)
    counts = np.diff(bounds)
    assert len(counts) == 1_238
    assert counts[0] == 481 and counts[-1] == 96
    assert set(counts[1:-1].tolist()) == {512}
    # Scored positions: window 0 scores 2048, every other window 64 -> exactly T in total.
    starts = window_starts(total, seq_len, stride)
    ends = np.minimum(starts + seq_len, total)
    firsts = np.where(starts == 0, 0, starts + seq_len - stride)
    assert int((ends - firsts).sum()) == total
    assert (firsts[1:] == ends[:-1]).all()  # consecutive spans abut: a tiling of [0, T)


@pytest.mark.parametrize("total,seq_len,stride,chunk", [
    (960, 32, 8, 128), (957, 32, 8, 128), (100, 32, 8, 16), (33, 32, 8, 64), (5000, 128, 32, 4096),
    (4099, 64, 64, 128),
])
def test_window_plan_matches_enumeration(total, seq_len, stride, chunk):
    context = seq_len - stride
    expected = [ws for ws in range(0, total, stride) if ws + context < total]
    assert window_starts(total, seq_len, stride).tolist() == expected
    num_chunks = (total + chunk - 1) // chunk
    expected_chunks = [[] for _ in range(num_chunks)]
    covered = np.zeros(total, dtype=int)
    for ws in expected:
        first, end = scored_span(ws, total, seq_len, stride)
        assert first == (0 if ws == 0 else ws + context) and end == min(ws + seq_len, total)
        covered[first:end] += 1
        expected_chunks[min(first // chunk, num_chunks - 1)].append(ws)
    assert (covered == 1).all()
    bounds = plan_ttt_chunks(total, seq_len, stride, chunk)
    starts = window_starts(total, seq_len, stride)
    assert [starts[bounds[c]:bounds[c + 1]].tolist() for c in range(num_chunks)] == expected_chunks


# ----------------------------------------------------------------------------------------
# Plain evaluation

class ConstantLossModel(torch.nn.Module):
    """forward(x, y) = a fixed mean loss, so eval_val's arithmetic can be checked by hand."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, y):
        return torch.tensor(self.value)


def test_bpb_formula_hand_example():
    # vocab: 0 = BOS (boundary), 1 = "a" (1 byte), 2 = "▁bc" (space + 2 bytes), 3 = "▁d" (space + 1)
    tables = ByteTables(np.array([0, 1, 2, 1], dtype=np.int16), np.array([False, False, True, True]),
                        np.array([True, False, False, False]), [b"", b"a", b"bc", b"d"])
    tokens = torch.tensor([0, 2, 1, 3, 0, 3, 2, 1, 1], dtype=torch.int32)  # T = 8 targets
    # targets 2,1,3,0,3,2,1,1 after prevs 0,2,1,3,0,3,2,1:
    #   2 after BOS: 2 bytes (no space); 1: 1; 3 after 1: 1+1; 0: 0; 3 after BOS: 1;
    #   2 after 3: 2+1; 1: 1; 1: 1  -> 2+1+2+0+1+3+1+1 = 11 bytes
    config = Config().replace(eval_seq_len=4, eval_stride=4, val_batch_tokens=8, micro_batches_per_step=1)
    result = eval_val(config, ConstantLossModel(1.5), tokens, tables, CPU)
    assert result.tokens == 8 and result.bytes == 11
    assert result.loss == pytest.approx(1.5)
    assert result.bpb == pytest.approx(1.5 * 8 / (math.log(2) * 11), rel=1e-12)
    assert isinstance(result, EvalResult) and result.seconds >= 0


def test_eval_val_matches_slow_loop():
    config = tiny_eval_config(val_batch_tokens=3 * 32 * 2)  # 3 sequences per batch, 1 rank
    model = tiny_model(config)
    tables = synthetic_byte_tables(config.vocab_size)
    tokens = token_stream(32 * 10, config.vocab_size)  # 10 sequences -> batches 3,3,3,1
    result = eval_val(config, model, tokens, tables, CPU)
    nll_sum, n_bytes = 0.0, 0
    for i in range(10):
        x = tokens[i * 32:(i + 1) * 32].long()[None]
        y = tokens[i * 32 + 1:(i + 1) * 32 + 1].long()
        with torch.no_grad():
            nll_sum += float(F.cross_entropy(model.forward_logits(x)[0].float(), y, reduction="sum"))
        n_bytes += sum(slow_bytes(tables, tokens, p) for p in range(i * 32, (i + 1) * 32))
    assert result.tokens == 320 and result.bytes == n_bytes
    assert result.loss == pytest.approx(nll_sum / 320, rel=1e-5)
    assert result.bpb == pytest.approx(nll_sum / (math.log(2) * n_bytes), rel=1e-5)
    assert model.training  # the caller's mode is restored


def test_eval_val_rejects_batch_smaller_than_a_sequence():
    config = tiny_eval_config()
    config.val_batch_tokens = 16  # Config refuses it (ConfigError); eval_val checks again
    with pytest.raises(ValueError, match="val_batch_tokens"):
        eval_val(config, tiny_model(config), token_stream(320, 1024), synthetic_byte_tables(1024), CPU)
    with pytest.raises(ValueError, match="val_batch_tokens=16 must hold at least one eval_seq_len=32"):
        tiny_eval_config(val_batch_tokens=16)


# ----------------------------------------------------------------------------------------
# Sliding window and TTT against slow loops of the reference semantics

@pytest.mark.parametrize("total", [256, 253])  # a multiple of the stride, and a ragged tail
def test_sliding_matches_slow_loop(total):
    config = tiny_eval_config(eval_batch_seqs=5)
    model = tiny_model(config)
    tables = synthetic_byte_tables(config.vocab_size)
    tokens = token_stream(total, config.vocab_size)
    expected = slow_sliding_nll(config, model, tokens)
    assert not np.isnan(expected).any()
    scored = np.full(total, np.nan)

    def record(positions, nll):
        scored[positions.numpy()] = nll.double().numpy()

    result = eval_val_sliding(config, model, tokens, tables, CPU, on_score=record)
    np.testing.assert_allclose(scored, expected, rtol=1e-5, atol=1e-5)
    assert result.tokens == total
    assert result.bytes == sum(slow_bytes(tables, tokens, p) for p in range(total))
    assert result.bpb == pytest.approx(bpb_from_positions(tables, tokens, expected), rel=1e-5)


@pytest.mark.parametrize("total", [448, 453])
def test_ttt_matches_slow_loop(total):
    config = tiny_eval_config(eval_batch_seqs=6, ttt_batch_seqs=3, ttt_lr=0.05)
    model = tiny_model(config)
    reference_model = copy.deepcopy(model)
    tables = synthetic_byte_tables(config.vocab_size)
    tokens = token_stream(total, config.vocab_size)
    result = eval_val_ttt(config, model, tokens, tables, CPU, diagnostic_after=True)
    expected = slow_ttt_nll(config, reference_model, tokens)
    np.testing.assert_allclose(result.nll, expected, rtol=1e-4, atol=1e-4)
    assert result.result.bpb == pytest.approx(bpb_from_positions(tables, tokens, expected), rel=1e-5)
    # TTT changes the scores relative to a frozen model (the adaptation is real) ...
    frozen = slow_sliding_nll(config, tiny_model(config), tokens)
    assert np.abs(result.nll[128:] - frozen[128:]).max() > 1e-3
    # ... but chunk 0 is scored before any update.
    np.testing.assert_allclose(result.nll[:128], frozen[:128], rtol=1e-5, atol=1e-5)
    chunks = result.chunks
    assert len(chunks) == math.ceil(total / 128)
    assert sum(c["tokens"] for c in chunks) == total
    assert chunks[-1]["lr"] == 0.0 and "diagnostic_bpb_after_update" not in chunks[-1]
    assert all("diagnostic_bpb_after_update" in c for c in chunks[:-1])
    for c in chunks:
        part = expected[c["start"]:c["end"]]
        assert c["bpb"] == pytest.approx(bpb_from_positions(tables, tokens[c["start"]:c["end"] + 1], part), rel=1e-5)


# ----------------------------------------------------------------------------------------
# The pipeline stage end to end (tiny real dataset, real artifact)

def test_evaluate_run_writes_consistent_outputs(tiny_dataset_config, tmp_path):
    from parlm.eval.stage import evaluate_run
    from parlm.quant.stage import quantize_run
    from parlm.runlog import read_json, read_metrics

    config = tiny_dataset_config.replace(val_max_tokens=448, mixture_enabled=True, ttt_diagnostic_after=True,
                                         ttt_lr=0.05)
    config.save(tmp_path / "config.yaml")
    torch.save(tiny_model(config).state_dict(), tmp_path / "final_model.pt")
    quantize_run(config, tmp_path)
    result = evaluate_run(config, tmp_path)
    saved = read_json(tmp_path / "eval.json")
    assert saved["ttt_bpb"] == pytest.approx(result["ttt_bpb"])
    for stage in ("quantized", "sliding", "ttt"):
        assert saved[f"{stage}_bpb"] > 0 and saved[f"{stage}_seconds"] >= 0
    assert set(saved["compile_seconds_by_stage"]) == {"quantized", "sliding", "ttt"}
    assert len(saved["ttt_chunks"]) == saved["ttt_num_chunks"] == 4
    assert all("sliding_bpb" in c for c in saved["ttt_chunks"])
    # nll.npz reproduces the TTT score with an independent byte count.
    dump = np.load(tmp_path / "nll.npz")
    tables = ByteTables.from_tokenizer(config.resolved_tokenizer_path, config.vocab_size)
    assert dump["nll"].dtype == np.float64 and dump["target"].dtype == np.int64 and len(dump["nll"]) == 448
    np.testing.assert_array_equal(dump["prev"][1:], dump["target"][:-1])
    stream = np.concatenate([dump["prev"][:1], dump["target"]])
    n_bytes = sum(slow_bytes(tables, stream, p) for p in range(448))
    assert saved["ttt_bpb"] == pytest.approx(dump["nll"].sum() / (math.log(2) * n_bytes), rel=1e-9)
    assert saved["mix_valid_bpb"] == pytest.approx(dump["nll_mix"].sum() / (math.log(2) * n_bytes), rel=1e-9)
    # The sliding score equals the per-chunk sliding numbers put together.
    sliding_bits = sum(c["sliding_bpb"] * c["bytes"] for c in saved["ttt_chunks"])
    assert saved["sliding_bpb"] == pytest.approx(sliding_bits / n_bytes, rel=1e-6)
    names = [r["name"] for r in read_metrics(tmp_path, "eval")]
    assert {"quantized", "sliding", "ttt", "mix_valid", "ttt_chunk"} <= set(names)
    # TTT inside the stage reuses the sliding stage's model and scorer; a fresh artifact load
    # with its own scorer gives the same score (plain and sliding left the weights untouched).
    from parlm.quant.artifact import ARTIFACT_NAME, load_quantized_model
    from parlm.data.shards import load_validation_tokens

    fresh = load_quantized_model(config, tmp_path / ARTIFACT_NAME, "cpu")
    val_tokens = load_validation_tokens(config.val_files, config.eval_seq_len, config.val_max_tokens)
    alone = eval_val_ttt(config, fresh, val_tokens, tables, CPU)
    assert alone.result.bpb == pytest.approx(saved["ttt_bpb"], rel=1e-6)


def test_cumulative_gain_hand_example():
    from parlm.eval.plots import cumulative_gain

    chunks = [{"end": 10, "bytes": 100, "bpb": 1.0, "sliding_bpb": 1.0},   # saves 0 bits
              {"end": 20, "bytes": 300, "bpb": 0.9, "sliding_bpb": 1.1}]   # saves 60 bits
    ends, gain = cumulative_gain(chunks)
    assert ends.tolist() == [10, 20]
    assert gain.tolist() == pytest.approx([0.0, 60 / 400])
