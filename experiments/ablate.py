"""Ablation grid for MaP-DiT: does magnitude preservation make DiT train better, switch by switch?

    python experiments/ablate.py                        # default grid on the built-in demo data
    python experiments/ablate.py --list                 # the grid's configurations and their flags
    python experiments/ablate.py --grid tiny --num-steps 300 --seeds 0
    python experiments/ablate.py --parallel 4           # 4 runs at once as subprocesses (GPU)
    python experiments/ablate.py --data-path DATA --model DiT-S/4 --num-steps 20000

Grids: "default" = vanilla DiT (at DiT's lr 1e-4 and at 1e-3); vanilla plus each MP switch alone
(forced weight normalisation runs together with weight normalisation, which it needs); all MP
(--mp); all MP with rotation modulation (--mp --modulation rotation-scale). "tiny" = vanilla and
all MP.

Every configuration trains with the same model size, steps, batch and seeds through train.py's
own code (train.main), each (configuration, seed) in its own RESULTS/runs/<config>-seed<S>/.
Learning rates are train.py's dataset defaults per configuration (vanilla: AdamW 1e-4, constant;
weight-normalised: Adam 1e-2 with warm-up and EDM2 decay) unless --lr sets one for all. Every model
predicts v (--prediction), as the demo does: at this budget eps-prediction's samples are still noise.
Rerunning the same command skips finished runs and continues interrupted ones.

After training, each run samples a fixed set (the same labels and noise for every run) from its
widest power EMA with DDIM, and is scored by: the Frechet distance in the features of a small
classifier trained on the dataset (FD-<data>-classifier, cached in RESULTS/eval-cache/), the
class-consistency accuracy of that classifier, FID with the standard Inception when its weights
are on disk (else n/a), and the EMA's loss on a fixed held-out batch. RESULTS/table.md and
RESULTS/results.json aggregate the seeds; RESULTS/ablation_samples.png and
ablation_magnitudes.png compare vanilla DiT with MaP-DiT. Bad input: one line, exit code 2.
"""
import os
import argparse
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import feature_nets  # noqa: E402
from cli import ArgumentParser, UsageError, run_command  # noqa: E402
from experiments.evaluate import LOG, prepare_data, prepare_eval, say, write_json, write_text  # noqa: E402
from experiments.report import aggregate, make_figures, render_table  # noqa: E402
from experiments.runner import (CONFIGS, check_options, collect, finish, parse_only, parse_train,  # noqa: E402
                                run_job, run_phase, train_argv)

DEFAULT_MODEL, DEFAULT_SIZE = "DiT-XS/4", dict(depth=4, hidden_size=128, num_heads=4)
DEFAULT_STEPS, DEFAULT_BATCH = 800, 64  # the default grid: about an hour on a 2-core CPU


GRIDS = {"default": list(CONFIGS), "tiny": ["vanilla", "mp"]}


#################################################################################
#                                   Arguments                                   #
#################################################################################

def build_parser():
    p = ArgumentParser(prog="ablate.py", description=__doc__)
    g = p.add_argument_group("grid")
    g.add_argument("--grid", choices=sorted(GRIDS), default="default", help="which grid (default: default)")
    g.add_argument("--configs", nargs="+", metavar="NAME", help="run only these configurations of the grid (--list)")
    g.add_argument("--list", action="store_true", help="print the grid's configurations and their train.py flags")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S", help="training seeds (default 0 1)")
    g.add_argument("--results-dir", default="results/ablation", metavar="DIR",
                   help="the grid's directory: runs/, eval-cache/, table.md, results.json, figures "
                   "(default results/ablation)")
    g.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="runs at once, each a subprocess logging to its run folder (default 1: in this process)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads per process (default torch's: all cores); on a shared CPU 1 can be "
                   "faster, as idle threads spin against other processes")
    g.add_argument("--visuals", metavar="DIR", help="also copy the two comparison figures here (e.g. visuals/)")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"), default=["vanilla", "mp"],
                   help="the configurations the figures put side by side (default vanilla mp)")
    g = p.add_argument_group("training: the same for every configuration")
    g.add_argument("--data-path", metavar="DIR", help="a data.py dataset (default: the built-in demo shapes, 32x32 pixels, "
                   "rendered into RESULTS/demo-data)")
    g.add_argument("--model", metavar="NAME", help=f"DiT-{{XS,S,B,L,XL}}/{{2,4,8}} (default {DEFAULT_MODEL} with depth "
                   f"{DEFAULT_SIZE['depth']}, width {DEFAULT_SIZE['hidden_size']}, {DEFAULT_SIZE['num_heads']} heads)")
    g.add_argument("--depth", type=int, help="blocks (default: 4 for the default model, else the model's own)")
    g.add_argument("--hidden-size", type=int, help="width (default: 128 for the default model, else the model's)")
    g.add_argument("--num-heads", type=int, help="heads (default: 4 for the default model, else the model's)")
    g.add_argument("--num-steps", type=int, default=DEFAULT_STEPS, help=f"optimiser steps (default {DEFAULT_STEPS})")
    g.add_argument("--global-batch-size", type=int, default=DEFAULT_BATCH, help=f"default {DEFAULT_BATCH}")
    g.add_argument("--prediction", choices=["eps", "v", "x0"], default="v",
                   help="what every model predicts (default v, as train.py's demo: at a few thousand steps "
                   "eps-prediction has not learned the high-noise steps and its samples are noise)")
    g.add_argument("--lr", type=float, help="one learning rate for every configuration (default: train.py's "
                   "per configuration, 1e-4 vanilla, 1e-2 with weight normalisation)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                   help="random flips (default, as train.py: on for pixel datasets, off for latent ones and "
                   "the demo)")
    g.add_argument("--train-args", default="", metavar="'ARGS'",
                   help="more train.py arguments for every run, appended last, e.g. --train-args='--grad-clip 1'")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data-path", metavar="DIR", help="held-out real data (default: a second demo rendering with "
                   "another seed; for --data-path a fixed split the classifier does not train on)")
    g.add_argument("--samples-per-class", type=int, default=50, help="samples per class and run (default 50)")
    g.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="guidance scales to score; the first is the headline (default 1.0 = conditional only)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sample noise, the same for every run")
    g.add_argument("--loss-batch", type=int, default=256, help="held-out items for the EMA loss (default 256)")
    g.add_argument("--eval-batch-size", type=int, default=250, help="samples per model batch (default 250)")
    g.add_argument("--inception-weights", metavar="PATH",
                   help=f"{feature_nets.INCEPTION_FILE} (default ${feature_nets.INCEPTION_ENV}, then the torch hub cache; never "
                   "downloaded: FID is n/a without it)")
    p.add_argument("--only", help=argparse.SUPPRESS)  # CONFIG:SEED, the subprocess of --parallel
    return p


