"""The study's report (study.py), and the cells, score tables and figures it shares with the ablation's
table (ablate.py): the runs' results aggregated over seeds (mean and sample standard deviation) as
markdown tables, findings and figures; experiments/README.md lists the files and defines every column.
"""
import math
import os
import shutil

import numpy as np
from scipy import stats

import plots
from cli import UsageError
from data import write_json, write_text
from experiments.evaluate import md_table, summarise
from experiments.runner import baseline_of, is_flow, objective_of
from sampling import GRID_SAMPLER

FIGURE_COLUMNS = 8
FIGURES = (("metric against step", "study_curves.png"), ("final metric against lr", "study_sweep.png"),
           ("samples of the best runs", "study_samples.png"), ("magnitudes of the best runs", "study_magnitudes.png"))
WITHIN = 0.10  # "forgiving": the lrs whose metric is within 10% of the arm's best
ALPHA = 0.05  # significance level of the best-vs-best comparisons, family-wise (Holm over the arms compared)
README_START, README_END = "<!-- study.py results: start -->", "<!-- study.py results: end -->"
RUN_SCORES = dict(step_time_s=lambda r: r["step_time_s"], final_train_loss=lambda r: r["final_train_loss"],
                  ema_heldout_loss=lambda r: r["heldout_loss"]["ema"]["loss"],
                  raw_heldout_loss=lambda r: r["heldout_loss"]["raw"]["loss"])
STUDY_SETTINGS = ("profile", "model", "depth", "hidden_size", "num_heads", "global_batch_size", "sweep_steps",
                  "sweep_seed", "sweep_points", "sweep_span", "sweep_extend", "steps", "seeds", "eval_every",
                  "eval_samples", "sample_steps", "samples_per_class", "cfg_scales", "parallel", "threads", "sweep_around")
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler"}  # as the papers write them
SCORE_COLUMNS = ("{fd} ↓", "class consistency % ↑", "EMA held-out loss ↓", "parameters", "s/step")


def seed_status(runs):
    """(the finished runs, the seeds by status: seeds, seeds_ok, diverged, missing)."""
    ok = [r for r in runs if r["status"] == "ok"]
    return ok, dict(seeds=[r["seed"] for r in runs], seeds_ok=[r["seed"] for r in ok],
                    **{k: [r["seed"] for r in runs if r["status"] == k] for k in ("diverged", "missing")})


def scores(ok, scales):
    """experiments/evaluate.py's scores of the finished runs `ok` over their seeds: the losses and s/step,
    and per guidance scale s (as "1") the sample scores as cfg<s>."""
    out = {k: summarise([get(r) for r in ok]) for k, get in RUN_SCORES.items()}
    for s in scales:
        at = [r["samples"][s] for r in ok if s in r["samples"]]
        out[f"cfg{s}"] = {k: summarise([a[k] for a in at]) for k in ("fd", "class_consistency", "fid")}
    return dict(out, parameters=ok[0]["parameters"], optimizer=ok[0]["optimizer"], weights=ok[0]["weights"])


def stat_cell(stat, spec=".4g", scale=1.0):
    """mean ± std of a summarise() result, n/a for none."""
    if not stat:
        return "n/a"
    mean = format(stat["mean"] * scale, spec)
    return mean if stat["n"] == 1 else f"{mean} ± {format(stat['std'] * scale, spec)}"


def score_columns(fd):
    return [c.format(fd=fd) for c in SCORE_COLUMNS]


def sample_cells(h):
    """FD, class consistency % and FID-Inception cells of a scores() entry cfg<s>."""
    return [stat_cell(h["fd"], ".3g"), stat_cell(h["class_consistency"], ".1f", 100), stat_cell(h["fid"], ".3g")]


def score_cells(m, scale):
    """The SCORE_COLUMNS cells of scores() m at guidance scale `scale`."""
    return [*sample_cells(m[f"cfg{scale}"])[:2], stat_cell(m["ema_heldout_loss"], ".4f"), f"{m['parameters']:,}",
            stat_cell(m["step_time_s"], ".3g")]


