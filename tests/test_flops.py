"""parlm.model.flops against torch's own FLOP counter (torch.utils.flop_counter) and hand counts."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from parlm.config import Config
from parlm.model.flops import bf16_dense_peak_tflops, newton_schulz_flops, training_flops_per_token
from parlm.model.gpt import build_model
from parlm.train.optim import split_parameters, zeropower_via_newtonschulz5


def counted_flops(function, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        function(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("looping", [False, True])
def test_linear_and_head_flops_match_torch_counter(looping):
    config = Config.from_preset("demo")
    model = build_model(config, "cpu")
    model.looping_active = looping
    seq_len = 64
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    # On CPU torch's counter sees the block linears and the head as aten.mm; attention runs
    # through SDPA, which it does not count there, so only linear + head are compared.
    measured = counted_flops(model.forward_logits, ids) / ids.numel()
    flops = training_flops_per_token(model, seq_len, 1, [], 5, looping=looping)
    assert flops.linear + flops.head == measured
    encoder, decoder = model.active_schedule()
    assert flops.block_passes == len(encoder) + len(decoder) == (9 if looping else 5)


def test_attention_flops_by_hand():
    """Causal attention over T positions: QK^T and PV each cost 2*H*D per (query, key) pair,
    and query t sees t keys: sum_t t = T(T+1)/2 pairs, i.e. (T+1)/2 keys per token."""
    config = Config.from_preset("demo")
    model = build_model(config, "cpu")
    seq_len = 64
    width = config.num_heads * (config.model_dim // config.num_heads)
    causal = training_flops_per_token(model, seq_len, 1, [], 5, looping=False)
    dense = training_flops_per_token(model, seq_len, 1, [], 5, looping=False, dense_attention=True)
    pairs = seq_len * (seq_len + 1) / 2
    assert causal.attention == 5 * 2 * 2 * width * pairs / seq_len
    # The dense count equals torch's counter on the explicit softmax(QK^T)V of one layer.
    q = torch.randn(1, config.num_heads, seq_len, width // config.num_heads)
    explicit = counted_flops(lambda: torch.softmax(q @ q.transpose(-1, -2), -1) @ q)
    assert dense.attention / 5 * seq_len == explicit


def test_newton_schulz_flops_match_torch_counter():
    matrix = torch.randn(48, 80)
    assert counted_flops(zeropower_via_newtonschulz5, matrix, 5) == newton_schulz_flops((48, 80), 5)
    assert counted_flops(zeropower_via_newtonschulz5, matrix.T.contiguous(), 5) == newton_schulz_flops((80, 48), 5)


def test_training_flops_amortize_the_optimizer_over_the_step():
    config = Config.from_preset("demo")
    model = build_model(config, "cpu")
    matrices, _ = split_parameters(model, config.control_patterns)
    shapes = [tuple(p.shape) for p in matrices]
    flops = training_flops_per_token(model, config.train_seq_len, config.train_batch_tokens, shapes, 5)
    expected = sum(newton_schulz_flops(shape, 5) for shape in shapes) / config.train_batch_tokens
    assert math.isclose(flops.newton_schulz, expected)
    assert flops.training == 3 * flops.forward + flops.newton_schulz


def test_peak_lookup_by_device_name():
    assert bf16_dense_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bf16_dense_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_dense_peak_tflops("NVIDIA H200") == 989.4
    assert bf16_dense_peak_tflops("cpu") is None


# ----------------------------------------------------------------------------------------
# benchmarks/kernel_breakdown.py on hand-made profiler events (the profiler itself is slow to
# start on a small CPU machine, and its event objects are plain attributes).
class FakeKernel:
    def __init__(self, name, duration_us):
        self.name, self.duration = name, duration_us


class FakeEvent:
    def __init__(self, name, parent=None, kernels=(), self_us=0.0):
        self.name, self.cpu_parent, self.kernels = name, parent, list(kernels)
        self.self_cpu_time_total, self.cpu_children = self_us, []
        if parent is not None:
            parent.cpu_children.append(self)


class FakeProfiler:
    def __init__(self, events):
        self._events = events

    def events(self):
        return self._events


def load_kernel_breakdown():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_breakdown.py"
    spec = importlib.util.spec_from_file_location("kernel_breakdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_breakdown_classes_device_kernels():
    breakdown = load_kernel_breakdown()
    step = FakeEvent("Optimizer.step#Muon.step")
    newton_schulz = FakeEvent("aten::mm", parent=FakeEvent("inner", parent=step),
                              kernels=[FakeKernel("sm90_xmma_gemm_bf16", 300.0)])
    events = [
        FakeEvent("aten::mm", kernels=[FakeKernel("nvjet_tst_128x256", 1000.0)]),
        FakeEvent("aten::_flash_attention_forward", kernels=[FakeKernel("flash_fwd_kernel", 500.0)]),
        FakeEvent("CompiledFunction", kernels=[FakeKernel("triton_red_fused_rms_norm_0", 200.0)]),
        FakeEvent("c10d::allreduce_", kernels=[FakeKernel("ncclDevKernel_AllReduce", 400.0)]),
        step, newton_schulz,
    ]
    result = breakdown.time_breakdown(FakeProfiler(events), wall_ms=5.0, steps=2)
    assert result == {"matmul": 0.5, "attention": 0.25, "elementwise/norm": 0.1, "optimizer": 0.15,
                      "communication": 0.2, "idle": (5.0 - 2.0) / 2}


def test_kernel_breakdown_falls_back_to_cpu_operators():
    breakdown = load_kernel_breakdown()
    step = FakeEvent("Optimizer.step#AdamW.step")
    events = [FakeEvent("aten::addmm", self_us=3000.0), FakeEvent("aten::add_", parent=step, self_us=1000.0),
              step, FakeEvent("aten::mul", self_us=500.0)]
    result = breakdown.time_breakdown(FakeProfiler(events), wall_ms=6.0, steps=1)
    assert result["matmul"] == 3.0 and result["optimizer"] == 1.0 and result["elementwise/norm"] == 0.5
    assert result["idle"] == 1.5
