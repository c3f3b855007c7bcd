"""Per-group artifact compression without any system binary (`compressor: per_group`).

PR #1855 saved artifact bytes by compressing tensor groups separately with lrzip, a system
binary the self-contained-artifact rule rejects. This does the same with what PR #1858's
environment already has (Python's lzma and zlib, the brotli module, numpy): each stream of
`parlm.quant.artifact.pack` (one tensor kind: embedding / attention / MLP codes, scales,
passthrough, corrections) is compressed whole by the smallest of

    transform in {stored, zigzag, columns, columns+zigzag}   (the last three: 1-byte 2-D streams)
    codec     in {brotli-11, brotli-11 window 2^24, lzma-alone 9e (lc, lp, pb variants), zlib-9,
                  rans: a static order-0 range coder (`rans_encode`)}

where zigzag maps a signed code v to the unsigned 2v (v >= 0) or -2v - 1 (v < 0) and
columns stores each 2-D tensor of the stream transposed (column-major). Every transform is
tried with brotli-11; the other codecs run on the best transform. stored + brotli-11 is
always a candidate, so no group is ever larger than plain brotli-11 of its bytes.

    file = b"PGQ2" | u32 section count | per section: u8 codec, u8 transform, u32 size | sections

Section 0 is the payload header (length prefix + JSON, brotli-11), then one section per
stream in the header's order. The header gives the tensor shapes the inverse transform needs.
"""
from __future__ import annotations

import json
import lzma
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PER_GROUP_MAGIC = b"PGQ2"
CODECS = ("brotli", "brotli_w24", "lzma_lc0", "lzma_lc3", "lzma_lc1_lp0_pb0", "zlib", "rans")
TRANSFORMS = ("stored", "zigzag", "columns", "columns_zigzag")
ONE_BYTE_DTYPES = ("int8", "uint8", "bool")


def encode(data: bytes, codec: str) -> bytes:
    """`data` compressed by one codec of CODECS."""
    if codec.startswith("brotli"):
        import brotli

        return brotli.compress(data, quality=11, lgwin=24 if codec == "brotli_w24" else 22)
    if codec.startswith("lzma"):
        lc, lp, pb = {"lzma_lc0": (0, 0, 0), "lzma_lc3": (3, 0, 2), "lzma_lc1_lp0_pb0": (1, 0, 0)}[codec]
        # a dictionary no larger than the data (the preset's 64 MiB costs time, saves nothing)
        dict_size = min(1 << 26, max(1 << 16, 1 << (len(data) - 1).bit_length()))
        filters = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": lp, "pb": pb,
                    "dict_size": dict_size}]
        return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=filters)
    if codec == "zlib":
        return zlib.compress(data, 9)
    if codec == "rans":
        return rans_encode(data)
    raise ValueError(f"codec {codec!r} is not one of {CODECS}")


def decode(data: bytes, codec: str) -> bytes:
    """Inverse of `encode` (the lzma "alone" header carries lc/lp/pb)."""
    if codec.startswith("brotli"):
        import brotli

        return brotli.decompress(data)
    if codec == "rans":
        return rans_decode(data)
    return lzma.decompress(data) if codec.startswith("lzma") else zlib.decompress(data)


# ----------------------------------------------------------------------------------------
# Static order-0 rANS. GPTQ codes are close to independent draws from one distribution per
# tensor kind (row scales normalise every row), so their order-0 entropy is a bound that LZ
# coders (brotli, lzma) miss by a little; an entropy coder with the byte histogram reaches it.
RANS_PRECISION = 15  # frequencies sum to M = 2^15
RANS_LOW = 1 << 16  # states live in [2^16, 2^32); 16-bit words are moved at each renormalisation
RANS_MAX_LANES = 4096


def rans_frequencies(counts: np.ndarray) -> np.ndarray:
    """Byte counts -> frequencies f_s >= 1 for every present byte, summing to M = 2^15
    (rounded proportionally; the most frequent byte absorbs the rounding)."""
    total = 1 << RANS_PRECISION
    frequencies = np.where(counts > 0, np.maximum(1, np.round(counts * total / max(int(counts.sum()), 1))), 0).astype(np.int64)
    frequencies[np.argmax(counts)] += total - frequencies.sum()
    return frequencies


