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
"""
from __future__ import annotations

import json
import lzma
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from parlm.runlog import CHECKPOINT_NAME  # noqa: F401 (the trained weights the artifact is made from)

ARTIFACT_NAME = "final_model.int6.ptz"
OVER_CAP_NAME = "final_model.int6.OVER_CAP.ptz"  # an artifact over the cap: never mistaken for valid
MAGIC = b"PGQ1"
SHUFFLE_MAGIC = b"BSHF"
CHUNK_BYTES = 1 << 20
COMPRESSORS = ("brotli", "lzma")
STREAMS = ("embedding", "attention", "mlp", "other", "scales", "passthrough")
TORCH_DTYPES = {str(t).split(".")[1]: t for t in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                                torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)}


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
    fp16 scales, and passthrough tensors."""
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
    compressed bytes per stream with "header" for the header and container)."""
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
    """Artifact file bytes -> payload (inverse of `compress`)."""
    if blob[:4] != MAGIC:
        raise ValueError(f"not a parlm artifact (magic {blob[:4]!r}, expected {MAGIC!r})")
    compressor = COMPRESSORS[blob[4]]
    (count,) = struct.unpack_from("<I", blob, 5)
    sizes = struct.unpack_from(f"<{count}I", blob, 9)
    offset, parts = 9 + 4 * count, []
    for size in sizes:
        parts.append(blob[offset:offset + size])
        offset += size
    with ThreadPoolExecutor(max_workers=max(1, min(count, os.cpu_count() or 1))) as pool:
        return b"".join(pool.map(lambda part: _decompress_one(part, compressor), parts))


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, methods) stored in an artifact file."""
    return unpack(decompress(Path(path).read_bytes()))


def dequantize_state(weights: dict[str, torch.Tensor], methods: dict[str, str],
                     template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict with the template's dtypes: W = Q * s[:, None] computed in fp32 for GPTQ
    tensors, fp16 passthrough cast back (SPEC 4.3: fp32 linears, bf16 embedding)."""
    state = {}
    for name, like in template.items():
        method = methods.get(name)
        if method is None:
            raise KeyError(f"the artifact has no tensor {name!r}; it was made for another model config")
        if method.startswith("gptq"):
            codes, scales = weights[name + ".q"], weights[name + ".scale"]
            value = codes.float() * scales.float().view(codes.shape[0], *[1] * (codes.ndim - 1))
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
    model.load_state_dict(dequantize_state(weights, methods, template), strict=True)
    model.looping_active = True
    return model.eval()
