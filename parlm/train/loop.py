"""Training (SPEC 3): one process per GPU under torchrun, or one CPU process for tiny configs.

    python -m parlm.train --run-dir DIR [--config CFG | --preset NAME] [--set key=value ...]
    torchrun --standalone --nproc_per_node=N -m parlm.train --run-dir DIR   (N divides 8)

The global batch is fixed (`train_batch_tokens`); each rank runs
grad_accum = micro_batches_per_step / world_size micro-steps per optimizer step and DDP syncs
gradients only on the last one. The LR follows the *wall clock*, not the step count
(`parlm.train.optim.lr_multiplier` of frac = elapsed / budget), because the challenge limits time:
a faster step buys more steps, not a different schedule. Budget = max_wallclock_seconds minus
the GPTQ reserve (the quantizer's Hessian pass is charged to training time); validation,
checkpoints and the compile warmup are not counted. With max_wallclock_seconds <= 0 the run
stops on the step count and frac = step / iterations (the reference's rule without a cap), so
it repeats exactly on any machine. Depth recurrence switches on at frac >= enable_looping_at.

A killed run resumes from its last checkpoint (`parlm.train.checkpoint`; checkpoint_every_seconds
or checkpoint_every_steps), bit-identically in step-count mode.

Outputs in the run folder: `train.log`, `metrics.jsonl` (stage "train": step, train_loss,
lr_scale, tok_per_sec (cumulative), tok_per_sec_interval, looping, memory_mib; stage "val":
step, val_loss, val_bpb), `final_model.pt` (the EMA weights as a state dict) and `train.json`.
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from parlm import dist, runlog
from parlm.cli import stage_command
from parlm.config import Config
from parlm.data.accounting import byte_accounting
from parlm.data.leak import LeakError
from parlm.data.loader import train_seq_len_at
from parlm.data.shards import load_validation_tokens
from parlm.dist import synchronize
from parlm.model.validation import eval_val
from parlm.runlog import CHECKPOINT_NAME
from parlm.train.optim import lr_multiplier, seq_change_warmup_scale
from parlm.train.checkpoint import (checkpoint_dir, find_checkpoint, load_checkpoint,
                                   remove_checkpoints, restore_checkpoint, save_checkpoint)
from parlm.train.checks import check_inputs, clear_unfinished_attempt, restart_command
from parlm.train.state import (STALL_TOLERANCE_NATS, DeviceFlagPoller, ExponentialMovingAverage,
                               InsufficientMemoryError, LoopState, LossStall, StepTimer,
                               TrainingDiverged, steady_state_rate)
# Re-exported: benchmarks/train_speed.py builds the same Trainer.
from parlm.train.trainer import Trainer, configure_cuda_math, memory_mib  # noqa: F401

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


# ----------------------------------------------------------------------------------------
def _save_state_dict(state: dict, path: Path) -> None:
    with runlog.atomic_path(path) as tmp:  # no temporary file left on a full disk
        torch.save(state, tmp)


class TimedLoop:
    """The timed loop of SPEC 3.5 around a built `Trainer`, and what follows it.

    One iteration: validate (when due; the training clock is stopped around it, as in
    modded-nanogpt's "stop the clock / start the clock"), schedule (frac, lr_scale, looping
    switch), one optimizer step, the stop decision (wallclock cap, divergence, checkpoint: one
    agreement across ranks), the log line, the checkpoint (clock stopped too). Everything that
    carries over between iterations is in `self.state` (a LoopState); `summary` and `finish`
    turn it into train.json and final_model.pt."""

    def __init__(self, config: Config, run_dir: Path, ctx: dist.DistContext, logger: runlog.RunLogger,
                 trainer: Trainer, validation: tuple, compile_seconds: float):
        self.config, self.run_dir, self.ctx, self.trainer = config, run_dir, ctx, trainer
        self.logger, self.log = logger, logger.log
        self.device = ctx.device
        self.val_tokens, self.byte_tables = validation
        self.compile_seconds = compile_seconds
        self.budget_ms = config.effective_wallclock_ms()
        self.tokens_per_step = config.train_batch_tokens
        self.ema = ExponentialMovingAverage(trainer.base_model, config.ema_decay)
        self.poller = DeviceFlagPoller(self.ema.healthy)
        self.timer = StepTimer(self.device)
        self.state = LoopState(stall=LossStall(config.stall_steps, math.log(config.vocab_size)))
        self.clock_start = 0.0
        self.last_checkpoint = time.perf_counter()

    # ---- the training clock --------------------------------------------------------------
    def start_clock(self) -> None:
        """Training time counts again from now (after setup, validation or a checkpoint)."""
        synchronize(self.device)
        self.clock_start = time.perf_counter()
        self.timer.resume()

    def stop_clock(self) -> None:
        """Add the time since `start_clock` to the training clock (queued GPU work included)."""
        synchronize(self.device)
        self.state.training_ms += 1000.0 * (time.perf_counter() - self.clock_start)

    def elapsed_ms(self) -> float:
        """Training milliseconds so far (the clock must be running)."""
        return self.state.training_ms + 1000.0 * (time.perf_counter() - self.clock_start)

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Iterate until the step count or the budget is reached, or training diverged."""
        state = self.state
        self.trainer.model.train()
        self.start_clock()
        with self.trainer.out_of_memory_explained(self.log):
            while True:
                last_step = self.is_last_step()
                if last_step or self.validation_due():
                    self.stop_clock()
                    self.validate()
                    self.start_clock()
                if last_step:
                    self.note_early_stop()
                    break
                frac, lr_scale = self.schedule()
                self.trainer.phase = f"training step {state.step + 1}"
                train_loss, grad_norm = self.trainer.step(state.step, lr_scale)
                state.step += 1
                self.ema.update(state.step, grad_norm)
                self.timer.step_done(self.trainer.looping)
                reached_cap, checkpoint_due = self.stop_decision()
                if state.diverged:
                    break
                if self.log_due(reached_cap):
                    self.log_step(train_loss, lr_scale, frac)
                    if state.diverged:
                        break
                if state.stop_after_step is None and reached_cap:
                    state.stop_after_step = state.step
                if checkpoint_due:
                    self.stop_clock()
                    self.checkpoint()
                    self.start_clock()
        synchronize(self.device)
        self.record_health(not self.ema.is_healthy())
        if state.diverged:
            self.stop_clock()

    def is_last_step(self) -> bool:
        """step == iterations, or the step that crossed the wallclock budget was reached."""
        state = self.state
        return state.step == self.config.iterations or (
            state.stop_after_step is not None and state.step >= state.stop_after_step)

    def validation_due(self) -> bool:
        """Every val_loss_every steps (step 0 included; 0 = only at the end)."""
        every = self.config.val_loss_every
        return every > 0 and self.state.step % every == 0

    def validate(self) -> None:
        """Score the live weights on the validation prefix; log and record it."""
        state = self.state
        self.trainer.phase = f"validation at step {state.step}"
        result = eval_val(self.config, self.trainer.eval_model, self.val_tokens, self.byte_tables, self.ctx)
        state.live_val_loss, state.live_val_bpb = result.loss, result.bpb
        self.log(f"{state.step}/{self.config.iterations} val_loss: {result.loss:.4f} val_bpb: "
                 f"{result.bpb:.4f} eval_time:{1000 * result.seconds:.0f}ms")
        self.logger.metric("val", step=state.step, val_loss=result.loss, val_bpb=result.bpb,
                           seconds=result.seconds, train_time_ms=state.training_ms)

    def note_early_stop(self) -> None:
        """Log a stop by the wallclock cap before the step count."""
        state = self.state
        if state.stop_after_step is not None and state.step < self.config.iterations:
            self.log(f"stopping_early: wallclock_cap train_time: {state.training_ms:.0f}ms "
                     f"step: {state.step}/{self.config.iterations}")

    def schedule(self) -> tuple[float, float]:
        """(frac, lr_scale) of the coming step; switches depth recurrence on at
        frac >= enable_looping_at, and with a progressive context (#2014) moves the loader to
        the row length of this fraction, re-warming the LR after each change."""
        config, state, trainer = self.config, self.state, self.trainer
        frac = training_fraction(config, state.step, self.elapsed_ms())
        lr_scale = lr_multiplier(config, frac)
        if config.num_loops > 0 and not trainer.looping and frac >= config.enable_looping_at:
            trainer.set_looping(True)
            state.looping_step = state.step
            self.log(f"layer_loop:enabled step:{state.step} frac:{frac:.3f} encoder:"
                     f"{trainer.base_model.encoder_indices} decoder:{trainer.base_model.decoder_indices}")
        seq_len = train_seq_len_at(config, frac)
        if seq_len != trainer.loader.seq_len:
            trainer.loader.set_seq_len(seq_len)
            state.seq_change_step = state.step
            self.log(f"growth_stage:seq_len:{seq_len} step:{state.step} frac:{frac:.3f}")
        lr_scale *= seq_change_warmup_scale(config, state.step, state.seq_change_step)
        return frac, lr_scale

    def stop_decision(self) -> tuple[bool, bool]:
        """(reached_cap, checkpoint_due) after a step, the same on every rank (one MAX
        all-reduce when distributed); records divergence."""
        reached_cap = self.budget_ms is not None and self.elapsed_ms() >= self.budget_ms
        checkpoint_due = self.checkpoint_due()
        if self.ctx.distributed:  # every rank must stop (and checkpoint) at the same step
            flags = torch.stack([torch.full((), float(reached_cap), device=self.device),
                                 (~self.ema.healthy).float(),
                                 torch.full((), float(checkpoint_due), device=self.device)])
            reached, unhealthy, due = dist.all_reduce_max(flags).tolist()
            reached_cap, checkpoint_due, diverged = reached > 0, due > 0, unhealthy > 0
        else:
            diverged = self.poller.poll() is False
        self.record_health(diverged)
        return reached_cap, checkpoint_due

    def record_health(self, diverged: bool) -> None:
        """The one place that marks the run diverged (sticky)."""
        self.state.diverged = self.state.diverged or bool(diverged)

    def log_due(self, reached_cap: bool) -> bool:
        """Steps 1-5, every train_log_every steps, the step that hit the cap and the last one."""
        step, every = self.state.step, self.config.train_log_every
        return every > 0 and (step <= 5 or step % every == 0 or reached_cap
                              or step == self.config.iterations)

    def log_step(self, train_loss: torch.Tensor, lr_scale: float, frac: float) -> None:
        """The train line and metric: mean loss over ranks, cumulative and interval tok/s;
        watches for a stall at ln(vocab_size) and for a non-finite loss."""
        state, config = self.state, self.config
        loss_value = float(dist.all_reduce_mean(train_loss.detach().clone()).item())
        now_ms = self.elapsed_ms()
        cumulative = state.step * self.tokens_per_step / max(now_ms / 1000.0, 1e-9)
        interval = ((state.step - state.last_log_step) * self.tokens_per_step
                    / max((now_ms - state.last_log_ms) / 1000.0, 1e-9))
        state.last_log_step, state.last_log_ms = state.step, now_ms
        self.log(f"{state.step}/{config.iterations} train_loss: {loss_value:.4f} train_time: "
                 f"{now_ms / 60000:.1f}m tok/s: {cumulative:.0f} interval_tok/s: {interval:.0f} "
                 f"lr_scale: {lr_scale:.4f}")
        self.logger.metric("train", step=state.step, train_loss=loss_value, lr_scale=lr_scale,
                           tok_per_sec=cumulative, tok_per_sec_interval=interval,
                           looping=self.trainer.looping, memory_mib=memory_mib(self.device),
                           train_time_ms=now_ms, frac=frac)
        if state.stall.observe(state.step, loss_value):
            self.log(stall_warning(config, state.stall))
        if not math.isfinite(loss_value):
            self.record_health(not self.ema.is_healthy())

    # ---- checkpoints (resumable training) ------------------------------------------------
    def checkpoint_due(self) -> bool:
        """Every checkpoint_every_steps steps or checkpoint_every_seconds wall seconds since
        the last one (this rank's view; `stop_decision` makes the ranks agree), never at the
        last step."""
        config, step = self.config, self.state.step
        if step == config.iterations:  # training ends now; nothing left to resume
            return False
        by_steps = config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0
        by_time = (config.checkpoint_every_seconds > 0
                   and time.perf_counter() - self.last_checkpoint >= config.checkpoint_every_seconds)
        return by_steps or by_time

    def checkpoint(self) -> None:
        """Write the resumable checkpoint of this step (outside the training clock)."""
        started = time.perf_counter()
        self.trainer.phase = f"checkpoint at step {self.state.step}"
        save_checkpoint(self.run_dir, self.trainer, self.ema, self.state, self.timer, self.ctx)
        self.last_checkpoint = time.perf_counter()
        self.log(f"checkpoint: step {self.state.step} saved in {checkpoint_dir(self.run_dir)} "
                 f"({self.last_checkpoint - started:.1f}s, outside the training time)")

    def resume(self, step: int) -> None:
        """Continue from this rank's checkpoint of `step` (after the compile warmup)."""
        payload = load_checkpoint(self.run_dir, step, self.ctx.rank)
        restore_checkpoint(payload, self.trainer, self.ema)
        self.state = LoopState.from_dict(payload["loop"])
        self.state.resumed_from_step = step
        self.timer = StepTimer(self.device, earlier=payload["durations_ms"])
        self.log(f"resumed from step {step} (train_time {self.state.training_ms:.0f}ms, "
                 f"checkpoint {checkpoint_dir(self.run_dir)})")

    # ---- results -------------------------------------------------------------------------
    def summary(self) -> dict:
        """The train.json record of the loop (prequant fields filled by `finish`)."""
        state, trainer, ctx, device = self.state, self.trainer, self.ctx, self.device
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else memory_mib(device)
        if device.type == "cuda":
            self.log(f"peak memory allocated: {peak:.0f} MiB "
                     f"reserved: {torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB")
        durations = self.timer.durations_ms()
        rate_before, steps_before = steady_state_rate(durations, False, self.tokens_per_step, STEADY_STATE_SKIP_STEPS)
        rate_after, steps_after = steady_state_rate(durations, True, self.tokens_per_step, STEADY_STATE_SKIP_STEPS)
        wallclock_stop = state.stop_after_step is not None and state.step < self.config.iterations
        return {
            "steps": state.step,
            "train_seconds": state.training_ms / 1000.0,
            "live_val_loss": state.live_val_loss if not state.diverged else None,
            "live_val_bpb": state.live_val_bpb if not state.diverged else None,
            "prequant_loss": None, "prequant_bpb": None, "prequant_seconds": None,
            "peak_memory_mib": peak,
            "tok_per_sec_before_loop": rate_before,
            "tok_per_sec_after_loop": rate_after,
            "tok_per_sec_per_gpu_before_loop": rate_before / ctx.world_size if rate_before else None,
            "tok_per_sec_per_gpu_after_loop": rate_after / ctx.world_size if rate_after else None,
            "steady_state_steps": {"before_loop": steps_before, "after_loop": steps_after,
                                   "skipped_per_phase": STEADY_STATE_SKIP_STEPS},
            "looping_step": state.looping_step,
            "looping_at_end": trainer.looping,
            "world_size": ctx.world_size,
            "grad_accum_steps": trainer.grad_accum_steps,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "attention_backend": trainer.base_model.attention_backend,
            "compile": trainer.compiled,
            "compile_warmup_seconds": self.compile_seconds,
            "stopped_by": "diverged" if state.diverged else ("wallclock" if wallclock_stop else "iterations"),
            "diverged": state.diverged,
            "diverged_step": None,
            "stalled": state.stall.flagged_steps is not None,
            "stalled_steps": state.stall.flagged_steps,
            "resumed_from_step": state.resumed_from_step,
        }

    def finish(self, summary: dict) -> dict:
        """Apply the EMA; on divergence save it, write train.json and raise TrainingDiverged;
        else score it (pre-quantization), save final_model.pt and train.json, drop the
        checkpoint. Returns the completed summary."""
        trainer, ctx, run_dir = self.trainer, self.ctx, self.run_dir
        self.log("ema:applying EMA weights")
        self.ema.load_into(trainer.base_model)
        if self.state.diverged:
            self.fail_diverged(summary)
        trainer.phase = "pre-quantization evaluation"
        result = eval_val(self.config, trainer.eval_model, self.val_tokens, self.byte_tables, ctx)
        self.log(f"pre-quantization post-ema val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f} "
                 f"eval_time:{1000 * result.seconds:.0f}ms")
        self.logger.metric("prequant", step=self.state.step, val_loss=result.loss, val_bpb=result.bpb,
                           seconds=result.seconds)
        summary.update(prequant_loss=result.loss, prequant_bpb=result.bpb, prequant_seconds=result.seconds)
        if ctx.is_main:
            _save_state_dict(trainer.base_model.state_dict(), run_dir / CHECKPOINT_NAME)
            runlog.write_json(run_dir / "train.json", summary)
            remove_checkpoints(run_dir)
        self.log(f"train: done steps:{self.state.step} train_time:{self.state.training_ms:.0f}ms "
                 f"live_val_bpb:{summary['live_val_bpb']} prequant_bpb:{result.bpb:.6f} "
                 f"tok/s before/after looping: {summary['tok_per_sec_before_loop'] or 0:.0f}/"
                 f"{summary['tok_per_sec_after_loop'] or 0:.0f}")
        dist.barrier()
        return summary

    def fail_diverged(self, summary: dict) -> None:
        """Save the last good EMA and train.json (diverged=true), say how to retrain, raise."""
        run_dir = self.run_dir
        bad_step = int(self.ema.first_bad_step.item())
        summary["diverged_step"] = bad_step
        if self.ctx.is_main:
            _save_state_dict(self.trainer.base_model.state_dict(), run_dir / CHECKPOINT_NAME)
            runlog.write_json(run_dir / "train.json", summary)
            remove_checkpoints(run_dir)  # a resume would diverge again
        message = (f"training diverged: non-finite loss/gradient/weights at step {bad_step}; the EMA "
                   f"of the steps before it was saved as {run_dir / CHECKPOINT_NAME} "
                   f"(train.json diverged=true). Lower the learning rates (matrix_lr, scalar_lr, "
                   f"tied_embed_lr) or grad_clip_norm and train this seed again, keeping its data "
                   f"(or start over: the same command with a new --run-id and without "
                   f"--restart-stage): {restart_command(run_dir, self.config)}")
        self.log(message)
        dist.barrier()
        raise TrainingDiverged(message, bad_step)


