"""The quantization and evaluation figures of one seed: what each draws, checked against values
worked out here by hand from small fixtures, readable scales (the cap bar of a demo-sized and of a
contest-sized artifact, whole-number chunk ticks) and a unit on every axis label."""
from __future__ import annotations

import numpy as np
import pytest

from parlm.eval import plots as eval_plots
from parlm.quant import plots as quant_plots

UNIT_WORDS = ("bits/byte", "fraction", "count", "bytes", "seconds", "tokens", "index")


def cap_record(bytes_model: int, bytes_code: int, cap: int = 16_000_000) -> dict:
    total = bytes_model + bytes_code
    return {"bytes_model": bytes_model, "bytes_code": bytes_code, "bytes_total": total, "cap": cap,
            "fits_cap": total <= cap, "overshoot": max(0, total - cap)}


def chunks():
    # Four chunks of 100 tokens; TTT saves 0.01 bits/byte on the later ones.
    return [{"chunk": k, "end": 100 * (k + 1), "bytes": 300, "bpb": 2.0 - 0.01 * (k > 0),
             "sliding_bpb": 2.0, "diagnostic_bpb_after_update": 1.98} for k in range(4)]


def assert_units(figure):
    for ax in figure.axes:
        for label in (ax.get_xlabel(), ax.get_ylabel()):
            if label:  # categorical axes (stage names) carry no label
                assert any(word in label for word in UNIT_WORDS), label
        assert ax.get_xlabel() or ax.get_ylabel(), ax.get_title()  # the value axis is labelled


@pytest.mark.parametrize("bytes_model, bytes_code", [(160_819, 49_288), (15_952_101, 31_718),
                                                     (15_952_101, 10_500)])
def test_cap_bars_are_readable_for_demo_and_contest_sizes(bytes_model, bytes_code):
    quant = cap_record(bytes_model, bytes_code)
    figure = quant_plots.plot_cap(quant)
    (ax,) = figure.axes
    figure.canvas.draw()
    axes_width = ax.get_window_extent().width
    bars = ax.patches
    # model row, code row, and bytes_total as model + code stacked.
    assert [(bar.get_x() + bar.get_width()) for bar in bars] == pytest.approx(
        [bytes_model, bytes_code, bytes_model, bytes_model + bytes_code])
    # Every row is a visible bar (on a linear 0-16 MB axis the demo's would be ~1% wide).
    for row_end in (bytes_model, bytes_code, bytes_model + bytes_code):
        left = ax.transData.transform((ax.get_xlim()[0], 0))[0]
        right = ax.transData.transform((row_end, 0))[0]
        assert right - left > 0.1 * axes_width
    assert ax.get_xscale() == "log"
    (cap_line,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert cap_line.get_xdata()[0] == 16_000_000
    assert any("16,000,000" in text.get_text() for text in ax.texts)  # the line is labelled
    labels = [tick.get_text() for tick in ax.get_yticklabels()]
    total = bytes_model + bytes_code
    assert f"{bytes_model:,} bytes" in labels[0] and f"{bytes_code:,} bytes" in labels[1]
    assert f"{total:,} bytes ({100 * total / 16e6:.2f}% of cap)" in labels[2]
    assert ax.get_title() == f"Fits the 16 MB cap: {16_000_000 - total:,} bytes to spare"
    assert "bytes" in ax.get_xlabel()


def test_cap_over_the_limit_says_by_how_much():
    figure = quant_plots.plot_cap(cap_record(16_902_101, 31_718))
    assert figure.axes[0].get_title() == "OVER the 16 MB cap by 933,819 bytes"  # 16,933,819 - 16,000,000


def test_byte_size_decimal_units():
    assert quant_plots.byte_size(16_000_000) == "16 MB"
    assert quant_plots.byte_size(49_288) == "49.3 kB"
    assert quant_plots.byte_size(10_000) == "10 kB"
    assert quant_plots.byte_size(512) == "512 B"


def test_quant_bpb_bars_and_unit():
    figure = quant_plots.plot_bpb(2.6670, 2.6681)
    (ax,) = figure.axes
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([2.6670, 2.6681])
    assert "bits/byte" in ax.get_ylabel()
    assert ax.get_title() == "Quantization cost: +0.0011 bits/byte"


def test_chunk_axis_has_whole_number_ticks():
    figure = eval_plots.plot_chunk_bpb(chunks())
    (ax,) = figure.axes
    figure.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert ticks == [0, 1, 2, 3]
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    np.testing.assert_allclose(lines["TTT, scored before update (the score)"], [2.0, 1.99, 1.99, 1.99])
    assert_units(figure)


def test_every_quant_and_eval_axis_has_a_unit():
    quant = cap_record(160_819, 49_288) | {
        "per_tensor": {"tok_emb.weight": {"method": "gptq (int8)", "rel_error": 0.06, "rel_hessian_error": 0.01},
                       "blocks.0.attn_scale": {"method": "passthrough (float16)", "rel_error": 2e-4}},
        "stream_bytes": {"embedding": 100_000, "passthrough": 60_819, "other": 0}}
    evaluation = {"quantized_bpb": 2.668, "sliding_bpb": 2.667, "ttt_bpb": 2.66, "quantized_seconds": 0.6,
                  "sliding_seconds": 0.8, "ttt_seconds": 6.2, "compile_seconds_by_stage": {}}
    for figure in (quant_plots.plot_tensor_errors(quant), quant_plots.plot_size_breakdown(quant),
                   quant_plots.plot_cap(quant), quant_plots.plot_bpb(2.667, 2.668),
                   eval_plots.plot_stage_bpb(evaluation, {"prequant_bpb": 2.667}),
                   eval_plots.plot_stage_times(evaluation), eval_plots.plot_cumulative_gain(chunks())):
        assert_units(figure)
