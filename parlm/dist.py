"""Distributed plumbing in one place (torchrun + NCCL on GPUs, gloo on CPU).

Nothing happens at import. Every helper works in a single process without a process group,
so tests, notebooks and CPU runs call the same code as an 8-GPU node.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_environment() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun, else None.

    This is the only place parlm reads the launcher's environment variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    return None


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks cuda:<local_rank> when CUDA is available, else cpu; `cuda` requires it."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if preference == "cuda":
        raise RuntimeError("device=cuda was requested but torch sees no CUDA device; use device=cpu")
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Initialise the process group if launched by torchrun (NCCL on CUDA, gloo on CPU).

    Idempotent; in a plain process it returns rank 0 of world size 1 without a group."""
    env = torchrun_environment()
    rank, world_size, local_rank = env if env else (0, 1, 0)
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
        dist.barrier()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup(barrier: bool | None = None) -> None:
    """Destroy the process group if one exists, after a barrier when `barrier` (default: when
    no exception is propagating, i.e. on the normal path of a `finally`).

    The barrier keeps a rank that finished first from closing its gloo connections while a
    peer still works (gloo then aborts the peer: "terminate called without an active
    exception"). On an error path it is skipped: the failed rank must not wait for peers that
    may be stuck in a collective it will never join."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier is None:
        barrier = sys.exc_info()[0] is None
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (flushes, so torchrun and notebooks stream it)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    """In-place all-reduce with `op` across ranks (no-op in one process); returns the tensor."""
    if is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks (no-op in one process); returns the tensor."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place MAX across ranks (no-op in one process); returns the tensor."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place average across ranks: SUM / world_size (gloo has no AVG); returns the tensor."""
    if is_initialized():
        _all_reduce(tensor, dist.ReduceOp.SUM).div_(dist.get_world_size())
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when `flag` is True on any rank (MAX all-reduce of an int)."""
    t = torch.tensor(int(flag), device=device)
    return bool(all_reduce_max(t).item())


def broadcast_object(obj, src: int = 0):
    """Return rank `src`'s object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_main(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """Gather equal-shaped tensors to rank 0 (list on rank 0, None elsewhere)."""
    if not is_initialized():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())] if is_main() else None
    if tensor.device.type == "cuda" or dist.get_backend() != "gloo":
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        return gathered if is_main() else None
    dist.gather(tensor, gather_list=parts, dst=0)
    return parts


