"""README figures that the code regenerates are quoted as the code prints them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # builds the script: every compression form at brotli-11 / lzma-9
def test_readme_quotes_the_generated_script_size(tmp_path):
    script = load_script()
    values = script.figures()
    assert script.check(ROOT / "README.md", values) == []
    # A stale quote is caught and the message names the value to write.
    size = values["bytes_code"]
    stale = tmp_path / "README.md"
    stale.write_text(f"the generated `train_gpt.py` is\n**{size + 1:,} bytes** here\n")
    problems = script.check(stale, values)
    assert len(problems) == 1 and f"write {size:,}" in problems[0]
    (tmp_path / "empty.md").write_text("no quote\n")
    assert "no sentence" in script.check(tmp_path / "empty.md", values)[0]
