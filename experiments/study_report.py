"""The report of experiments/study.py: the lr sweeps (best lr, the range within 10% of it,
divergences), the full runs at the best lr (metric with seed spread, best-vs-best gaps, steps to a
target value, parameters, s/step, the ablation scores), written as RESULTS/study.md (a markdown
section the README can include) and RESULTS/study.json, with the figures study_curves.png (metric
against step per arm, mean and seed range), study_sweep.png (final metric against lr),
study_samples.png (the best run of each arm, same classes and noise) and study_magnitudes.png;
the report links them from --visuals (relative to the working directory, e.g. visuals/ for the
README) when given, else from beside it. --readme FILE also puts the report between the markers
README_START and README_END of FILE.
"""
import math
import os
import shutil

import numpy as np

import plots
from experiments.evaluate import write_json
from experiments.report import sample_figure, summarise

FIGURES = (("metric against step", "study_curves.png"), ("final metric against lr", "study_sweep.png"),
           ("samples of the best runs", "study_samples.png"), ("magnitudes of the best runs", "study_magnitudes.png"))
WITHIN = 0.10  # "forgiving": the lrs whose metric is within 10% of the arm's best


def lr_range(sweep, best):
    """(lowest, highest) lr of the contiguous run of sweep points around the best whose final metric is
    at most (1 + WITHIN) x the best's; a diverged or missing point ends the run."""
    points = sorted(sweep, key=lambda r: r["lr"])
    i = next(k for k, r in enumerate(points) if r["lr"] == best)
    limit = points[i]["final"] * (1 + WITHIN)

    def good(r):
        return r["status"] == "ok" and math.isfinite(r["final"]) and r["final"] <= limit
    lo = hi = i
    while lo > 0 and good(points[lo - 1]):
        lo -= 1
    while hi < len(points) - 1 and good(points[hi + 1]):
        hi += 1
    return points[lo]["lr"], points[hi]["lr"]


def steps_to(curve, target):
    """The first evaluated step whose value is at most target, or None."""
    return next((step for step, value in curve if value <= target), None)


def arm_summary(arm, plan, sweep, best, runs):
    """One arm's numbers: sweep, best lr and its range, full runs aggregated over seeds."""
    row = dict(arm=arm, label=runs[0].get("label", arm) if runs else arm, default_lr=plan["default_lr"],
               sweep=[dict(lr=r["lr"], status=r["status"], final=r.get("final"), message=r.get("message"))
                      for r in sweep], best_lr=best)
    if best is None:
        return row
    lrs = sorted(r["lr"] for r in sweep)
    row.update(range=lr_range(sweep, best), at_edge=best in (lrs[0], lrs[-1]) and len(lrs) > 1)
    ok = [r for r in runs if r["status"] == "ok"]
    row.update(seeds_ok=[r["seed"] for r in ok], diverged=[r["seed"] for r in runs if r["status"] == "diverged"],
               missing=[r["seed"] for r in runs if r["status"] == "missing"])
    if ok:
        head = ok[0]["samples"]["1"]
        row.update(parameters=ok[0]["parameters"], fd_network=head["fd_network"],
                   final=summarise([r["final"] for r in ok]), step_time_s=summarise([r["step_time_s"] for r in ok]),
                   fd=summarise([r["samples"]["1"]["fd"] for r in ok]),
                   class_consistency=summarise([r["samples"]["1"]["class_consistency"] for r in ok]),
                   ema_heldout_loss=summarise([r["heldout_loss"]["ema"]["loss"] for r in ok]),
                   curves={r["seed"]: r["curve"] for r in ok},
                   best_run=min(ok, key=lambda r: r["final"]))
    return row


def compare(rows, baseline):
    """Each arm's best-vs-best gap to the baseline arm: gap = mean - baseline mean (negative: lower
    metric, better), relative to the baseline, and whether |gap| exceeds the spread, the sum of the
    two seed standard deviations (the mean +- std intervals do not overlap)."""
    base = rows.get(baseline, {}).get("final")
    out = {}
    for arm, row in rows.items():
        if arm == baseline or not base or "final" not in row:
            continue
        gap, spread = row["final"]["mean"] - base["mean"], row["final"]["std"] + base["std"]
        out[arm] = dict(gap=gap, relative=gap / base["mean"], spread=spread, exceeds=abs(gap) > spread,
                        n=(row["final"]["n"], base["n"]))
    return out


