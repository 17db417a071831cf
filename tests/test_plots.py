"""plots.py: the matplotlib figures draw the records they are given, with legends and shared axes."""
import numpy as np
from PIL import Image

import plots


def magnitude_records(scale=1.0, blocks=3):
    return [dict(step=s, act_rms=[scale * (1 + s / 100 + b) for b in range(blocks)],
                 weight_rms=[scale * (2 - s / 1000) for _ in range(blocks)]) for s in (100, 200, 300)]


def lines_of(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_magnitudes_png_has_a_line_and_legend_entry_per_block(tmp_path):
    records = magnitude_records()
    fig = plots.plot_magnitudes(records + [dict(step=300, loss=0.1)], tmp_path / "m.png")  # other records ignored
    assert Image.open(tmp_path / "m.png").size[0] > 500
    for ax, key in zip(fig.axes, ("act_rms", "weight_rms")):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["block 0", "block 1", "block 2"]
        for b in range(3):
            assert lines_of(ax)[f"block {b}"] == ([100, 200, 300], [r[key][b] for r in records])
        assert ax.get_xlabel() == "step" and ax.get_ylabel() and len(ax.get_yticks()) > 1


def test_curves_png_plots_loss_lr_grad_norm_and_each_eval_metric(tmp_path):
    train = [dict(step=s, loss=1 / s, mse=0.5 / s, vb=0.5 / s, lr=0.01 * s, grad_norm=2.0 + s) for s in (1, 2, 3, 4)]
    evals = [dict(step=2, eval={"FD-x": 9.0}, samples=16, feature_network="net"), dict(step=4, eval={"FD-x": 5.0})]
    fig = plots.plot_curves(train + evals, tmp_path / "c.png")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in visible] == ["training loss (log scale)", "learning rate", "gradient norm", "FD-x"]
    assert lines_of(visible[0])["loss"] == ([1, 2, 3, 4], [1, 1 / 2, 1 / 3, 1 / 4])
    assert list(visible[1].get_lines()[0].get_ydata()) == [0.01, 0.02, 0.03, 0.04]
    assert list(visible[2].get_lines()[0].get_ydata()) == [3.0, 4.0, 5.0, 6.0]
    assert [list(d) for d in visible[3].get_lines()[0].get_data()] == [[2, 4], [9.0, 5.0]]
    assert "16 samples" in visible[3].get_title() and "net" in visible[3].get_title()


def test_compared_runs_share_the_y_axis_of_each_row(tmp_path):
    small, large = magnitude_records(1.0), magnitude_records(10.0)
    fig = plots.compare_magnitudes([("a", small), ("b", large)], tmp_path / "cmp.png")
    axes = np.array(fig.axes).reshape(2, 2)
    for row, key in enumerate(("act_rms", "weight_rms")):
        low, high = axes[row, 0].get_ylim()
        assert axes[row, 1].get_ylim() == (low, high)
        values = [v for r in small + large for v in r[key]]
        assert low <= min(values) and high >= max(values)  # the left panel's scale holds the right's data
    assert [axes[0, j].get_title() for j in range(2)] == ["a", "b"]


def test_compared_samples_show_each_runs_images(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [[rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (3, 2)] for _ in range(2)]
    fig = plots.compare_samples(blocks, ["a", "b"], ["cat", "dog"], tmp_path / "s.png", "same noise")
    for ax, rows in zip(fig.axes, blocks):
        shown = ax.get_images()[0].get_array()
        assert shown.shape == (8, 12, 3)
        np.testing.assert_array_equal(shown[:4, :4], rows[0][0])
        np.testing.assert_array_equal(shown[4:, 4:8], rows[1][1])
        assert (np.asarray(shown[4:, 8:]) == 255).all()  # the missing third "dog" is left white
        assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog"]


def test_a_constant_magnitude_plots_flat_without_an_offset_axis(tmp_path):
    """Forced normalisation holds weights at RMS 0.9999 give or take 1e-8: the axis spans at least 2% of
    the value, so the noise is a flat line, and its labels are plain numbers (no '1e-8+9.999e-1')."""
    records = [dict(step=s, act_rms=[1.0 + s / 100], weight_rms=[0.9999 + 1e-8 * (s % 3)]) for s in (100, 200, 300)]
    fig = plots.plot_magnitudes(records, tmp_path / "m.png")
    weights = fig.axes[1]
    lo, hi = weights.get_ylim()
    assert hi - lo >= 0.02 * 0.9999 and lo < 0.9999 < hi
    fig.canvas.draw()
    assert weights.yaxis.get_major_formatter().get_offset() == ""
    assert fig.axes[0].get_ylim()[1] - fig.axes[0].get_ylim()[0] < 3  # a varying panel keeps its own scale
