"""Two gloo processes give the same sliding, TTT and mixture scores as one process (windows,
chunks and TTT sequences split contiguously across ranks, gradients averaged, per-position
NLLs reduced to rank 0). Each rank trains on its 2 sequences of a chunk in one minibatch, so
the averaged gradient equals the one-process gradient of all 4 (SPEC 5.3)."""
from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from parlm.dist import DistContext
from parlm.eval.scoring import eval_val, eval_val_sliding
from parlm.eval.token_mixture import TokenNgramMixture
from parlm.eval.ttt import eval_val_ttt

from test_eval import (synthetic_byte_tables, tiny_eval_config, tiny_model,  # noqa: F401
                       token_stream)

pytestmark = pytest.mark.usefixtures("single_thread")

TOTAL = 448


def setup():
    config = tiny_eval_config(eval_batch_seqs=5, ttt_batch_seqs=4, ttt_lr=0.05, mixture_enabled=True,
                              mixture_order=2, val_batch_tokens=256)
    # float32 weights: a bf16 embedding gradient rounds differently when summed over ranks.
    return config, tiny_model(config).float(), token_stream(TOTAL, config.vocab_size), synthetic_byte_tables(1024)


def evaluate(ctx):
    config, model, tokens, tables = setup()
    plain = eval_val(config, model, tokens, tables, ctx)
    sliding = eval_val_sliding(config, model, tokens, tables, ctx)
    mixture = TokenNgramMixture(config, tokens, config.vocab_size, "cpu")
    ttt = eval_val_ttt(config, copy.deepcopy(model), tokens, tables, ctx, mixture=mixture)
    return {"plain": plain.bpb, "sliding": sliding.bpb, "ttt": ttt.result.bpb, "mix": ttt.mix.bpb,
            "chunks": [c["bpb"] for c in ttt.chunks], "nll": ttt.nll, "nll_mix": ttt.nll_mix}


def worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from parlm.dist import cleanup, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        result = evaluate(ctx)
        if rank == 0:
            torch.save(result, out_path)
        else:
            assert result["nll"] is None  # per-position NLLs only land on rank 0
    finally:
        cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    single = evaluate(DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    out_path = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    double = torch.load(out_path, weights_only=False)
    for key in ("plain", "sliding", "ttt", "mix"):
        assert double[key] == pytest.approx(single[key], rel=1e-5), key
    np.testing.assert_allclose(double["chunks"], single["chunks"], rtol=1e-5)
    np.testing.assert_allclose(double["nll"], single["nll"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(double["nll_mix"], single["nll_mix"], rtol=1e-4, atol=1e-4)


def test_cleanup_waits_for_peers_only_on_the_normal_path(monkeypatch):
    """A rank that finished waits at a barrier before tearing its connections down; a rank
    leaving on an exception does not (its peers may be stuck where it will never arrive)."""
    import parlm.dist as parlm_dist

    calls = []
    monkeypatch.setattr(parlm_dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parlm_dist.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(parlm_dist.dist, "destroy_process_group", lambda: calls.append("destroy"))
    parlm_dist.cleanup()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("rank failed")
        finally:
            parlm_dist.cleanup()
    assert calls == ["destroy"]
    calls.clear()
    parlm_dist.cleanup(barrier=False)
    assert calls == ["destroy"]
