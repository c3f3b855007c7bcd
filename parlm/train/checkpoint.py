"""Resumable training (issue 15): a checkpoint of everything the timed loop needs to go on
as if it had never stopped.

Each rank writes `train_checkpoint/step_<k>.rank<r>.pt` (its Muon momenta and data stream
are its own): the model weights, the three optimizers' states, the EMA (average, health flag,
first bad step), the data loader's position, the Python / NumPy / torch / CUDA RNG states, the
loop state (step, training clock, looping, stop and stall bookkeeping) and the step durations
so far. Every file is written to a temporary sibling and renamed; only after every rank has
written does rank 0 point `train_checkpoint/latest.json` at step k and delete older steps, so
a kill at any moment leaves one complete checkpoint. The folder goes once training finishes.

In step-count mode (max_wallclock_seconds <= 0) a resumed run is bit-identical to an
uninterrupted one: every input of every later step is restored exactly.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from parlm import dist, runlog

CHECKPOINT_DIR = "train_checkpoint"
LATEST_NAME = "latest.json"
FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """<run_dir>/train_checkpoint, where a resumable run keeps its checkpoint."""
    return Path(run_dir) / CHECKPOINT_DIR


def rank_file(run_dir: str | os.PathLike, step: int, rank: int) -> Path:
    """The checkpoint file of one rank at one step."""
    return checkpoint_dir(run_dir) / f"step_{step:07d}.rank{rank}.pt"


def rng_states() -> dict:
    """The Python, NumPy, torch CPU and (when present) every CUDA generator's state."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    """Put back what `rng_states` returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, trainer, ema, state, timer, ctx) -> None:
    """Write this rank's checkpoint of the loop at `state.step`, then (rank 0, after every rank
    wrote) point latest.json at it and remove older steps. Call on every rank at the same step."""
    ema_state = {"flat": ema.flat, "healthy": ema.healthy, "first_bad_step": ema.first_bad_step,
                 "updates": ema.updates}
    payload = {
        "format": FORMAT_VERSION, "step": state.step, "world_size": ctx.world_size,
        "rank": ctx.rank, "model": trainer.base_model.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
        "ema": ema_state, "loader": trainer.loader.state_dict(), "looping": trainer.looping,
        "loop": state.to_dict(), "durations_ms": timer.durations_ms(), "rng": rng_states(),
    }
    checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
    with runlog.atomic_path(rank_file(run_dir, state.step, ctx.rank)) as temporary:
        torch.save(payload, temporary)  # no half-written checkpoint, no temporary left on an error
    dist.barrier()
    if ctx.is_main:
        runlog.write_json(checkpoint_dir(run_dir) / LATEST_NAME,
                          {"step": state.step, "world_size": ctx.world_size})
        keep = {rank_file(run_dir, state.step, rank).name for rank in range(ctx.world_size)}
        for path in checkpoint_dir(run_dir).glob("step_*.pt"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def find_checkpoint(run_dir: str | os.PathLike) -> dict | None:
    """latest.json of a complete checkpoint ({"step", "world_size"}), or None without one."""
    latest = checkpoint_dir(run_dir) / LATEST_NAME
    if not latest.exists():
        return None
    record = runlog.read_json(latest)
    files = [rank_file(run_dir, record["step"], rank) for rank in range(record["world_size"])]
    return record if all(path.exists() for path in files) else None


def load_checkpoint(run_dir: str | os.PathLike, step: int, rank: int) -> dict:
    """This rank's checkpoint payload of `step`, on the CPU (our own file: full unpickling)."""
    path = rank_file(run_dir, step, rank)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT_VERSION or payload["step"] != step:
        raise ValueError(f"{path} is not a parlm training checkpoint of step {step} "
                         f"(format {payload.get('format')}); delete {checkpoint_dir(run_dir)} to "
                         f"train from step 0")
    return payload


def restore_checkpoint(payload: dict, trainer, ema) -> None:
    """Load weights, optimizer states, EMA, data position, looping and RNG states of `payload`
    into a freshly built trainer and EMA (the loop state and durations are the caller's)."""
    trainer.base_model.load_state_dict(payload["model"], strict=True)
    for optimizer, saved in zip(trainer.optimizers, payload["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    with torch.no_grad():
        ema.flat.copy_(payload["ema"]["flat"])
        ema.healthy.copy_(payload["ema"]["healthy"])
        ema.first_bad_step.copy_(payload["ema"]["first_bad_step"])
    ema.updates = int(payload["ema"]["updates"])
    trainer.loader.load_state_dict(payload["loader"])
    trainer.set_looping(payload["looping"])
    set_rng_states(payload["rng"])


def remove_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete the checkpoint folder (training finished, or its outputs are being cleared)."""
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