def summarise_study(study):
    o = study.opts
    rows = {arm: arm_summary(arm, study.plan[arm], study.sweeps[arm], study.best[arm], study.fulls[arm])
            for arm in study.plan}
    finals = [r["final"]["mean"] for r in rows.values() if "final" in r]
    target = o.target if o.target is not None else (max(finals) if finals else None)
    for row in rows.values():
        if "curves" in row and target is not None:
            reached = {s: steps_to(c, target) for s, c in row["curves"].items()}
            row["steps_to_target"] = dict(per_seed=reached, summary=summarise([v for v in reached.values() if v]))
    baseline = "vanilla" if "vanilla" in rows else next(iter(rows))
    data = "the demo's shapes variant (random colour, size, position and rotation: class = shape alone)" \
        if study.data.demo else f"`{os.path.basename(study.data.path)}`"
    figure_dir = os.path.relpath(o.visuals) if o.visuals else "."
    return dict(metric=o.metric, data=data, target=target, figure_dir=figure_dir,
                target_source="--target" if o.target is not None else
                "the worst arm's final mean", baseline=baseline, gaps=compare(rows, baseline), floor=study.floor,
                refused=study.refused, wall=study.wall, estimate_s=study.estimate_s,
                command=study.command,
                settings=dict(profile=o.profile, data=study.data.path, heldout=study.data.heldout, model=o.model,
                              depth=o.depth, hidden_size=o.hidden_size, num_heads=o.num_heads,
                              batch=o.global_batch_size, sweep_steps=o.sweep_steps, sweep_seed=o.sweep_seed,
                              sweep_points=o.sweep_points, sweep_span=o.sweep_span, sweep_extend=o.sweep_extend,
                              steps=o.steps, seeds=o.seeds,
                              eval_every=o.eval_every, eval_samples=o.eval_samples, sample_steps=o.sample_steps,
                              samples_per_class=o.samples_per_class, num_classes=int(study.data.manifest["num_classes"]),
                              parallel=o.parallel, threads=o.threads),
                rows={arm: {k: v for k, v in row.items() if k != "best_run"} for arm, row in rows.items()}), rows


def _cell(stat, spec=".4g", scale=1.0):
    if not stat:
        return "n/a"
    mean = format(stat["mean"] * scale, spec)
    return mean if stat["n"] == 1 else f"{mean} ± {format(stat['std'] * scale, spec)}"


def _sweep_cell(point):
    if point["status"] == "diverged":
        return "diverged"
    return "missing" if point["status"] != "ok" else format(point["final"], ".4g")


