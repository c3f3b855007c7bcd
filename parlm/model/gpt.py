"""The PR #1858 language model (SPEC 2): an 11 x 512 GPT with GQA, QK-norm, partial RoPE,
q-gain, exclusive self-attention (XSA), LeakyReLU(0.5)^2 MLPs, sigmoid-gated U-Net skips,
depth recurrence of a block range and GPT-J parallel blocks at the top.

Shapes and names follow the reference (`tok_emb`, `blocks.{i}.attn.c_q`, ..., `skip_gates`) so
SPEC.md reads beside the code and state dicts carry the reference's keys. The frontier switches
(parlm.model.gates: SparseAttnGate #1787, BOS-fixed SmearGate #1851/#1855, AsymLogit #1923) are
off by default and add their parameters only when on.

Speed notes (what differs from a literal transcription, never the function computed):
- the RoPE tables are computed once at construction into non-persistent buffers (sliced per
  call, so compiled graphs see plain tensors), with the arithmetic the reference's compiled
  CUDA graphs use by default; its eager bf16-position quirk (SPEC 2.2) is
  `rope_precision="reference_eager"` (see `rope_tables`);
- with `fused_projections` the Q/K/V projections of a block (plus the MLP input projection of
  a parallel block, which reads the same normalised input) run as ONE matmul against the
  concatenated weights; parameters stay separate. Forward hooks on those linears switch the
  fusion off automatically in eager mode so activation-capturing code sees every module;
- the two identical parameter-free norms of a parallel block are computed once;
- attention consumes the [B, T, H, D] layout directly (see parlm.model.attention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from parlm.model.attention import causal_attention, select_backend
from parlm.model.gates import asymmetric_softcap, smear_previous_token, sparse_attn_gate
from parlm.config import ROPE_PRECISIONS, Config, ConfigError


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim: x / sqrt(mean(x^2) + eps), eps = finfo.eps."""
    return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm as a module (a hook point, e.g. the final norm whose output is
    the tied head's input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x)


class CastedLinear(nn.Linear):
    """Bias-free linear layer y = x W^T whose master weight is cast to x's dtype at use."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


# ----------------------------------------------------------------------------------------
# Rotary position embedding (SPEC 2.2)
def rope_tables(seq_len: int, rope_dims: int, base: float, train_seq_len: int,
                precision: str = "reference_cuda", device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, rope_dims/2] (float32 storage) of angle t * inv_freq_i,
    inv_freq_i = base^(-2i/rope_dims).

    The reference casts its model with `.bfloat16()`, which makes its `inv_freq` buffer bf16,
    then builds the tables inside the forward pass (`arange(T, dtype=inv_freq.dtype)`,
    `outer`, `cos`) and caches them in bf16. What that computes depends on how it runs:
      "reference_cuda" (default): cos(t * fp32(bf16(inv_freq))) with exact positions and an
        fp32 angle, rounded to bf16. The reference's training and evaluation run compiled on
        CUDA, where Inductor keeps the bf16 intermediates in fp32 (measured on the H100 with the
        reference's own Rotary, README "Measured on GPUs"; the CUDA test in tests/test_model.py
        checks the same code path);
      "reference_eager": SPEC 2.2's quirk, the reference run eagerly: positions in bf16, so
        t > 256 rounds (257 -> 256, 2047 -> 2048), and the angle rounded to bf16 before cos;
      "float32": exact inv_freq, positions and angles, no rounding.
    For seq_len > train_seq_len the NTK rescale base * (seq_len/train_seq_len)^(rope_dims/
    (rope_dims-2)) applies, all in float32 (that branch of the reference builds a fresh fp32
    inv_freq)."""
    if precision not in ROPE_PRECISIONS:
        raise ConfigError(f"rope_precision={precision!r} is not one of {ROPE_PRECISIONS}")
    exponents = torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims
    if seq_len > train_seq_len:
        base = base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))
        precision = "float32"
    inv_freq = 1.0 / base ** exponents
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    if precision != "float32":
        inv_freq = inv_freq.bfloat16().float()
    if precision == "reference_eager":
        positions = positions.bfloat16().float()
    angles = torch.outer(positions, inv_freq)
    if precision == "reference_eager":
        angles = angles.bfloat16().float()
    cos, sin = angles.cos(), angles.sin()
    if precision != "float32":
        cos, sin = cos.bfloat16(), sin.bfloat16()
    return cos.float(), sin.float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dims: int) -> torch.Tensor:
    """Rotate-half RoPE on the first `rope_dims` dims of x [..., T, H, D], pairs (i, i+rope_dims/2):
    (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos) (mirror-sign convention); the rest passes.
    cos/sin are [T, 1, rope_dims/2]."""
    half = rope_dims // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:rope_dims]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, x[..., rope_dims:]), dim=-1)


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: y_h(t) - (y_h(t) . v̂_g(t)) v̂_g(t), v̂ = v/||v|| of head h's KV group g = h // (H/H_kv).
    y [B, T, H, D], v [B, T, H_kv, D]."""
    batch, seq, heads, dim = y.shape
    kv_heads = v.size(2)
    grouped = y.reshape(batch, seq, kv_heads, heads // kv_heads, dim)
    unit = F.normalize(v, dim=-1).unsqueeze(-2)
    projection = (grouped * unit).sum(dim=-1, keepdim=True) * unit
    return (grouped - projection).reshape(batch, seq, heads, dim)


# ----------------------------------------------------------------------------------------
# Blocks
class CausalSelfAttention(nn.Module):
    """GQA attention: QK-norm, partial RoPE, per-head q_gain (after RoPE), optional XSA, and
    with `sparse_attn_gate_enabled` the SparseAttnGate (#1787) on the head outputs."""

    def __init__(self, config: Config):
        super().__init__()
        dim = config.model_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = dim // config.num_heads
        self.rope_dims = config.rope_dims
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init, dtype=torch.float32))
        self.use_xsa = False
        self.attn_gate_w = None  # only a parameter (and a state-dict entry) when the switch is on
        if config.sparse_attn_gate_enabled:
            self.attn_gate_w = nn.Parameter(torch.zeros(config.num_heads, config.gate_window, dtype=torch.float32))
        self.sparse_attn_gate_scale = config.sparse_attn_gate_scale

    def mix_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, backend: str, gate_input: torch.Tensor | None = None) -> torch.Tensor:
        """Projected q [B,T,dim], k/v [B,T,kv_dim] -> attention output [B,T,dim] before `proj`;
        `gate_input` (the attention input u) feeds the SparseAttnGate when it is on."""
        batch, seq, dim = q.shape
        q = q.reshape(batch, seq, self.num_heads, self.head_dim)
        k = k.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = rms_norm(q), rms_norm(k)
        if self.rope_dims > 0:
            q = apply_rotary(q, cos, sin, self.rope_dims)
            k = apply_rotary(k, cos, sin, self.rope_dims)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = causal_attention(q, k, v, backend)
        if self.use_xsa:
            y = exclusive_self_attention(y, v)
        if self.attn_gate_w is not None:
            y = sparse_attn_gate(y, gate_input, self.attn_gate_w, self.sparse_attn_gate_scale)
        return y.reshape(batch, seq, dim)

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
        return self.proj(self.mix_heads(self.c_q(u), self.c_k(u), self.c_v(u), cos, sin, backend, u))