def rans_encode(data: bytes) -> bytes:
    """Interleaved static rANS over `lanes` streams (symbol i goes to lane i mod lanes):

        layout = u32 n | u16 lanes | 256 x u16 f_s | lanes x u32 final states | u32 words | u16 words

    Encoding symbol s with cumulative c_s turns state x into (x // f_s) * M + c_s + x mod f_s,
    after moving its low 16 bits out while x >= 2^(32 - 15) f_s; the decoder undoes it."""
    symbols = np.frombuffer(data, dtype=np.uint8)
    n = len(symbols)
    lanes = int(min(RANS_MAX_LANES, max(1, 1 << max(0, (n // 2048).bit_length() - 1))))
    counts = np.bincount(symbols, minlength=256)
    frequencies = rans_frequencies(counts)
    starts = np.concatenate([[0], np.cumsum(frequencies)[:-1]])
    steps = -(-n // lanes)
    padded = np.full(steps * lanes, np.argmax(counts), dtype=np.uint8)
    padded[:n] = symbols
    grid = padded.reshape(steps, lanes)
    state = np.full(lanes, RANS_LOW, dtype=np.uint64)
    chunks = []
    for step in range(steps - 1, -1, -1):
        row = grid[step]
        frequency = frequencies[row].astype(np.uint64)
        emit = state >= (frequency << np.uint64(32 - RANS_PRECISION))
        chunks.append((state[emit] & np.uint64(0xFFFF)).astype(np.uint16))
        state = np.where(emit, state >> np.uint64(16), state)
        state = (state // frequency << np.uint64(RANS_PRECISION)) + state % frequency + starts[row].astype(np.uint64)
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, dtype=np.uint16)
    return (struct.pack("<IH", n, lanes) + frequencies.astype("<u2").tobytes() + state.astype("<u4").tobytes()
            + struct.pack("<I", len(words)) + words.astype("<u2").tobytes())


def rans_decode(blob: bytes) -> bytes:
    """Inverse of `rans_encode`: per step, s = symbol of slot x mod M, x = f_s (x >> 15) +
    slot - c_s, then x = (x << 16) | next word for the lanes where x < 2^16."""
    n, lanes = struct.unpack_from("<IH", blob)
    frequencies = np.frombuffer(blob, dtype="<u2", count=256, offset=6).astype(np.int64)
    state = np.frombuffer(blob, dtype="<u4", count=lanes, offset=518).astype(np.uint64)
    (count,) = struct.unpack_from("<I", blob, 518 + 4 * lanes)
    words = np.frombuffer(blob, dtype="<u2", count=count, offset=522 + 4 * lanes).astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(frequencies)[:-1]])
    slot_symbol = np.repeat(np.arange(256, dtype=np.uint8), frequencies)
    steps = -(-n // lanes)
    out = np.empty((steps, lanes), dtype=np.uint8)
    mask, pointer = np.uint64((1 << RANS_PRECISION) - 1), 0
    for step in range(steps):
        slot = state & mask
        row = slot_symbol[slot]
        out[step] = row
        state = frequencies[row].astype(np.uint64) * (state >> np.uint64(RANS_PRECISION)) + slot - starts[row].astype(np.uint64)
        low = state < RANS_LOW
        taken = int(low.sum())
        state[low] = (state[low] << np.uint64(16)) | words[pointer:pointer + taken]
        pointer += taken
    return out.reshape(-1)[:n].tobytes()


def zigzag(data: bytes) -> bytes:
    """Signed bytes v -> (v << 1) ^ (v >> 7) as unsigned: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    value = np.frombuffer(data, dtype=np.int8).astype(np.int16)
    return ((value << 1) ^ (value >> 7)).astype(np.uint8).tobytes()


def unzigzag(data: bytes) -> bytes:
    """Inverse of `zigzag`: z -> (z >> 1) ^ -(z & 1)."""
    value = np.frombuffer(data, dtype=np.uint8).astype(np.int16)
    return ((value >> 1) ^ -(value & 1)).astype(np.int8).tobytes()


def transpose_tensors(data: bytes, shapes: list[list[int]], inverse: bool = False) -> bytes:
    """Each 1-byte 2-D tensor of a stream stored column-major (or back, `inverse`)."""
    parts, offset = [], 0
    for rows, cols in shapes:
        block = np.frombuffer(data, dtype=np.uint8, count=rows * cols, offset=offset)
        parts.append((block.reshape(cols, rows).T if inverse else block.reshape(rows, cols).T).tobytes())
        offset += rows * cols
    return b"".join(parts)


def apply_transform(data: bytes, transform: str, shapes: list[list[int]]) -> bytes:
    if transform.startswith("columns"):
        data = transpose_tensors(data, shapes)
    return zigzag(data) if transform.endswith("zigzag") else data


def invert_transform(data: bytes, transform: str, shapes: list[list[int]]) -> bytes:
    if transform.endswith("zigzag"):
        data = unzigzag(data)
    return transpose_tensors(data, shapes, inverse=True) if transform.startswith("columns") else data


def stream_shapes(header: dict) -> dict[str, list[list[int]] | None]:
    """Stream -> shapes of its tensors when all are 1-byte 2-D (transposable), else None."""
    shapes: dict[str, list[list[int]] | None] = {name: [] for name, _ in header["streams"]}
    for _, dtype, shape, stream in header["tensors"]:
        if shapes.get(stream) is not None:
            shapes[stream] = shapes[stream] + [shape] if dtype in ONE_BYTE_DTYPES and len(shape) == 2 else None
    return shapes


def _parse_header(payload: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack_from("<I", payload)
    return 4 + length, json.loads(payload[4:4 + length])


def _best_encoding(data: bytes, shapes, pool) -> tuple[int, int, bytes]:
    """(codec index, transform index, bytes) of the smallest candidate (module docstring)."""
    transforms = list(TRANSFORMS) if shapes else ["stored"]
    first = dict(zip(transforms, pool.map(lambda t: encode(apply_transform(data, t, shapes), "brotli"), transforms)))
    best = min(transforms, key=lambda t: (len(first[t]), TRANSFORMS.index(t)))
    transformed = apply_transform(data, best, shapes)
    others = [codec for codec in CODECS if codec != "brotli"]
    results = dict(zip(others, pool.map(lambda codec: encode(transformed, codec), others)))
    results["brotli"] = first[best]
    codec = min(CODECS, key=lambda c: (len(results[c]), CODECS.index(c)))
    return CODECS.index(codec), TRANSFORMS.index(best), results[codec]


def compress_per_group(payload: bytes, workers: int | None = None) -> tuple[bytes, dict[str, int], dict[str, str]]:
    """Payload -> (file bytes, compressed bytes per section with "header" including the
    container, chosen "codec+transform" per stream)."""
    import brotli

    header_end, header = _parse_header(payload)
    shapes = stream_shapes(header)
    sections = [("header", payload[:header_end])]
    offset = header_end
    for name, size in header["streams"]:
        sections.append((name, payload[offset:offset + size]))
        offset += size
    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        encoded = [(0, 0, brotli.compress(sections[0][1], quality=11))]
        encoded += [_best_encoding(data, shapes[name], pool) if data else (0, 0, b"") for name, data in sections[1:]]
    table = b"".join(struct.pack("<BBI", codec, transform, len(data)) for codec, transform, data in encoded)
    head = PER_GROUP_MAGIC + struct.pack("<I", len(encoded)) + table
    sizes = {name: len(data) for (name, _), (_, _, data) in zip(sections, encoded)}
    sizes["header"] += len(head)
    choices = {name: f"{CODECS[codec]}+{TRANSFORMS[transform]}"
               for (name, _), (codec, transform, _) in zip(sections[1:], encoded[1:])}
    return head + b"".join(data for _, _, data in encoded), sizes, choices


def decompress_per_group(blob: bytes) -> bytes:
    """File bytes of `compress_per_group` -> payload."""
    if blob[:4] != PER_GROUP_MAGIC:
        raise ValueError(f"not a per-group parlm artifact (magic {blob[:4]!r}, expected {PER_GROUP_MAGIC!r})")
    (count,) = struct.unpack_from("<I", blob, 4)
    entries = [struct.unpack_from("<BBI", blob, 8 + 6 * index) for index in range(count)]
    offset, sections = 8 + 6 * count, []
    for codec, transform, size in entries:
        sections.append((codec, transform, blob[offset:offset + size]))
        offset += size
    header_bytes = decode(sections[0][2], CODECS[sections[0][0]])
    _, header = _parse_header(header_bytes)
    shapes = stream_shapes(header)
    names = [name for name, _ in header["streams"]]

    def restore(item):
        name, (codec, transform, data) = item
        return invert_transform(decode(data, CODECS[codec]), TRANSFORMS[transform], shapes[name]) if data else b""

    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        return header_bytes + b"".join(pool.map(restore, zip(names, sections[1:])))
