"""Training-state helpers for `parlm.train`: the fp32 weight EMA, the warmup snapshot, step
timing and the errors a run can stop with.

They are separate from the loop so each can be tested on its own and reused by
`benchmarks/train_speed.py`. None of them synchronises the GPU on the hot path: the EMA keeps
its divergence bookkeeping on the device, and step times are CUDA events read at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from parlm import dist


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the message names the step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class InsufficientMemoryError(RuntimeError):
    """The accelerator ran out of memory; the message says which batch shape and how to shrink it."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA OOM, including when torch.compile wraps it in another exception."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


# ----------------------------------------------------------------------------------------
# Exponential moving average of the weights (SPEC 3.5 step 5)

class ExponentialMovingAverage:
    """fp32 EMA of every floating-point state-dict entry, updated after each optimizer step:

        ema <- decay * ema + (1 - decay) * theta        (no bias correction)

    The average lives in one flat fp32 buffer, so an update is a handful of kernels however
    many tensors the model has: copy the live entries into a flat scratch buffer
    (`_foreach_copy_` casts bf16 -> fp32), then `ema.lerp_(scratch, 1 - decay)`.

    Divergence guard without host syncs: an update whose weights (or the supplied gradient
    norm) are not all finite is replaced by a no-op on the device (`where(ok, theta, ema)`,
    and lerp(a, a, w) == a exactly), a sticky `healthy` flag drops to False and
    `first_bad_step` records the step. The EMA therefore stays the average of the last good
    steps, which is what a diverged run saves. Non-float entries (none in GPT) are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        state = model.state_dict()
        self.decay = float(decay)
        self.names = list(state)
        self.float_names = [n for n in self.names if state[n].is_floating_point()]
        self.other = {n: state[n].detach().clone() for n in self.names if not state[n].is_floating_point()}
        self.live = [state[n] for n in self.float_names]  # detached views of the parameters
        self.shapes = [t.shape for t in self.live]
        self.dtypes = {n: state[n].dtype for n in self.names}
        device = self.live[0].device if self.live else torch.device("cpu")
        sizes = [t.numel() for t in self.live]
        total = sum(sizes)
        self.flat = torch.empty(total, dtype=torch.float32, device=device)
        self.scratch = torch.empty(total, dtype=torch.float32, device=device)
        self.views = list(self.flat.split(sizes))
        self.scratch_views = list(self.scratch.split(sizes))
        with torch.no_grad():
            if self.live:
                torch._foreach_copy_(self.views, [t.reshape(-1) for t in self.live])
        self.healthy = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.updates = 0

    @torch.no_grad()
    def update(self, step: int, grad_norm: torch.Tensor | None = None) -> None:
        """Fold the model's current weights into the average (see the class docstring)."""
        if not self.live:
            return
        torch._foreach_copy_(self.scratch_views, [t.reshape(-1) for t in self.live])
        ok = torch.isfinite(self.scratch.sum())
        if grad_norm is not None:
            ok = ok & torch.isfinite(grad_norm)
        newly_bad = self.healthy & ~ok
        self.first_bad_step.masked_fill_(newly_bad, int(step))
        self.healthy &= ok
        torch.where(self.healthy, self.scratch, self.flat, out=self.scratch)
        self.flat.lerp_(self.scratch, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged state dict with every entry cast back to the model's dtype."""
        out = {}
        views = dict(zip(self.float_names, self.views))
        for name, shape in zip(self.float_names, self.shapes):
            out[name] = views[name].view(shape).to(self.dtypes[name])
        out.update(self.other)
        return {name: out[name] for name in self.names}

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the averaged weights into `model` (strict)."""
        model.load_state_dict(self.state_dict(), strict=True)

    def is_healthy(self) -> bool:
        """Host read of the sticky flag (synchronises; use outside the hot loop)."""
        return bool(self.healthy.item())


class DeviceFlagPoller:
    """Reads a device bool without stalling the GPU queue: each `poll()` starts an async copy to
    pinned host memory and returns the value of the last copy that has completed (None before
    the first completes). On CPU it reads the flag directly."""

    def __init__(self, flag: torch.Tensor):
        self.flag = flag
        self.cuda = flag.device.type == "cuda"
        self.value: bool | None = None
        if self.cuda:
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.event = torch.cuda.Event()
            self.pending = False

    def poll(self) -> bool | None:
        if not self.cuda:
            self.value = bool(self.flag.item())
            return self.value
        if self.pending and self.event.query():
            self.value = bool(self.host.item())
            self.pending = False
        if not self.pending:
            self.host.copy_(self.flag, non_blocking=True)
            self.event.record()
            self.pending = True
        return self.value


# ----------------------------------------------------------------------------------------
# Warmup snapshot (SPEC 3.6)

@dataclass
class TrainingSnapshot:
    """Model weights (CPU copies), optimizer state dicts and RNG states at one moment."""

    model_state: dict
    optimizer_states: list
    cpu_rng: torch.Tensor
    cuda_rng: list | None

    @classmethod
    def capture(cls, model: torch.nn.Module, optimizers) -> "TrainingSnapshot":
        model_state = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
        optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(model_state, optimizer_states, torch.get_rng_state(), cuda_rng)

    def restore(self, model: torch.nn.Module, optimizers) -> None:
        """Put weights, optimizer states (momenta, steps, lr/momentum of every group) and RNG
        back exactly as captured, and clear gradients."""
        model.load_state_dict(self.model_state, strict=True)
        optimizer_list = list(optimizers)
        if len(optimizer_list) != len(self.optimizer_states):
            raise RuntimeError("optimizer count changed between snapshot and restore")
        for opt, state in zip(optimizer_list, self.optimizer_states):
            opt.load_state_dict(copy.deepcopy(state))
        for opt in optimizer_list:
            opt.zero_grad(set_to_none=True)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


# ----------------------------------------------------------------------------------------
# Step timing

class StepTimer:
    """Wall time of every training step without host syncs.

    On CUDA each `step_done()` records an event; a step lasts from the previous step's event
    (or the last `resume()`, called after anything that is not training, e.g. validation) to
    its own. On CPU the same with perf_counter. `durations_ms()` resolves them at the end."""

    def __init__(self, device: torch.device, earlier: list[tuple[float, bool]] | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.intervals: list[tuple[object, object, bool]] = []
        self.start = None
        # Resolved durations of the steps before a resume (from the checkpoint).
        self.earlier = list(earlier or [])

    def resume(self) -> None:
        self.start = dist.timing_mark(self.cuda)

    def step_done(self, looping: bool) -> None:
        end = dist.timing_mark(self.cuda)
        if self.start is not None:
            self.intervals.append((self.start, end, bool(looping)))
        self.start = end

    def durations_ms(self) -> list[tuple[float, bool]]:
        """[(milliseconds, looping)] per recorded step, in order (steps before a resume first)."""
        if self.cuda:
            torch.cuda.synchronize()
            return self.earlier + [(start.elapsed_time(end), loop) for start, end, loop in self.intervals]
        return self.earlier + [(1000.0 * (end - start), loop) for start, end, loop in self.intervals]


def steady_state_rate(durations: list[tuple[float, bool]], looping: bool, tokens_per_step: int,
                      skip: int = 3) -> tuple[float | None, int]:
    """(tokens/s, steps used) over the steps with the given looping flag, leaving out the first
    `skip` steps of that phase (allocator and cache warm-up after a start or a switch).

    rate = tokens_per_step * n / sum(step seconds). With fewer than skip+1 steps in the phase,
    every step of it is used; with none, (None, 0)."""
    phase = [ms for ms, loop in durations if loop == looping]
    if not phase:
        return None, 0
    used = phase[skip:] if len(phase) > skip else phase
    seconds = sum(used) / 1000.0
    if seconds <= 0:
        return None, 0
    return tokens_per_step * len(used) / seconds, len(used)


# ----------------------------------------------------------------------------------------
# The timed loop's state

# A logged train loss within this many nats of ln(vocab_size) counts as the uniform predictor's.
STALL_TOLERANCE_NATS = 0.01


@dataclass
class LossStall:
    """Watches the logged train losses for a run stuck at the uniform predictor:
    |loss - ln(vocab_size)| <= STALL_TOLERANCE_NATS on `steps` consecutive logged steps flags
    the run (steps <= 0 never does). `flagged_steps` is [first, last] step of the first such
    stretch, extended while it lasts; `streak_start`/`streak` track the current stretch."""

    steps: int
    uniform_loss: float
    streak_start: int | None = None
    streak: int = 0
    flagged_steps: list[int] | None = None

    def observe(self, step: int, loss: float) -> bool:
        """Record one logged loss; True exactly when this observation flags the run."""
        if not abs(loss - self.uniform_loss) <= STALL_TOLERANCE_NATS:  # NaN is not a stall
            self.streak_start, self.streak = None, 0
            return False
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        if self.steps <= 0 or self.streak < self.steps:
            return False
        if self.flagged_steps is None:
            self.flagged_steps = [self.streak_start, step]
            return True
        if self.flagged_steps[0] == self.streak_start:  # the flagged stretch goes on
            self.flagged_steps[1] = step
        return False


@dataclass
class LoopState:
    """Everything the timed loop (SPEC 3.5) carries from one step to the next; the checkpoint
    of a resumable run stores it whole.

    `training_ms` is the training clock: wall time of training steps only (validation,
    checkpoints and the compile warmup are outside it). `stop_after_step` is set at the step
    that crossed the wallclock budget; `diverged` is set in one place, `TimedLoop.record_health`."""

    step: int = 0
    training_ms: float = 0.0
    stop_after_step: int | None = None
    looping_step: int | None = None
    seq_change_step: int | None = None  # progressive context (#2014): step of the last length change
    diverged: bool = False
    live_val_loss: float | None = None
    live_val_bpb: float | None = None
    last_log_step: int = 0
    last_log_ms: float = 0.0
    resumed_from_step: int | None = None
    stall: LossStall = field(default_factory=lambda: LossStall(0, math.log(2)))

    def to_dict(self) -> dict:
        """Plain Python values (for the checkpoint)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoopState":
        """The state `to_dict` returned."""
        values = dict(data)
        values["stall"] = LossStall(**values["stall"])
        return cls(**values)