def parse(argv):
    opts = build_parser().parse_args(argv)
    grid = GRIDS[opts.grid]
    if opts.configs:
        unknown = [c for c in opts.configs if c not in grid]
        if unknown:
            raise UsageError(f"--configs: {', '.join(unknown)} not in grid {opts.grid!r} ({', '.join(grid)})")
        opts.configs = [c for c in grid if c in opts.configs]
    else:
        opts.configs = list(grid)
    check_options(opts, ("num_steps", "global_batch_size", "parallel", "threads", "samples_per_class",
                         "sample_steps", "loss_batch", "eval_batch_size"))
    if any(s < 0 for s in opts.cfg_scales):
        raise UsageError("--cfg-scales must be >= 0")
    for name in opts.compare:
        if name not in CONFIGS:
            raise UsageError(f"--compare: unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
    if opts.model is None:
        opts.model = DEFAULT_MODEL
        for k, v in DEFAULT_SIZE.items():
            if getattr(opts, k) is None:
                setattr(opts, k, v)
    if opts.only:
        opts.only = parse_only(opts.only, CONFIGS)
    opts.steps, opts.metric = opts.num_steps, None  # the grid runner's names; no in-run evaluation
    return opts


#################################################################################
#                              Running the grid                                 #
#################################################################################

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
    return run_grid(opts, argv)


def run_grid(opts, argv):
    if opts.threads:
        torch.set_num_threads(opts.threads)
    data = prepare_data(opts)  # checks the data before anything is written
    os.makedirs(opts.results_dir, exist_ok=True)
    available, skipped = [], {}
    for cfg in opts.configs:
        args, why = parse_train(train_argv(opts, data, "runs", cfg, opts.lr, opts.seeds[0]))
        if args is None:
            skipped[cfg] = why
        else:
            available.append(cfg)
    if not available:
        raise UsageError(f"train.py refuses every configuration: {next(iter(skipped.values()))}")
    for cfg, why in skipped.items():
        say(f"skipping {cfg}: {why}")
    ctx = prepare_eval(opts, data)
    if opts.only:
        _, cfg, lr, seed = opts.only
        if cfg not in available:
            raise UsageError(f"{cfg}: {skipped.get(cfg, 'not in this grid')}")
        run_job(opts, data, ctx, "runs", cfg, lr, seed)
        return 0
    jobs = [(cfg, opts.lr, seed) for cfg in available for seed in opts.seeds]
    _, failures = run_phase(opts, argv, data, ctx, "runs", jobs, os.path.abspath(__file__))
    collected = {cfg: [collect(opts, data, ctx, "runs", cfg, opts.lr, seed) for seed in opts.seeds] for cfg in available}
    summary = aggregate(opts, data, ctx, CONFIGS, collected, skipped)
    write_json(os.path.join(opts.results_dir, "results.json"), summary)
    write_text(os.path.join(opts.results_dir, "table.md"), render_table(summary))
    return finish([os.path.join(opts.results_dir, "table.md"), *make_figures(opts, summary, ctx)], failures)


if __name__ == "__main__":
    sys.exit(main())
