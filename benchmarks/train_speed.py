"""Training throughput benchmark: steady-state tokens/s before and after depth recurrence turns
on, compile time and peak memory, for the default (record) config on the GPU(s) it runs on.

    python benchmarks/train_speed.py --out train_speed.json              # 1 GPU
    python benchmarks/train_speed.py --nproc 2 --out train_speed_2.json  # torchrun, 2 GPUs

It runs the real training step of `parlm.train.Trainer` (micro-steps, DDP, grad clip, the three
optimizers, the fp32 EMA update) on random-token shards in the challenge format that it writes
itself (speed does not depend on the text), so it needs no dataset or tokenizer:
`warmup_steps` plain + looped compile steps (timed separately), then `--steps-before` plain
and `--steps-after` looped steps at LR multiplier 1. Step times are CUDA events; the first
3 steps of each phase are left out of the steady-state rates.

For each phase it also prints model FLOPs per token (parlm.model.flops: block linears by shape
over the active block passes, causal attention, the tied head, Muon's Newton-Schulz amortized
over the step), the achieved TFLOP/s, MFU against the GPU's dense bf16 peak looked up by its
name, and where the step's time goes (`--profile-steps` steps under torch.profiler per phase:
matmul, attention, elementwise/norm, optimizer, communication, idle; benchmarks/kernel_breakdown.py).
`--device cpu` is a smoke mode for tests (tiny preset, CPU operators instead of kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from parlm import dist  # noqa: E402
from parlm.config import Config, parse_overrides  # noqa: E402
from parlm.model.flops import bf16_dense_peak_tflops, training_flops_per_token  # noqa: E402

from kernel_breakdown import CLASSES, time_breakdown  # noqa: E402

SKIP_STEPS = 3
REFERENCE = {"tok_per_sec_before_loop": "831k-848k", "tok_per_sec_after_loop": "< 677k (still falling at step 175)",
             "peak_memory_mib": 40423, "source": "ANCHORS.md: PR #1858 script, SDPA flash, 1x H100, torch 2.11"}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (processes under torchrun)")
    parser.add_argument("--out", default="train_speed.json", help="JSON result path")
    parser.add_argument("--steps-before", type=int, default=30, help="timed steps without looping")
    parser.add_argument("--steps-after", type=int, default=30, help="timed steps with looping")
    parser.add_argument("--warmup-steps", type=int, default=20, help="compile warmup steps per graph")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per phase (0: none)")
    parser.add_argument("--data-dir", default="/tmp/parlm_train_speed", help="where the random shards go")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=4_000_000)
    parser.add_argument("--preset", default=None, help="start from a preset instead of the defaults")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu: smoke test only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_random_shards(config: Config, shards: int, shard_tokens: int) -> None:
    """`shards` train shards of uniform random ids < vocab_size (skipped when present)."""
    from parlm.data.shards import write_shard

    folder = Path(config.datasets_dir)
    rng = np.random.default_rng(0)
    for index in range(shards):
        path = folder / f"fineweb_train_{index:06d}.bin"
        if not path.exists():
            write_shard(path, rng.integers(0, config.vocab_size, size=shard_tokens, dtype=np.uint16))


def run_worker(args: argparse.Namespace) -> dict:
    from parlm.train.loop import Trainer, configure_cuda_math, seed_everything
    from parlm.train.state import DeviceFlagPoller, ExponentialMovingAverage, StepTimer, steady_state_rate

    ctx = dist.init_distributed(args.device)
    base = Config.from_preset(args.preset) if args.preset else Config()
    overrides = parse_overrides(args.overrides)
    config = base.replace(data_dir=args.data_dir, dataset_name=f"synthetic_sp{base.vocab_size}",
                          tokenizer_path="unused", device=args.device, warmup_steps=args.warmup_steps,
                          **overrides)
    config.validate(ctx.world_size)
    if ctx.is_main:
        write_random_shards(config, max(args.shards, ctx.world_size), args.shard_tokens)
    dist.barrier()
    seed_everything(config.seed)
    if ctx.device.type == "cuda":
        configure_cuda_math()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    trainer = Trainer(config, ctx)
    dist.print0(f"device {ctx.device} x{ctx.world_size}, grad_accum {trainer.grad_accum_steps}, "
                f"attention {trainer.base_model.attention_backend}, compile {trainer.compiled}")
    compile_seconds = trainer.compile_warmup(lambda message: dist.print0(message))
    dist.print0(f"compile warmup: {compile_seconds:.1f}s")

    ema = ExponentialMovingAverage(trainer.base_model, config.ema_decay)
    poller = DeviceFlagPoller(ema.healthy)
    timer = StepTimer(ctx.device)
    trainer.model.train()
    timer.resume()
    step = 0
    started = time.perf_counter()
    for looping, count in ((False, args.steps_before), (True, args.steps_after)):
        trainer.set_looping(looping)
        for _ in range(count):
            trainer.phase = f"benchmark step {step + 1}"
            loss, grad_norm = trainer.step(step, 1.0)
            step += 1
            ema.update(step, grad_norm)
            poller.poll()
            timer.step_done(looping)
        dist.print0(f"{'looped' if looping else 'plain'} steps done, last loss {loss.item():.4f}")
    durations = timer.durations_ms()
    breakdown = {}
    for looping in (False, True):
        trainer.set_looping(looping)
        breakdown["after_loop" if looping else "before_loop"] = profile_phase(trainer, step, args.profile_steps)
        step += args.profile_steps
    timed_seconds = time.perf_counter() - started
    tokens = config.train_batch_tokens
    before, used_before = steady_state_rate(durations, False, tokens, SKIP_STEPS)
    after, used_after = steady_state_rate(durations, True, tokens, SKIP_STEPS)
    cuda = ctx.device.type == "cuda"
    peak = [torch.cuda.max_memory_allocated(ctx.device) / 2**20 if cuda else 0.0,
            torch.cuda.max_memory_reserved(ctx.device) / 2**20 if cuda else 0.0]
    peaks = torch.tensor(peak, dtype=torch.float64, device=ctx.device)
    dist.all_reduce_max(peaks)
    device_name = torch.cuda.get_device_name(ctx.device) if cuda else "cpu"
    muon_shapes = [tuple(p.shape) for group in trainer.optimizers.muon.param_groups for p in group["params"]]
    peak_tflops = bf16_dense_peak_tflops(device_name)
    flops = {}
    for key, looping, rate in (("before_loop", False, before), ("after_loop", True, after)):
        counted = training_flops_per_token(trainer.base_model, config.train_seq_len, tokens, muon_shapes,
                                           config.muon_backend_steps, looping=looping)
        achieved = counted.training * rate / ctx.world_size / 1e12 if rate else None
        flops[key] = {**counted.to_dict(), "achieved_tflops_per_gpu": achieved,
                      "mfu": achieved / peak_tflops if achieved and peak_tflops else None}
    result = {
        "device": device_name,
        "bf16_dense_peak_tflops": peak_tflops,
        "flops_per_token": flops,
        "time_breakdown_ms_per_step": breakdown,
        "world_size": ctx.world_size,
        "grad_accum_steps": trainer.grad_accum_steps,
        "attention_backend": trainer.base_model.attention_backend,
        "compile": trainer.compiled,
        "torch": torch.__version__,
        "train_batch_tokens": tokens,
        "compile_warmup_seconds": compile_seconds,
        "warmup_steps_per_graph": config.warmup_steps,
        "timed_seconds": timed_seconds,
        "tok_per_sec_before_loop": before,
        "tok_per_sec_after_loop": after,
        "tok_per_sec_per_gpu_before_loop": before / ctx.world_size if before else None,
        "tok_per_sec_per_gpu_after_loop": after / ctx.world_size if after else None,
        "ms_per_step_before_loop": tokens / before * 1000 if before else None,
        "ms_per_step_after_loop": tokens / after * 1000 if after else None,
        "steps_used": {"before_loop": used_before, "after_loop": used_after, "skipped_per_phase": SKIP_STEPS},
        "peak_memory_allocated_mib": float(peaks[0]),
        "peak_memory_reserved_mib": float(peaks[1]),
        "step_ms": [round(ms, 3) for ms, _ in durations],
        "reference_1xH100_sdpa": REFERENCE,
        "overrides": args.overrides,
    }
    if ctx.is_main:
        print_table(result)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


def profile_phase(trainer, first_step: int, steps: int) -> dict[str, float]:
    """Milliseconds per step by kernel class over `steps` profiled training steps."""
    if steps <= 0:
        return {}
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(trainer.device)
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        for index in range(steps):
            trainer.step(first_step + index, 1.0)
        if cuda:
            torch.cuda.synchronize(trainer.device)
        wall_ms = (time.perf_counter() - started) * 1e3
    return time_breakdown(profiler, wall_ms, steps)


def print_table(result: dict) -> None:
    def thousands(value):
        return "-" if value is None else f"{value / 1000:,.1f}k"

    world = result["world_size"]
    print(f"\ntraining speed: {result['device']} x{world}, attention {result['attention_backend']}, "
          f"torch {result['torch']}, compile warmup {result['compile_warmup_seconds']:.1f}s")
    print(f"{'phase':<16}{'steps':>6}{'ms/step':>10}{'tok/s':>12}{'tok/s/GPU':>12}")
    for phase, key in (("before looping", "before_loop"), ("after looping", "after_loop")):
        rate = result[f"tok_per_sec_{key}"]
        ms = result[f"ms_per_step_{key}"]
        print(f"{phase:<16}{result['steps_used'][key]:>6}{'-' if ms is None else f'{ms:.1f}':>10}"
              f"{thousands(rate):>12}{thousands(rate / world if rate else None):>12}")
    peak = result["bf16_dense_peak_tflops"]
    print(f"model FLOPs per training token (3 x forward + Newton-Schulz), dense bf16 peak "
          f"{'unknown' if peak is None else f'{peak:.1f} TFLOP/s'}")
    print(f"{'phase':<16}{'GFLOP/tok':>10}{'passes':>8}{'TFLOP/s/GPU':>13}{'MFU':>8}")
    for phase, key in (("before looping", "before_loop"), ("after looping", "after_loop")):
        flops = result["flops_per_token"][key]
        achieved, mfu = flops["achieved_tflops_per_gpu"], flops["mfu"]
        print(f"{phase:<16}{flops['training'] / 1e9:>10.3f}{flops['block_passes']:>8}"
              f"{'-' if achieved is None else f'{achieved:.1f}':>13}{'-' if mfu is None else f'{100 * mfu:.1f}%':>8}")
    breakdown = result["time_breakdown_ms_per_step"]
    if any(breakdown.values()):
        print("time per step by kernel class (ms): " + ", ".join(CLASSES))
        for phase, key in (("before looping", "before_loop"), ("after looping", "after_loop")):
            row = breakdown.get(key) or {}
            print(f"{phase:<16}" + "".join(f"{row.get(kind, 0.0):>10.1f}" for kind in CLASSES))
    print(f"peak memory allocated {result['peak_memory_allocated_mib']:,.0f} MiB, reserved "
          f"{result['peak_memory_reserved_mib']:,.0f} MiB (reference: 40,423 MiB allocated)")
    print("reference (1x H100, SDPA): 831k-848k tok/s before looping, < 677k after")


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.worker or dist.torchrun_environment() is not None or args.nproc <= 1:
        try:
            run_worker(args)
        finally:
            dist.cleanup()
        return 0
    forwarded = ["--steps-before", str(args.steps_before), "--steps-after", str(args.steps_after),
                 "--warmup-steps", str(args.warmup_steps), "--profile-steps", str(args.profile_steps),
                 "--data-dir", str(Path(args.data_dir).resolve()),
                 "--shards", str(args.shards), "--shard-tokens", str(args.shard_tokens),
                 "--device", args.device, "--out", str(Path(args.out).resolve()), "--worker"]
    if args.preset:
        forwarded += ["--preset", args.preset]
    for item in args.overrides:
        forwarded += ["--set", item]
    os.chdir(REPO_ROOT)  # `python -m benchmarks.train_speed` imports from the repo root
    dist.launch_torchrun("benchmarks.train_speed", forwarded, args.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