def stall_warning(config: Config, stall: LossStall) -> str:
    """The log line of a run stuck at the uniform predictor."""
    first, last = stall.flagged_steps
    return (f"warning: train_loss stayed within {STALL_TOLERANCE_NATS} of ln(vocab_size)="
            f"{stall.uniform_loss:.4f} (a uniform predictor) for {stall.steps} logged steps "
            f"({first}..{last}); the model is not learning: lower the learning rates (matrix_lr, "
            f"scalar_lr, tied_embed_lr); train.json records stalled=true")


def prepare_attempt(config: Config, run_dir: Path, ctx: dist.DistContext, log) -> tuple[Config, int | None]:
    """Rank 0 writes or checks the run folder's config, finds a checkpoint to resume from
    (same world size) and clears what an unfinished earlier attempt left after it. Returns the
    run's config and the step to resume from (None: from step 0), the same on every rank."""
    resume_step = None
    if ctx.is_main:
        config = runlog.record_config(config, run_dir)
        found = find_checkpoint(run_dir)
        if found is not None and found["world_size"] != ctx.world_size:
            log(f"train: the checkpoint of step {found['step']} in {checkpoint_dir(run_dir)} was "
                f"written by {found['world_size']} process(es), this run has {ctx.world_size}; "
                f"training from step 0")
            found = None
        resume_step = found["step"] if found is not None else None
        clear_unfinished_attempt(run_dir, log, resume_step)
    config, resume_step = dist.broadcast_object((config, resume_step))
    dist.barrier()
    return config, resume_step


