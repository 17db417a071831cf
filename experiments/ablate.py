"""Ablation grid for MaP-DiT: does magnitude preservation make DiT train better, switch by switch?
The grid runner (runner.py) with one lr per arm (train.py's default for its flags, or --lr for all),
each run scored by evaluate.py, the grid's table and its two comparison figures written here from
report.py's cells; experiments/README.md has the grids, the preset and the outputs.

    python experiments/ablate.py                        # default grid on the built-in demo data
    python experiments/ablate.py --list                 # the grid's configurations and their flags
    python experiments/ablate.py --grid tiny --num-steps 300 --seeds 0
    python experiments/ablate.py --parallel 4           # 4 runs at once as subprocesses (GPU)
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import feature_nets  # noqa: E402
from cli import UsageError, at_least, run_command  # noqa: E402
from data import write_json, write_text  # noqa: E402
from experiments.evaluate import LOG, md_table, prepare_data, prepare_eval, say  # noqa: E402
from experiments.report import (class_names, guided_tables, run_figures, sample_cells, samplers,  # noqa: E402
                                score_cells, score_columns, score_notes, scores, seed_status, seeds_cell, stat_cell)
from experiments.runner import (CONFIGS, accepted_arms, collect, finish, grid_parser, parse_grid,  # noqa: E402
                                is_flow, parse_only, run_job, run_phase)

PRESET = dict(model="DiT-XS/4", depth=4, hidden_size=128, num_heads=4, num_steps=800, global_batch_size=64,
              samples_per_class=50, sample_steps=50)
SETTINGS = ("model", "depth", "hidden_size", "num_heads", "num_steps", "global_batch_size", "seeds", "lr",
            "train_args", "cfg_scales", "samples_per_class", "sample_seed", "parallel")
GRIDS = {"default": [c for c in CONFIGS if not is_flow(c)], "tiny": ["vanilla", "mp"],
         "objectives": ["vanilla", "mp", "vanilla-flow", "mp-flow"]}


def build_parser():
    p, g = grid_parser("ablate.py", __doc__, "results/ablation", [0, 1])
    g.add_argument("--num-steps", type=at_least(1), help="optimiser steps")
    g.add_argument("--prediction", choices=["eps", "v", "x0"], default="v",
                   help="what every model predicts (default v: at a few thousand steps eps-prediction has not "
                   "learned the high-noise steps and its samples are noise)")
    g.add_argument("--lr", type=float, help="one learning rate for every configuration (default: train.py's "
                   "per configuration, 1e-4 vanilla, 1e-2 with weight normalisation)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                   help="random flips (default as train.py: on for pixel datasets, off for latents and the demo)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sample noise, the same for every run")
    g.add_argument("--loss-batch", type=at_least(1), default=256, help="held-out items for the EMA loss (default 256)")
    g.add_argument("--eval-batch-size", type=at_least(1), default=250, help="samples per model batch (default 250)")
    g.add_argument("--inception-weights", metavar="PATH",
                   help=f"{feature_nets.INCEPTION_FILE} (default ${feature_nets.INCEPTION_ENV}, then the torch hub "
                   "cache; never downloaded: FID is n/a without it)")
    g = p.add_argument_group("the grid's configurations")
    g.add_argument("--grid", choices=sorted(GRIDS), default="default", help="which grid (default: default)")
    g.add_argument("--configs", nargs="+", metavar="NAME", help="run only these configurations of the grid (--list)")
    g.add_argument("--list", action="store_true", help="print the grid's configurations and their train.py flags")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"), default=["vanilla", "mp"],
                   help="the configurations the figures put side by side (default vanilla mp)")
    return p


def parse(argv):
    opts = parse_grid(build_parser(), argv, lambda opts: PRESET)
    grid = GRIDS[opts.grid]
    unknown = [c for c in opts.configs or [] if c not in grid]
    if unknown:
        raise UsageError(f"--configs: {', '.join(unknown)} not in grid {opts.grid!r} ({', '.join(grid)})")
    opts.configs = [c for c in grid if c in (opts.configs or grid)]
    for name in opts.compare:
        if name not in CONFIGS:
            raise UsageError(f"--compare: unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
    if opts.only:
        opts.only = parse_only(opts.only, CONFIGS)
    opts.steps, opts.metric = opts.num_steps, None  # the grid runner's names; no in-run evaluation
    return opts


def main(argv=None):
    LOG["name"] = "ablate"
    return run_command("ablate.py", list_or_run, list(sys.argv[1:] if argv is None else argv))


def list_or_run(argv):
    opts = parse(argv)
    if opts.list:
        for cfg in opts.configs:
            label, flags = CONFIGS[cfg]
            print(f"{cfg:32s} {' '.join(flags) or '(no flags)':58s} {label}")
        return 0
    data = prepare_data(opts)  # checks the data before anything is written
    os.makedirs(opts.results_dir, exist_ok=True)
    available, skipped = accepted_arms(opts, data, opts.configs, "runs", opts.lr)
    ctx = prepare_eval(opts, data)
    if opts.only:
        _, cfg, lr, seed = opts.only
        if cfg not in available:
            raise UsageError(f"{cfg}: {skipped.get(cfg, 'not in this grid')}")
        run_job(opts, data, ctx, "runs", cfg, lr, seed)
        return 0
    jobs = [(cfg, opts.lr, seed) for cfg in available for seed in opts.seeds]
    _, failures = run_phase(opts, argv, data, ctx, "runs", jobs, os.path.abspath(__file__))
    collected = {cfg: [collect(opts, data, ctx, "runs", cfg, opts.lr, seed) for seed in opts.seeds]
                 for cfg in available}
    summary = aggregate(opts, data, ctx, CONFIGS, collected, skipped)
    write_json(os.path.join(opts.results_dir, "results.json"), summary)
    write_text(os.path.join(opts.results_dir, "table.md"), render_table(summary))
    return finish([os.path.join(opts.results_dir, "table.md"), *make_figures(opts, summary, ctx)], failures)


def aggregate(opts, data, ctx, configs, collected, skipped):
    """The grid's summary: a row per configuration of opts.configs (configs: name -> (label,
    flags); collected: name -> its runs' results, one per seed; skipped: name -> why)."""
    rows = []
    for cfg in opts.configs:
        row = dict(config=cfg, label=configs[cfg][0], flags=configs[cfg][1])
        if cfg in skipped:
            rows.append(dict(row, status="skipped", reason=skipped[cfg]))
            continue
        ok, seeds = seed_status(collected[cfg])
        row.update(status="ok" if ok else "no finished run", runs=collected[cfg], **seeds)
        if ok:
            row["summary"] = scores(ok, [f"{c:g}" for c in opts.cfg_scales])
        rows.append(row)
    return dict(
        grid=opts.grid, headline_cfg=f"{opts.cfg_scales[0]:g}", fd_network=ctx.fd_name, fid_note=ctx.fid_note,
        settings=dict({k: getattr(opts, k) for k in SETTINGS}, data=data.path, demo=data.demo,
                      heldout=ctx.held_desc, sampler=samplers(opts.configs, opts.sample_steps),
                      loss_batch=len(ctx.loss_x), device=str(ctx.device),
                      num_samples=ctx.num_classes * opts.samples_per_class),
        classifier=dict(accuracy=ctx.accuracy, train_items=ctx.n_train, heldout_items=ctx.n_held,
                        reference_items=ctx.n_held - ctx.n_base, cache=ctx.cache_path),
        real_data=dict(items=ctx.n_base, fd=ctx.real_fd, class_consistency=ctx.accuracy, fid=ctx.real_fid), rows=rows)