def seeds_cell(row):
    """finished/run, and which seeds diverged or are missing."""
    return f"{len(row['seeds_ok'])}/{len(row['seeds'])}" + "".join(
        f", {k}: {row[k]}" for k in ("diverged", "missing") if row[k])


def score_notes(fd, n_samples, reference, parallel, scale):
    """What SCORE_COLUMNS were computed from, as a markdown bullet (experiments/README.md defines them)."""
    return [f"- **{fd}** and **class consistency**: in the features of feature_nets.py's small classifier, of "
            f"{n_samples} samples at cfg {scale} from fixed noise against {reference} (real images score the floor). **EMA held-out "
            f"loss**: fixed held-out images, timesteps and noise. **s/step**: {parallel} run(s) at once."]


def run_figures(runs, names, paths, subtitle, visuals):
    """runs: [(title, samples .npz, run_dir)] side by side: their samples (same classes and noise) at
    paths[0] when names (a pixel dataset's class names) are given, one row per class; their magnitudes
    at paths[1] when monitored; copied to visuals. Returns the paths written."""
    written = [samples_figure(runs, names, paths[0], subtitle)] if names else []
    records = [(t, plots.read_metrics(os.path.join(run_dir, "metrics.jsonl"))) for t, _, run_dir in runs]
    if all(any("act_rms" in rec for rec in run) for _, run in records):
        plots.compare_magnitudes(records, paths[1])
        written.append(paths[1])
    copy_to(visuals, written)
    return written


def samples_figure(runs, names, path, subtitle):
    """runs' samples (.npz of pixel images, same classes and noise) side by side, a row per class name."""
    blocks = []
    for _, npz_path, _ in runs:
        with np.load(npz_path) as npz:
            images, labels = npz["arr_0"], npz["labels"]
        blocks.append([images[np.flatnonzero(labels == k)[:FIGURE_COLUMNS]] for k in range(len(names))])
    plots.compare_samples(blocks, [t for t, _, _ in runs], names, path, subtitle)
    return path


def copy_to(visuals, paths):
    """Copy the figures to the --visuals folder, if one was given."""
    if visuals:
        os.makedirs(visuals, exist_ok=True)
        for path in paths:
            shutil.copy(path, visuals)


def class_names(manifest, num_classes):
    return manifest.get("class_names") or [str(k) for k in range(num_classes)]


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


def arm_summary(arm, plan, sweep, best, runs, scales):
    """One arm's numbers: sweep, best lr and its range, full runs aggregated over seeds (their sample
    scores at each guidance scale of `scales`, as "1")."""
    row = dict(arm=arm, label=runs[0].get("label", arm) if runs else arm, default_lr=plan["default_lr"],
               sweep=[dict(lr=r["lr"], status=r["status"], final=r.get("final"), message=r.get("message"))
                      for r in sweep], best_lr=best)
    if best is None:
        return row
    lrs = sorted(r["lr"] for r in sweep)
    row.update(range=lr_range(sweep, best), at_edge=best in (lrs[0], lrs[-1]) and len(lrs) > 1)
    ok, seeds = seed_status(runs)
    row.update(seeds)
    if ok:
        row.update(scores(ok, scales), fd_network=ok[0]["samples"][scales[0]]["fd_network"],
                   final=summarise([r["final"] for r in ok]), curves={r["seed"]: r["curve"] for r in ok},
                   best_run=min(ok, key=lambda r: r["final"]))
    return row


def welch(a, b):
    """Welch's two-sided t-test of mean(a) = mean(b), variances not assumed equal: dict(t, df, p) with
    t = (mean a - mean b) / sqrt(v_a + v_b), v = s^2 / n (s the sample std), and the Welch-Satterthwaite
    df = (v_a + v_b)^2 / (v_a^2 / (n_a - 1) + v_b^2 / (n_b - 1)); None with fewer than 2 values on a
    side, no spread at all, or a non-finite value (the test is undefined there)."""
    if min(len(a), len(b)) < 2 or not (np.std(a) or np.std(b)):
        return None
    result = stats.ttest_ind(a, b, equal_var=False)
    test = dict(t=float(result.statistic), df=float(result.df), p=float(result.pvalue))
    return test if all(math.isfinite(v) for v in test.values()) else None


