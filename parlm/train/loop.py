"""Training (SPEC 3): one process per GPU under torchrun, or one CPU process for tiny configs.

    python -m parlm.train --run-dir DIR [--config CFG | --preset NAME] [--set key=value ...]
    torchrun --standalone --nproc_per_node=N -m parlm.train --run-dir DIR   (N divides 8)

The global batch is fixed (`train_batch_tokens`); each rank runs
grad_accum = micro_batches_per_step / world_size micro-steps per optimizer step and DDP syncs
gradients only on the last one. The LR follows the *wall clock*, not the step count
(`parlm.train.optim.lr_multiplier` of frac = elapsed / budget), because the challenge limits time:
a faster step buys more steps, not a different schedule. Budget = max_wallclock_seconds minus
the GPTQ reserve (the quantizer's Hessian pass is charged to training time); validation and
the compile warmup are not counted. Depth recurrence switches on at frac >= enable_looping_at.

Outputs in the run folder: `train.log`, `metrics.jsonl` (stage "train": step, train_loss,
lr_scale, tok_per_sec (cumulative), tok_per_sec_interval, looping, memory_mib; stage "val":
step, val_loss, val_bpb), `final_model.pt` (the EMA weights as a state dict) and `train.json`.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from parlm import dist, runlog
from parlm.runlog import CHECKPOINT_NAME
from parlm.cli import stage_command
from parlm.config import Config, compile_enabled
from parlm.data.loader import ShuffledSequenceLoader, train_seq_len_at
from parlm.data.shards import load_validation_tokens
from parlm.data.tokenizer import ByteTables
from parlm.dist import autocast_context
from parlm.model.gpt import build_model
from parlm.model.validation import eval_val
from parlm.train.optim import Optimizers, lr_multiplier, muon_momentum, seq_change_warmup_scale
from parlm.train.checks import check_inputs, clear_unfinished_attempt
from parlm.train.state import (DeviceFlagPoller, ExponentialMovingAverage, InsufficientMemoryError,
                          StepTimer, TrainingDiverged, TrainingSnapshot, is_out_of_memory,
                          steady_state_rate)

# Steps left out at the start of each phase (before / after looping) when measuring the
# steady-state throughput: the first steps after a start or a schedule switch warm caches.
STEADY_STATE_SKIP_STEPS = 3


def training_fraction(config: Config, step: int, elapsed_ms: float) -> float:
    """Progress in [0, 1+): elapsed_ms / effective_wallclock_ms, or step / iterations when
    there is no wallclock budget (max_wallclock_seconds <= 0)."""
    budget_ms = config.effective_wallclock_ms()
    if budget_ms is None:
        return step / max(config.iterations, 1)
    return elapsed_ms / max(budget_ms, 1e-9)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with `seed` (the data sampler has its own)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def configure_cuda_math() -> None:
    """TF32 matmuls and convolutions, fp32 matmul precision "high" (SPEC 3.1), and Inductor's
    mix-order reduction off.

    Why the last one: Inductor (torch 2.11) fuses each RMSNorm backward (a row reduction) with
    the gradients of the per-channel control vectors (column reductions over B*T rows) into
    "mix-order" kernels that are slow on the default model; with them off the compiled step is
    faster (benchmarks/model_step_speed.py measures it; figures in the README)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "mix_order_reduction"):
        inductor_config.triton.mix_order_reduction = False


