"""Optimizers and schedules of SPEC 3.3-3.4: MuonEq-R for the block matrices, AdamW for the
tied embedding and for the control tensors, the wallclock LR multiplier and the Muon
momentum warmup.

MuonEq-R step for a matrix parameter with gradient g and momentum buffer b:
    b <- mu b + g;  d <- g + mu b (Nesterov)
    d <- d / max(||d_row||_2, 1e-7)              (row normalisation, each row separately)
    O <- NS5(d)                                  (5 Newton-Schulz steps in bf16; coefficients:
                                                  reference or Polar Express, #1344/#1787)
    O <- O * sqrt(max(1, rows/cols))
    p <- p (1 - lr wd);  p <- p - lr O            (decoupled weight decay)
Parameter i of the group is processed by rank i % world_size; each rank writes its updates
into a flat bf16 buffer (zeros elsewhere), ONE SUM all-reduce shares them, then every rank
applies all updates. Same-shape matrices go through one batched Newton-Schulz call.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from parlm import dist as parlm_dist
from parlm.config import Config, compile_enabled
from parlm.model.gpt import GPT, is_control_tensor

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025; #1344, carried into #1787/#1855): one minimax-optimised
# (a, b, c) per iteration, so 5 iterations give a closer polar factor than 5 fixed ones.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ROW_NORM_FLOOR = 1e-7


def newton_schulz_schedule(kind: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of `steps` iterations: "reference" repeats (3.4445, -4.7750,
    2.0315); "polar_express" takes POLAR_EXPRESS_COEFFICIENTS in order and repeats the last
    (nearly converged) tuple past the fifth iteration, as #1787's comment intends (its code
    stops at five; parlm's presets use exactly five)."""
    if kind == "reference":
        return (NEWTON_SCHULZ_COEFFICIENTS,) * steps
    if kind == "polar_express":
        table = POLAR_EXPRESS_COEFFICIENTS
        return tuple(table[min(i, len(table) - 1)] for i in range(steps))
    raise ValueError(f"muon_newton_schulz_coefficients={kind!r} must be 'reference' or 'polar_express'")


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                                coefficients: str = "reference") -> torch.Tensor:
    """Approximate orthogonalisation of G [..., rows, cols] (a batch of matrices) in bf16.

    X = bf16(G) / (||X||_F + eps) per matrix, transposed when rows > cols; then for each
    iteration's (a, b, c) of `newton_schulz_schedule(coefficients, steps)`:
    A = X X^T, B = b A + (c A) A, X = a X + B X; transposed back. Returns bf16. The reference
    uses (a, b, c) = (3.4445, -4.7750, 2.0315) every time; "polar_express" is #1344/#1787's."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for a, b, c in newton_schulz_schedule(coefficients, steps):
        A = X @ X.mT
        B = b * A + (c * A) @ A
        X = a * X + B @ X
    return X.mT if transposed else X


def row_normalize(G: torch.Tensor) -> torch.Tensor:
    """Each row of G divided by max(its L2 norm (computed in fp32), 1e-7)."""
    return G / G.float().norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_FLOOR).to(G.dtype)


def shape_scale(rows: int, cols: int) -> float:
    """sqrt(max(1, rows/cols)): 2 for a 2048x512 matrix, 1 for 512x2048 or square."""
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Optimizer):
    """MuonEq-R (module docstring). Group options: lr, momentum, backend_steps, nesterov,
    weight_decay, row_normalize, newton_schulz_coefficients ("reference" | "polar_express").
    `compile_newton_schulz` compiles the NS function (CUDA)."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True,
                 weight_decay: float = 0.0, row_normalize: bool = False, compile_newton_schulz: bool = False,
                 newton_schulz_coefficients: str = "reference"):
        newton_schulz_schedule(newton_schulz_coefficients, 0)  # fail here on an unknown name
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                        weight_decay=weight_decay, row_normalize=row_normalize,
                        newton_schulz_coefficients=newton_schulz_coefficients)
        super().__init__(params, defaults)
        self.compile_newton_schulz = compile_newton_schulz
        self._compiled_newton_schulz = None

    def _newton_schulz(self, G: torch.Tensor, steps: int, coefficients: str) -> torch.Tensor:
        function = zeropower_via_newtonschulz5
        if self.compile_newton_schulz:
            if self._compiled_newton_schulz is None:
                self._compiled_newton_schulz = torch.compile(zeropower_via_newtonschulz5, dynamic=False)
            function = self._compiled_newton_schulz
        if coefficients == "reference":  # the reference's call, unchanged
            return function(G, steps)
        return function(G, steps, coefficients=coefficients)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = parlm_dist.get_rank(), parlm_dist.get_world_size()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            total = sum(p.numel() for p in params)
            updates_flat = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            views = [updates_flat[offsets[i]:offsets[i + 1]].view(p.shape) for i, p in enumerate(params)]

            owned_by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    owned_by_shape[tuple(p.shape)].append(i)
            for shape, indices in owned_by_shape.items():
                grads = [params[i].grad for i in indices]
                buffers = []
                for i in indices:
                    state = self.state[params[i]]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(params[i].grad)
                    buffers.append(state["momentum_buffer"])
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads)
                directions = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
                stacked = torch.stack(directions)
                if group["row_normalize"]:
                    stacked = row_normalize(stacked)
                orthogonal = self._newton_schulz(stacked, group["backend_steps"],
                                                 group.get("newton_schulz_coefficients", "reference"))
                orthogonal = orthogonal * shape_scale(shape[0], shape[1])
                torch._foreach_copy_([views[i] for i in indices], list(orthogonal.unbind(0)))

            if world_size > 1:
                parlm_dist.all_reduce_sum(updates_flat)
            weight_decay = group["weight_decay"]
            if weight_decay > 0.0:
                torch._foreach_mul_(params, 1.0 - lr * weight_decay)
            updates = updates_flat.to(params[0].dtype)
            torch._foreach_add_(params, [updates[offsets[i]:offsets[i + 1]].view(p.shape)
                                         for i, p in enumerate(params)], alpha=-lr)
        return loss


