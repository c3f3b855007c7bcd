"""What must hold before `parlm.train` spends any time: a valid config for this world size
and tokenizer, the dataset on disk, a validation batch that fits, and a run folder without a
finished training (an unfinished earlier attempt is cleared, saying so)."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from parlm import runlog
from parlm.runlog import CHECKPOINT_NAME
from parlm.config import Config, ConfigError

TRAIN_OUTPUTS = ("train.json", CHECKPOINT_NAME)


def check_inputs(config: Config, world_size: int) -> int:
    """Fail before any training when the run cannot work: the config (`validate`), the data
    (train and val shards, tokenizer) and the validation batch. Returns the train shard count."""
    from parlm.data.shards import ShardError, check_dataset_vocabulary
    from parlm.data.tokenizer import load_tokenizer

    config.validate(world_size)
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
    per_rank = config.val_batch_tokens // (world_size * config.grad_accum_steps(world_size))
    if per_rank < config.eval_seq_len:
        raise ConfigError(
            f"val_batch_tokens={config.val_batch_tokens} gives {per_rank} tokens per rank per "
            f"validation batch, less than eval_seq_len={config.eval_seq_len}; raise it to at least "
            f"{config.eval_seq_len * world_size * config.grad_accum_steps(world_size)}")
    return len(train_files)


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


def clear_unfinished_attempt(run_dir: Path, log) -> None:
    """Refuse a finished train stage; clear the files of an unfinished earlier attempt, saying so
    (the old log is kept as train.log.prev)."""
    if runlog.stage_done(run_dir, "train"):
        raise FileExistsError(f"{run_dir} already holds a finished training (.stages/train.done); "
                              f"use a new run folder, or delete its train outputs to retrain")
    stale = [name for name in (*TRAIN_OUTPUTS, "train.log") if (run_dir / name).exists()]
    rows = runlog.read_metrics(run_dir)
    kept = [r for r in rows if r.get("stage") not in ("train", "val", "prequant")]
    if not stale and len(kept) == len(rows):
        return
    if (run_dir / "train.log").exists():
        os.replace(run_dir / "train.log", run_dir / "train.log.prev")
    for name in TRAIN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    runlog.atomic_write_bytes(run_dir / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in kept).encode())
    log(f"train: an unfinished earlier attempt was found in {run_dir}; removed {stale} and its "
        f"{len(rows) - len(kept)} train/val metric rows (old log kept as train.log.prev)")
