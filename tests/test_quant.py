"""parlm.quant.gptq / parlm.quant.artifact / parlm.quant against independent computations: a slow
column-by-column GPTQ in float64, round-to-nearest, SPEC's SDClip formula, a hand-shuffled
byte string, Hessians from stored activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parlm.quant.artifact import (byte_shuffle, byte_unshuffle, compress, decompress, dequantize_state, pack,
                            read_artifact, unpack)
from parlm.quant.gptq import collect_hessians, gptq_quantize, gptq_quantize_state, sdclip_scales


# ----------------------------------------------------------------------------------------
# Independent references
def slow_gptq(weight: torch.Tensor, hessian: torch.Tensor, clip_sigmas: float, clip_range: int,
              damping: float = 0.01):
    """Textbook GPTQ in float64, one column at a time, no blocks: quantise column j, then
    spread its error over ALL later columns with row j of U (H^-1 = U^T U)."""
    weight, hessian = weight.double().clone(), hessian.double().clone()
    cols = weight.shape[1]
    scales = torch.tensor([np.float16(clip_sigmas * np.std(row, ddof=1) / clip_range)
                           for row in weight.numpy()], dtype=torch.float64)
    for i in range(cols):
        if hessian[i, i] == 0:
            hessian[i, i] = 1.0
            weight[:, i] = 0.0
    hessian += damping * torch.diagonal(hessian).mean() * torch.eye(cols, dtype=torch.float64)
    order = sorted(range(cols), key=lambda i: (-hessian[i, i].item(), i))
    work = weight[:, order].clone()
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian[order][:, order])).T  # H^-1 = L L^T, U = L^T
    codes = torch.zeros_like(work)
    for j in range(cols):
        q = torch.clamp(torch.round(work[:, j] / scales), -clip_range, clip_range)
        codes[:, j] = q
        error = (work[:, j] - q * scales) / upper[j, j]
        work[:, j + 1:] -= error[:, None] * upper[j, j + 1:][None, :]
    result = torch.zeros_like(codes)
    result[:, order] = codes
    return result.to(torch.int8), scales


def weighted_error(weight, codes, scales, hessian) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) in float64."""
    delta = weight.double() - codes.double() * scales.double()[:, None]
    return torch.trace(delta @ hessian.double() @ delta.T).item()


def correlated_problem(rows=24, cols=200, samples=3000, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=dtype)
    mixing = torch.randn(cols, cols, generator=generator, dtype=dtype) * 0.2
    inputs = torch.randn(samples, cols, generator=generator, dtype=dtype) @ mixing \
        + torch.randn(samples, cols, generator=generator, dtype=dtype)
    return weight, inputs.T @ inputs / samples


# ----------------------------------------------------------------------------------------
def test_byte_shuffle_hand_example():
    data = bytes([1, 2, 3, 4, 5, 6, 7])
    shuffled = byte_shuffle(data, 2)
    assert shuffled == b"BSHF" + bytes([2]) + bytes([1, 3, 5, 7]) + bytes([2, 4, 6])
    assert byte_unshuffle(shuffled) == data
    assert byte_shuffle(b"\x09", 2) == b"\x09"  # shorter than the stride: unchanged
    assert byte_unshuffle(b"no magic here") == b"no magic here"
    random = np.random.default_rng(0).integers(0, 256, 1001, dtype=np.uint8).tobytes()
    assert byte_unshuffle(byte_shuffle(random, 3)) == random


@pytest.mark.parametrize("clip_sigmas,clip_range", [(12.85, 31), (20.0, 127)])
def test_sdclip_scale_matches_spec_formula(clip_sigmas, clip_range):
    weight = torch.randn(257, 96, generator=torch.Generator().manual_seed(1)) * torch.rand(257, 1) * 0.1
    scales = sdclip_scales(weight, clip_sigmas, clip_range)
    assert scales.dtype == torch.float16
    expected = np.array([np.float16(clip_sigmas * np.std(row.astype(np.float64), ddof=1) / clip_range)
                         for row in weight.numpy()])
    got = scales.numpy()
    # fp32 vs float64 arithmetic may round differently at an fp16 boundary, at most one ulp
    assert (got == expected).mean() > 0.98
    assert np.all(np.abs(got.astype(np.float64) - expected) <= np.spacing(expected.astype(np.float16)))


