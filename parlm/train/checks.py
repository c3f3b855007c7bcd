"""What must hold before `parlm.train` spends any time: a valid config for this world size
and tokenizer, the dataset on disk with no validation document in its train data (the leak
guard), a validation batch that fits, and a run folder without a
finished training (an unfinished earlier attempt is cleared, saying so, or resumed from its
checkpoint). Also what restarting the train stage of a seed clears, and the command for it."""
from __future__ import annotations

import glob
import json
import math
import os
import shlex
from pathlib import Path

from parlm import dist, runlog
from parlm.runlog import CHECKPOINT_NAME
from parlm.config import Config, ConfigError
from parlm.train.checkpoint import CHECKPOINT_DIR, checkpoint_dir, remove_checkpoints

TRAIN_OUTPUTS = ("train.json", CHECKPOINT_NAME)


def check_inputs(config: Config, world_size: int) -> int:
    """Fail before any training when the run cannot work: the config (`validate`), the data
    (train and val shards, tokenizer), the leak guard (`parlm.data.leak.check_config`: LeakError
    naming how many validation documents are in train, and the fix) and the validation batch.
    Returns the train shard count."""
    from parlm.data.shards import ShardError, check_dataset_vocabulary
    from parlm.data.tokenizer import load_tokenizer

    config.validate(world_size)
    check_checkpoint_settings(config)
    train_files = sorted(glob.glob(config.train_files))
    val_files = sorted(glob.glob(config.val_files))
    tokenizer = Path(config.resolved_tokenizer_path)
    if not train_files or not val_files or not tokenizer.is_file():
        raise FileNotFoundError(f"cannot train: {missing_data_message(config)}")
    if len(train_files) < world_size:
        raise ConfigError(f"{len(train_files)} training shard(s) cannot feed {world_size} processes "
                          f"(each rank reads its own shards); use at most {len(train_files)} processes")
    config.validate(world_size, load_tokenizer(tokenizer).vocab_size())
    try:  # ids >= vocab_size would fail deep inside the embedding, steps into training
        check_dataset_vocabulary(config.datasets_dir, config.vocab_size)
    except ShardError as error:
        raise ConfigError(str(error)) from None
    check_leak(config)
    per_rank = config.val_batch_tokens // (world_size * config.grad_accum_steps(world_size))
    if per_rank < config.eval_seq_len:
        raise ConfigError(
            f"val_batch_tokens={config.val_batch_tokens} gives {per_rank} tokens per rank per "
            f"validation batch, less than eval_seq_len={config.eval_seq_len}; raise it to at least "
            f"{config.eval_seq_len * world_size * config.grad_accum_steps(world_size)}")
    return len(train_files)


def check_leak(config: Config) -> None:
    """The leak guard (`parlm.data.leak.check_config`: manifest hashes, else hashes of the
    token sequences, whose verdict the dataset folder caches) on rank 0, its outcome raised on
    every rank: LeakError naming how many validation documents are in train, and the fix.

    Issue #2127: a preparation script's default put most validation documents into train, so
    every run checks its dataset again. One rank scans (a download's token check reads every
    shard) and writes the cache; the others wait in the broadcast."""
    from parlm.data.leak import check_config

    outcome = None
    if dist.get_rank() == 0:
        try:
            check_config(config)
        except Exception as error:  # every rank must learn it, or the others would wait forever
            outcome = error
    outcome = dist.broadcast_object(outcome)
    if outcome is not None:
        raise outcome


def missing_data_message(config: Config) -> str:
    """What is missing from the config's dataset and the command that creates it."""
    name = config.resolved_dataset_name
    if not name.startswith("stdlib_docs"):
        from parlm.data.corpus import ensure_dataset

        try:  # for these datasets ensure_dataset only checks, and names the command
            ensure_dataset(config)
        except FileNotFoundError as error:
            return str(error)
    return (f"dataset {name!r} has no shards matching {config.train_files} / {config.val_files} "
            f"or no tokenizer at {config.resolved_tokenizer_path}; run the data stage first "
            f"(notebooks/01_data.ipynb, `python -m parlm.run`, or "
            f"parlm.pipeline.ensure(config, run_dir, 'data'), which builds the embedded corpus)")


def clear_unfinished_attempt(run_dir: Path, log, resume_step: int | None = None) -> None:
    """Refuse a finished train stage; clear the files of an unfinished earlier attempt, saying so.

    Without `resume_step` every train output goes (the old log is kept as train.log.prev), with
    any checkpoint. With it (a checkpoint of that step will be resumed) the log is kept and only
    what came after the checkpoint goes: train rows after `resume_step`, val rows from it on
    (the resumed loop validates that step again) and prequant rows."""
    if runlog.stage_done(run_dir, "train"):
        raise FileExistsError(f"{run_dir} already holds a finished training (.stages/train.done); "
                              f"use a new run folder, or delete its train outputs to retrain")
    if resume_step is None:
        remove_checkpoints(run_dir)
    stale = [name for name in TRAIN_OUTPUTS if (run_dir / name).exists()]
    if resume_step is None and (run_dir / "train.log").exists():
        stale.append("train.log")
    rows = runlog.read_metrics(run_dir)
    kept = [r for r in rows if _kept_row(r, resume_step)]
    if not stale and len(kept) == len(rows):
        return
    if resume_step is None and (run_dir / "train.log").exists():
        os.replace(run_dir / "train.log", run_dir / "train.log.prev")
    for name in TRAIN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    runlog.atomic_write_bytes(run_dir / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in kept).encode())
    if resume_step is None:
        log(f"train: an unfinished earlier attempt was found in {run_dir}; removed {stale} and its "
            f"{len(rows) - len(kept)} train/val metric rows (old log kept as train.log.prev)")
    else:
        log(f"train: resuming an unfinished attempt in {run_dir} from its checkpoint of step "
            f"{resume_step}; removed {stale} and {len(rows) - len(kept)} metric rows after it")


