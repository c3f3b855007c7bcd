"""Phased, per-document score-first LoRA TTT (PR #1530, #1610, #1626; #1953/#2014 options).

The validation stream is cut into documents at BOS tokens: document d owns the scored positions
[s_d, e_d), s_d its BOS (or 0), e_d the next BOS (or T), so position p predicts x_{p+1} ≤ x_{e_d}
and the documents tile [0, T) once. Every document gets its own low-rank adapters on the
frozen artifact weights, for each block b and each adapted projection W (K, O = attn.proj,
MLP = mlp.fc, plus Q and V unless `lora_ttt_no_qv`, #1953):

    W x  →  W x + (α/r) · B_d A x,   A ∈ R^{r×in} (a fixed seeded draw), B_d ∈ R^{out×r} = 0 at start

(one adapter per block, shared by its looped repeats; the #1530 lineage's LM-head adapter is
not used). Inside a document, chunks of C = `lora_ttt_chunk_tokens` scored positions are
taken in order (smaller chunks for a document's first offsets with `lora_ttt_short_chunks`
"limit:chunk,...", the short-document chunks of #2014, see `chunk_edges`). For chunk k with
positions s_d + [o_k, min(o_{k+1}, n_d)), n_d = e_d − s_d:

1. **score**: one forward over the document's last ≤ L = eval_seq_len tokens ending at the
   chunk's end (context never crosses the document start) gives nll_p = −log softmax(f(x_{≤p}))
   [x_{p+1}] with the adapters as trained on chunks < k; these are the scores (optionally
   through the n-gram tilt, `parlm.eval.ngram_tilt`);
2. **then update** (not after the document's last chunk): one AdamW step (lr = `lora_ttt_lr` ·
   `lora_ttt_local_lr_factor`, betas (`lora_ttt_beta1`, `lora_ttt_beta2`), decoupled weight
   decay `lora_ttt_weight_decay`) on the mean nll of that same chunk.

Documents are batched (`lora_ttt_batch_docs`, sorted by length) with one adapter slot each;
AdamW is elementwise and the loss a sum over slots, so documents never influence each other.

**Phases** (#1626; the late entries used one phase with a 2500-document prefix): with
P = `lora_ttt_phases` > 0 and D = `lora_ttt_prefix_docs`, the documents are scored in groups
split at b_j = ⌊D(j+1)/P⌋; after group j, all weights of the base model take a global
score-first SGD pass (the #1858 trainer: chunks of `ttt_chunk_tokens`, `lora_ttt_global_epochs`
epochs, lr `lora_ttt_global_lr`·½(1 + cos(π·c/(chunks − 1)))) over the stream prefix
[0, e_{b_j − 1}), which is scored already; later groups are scored with the updated weights.
Every update therefore trains only on positions scored before it (C3), and a score depends
only on earlier stream tokens (C1).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from parlm import dist
from parlm.config import Config, ConfigError
from parlm.data.tokenizer import BOS_ID
from parlm.dist import autocast_context, synchronize
from parlm.eval.scoring import device_byte_tables
from parlm.model.validation import EvalResult, loss_and_bpb
from parlm.eval.ttt import TTTResult, TTTTrainer, chunk_learning_rate, reduce_to_main, train_on_chunk


def find_documents(tokens: torch.Tensor, total: int, bos_id: int = BOS_ID) -> np.ndarray:
    """int64 [D+1] bounds: document d scores positions [bounds[d], bounds[d+1]); a document
    starts at 0 and at every BOS position in (0, T)."""
    stream = tokens[:total].cpu().numpy()
    starts = np.flatnonzero(stream == bos_id)
    starts = starts[starts > 0]
    return np.concatenate([[0], starts, [total]]).astype(np.int64)


def parse_short_chunks(spec: str) -> list[tuple[int, int]]:
    """"256:8,2000:24" -> [(256, 8), (2000, 24)] sorted by position limit: positions of a
    document below `limit` (and above the previous limit) are scored in chunks of `chunk`."""
    steps = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        try:
            limit, chunk = (int(v) for v in item.split(":"))
        except ValueError:
            raise ConfigError(f"lora_ttt_short_chunks={spec!r}: {item!r} is not 'position_limit:chunk' "
                              f"(e.g. '256:8,2000:24')") from None
        if limit <= 0 or chunk <= 0:
            raise ConfigError(f"lora_ttt_short_chunks={spec!r}: limits and chunks must be positive")
        steps.append((limit, chunk))
    return sorted(steps)


def chunk_edges(config: Config, longest: int) -> np.ndarray:
    """Chunk boundaries inside a document, as offsets from its start, covering [0, longest):
    with `lora_ttt_short_chunks` "l1:c1,l2:c2" the offsets [0, l1) go in chunks of c1, [l1, l2)
    in chunks of c2 (the last one cut at l2), the rest in chunks of `lora_ttt_chunk_tokens`.

    #2014 picks one chunk size per batch from the longest document's length; a document's
    length is where its next BOS falls, i.e. future tokens, so here the chunk depends only on
    the offset inside the document: a short document still sees only small chunks, and every
    chunk boundary is fixed before any of the document is read (C1)."""
    edges, position = [0], 0
    for limit, chunk in parse_short_chunks(config.lora_ttt_short_chunks) + [(None, config.lora_ttt_chunk_tokens)]:
        stop = longest if limit is None else min(limit, longest)
        while position < stop:
            position = min(position + chunk, stop) if limit is not None else position + chunk
            edges.append(position)
    return np.asarray(edges, dtype=np.int64)


def phase_groups(num_docs: int, phases: int, prefix_docs: int) -> list[tuple[int, int]]:
    """[first, end) document ranges scored between global phases: split at ⌊D(j+1)/P⌋ for
    j < P (D = min(prefix_docs, num_docs)), then the rest; a single group when P = 0."""
    prefix = max(0, min(prefix_docs, num_docs))
    if phases <= 0 or prefix == 0:
        return [(0, num_docs)]
    cuts = [0] + [prefix * (j + 1) // phases for j in range(phases)] + [num_docs]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class BatchedLoRA(nn.Module):
    """Per-slot adapters for one projection: delta(x)[b] = (α/r) · x[b] A_b^T B_b^T with
    A [slots, r, in] (the seeded draw copied to every slot) and B [slots, out, r] = 0."""

    def __init__(self, slots: int, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator, device):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        draw = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        self.A = nn.Parameter(draw.to(device).expand(slots, rank, in_features).clone())
        self.B = nn.Parameter(torch.zeros(slots, out_features, rank, device=device))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.transpose(1, 2).to(x.dtype)) @ self.B.transpose(1, 2).to(x.dtype) * self.scale


def adapted_projections(model, no_qv: bool) -> list[nn.Module]:
    """The linears that get adapters: per block K, O (attn.proj), MLP input (mlp.fc), and Q, V
    unless no_qv."""
    modules = []
    for block in model.blocks:
        names = [block.attn.c_k, block.attn.proj, block.mlp.fc]
        if not no_qv:
            names += [block.attn.c_q, block.attn.c_v]
        modules.extend(names)
    return modules


class DocumentAdapters:
    """Adapters of one batch of documents attached to the model through forward hooks (the
    fused Q/K/V path is switched off meanwhile so the hooks see every projection)."""

    def __init__(self, config: Config, model, slots: int, device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.model = model
        self.loras = nn.ModuleList()
        self.handles = []
        self.fused_before = getattr(model, "fused_projections", False)
        model.fused_projections = False
        for module in adapted_projections(model, config.lora_ttt_no_qv):
            lora = BatchedLoRA(slots, module.in_features, module.out_features, config.lora_ttt_rank,
                               config.lora_ttt_alpha, generator, device)
            self.loras.append(lora)
            self.handles.append(module.register_forward_hook(
                lambda _m, inputs, output, lora=lora: output + lora(inputs[0])))
        self.optimizer = torch.optim.AdamW(
            self.loras.parameters(), lr=config.lora_ttt_lr * config.lora_ttt_local_lr_factor,
            betas=(config.lora_ttt_beta1, config.lora_ttt_beta2), eps=1e-10,
            weight_decay=config.lora_ttt_weight_decay)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.fused_projections = self.fused_before


def chunk_windows(tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, chunk_start: int,
                  chunk_stop: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The batch's inputs for the chunk [chunk_start, chunk_stop) (offsets inside each
    document; documents at absolute `starts` with `lengths` scored positions, device tensors):
    each window is the document's last ≤ seq_len tokens ending at min(chunk_stop, length),
    zero-padded to width min(seq_len, chunk_stop). Returns x, y [B, width]; rows [B, chunk] the
    chunk's rows in the window (clamped past a short chunk); scored [B, chunk] the rows that
    are real positions of the chunk; positions [B, chunk] their absolute stream positions."""
    total = tokens.numel() - 1
    chunk, width = chunk_stop - chunk_start, min(seq_len, chunk_stop)
    device = tokens.device
    chunk_end = lengths.clamp(max=chunk_stop)
    active = lengths > chunk_start
    window_start = (chunk_end - seq_len).clamp(min=0)
    length = torch.where(active, chunk_end - window_start, 0)
    offset = torch.where(active, chunk_start - window_start, 0)
    columns = torch.arange(width + 1, device=device)
    index = (starts[:, None] + window_start[:, None] + columns[None, :]).clamp(max=total)
    valid = columns[None, :width] < length[:, None]
    steps = torch.arange(chunk, device=device)
    rows = (offset[:, None] + steps[None, :]).clamp(max=width - 1)
    return {"x": torch.where(valid, tokens[index[:, :-1]], 0), "y": torch.where(valid, tokens[index[:, 1:]], 0),
            "rows": rows, "scored": steps[None, :] < torch.where(active, chunk_end - chunk_start, 0)[:, None],
            "positions": starts[:, None] + window_start[:, None] + rows}


