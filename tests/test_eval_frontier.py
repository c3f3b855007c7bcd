"""The frontier evaluation switches (issue 21) against independent computations: per-document
LoRA TTT against a slow per-position loop, the n-gram tilt's hints against a dictionary of
histories, the budget planner against hand-worked numbers, and the stage's eval clock."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parlm.config import ConfigError
from parlm.eval.budget import MeasuredCosts, Target, measured_costs, plan, project
from parlm.eval.lora_ttt import (adapted_projections, chunk_edges, eval_val_lora_ttt, find_documents,
                                 parse_short_chunks, phase_groups)
from parlm.eval.ngram_tilt import NgramTilt, ngram_hints, tilted_log_probs, tilted_nll

from test_eval import CPU, synthetic_byte_tables, tiny_eval_config, tiny_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

BOS = 1


def doc_stream(lengths: list[int], vocab_size: int = 1024, seed: int = 5) -> torch.Tensor:
    """A stream of documents of the given token counts, each starting with BOS (id 1), other
    ids drawn from 4..vocab-1, plus the next document's BOS as the final target."""
    rng = np.random.default_rng(seed)
    parts = []
    for length in lengths:
        parts += [BOS] + rng.integers(4, vocab_size, length - 1).tolist()
    return torch.tensor(parts + [BOS], dtype=torch.int32)


def lora_config(**overrides):
    base = dict(lora_ttt_enabled=True, lora_ttt_rank=2, lora_ttt_chunk_tokens=8, lora_ttt_batch_docs=8,
                lora_ttt_lr=0.02, lora_ttt_weight_decay=0.0)
    return tiny_eval_config(**{**base, **overrides})


def run_lora(config, model, tokens, **kwargs):
    return eval_val_lora_ttt(config, copy.deepcopy(model), tokens, synthetic_byte_tables(config.vocab_size),
                             CPU, **kwargs)


def slow_frozen_document_nll(config, model, tokens: torch.Tensor) -> np.ndarray:
    """Per position, the frozen model's NLL with the LoRA TTT window written out plainly: the
    document's last <= L tokens ending at the end of the position's chunk, zero-padded to the
    chunk's window width min(L, chunk stop) (bf16 CPU logits depend on the padded length)."""
    total = tokens.numel() - 1
    starts = [p for p in range(total) if p == 0 or int(tokens[p]) == BOS] + [total]
    out = np.full(total, np.nan)
    with torch.no_grad():
        for s, e in zip(starts[:-1], starts[1:]):
            edges = chunk_edges(config, e - s).tolist()
            for lo, hi in zip(edges[:-1], edges[1:]):
                chunk_end = min(hi, e - s)
                window_start = max(0, chunk_end - config.eval_seq_len)
                x = torch.zeros(1, min(config.eval_seq_len, hi), dtype=torch.long)
                x[0, :chunk_end - window_start] = tokens[s + window_start:s + chunk_end].long()
                logits = model.forward_logits(x)[0].float()
                for offset in range(lo, chunk_end):
                    target = int(tokens[s + offset + 1])
                    out[s + offset] = float(-torch.log_softmax(logits[offset - window_start], -1)[target])
    return out


# ----------------------------------------------------------------------------------------
# Per-document LoRA TTT

def test_documents_chunks_and_phases_hand_examples():
    tokens = torch.tensor([5, 1, 7, 8, 1, 1, 9, 2])
    assert find_documents(tokens, 7).tolist() == [0, 1, 4, 5, 7]
    assert parse_short_chunks("2000:24, 256:8") == [(256, 8), (2000, 24)]
    with pytest.raises(ConfigError, match="lora_ttt_short_chunks"):
        parse_short_chunks("256-8")
    config = tiny_eval_config(lora_ttt_short_chunks="10:4,20:6", lora_ttt_chunk_tokens=7)
    assert chunk_edges(config, 40).tolist() == [0, 4, 8, 10, 16, 20, 27, 34, 41]
    assert chunk_edges(config.replace(lora_ttt_short_chunks=""), 15).tolist() == [0, 7, 14, 21]
    assert phase_groups(10, 0, 4) == [(0, 10)]
    assert phase_groups(10, 1, 4) == [(0, 4), (4, 10)]
    assert phase_groups(10, 2, 5) == [(0, 2), (2, 5), (5, 10)]
    assert phase_groups(3, 1, 2500) == [(0, 3)]  # a prefix as long as the stream: no phase left


