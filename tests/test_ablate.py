"""parlm.ablate: the variants file, the job list, paired checkpoint reuse, the intervals against
hand computations with t-table quantiles, the results table, and dispatch through submitit's
LocalExecutor and the local pool."""
from __future__ import annotations

import math
import os

import pytest

from parlm import runlog
from parlm.ablate.dispatch import dispatch, gpu_slots, link_base_checkpoint
from parlm.ablate.results import ablation_table, markdown, paired_interval, welch_interval, write_results
from parlm.ablate.variants import Job, build_jobs, load_variants
from parlm.config import Config, ConfigError, parse_overrides


def test_package_variants_parse_into_valid_config_overrides():
    variants = load_variants()
    assert {"base", "lqer", "awq_lite", "mlp_clip_12", "gptq_batches_32", "per_group_compression",
            "frontier_quant", "frontier_all"} <= set(variants)
    assert variants["lqer"].paired and not variants["base"].paired and variants["lqer"].pr == 1797
    for variant in variants.values():
        Config().replace(**parse_overrides(variant.set_flags()))  # every key is a Config field
    assert variants["lqer"].set_flags() == ["lqer_top_k=3", "lqer_rank=4", "lqer_group_size=64"]


def test_variants_file_errors_name_the_variant(tmp_path):
    path = tmp_path / "variants.yaml"
    path.write_text("base: {}\nbroken: {overides: {lqer_top_k: 3}}\n")
    with pytest.raises(ConfigError, match="broken.*overides"):
        load_variants(path)


def test_job_list_order_overrides_and_pairing(tmp_path):
    variants = load_variants()
    jobs = build_jobs(variants, "base", ["lqer", "frontier_all"], [1, 2], "proxy", "abl", tmp_path,
                      ["ttt_enabled=true"], steps=300)
    assert [(j.variant, j.seed) for j in jobs] == [("base", 1), ("base", 2), ("lqer", 1), ("lqer", 2),
                                                    ("frontier_all", 1), ("frontier_all", 2)]
    lqer = jobs[2]
    assert lqer.paired_with == "base" and jobs[4].paired_with is None and jobs[4].preset == "frontier"
    assert lqer.overrides[:3] == ("iterations=300", "max_wallclock_seconds=0", "ttt_enabled=true")
    assert lqer.overrides[3:] == ("lqer_top_k=3", "lqer_rank=4", "lqer_group_size=64")
    command = lqer.command("python")
    assert command[:3] == ["python", "-m", "parlm.run"] and "--no-report" in command
    assert command[command.index("--run-id") + 1] == "abl/lqer" and command[command.index("--seeds") + 1] == "1"
    assert lqer.seed_dir == tmp_path / "abl" / "lqer" / "seed_1"
    with pytest.raises(ConfigError, match="nope"):
        build_jobs(variants, "base", ["nope"], [1], "demo", "abl", tmp_path)


def test_paired_variant_reuses_the_base_checkpoint(tmp_path):
    base_dir = tmp_path / "abl" / "base" / "seed_7"
    base_dir.mkdir(parents=True)
    (base_dir / "final_model.pt").write_bytes(b"weights of seed 7")
    runlog.write_json(base_dir / "train.json", {"prequant_bpb": 1.5})
    job = Job("lqer", 7, "demo", (), "abl", str(tmp_path), paired_with="base")
    with pytest.raises(FileNotFoundError, match="not finished training"):
        link_base_checkpoint(job, base_dir)
    runlog.mark_stage_done(base_dir, "train")
    link_base_checkpoint(job, base_dir)
    assert (job.seed_dir / "final_model.pt").read_bytes() == b"weights of seed 7"
    assert runlog.read_json(job.seed_dir / "train.json") == {"prequant_bpb": 1.5}
    assert runlog.stage_done(job.seed_dir, "train") and not runlog.stage_done(job.seed_dir, "quant")
    assert os.path.samefile(job.seed_dir / "final_model.pt", base_dir / "final_model.pt")  # a link, not a copy


