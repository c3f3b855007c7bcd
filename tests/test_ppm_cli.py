"""`python -m parlm.ppm` and the `ppm_run` stage on real text with a real tokenizer."""
from __future__ import annotations

import json
import lzma
import subprocess
import sys

import numpy as np
import pytest

from parlm.config import Config
from parlm.data.tokenizer import ByteTables
from test_ppm_legacy import rel_close, slow_legacy


@pytest.fixture(scope="module")
def wiki_nll(tmp_path_factory, wiki_docs_path, sp1024_path):
    """BOS + tokens of the first wiki documents, synthetic NLLs (some tiny), as nll.npz."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp1024_path))
    tokens = []
    with lzma.open(wiki_docs_path, "rt", encoding="utf-8") as fh:
        for _ in range(3):
            tokens += [1] + sp.encode(json.loads(fh.readline())["text"][:2500])
    tokens = np.array(tokens, dtype=np.int64)
    rng = np.random.default_rng(0)
    nll = rng.exponential(2.0, size=len(tokens) - 1)
    nll[rng.random(len(nll)) < 0.3] *= 0.05
    path = tmp_path_factory.mktemp("ppm") / "nll.npz"
    np.savez(path, target=tokens[1:], prev=tokens[:-1], nll=nll)
    return path, tokens[1:], tokens[:-1], nll


def run_cli(*args):
    done = subprocess.run([sys.executable, "-m", "parlm.ppm", *args], capture_output=True, text=True,
                          check=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout  # exactly one JSON object
    return json.loads(lines[0])


def test_score_cli_matches_slow_reference(wiki_nll, sp1024_path):
    path, target, prev, nll = wiki_nll
    out = run_cli("score", "--npz", str(path), "--tokenizer", str(sp1024_path), "--mode", "legacy",
                  "--subset-tokens", "1500", "--json")
    tables = ByteTables.from_tokenizer(sp1024_path)
    expect = slow_legacy(target[:1500], prev[:1500], nll[:1500], tables.token_bytes,
                         tables.has_leading_space, tables.is_boundary)
    assert out["normalized"] is False and "NOT a normalized" in out["note"]
    assert out["bytes"] == expect["bytes"] == int(tables.count_bytes(target[:1500], prev[:1500]).sum())
    for key, ref in (("mix_bpb", "mix"), ("ppm_only_bpb", "ppm"), ("nn_only_bpb", "nn")):
        assert rel_close(out[key], expect[ref])
    assert out["gate_skip"] == pytest.approx(expect["skips"] / expect["bytes"])
    assert set(out) >= {"mix_bpb", "ppm_only_bpb", "nn_only_bpb", "gate_skip", "bytes", "seconds"}


def run_in_process(capsys, *args):
    from parlm.ppm.__main__ import main

    assert main(list(args)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_ppmd_and_audit_cli(wiki_nll, sp1024_path, capsys):
    path, *_ = wiki_nll
    ppmd = run_in_process(capsys, "score", "--npz", str(path), "--tokenizer", str(sp1024_path), "--mode", "ppmd",
                   "--subset-tokens", "800", "--json")
    assert ppmd["normalized"] is True and 1.0 < ppmd["ppmd_bpb"] < 8.0
    audit = run_in_process(capsys, "audit", "--npz", str(path), "--tokenizer", str(sp1024_path), "--positions", "6",
                    "--subset-tokens", "1500", "--json")
    assert audit["positions"] == 6
    assert audit["ppmd_total"]["max"] == pytest.approx(1.0, abs=1e-12)
    assert audit["ppm_total"]["max"] <= 1.0 + 1e-12  # sub-normalised
    assert audit["constant_total"]["min"] > 1.0  # 256 bytes each given p^(1/n)


def test_ppm_run_writes_results_and_traces(tmp_path, wiki_nll, sp1024_path):
    path, target, prev, nll = wiki_nll
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    np.savez(run_dir / "nll.npz", target=target, prev=prev, nll=nll, nll_mix=nll * 0.99)
    config = Config().replace(tokenizer_path=str(sp1024_path), vocab_size=1024, ppm_subset_tokens=2000)
    from parlm.ppm import ppm_run
    from parlm.ppm.stage import load_traces

    out = ppm_run(config, run_dir, audit_count=5, progress=False)
    saved = json.loads((run_dir / "ppm.json").read_text())
    assert saved["mix_bpb"] == out["mix_bpb"] and saved["subset_tokens"] == 2000
    assert saved["normalized"] is False and saved["audit"]["positions"] == 5
    tables = ByteTables.from_tokenizer(sp1024_path)
    n_bytes = tables.count_bytes(target[:2000], prev[:2000]).sum()
    assert saved["neural_bpb_same_positions"] == pytest.approx(nll[:2000].sum() / n_bytes / np.log(2))
    assert saved["mix_valid_bpb_same_positions"] == pytest.approx(0.99 * saved["neural_bpb_same_positions"])
    traces = load_traces(run_dir / "ppm_trace.npz")
    assert len(traces["trace_byte"]) == saved["bytes"]  # small stream: every byte traced
    assert traces["position_stats"].sum() == saved["bytes"]
    assert traces["token_frequency"].sum() == saved["tokens_scored"]
    assert np.array_equal(traces["trace_gate_skip"], traces["trace_lambda_choice"] == 2)


def test_ppm_stage_command_runs_the_stage_and_errors_in_one_line(tmp_path, wiki_nll, sp1024_path, capsys):
    """`python -m parlm.ppm run --run-dir DIR` and the uniform `--run-dir DIR` form go through
    parlm.cli.stage_command: the run folder's config.yaml, the same ppm.json as ppm_run, and a
    missing nll.npz is one line with exit code 1."""
    from parlm.ppm import ppm_run
    from parlm.ppm.__main__ import main

    path, target, prev, nll = wiki_nll
    config = Config().replace(tokenizer_path=str(sp1024_path), vocab_size=1024, ppm_subset_tokens=1500)
    expected_dir, command_dir = tmp_path / "expected", tmp_path / "command"
    for run_dir in (expected_dir, command_dir):
        run_dir.mkdir()
        np.savez(run_dir / "nll.npz", target=target, prev=prev, nll=nll)
        config.save(run_dir / "config.yaml")
    expected = ppm_run(config, expected_dir, progress=False)
    assert main(["run", "--run-dir", str(command_dir)]) == 0
    saved = json.loads((command_dir / "ppm.json").read_text())
    assert saved["mix_bpb"] == expected["mix_bpb"] and saved["bytes"] == expected["bytes"]
    capsys.readouterr()
    for argv, prog in ((["run", "--run-dir", str(tmp_path / "none")], "python -m parlm.ppm run"),
                       (["--run-dir", str(tmp_path / "none")], "python -m parlm.ppm")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"{prog}: error: ") and "nll.npz" in err and "\n" not in err
