"""Model FLOPs per training token, counted from a GPT's own modules and schedule.

Throughput alone does not say how far a training step is from the chip; achieved FLOP/s over
the GPU's dense bf16 peak (MFU) does. The count follows the usual "model FLOPs" convention
(PaLM appendix B): every multiply-add is 2 FLOPs, backward costs twice the forward, and
recomputation (FlashAttention's backward recomputing P) is not counted. Per token of a
sequence of length T:

- each linear layer of each block *pass* (the looped schedule runs some blocks twice):
  2 * in_features * out_features;
- attention per block pass, with the causal mask: QK^T and PV over (T + 1) / 2 keys on
  average, 2 * 2 * num_heads * head_dim * (T + 1) / 2 = 2 * num_heads * head_dim * (T + 1)
  (`dense_attention` drops the mask: 4 * num_heads * head_dim * T);
- the tied output head: 2 * vocab_size * model_dim (the embedding lookup is a gather, 0 FLOPs);
- training = 3 x forward;
- Muon's Newton-Schulz orthogonalization, once per optimizer step and shared by all the step's
  tokens: per matrix of shape (m, n), m <= n after the transpose it applies, each iteration
  computes A = X X^T (2 m^2 n), (c A) A (2 m^3) and B X (2 m^2 n).

Elementwise work (norms, RoPE, activations, softcap, the EMA) is left out: it moves bytes
rather than doing matrix arithmetic, and the profiler breakdown of the speed benchmark shows
its time separately.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

# Dense bf16 tensor-core peak (no sparsity) by device-name substring, in TFLOP/s, from the
# vendors' datasheets. The first matching entry wins, so more specific names come first.
BF16_DENSE_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
)


def bf16_dense_peak_tflops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak of a GPU named `device_name` (torch.cuda.get_device_name),
    or None when the name is not in BF16_DENSE_PEAK_TFLOPS."""
    for key, peak in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs per token of one training step, by part (see the module docstring)."""
    linear: float           # block linears, forward, summed over the active block passes
    attention: float        # causal QK^T + PV, forward
    head: float             # tied output head, forward
    newton_schulz: float    # Muon orthogonalization per step / tokens per step
    block_passes: int       # blocks run per forward (11 plain, 14 looped by default)

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.head

    @property
    def training(self) -> float:
        """Model FLOPs of one training token: 3 x forward + the amortized optimizer."""
        return 3.0 * self.forward + self.newton_schulz

    def to_dict(self) -> dict:
        return {**asdict(self), "forward": self.forward, "training": self.training}


def block_linear_flops(block: nn.Module) -> float:
    """2 * in * out summed over the nn.Linear modules of one block: forward FLOPs per token."""
    return float(sum(2 * m.in_features * m.out_features for m in block.modules() if isinstance(m, nn.Linear)))


def newton_schulz_flops(shape: tuple[int, int], steps: int) -> float:
    """FLOPs of `steps` quintic Newton-Schulz iterations on one (rows, cols) matrix:
    with m = min, n = max, each iteration does X X^T (2 m^2 n), (c A) A (2 m^3), B X (2 m^2 n)."""
    m, n = sorted(shape)
    return float(steps * (4 * m * m * n + 2 * m ** 3))


def training_flops_per_token(model, seq_len: int, tokens_per_step: int, muon_shapes, newton_schulz_steps: int,
                             looping: bool | None = None, dense_attention: bool = False) -> TokenFlops:
    """TokenFlops of `model` (a parlm GPT) on sequences of `seq_len` tokens, with the block
    schedule of `looping` (default: the model's current state), and `newton_schulz_steps` on each
    Muon matrix of `muon_shapes` ((rows, cols) pairs: the optimizer's, since only it knows which
    matrices are control tensors) amortized over `tokens_per_step`."""
    previous = model.looping_active
    if looping is not None:
        model.looping_active = bool(looping)
    try:
        encoder, decoder = model.active_schedule()
    finally:
        model.looping_active = previous
    passes = list(encoder) + list(decoder)
    linear = sum(block_linear_flops(model.blocks[index]) for index in passes)
    attention_layer = model.blocks[0].attn
    width = attention_layer.num_heads * attention_layer.head_dim
    keys = seq_len if dense_attention else (seq_len + 1) / 2
    attention = len(passes) * 2 * 2 * width * keys
    vocab_size, model_dim = model.tok_emb.weight.shape
    head = 2.0 * vocab_size * model_dim
    newton_schulz = sum(newton_schulz_flops(tuple(shape), newton_schulz_steps) for shape in muon_shapes)
    return TokenFlops(linear=linear, attention=float(attention), head=head,
                      newton_schulz=newton_schulz / tokens_per_step, block_passes=len(passes))