def render(summary):
    s, m = summary["settings"], summary["metric"]
    rows = summary["rows"]
    lines = ["### Does magnitude preservation help? Each arm at its own best learning rate", "",
             f"{s['model']} (depth {s['depth']}, width {s['hidden_size']}, {s['num_heads']} heads), batch "
             f"{s['batch']}, v-prediction, on {summary['data']}. "
             f"lr sweep: {s['sweep_points']} log-spaced values over {s['sweep_span']:g}x around train.py's default "
             f"per arm (extended one step at a time past an end holding the best, up to {s['sweep_extend']} steps), "
             f"{s['sweep_steps']} steps, seed {s['sweep_seed']}; the best lr by `{m}` of "
             f"{s['eval_samples']} samples (DDIM-{s['sample_steps']}) against held-out images. Then seeds "
             f"{s['seeds']} at that lr for {s['steps']} steps, evaluated every {s['eval_every']} steps. "
             f"Cells: mean ± sample standard deviation over seeds; lower {m} is better. Real training images "
             f"score {summary['floor']:.4g} (the floor).", "",
             f"| arm | best lr (train.py default) | lr within 10% of best | final {m} ↓ | steps to {m} ≤ "
             f"{'n/a' if summary['target'] is None else format(summary['target'], '.4g')} | FD ↓ "
             "| class consistency % ↑ | EMA held-out loss ↓ | parameters | s/step | seeds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for arm, r in rows.items():
        if r["best_lr"] is None:
            lines.append(f"| {arm} | every sweep run diverged or is missing |" + " |" * 9)
            continue
        lr = f"{r['best_lr']:g}{' (edge of the sweep)' if r['at_edge'] else ''} ({r['default_lr']:g})"
        span = f"{r['range'][0]:g} – {r['range'][1]:g} ({r['range'][1] / r['range'][0]:.3g}x)"
        if "final" not in r:
            lines.append(f"| {arm} | {lr} | {span} | no full run finished |" + " |" * 7)
            continue
        reach = r.get("steps_to_target", {})
        n_reached = sum(v is not None for v in reach.get("per_seed", {}).values())
        reached = f"{_cell(reach.get('summary'), '.0f')} ({n_reached}/{len(r['seeds_ok'])} seeds)"
        seeds = f"{len(r['seeds_ok'])}" + (f", diverged: {r['diverged']}" if r["diverged"] else "") + \
            (f", missing: {r['missing']}" if r["missing"] else "")
        lines.append(f"| {arm} | {lr} | {span} | {_cell(r['final'])} | {reached} | {_cell(r['fd'], '.3g')} "
                     f"| {_cell(r['class_consistency'], '.1f', 100)} | {_cell(r['ema_heldout_loss'])} "
                     f"| {r['parameters']:,} | {_cell(r['step_time_s'], '.3g')} | {seeds} |")
    columns = max(len(r["sweep"]) for r in rows.values())
    lines += ["", f"The lr sweeps (final `{m}` after {s['sweep_steps']} steps; **bold** = best):", "",
              "| arm | " + " | ".join(f"lr {i + 1}" for i in range(columns)) + " |", "|---|" + "---:|" * columns]
    for arm, r in rows.items():
        cells = [f"{p['lr']:g}: " + (f"**{_sweep_cell(p)}**" if p["lr"] == r["best_lr"] else _sweep_cell(p))
                 for p in sorted(r["sweep"], key=lambda p: p["lr"])]
        lines.append(f"| {arm} | " + " | ".join(cells + [""] * (columns - len(cells))) + " |")
    lines += ["", "What the data shows:", ""] + [f"- {line}" for line in findings(summary)]
    lines += [""] + [f"![{alt}]({os.path.join(summary['figure_dir'], name)})\n" for alt, name in FIGURES]
    lines += ["Columns: **FD** is experiments/ablate.py's Frechet distance in its classifier's features "
              f"({next((r['fd_network'] for r in rows.values() if 'fd_network' in r), 'n/a')}) of "
              f"{s['num_classes'] * s['samples_per_class']} samples from fixed noise against held-out images, **class "
              "consistency** the fraction of samples that classifier labels with their class, **EMA held-out "
              "loss** the sampled weights' loss on held-out images: the final scores of ablate.py, at the end of "
              f"each full run. **s/step**: median over training log windows, {s['parallel']} run(s) at once. "
              "**lr within 10% of best**: the contiguous sweep points around the best whose final metric is at "
              "most 1.1x the best's (how forgiving the arm is). **steps to**: the first evaluation at or below "
              f"the target ({summary['target_source']}), mean over the seeds that reached it.", ""]
    wall, est = summary["wall"], summary["estimate_s"]
    lines += [f"Wall time of the study: {wall['seconds'] / 3600:.2f} h over {wall['invocations']} invocation(s) "
              f"with runs to do (the last one estimated {'n/a' if est is None else f'{est / 3600:.1f} h'} before "
              f"it started); command: `{summary['command']}`.", ""]
    return "\n".join(lines)


def findings(summary):
    """Plain sentences from the numbers: each gap to the baseline and whether it exceeds the spread,
    divergences, sweeps whose best lr lies at an edge, and train.py's default lr against the evidence."""
    m, base, out = summary["metric"], summary["baseline"], []
    for arm, g in summary["gaps"].items():
        verdict = "exceeds" if g["exceeds"] else "does not exceed"
        direction = "lower (better)" if g["gap"] < 0 else "higher (worse)"
        out.append(f"{arm} vs {base}, each at its best lr: {m} {100 * abs(g['relative']):.1f}% {direction} "
                   f"(gap {g['gap']:+.4g}); this {verdict} the seed spread ({g['spread']:.4g}, seeds {g['n']})"
                   + ("." if g["exceeds"] else ": the two are not distinguished by this study."))
    for arm, r in summary["rows"].items():
        diverged = [p["lr"] for p in r["sweep"] if p["status"] == "diverged"]
        if diverged:
            out.append(f"{arm}: the sweep diverged at lr {', '.join(f'{lr:g}' for lr in diverged)}.")
        if r.get("diverged"):
            out.append(f"{arm}: full runs diverged for seeds {r['diverged']}.")
        if r.get("at_edge"):
            out.append(f"{arm}: the best lr {r['best_lr']:g} is at the edge of its sweep; a wider sweep may find "
                       "a better one.")
        if r.get("range"):
            inside = r["range"][0] <= r["default_lr"] <= r["range"][1]
            out.append(f"{arm}: train.py's default lr {r['default_lr']:g} is "
                       + ("within 10% of the best: the default stands." if inside else
                          f"outside the range within 10% of the best ({r['best_lr']:g}): evidence for a new default."))
    for arm, why in summary["refused"].items():
        out.append(f"{arm}: not run ({why}).")
    return out


def curves_figure(rows, metric, floor, path):
    """Metric against step: per arm the mean over seeds (line) and the seed range (band)."""
    lines = []
    for arm, r in rows.items():
        curves = list(r.get("curves", {}).values())
        if curves:
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
            lines.append((f"{arm} (lr {r['best_lr']:g}, {len(curves)} seeds)", steps,
                          np.array([[dict(c)[s] for s in steps] for c in curves])))
    return plots.plot_seed_curves(lines, floor, f"{metric} (log scale), mean and seed range", path)


def sweep_figure(rows, metric, path):
    """Final sweep metric against lr per arm (log-log); diverged points as x at the top."""
    lines = [(arm, [(p["lr"], p["final"]) for p in r["sweep"] if p["status"] == "ok"],
              [p["lr"] for p in r["sweep"] if p["status"] == "diverged"]) for arm, r in rows.items()]
    return plots.plot_lr_sweep(lines, f"final {metric} (x: diverged)", path)


README_START, README_END = "<!-- study.py results: start -->", "<!-- study.py results: end -->"


def include_in_readme(path, section):
    """Replace what lies between README_START and README_END in the markdown file `path` with section."""
    with open(path) as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no '{README_START}' ... '{README_END}' block to replace")
    text = text[:start + len(README_START)] + "\n" + section + "\n" + text[end:]
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_report(study):
    """study.md, study.json and the figures under the study's results dir (copied to --visuals)."""
    o = study.opts
    summary, rows = summarise_study(study)
    out = o.results_dir
    written = [os.path.join(out, "study.md"), os.path.join(out, "study.json")]
    text = render(summary)
    with open(written[0] + ".tmp", "w") as f:
        f.write(text)
    os.replace(written[0] + ".tmp", written[0])
    write_json(written[1], summary)
    figures = [os.path.join(out, name) for _, name in FIGURES[:2]]
    curves_figure(rows, o.metric, summary["floor"], figures[0])
    sweep_figure(rows, o.metric, figures[1])
    best = [(f"{arm} (lr {r['best_lr']:g}, seed {r['best_run']['seed']})", r["best_run"])
            for arm, r in rows.items() if "best_run" in r]
    if best:
        names = study.data.manifest.get("class_names") or [str(k) for k in range(study.ctx.num_classes)]
        figures.append(os.path.join(out, FIGURES[2][1]))
        sample_figure([r["samples"]["1"]["npz"] for _, r in best], [t for t, _ in best], names, figures[-1],
                      f"the best run of each arm: same classes and noise, DDIM-{o.sample_steps}")
        figures.append(os.path.join(out, FIGURES[3][1]))
        plots.compare_magnitudes([(t, plots.read_metrics(os.path.join(r["run_dir"], "metrics.jsonl")))
                                  for t, r in best], figures[-1])
    if o.readme:
        include_in_readme(o.readme, text)
        written.append(o.readme)
    if o.visuals:
        os.makedirs(o.visuals, exist_ok=True)
        for path in figures:
            shutil.copy(path, os.path.join(o.visuals, os.path.basename(path)))
    return written + figures
