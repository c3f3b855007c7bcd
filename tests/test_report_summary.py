"""summary.json assembly from fixture stage files, the multi-seed report and its CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from parlm.report import plots as plots
from parlm.report import summary as report
from parlm.config import Config


def write_seed(run_root: Path, seed: int, ttt_bpb: float, bytes_model: int,
               skip: tuple[str, ...] = (), extra: dict[str, dict] | None = None) -> Path:
    """A seed folder with hand-written stage result files (the contract's key names);
    `extra` adds keys to a file ({"train.json": {"stalled": True}})."""
    run_dir = run_root / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    Config().replace(seed=seed).save(run_dir / "config.yaml")
    files = {
        "train.json": {"steps": 100 + seed % 7, "train_seconds": 40.5, "prequant_bpb": ttt_bpb + 0.02,
                       "prequant_seconds": 1.5, "live_val_bpb": ttt_bpb + 0.01, "world_size": 1,
                       "device": "cpu", "peak_memory_mib": 0.0},
        "quant.json": {"bytes_model": bytes_model, "bytes_code": 20_000,
                       "bytes_total": bytes_model + 20_000, "cap": 16_000_000, "fits_cap": True,
                       "hessian_seconds": 0.5, "gptq_seconds": 2.0, "compress_seconds": 1.0,
                       "per_tensor": {}},
        "eval.json": {"quantized_bpb": ttt_bpb + 0.03, "sliding_bpb": ttt_bpb + 0.005,
                      "ttt_bpb": ttt_bpb, "quantized_seconds": 2.0, "sliding_seconds": 3.25,
                      "ttt_seconds": 7.0, "compile_seconds": 0.0, "ttt_chunks": []},
        "ppm.json": {"mix_bpb": ttt_bpb - 0.1, "ppm_only_bpb": 2.3, "nn_only_bpb": ttt_bpb,
                     "gate_skip": 0.25, "bytes": 12345, "seconds": 0.75, "subset_tokens": 0},
    }
    for name, content in files.items():
        content.update((extra or {}).get(name, {}))
        if name not in skip:
            (run_dir / name).write_text(json.dumps(content))
    metrics = [{"stage": "train", "step": s, "train_loss": 6.0 - s / 50} for s in range(0, 100, 10)]
    metrics += [{"stage": "val", "step": 100, "val_loss": 4.0, "val_bpb": ttt_bpb + 0.01}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run_dir


def test_summarize_seed_maps_every_contract_key(tmp_path):
    run_dir = write_seed(tmp_path, 314, 1.5, 1_000_000)
    summary = report.summarize_seed(run_dir)
    expected = {"seed": 314, "steps": 100 + 314 % 7, "train_seconds": 40.5, "prequant_bpb": 1.52,
                "quantized_bpb": 1.53, "sliding_bpb": 1.505, "ttt_bpb": 1.5, "mix_bpb_legacy": 1.4,
                "bytes_model": 1_000_000, "bytes_code": 20_000, "bytes_total": 1_020_000,
                "prequant_seconds": 1.5, "quantized_seconds": 2.0, "sliding_seconds": 3.25,
                "ttt_seconds": 7.0, "ppm_seconds": 0.75, "gate_skip": 0.25, "nn_only_bpb": 1.5,
                "ppm_only_bpb": 2.3}
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    assert summary["eval_seconds_total"] == pytest.approx(1.5 + 2.0 + 3.25 + 7.0 + 0.75)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["ttt_bpb"] == 1.5 and on_disk["bytes_total"] == 1_020_000
    # The clock's measurements go to timings.json, so a step-count run's summary.json repeats.
    timings = json.loads((run_dir / "timings.json").read_text())
    assert not [k for k in on_disk if "seconds" in k] and "eval_seconds_total" in timings
    assert timings["train_seconds"] == pytest.approx(summary["train_seconds"]) and timings["seed"] == 314
    assert {**on_disk, **timings} == summary


@pytest.mark.parametrize("missing,stage", [("train.json", "train"), ("quant.json", "quant"),
                                           ("eval.json", "eval"), ("ppm.json", "ppm")])
def test_missing_stage_file_names_the_stage_to_run(tmp_path, missing, stage):
    run_dir = write_seed(tmp_path, 42, 1.5, 1_000_000, skip=(missing,))
    with pytest.raises(report.MissingStageError) as info:
        report.summarize_seed(run_dir)
    assert f"'{stage}' stage" in str(info.value)
    assert f"python -m parlm.{stage} --run-dir" in str(info.value)
    assert not (run_dir / "summary.json").exists()


def test_missing_required_key_is_reported(tmp_path):
    run_dir = write_seed(tmp_path, 42, 1.5, 1_000_000)
    (run_dir / "eval.json").write_text(json.dumps({"quantized_bpb": 1.6}))
    with pytest.raises(report.MissingStageError, match="ttt_bpb"):
        report.summarize_seed(run_dir)


def test_build_report_against_published_baseline(tmp_path):
    run_root = tmp_path / "run"
    write_seed(run_root, 42, 1.50, 1_000_000)
    write_seed(run_root, 314, 1.52, 1_200_000)
    write_seed(run_root, 999, 1.51, 1_100_000)
    out = tmp_path / "out"
    result = report.build_report(run_root, "pr1858", out)
    assert result["seeds"] == [42, 314, 999]
    assert result["worst_bytes_total"] == 1_220_000 and result["fits_cap"] is True
    stats = result["statistics"]["ttt_bpb"]
    assert stats["mean"] == pytest.approx(1.51)
    assert stats["std"] == pytest.approx(0.01)  # deviations -0.01, +0.01, 0 -> sqrt(0.0002/2)
    welch = result["baseline"]["welch_ttt_bpb"]
    # Against 1.08061893 / 1.08103354 / 1.08135172 (the published seeds).
    assert welch["mean_b"] == pytest.approx((1.08061893 + 1.08103354 + 1.08135172) / 3)
    assert welch["difference"] > 0.4 and welch["p_greater"] < 0.01
    # Config() resolves to the reference's own dataset name, so this fixture is comparable.
    assert result["baseline"]["comparable"] is True and result["baseline"]["comparability_note"] is None
    saved = json.loads((out / "report.json").read_text())
    assert saved["worst_bytes_total"] == 1_220_000
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 3 + 2  # header, rule, 3 seeds, mean, std
    assert "1,220,000" in table
    for path in result["plots"].values():
        assert Path(path).stat().st_size > 10_000  # a real PNG, not an empty file
    assert "exported" in result["submission"]


def test_report_against_another_run_and_cli(tmp_path, capsys):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for seed, value in ((1, 1.40), (2, 1.42)):
        write_seed(ours, seed, value, 900_000)
    for seed, value in ((1, 1.50), (2, 1.53), (3, 1.47)):
        write_seed(theirs, seed, value, 900_000)
    code = report.main(["--run-root", str(ours), "--baseline", str(theirs), "--out",
                        str(tmp_path / "r"), "--no-plots", "--no-submission", "--summarize"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTT BPB vs run theirs" in printed and "not a valid BPB" in printed
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    welch = saved["baseline"]["welch_ttt_bpb"]
    # mean 1.41 vs 1.50; var 0.0002 and 0.0009 -> se^2 = 0.0001 + 0.0003.
    assert welch["t"] == pytest.approx(-0.09 / math.sqrt(0.0004))
    assert (ours / "seed_1" / "summary.json").exists()


def test_baseline_on_another_dataset_is_flagged_not_comparable(tmp_path, capsys):
    run_root = tmp_path / "proxy"
    for seed in (42, 314):
        run_dir = write_seed(run_root, seed, 1.69, 1_000_000)
        Config().replace(seed=seed, dataset_name="wiki2015_sp8192").save(run_dir / "config.yaml")
    code = report.main(["--run-root", str(run_root), "--out", str(tmp_path / "r"), "--no-plots",
                        "--no-submission"])
    assert code == 0
    saved = json.loads((tmp_path / "r" / "report.json").read_text())["baseline"]
    assert saved["comparable"] is False
    assert saved["datasets"] == ["wiki2015_sp8192"] and saved["baseline_datasets"] == ["fineweb10B_sp8192"]
    assert saved["welch_ttt_bpb"] is not None  # still computed, shown as mechanics only
    assert "NOT comparable" in capsys.readouterr().out


def test_report_without_finished_seeds_is_a_clear_error(tmp_path, capsys):
    write_seed(tmp_path / "run", 42, 1.5, 1, skip=("ppm.json",))
    assert report.main(["--run-root", str(tmp_path / "run"), "--no-plots"]) == 2
    assert "'ppm' stage" in capsys.readouterr().err


def test_reference_pr1858_matches_published_submission():
    reference = report.load_reference("pr1858")
    seeds = reference["seeds"]
    assert max(s["bytes_total"] for s in seeds.values()) == reference["published"]["bytes_total"]
    for seed in seeds.values():
        assert seed["bytes_model"] + seed["bytes_code"] == seed["bytes_total"]
    mean = sum(s["ttt_bpb"] for s in seeds.values()) / 3
    assert round(mean, 5) == reference["published"]["val_bpb"]


def test_training_curves_mark_each_seeds_looping_switch_and_its_scores(tmp_path):
    """The report's training figure: one dotted line per seed at train.json's looping_step, the
    live validation and EMA (pre-quant) points at the steps logged, each labelled with its value
    when a seed was validated only at the stop."""
    run_dirs = []
    for seed, looping_step in ((42, 35), (314, 45)):
        run_dir = write_seed(tmp_path, seed, 1.5, 15_000_000)
        train = json.loads((run_dir / "train.json").read_text())
        (run_dir / "train.json").write_text(json.dumps({**train, "looping_step": looping_step}))
        with (run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"stage": "prequant", "step": 100, "val_bpb": 1.52}) + "\n")
        run_dirs.append(run_dir)
    figure = plots.training_curves(run_dirs)
    loss_ax, val_ax = figure.axes
    vertical = sorted(line.get_xdata()[0] for line in loss_ax.get_lines() if line.get_linestyle() == ":")
    assert vertical == [35, 45]
    labels = val_ax.get_legend_handles_labels()[1]
    # Each star's entry holds the gap EMA - live = 1.52 - 1.51 the caption explains.
    assert labels == ["seed 42 live", "seed 42 EMA (pre-quant): +0.010 vs live", "seed 314 live",
                      "seed 314 EMA (pre-quant): +0.010 vs live"]
    texts = sorted(text.get_text() for text in val_ax.texts)
    assert texts == ["1.5100", "1.5100", "1.5200", "1.5200"]  # each seed's live and EMA values
    caption = figure.get_supxlabel()
    assert "ema_decay" in caption and "lags" in caption


# Projection fields as parlm.eval.budget.projection_for_run writes them into eval.json.
def projection(seconds: float, clock: float = 30.0) -> dict:
    return {"eval_clock_seconds": clock, "eval_projection_seconds": seconds,
            "eval_projection_target": "8xH100", "eval_projection_budget_seconds": 600.0,
            "eval_projection_over_budget": seconds > 600.0}


def test_summary_carries_the_stall_record_and_the_eval_projection(tmp_path):
    run_dir = write_seed(tmp_path, 7, 1.5, 1_000_000, extra={
        "train.json": {"stalled": True, "stalled_steps": [4, 12]},
        "eval.json": projection(612.5, clock=41.25)})
    report.summarize_seed(run_dir)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    timings = json.loads((run_dir / "timings.json").read_text())
    assert on_disk["stalled"] is True and on_disk["stalled_steps"] == [4, 12]
    assert timings["eval_clock_seconds"] == 41.25 and timings["eval_projection_seconds"] == 612.5
    assert on_disk["eval_projection_target"] == "8xH100"
    assert timings["eval_projection_budget_seconds"] == 600.0
    assert timings["eval_projection_over_budget"] is True
    assert report.read_seed_summary(run_dir) == report.summarize_seed(run_dir, write=False)
    # Stage files from before these fields: the summary holds None, and nothing is flagged.
    old = write_seed(tmp_path, 8, 1.5, 1_000_000)
    summary = report.summarize_seed(old)
    assert summary["stalled"] is None and summary["eval_projection_seconds"] is None
    assert report.seed_flags([summary]) == []


def test_report_flags_a_stalled_seed_and_an_eval_projected_over_600_seconds(tmp_path, capsys):
    run_root = tmp_path / "run"
    write_seed(run_root, 42, 1.50, 1_000_000, extra={"train.json": {"stalled": False, "stalled_steps": None},
                                                     "eval.json": projection(540.0)})
    write_seed(run_root, 314, 6.93, 1_000_000, extra={"train.json": {"stalled": True, "stalled_steps": [3, 9]},
                                                      "eval.json": projection(600.0)})  # at the cap: fits
    write_seed(run_root, 999, 1.51, 1_000_000, extra={"eval.json": projection(600.5, clock=52.0)})
    out = tmp_path / "out"
    result = report.build_report(run_root, None, out, plots=False, submission=False)
    flags = result["seed_flags"]
    assert len(flags) == 2 and all("\n" not in flag for flag in flags)
    stalled, over = flags
    assert stalled.startswith("warning: seed 314 STALLED:") and "steps 3..9" in stalled
    assert over.startswith("warning: seed 999 OVER the eval budget: projected 600.5 s on 8xH100 "
                           "exceeds 600 s") and "measured 52.0 s here" in over
    assert json.loads((out / "report.json").read_text())["seed_flags"] == flags
    # Each flag is one line of table.md (what parlm.run prints last) and of the printed report.
    table_lines = (out / "table.md").read_text().splitlines()
    assert table_lines[:7] == report.markdown_table(result["summaries"], result["statistics"]).splitlines()
    assert table_lines[7:] == ["", f"- {stalled}", f"- {over}"]
    printed = report.format_report(result, table=False).splitlines()
    assert [line for line in printed if line.startswith("warning: seed")] == flags
    assert report.main(["--run-root", str(run_root), "--baseline", "none", "--out", str(tmp_path / "cli"),
                        "--no-plots", "--no-submission"]) == 0
    assert sum(line in flags for line in capsys.readouterr().out.splitlines()) == 2


def test_a_healthy_run_has_no_flags_and_an_unchanged_table(tmp_path):
    run_root = tmp_path / "run"
    for seed in (1, 2):
        write_seed(run_root, seed, 1.5, 1_000_000, extra={"train.json": {"stalled": False},
                                                          "eval.json": projection(120.0)})
    result = report.build_report(run_root, None, tmp_path / "out", plots=False, submission=False)
    assert result["seed_flags"] == []
    table = (tmp_path / "out" / "table.md").read_text()
    assert table == report.markdown_table(result["summaries"], result["statistics"]) + "\n"
    assert "warning" not in report.format_report(result)
