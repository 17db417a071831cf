"""Ablation grid for MaP-DiT: does magnitude preservation make DiT train better, switch by switch?
The grid runner (runner.py) with one lr per arm (train.py's default for its flags, or --lr for all),
each run scored by evaluate.py; experiments/README.md has the grids, the preset and the outputs.

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
from experiments.evaluate import LOG, prepare_data, prepare_eval  # noqa: E402
from data import write_json, write_text  # noqa: E402
from experiments.report import aggregate, make_figures, render_table  # noqa: E402
from experiments.runner import (CONFIGS, accepted_arms, collect, finish, grid_parser, parse_grid,  # noqa: E402
                                is_flow, parse_only, run_job, run_phase)

PRESET = dict(model="DiT-XS/4", depth=4, hidden_size=128, num_heads=4, num_steps=800, global_batch_size=64,
              samples_per_class=50, sample_steps=50)
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


if __name__ == "__main__":
    sys.exit(main())
