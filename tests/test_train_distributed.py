"""Two gloo CPU processes under torchrun train exactly like one process.

On a constant token stream every training window is identical, so however the sampler splits
the global batch between ranks and micro-steps, every micro-batch is the same. The 2-process
run (1 micro-step per rank, DDP gradient averaging, Muon sharded across ranks) must then
follow the 1-process run (2 micro-steps) step for step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parlm import runlog
from parlm.dist import launch_torchrun
from parlm.train.loop import train_run

from test_train import synthetic_config


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_dataset_config, tmp_path):
    stream = np.full(20_000, 77, dtype=np.uint16)
    val = np.random.default_rng(1).integers(4, 1024, size=2049)
    config = synthetic_config(tiny_dataset_config, tmp_path / "data", stream, val, "constant",
                              iterations=3, warmup_steps=1, val_loss_every=0, ema_decay=0.5)
    config_path = tmp_path / "config.yaml"
    config.save(config_path)
    launch_torchrun("parlm.train", ["--run-dir", str(tmp_path / "two"), "--config", str(config_path)],
                    nproc=2, echo=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_run(config, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    two = runlog.read_json(tmp_path / "two" / "train.json")
    assert two["world_size"] == 2 and two["grad_accum_steps"] == 1 and single["grad_accum_steps"] == 2
    losses_two = [r["train_loss"] for r in runlog.read_metrics(tmp_path / "two", "train")]
    losses_one = [r["train_loss"] for r in runlog.read_metrics(tmp_path / "one", "train")]
    assert len(losses_one) == 3
    assert losses_two[0] == pytest.approx(losses_one[0], rel=1e-6, abs=1e-6)  # step 1: same init, same data
    assert losses_two == pytest.approx(losses_one, rel=1e-4, abs=1e-5)
    assert two["prequant_bpb"] == pytest.approx(single["prequant_bpb"], rel=1e-4)
    a = torch.load(tmp_path / "one" / "final_model.pt")
    b = torch.load(tmp_path / "two" / "final_model.pt")
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-4), name