def test_no_qv_adapts_only_k_o_and_mlp():
    config = lora_config()
    model = tiny_model(config)
    every = adapted_projections(model, no_qv=False)
    some = adapted_projections(model, no_qv=True)
    assert len(every) == 5 * config.num_layers and len(some) == 3 * config.num_layers
    for block in model.blocks:
        assert block.attn.c_q not in some and block.attn.c_v not in some
        assert block.attn.c_k in some and block.attn.proj in some and block.mlp.fc in some


def test_lora_ttt_without_learning_equals_slow_document_windows():
    config = lora_config(lora_ttt_lr=0.0, lora_ttt_short_chunks="12:4")
    model = tiny_model(config)
    tokens = doc_stream([20, 45, 9, 30])
    result = run_lora(config, model, tokens)
    expected = slow_frozen_document_nll(config, model, tokens)
    np.testing.assert_allclose(result.nll, expected, rtol=1e-5, atol=1e-5)
    assert result.result.tokens == tokens.numel() - 1


def test_lora_ttt_adapts_documents_independently():
    config = lora_config()
    model = tiny_model(config)
    tokens = doc_stream([20, 45, 9, 30])
    together = run_lora(config, model, tokens)
    alone = run_lora(config.replace(lora_ttt_batch_docs=1), model, tokens)
    np.testing.assert_allclose(together.nll, alone.nll, rtol=1e-5, atol=1e-5)
    frozen = slow_frozen_document_nll(config, model, tokens)
    starts = [0, 20, 65, 74]
    for s in starts:  # each document's first chunk is scored before any update
        np.testing.assert_allclose(together.nll[s:s + 8], frozen[s:s + 8], rtol=1e-5, atol=1e-5)
    assert np.abs(together.nll - frozen).max() > 1e-3  # the adaptation is real
    # The local LR factor multiplies the adapters' learning rate.
    scaled = run_lora(config.replace(lora_ttt_lr=0.04, lora_ttt_local_lr_factor=0.5), model, tokens)
    np.testing.assert_allclose(scaled.nll, together.nll, rtol=1e-6, atol=1e-6)


def test_global_phase_changes_only_documents_after_the_prefix():
    config = lora_config(lora_ttt_phases=1, lora_ttt_prefix_docs=2, lora_ttt_global_lr=0.05, ttt_chunk_tokens=64)
    model = tiny_model(config)
    tokens = doc_stream([40, 40, 30, 20])
    phased = run_lora(config, model, tokens)
    plain = run_lora(config.replace(lora_ttt_phases=0), model, tokens)
    np.testing.assert_allclose(phased.nll[:80], plain.nll[:80], rtol=1e-6, atol=1e-6)
    assert np.abs(phased.nll[80:] - plain.nll[80:]).max() > 1e-3
    assert phased.extra["global_steps"] > 0 and phased.chunks[0]["end_position"] == 80


# ----------------------------------------------------------------------------------------
# n-gram tilt

def slow_hints(tokens: list[int], total: int, order: int, threshold: float, boost: float):
    """Per position, the top next token of the same (order-1)-token context among earlier
    positions (first to reach the top count wins ties), when its frequency >= threshold."""
    k = order - 1
    history: dict[tuple, list[int]] = {}
    hint, beta = [0] * total, [0.0] * total
    for t in range(k - 1, total):
        seen = history.setdefault(tuple(tokens[t - k + 1:t + 1]), [])
        if seen:
            counts, top, top_count = {}, None, 0
            for token in seen:
                counts[token] = counts.get(token, 0) + 1
                if counts[token] > top_count:
                    top, top_count = token, counts[token]
            if top_count / len(seen) >= threshold:
                hint[t], beta[t] = top, boost
        seen.append(tokens[t + 1])
    return hint, beta