def record_scores(window: dict, logits: torch.Tensor, nll: torch.Tensor, tables, sums: torch.Tensor,
                  nll_out: torch.Tensor, tilt, mix_out, on_score) -> None:
    """Accumulate one chunk's scores (masked rows go to the scratch slot T; no host sync)."""
    scored, positions = window["scored"], window["positions"]
    total = nll_out.numel() - 1
    targets, inputs = window["y"].gather(1, window["rows"]), window["x"].gather(1, window["rows"])
    weight = scored.to(torch.float64)
    score = nll.detach().double()
    n_bytes = tables.count_bytes(targets, inputs, positions + 1).to(torch.float64)  # targets sit at p + 1
    sums[:3] += torch.stack([(score * weight).sum(), weight.sum(), (n_bytes * weight).sum()])
    slot = torch.where(scored, positions, total).flatten()
    nll_out.index_copy_(0, slot, score.flatten().to(nll_out.dtype))
    if tilt is not None:  # the tilted score of the same positions, from the same logits
        tilted = tilt.nll(logits.detach().flatten(0, 1).float(), positions.flatten().clamp(max=total - 1))
        sums[3] += (tilted * weight.flatten()).sum()
        mix_out.index_copy_(0, slot, tilted.to(mix_out.dtype))
    if on_score is not None:
        on_score(positions[scored], score[scored])


