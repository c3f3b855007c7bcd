"""The frontier quantization switches (issue 17) against slow, obvious computations: MLP clip
(#1769), AWQ-lite (#1908), LQER (#1797), per-group compression (#1855 without lrzip), and the
quant stage with every switch on."""
from __future__ import annotations

import lzma
import zlib

import numpy as np
import pytest
import torch

from parlm.quant.awq import salient_column_groups
from parlm.quant.compression import (compress_per_group, decompress_per_group, rans_decode, rans_encode, unzigzag,
                                     zigzag)
from parlm.quant.gptq import clip_sigmas_of, gptq_quantize, gptq_quantize_state
from parlm.quant.lqer import correction, lqer_corrections, quantize_factors


def slow_mixed_gptq(weight, hessian, clip_sigmas, clip_range, protected_columns, protected_range, damping=0.01):
    """Textbook float64 GPTQ, one column at a time, where protected columns use their own
    step k*std/R_hi and range R_hi (fp16 steps, as SPEC 4.3 rounds them)."""
    weight, hessian = weight.double().clone(), hessian.double().clone()
    rows, cols = weight.shape
    std = [np.std(row, ddof=1) for row in weight.numpy()]
    low = torch.tensor([float(np.float16(clip_sigmas * s / clip_range)) for s in std], dtype=torch.float64)
    high = torch.tensor([float(np.float16(clip_sigmas * s / protected_range)) for s in std], dtype=torch.float64)
    hessian += damping * torch.diagonal(hessian).mean() * torch.eye(cols, dtype=torch.float64)
    order = sorted(range(cols), key=lambda i: (-hessian[i, i].item(), i))
    work = weight[:, order].clone()
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian[order][:, order])).T
    codes = torch.zeros_like(work)
    for j in range(cols):
        is_protected = order[j] in protected_columns
        step, limit = (high, protected_range) if is_protected else (low, clip_range)
        q = torch.clamp(torch.round(work[:, j] / step), -limit, limit)
        codes[:, j] = q
        error = (work[:, j] - q * step) / upper[j, j]
        work[:, j + 1:] -= error[:, None] * upper[j, j + 1:][None, :]
    result = torch.zeros_like(codes)
    result[:, order] = codes
    return result.to(torch.int8), low, high


