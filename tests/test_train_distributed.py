"""Two gloo CPU processes under torchrun train exactly like one process, and resume exactly.

On a constant token stream every training window is identical, so however the sampler splits
the global batch between ranks and micro-steps, every micro-batch is the same. The 2-process
run (1 micro-step per rank, DDP gradient averaging, Muon sharded across ranks) must then
follow the 1-process run (2 micro-steps) step for step. A 2-process run killed after its
checkpoint and resumed (each rank reloads its own Muon momenta and data position) must end
bit-identical to the uninterrupted 2-process run."""
from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch

from parlm import runlog
from parlm.dist import launch_torchrun
from parlm.train.loop import train_run

from test_train import synthetic_config


@pytest.fixture(scope="module")
def two_process_run(tiny_dataset_config, tmp_path_factory):
    """(config, config.yaml path, run folder) of an uninterrupted 2-process run; it writes a
    checkpoint at step 2 (removed at the end)."""
    root = tmp_path_factory.mktemp("distributed")
    stream = np.full(20_000, 77, dtype=np.uint16)
    val = np.random.default_rng(1).integers(4, 1024, size=2049)
    config = synthetic_config(tiny_dataset_config, root / "data", stream, val, "constant",
                              iterations=3, warmup_steps=1, val_loss_every=0, ema_decay=0.5,
                              checkpoint_every_steps=2)
    config_path = root / "config.yaml"
    config.save(config_path)
    launch_torchrun("parlm.train", ["--run-dir", str(root / "two"), "--config", str(config_path)],
                    nproc=2, echo=False)
    return config, config_path, root / "two"


def assert_matches_one_process(config, two_dir, tmp_path) -> None:
    """The world-of-two run in `two_dir` follows a one-process run of `config` (2 micro-steps)
    step for step: losses, pre-quant BPB and final weights, up to the all-reduce's summation
    order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_run(config, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    two = runlog.read_json(two_dir / "train.json")
    assert two["world_size"] == 2 and two["grad_accum_steps"] == 1 and single["grad_accum_steps"] == 2
    losses_two = [r["train_loss"] for r in runlog.read_metrics(two_dir, "train")]
    losses_one = [r["train_loss"] for r in runlog.read_metrics(tmp_path / "one", "train")]
    assert len(losses_one) == config.iterations
    assert losses_two[0] == pytest.approx(losses_one[0], rel=1e-6, abs=1e-6)  # step 1: same init, same data
    assert losses_two == pytest.approx(losses_one, rel=1e-4, abs=1e-5)
    assert two["prequant_bpb"] == pytest.approx(single["prequant_bpb"], rel=1e-4)
    a = torch.load(tmp_path / "one" / "final_model.pt")
    b = torch.load(two_dir / "final_model.pt")
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-4), name


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(two_process_run, tmp_path):
    config, _, two_dir = two_process_run
    assert_matches_one_process(config, two_dir, tmp_path)


KILLED_TRAINING = textwrap.dedent('''
    """parlm.train whose every rank dies inside step 3 (after the checkpoint of step 2)."""
    import sys

    from parlm.config import Config
    from parlm.train import loop

    real_step = loop.Trainer.step

    def dies_in_step_3(self, step, lr_scale):
        if step == 2:
            raise SystemExit(3)
        return real_step(self, step, lr_scale)

    loop.Trainer.step = dies_in_step_3
    loop.train_run(Config.load(sys.argv[2]), sys.argv[1])
''')


@pytest.mark.slow
def test_killed_two_process_run_resumes_exactly(two_process_run, tmp_path, monkeypatch):
    _, config_path, two_dir = two_process_run
    (tmp_path / "killed_training.py").write_text(KILLED_TRAINING)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "resumed"
    with pytest.raises(RuntimeError):
        launch_torchrun("killed_training", [str(run_dir), str(config_path)], nproc=2, echo=False)
    assert sorted(p.name for p in (run_dir / "train_checkpoint").iterdir()) == [
        "latest.json", "step_0000002.rank0.pt", "step_0000002.rank1.pt"]
    launch_torchrun("parlm.train", ["--run-dir", str(run_dir), "--config", str(config_path)],
                    nproc=2, echo=False)
    assert "resumed from step 2" in (run_dir / "train.log").read_text()
    assert runlog.read_json(run_dir / "train.json")["resumed_from_step"] == 2
    a, b = torch.load(two_dir / "final_model.pt"), torch.load(run_dir / "final_model.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [[r["train_loss"] for r in runlog.read_metrics(d, "train")] for d in (two_dir, run_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
