"""Fault injection (issue 15): the faults a new user met, injected on CPU with tiny configs.

Each fault ends in a one-line message and a known exit code, and leaves what had finished
before it as it was (compared file by file with `snapshot`, or file by file by name). Expected
values come from independent computations or independent runs of the same config (CPU training
is deterministic for a fixed seed and step count), never from the code under test.

The items of issue 15's acceptance list and the tests that cover them:

- truncated and garbage artifact: test_resume_reruns_the_stages_after_train_and_keeps_the_rest
  (a resume's one line; train's outputs kept, the artifact rebuilt byte for byte),
  test_parlm_eval_cli_stops_with_one_line_naming_the_file (exit code 1, the run untouched),
  test_every_decode_error_names_the_file, test_without_the_checkpoint_the_resume_stops_with_one_line,
  test_eval_and_ppm_stages_verify_before_reading, test_report_does_not_claim_a_damaged_artifact_fits
- each bad config value (BAD_VALUES: iterations=1.5, train_seq_len=0, device=gpu, matrix_lr=nan,
  ema_decay=2, iterations=-5): test_parlm_run_refuses_before_creating_the_run_folder (exit code 2,
  a finished run of that id untouched), test_parlm_run_cli_lists_every_problem_at_once,
  test_bad_value_given_to_config_directly, test_bad_value_through_overrides_yaml_and_papermill_parameters
- out-of-vocab shard: test_out_of_vocab_shard_fails_the_data_stage_and_the_check_before_training
- SIGINT via a subprocess: test_ctrl_c_ends_with_one_line_and_the_resume_command
- full disk: test_a_real_full_or_read_only_runs_folder_is_one_line[full] (a small tmpfs); with
  patched writers test_full_disk_is_one_line,
  test_a_full_disk_inside_a_notebook_fails_the_seed_in_one_line_and_keeps_what_finished,
  test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp,
  test_a_checkpoint_save_on_a_full_disk_leaves_no_temporary_file,
  test_a_notebook_cut_off_mid_write_is_saved_as_valid_json
- read-only folder: test_a_real_full_or_read_only_runs_folder_is_one_line[read-only] (a read-only
  tmpfs, which stops root too), test_read_only_file_system_is_one_line_and_keeps_a_finished_run,
  test_read_only_runs_folder_is_one_line (chmod; skipped as root)
- divergence: test_divergence_message_gives_a_restart_command_that_works (exit code 1, the EMA and
  the data stage kept, the printed command retrains),
  test_restart_clears_train_and_later_stages_and_keeps_data_settings
- stalled loss: test_loss_stalled_at_the_uniform_predictor_is_flagged (exit code 0, one log line,
  train.json, summary.json, one line of the report); the report's flags alone are tested in
  tests/test_report_summary.py
- notebook run from another folder:
  test_a_notebook_run_from_another_folder_uses_the_finished_seed_in_the_checkout
- kill-and-resume of training: test_killed_run_resumes_from_its_checkpoint_and_equals_an_uninterrupted_run
  (SIGKILL in a subprocess, the same command resumes, weights equal an uninterrupted run's)
- and issue 15's reproducible step-count runs: test_two_step_count_runs_write_identical_train_json

The real tmpfs tests skip where `unshare -rm` cannot mount one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from parlm import pipeline, run, runlog
from parlm.config import (FIELD_RULES, FIELD_TYPES, PRESET_DIR, PROJECT_ROOT, Config, ConfigError,
                          parse_overrides)
from parlm.data.corpus import ensure_dataset
from parlm.data.shards import ShardError, write_shard
from parlm.quant.artifact import (ARTIFACT_NAME, CHECKPOINT_NAME, ArtifactError, load_checkpoint,
                                  read_artifact, verify_artifact)
from parlm.report import summary as report
from parlm.train import loop
from parlm.train.checkpoint import CHECKPOINT_DIR
from parlm.train.checks import clear_training, restart_training
from parlm.train.loop import train_run

from test_run import fake_finished_stages
from test_train import pattern_config  # noqa: F401 - the shared fixture

pytestmark = pytest.mark.usefixtures("single_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, relative path -> bytes: equal before and after a fault means
    nothing finished was lost or overwritten, and nothing (no temporary file) was left."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def write_finished_seed(seed_dir: Path) -> None:
    """A finished seed as parlm.run leaves it, by hand: every stage result and marker."""
    fake_finished_stages(seed_dir)
    runlog.write_json(seed_dir / "summary.json", {"ttt_bpb": 3.0, "bytes_total": 1_000})
    runlog.mark_stage_done(seed_dir, "summary")


# ==============================================================================================
# Configuration: every bad value refused by one validation pass, before any run folder exists

# (override as typed on the command line, the value as given to Config directly, the line)
BAD_VALUES = [
    ("iterations=1.5", 1.5, "iterations=1.5: must be an integer >= 1"),
    ("train_seq_len=0", 0, "train_seq_len=0: must be an integer >= 1"),
    ("device=gpu", "gpu", "device='gpu': must be one of 'auto', 'cuda', 'cpu'"),
    ("matrix_lr=nan", math.nan, "matrix_lr=nan: must be a finite number >= 0"),
    ("ema_decay=2", 2.0, "ema_decay=2.0: must be a finite number in [0, 1)"),
    ("iterations=-5", -5, "iterations=-5: must be an integer >= 1"),
]


@pytest.mark.parametrize("override,value,line", BAD_VALUES)
def test_bad_value_given_to_config_directly(override, value, line):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as caught:
        Config(**{key: value})
    assert str(caught.value) == line and caught.value.problems == [line]


@pytest.mark.parametrize("override,value,line", BAD_VALUES)
def test_bad_value_through_overrides_yaml_and_papermill_parameters(override, value, line, tmp_path):
    with pytest.raises(ConfigError) as caught:  # what parlm.run and every notebook do
        Config.from_preset("demo", parse_overrides([override]))
    assert str(caught.value) == line
    key, text = override.split("=")
    path = tmp_path / "config.yaml"
    path.write_text(f"{key}: {text}\n")
    with pytest.raises(ConfigError) as caught:  # a run folder's config.yaml
        Config.load(path)
    assert str(caught.value) == f"{path}: {line}"


@pytest.mark.parametrize("override,value,line", BAD_VALUES)
def test_parlm_run_refuses_before_creating_the_run_folder(override, value, line, tmp_path, capsys):
    """A resume of a finished run (same id) with one bad value: refused, the run untouched."""
    write_finished_seed(tmp_path / "bad" / "seed_42")
    before = snapshot(tmp_path)
    code = run.main(["--preset", "demo", "--seeds", "42", "--run-id", "bad", "--runs-dir", str(tmp_path),
                     "--set", override, "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == f"error: {line}\n"
    assert snapshot(tmp_path) == before
    assert list(tmp_path.iterdir()) == [tmp_path / "bad"]  # no other run folder either


def test_parlm_run_cli_lists_every_problem_at_once(tmp_path):
    """The real command line: one error, one line per bad value, exit code 2, no folder, the
    finished run of that id untouched."""
    write_finished_seed(tmp_path / "bad" / "seed_42")
    before = snapshot(tmp_path)
    arguments = [sys.executable, "-m", "parlm.run", "--preset", "demo", "--seeds", "42",
                 "--runs-dir", str(tmp_path), "--run-id", "bad", "--quiet"]
    for override, _, _ in BAD_VALUES:
        arguments += ["--set", override]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=120, env=environment,
                          cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    # -5 is the last --set of iterations, so it replaces 1.5
    expected = {line for override, _, line in BAD_VALUES if override != "iterations=1.5"}
    assert lines[0] == f"error: {len(expected)} config problems:"
    assert {line.strip() for line in lines[1:]} == expected
    assert snapshot(tmp_path) == before and list(tmp_path.iterdir()) == [tmp_path / "bad"]


def test_every_problem_is_collected_into_one_error():
    with pytest.raises(ConfigError) as caught:
        Config(iterations=1.5, train_seq_len=0, device="gpu", matrix_lr=math.nan, ema_decay=2,
               num_kv_heads=3)
    problems = caught.value.problems
    assert len(problems) == 6 and all("\n" not in p for p in problems)
    # a rule between fields too; train_seq_len=0 silences the batch rule that divides by it
    assert problems[-1] == "num_heads=8 must be a multiple of num_kv_heads=3"
    assert str(caught.value).splitlines()[0] == "6 config problems:"


@pytest.mark.parametrize("overrides,line", [
    (dict(train_batch_tokens=1000), "train_batch_tokens=1000 must split into micro_batches_per_step=8 "
     "micro-batches of whole train_seq_len=2048 sequences; choose a multiple of 16384"),
    (dict(val_batch_tokens=8192), "val_batch_tokens=8192 must hold at least one eval_seq_len=2048 "
     "sequence per micro-batch (micro_batches_per_step=8): at least 16384"),
    (dict(eval_stride=4096), "eval_stride=4096 must be in 1..eval_seq_len=2048"),
    (dict(ttt_chunk_tokens=1000), "ttt_chunk_tokens=1000 must be a multiple of eval_stride=64 so each "
     "chunk scores whole stride blocks"),
    (dict(num_kv_heads=3), "num_heads=8 must be a multiple of num_kv_heads=3"),
    (dict(rope_dims=80), "rope_dims=80 must be even and <= head_dim=model_dim/num_heads=64, which must be even"),
    (dict(loop_end=11), "loop_start=3..loop_end=11 must be an ordered range inside 0..num_layers-1=10 "
     "(or num_loops=0)"),
    (dict(gptq_reserve_seconds=600.0), "gptq_reserve_seconds=600.0 leaves no training time out of "
     "max_wallclock_seconds=600.0"),
    (dict(mixture_enabled=True, mixture_order=4), "mixture_order=4 with vocab_size=8192 needs 65 bits per "
     "exact int64 context key; use mixture_order <= 3"),
])
def test_cross_field_rules(overrides, line):
    with pytest.raises(ConfigError) as caught:
        Config(**overrides)
    assert caught.value.problems == [line]


def test_cross_field_rule_is_skipped_when_one_of_its_fields_is_invalid():
    with pytest.raises(ConfigError) as caught:
        Config(num_heads=0)  # no ZeroDivisionError from the model_dim % num_heads rule
    assert caught.value.problems == ["num_heads=0: must be an integer >= 1"]


def test_lossless_conversions_are_accepted():
    config = Config().replace(**parse_overrides(["iterations=2.0", "max_wallclock_seconds=30",
                                                 "ttt_enabled=off", "seed=7"]))
    assert (config.iterations, config.max_wallclock_seconds, config.ttt_enabled, config.seed) == (2, 30.0, False, 7)
    assert isinstance(config.iterations, int) and isinstance(config.max_wallclock_seconds, float)
    assert Config(max_wallclock_seconds=30).max_wallclock_seconds == 30.0


@pytest.mark.parametrize("override,line", [
    ("ttt_enabled=maybe", "ttt_enabled='maybe': must be true or false"),
    ("iterations=ten", "iterations='ten': must be an integer >= 1"),
    ("matrix_lr=inf", "matrix_lr=inf: must be a finite number >= 0"),
    ("tie_embeddings=false", "tie_embeddings=False: must be one of True (the reference ties them; "
     "untied heads are not implemented)"),
    ("vocab_size=70000", "vocab_size=70000: must be an integer in [2, 65536] (token ids are stored as uint16)"),
    ("seed=-1", "seed=-1: must be an integer >= 0 (the data sampler's PCG64 takes non-negative seeds)"),
])
def test_more_bad_values(override, line):
    with pytest.raises(ConfigError) as caught:
        Config().replace(**parse_overrides([override]))
    assert caught.value.problems == [line]


def test_unknown_keys_and_malformed_pairs_are_listed_together():
    with pytest.raises(ConfigError) as caught:
        parse_overrides(["itterations=3", "oops"])
    assert caught.value.problems == ["unknown config key 'itterations'; did you mean iterations?",
                                     "override 'oops' must look like key=value"]


def test_validate_adds_world_size_and_tokenizer_to_the_same_list():
    config = Config()
    with pytest.raises(ConfigError) as caught:
        config.validate(world_size=3, tokenizer_vocab_size=1024)
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("world size 3 does not divide micro_batches_per_step=8")
    assert caught.value.problems[1].startswith("vocab_size=8192 but the tokenizer has 1024 pieces")
    config.iterations = 0  # assigned after construction: validate checks again
    with pytest.raises(ConfigError, match="iterations=0: must be an integer >= 1"):
        config.validate()


def test_every_preset_and_the_defaults_validate():
    Config().validate(world_size=8)
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        Config.from_preset(path.stem).validate(world_size=1)


def test_rules_name_real_fields_and_fit_their_types():
    assert set(FIELD_RULES) <= set(FIELD_TYPES)
    defaults = Config()
    for name, rule in FIELD_RULES.items():
        assert rule.admits(getattr(defaults, name)), name


# ==============================================================================================
# Files: a truncated or replaced artifact, a damaged checkpoint, a shard outside the vocabulary

# Hand-written results of the stages that are not rerun here (the contract's key names).
STAGE_FILES = {
    "train.json": {"steps": 3, "train_seconds": 1.0, "prequant_bpb": 3.1, "world_size": 1},
    "eval.json": {"quantized_bpb": 3.2, "sliding_bpb": 3.15, "ttt_bpb": 3.0},
    "ppm.json": {"mix_bpb": 2.5, "gate_skip": 0.1},
}
NOTEBOOKS = {"data": "notebook_01_data", "train": "notebook_03_train", "quant": "notebook_04_quantize",
             "eval": "notebook_05_ttt_eval", "ppm": "notebook_06_ppm_mixture"}


def write_markers_in_order(run_dir: Path) -> None:
    """Every stage done, each notebook marked after its stage (as parlm.run does), with
    strictly increasing modification times."""
    names = []
    for stage in pipeline.STAGES:
        names.append(stage)
        if stage in NOTEBOOKS:
            names.append(NOTEBOOKS[stage])
    for index, name in enumerate(names):
        runlog.mark_stage_done(run_dir, name)
        stamp = 1_700_000_000_000_000_000 + index * 1_000_000_000
        os.utime(runlog.stage_marker(run_dir, name), ns=(stamp, stamp))


@pytest.fixture(scope="module")
def finished_seed(tiny_dataset_config, tmp_path_factory) -> tuple:
    """(config, run folder): a real checkpoint and artifact, the other stage files by hand."""
    from parlm.model.gpt import build_model
    from parlm.quant.stage import quantize_run

    config = tiny_dataset_config.replace(quant_passthrough_max_numel=256, seed=7)
    run_dir = tmp_path_factory.mktemp("finished") / "run" / "seed_7"
    pipeline.prepare_run(config, run_dir)
    torch.manual_seed(0)
    torch.save(build_model(config, "cpu").state_dict(), run_dir / CHECKPOINT_NAME)
    for name, content in STAGE_FILES.items():
        runlog.write_json(run_dir / name, content)
    quantize_run(config, run_dir, statistics=False)
    report.summarize_seed(run_dir)
    write_markers_in_order(run_dir)
    return config, run_dir


@pytest.fixture
def seed_copy(finished_seed, tmp_path) -> tuple:
    config, source = finished_seed
    run_dir = tmp_path / "run" / source.name
    shutil.copytree(source, run_dir)  # copy2 keeps the markers' times
    return config, run_dir


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:  # same size, other bytes: only the sha256 can tell
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def done_markers(run_dir: Path) -> set[str]:
    return {p.name.removesuffix(".done") for p in (run_dir / ".stages").glob("*.done")}


def test_quant_records_the_artifact_size_and_sha256(finished_seed):
    _, run_dir = finished_seed
    quant = json.loads((run_dir / "quant.json").read_text())
    data = (run_dir / ARTIFACT_NAME).read_bytes()
    assert quant["artifact"] == ARTIFACT_NAME
    assert quant["bytes_model"] == len(data)
    assert quant["artifact_sha256"] == hashlib.sha256(data).hexdigest()
    verify_artifact(run_dir)  # intact: no error


@pytest.mark.parametrize("damage,fault", [
    (truncate, "bytes but quant.json records"),
    (garbage, "sha256 does not match quant.json (corrupted or replaced)"),
])
def test_resume_reruns_the_stages_after_train_and_keeps_the_rest(seed_copy, capsys, damage, fault):
    config, run_dir = seed_copy
    artifact = run_dir / ARTIFACT_NAME
    original = artifact.read_bytes()
    kept = {name: (run_dir / name).read_bytes() for name in (CHECKPOINT_NAME, "train.json", "config.yaml")}
    damage(artifact)
    pipeline.prepare_run(config, run_dir)  # what every resume (ensure, parlm.run) does first
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{artifact}: ") and fault in lines[0]
    assert "stages quant, eval, ppm, summary are stale and will rerun" in lines[0]
    # data and train (and their notebooks) stay done; quant onwards and their notebooks rerun.
    assert done_markers(run_dir) == {"data", "notebook_01_data", "train", "notebook_03_train"}
    assert all((run_dir / name).read_bytes() == data for name, data in kept.items())
    pipeline.ensure(config, run_dir, "quant")  # the quant stage rebuilds it from final_model.pt
    verify_artifact(run_dir)
    assert artifact.read_bytes() == original  # GPTQ and compression are deterministic
    assert all((run_dir / name).read_bytes() == data for name, data in kept.items())
    capsys.readouterr()
    pipeline.prepare_run(config, run_dir)  # now consistent: nothing more is removed
    assert "quant" in done_markers(run_dir) and capsys.readouterr().err == ""


def test_without_the_checkpoint_the_resume_stops_with_one_line(seed_copy):
    config, run_dir = seed_copy
    truncate(run_dir / ARTIFACT_NAME)
    (run_dir / CHECKPOINT_NAME).unlink()
    before = done_markers(run_dir)
    with pytest.raises(ArtifactError) as caught:
        pipeline.prepare_run(config, run_dir)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{run_dir / ARTIFACT_NAME}: has ")
    assert f"final_model.pt, which it is made from, is gone; retrain this seed: delete " \
           f"{run_dir / '.stages' / 'train.done'}" in message
    assert done_markers(run_dir) == before  # a refused resume changes nothing


def test_a_missing_quant_marker_makes_the_later_stages_stale(seed_copy, capsys):
    """The fix the messages give (delete .stages/quant.done) reruns every stage after quant."""
    config, run_dir = seed_copy
    runlog.stage_marker(run_dir, "quant").unlink()
    pipeline.prepare_run(config, run_dir)
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"{run_dir / '.stages'}: the quant stage is not done; stages eval, ppm, "
                           f"summary are stale")
    assert done_markers(run_dir) == {"data", "notebook_01_data", "train", "notebook_03_train",
                                     "notebook_04_quantize"}


@pytest.mark.parametrize("damage,detail", [
    (truncate, "cannot be decoded (truncated or extended: the chunk table needs"),
    (garbage, "cannot be decoded (not a parlm artifact (magic"),
])
def test_every_decode_error_names_the_file(tmp_path, finished_seed, damage, detail):
    _, run_dir = finished_seed
    path = tmp_path / ARTIFACT_NAME
    shutil.copy(run_dir / ARTIFACT_NAME, path)
    damage(path)
    with pytest.raises(ArtifactError) as caught:
        read_artifact(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: {detail}")
    assert f"delete {tmp_path / '.stages' / 'quant.done'}" in message


def test_a_damaged_checkpoint_names_the_file(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"w": torch.zeros(64)}, path)
    truncate(path)
    with pytest.raises(ArtifactError) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(f"{path}: cannot be loaded (")
    assert "retrain this seed" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("damage,fault", [
    (truncate, "has "),
    (garbage, "sha256 does not match quant.json (corrupted or replaced)"),
], ids=["truncated", "garbage"])
def test_parlm_eval_cli_stops_with_one_line_naming_the_file(seed_copy, damage, fault):
    _, run_dir = seed_copy
    damage(run_dir / ARTIFACT_NAME)
    before = snapshot(run_dir)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "parlm.eval", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"python -m parlm.eval: error: {run_dir / ARTIFACT_NAME}: {fault}")
    assert "rebuild it" in lines[0]
    # eval.json, nll.npz, the logs and the markers of the finished run: untouched.
    assert snapshot(run_dir) == before


def test_eval_and_ppm_stages_verify_before_reading(seed_copy):
    from parlm.eval.stage import evaluate_run
    from parlm.ppm.stage import ppm_run

    config, run_dir = seed_copy
    garbage(run_dir / ARTIFACT_NAME)
    for stage in (evaluate_run, ppm_run, report.summarize_seed):
        with pytest.raises(ArtifactError, match="sha256 does not match quant.json"):
            stage(*((config, run_dir) if stage is not report.summarize_seed else (run_dir,)))


def test_an_artifact_without_a_record_still_fails_to_decode_with_its_name(seed_copy):
    """A quant.json without the integrity record (older runs): decoding names the file."""
    from parlm.eval.stage import evaluate_run

    config, run_dir = seed_copy
    quant = json.loads((run_dir / "quant.json").read_text())
    del quant["artifact_sha256"]
    runlog.write_json(run_dir / "quant.json", quant)
    truncate(run_dir / ARTIFACT_NAME)
    with pytest.raises(ArtifactError, match=f"^{run_dir / ARTIFACT_NAME}: cannot be decoded"):
        evaluate_run(config, run_dir)


def test_report_does_not_claim_a_damaged_artifact_fits(seed_copy, capsys):
    _, run_dir = seed_copy
    run_root = run_dir.parent
    intact = report.build_report(run_root, baseline=None, plots=False, submission=False)
    assert intact["fits_cap"] is True and intact["artifact_problems"] == []
    assert "fits the 16,000,000-byte cap" in report.format_report(intact)
    truncate(run_dir / ARTIFACT_NAME)
    damaged = report.build_report(run_root, baseline=None, plots=False, submission=True)
    assert damaged["fits_cap"] is None
    assert len(damaged["artifact_problems"]) == 1
    assert damaged["artifact_problems"][0].startswith(f"{run_dir / ARTIFACT_NAME}: has ")
    assert damaged["submission"]["exported"] is False
    text = report.format_report(damaged, table=False)
    assert "fits" not in text and "is NOT verified against the 16,000,000-byte cap" in text
    assert report.main(["--run-root", str(run_root), "--baseline", "none", "--no-plots",
                        "--no-submission"]) == 0
    assert "is NOT verified" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# A shard with token ids outside the vocabulary

@pytest.fixture
def dataset_copy(tiny_dataset_config, tmp_path):
    """The tiny dataset copied (shards and tokenizer), so a shard can be replaced."""
    source = Path(tiny_dataset_config.data_dir)
    shutil.copytree(source / "datasets", tmp_path / "datasets")
    shutil.copytree(source / "tokenizers", tmp_path / "tokenizers")
    tokenizer = tmp_path / "tokenizers" / Path(tiny_dataset_config.tokenizer_path).name
    return tiny_dataset_config.replace(data_dir=str(tmp_path), tokenizer_path=str(tokenizer))


def test_out_of_vocab_shard_fails_the_data_stage_and_the_check_before_training(dataset_copy, tmp_path, capsys):
    from parlm.train.checks import check_inputs
    from parlm.train.loop import main as train_main

    config = dataset_copy
    ensure_dataset(config)  # intact: passes, and caches each shard's max id
    shard = sorted(Path(config.datasets_dir).glob("fineweb_train_*.bin"))[1]
    tokens = np.arange(3000) % 1024
    tokens[2500] = 1030
    write_shard(shard, tokens)  # 3,000 tokens: another size than the cached file
    expected = (f"{shard}: token id 1030 at position 2500 >= vocab_size 1024 (max id 1030); the shard "
                f"comes from a larger vocabulary: use its tokenizer and vocab_size, or rebuild the dataset")
    folders = [Path(config.data_dir) / "datasets", Path(config.tokenizer_path).parent]
    dataset = [snapshot(folder) for folder in folders]
    with pytest.raises(ShardError) as caught:
        ensure_dataset(config)
    assert str(caught.value) == expected
    run_dir = tmp_path / "run" / "seed_1337"
    with pytest.raises(ShardError):
        pipeline.ensure(config, run_dir, "data")
    assert not runlog.stage_done(run_dir, "data")
    with pytest.raises(ConfigError) as caught:
        check_inputs(config, 1)
    assert str(caught.value) == expected
    capsys.readouterr()
    assert train_main(["--run-dir", str(run_dir)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"python -m parlm.train: error: {expected}"]
    assert not (run_dir / "train.log").exists() and not (run_dir / CHECKPOINT_NAME).exists()
    # The checks only read: the shards (the bad one too), tokenizer and manifest stay as they were.
    assert [snapshot(folder) for folder in folders] == dataset


# ==============================================================================================
# The runner: Ctrl-C, a read-only or full runs folder, a notebook cut off mid-write, a notebook
# run from another folder

PARAMETERS = 'preset = "demo"\nrun_dir = "unset"\nseed = 0\noverrides = []\nnproc = 1\n'


def write_notebook(path: Path, body: str, parameters: str = PARAMETERS) -> None:
    notebook = new_notebook()
    cell = new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell, new_code_cell(body)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, path)


QUICK = 'from pathlib import Path\n(Path(run_dir) / "quick.txt").write_text("done")'
SLOW = ('import time\nfrom pathlib import Path\n(Path(run_dir) / "slow_started").write_text("")\n'
        'time.sleep(600)')


def stand_in_plan(tmp_path: Path, notebooks: dict[str, str]) -> run.RunPlan:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for stem, body in notebooks.items():
        write_notebook(folder / f"{stem}.ipynb", body)
    return run.RunPlan(preset="demo", seeds=[1], run_id="t", runs_dir=tmp_path / "runs",
                       notebook_dir=folder, cwd=tmp_path, progress_bar=False,
                       seed_notebooks=tuple((stem, None) for stem in notebooks),
                       report_notebook=None, kernel_name="python3")


# ----------------------------------------------------------------------------------------------
# Ctrl-C

SIGINT_SCRIPT = """
import sys
from pathlib import Path
from parlm import run
sys.path.insert(0, {tests!r})
from test_faults import stand_in_plan, QUICK, SLOW
plan = stand_in_plan(Path({tmp!r}), {{"01_quick": QUICK, "02_slow": SLOW}})
sys.exit(run.run_cli(plan, ["--preset", "demo", "--seeds", "1", "--run-id", "t"]))
"""


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_the_resume_command(tmp_path):
    script = SIGINT_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    # Its own process group, as a terminal's foreground job: Ctrl-C reaches the kernel too. A
    # shell's background job (`make test &`) ignores SIGINT, and an ignored signal stays ignored
    # across exec: the child restores the default, as a foreground terminal job has it.
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seed_dir = tmp_path / "runs" / "t" / "seed_1"
    deadline = time.time() + 240
    while not (seed_dir / "slow_started").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    try:
        out, err = process.communicate(timeout=300)  # the stand-in cell sleeps 600 s
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"parlm.run did not stop within 300 s of Ctrl-C; its output:\n{out[-3000:]}\n{err[-3000:]}")
    assert process.returncode == 130, err
    assert "Traceback" not in err + out and "Task exception was never retrieved" not in err + out
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; finished stages are kept in")
    assert last.endswith("-m parlm.run --preset demo --seeds 1 --run-id t")
    # The finished notebook and its marker stay; the interrupted one is kept only as FAILED,
    # valid JSON, and no temporary notebook is left.
    assert (seed_dir / "quick.txt").read_text() == "done"
    assert (seed_dir / "01_quick.ipynb").exists()
    assert runlog.stage_done(seed_dir, run.notebook_marker("01_quick"))
    assert not runlog.stage_done(seed_dir, run.notebook_marker("02_slow"))
    assert not (seed_dir / "02_slow.ipynb").exists()
    nbformat.read(seed_dir / "02_slow.FAILED.ipynb", as_version=4)
    assert not list(seed_dir.glob(".*.running.ipynb"))


def test_resume_command_keeps_the_flags_and_adds_the_run_id():
    command = run.resume_command(["--preset", "demo", "--set", "iterations=5"], "demo-1")
    assert command.endswith("-m parlm.run --preset demo --set iterations=5 --run-id demo-1")
    assert run.resume_command(["--run-id", "x"], "x").endswith("-m parlm.run --run-id x")


# ----------------------------------------------------------------------------------------------
# A runs folder that cannot be written

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_runs_folder_is_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_finished_seed(runs / "old" / "seed_1")
    before = snapshot(runs)
    runs.chmod(0o555)
    try:
        assert run.main(["--preset", "demo", "--seeds", "1", "--runs-dir", str(runs), "--no-report"]) == 1
    finally:
        runs.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "is not writable" in err[-1] and str(runs) in err[-1]
    assert snapshot(runs) == before


def test_read_only_file_system_is_one_line_and_keeps_a_finished_run(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    write_finished_seed(runs / "old" / "seed_1")
    before = snapshot(runs)
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(runs)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = run.main(["--preset", "demo", "--seeds", "1", "--runs-dir", str(runs), "--run-id", "new"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith(f"error: {runs / 'new'} is on a read-only file system")
    assert "Traceback" not in "\n".join(lines)
    assert snapshot(runs) == before


def test_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    runs = tmp_path / "runs"
    write_finished_seed(runs / "old" / "seed_1")
    before = snapshot(runs)
    monkeypatch.setattr(run.runlog, "write_json", full)
    code = run.main(["--preset", "demo", "--seeds", "1", "--runs-dir", str(runs), "--run-id", "x"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "has no space left" in lines[-1] and str(runs / "x") in lines[-1]
    assert "Traceback" not in "\n".join(lines)
    assert snapshot(runs) == before


# The real faults, where the machine allows it: a tmpfs mounted in a private user and mount
# namespace (`unshare -rm`, no privilege needed where unprivileged namespaces are enabled), made
# full or read-only (which stops root too), then `python -m parlm.run` into it. The mount lives
# only as long as the namespace, so the script checks the folder there and prints the results.
TMPFS_SCRIPT = """
import json, subprocess, sys
from pathlib import Path