def score_and_update_batch(config: Config, model, tokens: torch.Tensor, tables, doc_bounds: np.ndarray,
                           docs: list[int], sums: torch.Tensor, nll_out: torch.Tensor, tilt=None,
                           mix_out: torch.Tensor | None = None, on_score: Callable | None = None,
                           on_train: Callable | None = None, seed: int = 0) -> int:
    """Score-first LoRA TTT of one batch of documents (module docstring, steps 1-2); adds Σnll,
    tokens, bytes (and Σ tilted nll with `tilt`) into `sums`, per-position NLLs into `nll_out`
    (tilted ones into `mix_out`). Returns the number of update steps. The chunk plan is
    built on the device and the train/no-train decision on the host from the lengths, so
    the loop does not wait on the GPU."""
    device = tokens.device
    lengths = doc_bounds[np.asarray(docs) + 1] - doc_bounds[docs]
    starts_device = torch.as_tensor(doc_bounds[docs], device=device)
    lengths_device = torch.as_tensor(lengths, device=device)
    edges = chunk_edges(config, int(lengths.max()))
    adapters = DocumentAdapters(config, model, len(docs), device, seed=seed)
    steps = 0
    try:
        for chunk_start, chunk_stop in zip(edges[:-1].tolist(), edges[1:].tolist()):
            window = chunk_windows(tokens, starts_device, lengths_device, chunk_start, chunk_stop,
                                   config.eval_seq_len)
            rows = window["rows"]
            with autocast_context(device):
                hidden = model.forward_hidden(window["x"])
                picked = hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
                logits = model.logits_from_hidden(picked)
            targets = window["y"].gather(1, rows)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            with torch.no_grad():
                record_scores(window, logits, nll, tables, sums, nll_out, tilt, mix_out, on_score)
            if not (lengths > chunk_stop).any():  # every document's last chunk: nothing to train
                continue
            trains = (lengths_device > chunk_stop)[:, None] & window["scored"]
            per_doc = (nll * trains).sum(1) / trains.sum(1).clamp(min=1)
            if on_train is not None:
                on_train(window["positions"][trains])
            adapters.optimizer.zero_grad(set_to_none=True)
            per_doc.sum().backward()
            adapters.optimizer.step()
            steps += 1
    finally:
        adapters.close()
    return steps