def holm(p_values):
    """Holm's adjusted p-values, in the given order: the i-th smallest of m becomes the largest of
    min(1, (m - j) p_(j)) over j <= i (0-based). Calling those below ALPHA significant makes any false
    'significant' among the m comparisons at most ALPHA likely."""
    adjusted, worst = [None] * len(p_values), 0.0
    for j, i in enumerate(sorted(range(len(p_values)), key=lambda i: p_values[i])):
        worst = max(worst, min(1.0, (len(p_values) - j) * p_values[i]))
        adjusted[i] = worst
    return adjusted


def compare(rows, baselines, scales=()):
    """Each arm's best-vs-best comparison with its baseline arm (baselines: {arm: the arm it is compared
    with, or None}) on the seeds that finished: on the final in-run metric (keyed by arm) and, for each
    guidance scale s of `scales` (as "4"), on the FD of the final samples at cfg s (keyed "ARM at cfg s").
    gap = mean - baseline mean (negative: lower, better), relative to the baseline, Welch's t-test (None:
    fewer than 2 finished seeds on a side, no verdict), and whether it is significant at ALPHA after
    Holm's correction over every comparison tested. n: the seeds that finished, of the seeds run (a
    diverged seed is a failure of its arm, not part of its mean)."""
    def values(row, scale):
        if scale is None:
            return row["final"]["values"] if "final" in row else []
        fd = (row.get(f"cfg{scale}") or {}).get("fd")
        return fd["values"] if fd else []
    out = {}
    for scale in (None, *scales):
        for arm, row in rows.items():
            baseline = baselines.get(arm)
            if baseline is None or row.get("best_lr") is None:
                continue
            base = rows[baseline]
            a, b = values(row, scale), values(base, scale)
            gap = float(np.mean(a) - np.mean(b)) if a and b else None
            out[arm if scale is None else f"{arm} at cfg {scale}"] = dict(
                arm=arm, scale=scale, baseline=baseline, gap=gap, relative=None if gap is None else gap / float(np.mean(b)),
                n=(len(a), len(b)), of=(len(row["seeds"]), len(base.get("seeds", []))), test=welch(a, b),
                p_holm=None, significant=None)
    tested = [key for key, c in out.items() if c["test"]]
    for key, p in zip(tested, holm([out[key]["test"]["p"] for key in tested])):
        out[key].update(p_holm=p, significant=p < ALPHA)
    return out


def summarise_study(study):
    o = study.opts
    scales = [f"{s:g}" for s in o.cfg_scales]
    rows = {arm: arm_summary(arm, study.plan[arm], study.sweeps[arm], study.best[arm], study.fulls[arm], scales)
            for arm in study.plan}
    finals = [r["final"]["mean"] for r in rows.values() if "final" in r]
    target = o.target if o.target is not None else (max(finals) if finals else None)
    for row in rows.values():
        if "curves" in row and target is not None:
            reached = {s: steps_to(c, target) for s, c in row["curves"].items()}
            row["steps_to_target"] = dict(per_seed=reached, summary=summarise([v for v in reached.values() if v]))
    baselines = {arm: baseline_of(arm, rows) for arm in rows}
    data = "the demo's shapes variant (random colour, size, position and rotation: class = shape alone)" \
        if study.data.demo else f"`{os.path.basename(study.data.path)}`"
    linked_from = os.path.dirname(os.path.abspath(o.readme)) if o.readme else os.getcwd()
    return dict(metric=o.metric, data=data, target=target, gaps=compare(rows, baselines, guided(scales)), scales=scales,
                target_source="--target" if o.target is not None else "the worst arm's final mean",
                figure_dir=os.path.relpath(o.visuals, linked_from) if o.visuals else ".", alpha=ALPHA,
                floor=study.floor, refused=study.refused, wall=study.wall, estimate_s=study.estimate_s,
                command=study.command,
                settings=dict({k: getattr(o, k) for k in STUDY_SETTINGS}, data=study.data.path,
                              heldout=study.data.heldout, validation=study.data.validation, test=study.data.test,
                              num_classes=int(study.data.manifest["num_classes"])),
                rows={arm: {k: v for k, v in row.items() if k != "best_run"} for arm, row in rows.items()}), rows