def autocast_context(device: torch.device | str):
    """bf16 autocast on CUDA (the reference's forward precision), nullcontext on CPU."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (no-op on CPU) so wall times measure the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timing_mark(cuda: bool):
    """Now, for a timer that must not wait on the GPU inside its loop: on CUDA a recorded event
    (`start.elapsed_time(end)` milliseconds, after one synchronize), else time.perf_counter()
    (seconds)."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def contiguous_share(n_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n items: floor(n*r/W) .. floor(n*(r+1)/W)
    (the reference's split for validation sequences, windows and TTT sequences)."""
    return n_items * rank // world_size, n_items * (rank + 1) // world_size


@dataclass(frozen=True)
class NodeTopology:
    """Where this machine sits in a torchrun job of one or more nodes (torchrun's own options).

    One node (the default) runs `--standalone`. Several nodes need the same `nnodes` on every
    node, each its own `node_rank`, and one rendezvous: either a static master
    (`master_addr`/`master_port`, node 0's address) or a c10d rendezvous endpoint
    (`rdzv_endpoint`, "host:port", with `rdzv_id` naming the job).

    `parlm.run` hands the topology to the stage launches of its notebooks (which run in a
    papermill kernel, a child process) through the environment, as torchrun itself hands ranks
    to its workers: `environment()` gives the `PARLM_*` variables, `from_environment()` reads
    them back (the one-node default where they are unset)."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "parlm"

    def __post_init__(self):
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and not (self.rdzv_endpoint or self.master_addr):
            raise ValueError(f"{self.nnodes} nodes need a rendezvous: --rdzv-endpoint HOST:PORT "
                             f"or --master-addr HOST [--master-port PORT]")

    def torchrun_arguments(self) -> list[str]:
        """The torchrun options of this topology (before `--nproc_per_node`)."""
        if self.nnodes == 1 and not (self.rdzv_endpoint or self.master_addr):
            return ["--standalone"]
        options = [f"--nnodes={self.nnodes}"]
        if self.rdzv_endpoint:
            return options + ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}",
                              f"--rdzv-id={self.rdzv_id}"]
        options += [f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}"]
        return options + ([f"--master-port={self.master_port}"] if self.master_port else [])

    def environment(self) -> dict[str, str]:
        """The `PARLM_*` variables that `from_environment` reads back into this topology."""
        values = dict(NNODES=self.nnodes, NODE_RANK=self.node_rank, MASTER_ADDR=self.master_addr,
                      MASTER_PORT=self.master_port, RDZV_ENDPOINT=self.rdzv_endpoint, RDZV_ID=self.rdzv_id)
        return {f"{TOPOLOGY_PREFIX}{key}": str(value) for key, value in values.items() if value is not None}

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "NodeTopology":
        """The topology of the `PARLM_*` variables in `environ` (default os.environ)."""
        environ = os.environ if environ is None else environ

        def value(key: str, convert=str, default=None):
            raw = environ.get(f"{TOPOLOGY_PREFIX}{key}")
            return default if raw in (None, "") else convert(raw)

        return cls(nnodes=value("NNODES", int, 1), node_rank=value("NODE_RANK", int, 0),
                   master_addr=value("MASTER_ADDR"), master_port=value("MASTER_PORT", int),
                   rdzv_endpoint=value("RDZV_ENDPOINT"), rdzv_id=value("RDZV_ID", default="parlm"))


TOPOLOGY_PREFIX = "PARLM_"


def add_topology_arguments(parser) -> None:
    """torchrun's multi-node options on an argparse parser (see NodeTopology)."""
    group = parser.add_argument_group("several nodes (torchrun)")
    group.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    group.add_argument("--master-addr", default=None, help="node 0's address (static rendezvous)")
    group.add_argument("--master-port", type=int, default=None, help="node 0's port (static rendezvous)")
    group.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of a c10d rendezvous")
    group.add_argument("--rdzv-id", default="parlm", help="job id of the c10d rendezvous")


def topology_from_arguments(args) -> NodeTopology:
    """The NodeTopology of parsed `add_topology_arguments` options."""
    return NodeTopology(nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                        master_port=args.master_port, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)


def launch_torchrun(module: str, args: list[str], nproc: int, echo: bool = True,
                    topology: NodeTopology | None = None) -> None:
    """Run `python -m torch.distributed.run <topology> --nproc_per_node=nproc -m module args`
    (`--standalone` on one node), streaming its output line by line; raise RuntimeError with the
    output tail on failure. `topology` defaults to `NodeTopology.from_environment()`.

    NVLink multicast stays off (NCCL_NVLS_ENABLE=0) unless the caller's environment sets it."""
    topology = topology or NodeTopology.from_environment()
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Spinning OpenMP workers of several CPU ranks starve each other on small machines.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    cmd = [sys.executable, "-m", "torch.distributed.run", *topology.torchrun_arguments(),
           f"--nproc_per_node={nproc}", "-m", module, *args]
    stream_subprocess(cmd, env, echo)


def stream_subprocess(cmd: list[str], env: dict[str, str], echo: bool = True) -> None:
    """Run `cmd`, echoing its merged stdout/stderr line by line as it comes; on a non-zero exit
    raise RuntimeError carrying the command and its last 40 lines."""
    import collections
    import subprocess

    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if echo:
                print(line, end="", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; last lines:\n" + "\n".join(tail))
