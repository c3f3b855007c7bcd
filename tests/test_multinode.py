"""Two "nodes" on loopback: two torchrun launches (one gloo CPU process each, a static
rendezvous on 127.0.0.1) train exactly like one process, and the topology options parse.

Same construction as tests/test_train_distributed.py: a constant token stream makes every
micro-batch identical, so a world of two (one micro-step each, DDP averaging, Muon sharded
over the two ranks) must follow one process with two micro-steps."""
from __future__ import annotations

import argparse
import socket
import threading

import numpy as np
import pytest

from parlm.dist import NodeTopology, add_topology_arguments, launch_torchrun, topology_from_arguments

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


@pytest.mark.slow
def test_two_loopback_nodes_match_one_process(tiny_dataset_config, tmp_path):
    stream = np.full(20_000, 77, dtype=np.uint16)
    val = np.random.default_rng(1).integers(4, 1024, size=2049)
    config = synthetic_config(tiny_dataset_config, tmp_path / "data", stream, val, "constant",
                              iterations=3, warmup_steps=1, val_loss_every=0, ema_decay=0.5)
    config_path = tmp_path / "config.yaml"
    config.save(config_path)
    port = free_port()
    errors: list[BaseException] = []

    def node(rank: int) -> None:
        topology = NodeTopology(nnodes=2, node_rank=rank, master_addr="127.0.0.1", master_port=port)
        try:
            # Both nodes write one run folder: only rank 0 writes the results.
            launch_torchrun("parlm.train", ["--run-dir", str(tmp_path / "two"), "--config", str(config_path)],
                            nproc=1, echo=False, topology=topology)
        except BaseException as error:  # noqa: BLE001 (re-raised below in the test's thread)
            errors.append(error)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert_matches_one_process(config, tmp_path / "two", tmp_path)
