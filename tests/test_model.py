"""parlm.model against SPEC 2: parameter count, schedules, skip pairing, dtype layout, init,
and the full forward pass against a slow float64 transcription of the SPEC formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from parlm.config import Config
from parlm.model.gpt import GPT, build_model, looped_schedule, skip_connections


def small_config(tiny_config: Config, **overrides) -> Config:
    """Tiny model with 2 of its 4 layers using XSA and exact (fp32) RoPE positions."""
    base = dict(xsa_last_n=2, rope_precision="float32")
    base.update(overrides)
    return tiny_config.replace(**base)


def randomize(model: GPT, seed: int = 0, std: float = 0.3) -> GPT:
    """Give every parameter (zero-initialised projections, gates, mixes too) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std + (1.0 if param.ndim == 1 else 0.0))
    return model


# ----------------------------------------------------------------------------------------
# Sizes and schedules
def test_parameter_count_matches_spec():
    with torch.device("meta"):
        model = GPT(Config())
    assert sum(p.numel() for p in model.parameters()) == 35_944_536
    per_block = 262_144 + 131_072 + 131_072 + 262_144 + 1_048_576 + 1_048_576 + 8 + 512 + 512 + 1_024
    assert sum(p.numel() for p in model.blocks[0].parameters()) == per_block == 2_885_640
    assert model.tok_emb.weight.numel() == 8192 * 512
    assert model.skip_weights.shape == model.skip_gates.shape == (8, 512)


def test_state_dict_uses_the_reference_names_and_shapes():
    """The reference's final_model.pt loads into parlm unchanged: SPEC 2.1 and 4.4 name the
    tensors (checked once against the reference module's own state_dict; parlm's quant and eval
    of the reference's weights in benchmarks/reference_cross_eval.sh rely on it)."""
    with torch.device("meta"):
        model = GPT(Config())
    expected = {"tok_emb.weight": (8192, 512), "skip_weights": (8, 512), "skip_gates": (8, 512)}
    for block in range(11):
        expected.update({
            f"blocks.{block}.attn.c_q.weight": (512, 512), f"blocks.{block}.attn.c_k.weight": (256, 512),
            f"blocks.{block}.attn.c_v.weight": (256, 512), f"blocks.{block}.attn.proj.weight": (512, 512),
            f"blocks.{block}.mlp.fc.weight": (2048, 512), f"blocks.{block}.mlp.proj.weight": (512, 2048),
            f"blocks.{block}.attn.q_gain": (8,), f"blocks.{block}.attn_scale": (512,),
            f"blocks.{block}.mlp_scale": (512,), f"blocks.{block}.resid_mix": (2, 512)})
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == expected


def test_default_schedules_are_the_spec_lists():
    with torch.device("meta"):
        model = GPT(Config())
    assert model.encoder_indices == [0, 1, 2, 3, 4, 5, 3, 4]
    assert model.decoder_indices == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert model.plain_encoder_indices == [0, 1, 2, 3, 4]
    assert model.plain_decoder_indices == [5, 6, 7, 8, 9, 10]
    assert model.num_skip_weights == 8
    assert model.active_schedule() == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    model.looping_active = True
    assert model.active_schedule() == (model.encoder_indices, model.decoder_indices)
    assert [b.parallel for b in model.blocks] == [False] * 7 + [True] * 4
    assert all(b.attn.use_xsa for b in model.blocks)
    assert [b.ln_scale_factor for b in model.blocks] == pytest.approx([1 / math.sqrt(i + 1) for i in range(11)])


def test_skip_pairing_looped_and_plain():
    encoder, decoder = looped_schedule(11, 2, 3, 5)
    pairs = skip_connections(encoder, decoder, 8)
    # SPEC 2.4: decoder steps 0..7 receive encoder applications 7..0 (blocks 4,3,5,4,3,2,1,0).
    assert [app for _, app in pairs] == [7, 6, 5, 4, 3, 2, 1, 0, None]
    assert [encoder[app] for _, app in pairs[:8]] == [4, 3, 5, 4, 3, 2, 1, 0]
    plain = skip_connections([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 8)
    assert [app for _, app in plain] == [4, 3, 2, 1, 0, None]
    assert looped_schedule(11, 0, 3, 5) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])