class MLP(nn.Module):
    """out = W_2 (LeakyReLU_0.5(W_1 u))^2, W_2 zero-initialised."""

    def __init__(self, config: Config):
        super().__init__()
        hidden = int(config.mlp_mult * config.model_dim)
        self.fc = CastedLinear(config.model_dim, hidden)
        self.proj = CastedLinear(hidden, config.model_dim, zero_init=True)

    @staticmethod
    def activation(hidden: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(hidden, negative_slope=0.5).square()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(u)))


def _has_hooks(modules) -> bool:
    """True when any forward (pre-)hook, global or on one of `modules`, would observe them."""
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class Block(nn.Module):
    """One transformer block (SPEC 2.3). With x_in = resid_mix[0] x + resid_mix[1] x0 and
    n(z) = RMSNorm(z) * ln_scale:
      sequential: x' = x_in + attn_scale a(n(x_in));  out = x' + mlp_scale m(n(x'))
      parallel:   out = x_in + attn_scale a(n(x_in)) + mlp_scale m(n(x_in))"""

    def __init__(self, config: Config, layer_index: int):
        super().__init__()
        dim = config.model_dim
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        self.layer_index = layer_index
        self.ln_scale_factor = 1.0 / math.sqrt(layer_index + 1) if config.ln_scale else 1.0
        self.parallel = False

    def _input_linears(self) -> list[CastedLinear]:
        linears = [self.attn.c_q, self.attn.c_k, self.attn.c_v]
        return linears + [self.mlp.fc] if self.parallel else linears

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: str, fused: bool = False) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        normed = rms_norm(x_in) * self.ln_scale_factor
        attn, mlp = self.attn, self.mlp
        mlp_hidden = None
        if fused and (torch.compiler.is_compiling() or not _has_hooks(self._input_linears())):
            linears = self._input_linears()
            weight = torch.cat([m.weight for m in linears]).to(normed.dtype)
            parts = F.linear(normed, weight).split([m.out_features for m in linears], dim=-1)
            q, k, v = parts[:3]
            if self.parallel:
                mlp_hidden = parts[3]
        else:
            q, k, v = attn.c_q(normed), attn.c_k(normed), attn.c_v(normed)
        attn_out = attn.proj(attn.mix_heads(q, k, v, cos, sin, backend, normed))
        if self.parallel:
            if mlp_hidden is None:
                mlp_hidden = mlp.fc(normed)
            mlp_out = mlp.proj(mlp.activation(mlp_hidden))
            return x_in + self.attn_scale.to(x_in.dtype) * attn_out + self.mlp_scale.to(x_in.dtype) * mlp_out
        x_mid = x_in + self.attn_scale.to(x_in.dtype) * attn_out
        return x_mid + self.mlp_scale.to(x_mid.dtype) * mlp(rms_norm(x_mid) * self.ln_scale_factor)


