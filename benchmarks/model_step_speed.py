"""Training-step throughput of parlm's model and optimizers alone (random tokens, no loader).

One step is SPEC 3.5 on one GPU: `micro_batches_per_step` micro-batches of
train_batch_tokens / micro_batches / train_seq_len sequences (48 x 2048 by default) through
the model compiled with fullgraph=True, dynamic=False under bf16 autocast, loss / micro
backward, global-norm clip 0.3, the three optimizers (MuonEq-R + 2 AdamW), and the fp32 EMA
of the state dict. Times `--steps` steps before looping and after (each after `--warmup`
compile steps) and reports tok/s and peak allocated memory, for each requested variant
(attention backend x fused projections). Acceptance on 1xH100 (issue 3): >= 850k tok/s
before looping, >= 680k after, peak <= 40.4 GiB.

    python benchmarks/model_step_speed.py [--steps 10] [--backends auto,flash] [--fused on,off]
        [--set key=value ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parlm.config import Config, parse_overrides  # noqa: E402
from parlm.model.gpt import build_model  # noqa: E402
from parlm.train.optim import Optimizers, muon_momentum  # noqa: E402
from parlm.train.loop import configure_cuda_math  # noqa: E402


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(config: Config, backend: str, fused: bool, steps: int, warmup: int, device,
                compile_model: bool = True) -> dict:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(config.replace(attention_backend=backend), device)
    model.fused_projections = fused
    compiled = torch.compile(model, dynamic=False, fullgraph=True) if compile_model else model
    optimizers = Optimizers(config, model)
    micro = config.grad_accum_steps(1)
    batch = config.train_batch_tokens // micro // config.train_seq_len
    generator = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (batch, config.train_seq_len + 1), generator=generator).to(device)
               for _ in range(micro)]
    ema = [t.detach().float().clone() for t in model.state_dict().values()]
    decay = config.ema_decay

    def train_step(step: int) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for tokens in batches:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = compiled(tokens[:, :-1], tokens[:, 1:])
            total += loss.detach()
            (loss / micro).backward()
        optimizers.set_schedule(1.0, muon_momentum(config, step))
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizers.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, [t.detach().float() for t in model.state_dict().values()], alpha=1 - decay)
        return total / micro

    result = {"backend": model.attention_backend, "fused_projections": fused,
              "tokens_per_step": micro * batch * config.train_seq_len}
    for phase, looping in (("before_loop", False), ("after_loop", True)):
        model.looping_active = looping
        start = time.perf_counter()
        for step in range(warmup):
            train_step(step)
        synchronize(device)
        result[f"{phase}_warmup_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        for step in range(steps):
            loss = train_step(warmup + step)
        synchronize(device)
        seconds = time.perf_counter() - start
        result[f"{phase}_ms_per_step"] = round(1000 * seconds / steps, 1)
        result[f"{phase}_tok_per_sec"] = round(steps * result["tokens_per_step"] / seconds)
        result[f"{phase}_loss"] = round(loss.item(), 4)
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) // 2 ** 20
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    del model, compiled, optimizers, ema
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backends", default="auto", help="comma-separated attention backends")
    parser.add_argument("--fused", default="on", help="comma-separated: on, off")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of a tiny --set config")
    parser.add_argument("--compile", default="on", choices=("on", "off"))
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: this benchmark needs a GPU (or --device cpu)", file=sys.stderr)
        return 2
    configure_cuda_math()
    config = Config().replace(**parse_overrides(args.overrides))
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    env = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps(env), flush=True)
    results = []
    for backend in args.backends.split(","):
        for fused in args.fused.split(","):
            record = run_variant(config, backend, fused == "on", args.steps, args.warmup, device,
                                 args.compile == "on")
            results.append(record)
            print(json.dumps(record), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
