"""One typed configuration for every stage of parlm.

Defaults equal the reference defaults of PR #1858 (SPEC Appendix A), so `Config()` is the
record configuration. Presets (`parlm/presets/*.yaml`), YAML files, CLI flags and papermill
parameters override it; nothing deep in the package reads environment variables.

Every Config is checked when it is made (`Config.__post_init__`): each field's type and the
range or choices FIELD_RULES declares for it, then CROSS_FIELD_RULES; one ConfigError lists
every problem, one line each naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"
# Relative data paths in presets are taken from the project checkout (so notebooks, which run
# with their own folder as working directory, and the CLI agree); outside a checkout, the cwd.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESET_PATH_KEYS = ("data_dir", "tokenizer_path")


def checkout_kernel_name(root: str | os.PathLike | None = None) -> str:
    """The Jupyter kernel of this checkout: `parlm-<first 8 hex digits of sha1(checkout path)>`
    (display name `parlm (<path>)`), which scripts/setup.sh registers; one per checkout, so a
    second checkout never re-points the first one's kernel."""
    import hashlib

    path = str(Path(root).resolve() if root is not None else PROJECT_ROOT)
    return f"parlm-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


ROPE_PRECISIONS = ("reference_cuda", "reference_eager", "float32")
# The contest's limit on bytes_total = compressed weights + code; the report always checks it.
ARTIFACT_CAP_BYTES = 16_000_000

# Names of the control tensors (SPEC 3.3): AdamW "scalar" group, fp32 storage, fp16 passthrough.
REFERENCE_CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,"
    "skip_weight,skip_weights,skip_gates"
)
# Tensors of the frontier switches (each exists only when its switch is on): always control
# tensors, whatever control_tensor_name_patterns says (#1787/#1855 add the first three to
# their pattern list; #1923's two scalars are left out of training's optimizers altogether).
SWITCH_CONTROL_TENSOR_NAME_PATTERNS = ("attn_gate_w", "smear_gate", "smear_lambda", "softcap_pos", "softcap_neg")
MUON_NEWTON_SCHULZ_COEFFICIENTS = ("reference", "polar_express")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change.

    `problems` holds one line per fault (key, value, what is allowed); the message is that line
    when there is one, else a count followed by the lines."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]

    @classmethod
    def from_problems(cls, problems: Sequence[str]) -> "ConfigError":
        if len(problems) == 1:
            return cls(problems[0], problems)
        return cls(f"{len(problems)} config problems:\n  " + "\n  ".join(problems), problems)


