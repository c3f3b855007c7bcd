"""The report's and the PPM stage's figures: what each panel draws, checked against values
computed here by hand from the fixture (never by the plotting code), and units on every axis."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from parlm.ppm import plots as ppm_plots
from parlm.report import plots


def summaries():
    # Seed 42: pre-quant 2.000, quantized 2.003 (tax +0.003), sliding 2.001, TTT 1.998.
    # Seed 314: 2.100, 2.102 (+0.002), 2.101, 2.099: a 0.1 gap between seeds.
    return [
        {"seed": 42, "prequant_bpb": 2.000, "quantized_bpb": 2.003, "sliding_bpb": 2.001,
         "ttt_bpb": 1.998, "nn_only_bpb": 2.0, "ppm_only_bpb": 2.4, "mix_bpb_legacy": 1.9,
         "gate_skip": 0.25},
        {"seed": 314, "prequant_bpb": 2.100, "quantized_bpb": 2.102, "sliding_bpb": 2.101,
         "ttt_bpb": 2.099, "nn_only_bpb": 2.1, "ppm_only_bpb": 2.5, "mix_bpb_legacy": 2.0,
         "gate_skip": 0.125},
    ]


def assert_labelled(figure: Figure, unit_words=("bits/byte", "%", "fraction", "count", "step")):
    assert isinstance(figure, Figure)
    for ax in figure.axes:
        assert ax.get_ylabel(), ax.get_title()
        assert any(word in ax.get_ylabel() for word in unit_words), ax.get_ylabel()


def test_stage_deltas_are_per_seed_changes_from_prequant():
    figure = plots.bpb_by_stage(summaries())
    assert_labelled(figure)
    delta_ax, bpb_ax = figure.axes
    lines = {line.get_label(): line.get_ydata() for line in delta_ax.get_lines()
             if line.get_label().startswith("seed")}
    np.testing.assert_allclose(lines["seed 42"], [0.003, 0.001, -0.002], atol=1e-12)
    np.testing.assert_allclose(lines["seed 314"], [0.002, 0.001, -0.001], atol=1e-12)
    heights = [patch.get_height() for patch in delta_ax.patches]
    np.testing.assert_allclose(heights, [0.0025, 0.001, -0.0015], atol=1e-12)  # means
    # The stage changes set the left panel's scale, not the 0.1 gap between the seeds.
    low, high = delta_ax.get_ylim()
    assert high - low < 0.02
    notes = [text.get_text() for text in delta_ax.texts]
    assert "mean +0.00250\nstep +0.00250" in notes and "mean -0.00150\nstep -0.00250" in notes
    absolute = {line.get_label(): line.get_ydata() for line in bpb_ax.get_lines()}
    np.testing.assert_allclose(absolute["seed 314"], [2.100, 2.102, 2.101, 2.099])
    assert "bits/byte" in bpb_ax.get_ylabel()
    # One legend for both panels, outside them: it covers neither the notes nor a seed's line.
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["seed 42", "seed 314"]
    figure.canvas.draw()
    for ax in figure.axes:
        assert not legend.get_window_extent().overlaps(ax.get_window_extent())


def test_gate_summary_in_percent_with_the_legend_clear_of_the_bars():
    figure = plots.gate_summary(summaries())
    assert_labelled(figure)
    bpb_ax, gate_ax = figure.axes
    assert "%" in gate_ax.get_ylabel()
    assert [patch.get_height() for patch in gate_ax.patches] == [25.0, 12.5]
    legend = bpb_ax.get_legend()
    figure.canvas.draw()
    legend_box = legend.get_window_extent()
    for patch in bpb_ax.patches:
        assert not legend_box.overlaps(patch.get_window_extent())


def write_run(folder, live, ema, decay=0.97):
    """A seed folder with the metrics the training curves read: live validations at
    `live` [(step, bpb)], the EMA score `ema` (step, bpb) and a config with `decay`."""
    from parlm.config import Config

    folder.mkdir(parents=True)
    rows = [{"stage": "train", "step": step, "train_loss": 5.0 - step / 100, "lr_scale": 1.0}
            for step in (1, 10, 20)]
    rows += [{"stage": "val", "step": step, "val_bpb": bpb} for step, bpb in live]
    rows.append({"stage": "prequant", "step": ema[0], "val_bpb": ema[1]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    Config.from_preset("demo").replace(ema_decay=decay).save(folder / "config.yaml")
    return folder


def test_training_curves_put_the_ema_gap_in_the_legend(tmp_path):
    # Two seeds stopping at the same step: gaps 2.67 - 2.46 = +0.21 and 2.64 - 2.42 = +0.22.
    folders = [write_run(tmp_path / "seed_42", [(0, 3.7), (20, 2.46)], (20, 2.67)),
               write_run(tmp_path / "seed_314", [(0, 3.7), (20, 2.42)], (20, 2.64))]
    figure = plots.training_curves(folders)
    assert_labelled(figure, unit_words=("nats/token", "bits/byte"))
    loss_ax, val_ax = figure.axes
    entries = [text.get_text() for text in val_ax.get_legend().get_texts()]
    assert "seed 42 EMA (pre-quant): +0.210 vs live" in entries
    assert "seed 314 EMA (pre-quant): +0.220 vs live" in entries
    assert not val_ax.texts  # no notes beside the stars, where the seeds' would overlap
    assert "0.97" in figure.get_supxlabel() and "~33 steps" in figure.get_supxlabel()


def test_ema_caption_names_the_decay_and_its_window():
    text = plots.ema_caption([0.97])
    assert "0.97" in text and "~33 steps" in text and "lags" in text
    assert "1/(1-d)" in plots.ema_caption([])


def synthetic_traces():
    """Six bytes: NN log-probs (nats), PPM log-probs and the choice a 0.277-nat gate makes."""
    nn = np.log(np.array([0.9, 0.8, 0.5, 0.25, 0.1, 0.05]))
    ppm = np.log(np.array([0.5, 0.5, 0.9, 0.125, 0.5, 0.25]))
    choice = np.array([2, 2, 0, 1, 0, 1], dtype=np.int8)  # p > e^-0.277 = 0.758 -> skip
    lam = np.where(choice == 2, 1.0, np.where(choice == 0, 0.05, 0.9))
    mix = np.log(lam * np.exp(nn) + (1 - lam) * np.exp(ppm))
    return {"trace_nn_logp": nn, "trace_ppm_logp": ppm, "trace_mix_logp": mix,
            "trace_lambda_choice": choice, "trace_lambda": lam,
            "trace_byte_index": np.arange(6, dtype=np.int32), "trace_stride": np.array(1)}


def test_gate_decision_draws_the_threshold_in_bits_and_the_choice_shares():
    traces = synthetic_traces()
    figure = ppm_plots.gate_decision_by_confidence(traces, 0.277)
    assert_labelled(figure)
    share_ax, count_ax = figure.axes
    threshold = [line.get_xdata()[0] for line in share_ax.get_lines()]
    assert threshold == [pytest.approx(0.277 / math.log(2))]  # 0.3996 bits
    assert any("0.40 bits" in text.get_text() for text in share_ax.texts)
    assert "bits" in share_ax.get_xaxis().get_label().get_text() or "bits" in count_ax.get_xlabel()
    # Every bin below the threshold holds only skips (red), none above it.
    width = 0.277 / math.log(2) / 5
    skip_bars = [p for p in share_ax.patches if p.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=0.01)]
    for patch in skip_bars:
        if patch.get_height() > 0:
            assert patch.get_x() + width <= 0.277 / math.log(2) + 1e-9
    # The bottom panel's bars add up to 100% of the traced bytes.
    assert sum(p.get_height() for p in count_ax.patches) == pytest.approx(100.0)


def test_gate_bpb_contribution_adds_up_to_the_stream_bpb():
    traces = synthetic_traces()
    figure = ppm_plots.gate_bpb_contribution(traces)
    assert_labelled(figure)
    share_ax, own_ax = figure.axes
    bits = {key: -traces[key] / math.log(2) for key in ("trace_nn_logp", "trace_ppm_logp", "trace_mix_logp")}
    choice = traces["trace_lambda_choice"]
    heights = [p.get_height() for p in share_ax.patches]  # series-major: NN, PPM, mix x (skip, hi, lo)
    expected = [bits[key][choice == c].sum() / 6 for key in bits for c in (2, 1, 0)]
    np.testing.assert_allclose(heights, expected, rtol=1e-12)
    # Skipped bytes: the mix is the NN (lambda = 1).
    assert heights[6] == pytest.approx(heights[0])
    nn_total = -traces["trace_nn_logp"].sum() / math.log(2) / 6
    assert sum(heights[:3]) == pytest.approx(nn_total)
    own = [p.get_height() for p in own_ax.patches]
    assert own[1] == pytest.approx(bits["trace_nn_logp"][choice == 1].mean())


def test_mixture_weight_along_the_stream_is_the_windowed_lambda():
    traces = synthetic_traces()
    figure = ppm_plots.lambda_along_stream(traces, window=2)
    assert_labelled(figure)
    weight_ax, share_ax = figure.axes
    (weight,) = [line for line in weight_ax.get_lines() if line.get_label().startswith("_")][:1]
    lam = traces["trace_lambda"]
    # window = max(1, min(2, 6 // 10 or 1)) = 1 traced byte: the line is lambda itself.
    np.testing.assert_allclose(weight.get_ydata(), lam)
    assert "%" in share_ax.get_ylabel()
    # The bottom panel: the small shares on their own scale (choices 0 and 2 of the fixture),
    # with each share of the whole stream in the legend (2 of 6 bytes each: 33.33%).
    shares = {line.get_label(): line.get_ydata() for line in share_ax.get_lines()}
    assert set(shares) == {"ungated: λ = 0.05 (trust PPM): 33.33% of the stream",
                           "gated: skip, λ = 1 (NN alone): 33.33% of the stream"}
    np.testing.assert_allclose(shares["gated: skip, λ = 1 (NN alone): 33.33% of the stream"],
                               [100, 100, 0, 0, 0, 0])
    assert any("the rest (33.3% of the stream): ungated: λ = 0.9" in text.get_text()
               for text in share_ax.texts)


def test_choice_labels_carry_the_traced_lambda_values():
    traces = synthetic_traces()
    assert ppm_plots.choice_labels(traces) == ("ungated: λ = 0.05 (trust PPM)",
                                               "ungated: λ = 0.9 (trust NN)",
                                               "gated: skip, λ = 1 (NN alone)")
    only_skips = dict(traces, trace_lambda_choice=np.full(6, 2, dtype=np.int8))
    assert ppm_plots.choice_labels(only_skips)[0] == ppm_plots.CHOICE_LABELS[0]  # no value seen


def test_gate_skip_rates_are_percent_of_each_position():
    stats = np.zeros((32, 3), dtype=np.int64)
    stats[0] = (6, 2, 2)  # 10 bytes at position 0, 2 skipped: 20%
    stats[3] = (1, 2, 1)  # 4 bytes at position 3, 1 skipped: 25%
    traces = {"position_stats": stats, "token_stats": np.zeros((4, 3), dtype=np.int64),
              "token_frequency": np.zeros(4, dtype=np.int64)}
    figure = ppm_plots.gate_skip_by_position_and_frequency(traces)
    assert_labelled(figure)
    left = figure.axes[0]
    assert [patch.get_height() for patch in left.patches] == [pytest.approx(20), pytest.approx(25)]
    figure.canvas.draw()
    top = left.get_window_extent().y1
    assert all(text.get_window_extent().y1 <= top for text in left.texts)  # counts not clipped
