"""The notebooks parlm.run executes honour its parameter contract (checked statically, fast).

Each numbered notebook has a `parameters`-tagged cell of literals holding the standard
parameters with the shared defaults, and is committed without outputs. Notebooks not written
yet are skipped (named in the reason)."""
from __future__ import annotations

import ast

import nbformat
import pytest

from parlm import run

STANDARD = {"preset": "demo", "seed": 42, "overrides": []}
# The notebooks whose stage, or a stage before it, runs under torchrun.
NEEDS_NPROC = ("03_train", "04_quantize", "05_ttt_eval", "06_ppm_mixture")


def _load(stem: str):
    path = run.NOTEBOOK_DIR / f"{stem}.ipynb"
    if not path.exists():
        pytest.skip(f"{path.name} is not written yet")
    return nbformat.read(path, as_version=4)


def _parameters(notebook) -> dict:
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    values = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, \
            f"parameters cell must hold plain assignments, got {ast.dump(node)[:80]}"
        values[node.targets[0].id] = ast.literal_eval(node.value)  # literals only (STYLE 1)
    return values


@pytest.mark.parametrize("stem", [stem for stem, _ in run.SEED_NOTEBOOKS])
def test_seed_notebook_parameters(stem):
    values = _parameters(_load(stem))
    for key, default in STANDARD.items():
        assert values.get(key) == default, f"{stem}: parameter {key} should default to {default!r}"
    # Relative to the checkout (pipeline.project_path), whatever folder the notebook runs from.
    assert values.get("run_dir") == "runs/notebooks/seed_42"
    if stem in NEEDS_NPROC:
        assert values.get("nproc") == 1, f"{stem}: needs an `nproc = 1` parameter for --nproc"


def test_report_notebook_parameters():
    values = _parameters(_load(run.REPORT_NOTEBOOK))
    assert set(run.RunPlan("demo", [1], "x", run.PROJECT_ROOT).report_parameters()) <= set(values)


@pytest.mark.parametrize("stem", [stem for stem, _ in run.SEED_NOTEBOOKS] + [run.REPORT_NOTEBOOK])
def test_notebook_is_committed_without_outputs(stem):
    notebook = _load(stem)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{stem} cell {index} has outputs"
    assert notebook.cells[0].cell_type == "markdown", f"{stem}: starts with a title cell"


STAGE_CALL = "pipeline.stage(preset, run_dir, seed,"


@pytest.mark.parametrize("stem,stage", [(stem, stage) for stem, stage in run.SEED_NOTEBOOKS if stage])
def test_every_stage_notebook_starts_its_stage_with_the_one_call(stem, stage):
    """One `pipeline.stage(...)` call per stage notebook, naming its own stage; no other way of
    starting a stage (ensure, run_stage, a stage function) appears in the notebook."""
    code = "\n".join(c.source for c in _load(stem).cells if c.cell_type == "code")
    assert code.count(STAGE_CALL) == 1, f"{stem}: expected one {STAGE_CALL}...) call"
    call = code[code.index(STAGE_CALL):].split(")")[0]
    assert f'"{stage}"' in call, f"{stem}: the call should name stage {stage!r}: {call})"
    for other in ("ensure(", "run_stage(", "train_stage(", "ppm_run(", "quantize_run(", "evaluate_run("):
        assert other not in code, f"{stem} starts a stage another way: {other}"
