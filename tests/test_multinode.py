"""Two "nodes" on loopback: two `python -m parlm.train --nnodes 2 --node-rank R` commands (each
starts its own torchrun with one gloo CPU process, a static rendezvous on 127.0.0.1) train
exactly like one process; the topology options parse, travel through the environment from
`parlm.run` to its notebooks' stage launches, and a node of rank > 0 of `parlm.run` only joins
the distributed stages.

Same construction as tests/test_train_distributed.py: a constant token stream makes every
micro-batch identical, so a world of two (one micro-step each, DDP averaging, Muon sharded
over the two ranks) must follow one process with two micro-steps."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading

from pathlib import Path

import numpy as np
import pytest

from parlm import dist, pipeline, run
from parlm.dist import NodeTopology, add_topology_arguments, topology_from_arguments
from parlm.train.loop import main as train_main

from test_train import synthetic_config
from test_train_distributed import assert_matches_one_process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_topology_arguments():
    assert NodeTopology().torchrun_arguments() == ["--standalone"]
    static = NodeTopology(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    assert static.torchrun_arguments() == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
                                           "--master-port=29500"]
    rendezvous = NodeTopology(nnodes=4, rdzv_endpoint="head:29400", rdzv_id="job7")
    assert rendezvous.torchrun_arguments() == ["--nnodes=4", "--rdzv-backend=c10d",
                                               "--rdzv-endpoint=head:29400", "--rdzv-id=job7"]
    with pytest.raises(ValueError, match="need a rendezvous"):
        NodeTopology(nnodes=2)
    with pytest.raises(ValueError, match="node_rank 2"):
        NodeTopology(nnodes=2, node_rank=2, master_addr="x")
    parser = argparse.ArgumentParser()
    add_topology_arguments(parser)
    parsed = parser.parse_args(["--nnodes", "2", "--node-rank", "1", "--master-addr", "h", "--master-port", "5"])
    assert topology_from_arguments(parsed) == NodeTopology(nnodes=2, node_rank=1, master_addr="h", master_port=5)


def test_topology_travels_through_the_environment(monkeypatch):
    static = NodeTopology(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    assert NodeTopology.from_environment(static.environment()) == static
    rendezvous = NodeTopology(nnodes=3, node_rank=2, rdzv_endpoint="head:29400", rdzv_id="job7")
    assert NodeTopology.from_environment(rendezvous.environment()) == rendezvous
    assert NodeTopology.from_environment({}) == NodeTopology()
    # A stage launched from a notebook of node 0 picks the exported topology up.
    calls = []
    monkeypatch.setattr(dist, "stream_subprocess", lambda cmd, env, echo=True: calls.append(cmd))
    monkeypatch.setattr(os, "environ", dict(os.environ, **static.environment()))
    pipeline.launch("train", "runs/x/seed_1", nproc=1)
    assert calls and calls[0][3:9] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
                                       "--master-port=29500", "--nproc_per_node=1", "-m"]
    assert pipeline.world_size(4) == 8


def test_stage_command_starts_itself_under_torchrun(monkeypatch, tmp_path):
    calls = []

    def fake_launch(module, args, nproc, echo=True, topology=None):
        calls.append((module, args, nproc, topology))

    monkeypatch.setattr(dist, "launch_torchrun", fake_launch)
    monkeypatch.delenv("RANK", raising=False)
    code = train_main(["--run-dir", str(tmp_path), "--preset", "demo", "--set", "iterations=3", "--nproc", "2",
                       "--nnodes", "2", "--node-rank", "1", "--master-addr", "h", "--master-port", "7"])
    assert code == 0
    assert calls == [("parlm.train", ["--run-dir", str(tmp_path), "--preset", "demo", "--set", "iterations=3"], 2,
                      NodeTopology(nnodes=2, node_rank=1, master_addr="h", master_port=7))]
    assert not (tmp_path / "config.yaml").exists()  # the workers write it, not the launcher
    # Inside a torchrun worker the flags do not start another torchrun.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from parlm import cli
    args = cli.stage_parser("p", "d", "r", distributed=True).parse_args(["--run-dir", "x", "--nproc", "2"])
    assert cli.torchrun_request(args) is None


def test_run_on_a_node_of_rank_one_joins_the_distributed_stages(monkeypatch, tmp_path):
    launched = []
    monkeypatch.setattr(pipeline, "launch", lambda stage, run_dir, nproc=1, echo=True, topology=None:
                        launched.append((stage, Path(run_dir).name, nproc, topology)))
    monkeypatch.setattr(run, "execute_notebook", lambda *a, **k: pytest.fail("node 1 runs no notebook"))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # run() exports the topology
    topology = NodeTopology(nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=5)
    plan = run.RunPlan(preset="demo", seeds=[1, 2], run_id="r", runs_dir=tmp_path, nproc=1, topology=topology,
                       report_notebook=None)
    assert run.run(plan) == 0
    assert launched == [(stage, f"seed_{seed}", 1, topology) for seed in (1, 2) for stage in ("train", "eval")]
    assert (tmp_path / "r" / "seed_1" / "config.yaml").exists()
    assert os.environ["PARLM_NNODES"] == "2"
    with pytest.raises(ValueError, match="node 0 runs the stages itself"):
        pipeline.join_distributed_stages(tmp_path, 1, NodeTopology())


def test_run_parses_the_topology_options():
    args = run.build_parser().parse_args(["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:1"])
    assert topology_from_arguments(args) == NodeTopology(nnodes=2, node_rank=1, rdzv_endpoint="head:1")
    assert run.main(["--nnodes", "2", "--node-rank", "1"]) == 2  # no rendezvous: one line, exit 2


@pytest.mark.slow
def test_two_loopback_nodes_match_one_process(tiny_dataset_config, tmp_path):
    stream = np.full(20_000, 77, dtype=np.uint16)
    val = np.random.default_rng(1).integers(4, 1024, size=2049)
    config = synthetic_config(tiny_dataset_config, tmp_path / "data", stream, val, "constant",
                              iterations=3, warmup_steps=1, val_loss_every=0, ema_decay=0.5)
    config_path = tmp_path / "config.yaml"
    config.save(config_path)
    port = free_port()
    results: dict[int, subprocess.CompletedProcess] = {}

    def node(rank: int) -> None:
        # Both nodes write one run folder: only rank 0 writes the results.
        command = [sys.executable, "-m", "parlm.train", "--run-dir", str(tmp_path / "two"), "--config",
                   str(config_path), "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
                   "--master-addr", "127.0.0.1", "--master-port", str(port)]
        results[rank] = subprocess.run(command, capture_output=True, text=True, timeout=600)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    for rank, result in sorted(results.items()):
        assert result.returncode == 0, (rank, result.stdout[-6000:], result.stderr[-2000:])
    assert sorted(results) == [0, 1]
    assert_matches_one_process(config, tmp_path / "two", tmp_path)