def build_loop(config: Config, run_dir: Path, ctx: dist.DistContext, logger: runlog.RunLogger,
               num_train_shards: int) -> TimedLoop:
    """Validation data, its byte accounting (`parlm.data.accounting.byte_accounting`: the
    tables, or the raw-text sidecar for CaseOps data), the Trainer and its compile warmup,
    then the TimedLoop."""
    log = logger.log
    val_tokens = load_validation_tokens(config.val_files, config.eval_seq_len, config.val_max_tokens)
    byte_tables = byte_accounting(config, val_tokens.numel())
    trainer = Trainer(config, ctx)
    base_model = trainer.base_model
    budget_ms = config.effective_wallclock_ms()
    log(f"world_size:{ctx.world_size} grad_accum_steps:{trainer.grad_accum_steps} device:{ctx.device} "
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
    return TimedLoop(config, run_dir, ctx, logger, trainer, (val_tokens, byte_tables), compile_seconds)


def train_run(config: Config, run_dir: str | os.PathLike) -> dict:
    """Train `config` into `run_dir` (SPEC 3) and return the train.json record.

    Works in one process (CPU or one GPU) and under torchrun (1..8 GPUs, gloo on CPU). Raises
    before training on a bad config, missing data or too little memory; raises TrainingDiverged
    (after saving the last good EMA as final_model.pt, train.json diverged=true) on a
    non-finite loss, gradient or weight. A checkpoint left in run_dir by a killed attempt
    (checkpoint_every_seconds / checkpoint_every_steps) is resumed from."""
    run_dir = Path(run_dir)
    ctx = dist.init_distributed(config.device)
    num_train_shards = check_inputs(config, ctx.world_size)
    logger = runlog.RunLogger(run_dir, "train.log")
    config, resume_step = prepare_attempt(config, run_dir, ctx, logger.log)
    seed_everything(config.seed)
    if ctx.device.type == "cuda":
        configure_cuda_math()
    logger.header(config)
    loop = build_loop(config, run_dir, ctx, logger, num_train_shards)
    if resume_step is not None:
        loop.resume(resume_step)
    loop.run()
    return loop.finish(loop.summary())


# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m parlm.train --run-dir DIR [--config|--preset|--set] [--nproc N] [--nnodes ...]` (parlm.cli)."""
    return stage_command(
        "python -m parlm.train",
        "Train a parlm model into a run folder (SPEC 3). Under torchrun, one process per GPU; the "
        "config comes from --config, else <run-dir>/config.yaml, else --preset, else the reference "
        "defaults, then --set overrides.",
        train_run, argv, run_dir_help="run folder (created if missing)",
        user_errors=(InsufficientMemoryError, TrainingDiverged, LeakError), distributed=True)
