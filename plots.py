"""The figures of a run and of the ablation grid, drawn with matplotlib (Agg: no display needed).

- magnitudes.png: activation RMS after each block and RMS of each block's weights against step,
  one line per block with a legend;
- curves.png: training loss (with its MSE and VB terms), learning rate, gradient norm and every
  evaluation metric against step;
- compare_magnitudes: the magnitude panels of several runs side by side on shared y-axes;
- compare_samples: sample grids of several runs side by side, one row per class;
- plot_sweep: experiments/sweep.py's metric against the EMA width, a line per guidance setting;
- plot_seed_curves, plot_lr_sweep: experiments/study.py's metric against step (mean and seed range
  per arm) and final metric against learning rate (diverged runs marked).

Records are the rows of a run's metrics.jsonl (read_metrics).
"""
import contextlib
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402

MAGNITUDES = (("act_rms", "activation RMS after the block"), ("weight_rms", "RMS of the block's weights"))


def read_metrics(path):
    """The records of a metrics.jsonl (a list of dicts) in step order (an evaluation made on resume for
    an earlier step comes after later records in the file), without a line torn by a kill; [] if the
    file does not exist."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return sorted(records, key=lambda r: r["step"])


def _save(fig, path):
    """Write the PNG (atomically: a reader never sees half a file) and release the figure from
    pyplot; the figure is returned for inspection."""
    tmp = f"{path}.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return fig


def _finish(fig, ax, xlabel, ylabel, path, legend_size="small"):
    """Axis labels, a light grid and the legend, then _save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return _save(fig, path)


def _block_lines(ax, records, key, legend=True):
    """One line per block of records[i][key] against records[i]["step"], dark blue (first block)
    to yellow (last)."""
    steps = [r["step"] for r in records]
    series = np.array([r[key] for r in records])  # (records, blocks)
    colors = plt.cm.viridis(np.linspace(0, 0.9, series.shape[1]))
    for b in range(series.shape[1]):
        ax.plot(steps, series[:, b], color=colors[b], marker="." if len(steps) < 30 else None,
                label=f"block {b}")
    flat_at_least(ax, series, 0.02)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="small", ncol=2 if series.shape[1] > 8 else 1)


def flat_at_least(ax, values, share):
    """Give the y axis a span of at least `share` of the values' magnitude, without an offset, so that
    rounding noise on a constant (weights held at RMS 1 by forced normalisation) plots as a flat line
    instead of filling an axis labelled `1e-8+9.999e-1`."""
    lo, hi = float(np.min(values)), float(np.max(values))
    least = share * max(abs(lo), abs(hi))
    if hi - lo < least:
        ax.set_ylim((lo + hi) / 2 - least, (lo + hi) / 2 + least)
    ax.ticklabel_format(axis="y", useOffset=False)


