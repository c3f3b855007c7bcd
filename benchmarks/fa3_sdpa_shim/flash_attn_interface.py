"""Stand-in for FlashAttention-3's `flash_attn_interface` (not installable on every machine),
for running the reference script (benchmarks/reference_run.sh): causal attention through
PyTorch SDPA with GQA. Inputs and output use FA3's [batch, seq, heads, head_dim] layout; the
reference script itself enables only SDPA's flash backend, as ANCHORS.md's measurements did."""
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=True):
    """softmax(q k^T / sqrt(D) + causal mask) v per head; k/v heads shared by q-head groups."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)
