"""Every entry point of DESIGN.md answers `--help` with exit code 0.

The seven interpreters start concurrently (each imports torch), once per session. Modules
another area has not written yet are skipped (and named in the skip reason)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

ENTRY_POINTS = ("data", "train", "quant", "eval", "ppm", "report", "run")


def _module_exists(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package needs __main__ for -m
        return importlib.util.find_spec(f"{name}.__main__") is not None
    return True


@pytest.fixture(scope="module")
def help_results() -> dict[str, tuple[int, str, str]]:
    processes = {stage: subprocess.Popen([sys.executable, "-m", f"parlm.{stage}", "--help"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for stage in ENTRY_POINTS if _module_exists(f"parlm.{stage}")}
    results = {}
    for stage, process in processes.items():
        out, err = process.communicate(timeout=300)
        results[stage] = (process.returncode, out, err)
    return results


@pytest.mark.parametrize("stage", ENTRY_POINTS)
def test_entry_point_help_exits_zero(stage, help_results):
    if stage not in help_results:
        pytest.skip(f"parlm.{stage} does not exist yet (python -m parlm.{stage} not runnable)")
    code, out, err = help_results[stage]
    assert code == 0, err[-2000:]
    assert "usage" in out.lower()