@pytest.mark.parametrize("order,vocab", [(2, 3), (3, 4), (4, 3)])
def test_ngram_hints_match_a_dictionary_of_histories(order, vocab):
    tokens = np.random.default_rng(order).integers(0, vocab, 300).tolist()
    hint, beta = ngram_hints(torch.tensor(tokens), 299, order, 0.5, 2.0)
    expected_hint, expected_beta = slow_hints(tokens, 299, order, 0.5, 2.0)
    assert beta.tolist() == expected_beta and sum(b > 0 for b in expected_beta) > 10
    assert [h if b else 0 for h, b in zip(hint.tolist(), expected_beta)] == expected_hint


def test_tilt_hand_example():
    """Two-token vocabulary, logits (0, 0): p = (1/2, 1/2); hint 0, beta = ln 3 gives
    p' = (3/4, 1/4), so −log p'(0) = ln(4/3) and −log p'(1) = ln 4."""
    logits = torch.zeros(2, 2)
    hint = torch.tensor([0, 0])
    beta = torch.full((2,), math.log(3.0))
    nll = tilted_nll(logits, torch.tensor([0, 1]), hint, beta)
    assert nll.tolist() == pytest.approx([math.log(4 / 3), math.log(4)], abs=1e-7)
    assert tilted_log_probs(logits, hint, beta).exp()[0].tolist() == pytest.approx([0.75, 0.25])


# ----------------------------------------------------------------------------------------
# Budget planner (hand-worked: T=256, L=32, stride 8, B=4; see the comments)

COSTS = MeasuredCosts(window_seconds=0.01, sequence_seconds=0.1, fixed_seconds=2.0, shared_seconds=8.0,
                      measured_world_size=1, total_tokens=256, seq_len=32, stride=8, batch_seqs=4)


def test_projection_hand_worked():
    target = Target(world_size=2, budget_seconds=100.0, margin=0.1, speed_ratio=2.0)
    row = project(COSTS, target, chunk_tokens=64, epochs=2)
    # fixed = 2·(2 + 8·1/2) = 12
    assert row["fixed_seconds"] == pytest.approx(12.0)
    # windows per chunk 5, 8, 8, 8 -> per rank 3, 4, 4, 4 -> one batch of 4 each: 2·0.01·4·4
    assert row["score_seconds"] == pytest.approx(0.32)
    # chunks 0-2 train 2 sequences each -> 1 per rank, 2 epochs: 2·0.1·2·3
    assert row["train_seconds"] == pytest.approx(1.2)
    assert row["total_seconds"] == pytest.approx(13.52) and row["fits"]
    # a fixed 0.05 s per step: 3 trained chunks x 2 epochs x 2·0.05 more
    slow_steps = MeasuredCosts(**{**COSTS.__dict__, "step_overhead_seconds": 0.05})
    assert project(slow_steps, target, 64, 2)["train_seconds"] == pytest.approx(1.2 + 0.6)


def test_plan_picks_the_smallest_chunk_then_the_most_epochs():
    # chunk 32: windows 1, 4 x 7 -> 8 batches: score 0.64; 7 trained chunks of 1 sequence:
    # train 1.4 per epoch -> (32,1) 14.04, (32,2) 15.44; (64,1) 12.92, (64,2) 13.52.
    choice, table = plan(COSTS, Target(2, 15.0, 0.0, 2.0), [64, 32], [2, 1])
    assert [round(r["total_seconds"], 2) for r in table] == [14.04, 15.44, 12.92, 13.52]
    assert (choice["chunk_tokens"], choice["epochs"]) == (32, 1)
    choice, _ = plan(COSTS, Target(2, 14.0, 0.0, 2.0), [64, 32], [2, 1])
    assert (choice["chunk_tokens"], choice["epochs"]) == (64, 2)
    assert plan(COSTS, Target(2, 10.0, 0.0, 2.0), [64, 32], [1])[0] is None


def test_measured_costs_from_eval_json():
    config = tiny_eval_config(eval_batch_seqs=4)
    costs = measured_costs({"ttt_score_seconds": 0.8, "ttt_score_batches": 20, "ttt_train_seconds": 3.0,
                            "ttt_train_sequences": 30, "load_seconds": 1.5, "tilt_precompute_seconds": 0.5,
                            "quantized_seconds": 1.0, "sliding_seconds": 2.0, "ttt_seconds": 9.0,
                            "ttt_method": "sgd", "world_size": 1, "tokens": 256}, config)
    assert costs.window_seconds == pytest.approx(0.01) and costs.sequence_seconds == pytest.approx(0.1)
    assert costs.fixed_seconds == pytest.approx(2.0) and costs.shared_seconds == pytest.approx(3.0)


