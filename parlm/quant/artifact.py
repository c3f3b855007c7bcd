"""The compressed model artifact `final_model.int6.ptz`: packing, compression, and the way back
to a model (SPEC 4.5).

Quantised state: `weights` (name -> tensor: `<name>.q` int8 codes and `<name>.scale` fp16
row scales for GPTQ tensors, `<name>` itself for fp16/raw passthrough) and `methods`
(name -> "gptq (int6)", "gptq (int8)", "passthrough (float16)", "raw"), the reference's
{"w": ..., "m": ...} pair.

parlm's container replaces torch.save's zip archive (about 200 bytes of headers per tensor)
with one JSON header and the raw tensor bytes, in streams by tensor group:

    payload = u32 header length | header JSON | stream_0 | stream_1 | ...

Streams of 2-byte elements (fp16 scales and passthrough tensors) are stride-2 byte
shuffled, BSHF magic included, so high and low bytes form separate runs (the reference
shuffles its whole torch.save payload for this). Each stream is cut into chunks of at most
CHUNK_BYTES compressed independently (brotli quality 11, or lzma preset 6) on all CPU cores:

    file = b"PGQ1" | compressor byte | u32 chunk count | u32 chunk sizes | chunks

Chunk boundaries depend only on the payload, so the bytes do not depend on the core count.

Integrity: the quant stage records the file's size (`bytes_model`) and `artifact_sha256` in
quant.json. `verify_artifact` checks a run folder's file against that record (every stage that
reads the artifact, and the report, call it); `invalidate_stale_stages` is the resume hook that
makes the stages depending on a mismatched artifact run again. Every decode failure raises
ArtifactError naming the file.
"""
from __future__ import annotations

import json
import lzma
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from parlm.runlog import CHECKPOINT_NAME, file_sha256  # noqa: F401 (CHECKPOINT_NAME: the trained weights the artifact is made from)

ARTIFACT_NAME = "final_model.int6.ptz"
OVER_CAP_NAME = "final_model.int6.OVER_CAP.ptz"  # an artifact over the cap: never mistaken for valid
MAGIC = b"PGQ1"
SHUFFLE_MAGIC = b"BSHF"
CHUNK_BYTES = 1 << 20
COMPRESSORS = ("brotli", "lzma")
STREAMS = ("embedding", "attention", "mlp", "other", "scales", "passthrough", "corrections")
CORRECTION_MARKERS = (".lqer_", ".awq_")  # LQER factors and AWQ-lite columns (parlm.quant.lqer / awq)
TORCH_DTYPES = {str(t).split(".")[1]: t for t in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                                torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)}
QUANT_RESULT = "quant.json"


class ArtifactError(RuntimeError):
    """A model file that cannot be used: it does not decode, or it differs from what its stage
    recorded. str(error) is one line: '<path>: <fault>; <fix>'."""

    def __init__(self, path: str | os.PathLike, fault: str, fix: str):
        self.path, self.fault = Path(path), fault
        super().__init__(f"{path}: {fault}; {fix}")


def rebuild_fix(run_dir: str | os.PathLike) -> str:
    """How to remake a run folder's artifact from its final_model.pt."""
    run_dir = Path(run_dir)
    return (f"rebuild it: delete {run_dir / '.stages' / 'quant.done'} and resume the run with the same "
            f"--run-id (quant and the stages after it rerun), or run `python -m parlm.quant --run-dir "
            f"{run_dir}` and then the stages after it")


def retrain_fix(run_dir: str | os.PathLike) -> str:
    """How to remake a run folder's final_model.pt (and everything made from it)."""
    run_dir = Path(run_dir)
    return (f"retrain this seed: delete {run_dir / '.stages' / 'train.done'} and resume the run with "
            f"the same --run-id")


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """b"BSHF" + bytes([stride]) + data[0::stride] + data[1::stride] + ... (SPEC 4.5);
    data shorter than `stride` or stride <= 1 is returned unchanged."""
    if stride <= 1 or len(data) < stride:
        return data
    array = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(array[k::stride].tobytes() for k in range(stride))


