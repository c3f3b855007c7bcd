"""Fault injection, files (issue 15): a truncated or replaced artifact, a damaged checkpoint and
a shard with ids outside the vocabulary. Each fault gives one line naming the file and the fix,
stale stages rerun on resume (nothing finished before them is lost), and the report never says
a damaged artifact fits the cap."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from parlm import pipeline, runlog
from parlm.config import ConfigError
from parlm.data.corpus import ensure_dataset
from parlm.data.shards import ShardError, write_shard
from parlm.quant.artifact import (ARTIFACT_NAME, CHECKPOINT_NAME, ArtifactError, load_checkpoint,
                                  read_artifact, verify_artifact)
from parlm.report import summary as report

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def test_parlm_eval_cli_stops_with_one_line_naming_the_file(seed_copy):
    _, run_dir = seed_copy
    truncate(run_dir / ARTIFACT_NAME)
    eval_before = (run_dir / "eval.json").read_bytes()
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "parlm.eval", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"python -m parlm.eval: error: {run_dir / ARTIFACT_NAME}: has ")
    assert "rebuild it" in lines[0]
    assert (run_dir / "eval.json").read_bytes() == eval_before  # the finished result is untouched


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
    assert train_main(["--run-dir", str(run_dir)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m parlm.train: error: {expected}"
    assert not (run_dir / "train.log").exists() and not (run_dir / CHECKPOINT_NAME).exists()
