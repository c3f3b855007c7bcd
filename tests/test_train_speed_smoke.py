"""benchmarks/train_speed.py in its CPU smoke mode: it runs the real training step and writes
the FLOP accounting (GPU-only figures such as MFU stay empty on a CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_speed_cpu_smoke(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "train_speed.py"), "--device", "cpu",
                    "--preset", "demo", "--steps-before", "4", "--steps-after", "4", "--warmup-steps", "1",
                    "--profile-steps", "0", "--shards", "1", "--shard-tokens", "50000",
                    "--data-dir", str(tmp_path / "data"), "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["bf16_dense_peak_tflops"] is None
    before, after = result["flops_per_token"]["before_loop"], result["flops_per_token"]["after_loop"]
    assert after["block_passes"] > before["block_passes"]  # the looped schedule runs more blocks
    assert after["training"] > before["training"] > 0
    assert before["mfu"] is None and result["tok_per_sec_before_loop"] > 0
