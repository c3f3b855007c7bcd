"""Speed of sliding-window and score-first TTT evaluation: parlm vs a straightforward
reference-semantics implementation, timed in the same process on the same GPU.

    python benchmarks/eval_speed.py                       # random-init proxy model, random tokens
    python benchmarks/eval_speed.py --run-dir runs/proxy/seed_42   # a run's artifact + val data

The reference-semantics side follows SPEC 5.2/5.3 the way the PR script does it (with SDPA
FlashAttention unless --reference-attention same, as in the ANCHORS.md reference run): a Python
loop over windows building zero-padded batches of 32 windows, the compiled `forward_logits`
over all 2048 positions, fp32 cross-entropy over every position, per-window accumulation of
the scored tail, and eager TTT training steps. parlm's side is `parlm.eval.eval_val_sliding`
and `parlm.eval.ttt.eval_val_ttt`. Compile time is measured separately for both (first batch /
warm-up), so "seconds" is the steady-state scoring time and "seconds_with_compile" the sum.
Prints and writes a JSON report with the speedup ratios and BPB differences.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from parlm.config import Config, compile_enabled, parse_overrides
from parlm.dist import init_distributed
from parlm.dist import autocast_context, synchronize
from parlm.eval.scoring import WindowScorer, eval_val_sliding, window_starts
from parlm.eval.ttt import eval_val_ttt


def load_inputs(args):
    """(config, model factory, val tokens int32 [T+1], byte tables, description)."""
    from parlm.data.tokenizer import ByteTables

    if args.run_dir:
        run_dir = Path(args.run_dir)
        config = Config.load(run_dir / "config.yaml", parse_overrides(args.set))
    else:
        config = Config.from_preset(args.preset, parse_overrides(args.set))
    config = config.replace(device="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if args.run_dir and (Path(args.run_dir) / "final_model.int6.ptz").exists():
        from parlm.quant.stage import load_quantized_model

        artifact = Path(args.run_dir) / "final_model.int6.ptz"
        make_model = lambda: load_quantized_model(config, artifact, device)  # noqa: E731
        source = f"artifact {artifact}"
    else:
        from parlm.model.gpt import build_model

        def make_model():
            torch.manual_seed(0)
            model = build_model(config, device)
            with torch.no_grad():  # give the zero-initialised projections some signal
                for param in model.parameters():
                    if param.ndim == 2 and not param.abs().sum():
                        param.normal_(0, 0.02)
            model.looping_active = True
            return model.eval()
        source = "random-init model"
    try:
        from parlm.data.shards import load_validation_tokens

        tokens = load_validation_tokens(config.val_files, config.eval_seq_len, args.val_tokens)
        source += f", validation tokens from {config.val_files}"
    except (FileNotFoundError, ValueError) as exc:
        print(f"no validation shards ({exc}); using random tokens", file=sys.stderr)
        usable = (args.val_tokens // config.eval_seq_len) * config.eval_seq_len
        tokens = torch.randint(0, config.vocab_size, (usable + 1,), dtype=torch.int32,
                               generator=torch.Generator().manual_seed(0))
        source += ", random tokens"
    try:
        tables = ByteTables.from_tokenizer(config.resolved_tokenizer_path, config.vocab_size)
    except FileNotFoundError:
        tables = ByteTables(np.ones(config.vocab_size, np.int16), np.zeros(config.vocab_size, bool),
                            np.zeros(config.vocab_size, bool), [b"x"] * config.vocab_size)
        source += ", 1 byte per token"
    return config, make_model, tokens, tables, source


# ----------------------------------------------------------------------------------------
# Straightforward reference semantics (SPEC 5.2 / 5.3), written for timing comparison

class ReferenceSemantics:
    """Sliding/TTT scoring as the PR script structures it (see module docstring)."""

    def __init__(self, config: Config, model, tokens: torch.Tensor, tables, device, batch_seqs: int = 32):
        self.config, self.model, self.tokens, self.device = config, model, tokens, device
        self.batch_seqs = batch_seqs
        self.total = tokens.numel() - 1
        self.seq_len, self.stride = config.eval_seq_len, config.eval_stride
        self.context = self.seq_len - self.stride
        gpu = tables.to_torch(device)
        self.base, self.space, self.boundary = gpu.base_bytes, gpu.has_leading_space, gpu.is_boundary
        self.logits_fn = (torch.compile(model.forward_logits, dynamic=False, fullgraph=True)
                          if compile_enabled(config, device) else model.forward_logits)

    def score_windows(self, windows, sums):
        for bi in range(0, len(windows), self.batch_seqs):
            batch = windows[bi:bi + self.batch_seqs]
            x = torch.zeros(len(batch), self.seq_len, dtype=torch.int64, device=self.device)
            y = torch.zeros_like(x)
            lengths = []
            for i, ws in enumerate(batch):
                end = min(ws + self.seq_len, self.total)
                lengths.append(end - ws)
                piece = self.tokens[ws:end + 1].to(dtype=torch.int64, device=self.device)
                x[i, :end - ws], y[i, :end - ws] = piece[:-1], piece[1:]
            with autocast_context(self.device):
                logits = self.logits_fn(x)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1),
                                  reduction="none").reshape(len(batch), self.seq_len)
            for i, ws in enumerate(batch):
                first = 0 if ws == 0 else self.context
                sums[0] += nll[i, first:lengths[i]].to(torch.float64).sum()
                sums[1] += float(lengths[i] - first)
                target, prev = y[i, first:lengths[i]], x[i, first:lengths[i]]
                count = self.base[target].to(torch.float64)
                count += (self.space[target] & ~self.boundary[prev]).to(torch.float64)
                sums[2] += count.sum()

    def sliding(self) -> tuple[float, float]:
        windows = window_starts(self.total, self.seq_len, self.stride).tolist()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.model.eval()
        with torch.no_grad():
            self.score_windows(windows, sums)
        return bpb_of(sums)

    def ttt(self) -> tuple[float, float]:
        config, chunk = self.config, self.config.ttt_chunk_tokens
        windows = window_starts(self.total, self.seq_len, self.stride).tolist()
        num_chunks = (self.total + chunk - 1) // chunk
        chunk_windows = [[] for _ in range(num_chunks)]
        for ws in windows:
            first = ws if ws == 0 else ws + self.context
            chunk_windows[min(first // chunk, num_chunks - 1)].append(ws)
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=config.ttt_lr, momentum=config.ttt_momentum)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for ci in range(num_chunks):
            self.model.eval()
            with torch.no_grad():
                self.score_windows(chunk_windows[ci], sums)
            if ci == num_chunks - 1:
                continue
            start, end = ci * chunk, min((ci + 1) * chunk, self.total)
            lr = config.ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            n_seqs = (end - start) // self.seq_len
            self.model.train()
            for _ in range(config.ttt_epochs):
                for b in range(0, n_seqs, config.ttt_batch_seqs):
                    e = min(b + config.ttt_batch_seqs, n_seqs)
                    piece = self.tokens[start + b * self.seq_len: start + e * self.seq_len + 1].to(
                        device=self.device, dtype=torch.int64)
                    x, y = piece[:-1].view(-1, self.seq_len), piece[1:].view(-1, self.seq_len)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast_context(self.device):
                        loss = self.model(x, y)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, config.ttt_grad_clip_norm)
                    optimizer.step()
        self.model.eval()
        return bpb_of(sums)

    def batch_sizes(self, ttt: bool) -> set[int]:
        """Every batch shape the loops will meet (short last batches compile again)."""
        windows = window_starts(self.total, self.seq_len, self.stride)
        if not ttt:
            groups = [len(windows)]
        else:
            chunk = self.config.ttt_chunk_tokens
            first = np.where(windows == 0, 0, windows + self.context)
            groups = np.bincount(np.minimum(first // chunk, (self.total + chunk - 1) // chunk - 1)).tolist()
        sizes = {min(self.batch_seqs, n) for n in groups if n}
        return sizes | {n % self.batch_seqs for n in groups if n % self.batch_seqs}

    def compile_warmup(self, ttt: bool = False) -> None:
        """Compile forward_logits for every batch shape, outside the timed loop."""
        for size in sorted(self.batch_sizes(ttt)):
            x = torch.zeros(size, self.seq_len, dtype=torch.int64, device=self.device)
            with torch.no_grad(), autocast_context(self.device):
                self.logits_fn(x)
        synchronize(self.device)


def bpb_of(sums: torch.Tensor) -> tuple[float, float]:
    nll, tokens, nbytes = sums.tolist()
    return nll / tokens, nll / (math.log(2) * nbytes)


def timed(fn):
    synchronize(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    t0 = time.perf_counter()
    value = fn()
    synchronize(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    return value, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="run folder: its config.yaml, artifact and validation data")
    parser.add_argument("--preset", default="proxy", help="preset when no --run-dir (default proxy)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--val-tokens", type=int, default=1_046_528, help="validation tokens (0 = all)")
    parser.add_argument("--batch-seqs", default="", help="comma list of parlm window batch sizes to time "
                        "(default: the config's eval_batch_seqs)")
    parser.add_argument("--skip", default="", help="comma list among ref_sliding,ref_ttt,sliding,ttt")
    parser.add_argument("--reference-attention", default="flash",
                        help="attention backend of the reference-semantics side: 'flash' (SDPA "
                             "FlashAttention, as the ANCHORS.md reference run) or 'same' (parlm's choice)")
    parser.add_argument("--out", default="eval_speed.json", help="JSON report path")
    args = parser.parse_args()

    config, make_model, tokens, tables, source = load_inputs(args)
    ctx = init_distributed(config.device)
    device = ctx.device
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.batch_seqs.split(",") if s] or [config.eval_batch_seqs]
    report = {"source": source, "tokens": tokens.numel() - 1, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "config_overrides": args.set}
    def reference_model():
        model = make_model()
        if args.reference_attention != "same" and device.type == "cuda":
            from parlm.model.attention import select_backend

            model.attention_backend = select_backend(args.reference_attention, device)
        report["reference_attention_backend"] = model.attention_backend
        return model

    report["parlm_attention_backend"] = make_model().attention_backend
    print(json.dumps(report, indent=1), flush=True)

    def save():
        Path(args.out).write_text(json.dumps(report, indent=1))

    if "ref_sliding" not in skip:
        reference = ReferenceSemantics(config, reference_model(), tokens, tables, device)
        _, compile_seconds = timed(reference.compile_warmup)
        (loss, bpb), seconds = timed(reference.sliding)
        report["reference_sliding"] = dict(bpb=bpb, loss=loss, seconds=seconds, compile_seconds=compile_seconds,
                                           seconds_with_compile=seconds + compile_seconds)
        print("reference sliding", report["reference_sliding"], flush=True)
        del reference
        torch._dynamo.reset()
        save()
    if "sliding" not in skip:
        model = make_model()
        for size in sizes:
            scorer = WindowScorer(config, model, tokens, tables, device, batch_seqs=size)
            _, compile_seconds = timed(scorer.warmup)
            result = eval_val_sliding(config, model, tokens, tables, ctx, scorer=scorer)
            report[f"parlm_sliding_b{size}"] = dict(bpb=result.bpb, loss=result.loss, seconds=result.seconds,
                                                    compile_seconds=compile_seconds,
                                                    seconds_with_compile=result.seconds + compile_seconds)
            print(f"parlm sliding (batch {size})", report[f"parlm_sliding_b{size}"], flush=True)
            del scorer
            torch._dynamo.reset()
            save()
        del model
    if "ref_ttt" not in skip:
        reference = ReferenceSemantics(config, reference_model(), tokens, tables, device)
        _, compile_seconds = timed(lambda: reference.compile_warmup(ttt=True))
        (loss, bpb), seconds = timed(reference.ttt)
        report["reference_ttt"] = dict(bpb=bpb, loss=loss, seconds=seconds, compile_seconds=compile_seconds,
                                       seconds_with_compile=seconds + compile_seconds)
        print("reference ttt", report["reference_ttt"], flush=True)
        del reference
        torch._dynamo.reset()
        save()
    if "ttt" not in skip:
        for size in sizes:
            ttt_config = config.replace(eval_batch_seqs=size)
            result = eval_val_ttt(ttt_config, make_model(), tokens, tables, ctx)
            compile_seconds = result.extra["compile_seconds"]
            report[f"parlm_ttt_b{size}"] = dict(bpb=result.result.bpb, loss=result.result.loss,
                                                seconds=result.result.seconds, compile_seconds=compile_seconds,
                                                seconds_with_compile=result.result.seconds + compile_seconds,
                                                compile_train=bool(ttt_config.ttt_compile_train and
                                                                   compile_enabled(ttt_config, device)))
            print(f"parlm ttt (batch {size})", report[f"parlm_ttt_b{size}"], flush=True)
            torch._dynamo.reset()
            save()

    summary = {}
    for kind in ("sliding", "ttt"):
        ref = report.get(f"reference_{kind}")
        for key, ours in report.items():
            if ref and key.startswith(f"parlm_{kind}_b"):
                summary[key] = dict(
                    speedup=ref["seconds"] / ours["seconds"],
                    speedup_with_compile=ref["seconds_with_compile"] / ours["seconds_with_compile"],
                    bpb_difference=ours["bpb"] - ref["bpb"])
    report["summary"] = summary
    save()
    print(json.dumps({"summary": summary}, indent=1))


if __name__ == "__main__":
    main()
