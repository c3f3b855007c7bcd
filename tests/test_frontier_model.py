"""The frontier's model switches (parlm.model.gates, issue 17) against slow loop versions of
their PRs' formulas: SparseAttnGate (#1787), BOS-fixed SmearGate (#1851/#1855), AsymLogit
(#1923); plus what each switch adds to the state dict, the optimizer and the quantizer."""
from __future__ import annotations

import math

import pytest
import torch

from parlm.config import Config
from parlm.model.gates import BOS_TOKEN_ID, asymmetric_softcap, smear_previous_token
from parlm.model.gpt import GPT, build_model
from parlm.quant.artifact import pack, unpack
from parlm.quant.gptq import quantization_plan
from parlm.train.optim import Optimizers, split_parameters

SWITCHES = dict(sparse_attn_gate_enabled=True, smear_gate_enabled=True, asym_logit_rescale=True)


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def test_each_switch_adds_only_its_tensors(tiny_config):
    torch.manual_seed(0)
    base = set(GPT(tiny_config).state_dict())
    heads, window = tiny_config.num_heads, tiny_config.gate_window
    added = {
        "sparse_attn_gate_enabled": {f"blocks.{i}.attn.attn_gate_w": (heads, window)
                                     for i in range(tiny_config.num_layers)},
        "smear_gate_enabled": {"smear_gate.weight": (1, window), "smear_lambda": (1,)},
        "asym_logit_rescale": {"softcap_pos": (1,), "softcap_neg": (1,)},
    }
    for switch, tensors in added.items():
        state = GPT(tiny_config.replace(**{switch: True})).state_dict()
        assert {name: tuple(state[name].shape) for name in set(state) - base} == tensors
        assert base <= set(state)


def test_sparse_attn_gate_matches_a_loop_over_heads(tiny_config):
    """#1787: y_{t,h} <- sigmoid(scale * W_h . u_t[:w]) y_{t,h}, after XSA, before proj."""
    config = tiny_config.replace(sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, gate_window=5)
    torch.manual_seed(1)
    attention = GPT(config).blocks[0].attn
    with torch.no_grad():
        attention.attn_gate_w.normal_(0.0, 1.0)
    model = GPT(config)
    u = torch.randn(2, 6, config.model_dim)
    cos, sin = model.rotary(6, u.device)
    with torch.no_grad():
        q, k, v = attention.c_q(u), attention.c_k(u), attention.c_v(u)
        gated = attention.mix_heads(q, k, v, cos, sin, "math", u)
        weight, attention.attn_gate_w = attention.attn_gate_w.detach(), None
        ungated = attention.mix_heads(q, k, v, cos, sin, "math")
    head_dim = config.model_dim // config.num_heads
    expected = ungated.clone()
    for b in range(2):
        for t in range(6):
            for h in range(config.num_heads):
                dot = sum(float(weight[h, j]) * float(u[b, t, j]) for j in range(5))
                expected[b, t, h * head_dim:(h + 1) * head_dim] *= sigmoid(0.5 * dot)
    assert torch.allclose(gated, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(gated, ungated)


def slow_smear(x, ids, weight, smear_lambda, bos_id):
    """#1855's formula token by token: x'_t = x_t + lambda sigmoid(W . x_t[:w]) x_{t-1} unless
    token t is BOS; x'_0 = x_0."""
    out = x.clone()
    for b in range(x.size(0)):
        for t in range(1, x.size(1)):
            if int(ids[b, t]) == bos_id:
                continue
            dot = sum(float(weight[0, j]) * float(x[b, t, j]) for j in range(weight.size(1)))
            out[b, t] = x[b, t] + float(smear_lambda[0]) * sigmoid(dot) * x[b, t - 1]
    return out


def test_smear_gate_matches_a_loop_over_tokens():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 16, generator=generator)
    ids = torch.randint(2, 50, (2, 9), generator=generator)
    ids[0, 4] = ids[1, 0] = ids[1, 7] = BOS_TOKEN_ID
    weight, smear_lambda = torch.randn(1, 6, generator=generator), torch.tensor([0.7])
    fast = smear_previous_token(x, ids, weight, smear_lambda)
    assert torch.allclose(fast, slow_smear(x, ids, weight, smear_lambda, BOS_TOKEN_ID), atol=1e-6)