def _sweep_cell(point):
    if point["status"] == "diverged":
        return "diverged"
    return "missing" if point["status"] != "ok" else format(point["final"], ".4g")


def render_study(summary):
    s, m, rows, head = summary["settings"], summary["metric"], summary["rows"], summary["scales"][0]
    target = "n/a" if summary["target"] is None else format(summary["target"], ".4g")
    table = []
    for arm, r in rows.items():
        if r["best_lr"] is None:
            table.append([arm, "every sweep run diverged or is missing"] + [""] * 9)
            continue
        lr = f"{r['best_lr']:g}{' (edge of the sweep)' if r['at_edge'] else ''} ({r['default_lr']:g})"
        span = f"{r['range'][0]:g} – {r['range'][1]:g} ({r['range'][1] / r['range'][0]:.3g}x)"
        if "final" not in r:
            why = f"every full run diverged (seeds {r['diverged']})" if r["diverged"] and not r["missing"] else \
                f"no full run finished (diverged: {r['diverged']}, missing: {r['missing']})"
            table.append([arm, lr, span, why] + [""] * 7)
            continue
        reach = r.get("steps_to_target", {})
        n_reached = sum(v is not None for v in reach.get("per_seed", {}).values())
        table.append([arm, lr, span, stat_cell(r["final"]), f"{stat_cell(reach.get('summary'), '.0f')} ({n_reached}/"
                      f"{len(r['seeds_ok'])} seeds)", *score_cells(r, head), seeds_cell(r)])
    columns = max(len(r["sweep"]) for r in rows.values())
    sweeps = [[arm] + [f"{p['lr']:g}: " + (f"**{_sweep_cell(p)}**" if p["lr"] == r["best_lr"] else _sweep_cell(p))
                       for p in sorted(r["sweep"], key=lambda p: p["lr"])] for arm, r in rows.items()]
    fd = next((r["fd_network"] for r in rows.values() if "fd_network" in r), "n/a")
    wall, est = summary["wall"], summary["estimate_s"]
    return "\n".join([
        "### Does magnitude preservation help? Each arm at its own best learning rate", "",
        f"{s['model']} (depth {s['depth']}, width {s['hidden_size']}, {s['num_heads']} heads), batch "
        f"{s['global_batch_size']}, {objectives(rows)}, on {summary['data']}. lr sweep: {s['sweep_points']} "
        f"log-spaced values over {s['sweep_span']:g}x around {centres(s)} (extended past an end holding the "
        f"best, up to {s['sweep_extend']} steps), {s['sweep_steps']} steps, seed {s['sweep_seed']}; the best lr "
        f"by `{m}` of {s['eval_samples']} samples ({samplers(rows, s['sample_steps'])}) against the validation half of "
        f"the held-out images. Then seeds {s['seeds']} at that lr for {s['steps']} steps, evaluated every "
        f"{s['eval_every']} steps against the test half, which gives every number below. Cells: mean ± sample "
        f"standard deviation over the seeds that finished (a diverged seed is a failure of its arm); lower {m} "
        f"is better. Each arm is compared with its baseline ({baselines(summary['gaps'])}) by Welch's t-test "
        f"(two-sided) on the final {m}{guided_tests(summary['scales'])}, significant when its p-value after Holm's "
        f"correction over every comparison is below {ALPHA:g}. "
        f"Real training images score {summary['floor']:.4g} against the test half (the floor).", "",
        *md_table(["arm", "best lr (train.py default)", "lr within 10% of best", f"final {m} ↓",
                   f"steps to {m} ≤ {target}", *score_columns(f"FD, cfg {head}"), "seeds"], table),
        *guided_tables(rows, summary["scales"][1:]),
        "", f"The lr sweeps (final `{m}` after {s['sweep_steps']} steps; **bold** = best):", "",
        *md_table(["arm"] + [f"lr {i + 1}" for i in range(columns)], [r + [""] * (columns + 1 - len(r)) for r in sweeps]),
        "", "What the data shows:", "", *[f"- {line}" for line in findings(summary)], "",
        *[f"![{alt}]({os.path.join(summary['figure_dir'], name)})\n" for alt, name in study_figures(summary["scales"])],
        "Columns, at the end of each full run:", "",
        *score_notes(f"FD ({fd})", s["num_classes"] * s["samples_per_class"], "the test half", s["parallel"], head),
        "- **lr within 10% of best**: the contiguous sweep points around the best whose final metric is at most "
        f"1.1x the best's. **steps to**: the first evaluation at or below the target ({summary['target_source']}), "
        "mean over the seeds that reached it.", "",
        f"Wall time of the study: {wall['seconds'] / 3600:.2f} h over {wall['invocations']} invocation(s) with runs "
        f"to do (the last one estimated {'n/a' if est is None else f'{est / 3600:.1f} h'} before it started); "
        f"command: `{summary['command']}`.", ""])