runs, mode = Path(sys.argv[1]), sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(runs)], check=True)
finished = runs / "old" / "seed_1"
(finished / ".stages").mkdir(parents=True)
(finished / "summary.json").write_text('{"ttt_bpb": 3.0}')
(finished / ".stages" / "summary.done").write_text("")
if mode == "full":
    with open(runs / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(bytes(65536))
        except OSError:
            pass
else:
    subprocess.run(["mount", "-o", "remount,ro", str(runs)], check=True)

def snapshot():
    return {str(p.relative_to(runs)): p.read_bytes().hex() for p in sorted(runs.rglob("*")) if p.is_file()}

before = snapshot()
done = subprocess.run([sys.executable, "-m", "parlm.run", "--preset", "demo", "--seeds", "1",
                       "--runs-dir", str(runs), "--run-id", "new", "--no-report"],
                      capture_output=True, text=True, timeout=300)
print(json.dumps({"returncode": done.returncode, "stderr": done.stderr, "unchanged": snapshot() == before,
                  "files": sorted(snapshot())}))
"""


def private_tmpfs_unavailable(folder: Path) -> str | None:
    """Why a tmpfs cannot be mounted on `folder` in a private namespace here (None when it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh",
                            str(folder)], capture_output=True, text=True, timeout=30)
    return None if probe.returncode == 0 else f"unshare -rm cannot mount a tmpfs: {probe.stderr.strip()}"


