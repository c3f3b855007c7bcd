"""scripts/setup.sh's kernel per checkout (parlm.config.checkout_kernel_name), run with a
private Jupyter data folder so the user's kernels are never touched."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parlm.config import PROJECT_ROOT, checkout_kernel_name

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_kernel_name_is_a_hash_of_the_checkout_path(tmp_path):
    expected = "parlm-" + hashlib.sha1(str(PROJECT_ROOT).encode()).hexdigest()[:8]
    assert checkout_kernel_name() == expected
    assert checkout_kernel_name(tmp_path / "a") != checkout_kernel_name(tmp_path / "b")
    assert checkout_kernel_name(tmp_path / "a" / ".." / "b") == checkout_kernel_name(tmp_path / "b")


def run_setup_kernel(data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JUPYTER_DATA_DIR": str(data_dir), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--kernel"], env=env,
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow  # three ipykernel installs
def test_setup_registers_this_checkouts_kernel_and_leaves_anothers_alone(tmp_path):
    name = checkout_kernel_name(ROOT)
    first = run_setup_kernel(tmp_path)
    spec = json.loads((tmp_path / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["display_name"] == f"parlm ({ROOT})"
    assert f"registering the Jupyter kernel '{name}'" in first.stderr
    # Nothing changed: quiet, nothing rewritten.
    assert run_setup_kernel(tmp_path).stderr == ""
    # The plain `parlm` kernel of another checkout is not re-pointed, and setup says so.
    plain = tmp_path / "kernels" / "parlm" / "kernel.json"
    foreign = {**json.loads(plain.read_text()), "argv": ["/other/checkout/.venv/bin/python", "-m", "ipykernel_launcher"]}
    plain.write_text(json.dumps(foreign))
    (tmp_path / "kernels" / name / "kernel.json").unlink()
    note = run_setup_kernel(tmp_path).stderr
    assert "belongs to another environment" in note and "/other/checkout/.venv/bin/python" in note
    assert json.loads(plain.read_text())["argv"][0] == "/other/checkout/.venv/bin/python"
    assert (tmp_path / "kernels" / name / "kernel.json").exists()
