"""The grid's table and figures for experiments/ablate.py: the runs' results aggregated over
seeds (RESULTS/results.json), the markdown table (RESULTS/table.md), and the two comparison
figures (ablation_samples.png, ablation_magnitudes.png).
"""
import os
import shutil

import numpy as np

import plots
from experiments import metrics
from experiments.evaluate import say

FIGURE_COLUMNS = 8


#################################################################################
#                             Table and figures                                 #
#################################################################################

def summarise(values):
    """dict(mean, std, n, values) of the values that are not None (None if none is): std is the sample
    standard deviation (ddof 1), None for a single value, whose spread one value cannot tell."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
                n=len(values), values=values)


def aggregate(opts, data, ctx, configs, collected, skipped):
    """The grid's summary: a row per configuration of opts.configs (configs: name -> (label,
    flags); collected: name -> its runs' results, one per seed; skipped: name -> why)."""
    head = f"{opts.cfg_scales[0]:g}"
    rows = []
    for cfg in opts.configs:
        row = dict(config=cfg, label=configs[cfg][0], flags=configs[cfg][1])
        if cfg in skipped:
            rows.append(dict(row, status="skipped", reason=skipped[cfg]))
            continue
        runs = collected[cfg]
        ok = [r for r in runs if r["status"] == "ok"]
        row.update(status="ok" if ok else "no finished run", runs=runs,
                   seeds_ok=[r["seed"] for r in ok], diverged=[r["seed"] for r in runs if r["status"] == "diverged"])
        if ok:
            row.update(parameters=ok[0]["parameters"], optimizer=ok[0]["optimizer"], weights=ok[0]["weights"])
            row["summary"] = dict(
                step_time_s=summarise([r["step_time_s"] for r in ok]),
                final_train_loss=summarise([r["final_train_loss"] for r in ok]),
                ema_heldout_loss=summarise([r["heldout_loss"]["ema"]["loss"] for r in ok]),
                raw_heldout_loss=summarise([r["heldout_loss"]["raw"]["loss"] for r in ok]),
                **{f"cfg{s}": dict(fd=summarise([r["samples"][s]["fd"] for r in ok if s in r["samples"]]),
                                   class_consistency=summarise([r["samples"][s]["class_consistency"]
                                                                for r in ok if s in r["samples"]]),
                                   fid=summarise([r["samples"][s]["fid"] for r in ok if s in r["samples"]]))
                   for s in (f"{c:g}" for c in opts.cfg_scales)})
        rows.append(row)
    real = dict(items=ctx.n_base, fd=ctx.real_fd, class_consistency=ctx.accuracy,
                fid=(ctx.inception or {}).get("real_fid") if ctx.inception_fn else None)
    return dict(
        grid=opts.grid, headline_cfg=head, fd_network=ctx.fd_name, fid_network="FID-Inception",
        fid_note=ctx.fid_note, spread="mean ± sample standard deviation over seeds (ddof 1)",
        settings=dict(data=data.path, demo=data.demo, heldout=ctx.held_desc, model=opts.model, depth=opts.depth,
                      hidden_size=opts.hidden_size, num_heads=opts.num_heads, num_steps=opts.num_steps,
                      global_batch_size=opts.global_batch_size, seeds=opts.seeds, lr=opts.lr,
                      train_args=opts.train_args, sampler=f"DDIM-{opts.sample_steps}", cfg_scales=opts.cfg_scales,
                      samples_per_class=opts.samples_per_class, sample_seed=opts.sample_seed,
                      loss_batch=len(ctx.loss_x), device=str(ctx.device)),
        classifier=dict(accuracy=ctx.accuracy, train_items=ctx.n_train, heldout_items=ctx.n_held,
                        reference_items=ctx.n_held - ctx.n_base, features=metrics.FEATURE_DIM, cache=ctx.cache_path),
        real_data=real, rows=rows)


def _cell(stat, spec, scale=1.0):
    if stat is None:
        return "n/a"
    mean = format(stat["mean"] * scale, spec)
    return mean if stat["n"] == 1 else f"{mean} ± {format(stat['std'] * scale, spec)}"


def _optimizer(opt):
    text = f"{opt['name']} {opt['lr']:g}"
    if opt["warmup_steps"] or opt["decay_steps"]:
        text += f", warm-up {opt['warmup_steps']}, decay {opt['decay_steps']}"
    return text


