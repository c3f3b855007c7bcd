"""Variants (named override sets, one YAML file in the package) and the job list of an ablation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from parlm.config import ConfigError

VARIANTS_FILE = Path(__file__).resolve().parent / "variants.yaml"
VARIANT_KEYS = {"overrides", "paired", "preset", "pr"}


@dataclass(frozen=True)
class Variant:
    """One named set of config overrides; `paired` variants reuse the base's trained weights."""

    name: str
    overrides: dict = field(default_factory=dict)
    paired: bool = False
    preset: str | None = None
    pr: int | None = None

    def set_flags(self) -> list[str]:
        """The overrides as `key=value` strings, in file order (YAML lists as [a,b])."""
        return [f"{key}={_flag_value(value)}" for key, value in self.overrides.items()]


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_flag_value(item) for item in value) + "]"
    return str(value)


def load_variants(path: str | Path = VARIANTS_FILE) -> dict[str, Variant]:
    """name -> Variant from a variants YAML file (format in parlm/ablate/variants.yaml)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of variant names, got {type(data).__name__}")
    variants = {}
    for name, body in data.items():
        body = body or {}
        unknown = set(body) - VARIANT_KEYS
        if unknown:
            raise ConfigError(f"{path}: variant {name!r} has unknown keys {sorted(unknown)}; "
                              f"allowed: {sorted(VARIANT_KEYS)}")
        overrides = body.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: variant {name!r} overrides must be a mapping of config keys")
        variants[str(name)] = Variant(str(name), dict(overrides), bool(body.get("paired", False)),
                                      body.get("preset"), body.get("pr"))
    return variants


@dataclass(frozen=True)
class Job:
    """One (variant, seed) run of the per-seed pipeline, in runs/<run_id>/<variant>/seed_<seed>."""

    variant: str
    seed: int
    preset: str
    overrides: tuple[str, ...]
    run_id: str
    runs_dir: str
    paired_with: str | None = None  # the base variant whose checkpoint this job reuses
    nproc: int = 1

    @property
    def run_root(self) -> Path:
        return Path(self.runs_dir) / self.run_id / self.variant

    @property
    def seed_dir(self) -> Path:
        return self.run_root / f"seed_{self.seed}"

    def command(self, python: str) -> list[str]:
        """`python -m parlm.run` for this job alone (no report: the ablation makes its own)."""
        flags = [part for item in self.overrides for part in ("--set", item)]
        return [python, "-m", "parlm.run", "--preset", self.preset, "--seeds", str(self.seed),
                "--run-id", f"{self.run_id}/{self.variant}", "--runs-dir", self.runs_dir,
                "--nproc", str(self.nproc), "--no-report", "--baseline", "none", *flags]


def build_jobs(variants: dict[str, Variant], base: str, names: list[str], seeds: list[int], preset: str,
               run_id: str, runs_dir: str | Path, common: list[str] = (), steps: int | None = None,
               nproc: int = 1) -> list[Job]:
    """Jobs for the base and every named variant x seed (base first). Overrides apply in the
    order: --steps (iterations=N, max_wallclock_seconds=0), the command's --set flags, the
    variant's own. A paired variant's job reuses the base job of its seed."""
    missing = [name for name in [base, *names] if name not in variants]
    if missing:
        raise ConfigError(f"unknown variant(s) {missing}; known: {sorted(variants)} (parlm/ablate/variants.yaml)")
    shared = ([f"iterations={steps}", "max_wallclock_seconds=0"] if steps else []) + list(common)
    jobs = []
    for name in [base] + [n for n in names if n != base]:
        variant = variants[name]
        for seed in seeds:
            jobs.append(Job(name, seed, variant.preset or preset, tuple(shared + variant.set_flags()), run_id,
                            str(runs_dir), base if variant.paired and name != base else None, nproc))
    return jobs
