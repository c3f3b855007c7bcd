"""Tables and figures that describe a GPT (notebook 02): parameters per module, the block
schedule with its skip connections before and after looping, and the shapes of one forward
pass. Figures are `matplotlib.figure.Figure` objects (no pyplot state)."""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from parlm.model.gpt import GPT, is_control_tensor, skip_connections


def parameter_table(model: GPT, control_patterns) -> list[dict]:
    """One row per parameter name with the block index replaced by '*': tensors, shape,
    parameters (all blocks together), dtype and optimizer group (token / muon / scalar)."""
    rows: OrderedDict[str, dict] = OrderedDict()
    for name, param in model.named_parameters():
        key = re.sub(r"blocks\.\d+\.", "blocks.*.", name)
        if name.startswith("tok_emb"):
            group = "token AdamW"
        elif name.startswith("blocks.") and param.ndim == 2 and not is_control_tensor(name, control_patterns):
            group = "Muon"
        else:
            group = "scalar AdamW"
        row = rows.setdefault(key, dict(name=key, tensors=0, shape=tuple(param.shape), parameters=0,
                                        dtype=str(param.dtype).replace("torch.", ""), group=group))
        row["tensors"] += 1
        row["parameters"] += param.numel()
    return list(rows.values())


def format_parameter_table(rows: list[dict]) -> str:
    """Fixed-width text of `parameter_table` rows plus a total line."""
    lines = [f"{'parameter':28s} {'tensors':>7s} {'shape':>14s} {'parameters':>12s} {'dtype':>9s}  group"]
    for row in rows:
        shape = "x".join(str(s) for s in row["shape"])
        lines.append(f"{row['name']:28s} {row['tensors']:7d} {shape:>14s} {row['parameters']:12,d} "
                     f"{row['dtype']:>9s}  {row['group']}")
    total = sum(row["parameters"] for row in rows)
    lines.append(f"{'total':28s} {sum(r['tensors'] for r in rows):7d} {'':>14s} {total:12,d}")
    return "\n".join(lines)


def _draw_schedule(ax, model: GPT, encoder: list[int], decoder: list[int], title: str) -> None:
    applications = encoder + decoder
    repeated = {b for b in applications if applications.count(b) > 1}
    for position, block in enumerate(applications):
        color = "#8ecae6" if position < len(encoder) else "#ffb703"
        ax.add_patch(Rectangle((position - 0.4, -0.4), 0.8, 0.8, facecolor=color, edgecolor="black",
                               linewidth=2.2 if block in repeated else 0.8,
                               hatch="//" if model.blocks[block].parallel else None))
        ax.text(position, 0, str(block), ha="center", va="center", fontsize=10, fontweight="bold")
    for step, app in skip_connections(encoder, decoder, model.num_skip_weights):
        if app is not None:
            ax.add_patch(FancyArrowPatch((app, 0.42), (len(encoder) + step - 0.1, 0.42),
                                         connectionstyle="arc3,rad=-0.3", arrowstyle="-|>",
                                         mutation_scale=9, color="#555555", linewidth=0.9))
    ax.axvline(len(encoder) - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(-0.8, len(applications) - 0.2)
    ax.set_ylim(-0.6, 1.0 + 0.3 * len(applications))
    ax.set_yticks([])
    ax.set_xticks(range(len(applications)))
    ax.set_xlabel("application order (dotted line: encoder | decoder; arrows: gated skips)")
    ax.set_title(title, fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def plot_block_schedule(model: GPT) -> Figure:
    """Two panels: the block applications without and with looping. Box = physical block
    index (blue encoder, orange decoder, hatched = parallel residual block, thick border =
    block applied more than once); arrows = gated skip connections (encoder output pushed,
    popped LIFO before a decoder application)."""
    plain = (model.plain_encoder_indices, model.plain_decoder_indices)
    looped = (model.encoder_indices, model.decoder_indices)
    width = max(len(plain[0]) + len(plain[1]), len(looped[0]) + len(looped[1]))
    fig = Figure(figsize=(max(6.0, 0.65 * width), 5.2), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _draw_schedule(top, model, *plain, f"before looping: {len(plain[0]) + len(plain[1])} applications")
    _draw_schedule(bottom, model, *looped, f"after looping: {len(looped[0]) + len(looped[1])} applications")
    legend = [Rectangle((0, 0), 1, 1, facecolor="#8ecae6", edgecolor="black", label="encoder"),
              Rectangle((0, 0), 1, 1, facecolor="#ffb703", edgecolor="black", label="decoder"),
              Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//", label="parallel block"),
              Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", linewidth=2.2, label="shared (looped) block")]
    top.legend(handles=legend, loc="upper left", fontsize=7, ncols=4, frameon=False)
    return fig


def forward_shapes(model: GPT, input_ids: torch.Tensor) -> list[tuple[str, tuple[int, ...], str]]:
    """(module, output shape, dtype) for every block application and the head during one
    forward pass, captured with forward hooks (in application order)."""
    records: list[tuple[str, tuple[int, ...], str]] = [("input_ids", tuple(input_ids.shape), str(input_ids.dtype))]
    handles = []

    def hook(name):
        def record(module, inputs, output):
            records.append((name, tuple(output.shape), str(output.dtype)))
        return record

    handles.append(model.tok_emb.register_forward_hook(hook("tok_emb")))
    for index, block in enumerate(model.blocks):
        handles.append(block.register_forward_hook(hook(f"blocks.{index}")))
    try:
        with torch.no_grad():
            hidden = model.forward_hidden(input_ids)
            records.append(("final_norm (hidden)", tuple(hidden.shape), str(hidden.dtype)))
            logits = model.logits_from_hidden(hidden)
            records.append(("logits (softcapped)", tuple(logits.shape), str(logits.dtype)))
    finally:
        for handle in handles:
            handle.remove()
    return [(name, shape, dtype.replace("torch.", "")) for name, shape, dtype in records]
