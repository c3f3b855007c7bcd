"""parlm.run orchestration: run ids, parameters, resume, failure handling, stage markers.

The papermill tests execute small stand-in notebooks (real kernels, real papermill) that write
the contract's stage files and markers, so the orchestration is tested without training."""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from parlm import pipeline, run, runlog
from parlm.config import Config, ConfigError


def test_default_run_id_format():
    when = datetime.datetime(2026, 4, 29, 4, 5, 6)
    assert run.default_run_id("demo", when) == "demo-20260429-040506"


def test_plan_passes_absolute_paths_and_the_standard_parameters(tmp_path):
    plan = run.RunPlan(preset="demo", seeds=[42, 314], run_id="x", runs_dir=tmp_path,
                       overrides=["iterations=5"], nproc=2)
    params = plan.seed_parameters(314)
    assert params == {"preset": "demo", "run_dir": str(tmp_path / "x" / "seed_314"), "seed": 314,
                      "overrides": ["iterations=5"], "nproc": 2}
    assert Path(params["run_dir"]).is_absolute()
    assert plan.report_parameters()["run_root"] == str(tmp_path / "x")
    assert plan.report_parameters()["report_dir"] == str(tmp_path / "x" / "report")


def test_every_notebook_the_run_needs_is_named_in_order():
    stems = [stem for stem, _ in run.SEED_NOTEBOOKS] + [run.REPORT_NOTEBOOK]
    assert stems == sorted(stems) and [s[:2] for s in stems] == ["01", "02", "03", "04", "05", "06", "07"]
    stages = [stage for _, stage in run.SEED_NOTEBOOKS if stage]
    assert stages == list(pipeline.STAGES[:-1])  # every stage but summary has its notebook


def test_resume_with_a_different_config_is_refused(tmp_path):
    plan = run.RunPlan(preset="demo", seeds=[1], run_id="r", runs_dir=tmp_path)
    saved = run.prepare_seed(plan, 1)
    assert Config.load(tmp_path / "r" / "seed_1" / "config.yaml") == saved
    run.prepare_seed(plan, 1)  # same config: accepted
    plan.overrides = ["iterations=3"]
    with pytest.raises(ConfigError, match="iterations"):
        run.prepare_seed(plan, 1)


def test_resume_may_change_the_size_cap_while_the_quant_verdict_stands(tmp_path, capsys):
    """A run stopped over the cap goes on with a raised cap (config.yaml records it, the change is
    printed); after quant is done the cap may only move where that quant's bytes_total still fits."""
    plan = run.RunPlan(preset="demo", seeds=[1], run_id="r", runs_dir=tmp_path)
    run.prepare_seed(plan, 1)
    run_dir = tmp_path / "r" / "seed_1"
    runlog.mark_stage_done(run_dir, "train")
    plan.overrides = ["artifact_cap_bytes=17000000"]
    resumed = run.prepare_seed(plan, 1)
    assert resumed.artifact_cap_bytes == 17_000_000
    assert Config.load(run_dir / "config.yaml").artifact_cap_bytes == 17_000_000
    assert "artifact_cap_bytes 16000000 -> 17000000" in capsys.readouterr().err
    runlog.write_json(run_dir / "quant.json", {"bytes_total": 16_500_000})
    runlog.mark_stage_done(run_dir, "quant")
    plan.overrides = ["artifact_cap_bytes=18000000"]
    assert run.prepare_seed(plan, 1).artifact_cap_bytes == 18_000_000  # 16.5 MB still fits
    plan.overrides = ["artifact_cap_bytes=16000000"]
    with pytest.raises(ConfigError, match="artifact_cap_bytes: 18000000 \\(saved\\) vs 16000000"):
        run.prepare_seed(plan, 1)  # the finished quant would no longer fit
    plan.overrides = ["artifact_cap_bytes=18000000", "iterations=3"]
    with pytest.raises(ConfigError, match="iterations"):
        run.prepare_seed(plan, 1)


def test_cli_flags_reach_the_plan(monkeypatch):
    seen = []
    monkeypatch.setattr(run, "run", lambda plan: seen.append(plan) or 0)
    assert run.main(["--preset", "demo", "--seeds", "7", "--run-id", "x", "--quiet"]) == 0
    assert seen[-1].report_notebook == run.REPORT_NOTEBOOK and not seen[-1].keep_going
    assert run.main(["--preset", "demo", "--seeds", "7", "--run-id", "x", "--quiet",
                     "--no-report", "--keep-going"]) == 0
    assert seen[-1].report_notebook is None and seen[-1].keep_going


