"""Where a profiled region's device time goes, by kernel class (used by train_speed.py and
profile_step.py).

Classes: matmul (cuBLAS/CUTLASS/nvjet GEMMs and Inductor's Triton GEMM templates), attention
(flash / fmha / cuDNN attention kernels), optimizer (any kernel launched under an
`Optimizer.step#...` range, which torch records for every optimizer step: Newton-Schulz GEMMs
included, so Muon's orthogonalization is counted here and not under matmul), communication
(NCCL), elementwise/norm (everything else: Inductor's fused Triton kernels, copies, reductions)
and idle (the region's wall time not covered by compute kernels). On CPU (the smoke mode) the
same classes are drawn from the aten operators' own time.
"""
from __future__ import annotations

CLASSES = ("matmul", "attention", "elementwise/norm", "optimizer", "communication", "idle")
MATMUL_MARKERS = ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "triton_tem", "aten::mm",
                  "aten::addmm", "aten::bmm", "aten::linear")
ATTENTION_MARKERS = ("fmha", "flash", "attention", "cudnn")


def categorize(name: str) -> str:
    """The class of one kernel (or CPU operator) name, ignoring the optimizer ranges."""
    low = name.lower()
    if "nccl" in low or "c10d::" in low:
        return "communication"
    if any(marker in low for marker in ATTENTION_MARKERS):
        return "attention"
    if any(marker in low for marker in MATMUL_MARKERS):
        return "matmul"
    return "elementwise/norm"


def _under_optimizer(event) -> bool:
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


def time_breakdown(profiler, wall_ms: float, steps: int) -> dict[str, float]:
    """Milliseconds per step by class (CLASSES) of a finished torch.profiler run that covered
    `steps` steps in `wall_ms` of wall time. Device kernels when there are any, else CPU ops."""
    totals = dict.fromkeys(CLASSES, 0.0)
    events = profiler.events()
    kernels = [(event, kernel) for event in events for kernel in getattr(event, "kernels", [])]
    if kernels:
        for event, kernel in kernels:
            kind = "optimizer" if _under_optimizer(event) else categorize(kernel.name)
            totals[kind] += kernel.duration / 1e3
        busy = sum(value for key, value in totals.items() if key != "communication")
    else:
        for event in events:
            if event.cpu_children:  # leaf operators only, so no time is counted twice
                continue
            kind = "optimizer" if _under_optimizer(event) else categorize(event.name)
            totals[kind] += event.self_cpu_time_total / 1e3
        busy = sum(totals.values())
    totals["idle"] = max(0.0, wall_ms - busy)
    return {key: value / steps for key, value in totals.items()}
