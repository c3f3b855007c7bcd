"""The training step of SPEC 3.5 (steps 1-4): `Trainer` holds the model (compiled and
DDP-wrapped when asked), its optimizers and the data stream, and runs one optimizer step over
the global batch, the compile warmup with its exact reset (SPEC 3.6) and the out-of-memory
translation. `parlm.train.loop.TimedLoop` drives it; so does `benchmarks/train_speed.py`.
"""
from __future__ import annotations

import contextlib
import time

import torch

from parlm import dist
from parlm.config import Config, compile_enabled
from parlm.data.loader import ShuffledSequenceLoader
from parlm.dist import autocast_context
from parlm.model.gpt import build_model
from parlm.train.optim import Optimizers, muon_momentum
from parlm.train.state import InsufficientMemoryError, TrainingSnapshot, is_out_of_memory

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