def problem(rows=16, cols=96, samples=800, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    inputs = torch.randn(samples, cols, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, cols, dtype=torch.float64)
    return weight, inputs, inputs.T @ inputs / samples


def test_awq_protected_gptq_matches_slow_mixed_precision():
    weight, _, hessian = problem()
    columns = list(range(32, 48))
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    mask[:, columns] = True
    codes, scales, high = gptq_quantize(weight, hessian, 12.85, 31, block_size=32, protected=mask, protected_range=127)
    slow_codes, slow_low, slow_high = slow_mixed_gptq(weight, hessian, 12.85, 31, set(columns), 127)
    assert torch.equal(scales.double(), slow_low) and torch.equal(high.double(), slow_high)
    assert (codes != slow_codes).float().mean() < 0.01  # float rounding ties only
    others = [c for c in range(weight.shape[1]) if c not in columns]
    # the protected columns really use the finer int8 step (127/31 times finer)
    assert codes[:, columns].abs().float().mean() > 3 * codes[:, others].abs().float().mean()


def test_per_kind_clip_sigmas(tiny_config):
    config = tiny_config.replace(mlp_clip_sigmas=12.0, quant_passthrough_max_numel=256)
    assert clip_sigmas_of("blocks.0.mlp.fc.weight", config) == 12.0
    assert clip_sigmas_of("blocks.0.attn.c_q.weight", config) == config.matrix_clip_sigmas
    assert clip_sigmas_of("tok_emb.weight", config) == config.embed_clip_sigmas
    assert clip_sigmas_of("blocks.0.mlp.fc.weight", tiny_config) == tiny_config.matrix_clip_sigmas  # off by default
    assert clip_sigmas_of("blocks.0.attn.c_q.weight", config.replace(attn_clip_sigmas=13.0)) == 13.0
    weight, _, hessian = problem(rows=8, cols=64)
    state = {"blocks.0.mlp.fc.weight": weight.float()}
    codes, scales = gptq_quantize_state(state, {"blocks.0.mlp.fc.weight": hessian.float()}, config, "cpu")["blocks.0.mlp.fc.weight"]
    expected = torch.tensor([np.float16(12.0 * np.std(row, ddof=1) / 31) for row in weight.float().numpy()])
    assert torch.equal(scales, expected)


def test_awq_saliency_matches_hand_computation():
    weight_a, inputs_a, hessian_a = problem(rows=4, cols=8, samples=50, seed=1)
    weight_b, inputs_b, hessian_b = problem(rows=4, cols=8, samples=50, seed=2)
    inputs_b = inputs_b * 5  # tensor b meets larger activations
    hessian_b = inputs_b.T @ inputs_b / 50
    # H as collect_hessians stores it: sum over 2 batches of 25 rows, divided by 2
    state = {"a": weight_a, "b": weight_b}
    hessians = {"a": hessian_a * 25, "b": hessian_b * 25}
    chosen = salient_column_groups(state, hessians, {"a": 50, "b": 50}, 2, ["a", "b"], groups=2, group_size=2)
    scores = []
    for name, weight, inputs in (("a", weight_a, inputs_a), ("b", weight_b, inputs_b)):
        for group in range(4):
            total = 0.0
            for c in range(group * 2, group * 2 + 2):
                rms = (sum(float(x) ** 2 for x in inputs[:, c]) / 50) ** 0.5
                total += rms * sum(abs(float(w)) for w in weight[:, c]) / 4
            scores.append((total, name, group))
    best = sorted(scores, reverse=True)[:2]
    expected = {}
    for _, name, group in best:
        expected.setdefault(name, []).extend([group * 2, group * 2 + 1])
    assert {k: v.tolist() for k, v in chosen.items()} == {k: sorted(v) for k, v in expected.items()}


def test_lqer_factor_quantization_matches_elementwise_formula():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(10, 4, generator=generator), torch.randn(4, 32, generator=generator)
    parts = quantize_factors(a, b, group_size=16)
    a_scale = float(np.float16(float(a.abs().max()) / 1.5))
    for i in range(10):
        for j in range(4):
            assert parts[".lqer_a"][i, j] == min(max(round(float(a[i, j]) / a_scale), -2), 1)
    flat = b.reshape(-1).tolist()
    for g in range(len(flat) // 16):
        group = flat[g * 16:(g + 1) * 16]
        scale = float(np.float16(max(abs(x) for x in group) / 7.5))
        assert float(parts[".lqer_b_scale"][g]) == scale
        for k, x in enumerate(group):
            assert parts[".lqer_b"].reshape(-1)[g * 16 + k] == min(max(round(x / scale), -8), 7)
    restored = correction(parts)
    codes_a = parts[".lqer_a"].double() * a_scale
    codes_b = torch.tensor([float(parts[".lqer_b"].reshape(-1)[i]) * float(parts[".lqer_b_scale"][i // 16])
                            for i in range(len(flat))], dtype=torch.float64).reshape(4, 32)
    assert torch.allclose(restored.double(), codes_a @ codes_b, atol=1e-5)


def test_lqer_corrects_the_top_k_error_tensors_with_a_rank_r_svd():
    generator = torch.Generator().manual_seed(4)
    originals = {f"t{i}": torch.randn(24, 64, generator=generator) for i in range(4)}
    # dequantized = original minus a residual of known size and rank 2 (+ small noise)
    sizes = {"t0": 0.1, "t1": 3.0, "t2": 1.0, "t3": 2.0}
    dequantized = {}
    for name, weight in originals.items():
        residual = sizes[name] * torch.randn(24, 2, generator=generator) @ torch.randn(2, 64, generator=generator)
        dequantized[name] = weight - residual
    stored = lqer_corrections(originals, dequantized, top_k=2, rank=2, group_size=64)
    assert {key.split(".")[0] for key in stored} == {"t1", "t3"}
    for name in ("t1", "t3"):
        residual = (originals[name] - dequantized[name]).double().numpy()
        u, s, vh = np.linalg.svd(residual, full_matrices=False)
        best = u[:, :2] * s[:2] @ vh[:2]
        fixed = correction({suffix: stored[name + suffix] for suffix in (".lqer_a", ".lqer_a_scale", ".lqer_b", ".lqer_b_scale")})
        # the int2/int4 factors recover part of the rank-2 residual, never beyond the exact SVD
        before = np.linalg.norm(residual)
        after = np.linalg.norm(residual - fixed.double().numpy())
        assert np.linalg.norm(residual - best) <= after < before


def test_zigzag_hand_example_and_inverse():
    data = np.array([0, -1, 1, -2, 2, 127, -128], dtype=np.int8).tobytes()
    assert list(zigzag(data)) == [0, 1, 2, 3, 4, 254, 255]
    assert unzigzag(zigzag(data)) == data


@pytest.mark.parametrize("size", [0, 1, 5, 3000, 70000])
def test_rans_round_trip_and_reaches_the_order0_entropy(size):
    generator = np.random.default_rng(size)
    data = np.clip(np.round(generator.normal(0, 6, size)), -31, 31).astype(np.int8).tobytes()
    encoded = rans_encode(data)
    assert rans_decode(encoded) == data
    if size:
        counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
        probabilities = counts[counts > 0] / size
        entropy_bytes = size * float(-(probabilities * np.log2(probabilities)).sum()) / 8
        lanes = int.from_bytes(encoded[4:6], "little")
        overhead = 6 + 512 + 4 * lanes + 4 + 2 * lanes  # header, table, final states, last partial words
        assert len(encoded) <= entropy_bytes * 1.002 + overhead + 2
    assert rans_decode(rans_encode(bytes([7]) * 500)) == bytes([7]) * 500  # one symbol: M = f


def _demo_payload():
    """A demo-sized quantised state: int6-like codes of a tied embedding and MLP/attention
    linears, fp16 scales and passthrough, packed as the quant stage packs it."""
    from parlm.quant.artifact import pack

    generator = torch.Generator().manual_seed(5)
    weights, methods = {}, {}
    shapes = {"tok_emb.weight": (512, 64), "blocks.0.attn.c_q.weight": (64, 64),
              "blocks.0.mlp.fc.weight": (128, 64), "blocks.0.mlp.proj.weight": (64, 128)}
    for name, shape in shapes.items():
        limit = 127 if name.startswith("tok_emb") else 31
        codes = torch.clamp(torch.round(torch.randn(shape, generator=generator) * limit / 5), -limit, limit)
        codes[:, ::7] = torch.round(codes[:, ::7] / 4)  # columns of different spread, as real weights have
        weights[name + ".q"], weights[name + ".scale"] = codes.to(torch.int8), torch.rand(shape[0], generator=generator).half()
        methods[name] = "gptq (int6)"
    weights["blocks.0.attn_scale"] = torch.rand(64, generator=generator).half()
    methods["blocks.0.attn_scale"] = "passthrough (float16)"
    return pack(weights, methods)


def test_per_group_compression_round_trip_and_never_above_brotli11():
    import brotli

    from parlm.quant.artifact import compress, decompress

    payload, stream_sizes = _demo_payload()
    blob, sizes, choices = compress_per_group(payload, workers=2)
    assert decompress_per_group(blob) == payload
    assert decompress(blob) == payload  # the artifact reader dispatches on the magic
    offset = 4 + int.from_bytes(payload[:4], "little")
    for name, size in stream_sizes.items():
        group = payload[offset:offset + size]
        offset += size
        if group:
            assert sizes[name] <= len(brotli.compress(group, quality=11)), name
    plain, _ = compress(payload, "brotli", stream_sizes=stream_sizes)
    whole = len(brotli.compress(payload, quality=11))
    assert len(blob) < len(plain) and len(blob) < whole
    print(f"demo payload {len(payload):,} B: brotli-11 chunks {len(plain):,} B, brotli-11 whole {whole:,} B, "
          f"per-group {len(blob):,} B (saved {len(plain) - len(blob):,} B); choices {choices}; "
          f"lzma-9 whole {len(lzma.compress(payload, preset=9)):,} B, zlib-9 {len(zlib.compress(payload, 9)):,} B")


def test_quantize_run_with_every_switch_round_trips(tiny_dataset_config, tmp_path):
    from parlm.quant.artifact import read_artifact
    from parlm.quant.stage import load_quantized_model, quantize_run

    config = tiny_dataset_config.replace(quant_passthrough_max_numel=256, mlp_clip_sigmas=12.0, lqer_top_k=3,
                                         lqer_rank=4, lqer_group_size=64, awq_lite_groups=2, awq_lite_group_size=8,
                                         compressor="per_group")
    run_dir = tmp_path / "seed_1"
    torch.manual_seed(0)
    from parlm.model.gpt import build_model

    model = build_model(config, "cpu")
    for parameter in model.parameters():
        if parameter.ndim == 2:
            parameter.data.normal_(0.0, 0.05)
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.yaml")
    torch.save(model.state_dict(), run_dir / "final_model.pt")
    result = quantize_run(config, run_dir, code_bytes=1000, statistics=False)
    artifact = run_dir / "final_model.int6.ptz"
    assert result["bytes_model"] == artifact.stat().st_size and result["stream_bytes"]["corrections"] > 0
    weights, methods = read_artifact(artifact)
    assert sum("+lqer" in m for m in methods.values()) == 3
    assert 1 <= sum("+awq" in m for m in methods.values()) <= 2
    loaded = load_quantized_model(config, artifact, "cpu").state_dict()
    for name, method in methods.items():
        if not method.startswith("gptq"):
            continue
        codes, scales = weights[name + ".q"].float(), weights[name + ".scale"].float()
        expected = codes * scales[:, None]
        if name + ".awq_columns" in weights:
            for column in weights[name + ".awq_columns"].tolist():
                expected[:, column] = codes[:, column] * weights[name + ".awq_scale"].float()
        if name + ".lqer_a" in weights:
            expected = expected + correction({s: weights[name + s] for s in (".lqer_a", ".lqer_a_scale", ".lqer_b", ".lqer_b_scale")})
        assert torch.equal(loaded[name], expected.to(loaded[name].dtype)), name
