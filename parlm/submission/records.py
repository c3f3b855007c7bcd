"""Export a run as a records folder shaped like the challenge's (SPEC 9.1 "Records"):

    README.md             results table, command lines, artifact accounting
    submission.json       per-seed results and the WORST-CASE bytes_total over seeds
    train_seed<seed>.log  each seed's train.log + quant.log + eval.log
    train_gpt.py          the generated single-file script (parlm.submission.build)

bytes_total of a seed = its compressed model bytes + the size of the exported train_gpt.py,
i.e. of the file committed, not of whatever was counted at quantization time (SPEC 8.2); the
export records whether the run counted the very same script (sha256) and refuses to write a
folder in which any seed exceeds the cap the run itself enforced (`artifact_cap_bytes`).
submission.json always states the contest's cap (16,000,000 bytes) and whether the worst seed
meets it, also for a run that raised its own cap to go on.

The folder is portable: no absolute path of the machine that made it (data paths become
`./data/...`, the checkout's path in the copied logs becomes `.`), the exact reproduce commands
with every setting as a flag, and the environment the seeds were measured on (from the header
of each train.log: python, torch, GPU or CPU).
"""
from __future__ import annotations

import hashlib
import math
import os
import shlex
from pathlib import Path

from parlm.config import ARTIFACT_CAP_BYTES, PROJECT_ROOT
from parlm.runlog import read_json, write_json
from parlm.submission.build import build_submission_script, portable_overrides, write_generated_file

MANIFEST = ".parlm_export.json"
LOG_PARTS = ("train.log", "quant.log", "eval.log")
BPB_KEYS = ("prequant_bpb", "quantized_bpb", "sliding_bpb", "ttt_bpb")
# The environment lines of a train.log header (parlm.runlog.environment_info) that are recorded.
ENVIRONMENT_KEYS = ("python", "torch", "gpu", "gpu_count", "cuda_available", "cpu_count", "platform")


class ExportError(RuntimeError):
    """The run cannot be exported (missing stage results, over the cap, occupied folder)."""