def test_nothing_of_the_previous_document_reaches_the_bos_token():
    """Perturbing document N changes nothing of the smeared embeddings from document N+1's BOS
    on; without the fix (no BOS id) the perturbation leaks into the BOS position."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 50, (1, 12), generator=generator)
    ids[0, 0], ids[0, 7] = BOS_TOKEN_ID, BOS_TOKEN_ID  # document N = 0..6, document N+1 = 7..
    embedding = torch.randn(50, 16, generator=generator)
    weight, smear_lambda = torch.randn(1, 12, generator=generator), torch.tensor([1.0])
    perturbed = ids.clone()
    perturbed[0, 1:7] = torch.randint(2, 50, (6,), generator=generator)
    assert not torch.equal(perturbed[0, 6], ids[0, 6])
    outputs = {}
    for name, bos_id in (("fixed", BOS_TOKEN_ID), ("unfixed", -1)):
        a = smear_previous_token(embedding[ids], ids, weight, smear_lambda, bos_id)
        b = smear_previous_token(embedding[perturbed], perturbed, weight, smear_lambda, bos_id)
        outputs[name] = (a, b)
    a, b = outputs["fixed"]
    assert torch.equal(a[0, 7:], b[0, 7:])
    a, b = outputs["unfixed"]
    assert not torch.allclose(a[0, 7], b[0, 7])


def test_model_smear_gate_starts_as_identity_and_learns(tiny_config):
    config = tiny_config.replace(smear_gate_enabled=True)
    torch.manual_seed(4)
    plain = GPT(tiny_config)
    torch.manual_seed(4)
    smeared = GPT(config)
    smeared.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    assert torch.equal(smeared(ids, ids), plain(ids, ids))  # lambda = 0, W = 0
    smeared(ids, ids).backward()
    assert smeared.smear_lambda.grad.abs().item() > 0


def test_asymmetric_softcap_matches_elementwise_formula():
    """#1923: z -> c_+ tanh(z/c_+) for z >= 0, c_- tanh(z/c_-) for z < 0."""
    z = torch.linspace(-80.0, 80.0, 41, dtype=torch.float64)
    cap_positive, cap_negative = torch.tensor(20.0, dtype=torch.float64), torch.tensor(35.0, dtype=torch.float64)
    fast = asymmetric_softcap(z, cap_positive, cap_negative)
    for value, got in zip(z.tolist(), fast.tolist()):
        cap = 20.0 if value >= 0 else 35.0
        assert got == pytest.approx(cap * math.tanh(value / cap), rel=1e-12, abs=1e-12)


def test_asym_logit_starts_as_the_symmetric_cap_and_trains_only_in_ttt(tiny_config):
    config = tiny_config.replace(asym_logit_rescale=True)
    torch.manual_seed(5)
    plain = GPT(tiny_config)
    torch.manual_seed(5)
    asymmetric = GPT(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(asymmetric.forward_logits(ids), plain.forward_logits(ids), atol=1e-6, rtol=0)
    # Training: no optimizer group holds the caps and they take no gradient (#1923).
    optimizers = Optimizers(config, asymmetric)
    grouped = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    assert id(asymmetric.softcap_pos) not in grouped and id(asymmetric.softcap_neg) not in grouped
    assert not asymmetric.softcap_pos.requires_grad
    # TTT sets requires_grad on every parameter: then both caps get a gradient.
    for p in asymmetric.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        asymmetric.tok_emb.weight.mul_(400.0)  # large logits of both signs, so both caps act
    asymmetric(ids, ids).backward()
    assert asymmetric.softcap_pos.grad.abs().item() > 0 and asymmetric.softcap_neg.grad.abs().item() > 0


def test_switch_tensors_are_scalar_group_fp32_and_fp16_passthrough(tiny_config):
    config = tiny_config.replace(**SWITCHES)
    model = build_model(config, "cpu")
    matrix, scalar = split_parameters(model, config.control_patterns)
    names = {id(p): name for name, p in model.named_parameters()}
    scalar_names = {names[id(p)] for p in scalar}
    assert {f"blocks.{i}.attn.attn_gate_w" for i in range(config.num_layers)} <= scalar_names
    assert {"smear_gate.weight", "smear_lambda"} <= scalar_names
    assert not any("gate_w" in names[id(p)] or "smear" in names[id(p)] for p in matrix)
    switch_names = [n for n in model.state_dict() if any(k in n for k in ("attn_gate_w", "smear", "softcap"))]
    for name, param in model.named_parameters():
        if name in switch_names:
            assert param.dtype == torch.float32, name
    # The reference's passthrough rule (numel <= 65,536 -> fp16) covers every switch tensor.
    state = {name: model.state_dict()[name] for name in switch_names}
    methods = quantization_plan(state, {}, Config().quant_passthrough_max_numel)
    assert set(methods.values()) == {"fp16"}
    # ... and survives the artifact's byte layout (fp16 round trip).
    weights, _ = unpack(pack({name: t.half() for name, t in state.items()}, methods)[0])
    for name, tensor in state.items():
        assert torch.equal(weights[name], tensor.half()), name


def test_every_switch_on_runs_a_training_step(tiny_config):
    config = tiny_config.replace(**SWITCHES, muon_newton_schulz_coefficients="polar_express", min_lr=0.1)
    config.validate()
    model = build_model(config, "cpu")
    optimizers = Optimizers(config, model)
    ids = torch.randint(0, config.vocab_size, (4, config.train_seq_len))
    ids[:, 0] = BOS_TOKEN_ID
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):  # the zero-initialised out-projections pass no gradient to the gates at first
        loss = model(ids, ids)
        loss.backward()
        optimizers.step()
        assert math.isfinite(loss.item())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "smear_lambda" in changed and "blocks.0.attn.attn_gate_w" in changed
    assert "softcap_pos" not in changed


@pytest.mark.slow
def test_model_with_every_switch_compiles_without_graph_breaks(tiny_config):
    """fullgraph=True, dynamic=False traces the switches (looped schedule: every block runs;
    dynamo with the eager backend)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = build_model(tiny_config.replace(**SWITCHES), "cpu")
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(12))
    ids[:, 5] = BOS_TOKEN_ID
    model.looping_active = True
    loss = compiled(ids, ids)
    loss.backward()
    assert torch.equal(loss, model(ids, ids))
    torch._dynamo.reset()