@pytest.mark.parametrize("mode,fault", [("full", "has no space left (No space left on device)"),
                                        ("read-only", "is on a read-only file system")],
                         ids=["full", "read-only"])
def test_a_real_full_or_read_only_runs_folder_is_one_line(tmp_path, mode, fault):
    runs = tmp_path / "runs"
    runs.mkdir()
    reason = private_tmpfs_unavailable(runs)
    if reason is not None:
        pytest.skip(reason)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", TMPFS_SCRIPT, str(runs), mode],
                          capture_output=True, text=True, timeout=360, env=environment)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    lines = result["stderr"].strip().splitlines()
    assert result["returncode"] == 1, result["stderr"]
    assert "Traceback" not in result["stderr"] and len(lines) == 1
    assert lines[0].startswith(f"error: {runs}") and fault in lines[0]
    assert lines[0].endswith(f"free space or choose another folder with --runs-dir (runs folder: {runs})")
    # The finished run is as it was and no temporary file is left behind.
    assert result["unchanged"] is True
    assert result["files"] == (["filler"] if mode == "full" else []) + ["old/seed_1/.stages/summary.done",
                                                                        "old/seed_1/summary.json"]


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "quant.json"
    runlog.write_json(path, {"bytes_total": 1})
    real_write = Path.write_bytes

    def half_then_full(self, data):
        real_write(self, data[: len(data) // 2])  # a part lands on disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        runlog.write_json(path, {"bytes_total": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"bytes_total": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quant.json"]


def test_a_checkpoint_save_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "final_model.pt"
    loop._save_state_dict({"w": torch.ones(2)}, path)

    def full(obj, target):
        Path(target).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        loop._save_state_dict({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["final_model.pt"]


# A stage's result written when the disk is full: a part lands on disk, then ENOSPC.
FULL_DISK = """import errno
from pathlib import Path
from parlm import runlog
real_write_bytes = Path.write_bytes
def disk_full(self, data):
    real_write_bytes(self, data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(self))
Path.write_bytes = disk_full
runlog.write_json(Path(run_dir) / "train.json", {"steps": 3})"""


def test_a_full_disk_inside_a_notebook_fails_the_seed_in_one_line_and_keeps_what_finished(tmp_path, capsys):
    plan = stand_in_plan(tmp_path, {"01_quick": QUICK, "02_full": FULL_DISK})
    seed_dir = plan.seed_dir(1)
    code = run.run_cli(plan, ["--preset", "demo", "--seeds", "1", "--run-id", "t"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    failed = [line for line in err.splitlines() if line.startswith("[seed 1] FAILED")]
    assert len(failed) == 1
    assert failed[0].startswith("[seed 1] FAILED: 02_full.ipynb failed in cell ")
    assert ": OSError: [Errno 28] No space left on device: " in failed[0]
    assert err.strip().splitlines()[-1] == (f"stopped; finished seeds stay in {plan.run_root}. Fix the error "
                                            f"and rerun with --run-id t to resume.")
    # The finished notebook, its output and marker stay; the failed one is valid JSON; the
    # half-written result and its temporary file are gone.
    assert (seed_dir / "quick.txt").read_text() == "done"
    assert runlog.stage_done(seed_dir, run.notebook_marker("01_quick"))
    assert not runlog.stage_done(seed_dir, run.notebook_marker("02_full"))
    nbformat.read(seed_dir / "02_full.FAILED.ipynb", as_version=4)
    assert sorted(p.name for p in seed_dir.iterdir() if p.is_file()) == [
        "01_quick.ipynb", "02_full.FAILED.ipynb", "config.yaml", "quick.txt"]


def test_a_notebook_cut_off_mid_write_is_saved_as_valid_json(tmp_path):
    source = tmp_path / "03_train.ipynb"
    write_notebook(source, "print(1)")
    running = tmp_path / ".03_train.running.ipynb"
    running.write_text(source.read_text()[:200])  # what a full disk left of papermill's write
    failed = tmp_path / "03_train.FAILED.ipynb"
    run._save_failed(running, failed, source, "OSError: [Errno 28] No space left on device")
    saved = nbformat.read(failed, as_version=4)
    assert "No space left on device" in saved.cells[0].source
    assert [c.source for c in saved.cells[1:]] == [c.source for c in nbformat.read(source, as_version=4).cells]
    assert not running.exists()


# ----------------------------------------------------------------------------------------------
# Paths from the checkout, a stage opened twice

def test_a_notebook_run_from_another_folder_uses_the_finished_seed_in_the_checkout(tmp_path):
    """`papermill` run in another folder, as issue 15 found it: the notebook's relative run_dir
    is the checkout's, its finished stages are found (nothing runs again, nothing is
    overwritten) and nothing lands in the folder papermill was started from."""
    name = f"test_faults_{os.getpid()}_{time.time_ns()}"
    seed_dir = PROJECT_ROOT / "runs" / name / "seed_3"
    source = tmp_path / "where.ipynb"
    write_notebook(source, 'from parlm import pipeline\n'
                           'config = pipeline.stage(preset, run_dir, seed, overrides, "summary")\n'
                           'print(pipeline.project_path(run_dir))',
                   parameters=f'preset = "demo"\nrun_dir = "runs/{name}/seed_3"\nseed = 3\noverrides = []\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        pipeline.prepare_run(Config.from_preset("demo").replace(seed=3), seed_dir)
        write_finished_seed(seed_dir)
        before = snapshot(seed_dir)
        environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "papermill", str(source), str(tmp_path / "out.ipynb"),
                               "-k", "python3", "--no-progress-bar"], cwd=elsewhere, env=environment,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        printed = [output.get("text", "") for output in
                   nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs]
        assert "".join(printed).strip().splitlines() == [
            f"summary stage already done in {seed_dir}; showing its results (redo=True runs it again)",
            str(seed_dir)]
        assert snapshot(seed_dir) == before
        assert list(elsewhere.iterdir()) == []
    finally:
        shutil.rmtree(seed_dir.parent, ignore_errors=True)


def test_stage_opened_twice_does_not_redo_a_finished_stage(tmp_path, monkeypatch, capsys):
    import parlm.data.corpus
    import parlm.report.summary

    calls = []
    monkeypatch.setattr(pipeline, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(parlm.data.corpus, "data_stage", lambda config, run_dir: calls.append("data"))
    monkeypatch.setattr(parlm.report.summary, "summary_stage",
                        lambda config, run_dir: calls.append("summary"))
    run_dir = tmp_path / "runs" / "nb" / "seed_3"
    run_dir.mkdir(parents=True)
    for name in ("train", "quant", "eval", "ppm"):
        runlog.mark_stage_done(run_dir, name)
    config = pipeline.stage("demo", "runs/nb/seed_3", 3, [], "summary")  # relative: from the root
    assert config == Config.from_preset("demo").replace(seed=3)
    assert (run_dir / "config.yaml").exists() and calls == ["data", "summary"]
    pipeline.stage("demo", "runs/nb/seed_3", 3, [], "summary")
    assert calls == ["data", "summary"] and "already done" in capsys.readouterr().out
    pipeline.stage("demo", "runs/nb/seed_3", 3, [], "summary", redo=True)
    assert calls == ["data", "summary", "summary"]


def test_stage_with_a_different_config_is_refused_and_keeps_the_saved_one(tmp_path, monkeypatch):
    from parlm.config import ConfigError

    monkeypatch.setattr(pipeline, "PROJECT_ROOT", tmp_path)
    run_dir = tmp_path / "seed_1"
    pipeline.prepare_run(Config.from_preset("demo").replace(seed=1), run_dir)
    before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="iterations"):
        pipeline.stage("demo", run_dir, 1, ["iterations=3"], "data")
    assert (run_dir / "config.yaml").read_bytes() == before


def test_stage_cli_errors_are_one_line(tmp_path, capsys):
    from parlm.quant.stage import main

    assert main(["--run-dir", str(tmp_path), "--preset", "demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m parlm.quant: error: {tmp_path / 'final_model.pt'} not found; train "
                   f"first with `python -m parlm.train --run-dir {tmp_path}`"]


@pytest.mark.parametrize("number, why", [(errno.ENOSPC, "has no space left"),
                                         (errno.EROFS, "is on a read-only file system")])
def test_stage_cli_on_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, number, why):
    from parlm.cli import stage_command

    target = tmp_path / "quant.json"

    def stage(config, run_dir):
        raise OSError(number, os.strerror(number), str(target))

    assert stage_command("python -m parlm.x", "d", stage, ["--run-dir", str(tmp_path), "--preset", "demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"python -m parlm.x: error: {target} {why} ({os.strerror(number)}); free space or "
                   f"choose another folder"]

    def broken(config, run_dir):  # any other OSError is a bug: its traceback stays
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        stage_command("python -m parlm.x", "d", broken, ["--run-dir", str(tmp_path), "--preset", "demo"])


def test_quiet_terminal_prints_one_line_per_notebook(tmp_path, capsys):
    plan = stand_in_plan(tmp_path, {"01_quick": QUICK + '\nprint("cell output stays in the notebook")'})
    seed_dir = plan.seed_dir(1)
    fake_finished_stages(seed_dir)  # only the summary runs after the notebook
    assert run.run(plan) == 0
    captured = capsys.readouterr()
    assert "cell output stays in the notebook" not in captured.out + captured.err
    notebook_lines = [line for line in captured.err.splitlines() if "01_quick" in line]
    assert len(notebook_lines) == 1 and notebook_lines[0].startswith("[seed 1] 1/1 01_quick: ")
    assert "kernel: python3 (" in captured.err


# ==============================================================================================
# Training: a killed run resumes exactly, divergence, a loss stalled at the uniform predictor

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


# Training killed in step 5, after the checkpoint of step 4: SIGKILL, so no Python clean-up runs.
KILL_SCRIPT = """
import os, signal, sys
import torch
from parlm.train import loop
torch.set_num_threads(1)  # as the single_thread fixture: the uninterrupted run's arithmetic
real_step = loop.Trainer.step
def killed_in_step_5(self, step, lr_scale):
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, step, lr_scale)
loop.Trainer.step = killed_in_step_5
sys.exit(loop.main(sys.argv[1:]))
"""


def test_killed_run_resumes_from_its_checkpoint_and_equals_an_uninterrupted_run(pattern_config, tmp_path,
                                                                                 capsys):
    # Looping switches on at step 3 (frac 2/6 < 0.35 <= 3/6), before the checkpoint of step 4.
    config = pattern_config.replace(iterations=6, val_loss_every=4, checkpoint_every_steps=2,
                                    val_max_tokens=512)
    whole = train_run(config, tmp_path / "whole")

    run_dir = tmp_path / "resumed"
    config.save(run_dir / "config.yaml")
    runlog.mark_stage_done(run_dir, "data")  # a finished stage before training
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=240, env=environment)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((run_dir / CHECKPOINT_DIR / "latest.json").read_text())["step"] == 4
    assert not (run_dir / "final_model.pt").exists() and not (run_dir / "train.json").exists()
    capsys.readouterr()
    assert loop.main(["--run-dir", str(run_dir)]) == 0  # the same command again resumes
    resumed_lines = [line for line in capsys.readouterr().out.splitlines() if "resumed from step" in line]
    assert len(resumed_lines) == 1 and resumed_lines[0].startswith("resumed from step 4 (")
    resumed = json.loads((run_dir / "train.json").read_text())

    assert_same_weights(tmp_path / "whole", run_dir)
    assert untimed_metrics(run_dir) == untimed_metrics(tmp_path / "whole")
    assert resumed["resumed_from_step"] == 4 and whole["resumed_from_step"] is None
    assert resumed["prequant_bpb"] == whole["prequant_bpb"] and resumed["looping_step"] == 3
    log = (run_dir / "train.log").read_text()
    assert "checkpoint: step 4 saved" in log and "resumed from step 4" in log
    assert runlog.stage_done(run_dir, "data")  # kept through the kill and the resume
    assert not (run_dir / CHECKPOINT_DIR).exists()  # the final model is what stays
    assert not (tmp_path / "whole" / CHECKPOINT_DIR).exists()


def test_two_step_count_runs_write_identical_train_json(pattern_config, tmp_path):
    config = pattern_config.replace(iterations=4, val_loss_every=2, val_max_tokens=512)
    first, second = train_run(config, tmp_path / "a"), train_run(config, tmp_path / "b")
    assert {k: v for k, v in first.items() if k not in TIMING_FIELDS} == \
        {k: v for k, v in second.items() if k not in TIMING_FIELDS}
    assert first["stopped_by"] == "iterations" and first["steps"] == 4
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def test_divergence_message_gives_a_restart_command_that_works(pattern_config, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "lrtest" / "seed_1337"
    config = pattern_config.replace(iterations=3, val_loss_every=0, tied_embed_lr=1e30,
                                    matrix_lr=0.04, seed=1337, val_max_tokens=512)
    # What parlm.run records about the invocation that made the run.
    runlog.write_json(tmp_path / "runs" / "lrtest" / "run-20260101-000000-1.json",
                      {"preset": "demo", "seeds": [1337], "overrides": ["matrix_lr=0.04", "iterations=3"]})
    config.save(tmp_path / "diverging.yaml")
    runlog.mark_stage_done(run_dir, "data")  # a finished stage before training
    assert loop.main(["--run-dir", str(run_dir), "--config", str(tmp_path / "diverging.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("python -m parlm.train: error: ")]
    assert errors == [err.strip().splitlines()[-1]]
    message = errors[0].removeprefix("python -m parlm.train: error: ")
    assert message.startswith("training diverged: non-finite loss/gradient/weights at step ")
    # What it kept: the EMA of the steps before the blow-up, finite; the data stage.
    train = json.loads((run_dir / "train.json").read_text())
    assert train["diverged"] is True and train["stopped_by"] == "diverged"
    assert all(torch.isfinite(tensor).all() for tensor in torch.load(run_dir / CHECKPOINT_NAME).values())
    assert runlog.stage_done(run_dir, "data")
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
    assert runlog.stage_done(run_dir, "data")
    args = run.build_parser().parse_args(words[3:])  # the whole command is parlm.run's own
    assert args.run_id == "lrtest" and args.seeds == [1337] and args.overrides == sets
    assert args.restart_stage == "train"


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


# The stage results after training, by hand (the report needs them; none is rerun here).
AFTER_TRAINING = {
    "quant.json": {"bytes_model": 900_000, "bytes_code": 20_000, "bytes_total": 920_000},
    "eval.json": {"quantized_bpb": 3.2, "sliding_bpb": 3.15, "ttt_bpb": 3.0, "eval_clock_seconds": 30.0,
                  "eval_projection_seconds": 120.0, "eval_projection_budget_seconds": 600.0,
                  "eval_projection_target": "8xH100"},
    "ppm.json": {"mix_bpb": 2.5},
}


def test_loss_stalled_at_the_uniform_predictor_is_flagged(pattern_config, tmp_path, capsys):
    """All learning rates 50: after a few wild steps every logit saturates and the loss sits at
    ln(1024) = 6.9315 (issue 15 item 5). The run finishes (exit code 0) and says so in one log
    line, train.json, summary.json and one line of the report; a healthy seed is not flagged."""
    runs = tmp_path / "run"
    stalled_dir, healthy_dir = runs / "seed_1", runs / "seed_2"
    stalling = pattern_config.replace(iterations=9, val_loss_every=0, stall_steps=3, val_max_tokens=512,
                                      matrix_lr=50.0, scalar_lr=50.0, tied_embed_lr=50.0, seed=1)
    healthy = pattern_config.replace(iterations=4, val_loss_every=0, stall_steps=3, val_max_tokens=512, seed=2)
    for config, run_dir in ((stalling, stalled_dir), (healthy, healthy_dir)):
        config.save(tmp_path / f"{run_dir.name}.yaml")
        capsys.readouterr()
        assert loop.main(["--run-dir", str(run_dir), "--config", str(tmp_path / f"{run_dir.name}.yaml")]) == 0
        printed = capsys.readouterr()
        warnings = [line for line in (printed.out + printed.err).splitlines() if "uniform predictor" in line]
        assert len(warnings) == (1 if run_dir is stalled_dir else 0) and "Traceback" not in printed.err

    rows = runlog.read_metrics(stalled_dir, "train")
    assert [row["step"] for row in rows] == list(range(1, 10))  # every step is logged
    at_uniform = [abs(row["train_loss"] - math.log(1024)) <= 0.01 for row in rows]
    # The first stretch of >= 3 consecutive uniform losses, by plain scanning.
    start = next(i for i in range(len(rows) - 2) if all(at_uniform[i:i + 3]))
    end = start
    while end + 1 < len(rows) and at_uniform[end + 1]:
        end += 1
    steps = [rows[start]["step"], rows[end]["step"]]
    train = json.loads((stalled_dir / "train.json").read_text())
    assert train["stalled"] is True and train["diverged"] is False and train["stalled_steps"] == steps
    log = (stalled_dir / "train.log").read_text()
    log_lines = [line for line in log.splitlines() if "uniform predictor" in line]
    assert len(log_lines) == 1 and "(a uniform predictor) for 3 logged steps" in log_lines[0]
    assert json.loads((healthy_dir / "train.json").read_text())["stalled"] is False

    for run_dir in (stalled_dir, healthy_dir):  # the per-seed summary carries the record
        for name, content in AFTER_TRAINING.items():
            runlog.write_json(run_dir / name, content)
        report.summarize_seed(run_dir)
    assert json.loads((stalled_dir / "summary.json").read_text())["stalled_steps"] == steps
    assert json.loads((healthy_dir / "summary.json").read_text())["stalled"] is False
    result = report.build_report(runs, baseline=None, plots=False, submission=False)
    flags = [line for line in (runs / "report" / "table.md").read_text().splitlines() if "STALLED" in line]
    assert flags == [f"- warning: seed 1 STALLED: its train loss sat at ln(vocab_size), a uniform predictor, "
                     f"over steps {steps[0]}..{steps[1]}; its scores are those of a model that did not learn "
                     f"(train.json stalled=true: lower the learning rates and retrain it)"]
    assert result["seed_flags"] == [flags[0].removeprefix("- ")]