# ----------------------------------------------------------------------------------------
# Schedules (SPEC 2.4)
def looped_schedule(num_layers: int, num_loops: int, loop_start: int, loop_end: int) -> tuple[list[int], list[int]]:
    """(encoder, decoder) block lists with depth recurrence: [0..loop_start) + [loop_start..
    loop_end] x (num_loops+1) + (loop_end..num_layers), split at half the application count.
    With num_loops = 0: encoder [0, L//2), decoder [L//2, L)."""
    if num_loops <= 0:
        return list(range(num_layers // 2)), list(range(num_layers // 2, num_layers))
    segment = list(range(loop_start, loop_end + 1))
    applications = list(range(loop_start)) + segment * (num_loops + 1) + list(range(loop_end + 1, num_layers))
    half = len(applications) // 2
    return applications[:half], applications[half:]


def skip_connections(encoder: list[int], decoder: list[int], num_skip_weights: int) -> list[tuple[int, int | None]]:
    """For each decoder step j: (j, encoder application index popped before it, or None).

    Encoder outputs are pushed on a stack; decoder step j < num_skip_weights pops one while
    the stack is non-empty (LIFO)."""
    stack = list(range(len(encoder)))
    pairs = []
    for step in range(len(decoder)):
        pairs.append((step, stack.pop() if step < num_skip_weights and stack else None))
    return pairs


# ----------------------------------------------------------------------------------------
class GPT(nn.Module):
    """The full model. `looping_active` switches between the plain schedule
    (`plain_encoder_indices`/`plain_decoder_indices`) and the looped one (`encoder_indices`/
    `decoder_indices`, as the reference names and logs them)."""

    def __init__(self, config: Config):
        super().__init__()
        if config.logit_softcap <= 0:
            raise ConfigError(f"logit_softcap must be positive, got {config.logit_softcap}")
        if config.embedding_dim != config.model_dim or not config.tie_embeddings:
            raise ConfigError("parlm's GPT needs embedding_dim == model_dim and tie_embeddings=True "
                              "(the reference configuration)")
        if config.model_dim % config.num_heads or config.num_heads % config.num_kv_heads:
            raise ConfigError(f"model_dim={config.model_dim}, num_heads={config.num_heads}, "
                              f"num_kv_heads={config.num_kv_heads} must divide evenly")
        head_dim = config.model_dim // config.num_heads
        if config.rope_dims % 2 or config.rope_dims > head_dim:
            raise ConfigError(f"rope_dims={config.rope_dims} must be even and <= head_dim={head_dim}")
        if (config.sparse_attn_gate_enabled or config.smear_gate_enabled) and not 0 < config.gate_window <= config.model_dim:
            raise ConfigError(f"gate_window={config.gate_window} must be in 1..model_dim={config.model_dim}")
        self.model_dim = config.model_dim
        self.logit_softcap = config.logit_softcap
        self.tied_embed_init_std = config.tied_embed_init_std
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        for i in range(max(0, config.num_layers - config.xsa_last_n), config.num_layers):
            self.blocks[i].attn.use_xsa = True
        if config.parallel_residual_start >= 0:
            for i in range(config.parallel_residual_start, config.num_layers):
                self.blocks[i].parallel = True

        self.looping_active = False
        self.plain_encoder_indices, self.plain_decoder_indices = looped_schedule(config.num_layers, 0, 0, 0)
        self.encoder_indices, self.decoder_indices = looped_schedule(
            config.num_layers, config.num_loops, config.loop_start, config.loop_end)
        self.num_skip_weights = min(len(self.encoder_indices), len(self.decoder_indices))
        self.skip_weights = nn.Parameter(torch.ones(self.num_skip_weights, config.model_dim, dtype=torch.float32))
        self.skip_gates = (nn.Parameter(torch.zeros(self.num_skip_weights, config.model_dim, dtype=torch.float32))
                           if config.skip_gates_enabled else None)
        self.final_norm = RMSNorm()
        # Frontier switches on the embedding and the head (parlm.model.gates); no parameter
        # exists while a switch is off, so the default state dict is the reference's.
        self.smear_gate = CastedLinear(config.gate_window, 1, zero_init=True) if config.smear_gate_enabled else None
        self.smear_lambda = (nn.Parameter(torch.zeros(1, dtype=torch.float32))
                             if config.smear_gate_enabled else None)
        self.softcap_pos = self.softcap_neg = None
        if config.asym_logit_rescale:
            # As in #1923 the caps do not train with the model (training's loss is the symmetric
            # cap's exactly: they stay at logit_softcap); score-first TTT, which sets
            # requires_grad on every parameter, adapts them. Shape [1], not the PR's 0-dim: the
            # artifact's byte view of fp16 passthrough tensors needs at least one dimension.
            self.softcap_pos = nn.Parameter(torch.full((1,), config.logit_softcap), requires_grad=False)
            self.softcap_neg = nn.Parameter(torch.full((1,), config.logit_softcap), requires_grad=False)

        # RoPE tables for every length up to train_seq_len (longer sequences are computed per call).
        self.rope_dims, self.rope_base = config.rope_dims, config.rope_base
        self.rope_train_seq_len = config.train_seq_len  # the reference uses TRAIN_SEQ_LEN here
        self.rope_precision = config.rope_precision
        cos, sin = rope_tables(config.train_seq_len, max(config.rope_dims, 2), config.rope_base,
                               config.train_seq_len, config.rope_precision)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.attention_backend: str | None = (None if config.attention_backend == "auto"
                                              else config.attention_backend)
        self.fused_projections = True
        self._init_weights()

    def _init_weights(self) -> None:
        """SPEC 2.5: E ~ N(0, std^2); zero out-projections; orthogonal (gain 1) other linears
        with both dims >= 64 (smaller ones keep PyTorch's default init)."""
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, CastedLinear):
                if module.zero_init:
                    nn.init.zeros_(module.weight)
                elif min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, gain=1.0)

    # ---- schedule ----------------------------------------------------------------------
    def active_schedule(self) -> tuple[list[int], list[int]]:
        """(encoder, decoder) block lists used by the next forward pass."""
        if self.looping_active:
            return self.encoder_indices, self.decoder_indices
        return self.plain_encoder_indices, self.plain_decoder_indices

    def rotary(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, 1, rope_dims/2] for a sequence of `seq_len` positions."""
        if seq_len <= self.rope_cos.size(0):
            cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        else:
            cos, sin = rope_tables(seq_len, self.rope_dims, self.rope_base, self.rope_train_seq_len,
                                   self.rope_precision, device)
        return cos[:, None, :], sin[:, None, :]

    # ---- forward -----------------------------------------------------------------------
    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm output h [B, T, d] (the input of the tied head)."""
        x = self.tok_emb(input_ids)
        if self.smear_gate is not None:
            x = smear_previous_token(x, input_ids, self.smear_gate.weight, self.smear_lambda)
        x = rms_norm(x)
        x0 = x
        cos, sin = self.rotary(input_ids.size(1), input_ids.device)
        backend = self.attention_backend or ("math" if input_ids.device.type == "cpu" else "sdpa")
        encoder, decoder = self.active_schedule()
        fused = self.fused_projections
        skips = []
        for i in encoder:
            x = self.blocks[i](x, x0, cos, sin, backend, fused)
            skips.append(x)
        for step, i in enumerate(decoder):
            if step < self.num_skip_weights and skips:
                scaled_skip = self.skip_weights[step].to(x.dtype) * skips.pop()
                if self.skip_gates is not None:
                    gate = torch.sigmoid(self.skip_gates[step].to(x.dtype))
                    x = torch.lerp(scaled_skip, x, gate)  # gate * x + (1 - gate) * skip
                else:
                    x = x + scaled_skip
            x = self.blocks[i](x, x0, cos, sin, backend, fused)
        return self.final_norm(x)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Soft-capped tied-head logits: c * tanh(h E^T / c), c = logit_softcap (or AsymLogit's
        two caps when `asym_logit_rescale` is on)."""
        logits = F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))
        if self.softcap_pos is not None:
            return asymmetric_softcap(logits, self.softcap_pos, self.softcap_neg)
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)

    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits [B, T, V]."""
        return self.logits_from_hidden(self.forward_hidden(input_ids))

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy (nats), computed on fp32 logits."""
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target_ids.reshape(-1), reduction="mean")


# ----------------------------------------------------------------------------------------
def is_control_tensor(name: str, control_patterns) -> bool:
    """True when a parameter name contains one of the control patterns (SPEC 3.3)."""
    return any(pattern in name for pattern in control_patterns)


def cast_to_reference_dtypes(model: GPT, control_patterns) -> GPT:
    """SPEC 2.5 storage layout: cast everything to bf16, then every CastedLinear weight and
    every vector/control parameter back to fp32. tok_emb (and the RoPE buffers) stay bf16."""
    model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    for name, param in model.named_parameters():
        if (param.ndim < 2 or is_control_tensor(name, control_patterns)) and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def build_model(config: Config, device: torch.device | str) -> GPT:
    """GPT(config) on `device` with the reference dtype layout and the attention backend
    resolved by `select_backend(config.attention_backend, device)`.

    Parameters are created directly on `device` (orthogonal init is a QR per matrix, which is
    slow on small CPUs); the RoPE tables are always computed on the CPU."""
    with torch.device(device):
        model = GPT(config)
    model.to(device)  # the RoPE buffers
    cast_to_reference_dtypes(model, config.control_patterns)
    model.attention_backend = select_backend(config.attention_backend, device)
    return model