# ----------------------------------------------------------------------------------------
# Layout and init
def test_build_model_dtype_layout(tiny_config):
    model = build_model(tiny_config, "cpu")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}
    assert model.rope_cos.dtype == torch.bfloat16 and model.attention_backend == "math"
    assert "rope_cos" not in model.state_dict()  # non-persistent


def test_initialisation_statistics(tiny_config):
    config = tiny_config.replace(model_dim=128, embedding_dim=128, num_heads=2, num_kv_heads=1, rope_dims=16)
    torch.manual_seed(0)
    model = GPT(config)
    for block in model.blocks:
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            w = linear.weight.double()
            small, large = sorted(w.shape)
            gram = w @ w.T if w.shape[0] == small else w.T @ w
            assert torch.allclose(gram, torch.eye(small, dtype=torch.float64), atol=1e-5), linear
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
        assert torch.all(block.attn.q_gain == 5.25)
        assert torch.all(block.resid_mix[0] == 1) and torch.all(block.resid_mix[1] == 0)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.02)
    assert model.tok_emb.weight.mean().abs().item() < 1e-4
    assert torch.all(model.skip_weights == 1) and torch.all(model.skip_gates == 0)


# ----------------------------------------------------------------------------------------
# Building blocks against hand computations
def bf16(value: float) -> float:
    """`value` rounded to the nearest bf16 (via fp32)."""
    return float(torch.tensor(value, dtype=torch.float32).bfloat16())


INV_FREQ_16 = [10000.0 ** (-2 * i / 16) for i in range(8)]
INV_FREQ_16_BF16 = [bf16(f) for f in INV_FREQ_16]


def test_rope_tables_default_is_the_reference_cuda_arithmetic():
    """cos(fp32(t) * fp32(bf16(inv_freq))) rounded to bf16, exact positions; by hand."""
    cos, sin = rope_tables_for(2048, "reference_cuda")
    for position in (5, 256, 257, 1001, 2047):
        for i, f in enumerate(INV_FREQ_16_BF16):
            angle = float(torch.tensor(float(position)) * torch.tensor(f))  # one fp32 product
            assert cos[position, i].item() == bf16(math.cos(angle)), (position, i)
            assert sin[position, i].item() == bf16(math.sin(angle)), (position, i)
    assert not torch.equal(cos[257], cos[256])


def test_rope_tables_eager_variant_rounds_positions_and_angles():
    """SPEC 2.2's quirk: positions in bf16 (257 -> 256, 1001 -> 1000, 2047 -> 2048), the product
    of two bf16 numbers rounded to bf16, then cos."""
    cos, sin = rope_tables_for(2048, "reference_eager")
    inv_bf16 = torch.tensor(INV_FREQ_16).bfloat16()
    for position, rounded in ((5, 5), (256, 256), (257, 256), (1001, 1000), (2047, 2048)):
        assert bf16(float(position)) == rounded
        angle = torch.tensor(float(rounded)).bfloat16() * inv_bf16  # bf16 x bf16 -> bf16
        assert torch.equal(cos[position], angle.cos().float()), position
        assert torch.equal(sin[position], angle.sin().float()), position
    assert torch.equal(cos[257], cos[256])
    default, _ = rope_tables_for(2048, "reference_cuda")
    assert (cos[1001:] - default[1001:]).abs().max().item() > 0.5  # whole radians of phase error


def test_rope_tables_float32_are_exact():
    cos, _ = rope_tables_for(2048, "float32")
    for position in (5, 257, 2047):
        exact = torch.tensor([math.cos(position * f) for f in INV_FREQ_16])
        assert torch.allclose(cos[position], exact, atol=2e-4), position


def rope_tables_for(seq_len: int, precision: str):
    from parlm.model.gpt import rope_tables
    return rope_tables(seq_len, 16, 10000.0, 2048, precision)