def seed_folders(run_root: Path) -> list[Path]:
    """`seed_<n>` folders of a run, by seed number."""
    found = [p for p in Path(run_root).glob("seed_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def seed_result(folder: Path, code_bytes: int, code_sha256: str) -> dict:
    """One seed's entry: BPBs, seconds and steps from summary/train/eval/quant.json; bytes
    with the exported script's size as the code bytes."""
    files = {name: folder / f"{name}.json" for name in ("summary", "train", "eval", "quant")}
    missing = [str(path) for name, path in files.items() if name != "summary" and not path.exists()]
    if missing:
        raise ExportError(f"{folder} is not finished: {missing} missing; run the remaining stages "
                          f"(`python -m parlm.run ... --run-id {folder.parent.name}`)")
    data = {name: read_json(path) if path.exists() else {} for name, path in files.items()}
    train, evaluation, quant, summary = data["train"], data["eval"], data["quant"], data["summary"]
    result = {key: summary.get(key, train.get(key, evaluation.get(key))) for key in BPB_KEYS}
    result.update(
        steps=train.get("steps"), train_seconds=train.get("train_seconds"),
        ttt_eval_seconds=evaluation.get("ttt_seconds"),
        bytes_model=quant["bytes_model"], bytes_code=code_bytes,
        bytes_total=quant["bytes_model"] + code_bytes,
        bytes_total_at_quantization=quant["bytes_total"],
        code_matches_run=quant.get("code_sha256") == code_sha256,
    )
    if summary.get("mix_bpb_legacy") is not None:
        result["mix_bpb_legacy_not_a_valid_bpb"] = summary["mix_bpb_legacy"]
    return result


def reproduce_commands(overrides: dict, seeds, nproc: int) -> dict[str, list[str]]:
    """The exact commands that rerun these seeds with these settings: the records folder's own
    `train_gpt.py` (KEY=VALUE arguments) and parlm's pipeline (`--set KEY=VALUE` flags; without
    --preset, so Config()'s defaults plus these flags are the whole config)."""
    pairs = [shlex.quote(f"{key}={value}") for key, value in sorted(overrides.items())]
    launcher = (f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py" if nproc > 1
                else "python train_gpt.py")
    script = [" ".join([launcher, f"seed={seed}", *pairs]) for seed in seeds]
    flags = " ".join(f"--set {pair}" for pair in pairs)
    pipeline = [f"python -m parlm.run --nproc {nproc} --seeds {' '.join(map(str, seeds))} {flags}".rstrip()]
    return {"train_gpt": script, "parlm": pipeline}


def measured_environment(folder: Path) -> dict:
    """The environment a seed was trained on: the `key: value` lines of the first header of its
    train.log (ENVIRONMENT_KEYS), plus train.json's device and world_size."""
    found: dict = {}
    log = folder / "train.log"
    if log.exists():
        with log.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(": ")
                if key in ENVIRONMENT_KEYS and key not in found:
                    found[key] = value.strip()
                if line.startswith("world_size:"):  # the header has ended
                    break
    train = folder / "train.json"
    if train.exists():
        data = read_json(train)
        found.update({k: data[k] for k in ("device", "world_size") if k in data})
    return found


def scrub_paths(text: str, run_root: Path, data_dir: str) -> str:
    """A log without the machine's folders: the data folder becomes `./data`, the run folder
    `runs/<id>`, the checkout `.`."""
    for absolute, relative in ((os.path.abspath(data_dir).rstrip("/"), "./data"),
                               (str(Path(run_root).resolve()), f"runs/{Path(run_root).name}"),
                               (str(PROJECT_ROOT), ".")):
        text = text.replace(absolute, relative)
    return text


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _prepare_folder(out_dir: Path) -> None:
    """Create `out_dir`; an existing folder must be empty or an earlier export (manifest)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        manifest = out_dir / MANIFEST
        if not manifest.exists():
            raise ExportError(f"{out_dir} exists and is not an earlier parlm export; choose a new --out")
        for name in read_json(manifest)["files"]:
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _environment_text(environments: dict) -> list[str]:
    lines = []
    for seed, env in environments.items():
        device = env.get("gpu") or env.get("device") or "unknown device"
        count = env.get("world_size") or env.get("gpu_count") or 1
        where = f"{count} x {device}" if env.get("gpu") else (
            f"CPU ({env.get('cpu_count', '?')} cores)" if str(env.get("device")) == "cpu" else device)
        lines.append(f"- seed {seed}: {where}; torch {env.get('torch', '?')}, python "
                     f"{env.get('python', '?')}, {env.get('platform', '?')}")
    return lines


def readme_text(name: str, config, seeds: dict, summary: dict, script_form: str) -> str:
    """README.md of the records folder."""
    rows = ["| Seed | TTT BPB | Sliding BPB | Quantized BPB | Pre-quant BPB | Steps | bytes_total |",
            "|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.5f}" if isinstance(v, float) else "-"  # noqa: E731
    for seed, r in seeds.items():
        rows.append(f"| {seed} | {fmt(r['ttt_bpb'])} | {fmt(r['sliding_bpb'])} | {fmt(r['quantized_bpb'])} | "
                    f"{fmt(r['prequant_bpb'])} | {r['steps']} | {r['bytes_total']:,} |")
    cap = summary["cap"]
    verdict = "meets" if summary["fits_cap"] else "EXCEEDS"
    raised = ("" if summary["run_cap"] == cap else
              f" (the run itself allowed {summary['run_cap']:,} bytes, so that it could go on)")
    commands = summary["reproduce"]
    return "\n".join([
        f"# {name}", "",
        f"**val_bpb = {fmt(summary['val_bpb'])}** (TTT, mean of {len(seeds)} seed(s), std "
        f"{fmt(summary['val_bpb_std'])}) | worst-case bytes_total {summary['bytes_total']:,}: "
        f"{verdict} the contest's cap of {cap:,} bytes{raised}", "",
        *rows, "",
        "## Artifact accounting", "",
        f"bytes_total = compressed model bytes (`final_model.int6.ptz`, GPTQ int6/int8 + brotli-11) + "
        f"{summary['bytes_code']:,} bytes of `train_gpt.py` (this folder's file, {script_form}). "
        f"The top-level bytes_total in submission.json is the largest over the seeds. "
        f"`train_gpt.py` is generated from the parlm package (`python -m parlm.submission build`); "
        f"it refuses to finish when model + code exceed the cap, and never writes over itself.", "",
        "## Measured on", "",
        *_environment_text(summary["environment"]), "",
        "## Reproduce", "",
        f"With this folder's `train_gpt.py` (the data set `{config.resolved_dataset_name}` under "
        "`./data/datasets/` and its tokenizer under `./data/tokenizers/`: the challenge's FineWeb "
        "export, or the set `python -m parlm.data` builds; outputs go to `logs/seed_<seed>/`; needs "
        "torch, numpy, sentencepiece, brotli, pyyaml and tqdm):", "",
        "```", *commands["train_gpt"], "```", "",
        "With the parlm workbook (every stage as a notebook, then this report), from a checkout "
        "with the data under `./data/`:", "",
        "```", *commands["parlm"], "```", "",
        "Every setting that differs from the reference defaults is spelled out as a flag above; "
        "submission.json lists them under `config_overrides`.", "",
    ])


def export(run_root, out_dir, name: str | None = None) -> dict:
    """Write the records folder of `run_root` (seed_<n> folders) into `out_dir` and return the
    submission.json dict (module docstring). Raises ExportError when a seed is unfinished or
    over the cap, or `out_dir` holds something else."""
    from parlm.config import Config

    run_root, out_dir = Path(run_root), Path(out_dir)
    folders = [f for f in seed_folders(run_root) if (f / "quant.json").exists() or (f / "train.json").exists()]
    if not folders:
        raise ExportError(f"{run_root} holds no seed_<n> folder with results")
    for folder in folders:
        if not (folder / "config.yaml").exists():
            raise ExportError(f"{folder} has no config.yaml; it is not a parlm run folder")
    config = Config.load(folders[0] / "config.yaml")
    report: dict = {}
    # One script for every seed: its settings leave the seed to the command line.
    script = build_submission_script(config, report=report)
    code_sha256 = hashlib.sha256(script).hexdigest()
    seeds, caps = {}, {}
    for folder in folders:
        seed_config = Config.load(folder / "config.yaml")
        seeds[str(seed_config.seed)] = seed_result(folder, len(script), code_sha256)
        caps[str(seed_config.seed)] = seed_config.artifact_cap_bytes
    run_cap = min(caps.values())
    over = {seed: r["bytes_total"] for seed, r in seeds.items() if r["bytes_total"] > caps[seed]}
    if over:
        raise ExportError(f"seeds over the cap with this train_gpt.py ({len(script):,} bytes): "
                          + ", ".join(f"{s}: {b:,} > {caps[s]:,} (+{b - caps[s]:,})" for s, b in over.items()))
    val_bpb, val_bpb_std = _mean_std([r["ttt_bpb"] for r in seeds.values()])
    worst = max(r["bytes_total"] for r in seeds.values())
    overrides = portable_overrides(config)
    environments = {seed: measured_environment(folder) for folder, seed in zip(folders, seeds)}
    nproc = max(int(env.get("world_size") or 1) for env in environments.values())
    summary = {
        "name": name or f"parlm {run_root.name}",
        "val_bpb": val_bpb, "val_bpb_std": val_bpb_std,
        "bytes_total": worst,
        "bytes_code": len(script),
        "cap": ARTIFACT_CAP_BYTES, "fits_cap": worst <= ARTIFACT_CAP_BYTES,
        "headroom_bytes": ARTIFACT_CAP_BYTES - worst, "run_cap": run_cap,
        "seeds": seeds,
        "environment": environments,
        "code_sha256": code_sha256, "code_form": report["form"],
        "config_overrides": overrides,
        "reproduce": reproduce_commands(overrides, list(seeds), nproc),
        "generator": "parlm.submission (python -m parlm.submission export)",
    }
    _prepare_folder(out_dir)
    write_generated_file(out_dir / "train_gpt.py", script)
    files = ["train_gpt.py", "submission.json", "README.md"]
    for folder, seed in zip(folders, seeds):
        parts = [f"# ---- {part} ----\n" + scrub_paths((folder / part).read_text(encoding="utf-8"), run_root,
                                                         config.data_dir)
                 for part in LOG_PARTS if (folder / part).exists()]
        (out_dir / f"train_seed{seed}.log").write_text("\n".join(parts), encoding="utf-8")
        files.append(f"train_seed{seed}.log")
    write_json(out_dir / "submission.json", summary)
    (out_dir / "README.md").write_text(readme_text(summary["name"], config, seeds, summary, report["form"]),
                                       encoding="utf-8")
    write_json(out_dir / MANIFEST, {"files": files})
    return summary