# ----------------------------------------------------------------------------------------
# The stage: eval clock and projection in eval.json (tiny real dataset, real artifact)

@pytest.fixture(scope="module")
def tiny_run(tiny_dataset_config, tmp_path_factory):
    """A run folder holding a quantized tiny model, its config (192 validation tokens)."""
    from parlm.quant.stage import quantize_run

    run_dir = tmp_path_factory.mktemp("frontier_run")
    config = tiny_dataset_config.replace(val_max_tokens=192)
    config.save(run_dir / "config.yaml")
    torch.save(tiny_model(config).state_dict(), run_dir / "final_model.pt")
    quantize_run(config, run_dir)
    return run_dir, config


def test_evaluate_run_reports_the_eval_clock_with_every_switch(tiny_run):
    from parlm.eval.stage import evaluate_run
    from parlm.runlog import read_json

    run_dir, base = tiny_run
    config = base.replace(
        lora_ttt_enabled=True, lora_ttt_rank=2, lora_ttt_chunk_tokens=16,
        lora_ttt_short_chunks="16:8", lora_ttt_no_qv=True, lora_ttt_phases=1, lora_ttt_prefix_docs=1,
        lora_ttt_local_lr_factor=0.75, tilt_enabled=True, tilt_order=2, tilt_threshold=0.2,
        ttt_chunk_tokens=64, eval_speed_ratio=1.5)
    evaluate_run(config, run_dir)
    saved = read_json(run_dir / "eval.json")
    assert saved["ttt_method"] == "lora" and saved["eval_bpb"] == saved["tilt_bpb"]
    assert saved["ttt_chunks"] == [] and saved["ttt_phases"][0]["phase"] == 0
    parts = ("load_seconds", "quantized_seconds", "sliding_seconds", "ttt_seconds", "tilt_precompute_seconds")
    assert saved["eval_clock_seconds"] == pytest.approx(sum(saved[k] for k in parts))
    # LoRA TTT, plain and sliding split over 8 GPUs; load and precompute do not; x1.5 speed ratio.
    shared = saved["quantized_seconds"] + saved["sliding_seconds"] + saved["ttt_seconds"]
    expected = 1.5 * (saved["load_seconds"] + saved["tilt_precompute_seconds"] + shared / 8)
    assert saved["eval_projection_seconds"] == pytest.approx(expected)
    assert saved["eval_projection_target"] == "8xH100" and saved["eval_projection_fits_margin"]
    assert saved["eval_projection_over_budget"] is False