def test_bad_override_and_unknown_preset_exit_2(capsys):
    assert run.main(["--preset", "nope", "--seeds", "1"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert run.main(["--preset", "demo", "--set", "itterations=3"]) == 2
    assert "did you mean iterations" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# pipeline markers: a done stage is skipped, a failed stage leaves no marker

STAGE_FILES = {
    "train.json": {"steps": 3, "train_seconds": 1.0, "prequant_bpb": 3.1},
    "quant.json": {"bytes_model": 5000, "bytes_code": 700, "bytes_total": 5700},
    "eval.json": {"quantized_bpb": 3.2, "sliding_bpb": 3.15, "ttt_bpb": 3.0},
    "ppm.json": {"mix_bpb": 2.5, "gate_skip": 0.1},
}


def fake_finished_stages(run_dir: Path) -> None:
    for name, content in STAGE_FILES.items():
        runlog.write_json(run_dir / name, content)
    for stage in pipeline.STAGES[:-1]:
        runlog.mark_stage_done(run_dir, stage)


def test_ensure_skips_done_stages_and_a_failed_stage_leaves_no_marker(tmp_path, monkeypatch):
    config = Config.from_preset("demo")
    run_dir = tmp_path / "seed"
    pipeline.prepare_run(config, run_dir)
    fake_finished_stages(run_dir)

    def broken(_run_dir):
        raise RuntimeError("summary broke")

    import parlm.report.summary

    monkeypatch.setattr(parlm.report.summary, "summarize_seed", broken)
    with pytest.raises(RuntimeError, match="summary broke"):
        pipeline.ensure(config, run_dir, "summary")  # data..ppm are done: only summary runs
    assert not runlog.stage_done(run_dir, "summary")
    monkeypatch.undo()
    pipeline.ensure(config, run_dir, "summary")
    assert runlog.stage_done(run_dir, "summary")
    assert json.loads((run_dir / "summary.json").read_text())["ttt_bpb"] == 3.0
    monkeypatch.setattr(parlm.report.summary, "summarize_seed", broken)
    pipeline.ensure(config, run_dir, "summary")  # done: not run again, so no error


# ----------------------------------------------------------------------------------------------
# papermill end to end with stand-in notebooks

PARAMETERS = 'preset = "demo"\nrun_dir = "unset"\nseed = 0\noverrides = []\nnproc = 1\n'
STAGE_A = """from pathlib import Path
from parlm import runlog
run_dir = Path(run_dir)
with open(run_dir / "executions_a.txt", "a") as fh:
    fh.write("ran\\n")
runlog.write_json(run_dir / "train.json", {stage_files[train.json]})
for stage in ("data", "train"):
    runlog.mark_stage_done(run_dir, stage)
print("stage A streamed output")"""
STAGE_B = """from pathlib import Path
from parlm import runlog
run_dir = Path(run_dir)
if (run_dir / "please_fail").exists():
    raise ValueError("stand-in failure")
for name in ("quant.json", "eval.json", "ppm.json"):
    runlog.write_json(run_dir / name, stage_files[name])
for stage in ("quant", "eval", "ppm"):
    runlog.mark_stage_done(run_dir, stage)"""
REPORT = """from pathlib import Path
from parlm.report import summary as report
result = report.build_report(run_root, "pr1858", report_dir, plots=False, submission=False)
print(sorted(result["seeds"]))"""


def write_notebook(path: Path, parameters: str, body: str) -> None:
    notebook = new_notebook()
    cell = new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    prelude = f"stage_files = {STAGE_FILES!r}\n"
    notebook.cells = [cell, new_code_cell(prelude + body.replace(
        "{stage_files[train.json]}", 'stage_files["train.json"]'))]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture
def stand_in_plan(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_a.ipynb", PARAMETERS, STAGE_A)
    write_notebook(notebooks / "02_b.ipynb", PARAMETERS, STAGE_B)
    write_notebook(notebooks / "07_r.ipynb",
                   'preset = "demo"\nrun_root = ""\nreport_dir = ""\nseeds = []\noverrides = []\n'
                   'baseline = "pr1858"\n', REPORT)
    return run.RunPlan(preset="demo", seeds=[1, 2], run_id="t", runs_dir=tmp_path / "runs",
                       notebook_dir=notebooks, cwd=tmp_path, progress_bar=False,
                       log_output=False, seed_notebooks=(("01_a", "train"), ("02_b", "ppm")),
                       report_notebook="07_r", kernel_name="python3")


def test_failure_then_resume(stand_in_plan, capsys):
    plan = stand_in_plan
    seed_1, seed_2 = plan.seed_dir(1), plan.seed_dir(2)
    seed_2.mkdir(parents=True)
    (seed_2 / "please_fail").write_text("")

    assert run.run(plan) == 1
    err = capsys.readouterr().err
    assert "[seed 2] FAILED: 02_b.ipynb failed" in err and "stand-in failure" in err
    assert str(seed_2 / "02_b.FAILED.ipynb") in err
    # Seed 1 finished completely; seed 2 has no completed-looking output for the failed notebook.
    assert (seed_1 / "summary.json").exists() and runlog.stage_done(seed_1, "summary")
    assert (seed_2 / "02_b.FAILED.ipynb").exists() and not (seed_2 / "02_b.ipynb").exists()
    assert not list(seed_2.glob(".*.running.ipynb"))
    assert not runlog.stage_done(seed_2, run.notebook_marker("02_b"))
    assert not runlog.stage_done(seed_2, "quant") and not (seed_2 / "summary.json").exists()
    assert runlog.stage_done(seed_2, run.notebook_marker("01_a"))
    assert not plan.report_dir.exists()

    (seed_2 / "please_fail").unlink()
    summary_before = (seed_1 / "summary.json").read_bytes()
    assert run.run(plan) == 0
    err = capsys.readouterr().err
    assert "[seed 1] 1/2 01_a: done earlier, skipped" in err
    assert "[seed 2] 1/2 01_a: done earlier, skipped" in err
    assert (seed_1 / "executions_a.txt").read_text() == "ran\n"  # not executed twice
    assert (seed_2 / "executions_a.txt").read_text() == "ran\n"
    assert (seed_2 / "02_b.ipynb").exists() and not (seed_2 / "02_b.FAILED.ipynb").exists()
    assert (seed_1 / "summary.json").read_bytes() == summary_before
    assert json.loads((seed_2 / "summary.json").read_text())["ttt_bpb"] == 3.0
    executed = nbformat.read(plan.report_dir / "07_r.ipynb", as_version=4)
    assert "[1, 2]" in executed.cells[-1].outputs[0]["text"]
    saved = json.loads((plan.report_dir / "report.json").read_text())
    assert saved["worst_bytes_total"] == 5700
    # papermill injected the absolute run folder as a parameter.
    injected = nbformat.read(seed_1 / "01_a.ipynb", as_version=4)
    assert any(str(seed_1) in c.source for c in injected.cells
               if "injected-parameters" in c.metadata.get("tags", []))


def test_a_notebook_that_forgets_its_stage_marker_fails_the_seed(stand_in_plan, capsys):
    plan = stand_in_plan
    plan.seeds, plan.report_notebook = [1], None
    plan.seed_notebooks = (("01_a", "quant"),)  # 01_a never marks "quant"
    assert run.run(plan) == 1
    err = capsys.readouterr().err
    assert "stage 'quant' has no marker" in err and "parlm.pipeline.stage" in err


def test_choose_kernel_returns_a_registered_kernel():
    from jupyter_client.kernelspec import KernelSpecManager

    assert run.choose_kernel() in KernelSpecManager().find_kernel_specs()
    assert sys.executable  # the fallback kernel is the environment's own python3


def test_restart_stage_train_clears_training_and_later_notebooks(tmp_path, tiny_config):
    """`parlm.run --restart-stage train`: the --set values land in config.yaml, the train and
    later stages and notebooks 03-06 are forgotten, data and notebooks 01-02 stay."""
    plan = run.RunPlan(preset="demo", seeds=[1], run_id="r", runs_dir=tmp_path,
                       overrides=["matrix_lr=0.01"], restart_stage="train")
    run_dir = plan.seed_dir(1)
    run_dir.mkdir(parents=True)
    tiny_config.replace(seed=1).save(run_dir / "config.yaml")
    for stage in ("data", "train", "quant"):
        runlog.mark_stage_done(run_dir, stage)
    for stem, _ in plan.seed_notebooks:
        runlog.mark_stage_done(run_dir, run.notebook_marker(stem))
    run.restart_seed_training(plan, run_dir)
    assert runlog.stage_done(run_dir, "data") and not runlog.stage_done(run_dir, "train")
    assert not runlog.stage_done(run_dir, "quant")
    kept = [stem for stem, _ in plan.seed_notebooks if runlog.stage_done(run_dir, run.notebook_marker(stem))]
    assert kept == ["01_data", "02_model"]
    assert pipeline.load_run_config(run_dir).matrix_lr == 0.01


def test_stage_summary_lines_label_the_byte_mixture_as_not_a_valid_bpb(tmp_path):
    (tmp_path / "ppm.json").write_text(json.dumps({"mix_bpb": 2.358421, "gate_skip": 0.0049}))
    (tmp_path / "eval.json").write_text(json.dumps({"quantized_bpb": 2.1, "sliding_bpb": None, "ttt_bpb": 2.0}))
    assert run.stage_summary_line("ppm", tmp_path) == \
        "mix_bpb_legacy=2.35842 (byte mixture, not a valid BPB) gate_skip=0.49%"
    assert run.stage_summary_line("eval", tmp_path) == "quantized_bpb=2.10000 ttt_bpb=2.00000"
    assert run.stage_summary_line(None, tmp_path) == ""
