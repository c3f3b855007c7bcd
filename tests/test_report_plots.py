"""The report's and the PPM stage's figures: what each panel draws, checked against values
computed here by hand from the fixture (never by the plotting code), and units on every axis."""
from __future__ import annotations

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
