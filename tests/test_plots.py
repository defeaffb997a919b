import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from supsup_lite.notebook.plots import legend_outside, plot_interval  # noqa: E402


def test_plot_interval_draws_the_asymmetric_bars_of_the_interval():
    fig, ax = plt.subplots()
    plot_interval(ax, [1, 2], [90.0, 80.0], [89.0, 75.0], [90.5, 81.0], label="GG")
    bars = ax.containers[0].lines[2][0].get_segments()  # one vertical segment per point
    assert np.allclose([seg[:, 1] for seg in bars], [[89.0, 90.5], [75.0, 81.0]])
    with pytest.raises(ValueError, match="every interval must contain its value"):
        plot_interval(ax, [1], [0.9], [89.0], [91.0])  # value a fraction, interval in %
    plt.close(fig)


def test_legend_outside_puts_the_legend_right_of_or_below_the_axes():
    fig, (left, right) = plt.subplots(1, 2)
    for ax in (left, right):
        ax.plot([0, 1], [0, 1], label="line")
        ax.set_xlabel("x")
    legend_outside(left)
    legend_outside(right, where="below", ncol=2)
    fig.canvas.draw()
    assert left.get_legend().get_window_extent().x0 > left.get_window_extent().x1
    assert right.get_legend().get_window_extent().y1 < right.xaxis.label.get_window_extent().y0
    with pytest.raises(ValueError, match="where='above' must be 'right' or 'below'"):
        legend_outside(left, where="above")
    plt.close(fig)