def _optimizer(opt):
    text = f"{opt['name']} {opt['lr']:g}"
    if opt["warmup_steps"] or opt["decay_steps"]:
        text += f", warm-up {opt['warmup_steps']}, decay {opt['decay_steps']}"
    return text


def render_table(summary):
    s, head, fd = summary["settings"], summary["headline_cfg"], summary["fd_network"]
    rows = []
    for row in summary["rows"]:
        flags = f"`{' '.join(row['flags'])}`" if row["flags"] else "(none)"
        if "summary" not in row:
            why = row.get("reason") or (f"diverged (seeds {row['diverged']})" if row.get("diverged") else row["status"])
            rows.append([row["config"], flags, why] + [""] * 8)
            continue
        m = row["summary"]
        rows.append([row["config"], flags, _optimizer(m["optimizer"]), stat_cell(m["final_train_loss"], ".4f"),
                     *score_cells(m, head), sample_cells(m[f"cfg{head}"])[2], seeds_cell(row)])
    real = summary["real_data"]
    rows.append([f"real data (held-out, {real['items']} images)", "", "", "", f"{real['fd']:.3g}",
                 f"{100 * real['class_consistency']:.1f}", "", "", "", "n/a" if real["fid"] is None else
                 f"{real['fid']:.3g}", ""])
    lr_source = "--lr" if s["lr"] is not None else "train.py default"
    lines = [f"# Ablation grid `{summary['grid']}`", "",
             f"{s['model']} (depth {s['depth']}, width {s['hidden_size']}, {s['num_heads']} heads), "
             f"{s['num_steps']} steps at batch {s['global_batch_size']}, seeds {s['seeds']}; "
             f"samples: {s['sampler']}, cfg {head}, {s['samples_per_class']} per class from the widest power EMA. "
             "Cells: mean ± sample standard deviation over the seeds that finished; ↓ lower is better, ↑ higher.", "",
             *md_table(["configuration", "train.py flags", f"optimiser (lr) [{lr_source}]", "final train loss",
                        *score_columns(fd), "FID-Inception ↓", "seeds"], rows)]
    lines += guided_tables({r["config"]: r["summary"] for r in summary["rows"] if "summary" in r},
                           [f"{scale:g}" for scale in s["cfg_scales"][1:]], fd)
    c = summary["classifier"]
    return "\n".join(lines + [
        "", "Columns (experiments/README.md defines them): the optimiser is train.py's per configuration unless "
        "`--lr` was given, so the MP configurations differ in recipe, not only in layers.",
        *score_notes(fd, s["num_samples"], f"{c['reference_items']} held-out real images (the classifier: "
                     f"{c['train_items']} training images, held-out accuracy {100 * c['accuracy']:.1f}%)", s["parallel"], head),
        "- **FID-Inception**: against the same held-out images" + (f"; {summary['fid_note']}." if summary["fid_note"]
                                                                   else "."),
        f"- Held-out data: {s['heldout']}.", ""])


def make_figures(opts, summary, ctx):
    """ablation_samples.png and ablation_magnitudes.png: the --compare configurations side by side,
    from the first seed both finished; copied to --visuals."""
    rows, head = {r["config"]: r for r in summary["rows"]}, summary["headline_cfg"]
    seeds = [s for s in opts.seeds if all(s in rows.get(c, {}).get("seeds_ok", []) for c in opts.compare)]
    if not seeds:
        say(f"no figures: no seed with finished runs of both {' and '.join(opts.compare)}")
        return []
    runs = [(f"{rows[c]['label']} [{c}], seed {seeds[0]}", r["samples"][head]["npz"], r["run_dir"])
            for c in opts.compare for r in rows[c]["runs"] if r["seed"] == seeds[0]]
    paths = [os.path.join(opts.results_dir, f"ablation_{name}.png") for name in ("samples", "magnitudes")]
    names = class_names(ctx.manifest, ctx.num_classes) if ctx.kind == "pixel" else None
    subtitle = f"same classes and noise, {samplers(opts.compare, opts.sample_steps)}, cfg {head}"
    return run_figures(runs, names, paths, subtitle, opts.visuals)


if __name__ == "__main__":
    sys.exit(main())