def byte_unshuffle(data: bytes) -> bytes:
    """Inverse of `byte_shuffle`; data without the BSHF magic is returned unchanged."""
    if len(data) < 5 or data[:4] != SHUFFLE_MAGIC:
        return data
    stride = data[4]
    payload = np.frombuffer(data, dtype=np.uint8, offset=5)
    out = np.empty_like(payload)
    start = 0
    for k in range(stride):
        count = len(range(k, len(payload), stride))
        out[k::stride] = payload[start:start + count]
        start += count
    return out.tobytes()


def stream_of(key: str) -> str:
    """Group of one stored tensor: int8 codes of tok_emb / attention / MLP (or other) linears,
    fp16 scales, passthrough tensors, and the LQER / AWQ-lite correction tensors."""
    if any(marker in key for marker in CORRECTION_MARKERS):
        return "corrections"
    if key.endswith(".scale"):
        return "scales"
    if not key.endswith(".q"):
        return "passthrough"
    if key.startswith("tok_emb."):
        return "embedding"
    return "attention" if ".attn." in key else "mlp" if ".mlp." in key else "other"


def pack(weights: dict[str, torch.Tensor], methods: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Serialise the quantised state into the payload (layout in the module docstring).
    Returns (payload, raw bytes per stream); the same input always gives the same bytes."""
    streams: dict[str, list[bytes]] = {name: [] for name in STREAMS}
    entries = []
    for key, tensor in weights.items():
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        stream = stream_of(key)
        entries.append([key, str(tensor.dtype).split(".")[1], list(tensor.shape), stream])
        streams[stream].append(data)
    blobs, layout = [], []
    for name in STREAMS:
        raw = b"".join(streams[name])
        stride = 2 if name in ("scales", "passthrough") else 1
        blob = byte_shuffle(raw, stride)
        blobs.append(blob)
        layout.append([name, len(blob)])
    header = json.dumps({"tensors": entries, "methods": methods, "streams": layout},
                        sort_keys=True, separators=(",", ":")).encode()
    payload = struct.pack("<I", len(header)) + header + b"".join(blobs)
    return payload, {name: size for name, size in layout}


def unpack(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Inverse of `pack`: (weights, methods)."""
    (header_length,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + header_length])
    offset = 4 + header_length
    raw = {}
    for name, size in header["streams"]:
        raw[name] = byte_unshuffle(payload[offset:offset + size])
        offset += size
    positions = {name: 0 for name in raw}
    weights = {}
    for key, dtype_name, shape, stream in header["tensors"]:
        dtype = TORCH_DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        start = positions[stream]
        data = bytearray(raw[stream][start:start + count])
        positions[stream] = start + count
        weights[key] = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape) if count else \
            torch.empty(shape, dtype=dtype)
    return weights, header["methods"]