def memory_mib(device: torch.device) -> float:
    """Peak memory so far in MiB: CUDA max allocated, or this process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------
class Trainer:
    """The model (compiled, DDP-wrapped when distributed), its optimizers, the data stream and
    one optimizer step (SPEC 3.5 steps 1-4). `train_run` drives it; the speed benchmark too."""

    def __init__(self, config: Config, ctx: dist.DistContext):
        self.config, self.ctx = config, ctx
        self.device = ctx.device
        self.grad_accum_steps = config.grad_accum_steps(ctx.world_size)
        self.base_model = build_model(config, self.device)
        self.compiled = compile_enabled(config, self.device)
        if self.compiled:
            # DDP's graph splitting is off (SPEC 3.1): the whole model stays one graph.
            torch._dynamo.config.optimize_ddp = False
            self.compiled_model = torch.compile(self.base_model, dynamic=False, fullgraph=True)
        else:
            self.compiled_model = self.base_model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ctx.local_rank] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.compiled_model, device_ids=device_ids,
                                                 broadcast_buffers=False)
        else:
            self.model = self.compiled_model
        # Plain validation: eager unless eval_compile_plain (its own compile costs more than
        # it saves on a once-per-run pass).
        self.eval_model = self.compiled_model if config.eval_compile_plain else self.base_model
        self.optimizers = Optimizers(config, self.base_model)
        self.parameters = [p for p in self.base_model.parameters() if p.requires_grad]
        self.loader = self.new_loader()
        self.phase = "setup"
        self.micro_batch_sequences = self.loader.batch_size(config.train_batch_tokens, self.grad_accum_steps)

    def new_loader(self):
        """A fresh data stream; it restarts from the same first batch (seeded sampler)."""
        return ShuffledSequenceLoader(self.config, self.ctx.rank, self.ctx.world_size, self.device)

    @property
    def looping(self) -> bool:
        return bool(self.base_model.looping_active)

    def set_looping(self, active: bool) -> None:
        self.base_model.looping_active = bool(active)

    def step(self, step: int, lr_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the global batch; returns (mean micro-batch loss, gradient
        norm before clipping) as device tensors, without synchronising.

        loss/grad_accum is backpropagated per micro-batch; then Muon momentum = muon_momentum(step),
        every group's lr = peak lr * lr_scale, clip the global grad norm at grad_clip_norm, step."""
        config = self.config
        self.optimizers.zero_grad_all()
        train_loss = torch.zeros((), device=self.device)
        for micro_step in range(self.grad_accum_steps):
            if self.ctx.distributed:
                self.model.require_backward_grad_sync = micro_step == self.grad_accum_steps - 1
            x, y = self.loader.next_batch(config.train_batch_tokens, self.grad_accum_steps)
            with autocast_context(self.device):
                loss = self.model(x, y)
            train_loss += loss.detach()
            (loss / self.grad_accum_steps).backward()
        train_loss /= self.grad_accum_steps
        self.optimizers.set_schedule(lr_scale, muon_momentum(config, step))
        max_norm = config.grad_clip_norm if config.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        self.optimizers.step()
        return train_loss, grad_norm

    def compile_warmup(self, log=print) -> float:
        """SPEC 3.6: snapshot, `warmup_steps` plain then `warmup_steps` looped real steps (both
        graphs compile), then restore weights, optimizer states and RNG exactly, zero the grads
        and restart the data stream. Returns its wall seconds (not part of the budget)."""
        warmup_steps = self.config.warmup_steps
        if warmup_steps <= 0:
            return 0.0
        dist.synchronize(self.device)
        start = time.perf_counter()
        snapshot = TrainingSnapshot.capture(self.base_model, self.optimizers)
        self.model.train()
        phases = [("warmup_step", False)]
        if self.config.num_loops > 0:
            phases.append(("loop_warmup_step", True))
        # progressive context (#2014): every (length, looping) graph compiles before the clock
        lengths = sorted({length for _, length in self.config.train_seq_stages()})
        for label, looping, seq_len in [(*phase, length) for length in lengths for phase in phases]:
            self.loader.set_seq_len(seq_len)
            self.set_looping(looping)
            if looping:
                log(f"loop_warmup:enabled encoder:{self.base_model.encoder_indices} "
                    f"decoder:{self.base_model.decoder_indices}")
            for index in range(warmup_steps):
                self.phase = f"compile warmup ({label} {index + 1}/{warmup_steps})"
                self.step(index, 1.0)
                if index <= 5 or (index + 1) % 10 == 0 or index + 1 == warmup_steps:
                    log(f"{label}: {index + 1}/{warmup_steps}")
        self.set_looping(False)
        snapshot.restore(self.base_model, self.optimizers)
        self.optimizers.zero_grad_all()
        if self.ctx.distributed:
            self.model.require_backward_grad_sync = True
        self.loader = self.new_loader()
        dist.synchronize(self.device)
        return time.perf_counter() - start

    @contextlib.contextmanager
    def out_of_memory_explained(self, log=print):
        """Run the body; a CUDA/CPU out-of-memory inside it becomes InsufficientMemoryError."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - only OOM is translated
            if is_out_of_memory(error):
                memory_error = self.memory_error(error)
                log(str(memory_error))
                raise memory_error from error
            raise

    def memory_error(self, error: BaseException) -> InsufficientMemoryError:
        """The OOM message: where it happened, the per-rank micro-batch shape, how to shrink it."""
        config, ctx = self.config, self.ctx
        total = ""
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            total = f" on a {props.total_memory / 2**30:.1f} GiB {props.name}"
        sequences = self.micro_batch_sequences
        return InsufficientMemoryError(
            f"out of memory during {self.phase}{total}: each of the {ctx.world_size} process(es) "
            f"runs micro-batches of {sequences} sequences x {config.train_seq_len} tokens "
            f"(train_batch_tokens={config.train_batch_tokens} split into {self.grad_accum_steps} "
            f"micro-step(s) per rank). Shrink the micro-batch: --set micro_batches_per_step="
            f"{2 * config.micro_batches_per_step} keeps the global batch with twice the "
            f"accumulation; or lower train_batch_tokens / train_seq_len, or use more GPUs.")


# ----------------------------------------------------------------------------------------
def _save_state_dict(state: dict, path: Path) -> None:
    with runlog.atomic_path(path) as tmp:  # no temporary file left on a full disk
        torch.save(state, tmp)


def train_run(config: Config, run_dir: str | os.PathLike) -> dict:
    """Train `config` into `run_dir` (SPEC 3) and return the train.json record.

    Works in one process (CPU or one GPU) and under torchrun (1..8 GPUs, gloo on CPU). Raises
    before training on a bad config, missing data or too little memory; raises TrainingDiverged
    (after saving the last good EMA as final_model.pt, train.json diverged=true) on a
    non-finite loss, gradient or weight."""
    run_dir = Path(run_dir)
    ctx = dist.init_distributed(config.device)
    device = ctx.device
    num_train_shards = check_inputs(config, ctx.world_size)
    logger = runlog.RunLogger(run_dir, "train.log")
    log = logger.log
    if ctx.is_main:
        config = runlog.record_config(config, run_dir)
        clear_unfinished_attempt(run_dir, log)
    config = dist.broadcast_object(config)
    dist.barrier()

    seed_everything(config.seed)
    if device.type == "cuda":
        configure_cuda_math()
    logger.header(config)
    val_tokens = load_validation_tokens(config.val_files, config.eval_seq_len, config.val_max_tokens)
    byte_tables = ByteTables.from_tokenizer(config.resolved_tokenizer_path, config.vocab_size)
    trainer = Trainer(config, ctx)
    base_model = trainer.base_model
    tokens_per_step = config.train_batch_tokens
    budget_ms = config.effective_wallclock_ms()
    log(f"world_size:{ctx.world_size} grad_accum_steps:{trainer.grad_accum_steps} device:{device} "
        f"attention_backend:{base_model.attention_backend} compile:{trainer.compiled}")
    log(f"train_shards: {num_train_shards}")
    log(f"val_tokens: {val_tokens.numel() - 1}")
    log(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    if budget_ms is not None:
        log(f"gptq:reserving {config.gptq_reserve_seconds:.0f}s, effective={budget_ms:.0f}ms")

    with trainer.out_of_memory_explained(log):
        compile_seconds = trainer.compile_warmup(log)
    if config.warmup_steps > 0:
        log(f"compile_warmup: {compile_seconds:.1f}s (not counted in the budget)")

    # ---- the timed loop (SPEC 3.5) --------------------------------------------------------
    ema = ExponentialMovingAverage(base_model, config.ema_decay)
    poller = DeviceFlagPoller(ema.healthy)
    timer = StepTimer(device)
    training_ms, stop_after_step, step = 0.0, None, 0
    looping_step, diverged, live_val = None, False, None
    seq_change_step = None  # progressive context (#2014): the step of the last length change
    last_log_step, last_log_ms = 0, 0.0
    iterations = config.iterations
    trainer.model.train()
    dist.synchronize(device)
    start = time.perf_counter()
    timer.resume()
    with trainer.out_of_memory_explained(log):
        while True:
            last_step = step == iterations or (stop_after_step is not None and step >= stop_after_step)
            if last_step or (config.val_loss_every > 0 and step % config.val_loss_every == 0):
                dist.synchronize(device)
                training_ms += 1000.0 * (time.perf_counter() - start)
                trainer.phase = f"validation at step {step}"
                result = eval_val(config, trainer.eval_model, val_tokens, byte_tables, ctx)
                live_val = result
                log(f"{step}/{iterations} val_loss: {result.loss:.4f} val_bpb: {result.bpb:.4f} "
                    f"eval_time:{1000 * result.seconds:.0f}ms")
                logger.metric("val", step=step, val_loss=result.loss, val_bpb=result.bpb,
                              seconds=result.seconds, train_time_ms=training_ms)
                dist.synchronize(device)
                start = time.perf_counter()
                timer.resume()
            if last_step:
                if stop_after_step is not None and step < iterations:
                    log(f"stopping_early: wallclock_cap train_time: {training_ms:.0f}ms step: {step}/{iterations}")
                break
            elapsed_ms = training_ms + 1000.0 * (time.perf_counter() - start)
            frac = training_fraction(config, step, elapsed_ms)
            lr_scale = lr_multiplier(config, frac)
            # ---- progressive context (#2014, parlm.data.loader.train_seq_len_at) ----
            seq_len = train_seq_len_at(config, frac)
            if seq_len != trainer.loader.seq_len:
                trainer.loader.set_seq_len(seq_len)
                seq_change_step = step
                log(f"growth_stage:seq_len:{seq_len} step:{step} frac:{frac:.3f}")
            lr_scale *= seq_change_warmup_scale(config, step, seq_change_step)
            # ---- end progressive context ----
            if config.num_loops > 0 and not trainer.looping and frac >= config.enable_looping_at:
                trainer.set_looping(True)
                looping_step = step
                log(f"layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{base_model.encoder_indices} "
                    f"decoder:{base_model.decoder_indices}")
            trainer.phase = f"training step {step + 1}"
            train_loss, grad_norm = trainer.step(step, lr_scale)
            step += 1
            ema.update(step, grad_norm)
            timer.step_done(trainer.looping)
            approx_ms = training_ms + 1000.0 * (time.perf_counter() - start)
            reached_cap = budget_ms is not None and approx_ms >= budget_ms
            if ctx.distributed:  # every rank must stop at the same step (MAX all-reduce)
                flags = torch.stack([torch.full((), float(reached_cap), device=device),
                                     (~ema.healthy).float()])
                reached, unhealthy = dist.all_reduce_max(flags).tolist()
                reached_cap, diverged = reached > 0, unhealthy > 0
            else:
                diverged = poller.poll() is False
            if diverged:
                break
            if config.train_log_every > 0 and (step <= 5 or step % config.train_log_every == 0
                                               or reached_cap or step == iterations):
                loss_value = float(dist.all_reduce_mean(train_loss.detach().clone()).item())
                now_ms = training_ms + 1000.0 * (time.perf_counter() - start)
                cumulative = step * tokens_per_step / max(now_ms / 1000.0, 1e-9)
                interval = (step - last_log_step) * tokens_per_step / max((now_ms - last_log_ms) / 1000.0, 1e-9)
                last_log_step, last_log_ms = step, now_ms
                log(f"{step}/{iterations} train_loss: {loss_value:.4f} train_time: {now_ms / 60000:.1f}m "
                    f"tok/s: {cumulative:.0f} interval_tok/s: {interval:.0f} lr_scale: {lr_scale:.4f}")
                logger.metric("train", step=step, train_loss=loss_value, lr_scale=lr_scale,
                              tok_per_sec=cumulative, tok_per_sec_interval=interval,
                              looping=trainer.looping, memory_mib=memory_mib(device),
                              train_time_ms=now_ms, frac=frac)
                if not math.isfinite(loss_value) and not ema.is_healthy():
                    diverged = True
                    break
            if stop_after_step is None and reached_cap:
                stop_after_step = step
    dist.synchronize(device)
    if not diverged and not ema.is_healthy():
        diverged = True
    if diverged:
        training_ms += 1000.0 * (time.perf_counter() - start)

    # ---- results ----------------------------------------------------------------------------
    peak_allocated = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else memory_mib(device)
    if device.type == "cuda":
        log(f"peak memory allocated: {peak_allocated:.0f} MiB "
            f"reserved: {torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB")
    durations = timer.durations_ms()
    rate_before, steps_before = steady_state_rate(durations, False, tokens_per_step, STEADY_STATE_SKIP_STEPS)
    rate_after, steps_after = steady_state_rate(durations, True, tokens_per_step, STEADY_STATE_SKIP_STEPS)
    summary = {
        "steps": step,
        "train_seconds": training_ms / 1000.0,
        "live_val_loss": live_val.loss if live_val and not diverged else None,
        "live_val_bpb": live_val.bpb if live_val and not diverged else None,
        "prequant_loss": None, "prequant_bpb": None, "prequant_seconds": None,
        "peak_memory_mib": peak_allocated,
        "tok_per_sec_before_loop": rate_before,
        "tok_per_sec_after_loop": rate_after,
        "tok_per_sec_per_gpu_before_loop": rate_before / ctx.world_size if rate_before else None,
        "tok_per_sec_per_gpu_after_loop": rate_after / ctx.world_size if rate_after else None,
        "steady_state_steps": {"before_loop": steps_before, "after_loop": steps_after,
                               "skipped_per_phase": STEADY_STATE_SKIP_STEPS},
        "looping_step": looping_step,
        "looping_at_end": trainer.looping,
        "world_size": ctx.world_size,
        "grad_accum_steps": trainer.grad_accum_steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention_backend": base_model.attention_backend,
        "compile": trainer.compiled,
        "compile_warmup_seconds": compile_seconds,
        "stopped_by": "diverged" if diverged else ("wallclock" if stop_after_step is not None
                                                   and step < iterations else "iterations"),
        "diverged": diverged,
        "diverged_step": None,
    }

    log("ema:applying EMA weights")
    ema.load_into(base_model)
    if diverged:
        bad_step = int(ema.first_bad_step.item())
        summary["diverged_step"] = bad_step
        if ctx.is_main:
            _save_state_dict(base_model.state_dict(), run_dir / CHECKPOINT_NAME)
            runlog.write_json(run_dir / "train.json", summary)
        message = (f"training diverged: non-finite loss/gradient/weights at step {bad_step}; the EMA "
                   f"of the steps before it was saved as {run_dir / CHECKPOINT_NAME} "
                   f"(train.json diverged=true). Lower the learning "
                   f"rates (matrix_lr, scalar_lr, tied_embed_lr) or grad_clip_norm and retrain.")
        log(message)
        dist.barrier()
        raise TrainingDiverged(message, bad_step)

    trainer.phase = "pre-quantization evaluation"
    result = eval_val(config, trainer.eval_model, val_tokens, byte_tables, ctx)
    log(f"pre-quantization post-ema val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f} "
        f"eval_time:{1000 * result.seconds:.0f}ms")
    logger.metric("prequant", step=step, val_loss=result.loss, val_bpb=result.bpb, seconds=result.seconds)
    summary.update(prequant_loss=result.loss, prequant_bpb=result.bpb, prequant_seconds=result.seconds)
    if ctx.is_main:
        _save_state_dict(base_model.state_dict(), run_dir / CHECKPOINT_NAME)
        runlog.write_json(run_dir / "train.json", summary)
    log(f"train: done steps:{step} train_time:{training_ms:.0f}ms live_val_bpb:"
        f"{summary['live_val_bpb']} prequant_bpb:{result.bpb:.6f} "
        f"tok/s before/after looping: {rate_before or 0:.0f}/{rate_after or 0:.0f}")
    dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m parlm.train --run-dir DIR [--config|--preset|--set]` (parlm.cli)."""
    return stage_command(
        "python -m parlm.train",
        "Train a parlm model into a run folder (SPEC 3). Under torchrun, one process per GPU; the "
        "config comes from --config, else <run-dir>/config.yaml, else --preset, else the reference "
        "defaults, then --set overrides.",
        train_run, argv, run_dir_help="run folder (created if missing)",
        user_errors=(InsufficientMemoryError, TrainingDiverged))
