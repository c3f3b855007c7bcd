"""Training under faults (issue 15): a killed run resumes exactly, a divergence message whose
command works, a loss stalled at the uniform predictor is flagged, step-count runs repeat.

Expected values come from independent runs of the same config (CPU training is
deterministic for a fixed seed and step count), never from the code under test."""
from __future__ import annotations

import json
import math
import shlex

import pytest
import torch

from parlm import runlog
from parlm.config import ConfigError, parse_overrides
from parlm.train import loop
from parlm.train.checkpoint import CHECKPOINT_DIR
from parlm.train.checks import clear_training, restart_training
from parlm.train.loop import train_run
from parlm.train.state import TrainingDiverged

from test_train import one_thread, pattern_config  # noqa: F401 - the shared fixtures (one_thread is autouse)

# train.json fields that measure time or memory, not what was trained.
TIMING_FIELDS = {"train_seconds", "peak_memory_mib", "tok_per_sec_before_loop", "tok_per_sec_after_loop",
                 "tok_per_sec_per_gpu_before_loop", "tok_per_sec_per_gpu_after_loop",
                 "steady_state_steps", "compile_warmup_seconds", "prequant_seconds"}
# metrics.jsonl fields of the same kind.
TIMING_METRICS = {"time", "tok_per_sec", "tok_per_sec_interval", "memory_mib", "train_time_ms", "seconds"}


def untimed_metrics(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_METRICS} for row in runlog.read_metrics(run_dir)]


def assert_same_weights(run_a, run_b) -> None:
    a, b = torch.load(run_a / "final_model.pt"), torch.load(run_b / "final_model.pt")
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Killed(RuntimeError):
    """Stands for the process being killed in the middle of a step."""


def test_killed_run_resumes_from_its_checkpoint_and_equals_an_uninterrupted_run(pattern_config, tmp_path,
                                                                                 monkeypatch):
    # Looping switches on at step 3 (frac 2/6 < 0.35 <= 3/6), before the checkpoint of step 4.
    config = pattern_config.replace(iterations=6, val_loss_every=4, checkpoint_every_steps=2,
                                    val_max_tokens=512)
    whole = train_run(config, tmp_path / "whole")

    real_step = loop.Trainer.step

    def dies_in_step_5(self, step, lr_scale):
        if step == 4:
            raise Killed("killed during step 5")
        return real_step(self, step, lr_scale)

    monkeypatch.setattr(loop.Trainer, "step", dies_in_step_5)
    with pytest.raises(Killed):
        train_run(config, tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / CHECKPOINT_DIR / "latest.json").read_text())["step"] == 4
    assert not (tmp_path / "resumed" / "final_model.pt").exists()
    monkeypatch.setattr(loop.Trainer, "step", real_step)
    resumed = train_run(config, tmp_path / "resumed")

    assert_same_weights(tmp_path / "whole", tmp_path / "resumed")
    assert untimed_metrics(tmp_path / "resumed") == untimed_metrics(tmp_path / "whole")
    assert resumed["resumed_from_step"] == 4 and whole["resumed_from_step"] is None
    assert resumed["prequant_bpb"] == whole["prequant_bpb"] and resumed["looping_step"] == 3
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert "checkpoint: step 4 saved" in log and "resumed from step 4" in log
    assert not (tmp_path / "resumed" / CHECKPOINT_DIR).exists()  # the final model is what stays
    assert not (tmp_path / "whole" / CHECKPOINT_DIR).exists()