def test_welch_interval_matches_hand_computation():
    # equal sizes and variances: nu = 2(n - 1) = 4 exactly; t_{0.975, 4} = 2.776445 (t table)
    variant, base = [1.0, 2.0, 3.0], [2.0, 4.0, 3.0]
    delta, low, high = welch_interval(variant, base)
    mean_v, mean_b = 2.0, 3.0
    var_v = ((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 2
    var_b = ((2 - 3) ** 2 + (4 - 3) ** 2 + 0) / 2
    half = 2.776445 * math.sqrt(var_v / 3 + var_b / 3)
    assert delta == pytest.approx(mean_v - mean_b)
    assert (low, high) == pytest.approx((-1 - half, -1 + half), abs=1e-5)


def test_paired_interval_matches_hand_computation():
    # differences 0.1, 0.3, 0.2: mean 0.2, s = 0.1, t_{0.975, 2} = 4.302653 (t table)
    delta, low, high = paired_interval([1.1, 2.3, 3.2], [1.0, 2.0, 3.0])
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert delta == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-6)
    assert paired_interval([1.0], [0.5]) == (0.5, None, None)


def _fake_seed(root, variant, seed, ttt, bytes_total, prequant=2.0):
    folder = root / variant / f"seed_{seed}"
    folder.mkdir(parents=True)
    runlog.write_json(folder / "train.json", {"prequant_bpb": prequant, "tok_per_sec_before_loop": 1000.0})
    runlog.write_json(folder / "quant.json", {"bytes_total": bytes_total})
    runlog.write_json(folder / "eval.json", {"quantized_bpb": ttt + 0.01, "sliding_bpb": ttt + 0.005, "ttt_bpb": ttt})


def test_results_table_pairs_by_seed_and_writes_files(tmp_path):
    root = tmp_path / "abl"
    for seed, ttt in ((1, 1.10), (2, 1.20), (3, 1.15)):
        _fake_seed(root, "base", seed, ttt, 1000)
    for seed, ttt in ((1, 1.09), (2, 1.19)):  # seed 3 of the variant is missing: paired over 1, 2
        _fake_seed(root, "lqer", seed, ttt, 1100)
    table = ablation_table(runlog_collect(root), "base", {"lqer": True})
    row = table["lqer"]["ttt_bpb"]
    assert row["delta"] == pytest.approx(-0.01) and row["seeds"] == [2, 2] and row["paired"]
    assert (row["low"], row["high"]) == pytest.approx((-0.01, -0.01))  # identical differences
    assert table["lqer"]["bytes_total"]["delta"] == 100 and table["lqer"]["prequant_bpb"]["delta"] == 0
    result = write_results(root, "base", {"lqer": True})
    assert runlog.read_json(root / "ablation.json")["variants"]["lqer"]["ttt_bpb"]["delta"] == pytest.approx(-0.01)
    text = (root / "ablation.md").read_text()
    assert "| lqer | yes |" in text and "+100" in text and "-0.01000" in text
    assert markdown(result["variants"], "base") == text


def runlog_collect(root):
    from parlm.ablate.results import collect

    return collect(root)


def test_gpu_slots():
    assert gpu_slots(1, 3, gpus=2) == ["0", "0", "0", "1", "1", "1"]
    assert gpu_slots(2, 1, gpus=4) == ["0,1", "2,3"]
    assert gpu_slots(1, 2, gpus=0) == [None]


@pytest.mark.slow  # a submitit worker process
def test_submitit_local_executor_runs_a_job(tmp_path):
    pytest.importorskip("submitit")
    job = Job("base", 5, "demo", (), "abl", str(tmp_path))
    runlog.mark_stage_done(job.seed_dir, "summary")  # a finished job: run_job returns at once
    results = dispatch([job], executor="submitit-local", timeout_min=2, say=lambda message: None)
    assert results == [{"variant": "base", "seed": 5, "returncode": 0, "seconds": 0.0, "skipped": True,
                        "log": str(job.run_root / "job_seed_5.log")}]


@pytest.mark.slow  # a parlm.run subprocess
def test_failed_job_is_reported_and_paired_jobs_wait_for_their_base(tmp_path):
    jobs = [Job("base", 1, "no_such_preset", (), "abl", str(tmp_path)),
            Job("lqer", 1, "no_such_preset", (), "abl", str(tmp_path), paired_with="base")]
    messages = []
    results = dispatch(jobs, executor="local", keep_going=True, gpus=0, say=messages.append)
    assert results[0]["returncode"] == 2  # parlm.run refuses the unknown preset
    assert "unknown preset" in (tmp_path / "abl" / "base" / "job_seed_1.log").read_text()
    assert results[1]["returncode"] == -1 and "not finished training" in results[1]["error"]