def test_sdclip_degenerate_rows_are_defined():
    weight = torch.zeros(3, 8)
    weight[1] = 0.25  # constant row: std 0
    scales = sdclip_scales(weight, 12.85, 31)
    assert torch.all(scales > 0)
    codes, _ = gptq_quantize(weight, torch.eye(8), 12.85, 31)
    assert torch.all(codes[0] == 0)
    assert torch.allclose(codes[1].float() * scales[1].float(), weight[1], rtol=0.05)


def test_gptq_matches_slow_columnwise_float64():
    weight, hessian = correlated_problem()
    hessian[7, :] = 0
    hessian[:, 7] = 0  # a dead column
    codes, scales = gptq_quantize(weight, hessian, 12.85, 31, block_size=64)
    slow_codes, slow_scales = slow_gptq(weight, hessian, 12.85, 31)
    assert torch.equal(scales.double(), slow_scales)
    assert torch.equal(codes, slow_codes)
    assert torch.all(codes[:, 7] == 0)
    # fp32 (the production precision): the same codes except near rounding ties
    codes32, _ = gptq_quantize(weight.float(), hessian.float(), 12.85, 31)
    assert (codes32 == slow_codes).float().mean() > 0.99


def test_gptq_beats_round_to_nearest_in_hessian_weighted_error():
    weight, hessian = correlated_problem(seed=3)
    codes, scales = gptq_quantize(weight.float(), hessian.float(), 12.85, 31)
    nearest = torch.clamp(torch.round(weight / scales.double()[:, None]), -31, 31)
    gptq_error = weighted_error(weight, codes, scales, hessian)
    rtn_error = weighted_error(weight, nearest, scales, hessian)
    assert gptq_error < 0.8 * rtn_error
    assert codes.abs().max() <= 31


def test_batched_gptq_equals_one_at_a_time():
    problems = [correlated_problem(rows=8, cols=64, seed=s, dtype=torch.float64) for s in range(3)]
    weights = torch.stack([w for w, _ in problems])
    hessians = torch.stack([h for _, h in problems])
    codes, scales = gptq_quantize(weights, hessians, 20.0, 127, block_size=16)
    for index, (weight, hessian) in enumerate(problems):
        single_codes, single_scales = gptq_quantize(weight, hessian, 20.0, 127, block_size=16)
        assert torch.equal(codes[index], single_codes)
        assert torch.equal(scales[index], single_scales)


def test_state_quantization_stacks_shared_hessians(tiny_config):
    """Tensors sharing one Hessian object are stacked by rows; same result as separately."""
    config = tiny_config.replace(quant_passthrough_max_numel=16)
    generator = torch.Generator().manual_seed(4)
    _, hessian = correlated_problem(cols=32, seed=5, dtype=torch.float32)
    state = {"blocks.0.attn.c_q.weight": torch.randn(32, 32, generator=generator),
             "blocks.0.attn.c_k.weight": torch.randn(16, 32, generator=generator),
             "blocks.1.attn.c_q.weight": torch.randn(32, 32, generator=generator)}
    other = hessian * 2
    hessians = {"blocks.0.attn.c_q.weight": hessian, "blocks.0.attn.c_k.weight": hessian,
                "blocks.1.attn.c_q.weight": other}
    result = gptq_quantize_state(state, hessians, config, "cpu")
    for name, tensor in state.items():
        codes, scales = gptq_quantize(tensor, hessians[name], config.matrix_clip_sigmas, 31)
        assert torch.equal(result[name][0], codes), name
        assert torch.equal(result[name][1], scales), name