def test_two_step_count_runs_write_identical_train_json(pattern_config, tmp_path):
    config = pattern_config.replace(iterations=4, val_loss_every=2, val_max_tokens=512)
    first, second = train_run(config, tmp_path / "a"), train_run(config, tmp_path / "b")
    assert {k: v for k, v in first.items() if k not in TIMING_FIELDS} == \
        {k: v for k, v in second.items() if k not in TIMING_FIELDS}
    assert first["stopped_by"] == "iterations" and first["steps"] == 4
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_divergence_message_gives_a_restart_command_that_works(pattern_config, tmp_path):
    run_dir = tmp_path / "runs" / "lrtest" / "seed_1337"
    config = pattern_config.replace(iterations=3, val_loss_every=0, tied_embed_lr=1e30,
                                    matrix_lr=0.04, seed=1337, val_max_tokens=512)
    # What parlm.run records about the invocation that made the run.
    runlog.write_json(tmp_path / "runs" / "lrtest" / "run-20260101-000000-1.json",
                      {"preset": "demo", "seeds": [1337], "overrides": ["matrix_lr=0.04", "iterations=3"]})
    with pytest.raises(TrainingDiverged) as caught:
        train_run(config, run_dir)
    message = str(caught.value)
    command = message[message.index("python -m parlm.run"):]
    words = shlex.split(command)
    assert words[:5] == ["python", "-m", "parlm.run", "--preset", "demo"]
    flags = dict(zip(words[3::2], words[4::2]))
    assert flags["--seeds"] == "1337" and flags["--run-id"] == "lrtest"
    assert flags["--runs-dir"] == str(tmp_path / "runs") and words[-2:] == ["--restart-stage", "train"]
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    # Halved rates, the reference default for the absurd one, earlier overrides kept.
    assert sets == ["iterations=3", "matrix_lr=0.02", "scalar_lr=0.01", "tied_embed_lr=0.03"]

    lowered = config.replace(**parse_overrides(sets))
    # The old way, the same run id with lower rates, is refused as a changed config ...
    with pytest.raises(ConfigError, match="already holds a different config"):
        train_run(lowered, run_dir)
    # ... the command's train stage restart (parlm.run --restart-stage train does this) trains.
    restarted = restart_training(run_dir, parse_overrides(sets))
    assert restarted.tied_embed_lr == 0.03 and restarted.matrix_lr == 0.02
    summary = train_run(restarted, run_dir)
    assert summary["diverged"] is False and math.isfinite(summary["prequant_bpb"])
    assert (run_dir / "train.log.prev").exists()  # the diverged attempt's log
    try:  # once parlm.run has the flag, the whole command parses as the CLI's own
        from parlm.run import build_parser

        parser = build_parser()
    except ImportError:
        parser = None
    if parser is not None and any("--restart-stage" in action.option_strings for action in parser._actions):
        args = parser.parse_args(words[3:])
        assert args.run_id == "lrtest" and args.seeds == [1337] and args.overrides == sets


def test_restart_clears_train_and_later_stages_and_keeps_data_settings(tmp_path, tiny_config):
    run_dir = tmp_path / "seed_1"
    tiny_config.save(run_dir / "config.yaml")
    for name in ("train.json", "final_model.pt", "train.log", "quant.json"):
        (run_dir / name).write_text("x")
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in
                [{"stage": "data", "step": 0}, {"stage": "train", "step": 1}, {"stage": "quant"}]))
    for stage in ("data", "train", "quant", "summary"):
        runlog.mark_stage_done(run_dir, stage)
    with pytest.raises(ConfigError, match="vocab_size=2048 differs"):
        restart_training(run_dir, {"vocab_size": 2048})
    assert runlog.stage_done(run_dir, "train")  # a refused restart changes nothing
    removed = clear_training(run_dir)
    assert set(removed) == {"train.json", "final_model.pt", "train.log", ".stages/train.done",
                            ".stages/quant.done", ".stages/summary.done"}
    assert runlog.stage_done(run_dir, "data") and not runlog.stage_done(run_dir, "quant")
    assert [row["stage"] for row in runlog.read_metrics(run_dir)] == ["data", "quant"]


def test_loss_stalled_at_the_uniform_predictor_is_flagged(pattern_config, tmp_path):
    # All learning rates 50: after a few wild steps every logit saturates and the loss sits
    # at ln(1024) = 6.9315 (issue 15 item 5). The run finishes; train.json and the log say so.
    config = pattern_config.replace(iterations=9, val_loss_every=0, stall_steps=3, val_max_tokens=512,
                                    matrix_lr=50.0, scalar_lr=50.0, tied_embed_lr=50.0)
    summary = train_run(config, tmp_path)
    rows = runlog.read_metrics(tmp_path, "train")
    assert [row["step"] for row in rows] == list(range(1, 10))  # every step is logged
    at_uniform = [abs(row["train_loss"] - math.log(1024)) <= 0.01 for row in rows]
    # The first stretch of >= 3 consecutive uniform losses, by plain scanning.
    start = next(i for i in range(len(rows) - 2) if all(at_uniform[i:i + 3]))
    end = start
    while end + 1 < len(rows) and at_uniform[end + 1]:
        end += 1
    assert summary["stalled"] is True and summary["diverged"] is False
    assert summary["stalled_steps"] == [rows[start]["step"], rows[end]["step"]]
    assert "(a uniform predictor) for 3 logged steps" in (tmp_path / "train.log").read_text()
    healthy = train_run(pattern_config.replace(iterations=4, val_loss_every=0, stall_steps=3,
                                               val_max_tokens=512), tmp_path / "ok")
    assert healthy["stalled"] is False and healthy["stalled_steps"] is None