def _kept_row(row: dict, resume_step: int | None) -> bool:
    stage = row.get("stage")
    if stage not in ("train", "val", "prequant"):
        return True
    if resume_step is None or stage == "prequant":
        return False
    return row["step"] <= resume_step if stage == "train" else row["step"] < resume_step


# ----------------------------------------------------------------------------------------
# Restarting the train stage of a seed (divergence, a stalled run, changed training settings)

# Stages after training: restarting training makes their results stale.
LATER_STAGES = ("quant", "eval", "ppm", "summary")
# Settings the data stage was built with, and the seed the folder is named after: a restart of
# the train stage cannot change them (a new run id can).
FIXED_ON_RESTART = ("data_dir", "dataset_name", "tokenizer_path", "vocab_size", "seed", "run_id")


def clear_training(run_dir: str | os.PathLike) -> list[str]:
    """Remove everything training wrote into `run_dir` (train.json, final_model.pt, the
    checkpoint, train/val/prequant metric rows; train.log is kept as train.log.prev) and the
    markers of train and every later stage, so the pipeline trains this seed again and reruns
    what depends on it; the data stage stays. Returns the names of the removed files."""
    run_dir = Path(run_dir)
    removed = [name for name in (*TRAIN_OUTPUTS, "train.log") if (run_dir / name).exists()]
    for stage in ("train", *LATER_STAGES):
        marker = runlog.stage_marker(run_dir, stage)
        if marker.exists():
            marker.unlink()
            removed.append(f".stages/{marker.name}")
    if checkpoint_dir(run_dir).exists():
        removed.append(CHECKPOINT_DIR)
    clear_unfinished_attempt(run_dir, lambda message: None)
    return removed


def restart_training(run_dir: str | os.PathLike, overrides: dict) -> Config:
    """`clear_training(run_dir)`, then write the run's config.yaml with `overrides` (checked,
    typed values) applied, so the next training of the seed uses them; returns that config.
    The settings in FIXED_ON_RESTART cannot change (ConfigError naming the key)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); nothing to restart")
    saved = Config.load(path)
    config = saved.replace(**overrides)
    for key in FIXED_ON_RESTART:
        if getattr(config, key) != getattr(saved, key):
            raise ConfigError(f"{key}={getattr(config, key)!r} differs from the run's "
                              f"{getattr(saved, key)!r}; a restart of the train stage keeps {key} "
                              f"(the data stage and the folder depend on it): use a new --run-id")
    clear_training(run_dir)
    config.save(path)
    return config


def restart_command(run_dir: str | os.PathLike, config: Config) -> str:
    """The command that trains this seed again with halved learning rates (a rate above ten
    times the reference default gets the default instead, since halving it would diverge again):
    parlm.run's `--restart-stage train` for this run id and seed,
    with the preset and overrides of the invocation that made the run (runs/<id>/run-*.json)."""
    run_dir = Path(run_dir)
    defaults = Config()
    lowered = {}
    for key in ("matrix_lr", "scalar_lr", "tied_embed_lr"):
        value = getattr(config, key)
        default = getattr(defaults, key)
        lowered[key] = value / 2 if 0 < value <= 10 * default else default
    invocation = _latest_invocation(run_dir.parent)
    preset = invocation.get("preset")
    earlier = [pair for pair in invocation.get("overrides") or []
               if pair.split("=", 1)[0].strip() not in lowered]
    parts = ["python", "-m", "parlm.run"]
    if preset:
        parts += ["--preset", preset]
    parts += ["--seeds", str(config.seed), "--runs-dir", str(run_dir.parent.parent),
              "--run-id", run_dir.parent.name]
    for pair in [*earlier, *(f"{key}={value:g}" for key, value in lowered.items())]:
        parts += ["--set", pair]
    parts += ["--restart-stage", "train"]
    return " ".join(shlex.quote(part) for part in parts)


def _latest_invocation(run_root: Path) -> dict:
    """The newest runs/<id>/run-*.json record parlm.run wrote ({} when there is none)."""
    records = sorted(run_root.glob("run-*.json"))
    if not records:
        return {}
    try:
        return json.loads(records[-1].read_text())
    except (OSError, ValueError):
        return {}


def check_checkpoint_settings(config: Config) -> None:
    """The checkpoint and stall settings are counts or durations: >= 0 and finite."""
    for key in ("checkpoint_every_seconds", "checkpoint_every_steps", "stall_steps"):
        value = getattr(config, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}={value!r} must be >= 0 (0 turns it off)")