def _random_state():
    generator = torch.Generator().manual_seed(2)
    weights = {
        "tok_emb.weight.q": torch.randint(-127, 128, (64, 16), dtype=torch.int8, generator=generator),
        "tok_emb.weight.scale": torch.rand(64, generator=generator).half(),
        "blocks.0.attn.c_q.weight.q": torch.randint(-31, 32, (16, 16), dtype=torch.int8, generator=generator),
        "blocks.0.attn.c_q.weight.scale": torch.rand(16, generator=generator).half(),
        "blocks.0.mlp.fc.weight.q": torch.randint(-31, 32, (32, 16), dtype=torch.int8, generator=generator),
        "blocks.0.mlp.fc.weight.scale": torch.rand(32, generator=generator).half(),
        "blocks.0.attn_scale": torch.randn(16, generator=generator).half(),
        "skip_weights": torch.randn(2, 16, generator=generator).bfloat16(),
        "counter": torch.tensor([3, -5], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    methods = {"tok_emb.weight": "gptq (int8)", "blocks.0.attn.c_q.weight": "gptq (int6)",
               "blocks.0.mlp.fc.weight": "gptq (int6)", "blocks.0.attn_scale": "passthrough (float16)",
               "skip_weights": "passthrough (float16)", "counter": "raw", "empty": "passthrough (float16)"}
    return weights, methods


def test_pack_unpack_round_trip_is_exact():
    weights, methods = _random_state()
    payload, sizes = pack(weights, methods)
    restored, restored_methods = unpack(payload)
    assert restored_methods == methods
    assert list(restored) == list(weights)
    for name, tensor in weights.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
        assert torch.equal(restored[name].view(torch.uint8) if tensor.numel() else restored[name],
                           tensor.view(torch.uint8) if tensor.numel() else tensor)
    assert sizes["embedding"] == 64 * 16 and sizes["attention"] == 16 * 16


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_compression_deterministic_and_reversible(compressor, monkeypatch):
    import parlm.quant.artifact as artifact

    monkeypatch.setattr(artifact, "CHUNK_BYTES", 300)  # several chunks per stream
    weights, methods = _random_state()
    payload, raw_sizes = pack(weights, methods)
    first, sizes = compress(payload, compressor, stream_sizes=raw_sizes)
    second, _ = compress(payload, compressor, workers=1, stream_sizes=raw_sizes)
    assert first == second
    assert decompress(first) == payload
    assert sum(sizes.values()) == len(first)
    assert pack(weights, methods)[0] == payload


def test_dequantize_is_codes_times_scales():
    weights, methods = _random_state()
    template = {"tok_emb.weight": torch.zeros(64, 16, dtype=torch.bfloat16),
                "blocks.0.attn.c_q.weight": torch.zeros(16, 16), "blocks.0.attn_scale": torch.zeros(16)}
    state = dequantize_state(weights, methods, template)
    codes, scales = weights["blocks.0.attn.c_q.weight.q"], weights["blocks.0.attn.c_q.weight.scale"]
    expected = np.array(codes.numpy(), dtype=np.float32) * np.array(scales.float().numpy())[:, None]
    assert np.array_equal(state["blocks.0.attn.c_q.weight"].numpy(), expected)
    assert state["tok_emb.weight"].dtype == torch.bfloat16
    assert state["blocks.0.attn_scale"].dtype == torch.float32


def test_hessians_match_stored_activations(tiny_config):
    """Every Hessian equals (1/n) sum X^T X of the stored inputs of its linear (float64),
    looped blocks counted once per application; tok_emb's is the final-norm output's."""
    from parlm.model.gpt import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config, "cpu")
    for parameter in model.parameters():
        parameter.data.normal_(0.0, 0.05)
    model.looping_active = True
    model.eval()
    batches = [torch.randint(0, tiny_config.vocab_size, (3, 16)) for _ in range(3)]
    hessians = collect_hessians(model, batches, max_numel=256)

    stored: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_hook(
        lambda m, inputs, out, name=name: stored.setdefault(name, []).append(inputs[0].double().flatten(0, -2)))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight.numel() > 256
        and (".attn." in name or ".mlp." in name)]
    hidden = []
    with torch.no_grad():
        for batch in batches:
            hidden.append(model.forward_hidden(batch).double().flatten(0, -2))
    for handle in handles:
        handle.remove()
    assert set(hessians) == {name + ".weight" for name in stored} | {"tok_emb.weight"}
    applications = sum(1 for i in model.encoder_indices + model.decoder_indices if i == 1)
    assert len(stored["blocks.1.attn.c_q"]) == 3 * applications  # looped block, every pass
    for name, inputs in stored.items():
        x = torch.cat(inputs)
        reference = x.T @ x / 3
        assert torch.allclose(hessians[name + ".weight"].double(), reference, rtol=1e-4, atol=1e-5), name
    x = torch.cat(hidden)
    assert torch.allclose(hessians["tok_emb.weight"].double(), x.T @ x / 3, rtol=1e-4, atol=1e-5)
    # q/k/v read one tensor: one shared matrix
    assert hessians["blocks.0.attn.c_q.weight"] is hessians["blocks.0.attn.c_k.weight"]