def reference_style_table(inv_freq_bf16: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The reference's table code path: a bf16 inv_freq buffer, a ramp in its dtype, outer, cos,
    cached in bf16."""
    t = torch.arange(seq_len, dtype=inv_freq_bf16.dtype, device=inv_freq_bf16.device)
    return torch.outer(t, inv_freq_bf16).cos().to(torch.bfloat16)


def test_reference_code_path_run_eagerly_gives_the_eager_variant():
    inv = torch.tensor(INV_FREQ_16).bfloat16()
    eager_cos, _ = rope_tables_for(2048, "reference_eager")
    assert torch.equal(reference_style_table(inv, 2048).float(), eager_cos)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Inductor's GPU code generation)")
def test_reference_code_path_compiled_on_cuda_gives_the_default():
    inv = torch.tensor(INV_FREQ_16, device="cuda").bfloat16()
    compiled = torch.compile(reference_style_table, fullgraph=True, dynamic=False)(inv, 2048).float().cpu()
    default_cos, _ = rope_tables_for(2048, "reference_cuda")
    eager_cos, _ = rope_tables_for(2048, "reference_eager")
    # CUDA's and the CPU's fp32 cos may round a tie differently: allow one bf16 step, rarely.
    assert (compiled - default_cos).abs().max().item() <= 2 ** -8
    assert (compiled == default_cos).float().mean().item() > 0.999
    assert (compiled - eager_cos).abs().max().item() > 0.5


def test_apply_rotary_matches_hand_rotation():
    from parlm.model.gpt import apply_rotary
    torch.manual_seed(1)
    seq, heads, dim, rope_dims = 6, 2, 64, 16
    x = torch.randn(1, seq, heads, dim, dtype=torch.float64)
    theta = torch.rand(seq, rope_dims // 2, dtype=torch.float64) * 6
    out = apply_rotary(x, theta.cos()[:, None, :], theta.sin()[:, None, :], rope_dims)
    expected = x.clone()
    for t in range(seq):
        for h in range(heads):
            for i in range(rope_dims // 2):
                a, b, c, s = x[0, t, h, i], x[0, t, h, i + 8], math.cos(theta[t, i]), math.sin(theta[t, i])
                expected[0, t, h, i] = a * c + b * s
                expected[0, t, h, i + 8] = -a * s + b * c
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.equal(out[..., 16:], x[..., 16:])


def test_xsa_removes_the_value_direction():
    from parlm.model.gpt import exclusive_self_attention
    torch.manual_seed(2)
    y = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    out = exclusive_self_attention(y, v)
    for b in range(2):
        for t in range(3):
            for h in range(4):
                unit = v[b, t, h // 2] / v[b, t, h // 2].norm()
                expected = y[b, t, h] - (y[b, t, h] @ unit) * unit
                assert torch.allclose(out[b, t, h], expected, atol=1e-12)
                assert abs(float(out[b, t, h] @ unit)) < 1e-12


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_block_formulas(tiny_config, parallel, fused):
    config = small_config(tiny_config)
    model = randomize(GPT(config).double())
    block = model.blocks[1]
    block.parallel = parallel
    torch.manual_seed(3)
    x, x0 = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    cos, sin = (t.double() for t in model.rotary(5, x.device))
    out = block(x, x0, cos, sin, "math", fused)

    def norm(z):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float64).eps)

    scale = 1 / math.sqrt(2)  # layer index 1
    x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
    attn = block.attn(norm(x_in) * scale, cos, sin, "math")
    if parallel:
        expected = x_in + block.attn_scale * attn + block.mlp_scale * block.mlp(norm(x_in) * scale)
    else:
        mid = x_in + block.attn_scale * attn
        expected = mid + block.mlp_scale * block.mlp(norm(mid) * scale)
    assert torch.allclose(out, expected, atol=1e-10)


# ----------------------------------------------------------------------------------------
# Whole model against a float64 transcription of SPEC 2
def spec_forward(model: GPT, config: Config, ids: torch.Tensor, looping: bool) -> torch.Tensor:
    """Logits computed directly from SPEC 2 with the model's parameters, in float64."""
    P = {name: p.detach().double() for name, p in model.named_parameters()}
    L, d, H, Hkv = config.num_layers, config.model_dim, config.num_heads, config.num_kv_heads
    D, R = d // H, config.rope_dims
    B, T = ids.shape
    eps = torch.finfo(torch.float32).eps

    def norm(z):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps)

    inv_freq = torch.tensor([config.rope_base ** (-2 * i / R) for i in range(R // 2)], dtype=torch.float64)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # [T, R/2]

    def rope(z):  # z [B, T, heads, D]
        z = z.clone()
        a, b = z[..., : R // 2].clone(), z[..., R // 2: R].clone()
        c, s = theta.cos()[:, None, :], theta.sin()[:, None, :]
        z[..., : R // 2], z[..., R // 2: R] = a * c + b * s, -a * s + b * c
        return z

    def attention(i, u):
        pre = f"blocks.{i}.attn."
        q = norm((u @ P[pre + "c_q.weight"].T).reshape(B, T, H, D))
        k = norm((u @ P[pre + "c_k.weight"].T).reshape(B, T, Hkv, D))
        v = (u @ P[pre + "c_v.weight"].T).reshape(B, T, Hkv, D)
        q, k = rope(q), rope(k)
        q = q * P[pre + "q_gain"][None, None, :, None]
        y = torch.zeros(B, T, H, D, dtype=torch.float64)
        for h in range(H):
            g = h // (H // Hkv)
            scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g]) / math.sqrt(D)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            y[:, :, h] = scores.softmax(-1) @ v[:, :, g]
            if i >= L - config.xsa_last_n:
                unit = v[:, :, g] / v[:, :, g].norm(dim=-1, keepdim=True)
                y[:, :, h] = y[:, :, h] - (y[:, :, h] * unit).sum(-1, keepdim=True) * unit
        return y.reshape(B, T, d) @ P[pre + "proj.weight"].T

    def mlp(i, u):
        hidden = u @ P[f"blocks.{i}.mlp.fc.weight"].T
        return torch.where(hidden > 0, hidden, 0.5 * hidden).pow(2) @ P[f"blocks.{i}.mlp.proj.weight"].T

    def block(i, x, x0):
        pre, s = f"blocks.{i}.", 1 / math.sqrt(i + 1)
        x_in = P[pre + "resid_mix"][0] * x + P[pre + "resid_mix"][1] * x0
        a = attention(i, norm(x_in) * s)
        if i >= config.parallel_residual_start:
            return x_in + P[pre + "attn_scale"] * a + P[pre + "mlp_scale"] * mlp(i, norm(x_in) * s)
        mid = x_in + P[pre + "attn_scale"] * a
        return mid + P[pre + "mlp_scale"] * mlp(i, norm(mid) * s)

    if looping:
        apps = list(range(config.loop_start)) + list(range(config.loop_start, config.loop_end + 1)) * \
            (config.num_loops + 1) + list(range(config.loop_end + 1, L))
        encoder, decoder = apps[: len(apps) // 2], apps[len(apps) // 2:]
    else:
        encoder, decoder = list(range(L // 2)), list(range(L // 2, L))
    x = norm(P["tok_emb.weight"][ids])
    x0, stack = x, []
    for i in encoder:
        x = block(i, x, x0)
        stack.append(x)
    for j, i in enumerate(decoder):
        if j < P["skip_weights"].shape[0] and stack:
            gate = torch.sigmoid(P["skip_gates"][j])
            x = gate * x + (1 - gate) * (P["skip_weights"][j] * stack.pop())
        x = block(i, x, x0)
    z = norm(x) @ P["tok_emb.weight"].T
    return config.logit_softcap * torch.tanh(z / config.logit_softcap)


@pytest.mark.parametrize("looping", [False, True])
def test_forward_matches_spec_transcription(tiny_config, looping):
    config = small_config(tiny_config)
    model = randomize(GPT(config), seed=4, std=0.15)
    model.looping_active = looping
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    expected = spec_forward(model, config, ids, looping)
    for fused in (True, False):
        model.fused_projections = fused
        logits = model.forward_logits(ids).double()
        assert torch.allclose(logits, expected, atol=2e-4, rtol=1e-4), (fused, (logits - expected).abs().max())
    targets = torch.roll(ids, 1, dims=1)
    loss = model(ids, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(F.cross_entropy(expected.reshape(-1, config.vocab_size),
                                                        targets.reshape(-1)).item(), rel=1e-4)


def test_looping_changes_the_function(tiny_config):
    model = randomize(GPT(small_config(tiny_config)), seed=6, std=0.15)
    ids = torch.randint(0, 1024, (1, 8), generator=torch.Generator().manual_seed(7))
    plain = model.forward_logits(ids)
    model.looping_active = True
    assert not torch.allclose(plain, model.forward_logits(ids))


def test_hidden_and_head_split_and_softcap(tiny_config):
    model = randomize(GPT(small_config(tiny_config)), seed=8)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000.0)
    ids = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(9))
    hidden = model.forward_hidden(ids)
    assert hidden.shape == (2, 10, 32)
    logits = model.logits_from_hidden(hidden)
    assert torch.equal(logits, model.forward_logits(ids))
    assert 29.0 < logits.abs().max() <= 30.0  # saturated but bounded by the cap
    picked = model.logits_from_hidden(hidden[:, -3:])
    # A slice may take another BLAS blocking, so the fp32 dot products h·e can differ in their
    # summation order. The standard bound for a length-d fp32 dot product is
    # d * 2^-24 * sum_i |h_i e_i|, and the cap c*tanh(x/c) has slope <= 1, so it cannot grow
    # the difference (on AMD EPYC the observed 1.5e-4 sits far inside this bound).
    weight = model.tok_emb.weight.to(hidden.dtype)
    bound = hidden.size(-1) * 2.0 ** -24 * (hidden[:, -3:].abs() @ weight.abs().T)
    assert torch.all((picked - logits[:, -3:]).abs() <= bound)


def test_forward_hooks_see_every_projection(tiny_config):
    """Activation capture (GPTQ Hessians) needs each linear's forward; fusion steps aside."""
    model = randomize(GPT(small_config(tiny_config)), seed=10)
    seen = []
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.append(name))
               for name, m in model.named_modules() if name.endswith(("c_q", "c_k", "c_v", "mlp.fc"))]
    model.forward_logits(torch.zeros(1, 4, dtype=torch.long))
    for handle in handles:
        handle.remove()
    assert len(seen) == 4 * 4  # 4 layers, no looping: 4 input projections per block


def test_long_sequences_use_the_ntk_rescale(tiny_config):
    from parlm.model.gpt import rope_tables
    model = GPT(small_config(tiny_config))  # train_seq_len 32
    cos, _ = model.rotary(64, torch.device("cpu"))
    expected, _ = rope_tables(64, 8, 10000.0 * (64 / 32) ** (8 / 6), 10 ** 9, "float32")
    assert torch.allclose(cos[:, 0, :], expected)
    assert model.forward_logits(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 64, 1024)


def test_reference_layout_forward_runs_in_bf16(tiny_config):
    model = build_model(tiny_config, "cpu")
    model.looping_active = True
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(11))
    hidden = model.forward_hidden(ids)
    assert hidden.dtype == torch.bfloat16
    loss = model(ids, ids)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert model.blocks[0].attn.c_q.weight.grad.dtype == torch.float32


def test_parameter_table_groups_match_the_optimizer_partition():
    from parlm.model.plots import parameter_table
    with torch.device("meta"):
        model = GPT(Config())
    rows = parameter_table(model, Config().control_patterns)
    assert sum(r["parameters"] for r in rows) == 35_944_536
    tensors = {group: sum(r["tensors"] for r in rows if r["group"] == group) for group in
               ("Muon", "scalar AdamW", "token AdamW")}
    assert tensors == {"Muon": 66, "scalar AdamW": 46, "token AdamW": 1}


@pytest.mark.slow
def test_model_compiles_without_graph_breaks(tiny_config):
    """torch.compile(fullgraph=True, dynamic=False) traces both schedules and the logits path
    (dynamo with the eager backend: no C++ toolchain needed)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = build_model(tiny_config, "cpu")
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(12))
    for looping in (False, True):
        model.looping_active = looping
        loss = compiled(ids, ids)
        loss.backward()
        assert torch.equal(loss, model(ids, ids))
    logits = torch.compile(model.forward_logits, backend="eager", fullgraph=True, dynamic=False)(ids)
    assert torch.equal(logits, model.forward_logits(ids))
    torch._dynamo.reset()


def test_configs_saved_before_rope_precision_keep_their_tables(tmp_path):
    """A run saved with the retired `rope_bf16_positions` flag loads with the tables it was
    trained with; an unknown precision is a clear error."""
    from parlm.config import ConfigError
    for flag, precision in ((True, "reference_eager"), (False, "float32")):
        path = tmp_path / f"{flag}.yaml"
        path.write_text(f"rope_bf16_positions: {str(flag).lower()}\n")
        assert Config.load(path).rope_precision == precision
    with pytest.raises(ConfigError, match="rope_precision"):
        Config(rope_precision="bf16").validate()