def render_table(summary):
    s, head = summary["settings"], summary["headline_cfg"]
    fd, fid_col = summary["fd_network"], summary["fid_network"]
    lr_source = "--lr" if s["lr"] is not None else "train.py default"
    lines = [f"# Ablation grid `{summary['grid']}`", "",
             f"{s['model']} (depth {s['depth']}, width {s['hidden_size']}, {s['num_heads']} heads), "
             f"{s['num_steps']} steps at batch {s['global_batch_size']}, seeds {s['seeds']}; "
             f"samples: {s['sampler']}, cfg {head}, {s['samples_per_class']} per class from the widest power EMA. "
             f"Cells: {summary['spread']}; ↓ lower is better, ↑ higher.", "",
             f"| configuration | train.py flags | optimiser (lr) [{lr_source}] "
             f"| parameters | s/step | final train loss | EMA held-out loss ↓ | {fd} ↓ | class consistency % ↑ "
             f"| {fid_col} ↓ | seeds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in summary["rows"]:
        flags = f"`{' '.join(row['flags'])}`" if row["flags"] else "(none)"
        if "summary" not in row:
            why = row.get("reason") or (f"diverged (seeds {row['diverged']})" if row.get("diverged") else row["status"])
            lines.append(f"| {row['config']} | {flags} | {why} |" + " |" * 8)
            continue
        m, h = row["summary"], row["summary"][f"cfg{head}"]
        seeds = f"{len(row['seeds_ok'])}" + (f" (diverged: {row['diverged']})" if row["diverged"] else "")
        lines.append(f"| {row['config']} | {flags} | {_optimizer(row['optimizer'])} | {row['parameters']:,} "
                     f"| {_cell(m['step_time_s'], '.3g')} | {_cell(m['final_train_loss'], '.4f')} "
                     f"| {_cell(m['ema_heldout_loss'], '.4f')} | {_cell(h['fd'], '.3g')} "
                     f"| {_cell(h['class_consistency'], '.1f', 100)} | {_cell(h['fid'], '.3g')} | {seeds} |")
    real = summary["real_data"]
    real_fid = "n/a" if real["fid"] is None else format(real["fid"], ".3g")
    lines.append(f"| real data (held-out, {real['items']} images) | | | | | | | {real['fd']:.3g} "
                 f"| {100 * real['class_consistency']:.1f} | {real_fid} | |")
    for scale in summary["settings"]["cfg_scales"][1:]:
        key = f"cfg{scale:g}"
        lines += ["", f"With classifier-free guidance, cfg {scale:g} (all channels):", "",
                  f"| configuration | {fd} ↓ | class consistency % ↑ | {fid_col} ↓ |", "|---|---:|---:|---:|"]
        for row in summary["rows"]:
            if "summary" in row:
                h = row["summary"][key]
                lines.append(f"| {row['config']} | {_cell(h['fd'], '.3g')} "
                             f"| {_cell(h['class_consistency'], '.1f', 100)} | {_cell(h['fid'], '.3g')} |")
    c = summary["classifier"]
    weights = next((r["weights"] for r in summary["rows"] if "weights" in r), "ema")
    lines += ["", "Columns:", "",
              "- **optimiser (lr)**: train.py's defaults per configuration unless `--lr` was given: AdamW 1e-4 "
              "constant (DiT) without weight normalisation, Adam 1e-2 with linear warm-up and EDM2's "
              "lr / sqrt(max(step / decay, 1)) with it. The MP configurations differ in recipe, not only in layers.",
              "- **parameters**: all parameters of the model, the fixed position embedding included.",
              "- **s/step**: median over training log windows of batch / images per second (metrics.jsonl), "
              f"on {s['device']}; runs trained with `--parallel` share the device and read slower.",
              "- **final train loss**: the last logged training loss (mean over the last log window; MSE + VB).",
              f"- **EMA held-out loss**: the loss of the sampled weights ({weights}) on {s['loss_batch']} held-out "
              "images with timesteps spread evenly over [0, 1000) and fixed noise, the same for every run.",
              f"- **{fd}**: Frechet distance between the {c['features']}-d penultimate features of a small conv "
              f"classifier trained on the data ({c['train_items']} images, held-out accuracy "
              f"{100 * c['accuracy']:.1f}%) for the samples and for {c['reference_items']} held-out real images. "
              "It is biased upwards for few samples: the real-data row (as many real images as one run's "
              "samples) is the floor.",
              "- **class consistency**: the fraction of the samples generated for class k that the classifier "
              "labels k; for real data, the classifier's accuracy.",
              f"- **{fid_col}**: the standard FID (pytorch-fid's TF Inception) against the same held-out images"
              + (f"; {summary['fid_note']}." if summary["fid_note"] else "."),
              f"- Held-out data: {s['heldout']}.", ""]
    return "\n".join(lines)


def make_figures(opts, summary, ctx):
    """ablation_samples.png and ablation_magnitudes.png: the --compare configurations side by side,
    from the first seed both finished; copied to --visuals."""
    a, b = opts.compare
    rows = {r["config"]: r for r in summary["rows"]}
    seeds = [s for s in opts.seeds if all(s in rows.get(c, {}).get("seeds_ok", []) for c in (a, b))]
    if not seeds:
        say(f"no figures: no seed with finished runs of both {a} and {b}")
        return []
    runs = [next(r for r in rows[c]["runs"] if r["seed"] == seeds[0]) for c in (a, b)]
    titles = [f"{rows[c]['label']} [{c}], seed {seeds[0]}" for c in (a, b)]
    written = []
    head = summary["headline_cfg"]
    if ctx.kind == "pixel":
        path = os.path.join(opts.results_dir, "ablation_samples.png")
        names = ctx.manifest.get("class_names") or [str(k) for k in range(ctx.num_classes)]
        sample_figure([r["samples"][head]["npz"] for r in runs], titles, names, path,
                      f"same classes and noise, DDIM-{opts.sample_steps}, cfg {head}")
        written.append(path)
    records = [plots.read_metrics(os.path.join(r["run_dir"], "metrics.jsonl")) for r in runs]
    if all(any("act_rms" in rec for rec in run) for run in records):
        path = os.path.join(opts.results_dir, "ablation_magnitudes.png")
        plots.compare_magnitudes(list(zip(titles, records)), path)
        written.append(path)
    if opts.visuals:
        os.makedirs(opts.visuals, exist_ok=True)
        for path in written:
            shutil.copy(path, os.path.join(opts.visuals, os.path.basename(path)))
    return written


def sample_figure(npz_paths, titles, class_names, path, subtitle):
    """One row per class (the first FIGURE_COLUMNS samples of it); one panel per run."""
    blocks = []
    for npz_path in npz_paths:
        with np.load(npz_path) as npz:
            images, labels = npz["arr_0"], npz["labels"]
        blocks.append([images[np.flatnonzero(labels == k)[:FIGURE_COLUMNS]] for k in range(len(class_names))])
    plots.compare_samples(blocks, titles, class_names, path, subtitle)