def plot_magnitudes(records, path, title=None):
    """records: [{"step", "act_rms": [per block], "weight_rms": [per block]}] -> a two-panel PNG."""
    records = [r for r in records if "act_rms" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, (key, label) in zip(axes, MAGNITUDES):
        _block_lines(ax, records, key)
        ax.set_ylabel(label)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_curves(records, path, title=None):
    """Loss (and its MSE and VB terms), learning rate, gradient norm and each evaluation metric
    (records' "eval": {name: value}) against step: one panel each, two columns."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    names = sorted({k for r in evals for k in r["eval"]})
    panels = 3 + len(names)
    rows = (panels + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.2 * rows), constrained_layout=True, squeeze=False)
    axes = axes.ravel()
    steps = [r["step"] for r in train]
    ax = axes[0]
    for key, style in (("loss", "-"), ("mse", "--"), ("vb", ":")):
        ax.plot(steps, [r[key] for r in train], style, label=key)
    ax.set_yscale("log")
    ax.set_ylabel("training loss (log scale)")
    ax.legend(fontsize="small")
    for ax, key, label in ((axes[1], "lr", "learning rate"), (axes[2], "grad_norm", "gradient norm")):
        ax.plot(steps, [r[key] for r in train])
        ax.set_ylabel(label)
    for ax, name in zip(axes[3:], names):
        points = [(r["step"], r["eval"][name]) for r in evals if name in r["eval"]]
        ax.plot(*zip(*points), marker="o")
        samples, network = (next((r[k] for r in reversed(evals) if r.get(k)), None)
                            for k in ("samples", "feature_network"))
        ax.set_ylabel(name)
        ax.set_title(", ".join(s for s in (samples and f"{samples} samples", network) if s), fontsize="small")
    for ax in axes[:panels]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def compare_magnitudes(runs, path):
    """runs: [(title, records)]: one column per run, a row per magnitude, y-axes shared along a row
    so the runs read on the same scale."""
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 7), sharey="row", squeeze=False,
                             constrained_layout=True)
    for j, (title, records) in enumerate(runs):
        records = [r for r in records if "act_rms" in r]
        for i, (key, label) in enumerate(MAGNITUDES):
            _block_lines(axes[i, j], records, key, legend=j == len(runs) - 1)
            if j == 0:
                axes[i, j].set_ylabel(label)
        axes[0, j].set_title(title, fontsize="medium")
    return _save(fig, path)


def compare_samples(blocks, titles, class_names, path, subtitle):
    """blocks: per run, a list of uint8 (n, H, W, 3) arrays, one per class (rows, left to right
    runs), shown as one image per run with the class names on the left."""
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 0.6 * len(class_names) + 1.2),
                             squeeze=False, constrained_layout=True)
    for ax, rows, title in zip(axes[0], blocks, titles):
        columns = max(len(r) for r in rows)
        h, w, c = rows[0].shape[1:]
        grid = np.full((len(rows), h, columns, w, c), 255, np.uint8)
        for k, row in enumerate(rows):
            grid[k, :, : len(row)] = row.transpose(1, 0, 2, 3)
        ax.imshow(grid.reshape(len(rows) * h, columns * w, c), interpolation="nearest")
        ax.set_yticks(np.arange(len(rows)) * h + (h - 1) / 2, class_names)
        ax.set_xticks([])
        ax.set_title(title, fontsize="medium")
    fig.suptitle(subtitle, fontsize="medium")
    return _save(fig, path)


def plot_sweep(sigma_rels, lines, best, ylabel, path):
    """The metric against the EMA width sigma_rel. lines: [(label, values, interval index, scale
    index)], the line style per interval (solid, dashed, ...) and the colour per guidance scale;
    best: (sigma_rel, value, label), drawn as a star."""
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label, values, interval, scale in lines:
        ax.plot(sigma_rels, values, ("-", "--", ":", "-.")[interval % 4], marker="o", color=f"C{scale}", label=label)
    ax.plot([best[0]], [best[1]], "k*", markersize=14, label=f"best: {best[2]}")
    return _finish(fig, ax, "EMA width sigma_rel", ylabel, path, legend_size=7)


def plot_seed_curves(lines, floor, ylabel, path):
    """lines: [(label, steps, values (seeds, steps))]: the mean over seeds as a line, the seed range
    as a band, log y; floor: a dashed line (the metric of real images)."""
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for label, steps, values in lines:
        line, = ax.plot(steps, values.mean(0), marker=".", label=label)
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.axhline(floor, color="gray", linestyle="--", label="real images (floor)")
    ax.set_yscale("log")
    return _finish(fig, ax, "step", ylabel, path)


def plot_lr_sweep(lines, ylabel, path):
    """lines: [(label, [(lr, final metric)], [lrs that diverged])]: log-log, diverged runs as x at the top."""
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    finals = [v for _, points, _ in lines for _, v in points]
    top = max(finals) * 1.5 if finals else 1.0
    for label, points, diverged in lines:
        line, = ax.plot(*zip(*sorted(points)), marker="o", label=label) if points else ax.plot([], [], label=label)
        if diverged:
            ax.plot(diverged, [top] * len(diverged), "x", color=line.get_color(), markersize=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, "peak learning rate", ylabel, path)
