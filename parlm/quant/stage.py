"""The quantization stage (SPEC 4): EMA checkpoint -> calibration Hessians -> GPTQ int6/int8
with SDClip -> packed, byte-shuffled, brotli-11 artifact, checked against the size cap.

    bytes_total = len(final_model.int6.ptz) + len(generated train_gpt.py) <= artifact_cap_bytes

The code counted is the generated single-file submission script (`parlm.submission.build`),
never a file of the package. A run over the cap keeps its artifact only as
`final_model.int6.OVER_CAP.ptz` and raises `ArtifactTooLarge`. The work runs once, in one
process (the reference computed it on every rank and used rank 0's; SPEC 8.5.6).

CLI: `python -m parlm.quant --run-dir DIR` (writes final_model.int6.ptz and quant.json).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from parlm import dist
from parlm.cli import stage_command
from parlm.quant.artifact import ARTIFACT_NAME, CHECKPOINT_NAME, OVER_CAP_NAME, ArtifactError, compress, load_checkpoint, load_quantized_model, pack  # noqa: F401 (re-export)
from parlm.config import ARTIFACT_CAP_BYTES
from parlm.quant.gptq import EMBEDDING_NAME, collect_hessians, gptq_quantize_state, quantization_plan
from parlm.runlog import RunLogger, atomic_write_bytes, read_json, write_json

CODE_NAME = "submission_train_gpt.py"


class ArtifactTooLarge(RuntimeError):
    """bytes_total = model + code bytes exceeds the cap; the artifact was renamed OVER_CAP."""

    def __init__(self, bytes_model: int, bytes_code: int, cap: int, path: Path):
        self.bytes_model, self.bytes_code, self.cap, self.path = bytes_model, bytes_code, cap, path
        self.bytes_total = bytes_model + bytes_code
        super().__init__(
            f"artifact too large: {bytes_model:,} model bytes + {bytes_code:,} code bytes = "
            f"{self.bytes_total:,} > cap {cap:,} by {self.bytes_total - cap:,} bytes; kept as {path}. "
            f"To go on with this model anyway, rerun with --set artifact_cap_bytes=<bytes> (the same "
            f"run id of parlm.run resumes without training again; the report still checks the "
            f"{ARTIFACT_CAP_BYTES:,}-byte limit)")


def calibration_batches(config, device: torch.device, world_size: int):
    """The first `gptq_calibration_batches` training micro-batches of rank 0 (inputs only),
    from a fresh loader over the training shards, as in training with `world_size` ranks."""
    from parlm.data.loader import ShuffledSequenceLoader

    loader = ShuffledSequenceLoader(config, 0, world_size, device)
    accumulation = config.grad_accum_steps(world_size)
    for _ in range(config.gptq_calibration_batches):
        inputs, _ = loader.next_batch(config.train_batch_tokens, accumulation)
        yield inputs


def quantize_state(config, state_dict: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                   device: torch.device, row_counts: dict[str, int] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, methods) in the reference's {"w", "m"} form (SPEC 4.4): GPTQ tensors as
    `<name>.q` int8 + `<name>.scale` fp16, small float tensors in fp16, others unchanged.
    With awq_lite_groups > 0 (PR #1908, needs `row_counts` from `collect_hessians`) the most
    salient column groups are coded at awq_lite_bits; with lqer_top_k > 0 (PR #1797) the
    largest-error tensors get LQER factors. Both add tensors to the weights (so to bytes_model)
    and "+awq" / "+lqer" to their method."""
    from parlm.quant.artifact import dequantize_state

    plan = quantization_plan(state_dict, hessians, config.quant_passthrough_max_numel)
    protected = None
    if config.awq_lite_groups > 0:
        from parlm.quant.awq import salient_column_groups

        candidates = [name for name, method in plan.items() if method == "gptq" and
                      (config.embed_bits if name == EMBEDDING_NAME else config.matrix_bits) < config.awq_lite_bits]
        protected = salient_column_groups(state_dict, hessians, row_counts or {}, config.gptq_calibration_batches,
                                          candidates, config.awq_lite_groups, config.awq_lite_group_size)
    quantized = gptq_quantize_state(state_dict, hessians, config, device, protected)
    weights, methods = {}, {}
    for name, tensor in state_dict.items():
        if plan[name] == "gptq":
            bits = config.embed_bits if name == EMBEDDING_NAME else config.matrix_bits
            weights[name + ".q"], weights[name + ".scale"] = quantized[name][:2]
            methods[name] = f"gptq (int{bits})"
            if protected and name in protected:
                weights[name + ".awq_columns"] = protected[name].to(torch.int32)
                weights[name + ".awq_scale"] = quantized[name][2]
                methods[name] += f"+awq (int{config.awq_lite_bits})"
        elif plan[name] == "fp16":
            weights[name], methods[name] = tensor.detach().cpu().to(torch.float16), "passthrough (float16)"
        else:
            weights[name], methods[name] = tensor.detach().cpu(), "raw"
    if config.lqer_top_k > 0:
        from parlm.quant.lqer import lqer_corrections

        gptq_names = [name for name, method in plan.items() if method == "gptq"]
        restored = dequantize_state(weights, methods, {name: state_dict[name].float() for name in gptq_names})
        corrections = lqer_corrections(state_dict, restored, config.lqer_top_k, config.lqer_rank,
                                       config.lqer_group_size)
        weights.update(corrections)
        for key in corrections:
            if key.endswith(".lqer_a"):
                methods[key[:-len(".lqer_a")]] += "+lqer"
    return weights, methods