@dataclass
class Config:
    """Every hyperparameter and setting of a parlm run (SPEC Appendix A plus parlm settings).

    Field names are the reference's environment variables in lower case (e.g. MATRIX_LR ->
    `matrix_lr`) so SPEC.md can be read beside the code.
    """

    # ---- run and data -------------------------------------------------------------------
    data_dir: str = "./data/"
    dataset_name: str = ""  # "" -> f"fineweb10B_sp{vocab_size}"
    tokenizer_path: str = ""  # "" -> <data_dir>/tokenizers/fineweb_{vocab_size}_bpe.model
    text_transform: str = "none"  # none | caseops (PR #1729 lossless case operators; needs byte_accounting=sidecar)
    byte_accounting: str = "tables"  # BPB bytes: tables (SentencePiece pieces, SPEC 1.6) | sidecar (raw text bytes per token)
    seed: int = 1337
    run_id: str = ""
    device: str = "auto"  # auto | cuda | cpu
    compile: str = "auto"  # auto (on for CUDA) | on | off
    attention_backend: str = "auto"  # auto | fa3 | fa4 | cudnn | flash | efficient | math
    # RoPE table arithmetic (parlm.model.rope_tables): "reference_cuda" is what the reference
    # computes in its compiled CUDA graphs (bf16 inv_freq, fp32 positions and angles);
    # "reference_eager" its eager quirk of SPEC 2.2 (bf16 positions: t > 256 rounds);
    # "float32" no rounding at all.
    rope_precision: str = "reference_cuda"
    # "seed_and_rank" (parlm: SEED changes the data order) or "rank" (reference, SPEC 8.5.4).
    data_order: str = "seed_and_rank"
    # Global batch is split into this many micro-batches: grad_accum_steps = 8 // world_size.
    micro_batches_per_step: int = 8
    val_max_tokens: int = 0  # 0 = the whole validation stream; >0 keeps a prefix (demo/tests)

    # ---- training (SPEC 3) --------------------------------------------------------------
    iterations: int = 20000
    warmdown_frac: float = 0.72
    warmup_steps: int = 20
    train_batch_tokens: int = 786432
    train_seq_len: int = 2048
    train_log_every: int = 500
    max_wallclock_seconds: float = 600.0
    val_batch_tokens: int = 524288
    eval_seq_len: int = 2048
    val_loss_every: int = 4000
    sliding_window_enabled: bool = True
    # Progressive training context (#2014 TRAIN_SEQ_SCHEDULE): "len@fraction,..." trains at the
    # first len whose fraction >= training progress, e.g. "1024@0.1,2048@0.7,3072@1.0"; the
    # largest len must equal train_seq_len. "" = train_seq_len throughout (parlm.data.loader).
    train_seq_schedule: str = ""
    # Steps of linear LR re-warmup after each context change (#2014 SEQ_CHANGE_WARMUP_STEPS).
    seq_change_warmup_steps: int = 0
    # Resumable training: write a checkpoint every this many wall seconds (0 = off; writing one
    # costs wall clock, so the contest presets leave it off) ...
    checkpoint_every_seconds: float = 0.0
    checkpoint_every_steps: int = 0  # ... and/or every this many steps (0 = off; tests)
    # Flag the run as stalled when this many consecutive logged train losses sit within 0.01 of
    # ln(vocab_size), the uniform predictor's loss (0 = never).
    stall_steps: int = 20

    # ---- model (SPEC 2) -----------------------------------------------------------------
    vocab_size: int = 8192
    num_layers: int = 11
    xsa_last_n: int = 11
    model_dim: int = 512
    embedding_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    skip_gates_enabled: bool = True
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 16
    rope_train_seq_len: int = 2048
    ln_scale: bool = True
    qk_gain_init: float = 5.25
    num_loops: int = 2
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.35
    parallel_residual_start: int = 7
    # SparseAttnGate (#1787): per-head sigmoid gate on the attention output, fed by the first
    # gate_window dims of the attention input (parlm.model.gates.sparse_attn_gate).
    sparse_attn_gate_enabled: bool = False
    sparse_attn_gate_scale: float = 1.0  # multiplier inside the gate's sigmoid (#1855: 0.5)
    gate_window: int = 12  # input dims of the SparseAttnGate and SmearGate projections (#1787)
    # BOS-fixed SmearGate (#1851/#1855): x_t += lambda sigmoid(W x_t[:gate_window]) x_{t-1} on the
    # embedding, never across a document start (parlm.model.gates.SmearGate).
    smear_gate_enabled: bool = False
    # AsymLogit (#1923 ASYM_LOGIT_RESCALE): separate learned caps for positive and negative
    # logits, init logit_softcap, trained only by TTT (parlm.model.gates.asymmetric_softcap).
    asym_logit_rescale: bool = False

    # ---- optimizers (SPEC 3.3) ----------------------------------------------------------
    min_lr: float = 0.0  # floor of the warmdown LR multiplier, a fraction of peak (#1787: 0.1)
    embed_lr: float = 0.6  # unused with tied embeddings (kept for parity)
    head_lr: float = 0.008  # unused with tied embeddings (kept for parity)
    tied_embed_lr: float = 0.03
    tied_embed_init_std: float = 0.005
    matrix_lr: float = 0.022
    scalar_lr: float = 0.02
    muon_momentum: float = 0.99
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_row_normalize: bool = True
    # Newton-Schulz coefficients of MuonEq-R: "reference" (3.4445, -4.7750, 2.0315) every
    # iteration, or "polar_express" per-iteration tuples (#1344/#1787; parlm.train.optim).
    muon_newton_schulz_coefficients: str = "reference"
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    muon_beta2: float = 0.95  # unused in the reference (kept for parity)
    adam_wd: float = 0.02
    muon_wd: float = 0.095
    embed_wd: float = 0.085
    ema_decay: float = 0.9965
    control_tensor_name_patterns: str = REFERENCE_CONTROL_TENSOR_NAME_PATTERNS

    # ---- evaluation and TTT (SPEC 5) ----------------------------------------------------
    eval_stride: int = 64
    eval_batch_seqs: int = 32  # windows per forward in sliding / TTT scoring
    ttt_enabled: bool = True
    ttt_lr: float = 0.005
    ttt_epochs: int = 2
    ttt_momentum: float = 0.9
    ttt_chunk_tokens: int = 32768
    ttt_batch_seqs: int = 32
    ttt_grad_clip_norm: float = 1.0
    # parlm eval knobs (not in the reference): torch.compile mode of the scoring graphs
    # ("default", "reduce-overhead", "max-autotune-no-cudagraphs"); compile the TTT training
    # forward/backward (the reference runs it eagerly; off by default: its compile time exceeds
    # what it saves, README "Measured on GPUs"); re-score each chunk after its update as a
    # labelled diagnostic that never enters the score (costs one more scoring pass).
    eval_compile_mode: str = "default"
    # compile the plain evaluator (validation during training, the quantized score); off: each
    # compile costs far more than the pass it speeds up (README "Measured on GPUs")
    eval_compile_plain: bool = False
    ttt_compile_train: bool = False
    ttt_diagnostic_after: bool = False
    # ---- frontier eval switches (issue 21); all off = PR #1858 behaviour ----------------------
    lora_ttt_enabled: bool = False  # per-document score-first LoRA TTT replaces the chunk TTT (#1530)
    lora_ttt_rank: int = 80  # LoRA rank r of every adapted projection
    lora_ttt_alpha: float = 144.0  # LoRA output scale alpha/r (#1767)
    lora_ttt_lr: float = 1e-4  # AdamW learning rate of the adapters
    lora_ttt_local_lr_factor: float = 1.0  # multiplies lora_ttt_lr (#1953: 0.75)
    lora_ttt_weight_decay: float = 0.5  # AdamW decoupled weight decay of the adapters
    lora_ttt_beta1: float = 0.0  # AdamW beta1 of the adapters
    lora_ttt_beta2: float = 0.99  # AdamW beta2 of the adapters
    lora_ttt_no_qv: bool = False  # no Q/V adapters, only K, O and MLP (#1953/#2014 TTT_MASK=no_qv)
    lora_ttt_chunk_tokens: int = 48  # score-then-update chunk inside a document (tokens)
    lora_ttt_short_chunks: str = ""  # smaller chunks for early document offsets "limit:chunk,..." (#2014: 256:8,2000:24)
    lora_ttt_batch_docs: int = 24  # documents adapted side by side, one adapter slot each
    lora_ttt_phases: int = 0  # global SGD phases over the scored prefix (#1626; late entries: 1)
    lora_ttt_prefix_docs: int = 2500  # documents scored before the last global phase
    lora_ttt_global_lr: float = 0.001  # SGD lr of a global phase (cosine over its chunks)
    lora_ttt_global_epochs: int = 1  # passes of a global phase over the scored prefix
    tilt_enabled: bool = False  # token-only n-gram tilt of the TTT score (#2130/#2135)
    tilt_order: int = 16  # n of the tilt's n-gram: the context is the last n-1 tokens
    tilt_threshold: float = 0.8  # tilt only where the context's top next-token frequency >= this
    tilt_boost: float = 2.625  # beta: log-odds added to the hinted token before renormalizing
    eval_budget_seconds: float = 600.0  # the contest's evaluation wall-clock cap
    eval_budget_margin: float = 0.10  # planner's safety margin (fraction of the cap kept free)
    eval_budget_world_size: int = 8  # GPUs of the target machine (8xH100)
    eval_speed_ratio: float = 1.0  # measured GPU speed / H100 speed (H100 seconds = measured x this)

    # ---- quantization and artifact (SPEC 4) ---------------------------------------------
    compressor: str = "brotli"  # brotli | lzma | per_group (#1855-like per-group choice, stdlib + brotli only)
    gptq_calibration_batches: int = 64
    gptq_reserve_seconds: float = 12.0
    matrix_bits: int = 6
    embed_bits: int = 8
    matrix_clip_sigmas: float = 12.85
    embed_clip_sigmas: float = 20.0
    gptq_block_size: int = 128
    gptq_damping: float = 0.01
    artifact_cap_bytes: int = ARTIFACT_CAP_BYTES
    # Float tensors with <= this many elements are stored fp16; larger ones (and the block
    # linears that get calibration Hessians) go through GPTQ. 65,536 in the reference (SPEC 4.4).
    quant_passthrough_max_numel: int = 65536
    # frontier quantization switches (issue 17), all off by default (PR #1858 behaviour)
    mlp_clip_sigmas: float = 0.0  # SDClip k for MLP weights (#1769: 12.0; #2135: 11.5); 0 = matrix_clip_sigmas
    attn_clip_sigmas: float = 0.0  # SDClip k for attention weights (#1855/#2135: 13.0); 0 = matrix_clip_sigmas
    lqer_top_k: int = 0  # LQER (#1797): low-rank residual correction of the k largest-error tensors; 0 = off
    lqer_rank: int = 4  # LQER: rank r of the residual factorization W - dequant(Q) ~ A B
    lqer_group_size: int = 64  # LQER: int4 group size over the flattened B factor
    awq_lite_groups: int = 0  # AWQ-lite (#1908): most salient input-column groups kept at awq_lite_bits; 0 = off
    awq_lite_group_size: int = 64  # AWQ-lite: columns per salient group
    awq_lite_bits: int = 8  # AWQ-lite: code width of the salient groups

    # ---- PPM byte mixture (SPEC 6) ------------------------------------------------------
    ppm_enabled: bool = True
    ppm_order: int = 5
    ppm_subset_tokens: int = 8_000_000  # <= 0 means all scored positions
    ppm_lambda_hi: float = 0.9
    ppm_lambda_lo: float = 0.05
    ppm_conf_threshold: float = 0.9
    ppm_anti_hijack_nats: float = 0.277

    # ---- parlm's valid token-level mixture (issue: PPM) ---------------------------------
    mixture_enabled: bool = False
    mixture_order: int = 3  # longest token context of the count model (tokens)
    mixture_lambda_init: float = 0.05  # gate weight of the count model before any evidence
    mixture_gate_prior: float = 1000.0  # pseudo-count of mixture_lambda_init in the gate's EM
    mixture_gate_bins: int = 8  # confidence bins per context order of the learned gate

    # ------------------------------------------------------------------------------------
    # Derived values
    @property
    def resolved_dataset_name(self) -> str:
        return self.dataset_name or f"fineweb10B_sp{self.vocab_size}"

    @property
    def datasets_dir(self) -> str:
        return os.path.join(self.data_dir, "datasets", self.resolved_dataset_name)

    @property
    def train_files(self) -> str:
        return os.path.join(self.datasets_dir, "fineweb_train_*.bin")

    @property
    def val_files(self) -> str:
        return os.path.join(self.datasets_dir, "fineweb_val_*.bin")

    @property
    def resolved_tokenizer_path(self) -> str:
        if self.tokenizer_path:
            return self.tokenizer_path
        return os.path.join(self.data_dir, "tokenizers", f"fineweb_{self.vocab_size}_bpe.model")

    @property
    def control_patterns(self) -> tuple[str, ...]:
        """control_tensor_name_patterns, then SWITCH_CONTROL_TENSOR_NAME_PATTERNS not among them."""
        patterns = tuple(p for p in self.control_tensor_name_patterns.split(",") if p)
        return patterns + tuple(p for p in SWITCH_CONTROL_TENSOR_NAME_PATTERNS if p not in patterns)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step: `micro_batches_per_step // world_size` (SPEC 3.1)."""
        self.check_world_size(world_size)
        return self.micro_batches_per_step // world_size

    def effective_wallclock_ms(self) -> float | None:
        """Training budget in ms: (max_wallclock_seconds - gptq_reserve_seconds)*1000, or None."""
        if self.max_wallclock_seconds <= 0:
            return None
        return 1000.0 * (self.max_wallclock_seconds - self.gptq_reserve_seconds)

    # ------------------------------------------------------------------------------------
    # Validation: FIELD_RULES and CROSS_FIELD_RULES below declare what each value may be.
    def __post_init__(self) -> None:
        """Coerce field values to their declared types (CLI strings, YAML ints for floats) and
        raise one ConfigError listing every problem, so no invalid Config exists."""
        for name in FIELD_TYPES:
            setattr(self, name, _coerce(name, getattr(self, name)))
        problems = self.problems()
        if problems:
            raise ConfigError.from_problems(problems)

    def problems(self) -> list[str]:
        """One line per violated rule: the type and range of each field (FIELD_RULES), then the
        rules between fields (CROSS_FIELD_RULES) whose fields are each valid on their own."""
        found, bad = [], set()
        for name, kind in FIELD_TYPES.items():
            problem = _field_problem(name, kind, getattr(self, name))
            if problem:
                found.append(problem)
                bad.add(name)
        for rule in CROSS_FIELD_RULES:
            if not bad.intersection(rule.keys) and not rule.holds(self):
                found.append(rule.explain(self))
        return found

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError unless world_size divides micro_batches_per_step (each rank then
        runs micro_batches_per_step // world_size whole micro-batches per step)."""
        if world_size <= 0:
            raise ConfigError(f"world size must be positive, got {world_size}")
        if self.micro_batches_per_step % world_size != 0:
            divisors = [d for d in range(1, self.micro_batches_per_step + 1)
                        if self.micro_batches_per_step % d == 0]
            raise ConfigError(
                f"world size {world_size} does not divide micro_batches_per_step="
                f"{self.micro_batches_per_step}; use --nproc in {divisors} or set "
                f"micro_batches_per_step to a multiple of {world_size}")

    def train_seq_stages(self) -> list[tuple[float, int]]:
        """train_seq_schedule as sorted (fraction, seq_len) stages, the last at fraction 1.0
        (#2014's parser: a schedule ending before 1.0 keeps its last length); [(1.0,
        train_seq_len)] when the schedule is empty. Raises ConfigError on a malformed stage."""
        stages = []
        for stage in (s.strip() for s in self.train_seq_schedule.split(",")):
            if not stage:
                continue
            length, _, fraction = stage.partition("@")
            try:
                stages.append((float(fraction), int(length)))
            except ValueError:
                raise ConfigError(f"train_seq_schedule stage {stage!r} must look like 1024@0.1 "
                                  f"(sequence length @ training fraction)") from None
            if stages[-1][1] <= 0 or not 0.0 < stages[-1][0] <= 1.0:
                raise ConfigError(f"train_seq_schedule stage {stage!r} needs a positive length and "
                                  f"a fraction in (0, 1]")
        if not stages:
            return [(1.0, self.train_seq_len)]
        stages.sort()
        if stages[-1][0] < 1.0:
            stages.append((1.0, stages[-1][1]))
        return stages

    def check_train_seq_schedule(self) -> None:
        """Raise ConfigError unless the schedule's longest length is train_seq_len (RoPE tables
        and the loader are sized by it) and every length splits a micro-batch into whole rows."""
        if not self.train_seq_schedule.strip():
            return
        lengths = [length for _, length in self.train_seq_stages()]
        if max(lengths) != self.train_seq_len:
            raise ConfigError(f"train_seq_schedule={self.train_seq_schedule!r} must reach "
                              f"train_seq_len={self.train_seq_len}; set train_seq_len={max(lengths)}")
        per_rank = self.train_batch_tokens // self.micro_batches_per_step
        uneven = sorted({length for length in lengths if per_rank % length})
        if uneven:
            raise ConfigError(f"train_seq_schedule lengths {uneven} do not divide the "
                              f"{per_rank}-token micro-batch (train_batch_tokens // "
                              f"micro_batches_per_step); use divisors of {per_rank}")

    def check_vocab(self, tokenizer_vocab_size: int) -> None:
        """Raise ConfigError when the tokenizer's vocabulary differs from `vocab_size`."""
        if int(tokenizer_vocab_size) != self.vocab_size:
            raise ConfigError(
                f"vocab_size={self.vocab_size} but the tokenizer has {tokenizer_vocab_size} "
                f"pieces; set vocab_size={tokenizer_vocab_size} or point tokenizer_path at a "
                f"{self.vocab_size}-piece model")

    def validate(self, world_size: int | None = None, tokenizer_vocab_size: int | None = None) -> "Config":
        """Check every rule again (a field may have been assigned since construction), plus the
        world size and the tokenizer's vocabulary when given; one ConfigError lists every
        problem. Returns self so calls can chain."""
        problems = self.problems()
        for check, argument in ((self.check_world_size, world_size), (self.check_vocab, tokenizer_vocab_size)):
            if argument is not None:
                try:
                    check(argument)
                except ConfigError as error:
                    problems.append(str(error))
        if problems:
            raise ConfigError.from_problems(problems)
        return self

    # ------------------------------------------------------------------------------------
    # Overrides and files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with `overrides` applied (checked names, values coerced to field types)."""
        data = self.to_dict()
        data.update(_coerce_all(overrides))
        return Config(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (every field, sorted by declaration)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> "Config":
        """Read a YAML file of field values (a partial file overrides the defaults)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        if "rope_bf16_positions" in data:  # configs saved before rope_precision existed
            data["rope_precision"] = "reference_eager" if data.pop("rope_bf16_positions") else "float32"
        try:
            cfg = cls().replace(**data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cfg.replace(**(overrides or {}))

    @classmethod
    def from_preset(cls, name: str, overrides: Mapping[str, Any] | None = None) -> "Config":
        """The named preset (`demo`, `proxy`, `fineweb`, ...) from parlm/presets, plus overrides.

        Relative `data_dir`/`tokenizer_path` of the preset are anchored at the project root, so
        the result does not depend on the working directory; overrides apply as given."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown preset {name!r}; known presets: {known}")
        config = cls.load(path)
        root = PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").exists() else Path.cwd()
        anchored = {key: str(root / getattr(config, key)) for key in PRESET_PATH_KEYS
                    if getattr(config, key) and not os.path.isabs(getattr(config, key))}
        return config.replace(**anchored).replace(**(overrides or {}))