# ----------------------------------------------------------------------------------------
# The stage on a run folder
def _fake_run(config, run_dir):
    from parlm.model.gpt import build_model

    torch.manual_seed(0)
    model = build_model(config, "cpu")
    for name, parameter in model.named_parameters():
        if parameter.ndim == 2:
            parameter.data.normal_(0.0, 0.05)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    torch.save(model.state_dict(), run_dir / "final_model.pt")
    return model


def test_quantize_run_writes_artifact_and_round_trips(tiny_dataset_config, tmp_path):
    from parlm.quant.stage import load_quantized_model, quantize_run
    from parlm.runlog import read_json

    config = tiny_dataset_config.replace(quant_passthrough_max_numel=256)
    run_dir = tmp_path / "seed_1337"
    model = _fake_run(config, run_dir)
    result = quantize_run(config, run_dir)
    quant = read_json(run_dir / "quant.json")
    artifact = run_dir / "final_model.int6.ptz"
    assert quant["bytes_model"] == artifact.stat().st_size == result["bytes_model"]
    script = run_dir / "submission_train_gpt.py"
    assert quant["bytes_code"] == script.stat().st_size
    assert quant["bytes_total"] == quant["bytes_model"] + quant["bytes_code"] and quant["fits_cap"]
    per_tensor = quant["per_tensor"]
    assert per_tensor["tok_emb.weight"]["method"] == "gptq (int8)"
    assert per_tensor["blocks.0.mlp.proj.weight"]["method"] == "gptq (int6)"
    assert per_tensor["blocks.0.attn_scale"]["method"] == "passthrough (float16)"
    assert 0 < per_tensor["blocks.0.mlp.proj.weight"]["rel_error"] < 0.3
    assert sum(quant["stream_bytes"].values()) == quant["bytes_model"]

    from parlm.quant.plots import quant_figures

    figures = quant_figures(run_dir, bpb={"prequant": 3.0, "quantized": 3.01})
    assert set(figures) == {"tensor_errors", "scales", "size_breakdown", "cap", "bpb"}
    assert all((run_dir / "plots" / f"quant_{name}.png").stat().st_size > 0 for name in figures)

    weights, methods = read_artifact(artifact)
    loaded = load_quantized_model(config, artifact, "cpu")
    assert loaded.looping_active
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if methods[name].startswith("gptq"):
            expected = weights[name + ".q"].float() * weights[name + ".scale"].float()[:, None]
            assert torch.equal(tensor, expected.to(tensor.dtype)), name
            assert abs(weights[name + ".q"]).max() <= (127 if name == "tok_emb.weight" else 31)
        elif tensor.is_floating_point():
            assert torch.equal(tensor, original[name].half().to(tensor.dtype)), name


def test_over_cap_fails_and_renames(tiny_dataset_config, tmp_path):
    from parlm.quant.stage import ArtifactTooLarge, quantize_run
    from parlm.runlog import read_json

    config = tiny_dataset_config.replace(quant_passthrough_max_numel=256, artifact_cap_bytes=5000)
    run_dir = tmp_path / "seed_1337"
    _fake_run(config, run_dir)
    (run_dir / "final_model.int6.ptz").write_bytes(b"stale result of an earlier attempt")
    with pytest.raises(ArtifactTooLarge) as caught:
        quantize_run(config, run_dir, code_bytes=1234)
    error = caught.value
    assert error.bytes_code == 1234 and error.cap == 5000
    assert error.bytes_total == error.bytes_model + 1234 > 5000
    message = str(error)
    assert f"{error.bytes_model:,}" in message and f"{error.bytes_total - 5000:,}" in message
    assert "--set artifact_cap_bytes=" in message  # says how to go on
    assert not (run_dir / "final_model.int6.ptz").exists()
    assert (run_dir / "final_model.int6.OVER_CAP.ptz").stat().st_size == error.bytes_model
    quant = read_json(run_dir / "quant.json")
    assert quant["fits_cap"] is False and quant["overshoot"] == error.bytes_total - 5000