# ----------------------------------------------------------------------------------------
def split_parameters(model: GPT, control_patterns) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(matrix, scalar) parameters of SPEC 3.3: block 2-D parameters that match no control
    pattern go to Muon; block vectors and control tensors, then skip_weights and skip_gates,
    then the SmearGate's weight and lambda (#1855 adds them by hand too: they sit outside the
    blocks), go to the scalar AdamW group. The tied embedding is in neither, and neither are
    AsymLogit's caps (#1923: they do not train with the model)."""
    matrix, scalar = [], []
    for name, param in model.blocks.named_parameters():
        if param.ndim == 2 and not is_control_tensor(name, control_patterns):
            matrix.append(param)
        else:
            scalar.append(param)
    if model.skip_weights.numel() > 0:
        scalar.append(model.skip_weights)
    if model.skip_gates is not None and model.skip_gates.numel() > 0:
        scalar.append(model.skip_gates)
    if model.smear_gate is not None:
        scalar += [model.smear_gate.weight, model.smear_lambda]
    return matrix, scalar


class Optimizers:
    """The three optimizers of SPEC 3.3, stepped together:
    token AdamW (tied embedding; lr tied_embed_lr, wd embed_wd), Muon (block matrices; lr
    matrix_lr, wd muon_wd) and scalar AdamW (control tensors; lr scalar_lr, wd adam_wd).
    Every param group carries `base_lr`; AdamW is fused on CUDA and plain on CPU."""

    def __init__(self, config: Config, model: GPT):
        device = model.tok_emb.weight.device
        adam_kwargs = dict(betas=(config.beta1, config.beta2), eps=config.adam_eps)
        if device.type == "cuda":
            adam_kwargs["fused"] = True
        matrix_params, scalar_params = split_parameters(model, config.control_patterns)
        self.optimizer_tok = torch.optim.AdamW(
            [{"params": [model.tok_emb.weight], "lr": config.tied_embed_lr, "base_lr": config.tied_embed_lr}],
            weight_decay=config.embed_wd, **adam_kwargs)
        self.optimizer_muon = Muon(
            matrix_params, lr=config.matrix_lr, momentum=config.muon_momentum,
            backend_steps=config.muon_backend_steps, weight_decay=config.muon_wd,
            row_normalize=config.muon_row_normalize, compile_newton_schulz=compile_enabled(config, device),
            newton_schulz_coefficients=config.muon_newton_schulz_coefficients)
        for group in self.optimizer_muon.param_groups:
            group["base_lr"] = config.matrix_lr
        self.optimizer_scalar = torch.optim.AdamW(
            [{"params": scalar_params, "lr": config.scalar_lr, "base_lr": config.scalar_lr}],
            weight_decay=config.adam_wd, **adam_kwargs)
        self.optimizers = [self.optimizer_tok, self.optimizer_muon, self.optimizer_scalar]

    @property
    def muon(self) -> Muon:
        return self.optimizer_muon

    def __iter__(self):
        return iter(self.optimizers)

    def zero_grad_all(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def set_schedule(self, lr_scale: float, momentum: float) -> None:
        """lr = base_lr * lr_scale for every group; Muon momentum = `momentum`."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        for group in self.optimizer_muon.param_groups:
            group["momentum"] = momentum

    def step(self) -> None:
        """Step all three optimizers, then zero every gradient (the reference's order)."""
        for optimizer in self.optimizers:
            optimizer.step()
        self.zero_grad_all()


def muon_momentum(config: Config, step: int) -> float:
    """(1 - f) * muon_momentum_warmup_start + f * muon_momentum, f = min(step / warmup_steps, 1)
    (f = 1 without warmup steps): 0.92 -> 0.99 over 1500 steps by default."""
    steps = config.muon_momentum_warmup_steps
    fraction = min(step / steps, 1.0) if steps > 0 else 1.0
    return (1.0 - fraction) * config.muon_momentum_warmup_start + fraction * config.muon_momentum


def lr_multiplier(config: Config, frac: float) -> float:
    """1 while frac < 1 - warmdown_frac, then max((1 - frac) / warmdown_frac, min_lr): a linear
    warmdown over the last `warmdown_frac` of training (frac = elapsed / budget). No warmup.

    min_lr is the MIN_LR warmdown floor of #1787 (0 in the reference): a fraction of every
    group's peak LR below which the warmdown never goes (#1787: 0.1, "10% of max instead of 0")."""
    if config.warmdown_frac <= 0:
        return 1.0
    if frac >= 1.0 - config.warmdown_frac:
        return max((1.0 - frac) / config.warmdown_frac, config.min_lr)
    return 1.0


def seq_change_warmup_scale(config: Config, step: int, change_step: int | None) -> float:
    """LR factor after a progressive-context change (#2014 SEQ_CHANGE_WARMUP_STEPS): at the
    change (change_step) and the seq_change_warmup_steps - 1 steps after it,
    min((step - change_step + 1) / seq_change_warmup_steps, 1); 1 when there was no change
    (change_step None) or no warmup. Multiplies `lr_multiplier`."""
    warmup = config.seq_change_warmup_steps
    if change_step is None or warmup <= 0:
        return 1.0
    return min(max((step - change_step + 1) / warmup, 0.0), 1.0)


__all__ = [
    "Muon", "Optimizers", "lr_multiplier", "muon_momentum", "row_normalize", "shape_scale",
    "split_parameters", "zeropower_via_newtonschulz5", "NEWTON_SCHULZ_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS", "newton_schulz_schedule", "seq_change_warmup_scale",
]