def generated_code_bytes(config, run_dir: Path) -> tuple[int, str]:
    """Build the submission script of `config` from the installed package (it carries the
    modules of the switches `config` turns on and runs `config` by default), write it to
    `<run_dir>/submission_train_gpt.py` and return (its size in bytes, its sha256)."""
    # Imported here: the generated script itself does not carry its generator. The builder
    # reads package sources and imports no stage, so it ranks below the stages
    # (docs/architecture.md).
    from parlm.submission.build import build_submission_script, write_generated_file

    script = build_submission_script(config)
    write_generated_file(run_dir / CODE_NAME, script)
    return len(script), hashlib.sha256(script).hexdigest()


def load_trained_model(config, checkpoint: Path, device: torch.device):
    """(state dict of `checkpoint` on CPU, the model built from it on `device` in eval mode with
    looping on, as the artifact will be scored)."""
    from parlm.model.gpt import build_model

    state_dict = load_checkpoint(checkpoint)  # ArtifactError naming the file when damaged
    model = build_model(config, device)
    model.load_state_dict(state_dict, strict=True)
    model.looping_active = True
    model.eval()
    return state_dict, model


def calibration_hessians(config, model, state_dict: dict[str, torch.Tensor], device: torch.device,
                         world_size: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(the GPTQ Hessians H = X^T X of every tensor above the passthrough size, from the
    calibration batches, and the number of input rows each saw, which AWQ-lite's activation
    RMS needs); both empty when every tensor is small enough for fp16 passthrough."""
    from tqdm.auto import tqdm

    large = [name for name, tensor in state_dict.items()
             if tensor.is_floating_point() and tensor.numel() > config.quant_passthrough_max_numel]
    row_counts: dict[str, int] = {}
    if not large:
        return {}, row_counts
    with tqdm(total=config.gptq_calibration_batches, desc="hessians", leave=False) as bar:
        hessians = collect_hessians(model, calibration_batches(config, device, world_size),
                                    config.quant_passthrough_max_numel, progress=bar,
                                    embedding=EMBEDDING_NAME in large, row_counts=row_counts)
    return hessians, row_counts


def write_artifact(run_dir: Path, blob: bytes, fits: bool) -> Path:
    """Write the artifact atomically: as final_model.int6.ptz when it fits the cap (removing a
    stale over-cap copy), else only as final_model.int6.OVER_CAP.ptz. Returns its path."""
    path = run_dir / ARTIFACT_NAME
    atomic_write_bytes(path, blob)
    if not fits:
        os.replace(path, run_dir / OVER_CAP_NAME)
        return run_dir / OVER_CAP_NAME
    if (run_dir / OVER_CAP_NAME).exists():
        (run_dir / OVER_CAP_NAME).unlink()  # stale result of an earlier, larger attempt
    return path


def quantize_run(config, run_dir, code_bytes: int | None = None, statistics: bool = True) -> dict:
    """The quant stage on a run folder: reads final_model.pt, writes final_model.int6.ptz (or
    final_model.int6.OVER_CAP.ptz) and quant.json {bytes_model, bytes_code, bytes_total, cap,
    fits_cap, overshoot, hessian_seconds, gptq_seconds, compress_seconds, stream_bytes,
    per_tensor, ...}; raises ArtifactTooLarge after writing them when over the cap.

    `code_bytes` is the size of the code to count; by default the generated submission script
    is built and counted (the exported script passes its own size). `statistics` adds the
    per-tensor errors, scales and codes of `parlm.quant.stats` (the exported script skips
    them). One process does the work; under torchrun call it on rank 0 only."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint} not found; train first with "
                                f"`python -m parlm.train --run-dir {run_dir}`")
    logger = RunLogger(run_dir, "quant.log")
    launcher = dist.torchrun_environment()
    device = dist.resolve_device(config.device, launcher[2] if launcher else 0)
    train_info = read_json(run_dir / "train.json") if (run_dir / "train.json").exists() else {}
    world_size = int(train_info.get("world_size", 1))

    started = time.perf_counter()
    state_dict, model = load_trained_model(config, checkpoint, device)
    setup_seconds = time.perf_counter() - started

    started = time.perf_counter()
    hessians, row_counts = calibration_hessians(config, model, state_dict, device, world_size)
    dist.synchronize(device)
    hessian_seconds = time.perf_counter() - started
    del model
    distinct = len({id(h) for h in hessians.values()})
    logger.log(f"quant: {len(hessians)} Hessians ({distinct} distinct) from {config.gptq_calibration_batches} "
               f"batches in {hessian_seconds:.1f}s on {device}")

    started = time.perf_counter()
    weights, methods = quantize_state(config, state_dict, hessians, device, row_counts)
    dist.synchronize(device)
    gptq_seconds = time.perf_counter() - started
    logger.log(f"quant: GPTQ of {sum(m.startswith('gptq') for m in methods.values())} tensors in {gptq_seconds:.1f}s")

    started = time.perf_counter()
    payload, raw_sizes = pack(weights, methods)
    blob, stream_sizes = compress(payload, config.compressor, stream_sizes=raw_sizes)
    compress_seconds = time.perf_counter() - started

    if code_bytes is None:
        code_bytes, code_sha256 = generated_code_bytes(config, run_dir)
    else:
        code_sha256 = None
    bytes_model = len(blob)
    bytes_total = bytes_model + code_bytes
    fits = bytes_total <= config.artifact_cap_bytes
    path = write_artifact(run_dir, blob, fits)

    per_tensor = None
    if statistics:
        from parlm.quant.stats import tensor_statistics

        per_tensor = tensor_statistics(state_dict, weights, methods, hessians, device)
    result = {
        "bytes_model": bytes_model, "bytes_code": code_bytes, "bytes_total": bytes_total,
        "cap": config.artifact_cap_bytes, "fits_cap": fits, "overshoot": max(0, bytes_total - config.artifact_cap_bytes),
        "artifact": path.name, "artifact_sha256": hashlib.sha256(blob).hexdigest(), "code_sha256": code_sha256,
        "compressor": config.compressor, "payload_bytes": len(payload),
        "stream_raw_bytes": raw_sizes, "stream_bytes": stream_sizes,
        "setup_seconds": setup_seconds, "hessian_seconds": hessian_seconds, "gptq_seconds": gptq_seconds,
        "compress_seconds": compress_seconds, "device": str(device), "calibration_world_size": world_size,
        "num_hessians": len(hessians), "num_distinct_hessians": distinct, "per_tensor": per_tensor,
    }
    write_json(run_dir / "quant.json", result)
    logger.metric("quant", **{k: v for k, v in result.items() if k not in ("per_tensor", "stream_raw_bytes")})
    logger.log(f"quant: model {bytes_model:,} bytes ({config.compressor}) + code {code_bytes:,} bytes = "
               f"{bytes_total:,} bytes; cap {config.artifact_cap_bytes:,}: {'fits' if fits else 'OVER'} "
               f"(hessians {hessian_seconds:.1f}s, gptq {gptq_seconds:.1f}s, compress {compress_seconds:.1f}s)")
    if not fits:
        raise ArtifactTooLarge(bytes_model, code_bytes, config.artifact_cap_bytes, path)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m parlm.quant --run-dir DIR [--config|--preset|--set]` (parlm.cli)."""
    return stage_command(
        "python -m parlm.quant",
        "Quantize a training run folder: Hessians, GPTQ int6/int8, brotli artifact "
        "final_model.int6.ptz and quant.json (bytes_total against the cap).",
        quantize_run, argv, run_dir_help="run folder holding config.yaml and final_model.pt",
        user_errors=(ArtifactTooLarge, ArtifactError))
