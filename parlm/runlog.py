"""Run folders: logs, metrics, JSON results and stage markers.

Layout of `runs/<run_id>/seed_<seed>/` (DESIGN.md): `config.yaml`, `train.log`,
`metrics.jsonl` (one JSON object per logged step or stage, each with a `stage` key),
stage result files (`train.json`, `quant.json`, `eval.json`, `ppm.json`), `nll.npz`,
`summary.json`, `plots/`. Files are written atomically (temp file + rename) so nothing
half-written ever looks complete; `stage_done` markers drive resume.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from parlm.config import Config, ConfigError

# The trained (EMA) weights the train stage leaves and the quant stage starts from.
CHECKPOINT_NAME = "final_model.pt"
# The result file each pipeline stage writes last (DESIGN.md run-folder contract).
STAGE_RESULT_FILES = {"train": "train.json", "quant": "quant.json", "eval": "eval.json",
                      "ppm": "ppm.json"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling of `path` to write; renamed onto `path` when the block ends
    normally, removed on any error (a full disk, an interrupt), so `path` is either its old
    content or the complete new one and no temporary file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise



def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()

# OSError numbers of a folder that cannot be written: read-only, no permission, full, over quota.
UNWRITABLE = {errno.EACCES: "is not writable", errno.EPERM: "is not writable",
              errno.EROFS: "is on a read-only file system", errno.ENOSPC: "has no space left",
              errno.EDQUOT: "is over its disk quota"}


def unwritable_message(error: OSError, folder: str | os.PathLike) -> str | None:
    """`<path> <why> (<strerror>)` for an OSError of a place that cannot be written (read-only,
    no permission, full disk, quota), else None; the path is the error's file, else `folder`."""
    if error.errno not in UNWRITABLE:
        return None
    return f"{error.filename or folder} {UNWRITABLE[error.errno]} ({error.strerror})"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None so files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented, strict JSON."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: str | os.PathLike, stage: str | None = None) -> list[dict]:
    """All records of `metrics.jsonl` (optionally only those with `stage == stage`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


def stage_marker(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / ".stages" / f"{stage}.done"


def mark_stage_done(run_dir: str | os.PathLike, stage: str) -> None:
    """Record that `stage` finished (written last, after all its outputs)."""
    atomic_write_bytes(stage_marker(run_dir, stage), time.strftime("%Y-%m-%dT%H:%M:%S").encode())


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    return stage_marker(run_dir, stage).exists()


def seed_dirs(run_root: str | os.PathLike) -> list[Path]:
    """The `seed_<n>` folders of a run, sorted by seed number."""
    root = Path(run_root)
    found = [p for p in root.glob("seed_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def config_differences(saved: Config, asked: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, asked value)} for every field where the two configs differ."""
    return {key: (value, getattr(asked, key)) for key, value in saved.to_dict().items()
            if getattr(asked, key) != value}


def mismatch_error(path: Path, differences: dict[str, tuple[Any, Any]]) -> ConfigError:
    """The one-line error for a run folder whose saved config differs from the asked one."""
    lines = ", ".join(f"{k}: {a!r} (saved) vs {b!r} (asked)" for k, (a, b) in differences.items())
    return ConfigError(f"{path} already holds a different config ({lines}); use a new run id or "
                       f"delete the folder to start over")


def record_config(config: Config, run_dir: str | os.PathLike) -> Config:
    """Write `config` as the run folder's `config.yaml` when there is none; when there is one it
    must be the same config (ConfigError naming the differing keys otherwise). A stage called
    directly on a folder records what it ran with this way; `parlm.pipeline.prepare_run` is the
    runner's fuller check (it also allows the changes a resume may make)."""
    path = Path(run_dir) / "config.yaml"
    if path.exists():
        differences = config_differences(Config.load(path), config)
        if differences:
            raise mismatch_error(path, differences)
        return config
    save_config(config, path)
    return config


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write a resolved config as YAML atomically (`Config.save` through a temporary file)."""
    with atomic_path(path) as tmp:
        config.save(tmp)


def environment_info() -> dict[str, Any]:
    """Versions and device facts that every log starts with (STYLE 6)."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _is_main() -> bool:
    """`dist.is_main()`, imported here because parlm.dist loads torch and the file helpers above
    serve torch-free modules too (data.shards: `python -m parlm.data inspect`)."""
    from parlm import dist

    return dist.is_main()


class RunLogger:
    """Rank-0 logger for one run folder: human lines to `<name>.log` and stdout, machine
    records to `metrics.jsonl`. Other ranks are silent, so it is safe to call everywhere."""

    def __init__(self, run_dir: str | os.PathLike | None, log_name: str = "train.log", echo: bool = True):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_name = log_name
        self.echo = echo
        if self.run_dir is not None and _is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def log(self, message: str, console: bool = True) -> None:
        if not _is_main():
            return
        if console and self.echo:
            print(message, flush=True)
        if self.run_dir is not None:
            with open(self.run_dir / self.log_name, "a", encoding="utf-8") as fh:
                fh.write(message + "\n")

    def metric(self, stage: str, **record: Any) -> None:
        """Append one JSON record `{"stage": stage, "time": unix_seconds, **record}`."""
        if not _is_main() or self.run_dir is None:
            return
        row = {"stage": stage, "time": round(time.time(), 3), **record}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_finite(row), default=_json_default) + "\n")

    def header(self, config) -> None:
        """Log the resolved config, versions, device and nvidia-smi (rank 0)."""
        self.log("=" * 100, console=False)
        for key, value in config.to_dict().items():
            self.log(f"  {key}: {value}", console=False)
        for key, value in environment_info().items():
            self.log(f"{key}: {value}")
        smi = nvidia_smi()
        if smi:
            self.log(smi, console=False)
        self.log("=" * 100, console=False)