def guided(scales):
    """The guidance scales (as "4") among scales: each adds a comparison on its FD."""
    return [s for s in scales if s != "1"]


def guided_tests(scales):
    """The comparisons beyond the in-run metric, for the report's method sentence."""
    return f" and on the FD of the final samples at cfg {', '.join(guided(scales))}" if guided(scales) else ""


def guided_tables(rows, scales, fd="FD"):
    """A table per further guidance scale (as "4"): each row's ({name: scores()}) FD, class consistency and
    FID of its final samples at that scale."""
    lines = []
    for scale in scales:
        cells = [[name, *sample_cells(r[f"cfg{scale}"])] for name, r in rows.items() if f"cfg{scale}" in r]
        lines += ["", f"The same runs' final samples with classifier-free guidance (all channels) at cfg {scale}, "
                  "the same classes and noise:", "", *md_table(["", f"{fd} ↓", "class consistency % ↑",
                                                                "FID-Inception ↓"], cells)]
    return lines


def study_figures(scales):
    """(alt text, file name) of the report's figures: FIGURES, and the samples at each further scale."""
    return [*FIGURES, *((f"samples of the best runs at cfg {s}", f"study_samples_cfg{s}.png") for s in scales[1:])]


def objectives(rows):
    flow = [arm for arm in rows if is_flow(arm)]
    if not flow:
        return "v-prediction"
    return "flow matching (velocity)" if len(flow) == len(rows) else \
        f"DDPM arms v-prediction, flow arms ({', '.join(flow)}) flow matching (velocity)"


def samplers(arms, steps):
    """The in-run and final scoring samplers of these arms, the sampling.GRID_SAMPLER of their objectives
    (DDPM's first): 'DDIM-25 / Euler-25'."""
    used = dict.fromkeys(GRID_SAMPLER[objective_of(arm)] for arm in sorted(arms, key=is_flow))
    return " / ".join(f"{SAMPLER_NAMES.get(name, name)}-{steps}" for name in used)


def centres(settings):
    given = settings.get("sweep_around") or {}
    return "train.py's default per arm" + (f" ({', '.join(f'{a} {lr:g}' for a, lr in given.items())} instead: "
                                           "--sweep-around)" if given else "")


def baselines(gaps):
    """Which arm each arm of gaps (compare's) is tested against: 'mp with vanilla; mp-flow with vanilla-flow'."""
    pairs = dict.fromkeys(f"{g['arm']} with {g['baseline']}" for g in gaps.values())
    return "; ".join(pairs) or "no other arm"


