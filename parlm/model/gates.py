"""The frontier's gates on the PR #1858 model (FRONTIER.md), each behind a Config switch that is
off by default, so the default model, its state dict and its numbers are the reference's:

- `sparse_attn_gate` (#1787, `sparse_attn_gate_enabled`): a per-head sigmoid gate on the
  attention output, fed by a narrow slice of the attention input;
- `smear_previous_token` (#1851/#1855, `smear_gate_enabled`): the previous-token SmearGate on
  the embedding, with the BOS fix (nothing crosses a document start);
- `asymmetric_softcap` (#1923, `asym_logit_rescale`): separate soft caps for positive and
  negative logits.

All three are tensor code over whole sequences (no loop over tokens, no host sync), so the
compiled training graph stays one graph. Their parameters are the PRs' names (`attn_gate_w`,
`smear_gate.weight`, `smear_lambda`, `softcap_pos`, `softcap_neg`): small fp32 control
tensors (parlm.config.SWITCH_CONTROL_TENSOR_NAME_PATTERNS) that GPTQ passes through as fp16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The document-start token: the challenge's SentencePiece models reserve id 1 for BOS and the
# exports prefix every document with it (SPEC 1.3, parlm.data.corpus).
BOS_TOKEN_ID = 1


def sparse_attn_gate(y: torch.Tensor, gate_input: torch.Tensor, weight: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """SparseAttnGate (#1787, the modded-nanogpt sparse head-output gate): every head's
    attention output is scaled by a gate computed from the first w dims of the attention input,

        y_{t,h} <- sigmoid(scale * W_h . u_t[:w]) * y_{t,h},   W [H, w], w = gate_window,

    applied after XSA and before the output projection. u [B, T, d] is the block's normed
    attention input, y [B, T, H, D]. #1787 replaced #1736's dense GatedAttn (W [H, d]) by this
    narrow input: H*w parameters per layer instead of H*d. W starts at zero, so every gate starts
    at sigmoid(0) = 1/2 (as in the PR; attn_scale learns the compensation)."""
    window = weight.size(1)
    logits = F.linear(gate_input[..., :window], weight.to(gate_input.dtype))
    return y * torch.sigmoid(scale * logits)[..., None]


def smear_previous_token(x: torch.Tensor, input_ids: torch.Tensor, gate_weight: torch.Tensor,
                         smear_lambda: torch.Tensor, bos_id: int = BOS_TOKEN_ID) -> torch.Tensor:
    """BOS-fixed SmearGate (#1667 SmearGate, BOS fix of #1851/#1855) on the token embeddings
    x [B, T, d] (before the embedding norm):

        x'_t = x_t + lambda * sigmoid(W . x_t[:w]) * x_{t-1} * [id_t != BOS]   (t >= 1),  x'_0 = x_0,

    W [1, w] and lambda [1] zero-initialised (the gate is the identity at the start). The
    [id_t != BOS] factor is the fix: without it the last token of document N leaks into the
    BOS embedding of document N+1 of a packed stream (FRONTIER.md: the unfixed leak was worth a
    fake -0.00255 BPB). A window's first position has no previous token and passes unchanged."""
    window = gate_weight.size(1)
    gate = smear_lambda.to(x.dtype) * torch.sigmoid(F.linear(x[:, 1:, :window], gate_weight.to(x.dtype)))
    continues_document = (input_ids[:, 1:] != bos_id).unsqueeze(-1).to(x.dtype)
    return torch.cat((x[:, :1], x[:, 1:] + gate * continues_document * x[:, :-1]), dim=1)


def asymmetric_softcap(logits: torch.Tensor, cap_positive: torch.Tensor,
                       cap_negative: torch.Tensor) -> torch.Tensor:
    """AsymLogit (#1923 "asymmetric logit rescale"): the logit soft cap c tanh(z / c) with its
    own learned c for each sign,

        z -> c_+ tanh(z / c_+) for z >= 0,   c_- tanh(z / c_-) for z < 0,

    c_+ = c_- = logit_softcap at initialisation (so it starts as the symmetric cap). A monotone
    map of each logit, so the softmax over the vocabulary stays a normalised distribution.
    Computed as c(z) tanh(z / c(z)) with c(z) selected per element: one tanh, as cheap as the
    symmetric cap."""
    cap = torch.where(logits >= 0, cap_positive.to(logits.dtype), cap_negative.to(logits.dtype))
    return cap * torch.tanh(logits / cap)