def test_benchmark_runs_every_variant_on_a_demo_run_folder(tiny_run, tmp_path):
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("eval_frontier", REPO_ROOT / "benchmarks" / "eval_frontier.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    run_dir, _ = tiny_run
    out = tmp_path / "frontier.json"
    rows = benchmark.main(["--run-dir", str(run_dir), "--val-tokens", "160", "--context", "64:32",
                           "--short-chunks", "16:8", "--set", "lora_ttt_rank=2", "--set", "lora_ttt_chunk_tokens=16",
                           "--set", "tilt_order=2", "--set", "ttt_chunk_tokens=64", "--out", str(out)])
    names = [r["variant"] for r in rows]
    assert names == ["pr1858_ttt", "context", "lora_ttt", "lora_no_qv_lr0.75", "lora_short_chunks",
                     "lora_one_phase", "tilt", "frontier"]
    assert rows[0]["delta_vs_pr1858_ttt"] == 0.0 and all(r["projection_seconds"] > 0 for r in rows)
    frontier = rows[-1]["overrides"]
    assert frontier["lora_ttt_enabled"] and frontier["lora_ttt_no_qv"] and frontier["tilt_enabled"]
    assert frontier["eval_seq_len"] == 64 and frontier["eval_stride"] == 32 and frontier["lora_ttt_phases"] == 1
    assert "eval_stride" not in rows[1]["overrides"]  # the context variant keeps the #1858 stride
    assert rows[-1]["ttt_method"] == "lora" and rows[-1]["eval_bpb"] == rows[-1]["tilt_bpb"]
    scores = {r["variant"]: r["eval_bpb"] for r in rows}
    for name in ("context", "lora_ttt", "lora_no_qv_lr0.75", "lora_short_chunks", "tilt", "frontier"):
        assert abs(scores[name] - scores["pr1858_ttt"]) > 1e-6, name  # the switch really acts
    assert json.loads(out.read_text())["tokens"] == 160


def test_every_frontier_switch_is_off_by_default():
    from parlm.config import Config

    config = Config()
    assert not (config.lora_ttt_enabled or config.lora_ttt_no_qv or config.tilt_enabled)
    assert config.lora_ttt_phases == 0 and config.lora_ttt_short_chunks == ""
    assert config.lora_ttt_local_lr_factor == 1.0
    with pytest.raises(ConfigError, match="tilt_enabled and mixture_enabled"):
        config.replace(tilt_enabled=True, mixture_enabled=True).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_ttt_and_tilt_run_on_cuda_like_on_cpu():
    """The same documents on CUDA (bf16 autocast) and CPU: every position scored once and
    the scores close (bf16 rounding apart)."""
    from parlm.dist import DistContext

    config = lora_config(lora_ttt_phases=1, lora_ttt_prefix_docs=1, lora_ttt_short_chunks="12:4",
                         lora_ttt_no_qv=True, tilt_enabled=True, tilt_order=2, tilt_threshold=0.0,
                         ttt_chunk_tokens=32)
    model = tiny_model(config)
    tokens = doc_stream([20, 45, 9, 30])
    cpu = run_lora(config, model, tokens, tilt=NgramTilt(config, tokens, "cpu"))
    cuda_ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    cuda = eval_val_lora_ttt(config, copy.deepcopy(model).cuda(), tokens, synthetic_byte_tables(1024), cuda_ctx,
                             tilt=NgramTilt(config, tokens, "cuda"))
    assert cuda.result.tokens == cpu.result.tokens == tokens.numel() - 1
    np.testing.assert_allclose(cuda.nll, cpu.nll, atol=0.1)
    assert cuda.mix.bpb == pytest.approx(cpu.mix.bpb, abs=0.02)


# ----------------------------------------------------------------------------------------
# Two gloo processes (document batches dealt to ranks, the global phase's gradients averaged)

def distributed_setup():
    config = lora_config(lora_ttt_batch_docs=2, lora_ttt_phases=1, lora_ttt_prefix_docs=2,
                         lora_ttt_global_lr=0.05, ttt_chunk_tokens=128, ttt_batch_seqs=4, tilt_enabled=True,
                         tilt_order=2, tilt_threshold=0.0)
    # float32 weights: a bf16 gradient rounds differently when summed over ranks.
    return config, tiny_model(config).float(), doc_stream([40, 40, 25, 30, 12, 20])


def distributed_lora(ctx):
    config, model, tokens = distributed_setup()
    result = eval_val_lora_ttt(config, model, tokens, synthetic_byte_tables(1024), ctx,
                               tilt=NgramTilt(config, tokens, "cpu"))
    return {"bpb": result.result.bpb, "tilt": result.mix.bpb, "nll": result.nll,
            "steps": result.extra["global_steps"]}


def distributed_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from parlm.dist import cleanup, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        result = distributed_lora(ctx)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        cleanup()


@pytest.mark.slow
def test_lora_ttt_on_two_gloo_processes_matches_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    single = distributed_lora(CPU)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_path = str(tmp_path / "rank0.pt")
    mp.spawn(distributed_worker, args=(2, port, out_path), nprocs=2, join=True)
    double = torch.load(out_path, weights_only=False)
    assert single["steps"] > 0
    assert double["bpb"] == pytest.approx(single["bpb"], rel=1e-5)
    assert double["tilt"] == pytest.approx(single["tilt"], rel=1e-5)
    np.testing.assert_allclose(double["nll"], single["nll"], rtol=1e-4, atol=1e-4)
