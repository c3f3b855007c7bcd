"""Where a training step's GPU time goes: torch.profiler over compiled default-config steps.

Runs the model + optimizers step of benchmarks/model_step_speed.py (random tokens), warms up,
then profiles `--steps` steps with looping off and on, and prints the top CUDA kernels by
total time plus the share of matmul / attention / other kernels.

    python benchmarks/profile_step.py [--steps 2] [--top 25] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from parlm.config import Config, parse_overrides  # noqa: E402
from parlm.model.gpt import build_model  # noqa: E402
from parlm.train.optim import Optimizers, muon_momentum  # noqa: E402
from parlm.train.loop import configure_cuda_math  # noqa: E402

from kernel_breakdown import categorize  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    configure_cuda_math()
    config = Config().replace(**parse_overrides(args.overrides))
    device = torch.device("cuda")
    model = build_model(config, device)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    optimizers = Optimizers(config, model)
    micro = config.grad_accum_steps(1)
    batch = config.train_batch_tokens // micro // config.train_seq_len
    tokens = [torch.randint(0, config.vocab_size, (batch, config.train_seq_len + 1), device=device)
              for _ in range(micro)]

    def step(index: int) -> None:
        for t in tokens:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(t[:, :-1], t[:, 1:])
            (loss / micro).backward()
        optimizers.set_schedule(1.0, muon_momentum(config, index))
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizers.step()

    for looping in (False, True):
        model.looping_active = looping
        for i in range(args.warmup):
            step(i)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(args.steps):
                step(i)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events)
        shares: dict[str, float] = {}
        for e in events:
            shares[categorize(e.key)] = shares.get(categorize(e.key), 0.0) + e.device_time_total
        print(f"\n=== looping={looping}: {total / 1e3 / args.steps:.1f} ms GPU time per step ===")
        for key, value in sorted(shares.items(), key=lambda kv: -kv[1]):
            print(f"  {key:40s} {100 * value / total:5.1f}%  {value / 1e3 / args.steps:8.1f} ms/step")
        for e in sorted(events, key=lambda e: -e.device_time_total)[: args.top]:
            print(f"  {e.device_time_total / 1e3 / args.steps:8.2f} ms/step  x{e.count // args.steps:<5d} {e.key[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
