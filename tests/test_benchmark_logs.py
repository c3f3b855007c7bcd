"""The benchmark scripts' readers of the reference's text logs, checked on the reference's own
8xH100 log (PR #1858, seed 42; ../shared) against figures read off that log by eye."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO_ROOT, _shared_path


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference_log():
    return _shared_path("reference/pr1858/train_seed42.log")


def test_cross_eval_table_reads_the_reference_scores(reference_log):
    scores = _benchmark("cross_eval_table").reference_scores(reference_log)
    # train_seed42.log lines 195-218
    assert scores["steps"] == 4630 and scores["train_seconds"] == pytest.approx(588.135)
    assert scores["prequant_bpb"] == pytest.approx(1.08713951)
    assert scores["quantized_bpb"] == pytest.approx(1.09833533)
    assert scores["sliding_bpb"] == pytest.approx(1.08177869)
    assert scores["ttt_bpb"] == pytest.approx(1.08061893)
    assert scores["ttt_seconds"] == pytest.approx(395.286)
    assert scores["bytes_model"] == 15_976_144


def test_cross_eval_table_puts_parlm_beside_the_reference(reference_log, tmp_path):
    table_module = _benchmark("cross_eval_table")
    (tmp_path / "x_eval.json").write_text(json.dumps({"quantized_bpb": 1.1, "sliding_bpb": 1.08,
                                                      "ttt_bpb": 1.07}))
    (tmp_path / "x_quant.json").write_text(json.dumps({"bytes_model": 123}))
    parlm = table_module.parlm_scores(tmp_path / "x_eval.json")
    assert parlm["bytes_model"] == 123
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in table_module.table(table_module.reference_scores(reference_log), parlm).splitlines()}
    assert rows["ttt_bpb"][1:4] == ["1.0806", "1.0700", "-0.0106"]
    assert rows["ttt_minus_sliding_bpb"][1:4] == ["-0.0012", "-0.0100", "-0.0088"]
    assert rows["ttt_minus_sliding_bpb"][-1].strip(" |") == "-0.0066"  # ANCHORS: 1.6728 - 1.6794


def test_compare_curves_reads_the_reference_training_log(reference_log):
    records = _benchmark("compare_curves").train_records(reference_log)
    # lines 178-193: steps 1-5, then every 500; `layer_loop:enabled step:2059` between 2000 and 2500
    assert records[1]["train_loss"] == 9.0104 and records[1]["tok_per_sec"] == 8404562
    assert [step for step in sorted(records) if records[step]["looping"]][:1] == [2500]
    assert not records[2000]["looping"] and records[4500]["looping"]


def test_steady_rates_recover_per_step_times():
    # Steps of 0.5 s each before looping and 1.0 s after, with a 10 s first step (compile):
    # the cumulative rates such a run logs give back 1000/0.5 and 1000/1.0 tok/s exactly.
    batch, records, elapsed = 1000, {}, 0.0
    for step in range(1, 31):
        looping = step > 15
        elapsed += 10.0 if step in (1, 16) else (1.0 if looping else 0.5)
        records[step] = {"train_loss": 1.0, "tok_per_sec": step * batch / elapsed, "looping": looping}
    rates = _benchmark("compare_curves").steady_rates(records, batch, skip=2)
    assert abs(rates["before_looping"] - 2000.0) < 1e-6 and abs(rates["after_looping"] - 1000.0) < 1e-6
    assert _benchmark("compare_curves").steady_rates({1: records[1]}, batch)["after_looping"] is None
