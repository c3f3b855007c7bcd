"""Faults around the runner (issue 15): Ctrl-C, an unwritable or full runs folder, a notebook
cut off mid-write, a notebook run from another folder. Each test checks the one-line message,
the exit code, and that finished results are neither lost nor overwritten.

Stand-in notebooks (real kernels, real papermill) keep these fast; no training runs."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from parlm import pipeline, run, runlog
from parlm.config import PROJECT_ROOT, Config
from test_run import fake_finished_stages

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
        'time.sleep(120)')


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
from test_faults_pipeline import stand_in_plan, QUICK, SLOW
plan = stand_in_plan(Path({tmp!r}), {{"01_quick": QUICK, "02_slow": SLOW}})
sys.exit(run.run_cli(plan, ["--preset", "demo", "--seeds", "1", "--run-id", "t"]))
"""


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_the_resume_command(tmp_path):
    script = SIGINT_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    # Its own process group, as a terminal's foreground job: Ctrl-C reaches the kernel too.
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seed_dir = tmp_path / "runs" / "t" / "seed_1"
    deadline = time.time() + 240
    while not (seed_dir / "slow_started").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
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
    runs.mkdir()
    runs.chmod(0o555)
    try:
        assert run.main(["--preset", "demo", "--seeds", "1", "--runs-dir", str(runs), "--no-report"]) == 1
    finally:
        runs.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "is not writable" in err[-1] and str(runs) in err[-1]


def test_read_only_file_system_is_one_line_and_keeps_a_finished_run(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    finished = runs / "old" / "seed_1"
    runlog.write_json(finished / "summary.json", {"ttt_bpb": 3.0})
    before = (finished / "summary.json").read_bytes()
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
    assert (finished / "summary.json").read_bytes() == before


def test_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run.runlog, "write_json", full)
    runs = tmp_path / "runs"
    code = run.main(["--preset", "demo", "--seeds", "1", "--runs-dir", str(runs), "--run-id", "x"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "has no space left" in lines[-1] and str(runs / "x") in lines[-1]


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

def test_a_notebook_run_from_another_folder_resolves_run_dir_in_the_checkout(tmp_path):
    import papermill

    source = tmp_path / "where.ipynb"
    write_notebook(source, 'from parlm import pipeline\nprint(pipeline.project_path(run_dir))',
                   parameters='run_dir = "runs/notebooks/seed_42"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(source), str(output), kernel_name="python3", cwd=str(elsewhere),
                               progress_bar=False)
    printed = nbformat.read(output, as_version=4).cells[-1].outputs[0]["text"].strip()
    assert printed == str(PROJECT_ROOT / "runs" / "notebooks" / "seed_42")
    assert not (elsewhere / "runs").exists()


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


def test_a_checkpoint_save_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    import torch

    from parlm.train import loop

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