def comparison(g, metric, tested):
    """The finding of one best-vs-best comparison (g: an entry of compare; tested: how many had a test)."""
    head = f"{g['arm']} vs {g['baseline']}, each at its best lr"
    metric = metric if g["scale"] is None else f"FD at cfg {g['scale']}"
    seeds = f"finished seeds {g['n'][0]}/{g['of'][0]} vs {g['n'][1]}/{g['of'][1]}"
    if g["gap"] is None:
        return f"{head}: no comparison ({seeds})."
    direction = "lower (better)" if g["gap"] < 0 else "higher (worse)"
    head += f": {metric} {100 * abs(g['relative']):.1f}% {direction} (gap {g['gap']:+.4g}, {seeds})"
    t = g["test"]
    if t is None:
        why = "fewer than 2 finished seeds on a side" if min(g["n"]) < 2 else "the seeds show no spread"
        return f"{head}; no verdict: {why}."
    verdict = f"significant at {ALPHA:g}." if g["significant"] else \
        f"not significant at {ALPHA:g}: the two are not distinguished by this study."
    return (f"{head}; Welch's t-test t = {t['t']:.3g}, df = {t['df']:.3g}, p = {t['p']:.3g}, Holm-adjusted over "
            f"{tested} comparison{'s' if tested > 1 else ''} {g['p_holm']:.3g}: {verdict}")


def findings(summary):
    """Plain sentences from the numbers: each best-vs-best comparison with the baseline and its test,
    divergences, sweeps whose best lr lies at an edge, and train.py's default lr against the evidence."""
    m, out = summary["metric"], []
    tested = sum(g["test"] is not None for g in summary["gaps"].values())
    out += [comparison(g, m, tested) for g in summary["gaps"].values()]
    for arm, r in summary["rows"].items():
        diverged = [p["lr"] for p in r["sweep"] if p["status"] == "diverged"]
        if diverged:
            out.append(f"{arm}: the sweep diverged at lr {', '.join(f'{lr:g}' for lr in diverged)}.")
        if r.get("diverged"):
            out.append(f"{arm}: the full runs of seeds {r['diverged']} (of {r['seeds']}) diverged: a failure of the "
                       "arm at its best lr, outside its mean and test.")
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


def readme_parts(path):
    """(the markdown file `path` up to its README_START line, from its README_END line on): the report goes
    between; UsageError when the file cannot be read or lacks them."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"--readme: {e}") from None
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise UsageError(f"--readme {path}: add the lines '{README_START}' and '{README_END}' where the report goes")
    return text[:start + len(README_START)], text[end:]


def write_report(study):
    """study.md, study.json and the figures under the study's results dir (copied to --visuals)."""
    o = study.opts
    summary, rows = summarise_study(study)
    written = [os.path.join(o.results_dir, name) for name in ("study.md", "study.json")]
    text = render_study(summary)
    write_text(written[0], text)
    write_json(written[1], summary)
    figures = [os.path.join(o.results_dir, name) for _, name in FIGURES[:2]]
    curves_figure(rows, o.metric, summary["floor"], figures[0])
    sweep_figure(rows, o.metric, figures[1])
    copy_to(o.visuals, figures)
    names, best = class_names(study.data.manifest, study.ctx.num_classes), {a: r for a, r in rows.items() if "best_run" in r}
    paths = [os.path.join(o.results_dir, name) for _, name in study_figures(summary["scales"])[2:]]
    for i, scale in enumerate(summary["scales"] if best else []):  # the headline scale's, then one per further scale
        runs = [(f"{arm} (lr {r['best_lr']:g}, seed {r['best_run']['seed']})", r["best_run"]["samples"][scale]["npz"],
                 r["best_run"]["run_dir"]) for arm, r in best.items()]
        subtitle = f"the best run of each arm: same classes and noise, {samplers(rows, o.sample_steps)}, cfg {scale}"
        if i == 0:  # paths: samples and magnitudes at the headline scale, then the samples at each further one
            figures += run_figures(runs, names, paths[:2], subtitle, o.visuals)
        else:
            figures.append(samples_figure(runs, names, paths[i + 1], subtitle))
            copy_to(o.visuals, figures[-1:])
    if o.readme:
        head, tail = readme_parts(o.readme)
        write_text(o.readme, f"{head}\n{text}\n{tail}")
        written.append(o.readme)
    return written + figures