def _compress_one(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli

        return brotli.compress(data, quality=11)
    if compressor == "lzma":
        return lzma.compress(data, preset=6)
    raise ValueError(f"compressor={compressor!r} is not one of {COMPRESSORS}")


def _decompress_one(data: bytes, compressor: str) -> bytes:
    if compressor == "brotli":
        import brotli

        return brotli.decompress(data)
    return lzma.decompress(data)


def compress(payload: bytes, compressor: str = "brotli", workers: int | None = None,
             stream_sizes: dict[str, int] | None = None) -> tuple[bytes, dict[str, int]]:
    """Compress the payload into the artifact file bytes (module docstring).

    Chunks follow stream boundaries when `stream_sizes` (raw stream sizes from `pack`) is
    given, so the compressed size of every stream is known exactly; returns (file bytes,
    compressed bytes per stream with "header" for the header and container).
    compressor="per_group" writes the PGQ2 format of `parlm.quant.compression` instead."""
    if compressor == "per_group":
        from parlm.quant.compression import compress_per_group

        blob, sizes, _ = compress_per_group(payload, workers)
        return blob, sizes
    (header_length,) = struct.unpack_from("<I", payload)
    sections = [("header", 4 + header_length)] + list((stream_sizes or {"data": len(payload) - 4 - header_length}).items())
    chunks, owners, offset = [], [], 0
    for name, size in sections:
        for start in range(offset, offset + size, CHUNK_BYTES):
            chunks.append(payload[start:min(start + CHUNK_BYTES, offset + size)])
            owners.append(name)
        offset += size
    if offset != len(payload):
        raise ValueError(f"stream sizes cover {offset} of {len(payload)} payload bytes")
    workers = workers or min(len(chunks), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # brotli and lzma release the GIL
        compressed = list(pool.map(lambda chunk: _compress_one(chunk, compressor), chunks))
    head = MAGIC + bytes([COMPRESSORS.index(compressor)]) + struct.pack(f"<I{len(compressed)}I", len(compressed),
                                                                        *map(len, compressed))
    sizes = {name: 0 for name, _ in sections}
    sizes["header"] += len(head)
    for name, blob in zip(owners, compressed):
        sizes[name] += len(blob)
    return head + b"".join(compressed), sizes


def decompress(blob: bytes) -> bytes:
    """Artifact file bytes -> payload (inverse of `compress`, either format)."""
    if blob[:4] != MAGIC:
        # Imported only here: a submission script generated for another compressor lacks it.
        from parlm.quant.compression import PER_GROUP_MAGIC, decompress_per_group

        if blob[:4] == PER_GROUP_MAGIC:
            return decompress_per_group(blob)
        raise ValueError(f"not a parlm artifact (magic {blob[:4]!r}, expected {MAGIC!r})")
    if len(blob) < 9 or blob[4] >= len(COMPRESSORS):
        raise ValueError(f"not a parlm artifact ({len(blob)} bytes, compressor byte {blob[4:5]!r})")
    compressor = COMPRESSORS[blob[4]]
    (count,) = struct.unpack_from("<I", blob, 5)
    if len(blob) < 9 + 4 * count:
        raise ValueError(f"truncated: {len(blob)} bytes cannot hold the table of {count} chunk sizes")
    sizes = struct.unpack_from(f"<{count}I", blob, 9)
    if 9 + 4 * count + sum(sizes) != len(blob):
        raise ValueError(f"truncated or extended: the chunk table needs {9 + 4 * count + sum(sizes):,} "
                         f"bytes, the file has {len(blob):,}")
    offset, parts = 9 + 4 * count, []
    for size in sizes:
        parts.append(blob[offset:offset + size])
        offset += size
    with ThreadPoolExecutor(max_workers=max(1, min(count, os.cpu_count() or 1))) as pool:
        return b"".join(pool.map(lambda part: _decompress_one(part, compressor), parts))


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file makes the decoders raise (brotli's own error only when installed)."""
    errors: tuple[type[BaseException], ...] = (lzma.LZMAError, struct.error, ValueError, KeyError,
                                                IndexError, TypeError, RuntimeError)
    try:
        import brotli

        errors += (brotli.error,)
    except ImportError:
        pass
    return errors


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, methods) stored in an artifact file; ArtifactError naming the file when it does
    not decode (truncated, garbage, another format)."""
    path = Path(path)
    blob = path.read_bytes()
    try:
        return unpack(decompress(blob))
    except _decode_errors() as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArtifactError(path, f"cannot be decoded ({detail})", rebuild_fix(path.parent)) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a torch.save file (final_model.pt), tensors only; ArtifactError naming
    the file when it does not load (truncated zip, garbage pickle)."""
    import pickle
    import zipfile

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArtifactError(path, f"cannot be loaded ({detail})", retrain_fix(path.parent)) from None



def artifact_fault(run_dir: str | os.PathLike) -> tuple[Path, str] | None:
    """(file, fault) when the artifact quant.json records differs from the file on disk: missing,
    another size than `bytes_model`, or another sha256 than `artifact_sha256`. None when it
    matches, or when quant.json records no artifact (no quant stage ran, or a hand-written one)."""
    run_dir = Path(run_dir)
    record_path = run_dir / QUANT_RESULT
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return record_path, "is not valid JSON (truncated or replaced)"
    name, sha256 = record.get("artifact"), record.get("artifact_sha256")
    if not name or not sha256:
        return None
    path = run_dir / name
    if not path.is_file():
        return path, f"is missing (quant.json records {name})"
    size, recorded = path.stat().st_size, record.get("bytes_model")
    if recorded is not None and size != recorded:
        return path, f"has {size:,} bytes but quant.json records {recorded:,} (truncated or replaced)"
    if file_sha256(path) != sha256:
        return path, "sha256 does not match quant.json (corrupted or replaced)"
    return None


def verify_artifact(run_dir: str | os.PathLike) -> None:
    """Raise ArtifactError (file, fault, fix) unless the artifact matches quant.json's record
    (`artifact_fault`); a no-op for a run folder whose quant.json records none."""
    fault = artifact_fault(run_dir)
    if fault is not None:
        raise ArtifactError(fault[0], fault[1], rebuild_fix(run_dir))


def invalidate_stale_stages(run_dir: str | os.PathLike, stages: tuple[str, ...], quant: str = "quant") -> list[str]:
    """Resume hook; `stages` are the pipeline's stages in order. When `quant`'s marker is
    missing, or its artifact fails `artifact_fault`, the markers of the stages after it are
    stale (they used another artifact, or one now damaged): remove them, and quant's own for a
    damaged artifact, so they rerun. Other markers (not stages) written after the first removed
    one go too: parlm.run marks each notebook after the stage it ran, so they are the notebooks
    of those stages. Says so in one line on stderr; returns the removed marker names.

    With final_model.pt gone the artifact cannot be rebuilt: ArtifactError with the retrain fix."""
    from parlm import runlog

    run_dir = Path(run_dir)
    later = stages[stages.index(quant) + 1:]
    if not runlog.stage_done(run_dir, quant):
        stale = [s for s in later if runlog.stage_done(run_dir, s)]
        where, reason = run_dir / ".stages", f"the {quant} stage is not done"
    else:
        fault = artifact_fault(run_dir)
        if fault is None:
            return []
        if not (run_dir / CHECKPOINT_NAME).exists():
            raise ArtifactError(fault[0], f"{fault[1]}, and {CHECKPOINT_NAME}, which it is made from, is gone",
                                retrain_fix(run_dir))
        stale = [s for s in (quant, *later) if runlog.stage_done(run_dir, s)]
        where, reason = fault
    if not stale:
        return []
    markers = [runlog.stage_marker(run_dir, s) for s in stale]
    first = min(marker.stat().st_mtime_ns for marker in markers)
    markers += [m for m in sorted((run_dir / ".stages").glob("*.done"))
                if m.name.removesuffix(".done") not in stages and m.stat().st_mtime_ns >= first]
    for marker in markers:
        marker.unlink()
    removed = [m.name.removesuffix(".done") for m in markers]
    print(f"{where}: {reason}; stages {', '.join(stale)} are stale and will rerun (removed "
          f"{', '.join(removed)} from {run_dir / '.stages'})", file=sys.stderr, flush=True)
    return removed


def dequantize_state(weights: dict[str, torch.Tensor], methods: dict[str, str],
                     template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict with the template's dtypes: W = Q * s[:, None] computed in fp32 for GPTQ
    tensors (AWQ-lite columns with their own scales, plus the LQER low-rank correction where
    stored), fp16 passthrough cast back (SPEC 4.3: fp32 linears, bf16 embedding)."""
    state = {}
    for name, like in template.items():
        method = methods.get(name)
        if method is None:
            raise KeyError(f"the artifact has no tensor {name!r}; it was made for another model config")
        if method.startswith("gptq"):
            codes, scales = weights[name + ".q"], weights[name + ".scale"]
            value = codes.float() * scales.float().view(codes.shape[0], *[1] * (codes.ndim - 1))
            # Imported only for the tensors that have them: a submission script generated
            # with AWQ-lite or LQER off lacks their modules (parlm.submission.build).
            if "+awq" in method:
                from parlm.quant.awq import restore_protected_columns

                value = restore_protected_columns(name, value, weights)
            if "+lqer" in method:
                from parlm.quant.lqer import apply_correction

                value = apply_correction(name, value, weights)
        else:
            value = weights[name]
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"{name}: artifact shape {tuple(value.shape)} != model shape {tuple(like.shape)}")
        state[name] = value.to(like.dtype) if like.is_floating_point() else value
    return state


def load_quantized_model(config, path: str | os.PathLike, device: torch.device | str):
    """Rebuild the model from an artifact: `build_model(config, device)` (reference dtype
    layout), dequantised weights loaded strictly, looping on, eval mode."""
    from parlm.model.gpt import build_model

    weights, methods = read_artifact(path)
    model = build_model(config, device)
    template = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    try:
        state = dequantize_state(weights, methods, template)
    except (KeyError, ValueError, RuntimeError) as error:
        raise ArtifactError(path, f"does not fit this config's model ({str(error).strip(chr(39))})",
                            "evaluate it with the config.yaml of the run that made it") from None
    model.load_state_dict(state, strict=True)
    model.looping_active = True
    return model.eval()