FIELD_TYPES = {f.name: f.type for f in fields(Config)}


# ----------------------------------------------------------------------------------------------
# What each field may be. Config.__post_init__ checks every field's type (floats also finite),
# then FIELD_RULES, then CROSS_FIELD_RULES, and raises one ConfigError listing each problem.

@dataclass(frozen=True)
class Allowed:
    """The values a field accepts beyond its type: numbers from `low` to `high` (None:
    unbounded; `low_open`/`high_open`: that end excluded), or else one of `choices`. `note`
    says what special values mean."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    note: str = ""

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, kind: str) -> str:
        """E.g. "an integer >= 1 (0 = never)", "a finite number in [0, 1)", "one of 'a', 'b'"."""
        if self.choices:
            text = "one of " + ", ".join(repr(choice) for choice in self.choices)
        elif self.low is not None and self.high is not None:
            text = (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = kind
        return f"{text} ({self.note})" if self.note else text


def at_least(low: float, note: str = "") -> Allowed:
    return Allowed(low=low, note=note)


def above(low: float, note: str = "") -> Allowed:
    return Allowed(low=low, low_open=True, note=note)


def within(low: float, high: float, high_open: bool = False, note: str = "") -> Allowed:
    return Allowed(low=low, high=high, high_open=high_open, note=note)


def one_of(*choices: Any, note: str = "") -> Allowed:
    return Allowed(choices=choices, note=note)


FRACTION = within(0.0, 1.0)
DECAY = within(0.0, 1.0, high_open=True)  # momenta, betas and the EMA: 1 would never move
RATE = at_least(0.0)  # learning rates and weight decays (0 freezes / disables)
COUNT = at_least(1)
ATTENTION_BACKENDS = ("auto", "fa3", "fa4", "cudnn", "flash", "efficient", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Fields absent here only need their type (and, for floats, a finite value).
FIELD_RULES: dict[str, Allowed] = {
    # ---- run and data
    "seed": at_least(0, "the data sampler's PCG64 takes non-negative seeds"),
    "device": one_of("auto", "cuda", "cpu"),
    "compile": one_of("auto", "on", "off"),
    "attention_backend": one_of(*ATTENTION_BACKENDS),
    "rope_precision": one_of(*ROPE_PRECISIONS),
    "text_transform": one_of("none", "caseops"),
    "seq_change_warmup_steps": at_least(0),
    "checkpoint_every_seconds": at_least(0.0),
    "checkpoint_every_steps": at_least(0),
    "stall_steps": at_least(0),
    "gate_window": COUNT,
    "sparse_attn_gate_scale": above(0.0),
    "muon_newton_schulz_coefficients": one_of(*MUON_NEWTON_SCHULZ_COEFFICIENTS),
    "byte_accounting": one_of("tables", "sidecar"),
    "data_order": one_of("seed_and_rank", "rank"),
    "micro_batches_per_step": COUNT,
    "val_max_tokens": at_least(0, "0 = the whole validation stream"),
    # ---- training
    "iterations": COUNT,
    "warmdown_frac": FRACTION,
    "warmup_steps": at_least(0),
    "train_batch_tokens": COUNT,
    "train_seq_len": COUNT,
    "train_log_every": at_least(0, "0 = never"),
    "max_wallclock_seconds": at_least(0.0, "0 = no limit"),
    "val_batch_tokens": COUNT,
    "eval_seq_len": COUNT,
    "val_loss_every": at_least(0, "0 = only at the end"),
    # ---- model
    "vocab_size": within(2, 65536, note="token ids are stored as uint16"),
    "num_layers": COUNT,
    "xsa_last_n": at_least(0),
    "model_dim": COUNT,
    "embedding_dim": COUNT,
    "num_heads": COUNT,
    "num_kv_heads": COUNT,
    "mlp_mult": above(0.0),
    "tie_embeddings": one_of(True, note="the reference ties them; untied heads are not implemented"),
    "logit_softcap": above(0.0),
    "rope_base": above(0.0),
    "rope_dims": at_least(0),
    "rope_train_seq_len": COUNT,
    "num_loops": at_least(0, "0 = no recurrence"),
    "loop_start": at_least(0),
    "loop_end": at_least(0),
    "enable_looping_at": FRACTION,
    # ---- optimizers
    "min_lr": FRACTION,
    "embed_lr": RATE, "head_lr": RATE, "tied_embed_lr": RATE, "matrix_lr": RATE, "scalar_lr": RATE,
    "tied_embed_init_std": at_least(0.0),
    "muon_momentum": DECAY,
    "muon_backend_steps": COUNT,
    "muon_momentum_warmup_start": DECAY,
    "muon_momentum_warmup_steps": at_least(0, "0 = no warmup"),
    "beta1": DECAY, "beta2": DECAY, "muon_beta2": DECAY,
    "adam_eps": above(0.0),
    "grad_clip_norm": at_least(0.0, "0 = no clipping"),
    "adam_wd": RATE, "muon_wd": RATE, "embed_wd": RATE,
    "ema_decay": DECAY,
    # ---- evaluation and TTT
    "eval_stride": COUNT,
    "eval_batch_seqs": COUNT,
    "ttt_lr": RATE,
    "ttt_epochs": at_least(0, "0 = score only"),
    "ttt_momentum": DECAY,
    "ttt_chunk_tokens": COUNT,
    "ttt_batch_seqs": COUNT,
    "ttt_grad_clip_norm": above(0.0),
    "eval_compile_mode": one_of(*COMPILE_MODES),
    "lora_ttt_rank": COUNT,
    "lora_ttt_alpha": above(0.0),
    "lora_ttt_lr": at_least(0.0),
    "lora_ttt_local_lr_factor": at_least(0.0),
    "lora_ttt_weight_decay": at_least(0.0),
    "lora_ttt_beta1": DECAY,
    "lora_ttt_beta2": DECAY,
    "lora_ttt_chunk_tokens": COUNT,
    "lora_ttt_batch_docs": COUNT,
    "lora_ttt_phases": at_least(0),
    "lora_ttt_prefix_docs": at_least(0),
    "lora_ttt_global_lr": at_least(0.0),
    "lora_ttt_global_epochs": at_least(0),
    "tilt_order": at_least(2),
    "tilt_threshold": within(0.0, 1.0),
    "tilt_boost": at_least(0.0),
    "eval_budget_seconds": above(0.0),
    "eval_budget_margin": within(0.0, 1.0, high_open=True),
    "eval_budget_world_size": COUNT,
    "eval_speed_ratio": above(0.0),
    # ---- quantization and artifact
    "compressor": one_of("brotli", "lzma", "per_group"),
    "gptq_calibration_batches": COUNT,
    "mlp_clip_sigmas": at_least(0.0),
    "attn_clip_sigmas": at_least(0.0),
    "lqer_top_k": at_least(0),
    "lqer_rank": COUNT,
    "lqer_group_size": COUNT,
    "awq_lite_groups": at_least(0),
    "awq_lite_group_size": COUNT,
    "awq_lite_bits": within(2, 8, note="codes are stored in int8"),
    "gptq_reserve_seconds": at_least(0.0),
    "matrix_bits": within(2, 8, note="codes are stored in int8"),
    "embed_bits": within(2, 8, note="codes are stored in int8"),
    "matrix_clip_sigmas": above(0.0),
    "embed_clip_sigmas": above(0.0),
    "gptq_block_size": COUNT,
    "gptq_damping": at_least(0.0),
    "artifact_cap_bytes": COUNT,
    "quant_passthrough_max_numel": at_least(0),
    # ---- PPM byte mixture
    "ppm_order": COUNT,
    "ppm_lambda_hi": FRACTION,
    "ppm_lambda_lo": FRACTION,
    "ppm_conf_threshold": FRACTION,
    "ppm_anti_hijack_nats": at_least(0.0),
    # ---- valid token mixture
    "mixture_order": at_least(0),
    "mixture_lambda_init": FRACTION,
    "mixture_gate_prior": at_least(0.0),
    "mixture_gate_bins": COUNT,
}


class CrossFieldRule(NamedTuple):
    """A rule between fields: checked only when each of `keys` is valid on its own;
    `explain` gives the one-line problem (values and the fix) when `holds` is False."""

    keys: tuple[str, ...]
    holds: Callable[[Config], bool]
    explain: Callable[[Config], str]


def _key_bits(vocab_size: int) -> int:
    return max(1, (vocab_size - 1).bit_length())


def _train_seq_schedule_problem(config) -> str | None:
    try:
        config.check_train_seq_schedule()
    except ConfigError as error:
        return str(error)
    return None


CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(("tilt_enabled", "mixture_enabled"), lambda c: not (c.tilt_enabled and c.mixture_enabled),
                   lambda c: "tilt_enabled and mixture_enabled both re-score the TTT pass; turn one off "
                             "(--set mixture_enabled=false for the frontier tilt)"),
    CrossFieldRule(("train_seq_schedule", "train_seq_len", "train_batch_tokens", "micro_batches_per_step"),
                   lambda c: _train_seq_schedule_problem(c) is None, _train_seq_schedule_problem),
    CrossFieldRule(("sparse_attn_gate_enabled", "smear_gate_enabled", "gate_window", "model_dim"),
                   lambda c: not (c.sparse_attn_gate_enabled or c.smear_gate_enabled) or c.gate_window <= c.model_dim,
                   lambda c: f"gate_window={c.gate_window} must be at most model_dim={c.model_dim}"),
    CrossFieldRule(("awq_lite_groups", "matrix_bits", "awq_lite_bits"),
                   lambda c: c.awq_lite_groups == 0 or c.matrix_bits < c.awq_lite_bits,
                   lambda c: f"awq_lite_bits={c.awq_lite_bits} must be above matrix_bits={c.matrix_bits} "
                             f"(the salient groups keep more bits)"),
    CrossFieldRule(("text_transform", "byte_accounting"),
                   lambda c: c.text_transform != "caseops" or c.byte_accounting == "sidecar",
                   lambda c: "text_transform=caseops counts BPB in the original text's bytes only with "
                             "byte_accounting=sidecar (the tables would count transformed bytes); set it"),
    CrossFieldRule(("model_dim", "num_heads"), lambda c: c.model_dim % c.num_heads == 0,
                   lambda c: f"model_dim={c.model_dim} must be a multiple of num_heads={c.num_heads}"),
    CrossFieldRule(("num_heads", "num_kv_heads"), lambda c: c.num_heads % c.num_kv_heads == 0,
                   lambda c: f"num_heads={c.num_heads} must be a multiple of num_kv_heads={c.num_kv_heads}"),
    CrossFieldRule(("model_dim", "num_heads", "rope_dims"),
                   lambda c: (c.model_dim // c.num_heads) % 2 == 0 and c.rope_dims % 2 == 0
                   and c.rope_dims <= c.model_dim // c.num_heads,
                   lambda c: f"rope_dims={c.rope_dims} must be even and <= head_dim=model_dim/num_heads="
                             f"{c.model_dim // c.num_heads}, which must be even"),
    CrossFieldRule(("embedding_dim", "model_dim"), lambda c: c.embedding_dim == c.model_dim,
                   lambda c: f"embedding_dim={c.embedding_dim} must equal model_dim={c.model_dim} "
                             f"(parlm has no embedding/head projections)"),
    CrossFieldRule(("num_loops", "loop_start", "loop_end", "num_layers"),
                   lambda c: c.num_loops == 0 or c.loop_start <= c.loop_end < c.num_layers,
                   lambda c: f"loop_start={c.loop_start}..loop_end={c.loop_end} must be an ordered range "
                             f"inside 0..num_layers-1={c.num_layers - 1} (or num_loops=0)"),
    CrossFieldRule(("train_batch_tokens", "micro_batches_per_step", "train_seq_len"),
                   lambda c: c.train_batch_tokens % (c.micro_batches_per_step * c.train_seq_len) == 0,
                   lambda c: f"train_batch_tokens={c.train_batch_tokens} must split into "
                             f"micro_batches_per_step={c.micro_batches_per_step} micro-batches of whole "
                             f"train_seq_len={c.train_seq_len} sequences; choose a multiple of "
                             f"{c.micro_batches_per_step * c.train_seq_len}"),
    CrossFieldRule(("val_batch_tokens", "micro_batches_per_step", "eval_seq_len"),
                   lambda c: c.val_batch_tokens >= c.micro_batches_per_step * c.eval_seq_len,
                   lambda c: f"val_batch_tokens={c.val_batch_tokens} must hold at least one "
                             f"eval_seq_len={c.eval_seq_len} sequence per micro-batch "
                             f"(micro_batches_per_step={c.micro_batches_per_step}): at least "
                             f"{c.micro_batches_per_step * c.eval_seq_len}"),
    CrossFieldRule(("eval_stride", "eval_seq_len"), lambda c: c.eval_stride <= c.eval_seq_len,
                   lambda c: f"eval_stride={c.eval_stride} must be in 1..eval_seq_len={c.eval_seq_len}"),
    CrossFieldRule(("ttt_chunk_tokens", "eval_stride"), lambda c: c.ttt_chunk_tokens % c.eval_stride == 0,
                   lambda c: f"ttt_chunk_tokens={c.ttt_chunk_tokens} must be a multiple of eval_stride="
                             f"{c.eval_stride} so each chunk scores whole stride blocks"),
    CrossFieldRule(("max_wallclock_seconds", "gptq_reserve_seconds"),
                   lambda c: c.max_wallclock_seconds == 0 or c.gptq_reserve_seconds < c.max_wallclock_seconds,
                   lambda c: f"gptq_reserve_seconds={c.gptq_reserve_seconds} leaves no training time out of "
                             f"max_wallclock_seconds={c.max_wallclock_seconds}"),
    CrossFieldRule(("mixture_enabled", "mixture_order", "vocab_size"),
                   lambda c: not c.mixture_enabled or (c.mixture_order + 1) * _key_bits(c.vocab_size) <= 63,
                   lambda c: f"mixture_order={c.mixture_order} with vocab_size={c.vocab_size} needs "
                             f"{(c.mixture_order + 1) * _key_bits(c.vocab_size)} bits per exact int64 "
                             f"context key; use mixture_order <= {63 // _key_bits(c.vocab_size) - 1}"),
)


def _coerce(name: str, value: Any) -> Any:
    """`value` (YAML value or CLI string) converted to the declared type of field `name` where
    that loses nothing ("3" -> 3, 2.0 -> 2, 3 -> 3.0, "on" -> True); anything else is returned
    unchanged for the validation pass to report. An unknown name raises ConfigError."""
    if name not in FIELD_TYPES:
        close = difflib.get_close_matches(name, FIELD_TYPES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key {name!r}{hint}")
    kind = FIELD_TYPES[name]
    if kind == "bool":
        if isinstance(value, str):
            return BOOL_WORDS.get(value.strip().lower(), value)
        return bool(value) if isinstance(value, int) and value in (0, 1) else value
    if kind == "int":
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if kind == "float":
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                return value
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `run_id: 20240101` as a number
    return value


BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}
KIND_WORDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def _field_problem(name: str, kind: str, value: Any) -> str | None:
    """The one-line problem of one field's value (type, finiteness, FIELD_RULES), or None."""
    rule = FIELD_RULES.get(name, Allowed())
    typed = {"int": isinstance(value, int) and not isinstance(value, bool),
             "float": isinstance(value, float) and math.isfinite(value),
             "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]
    if typed and rule.admits(value):
        return None
    return f"{name}={value!r}: must be {rule.describe(KIND_WORDS[kind])}"


def _coerce_all(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _coerce(k, v) for k, v in values.items()}


def compile_enabled(config: Config, device) -> bool:
    """`compile`: "on" always, "off" never, "auto" on CUDA only (`device`: torch device or str)."""
    if config.compile in ("on", "off"):
        return config.compile == "on"
    return str(device).startswith("cuda")


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings into an override dict with known keys, values converted to
    the field types where possible (the Config they build checks the values). One ConfigError
    lists every malformed pair and unknown key."""
    out: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        if "=" not in pair:
            problems.append(f"override {pair!r} must look like key=value")
            continue
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = _coerce(key.strip(), value)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError.from_problems(problems)
    return out


def add_config_arguments(parser) -> None:
    """Add the shared `--config/--preset/--set` flags to an argparse parser."""
    parser.add_argument("--config", help="YAML config file (a run folder's config.yaml)")
    parser.add_argument("--preset", help="named preset from parlm/presets (demo, proxy, fineweb)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (repeatable)")


def config_from_arguments(args, run_dir: str | os.PathLike | None = None) -> Config:
    """Resolve a Config from parsed flags: --config, else <run_dir>/config.yaml, else --preset,
    else defaults; then apply --set overrides."""
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    if getattr(args, "config", None):
        return Config.load(args.config, overrides)
    if run_dir is not None and (Path(run_dir) / "config.yaml").exists():
        return Config.load(Path(run_dir) / "config.yaml", overrides)
    if getattr(args, "preset", None):
        return Config.from_preset(args.preset, overrides)
    return Config().replace(**overrides)