def global_phase(config: Config, model, tokens: torch.Tensor, end: int, ctx,
                 on_train: Callable | None = None) -> int:
    """Global score-first SGD over the scored prefix [0, end) (module docstring, phases):
    returns the number of SGD steps."""
    # The score-first TTT's chunk training (parlm.eval.ttt) at this phase's LR and epochs.
    phase_config = config.replace(ttt_lr=config.lora_ttt_global_lr, ttt_epochs=config.lora_ttt_global_epochs)
    trainer = TTTTrainer(phase_config, model, ctx, compile=False)
    hook = None
    if on_train is not None:  # the trainer reports (first, last) input positions of a step
        hook = lambda first, last: on_train(torch.arange(first, last + 1))  # noqa: E731
    chunk = config.ttt_chunk_tokens
    num_chunks = -(-end // chunk)
    steps = 0
    for ci in range(num_chunks):
        lr = chunk_learning_rate(phase_config, ci, num_chunks)
        steps += train_on_chunk(phase_config, model, trainer, tokens, ci * chunk, min((ci + 1) * chunk, end),
                                lr, ctx, hook)[1]
    model.eval()
    return steps


def eval_val_lora_ttt(config: Config, model, val_tokens: torch.Tensor, byte_tables, ctx, tilt=None,
                      on_score: Callable | None = None, on_train: Callable | None = None) -> TTTResult:
    """Phased per-document score-first LoRA TTT over the validation stream (module docstring).

    `model` (the artifact's weights) is adapted in place by the global phases; the adapters
    live only for their batch. loss = Σnll/N, bpb = Σnll/(ln2·Σbytes) over the positions as
    scored; with `tilt` (an `NgramTilt`) the tilted score of the same pass is `mix`. Batches of documents are dealt round-robin
    to ranks, sums all-reduced, per-position NLLs reduced to rank 0. `on_score(positions, nll)`
    and `on_train(positions)` (the positions whose next token a step trains on) are hooks for
    the compliance tests. Nothing is compiled, so there is no warm-up."""
    device = ctx.device
    tokens = val_tokens.to(device=device, dtype=torch.int64)
    total = tokens.numel() - 1
    tables = device_byte_tables(byte_tables, device)
    doc_bounds = find_documents(tokens, total)
    num_docs = len(doc_bounds) - 1
    groups = phase_groups(num_docs, config.lora_ttt_phases, config.lora_ttt_prefix_docs)
    sums = torch.zeros(3 if tilt is None else 4, dtype=torch.float64, device=device)
    nll_out = torch.zeros(total + 1, dtype=torch.float32, device=device)
    mix_out = torch.zeros(total + 1, dtype=torch.float64, device=device) if tilt is not None else None
    records, lora_steps, global_steps, global_seconds = [], 0, 0, 0.0
    synchronize(device)
    t0 = time.perf_counter()
    for group_index, (first, end) in enumerate(groups):
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        lengths = doc_bounds[first + 1:end + 1] - doc_bounds[first:end]
        by_length = (first + np.argsort(-lengths, kind="stable")).tolist()
        batches = [by_length[i:i + config.lora_ttt_batch_docs]
                   for i in range(0, len(by_length), config.lora_ttt_batch_docs)]
        for batch_index in range(ctx.rank, len(batches), ctx.world_size):
            lora_steps += score_and_update_batch(config, model, tokens, tables, doc_bounds,
                                                 batches[batch_index], sums, nll_out, tilt=tilt,
                                                 mix_out=mix_out, on_score=on_score, on_train=on_train,
                                                 seed=config.seed)
        record = {"phase": group_index, "first_doc": first, "end_doc": end,
                  "end_position": int(doc_bounds[end])}
        if group_index < len(groups) - 1:  # a global phase over the scored prefix
            synchronize(device)
            phase_start = time.perf_counter()
            global_steps += global_phase(config, model, tokens, int(doc_bounds[end]), ctx, on_train=on_train)
            synchronize(device)
            record["global_seconds"] = time.perf_counter() - phase_start
            global_seconds += record["global_seconds"]
        records.append(record)
    dist.all_reduce_sum(sums)
    synchronize(device)
    seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    values = sums.tolist()
    nll_sum, count, nbytes = values[:3]
    loss, bpb = loss_and_bpb(nll_sum, count, nbytes)
    mix = None
    if tilt is not None:
        mix = EvalResult(*loss_and_bpb(values[3], count, nbytes), tokens=count, bytes=nbytes, seconds=seconds)
    nll = reduce_to_main(nll_out, ctx)
    nll_mix = reduce_to_main(mix_out, ctx) if mix_out is not None else None
    return TTTResult(result=EvalResult(loss=loss, bpb=bpb, tokens=count, bytes=nbytes, seconds=seconds),
                     chunks=records, nll=None if nll is None else nll[:total].astype(np.float64),
                     nll_mix=None if nll_mix is None else nll_mix[:total], mix=mix,
                     extra={"compile_seconds": 0.0, "num_docs": num_docs, "lora_steps": lora_steps,
                            "global_steps": global_steps, "global_seconds": global_seconds,
                            "num_chunks": 0})
