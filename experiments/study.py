"""A fair test of magnitude preservation: each arm at its own best learning rate (an lr sweep scored
on the validation half of the held-out images), then several seeds at that lr, curves over training,
scored on the test half, on data whose classes are shapes. experiments/README.md has the design.

    python experiments/study.py --estimate          # the plan and its expected duration, nothing run
    python experiments/study.py --parallel 2 --threads 1   # the default study (2-core CPU)
    python experiments/study.py --profile gpu --parallel 4 # a bigger model, longer budgets (a GPU)
"""
import math
import os
import shlex
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import runs  # noqa: E402
import train  # noqa: E402
import watch  # noqa: E402
from data import LatentDataset, read_json, write_json  # noqa: E402
from cli import UsageError, at_least, run_command  # noqa: E402
from experiments.evaluate import (LOG, metric_networks, prepare_data, prepare_eval, real_floor, say,  # noqa: E402
                                  split_heldout)
from experiments.runner import (CONFIGS, accepted_arms, collect, final_checkpoint, finish, grid_parser,  # noqa: E402
                                job_state, parse_grid, parse_only, run_job, run_phase)
from experiments.report import README_END, README_START, readme_parts, write_report  # noqa: E402

ARMS = ["vanilla", "mp", "mp-rotation", "weight-normalization", "mp-embedding"]
# Budgets. cpu: sized for about 2 hours on an idle 2-core CPU with --parallel 2 --threads 1
# (experiments/README.md has the arithmetic); its seconds are measured there. gpu: not yet measured.
PROFILES = {
    "cpu": dict(model="DiT-XS/4", depth=4, hidden_size=128, num_heads=4, global_batch_size=64,
                sweep_steps=150, steps=400, eval_every=100, eval_samples=256, sample_steps=25,
                samples_per_class=50, step_s=0.77, sample_forward_s=0.0040, run_overhead_s=10, classifier_s=120),
    "gpu": dict(model="DiT-S/4", depth=None, hidden_size=None, num_heads=None, global_batch_size=256,
                sweep_steps=3000, steps=15000, eval_every=1000, eval_samples=2000, sample_steps=50,
                samples_per_class=200, step_s=None, sample_forward_s=None, run_overhead_s=None, classifier_s=None),
}
SCRIPT = os.path.abspath(__file__)


def build_parser():
    p, g = grid_parser("study.py", __doc__, "results/study", [1, 2, 3])
    g.add_argument("--eval-every", type=at_least(1), help="steps between in-run evaluations of full runs")
    g.add_argument("--eval-samples", type=at_least(1), help="samples per in-run evaluation")
    g.add_argument("--metric", help="train.py --eval-metrics metric that picks the lr and draws the curves "
                   "(default fid with the Inception weights on disk, else fd_classifier)")
    g.add_argument("--target", type=float, help="the metric value for 'steps to reach' (default: the worst arm's "
                   "final mean, which every arm reaches)")
    g = p.add_argument_group("the study (the --seeds above: the full runs at each arm's best lr, not the sweep seed)")
    g.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                   help="the preset: cpu (default; about 2 h with --parallel 2) or gpu (experiments/README.md)")
    g.add_argument("--arms", nargs="+", metavar="NAME", default=ARMS,
                   help=f"configurations of experiments/ablate.py --list (default {' '.join(ARMS)})")
    g.add_argument("--sweep-points", type=at_least(1), default=7, help="learning rates per arm (default 7)")
    g.add_argument("--sweep-span", type=float, default=1000.0,
                   help="highest / lowest lr of the sweep, log-spaced around train.py's default for the arm "
                   "(default 1000: half-decade steps from default x 10^-1.5 to x 10^1.5)")
    g.add_argument("--sweep-around", nargs="+", default=[], metavar="ARM=LR",
                   help="centre an arm's sweep on LR instead of train.py's default, e.g. vanilla=3.16e-3 (a best "
                   "lr known from an earlier study, so that fewer --sweep-points bracket it)")
    g.add_argument("--sweep-steps", type=at_least(1), help="steps of each sweep run (default: the profile's)")
    g.add_argument("--sweep-extend", type=at_least(0), default=2, metavar="N",
                   help="sweep up to N steps past an end that holds the best lr (default 2; 0 = never)")
    g.add_argument("--sweep-seed", type=int, default=0, help="seed of the sweep runs (default 0)")
    g.add_argument("--steps", type=at_least(1), help="steps of each full run (default: the profile's)")
    g.add_argument("--estimate", action="store_true", help="print the plan and its expected duration, run nothing")
    g.add_argument("--readme", metavar="FILE", help="also write the report into FILE (e.g. README.md) between its "
                   f"'{README_START}' and '{README_END}' lines")
    return p


def parse(argv):
    opts = parse_grid(build_parser(), argv, lambda opts: PROFILES[opts.profile])
    unknown = [a for a in opts.arms if a not in CONFIGS]
    if unknown:
        raise UsageError(f"--arms: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if len(set(opts.arms)) != len(opts.arms):
        raise UsageError("--arms must not repeat")
    in_range, check = train.RANGES["seed"]
    if not all(check(s) for s in [opts.sweep_seed, *opts.seeds]):
        raise UsageError(f"--sweep-seed and --seeds must be {in_range}")
    if opts.sweep_seed in opts.seeds:
        raise UsageError(f"--seeds must not include the sweep seed {opts.sweep_seed}: the lr would be chosen on "
                          "the run it reports")
    if not 1 <= opts.sweep_span < math.inf or (opts.sweep_points > 1 and opts.sweep_span == 1):
        raise UsageError("--sweep-span must be finite, and above 1 for more than one point")
    opts.sweep_around = parse_centres(opts.sweep_around, opts.arms)
    if opts.readme:
        readme_parts(opts.readme)  # refuses a file without the report's block
    # what the grid runner and experiments/evaluate.py's scoring read: fixed here, as ablate.py's defaults
    opts.sample_seed, opts.loss_batch, opts.eval_batch_size = 0, 256, 250
    opts.inception_weights, opts.prediction, opts.hflip = None, "v", None
    return opts


def parse_centres(pairs, arms):
    """{arm: lr} of --sweep-around ARM=LR ...; UsageError for an arm not in --arms or an lr that is not
    a positive finite number."""
    centres = {}
    for pair in pairs:
        arm, _, lr = pair.partition("=")
        try:
            value = float(lr)
        except ValueError:
            value = math.nan
        if arm not in arms or not 0 < value < math.inf:
            raise UsageError(f"--sweep-around {pair}: give ARM=LR with ARM one of --arms ({' '.join(arms)}) and "
                             "LR a positive number")
        centres[arm] = value
    return centres


def sweep_lrs(default, points, span):
    """points log-spaced values from default / sqrt(span) to default * sqrt(span), 3 significant digits."""
    return [grid_lr(default, points, span, i) for i in range(points)] if points > 1 else [default]


def grid_lr(default, points, span, i):
    """Point i of that grid; i < 0 or i >= points continue it past its ends."""
    return float(f"{default * span ** (i / (points - 1) - 0.5):.3g}")


def edge_lr(opts, arm_plan, best):
    """The next lr past the end of the arm's sweep that holds its best, while fewer than --sweep-extend
    points lie past the original grid there, else None (a diverged point is never best: it stops)."""
    grid, lrs = sweep_lrs(arm_plan["centre"], opts.sweep_points, opts.sweep_span), arm_plan["lrs"]
    if best is None or len(grid) < 2:
        return None
    above, below = sum(lr > max(grid) for lr in lrs), sum(lr < min(grid) for lr in lrs)
    if best == max(lrs) and above < opts.sweep_extend:
        return grid_lr(arm_plan["centre"], opts.sweep_points, opts.sweep_span, len(grid) + above)
    if best == min(lrs) and below < opts.sweep_extend:
        return grid_lr(arm_plan["centre"], opts.sweep_points, opts.sweep_span, -1 - below)
    return None


def check_reach(opts, default):
    """Refuse a sweep whose lrs, extended --sweep-extend steps past each end, leave the positive floats."""
    if opts.sweep_points == 1:
        return
    try:
        ends = [grid_lr(default, opts.sweep_points, opts.sweep_span, i)
                for i in (-opts.sweep_extend, opts.sweep_points - 1 + opts.sweep_extend)]
    except OverflowError:
        ends = [math.inf]
    if not all(0 < lr < math.inf for lr in ends):
        raise UsageError(f"--sweep-span {opts.sweep_span:g}: the sweep around {default:g} (extended up to "
                          f"{opts.sweep_extend} steps past each end) leaves the positive floats; narrow it")


def make_plan(opts, data):
    """{arm: train.py's lr for it and its sweep lrs} for the arms train.py accepts, {arm: why not} for the others."""
    accepted, refused = accepted_arms(opts, data, opts.arms, "sweep")
    plan = {}
    for arm, args in accepted.items():
        centre = opts.sweep_around.get(arm, args.lr)
        check_reach(opts, centre)
        plan[arm] = dict(default_lr=args.lr, centre=centre, lrs=sweep_lrs(centre, opts.sweep_points, opts.sweep_span))
    return plan, refused


def warm_eval_cache(opts, data):
    """Train train.py's evaluation classifier and cache both held-out halves' statistics once, so that
    parallel runs only read them. Returns the floor of the curves: eval_samples training images'
    metric against the test half."""
    cache = os.path.join(opts.results_dir, "eval-cache")
    path = os.path.join(opts.results_dir, "floor.json")
    key = dict(data=data.path, validation=data.validation, test=data.test, metric=opts.metric,
               samples=opts.eval_samples)
    saved = read_json(path)
    if saved and saved.get("key") == key and os.path.isdir(cache):
        return saved["value"]
    dataset = LatentDataset(data.path)
    networks = metric_networks(opts.metric, dataset, cache)
    for reference in (data.validation, data.test):  # the test half's value, the last, is the floor
        value = real_floor(dataset, opts.eval_samples, reference, opts.metric, networks, cache)
    write_json(path, dict(key=key, value=value))
    return value


def sweep_results(opts, data, plan):
    """({arm: its sweep runs' results}, {arm: best lr or None})."""
    sweeps = {arm: [collect(opts, data, None, "sweep", arm, lr, opts.sweep_seed) for lr in plan[arm]["lrs"]]
              for arm in plan}
    return sweeps, {arm: best_lr(results) for arm, results in sweeps.items()}


def sweep_jobs(opts, plan):
    return [(arm, lr, opts.sweep_seed) for arm in plan for lr in plan[arm]["lrs"]]


def full_jobs(opts, plan, best):
    return [(arm, best[arm], seed) for arm in plan if best[arm] is not None for seed in opts.seeds]


def announce(opts, data, plan):
    """Say the plan and its expected duration (every full run pending until the sweep is done);
    returns the seconds, or None."""
    pending_sweep = sum(job_state(opts, data, None, "sweep", *job)[1] != "done" for job in sweep_jobs(opts, plan))
    pending_full = len(plan) * len(opts.seeds)
    if not pending_sweep:  # a full run with its final checkpoint may still need scoring: not pending
        run_dirs = [job_state(opts, data, None, "full", *job)[0] for job in full_jobs(opts, plan, sweep_results(
            opts, data, plan)[1])]
        pending_full = sum(not os.path.isfile(final_checkpoint(d, opts.steps)) for d in run_dirs)
    seconds, words = estimate(opts, pending_sweep, pending_full)
    for arm, p in plan.items():
        say(f"{arm}: sweep lr {' '.join(f'{lr:g}' for lr in p['lrs'])} (train.py's default {p['default_lr']:g}"
            + (f"; centred on {p['centre']:g}, --sweep-around)" if p["centre"] != p["default_lr"] else ")"))
    say(f"expected duration: {'unknown' if seconds is None else f'{seconds / 3600:.1f} h'} ({words}; "
        f"plus one sweep run per step an arm's sweep is extended past an edge best, --sweep-extend)")
    return seconds


def best_lr(sweep):
    """The lr of the sweep run with the lowest final metric among those that finished (None if none did)."""
    ok = [r for r in sweep if r["status"] == "ok" and math.isfinite(r["final"])]
    return min(ok, key=lambda r: r["final"])["lr"] if ok else None


def add_wall_time(opts, seconds, ran):
    """{"seconds", "invocations"}: the study's wall time in RESULTS/wall.json, this invocation's
    seconds added when it ran runs (a rerun that only rewrites the report does not count)."""
    path = os.path.join(opts.results_dir, "wall.json")
    wall = read_json(path) or dict(seconds=0.0, invocations=0)
    if ran:
        wall = dict(seconds=wall["seconds"] + seconds, invocations=wall["invocations"] + 1)
        write_json(path, wall)
    return wall


def estimate(opts, pending_sweep, pending_full):
    """(seconds or None, the arithmetic in words) for the pending runs, from the profile's measured
    seconds: steps x s/step + evaluations x samples x DDIM steps x s per sample-forward, over --parallel."""
    p = PROFILES[opts.profile]
    same = all(getattr(opts, k) == p[k] for k in ("model", "depth", "hidden_size", "num_heads", "global_batch_size"))
    if p["step_s"] is None or not same:
        return None, ("no measured step time for this model and batch on this profile: the duration is "
                      "unknown until the first runs finish (their s/step is in the report)")
    eval_s = opts.eval_samples * opts.sample_steps * p["sample_forward_s"]
    forwards = sum(1 if s == 1 else 2 for s in opts.cfg_scales)  # per sampling step: guided ones run two
    score_s = 10 * opts.samples_per_class * opts.sample_steps * p["sample_forward_s"] * forwards  # 10 classes
    evals = -(-opts.steps // opts.eval_every)
    sweep_s = opts.sweep_steps * p["step_s"] + eval_s + p["run_overhead_s"]
    full_s = opts.steps * p["step_s"] + evals * eval_s + score_s + p["run_overhead_s"]
    total = (pending_sweep * sweep_s + pending_full * full_s) / opts.parallel + p["classifier_s"]
    words = (f"{pending_sweep} sweep runs x {sweep_s:.0f} s ({opts.sweep_steps} steps x {p['step_s']} s, one "
             f"evaluation {eval_s:.0f} s, start {p['run_overhead_s']} s) + {pending_full} full runs x {full_s:.0f} s "
             f"({opts.steps} steps, {evals} evaluations, final scoring {score_s:.0f} s, start), over {opts.parallel} "
             f"at once, + {p['classifier_s']} s for the classifiers")
    return total, words


def main(argv=None):
    LOG["name"] = "study"
    return run_command("study.py", run_study, list(sys.argv[1:] if argv is None else argv))


def run_study(argv):
    """The study under a lock on its results dir (two invocations take turns); --estimate and the
    --only subprocesses, whose parent holds it, run free."""
    opts = parse(argv)
    data = study_data(opts)
    if opts.only or opts.estimate:
        return conduct(opts, argv, data)
    with runs.folder_lock(opts.results_dir, create=True):
        return conduct(opts, argv, data)


def study_data(opts):
    """The training data and its held-out images cut in halves (data.validation, data.test), with the
    metric (opts.metric) checked against them."""
    data = prepare_data(opts, variant="shapes", heldout_parts=2)
    if data.manifest["kind"] != "pixel" or not data.heldout:
        raise UsageError("--data-path: the study needs a pixel dataset and held-out images of it (--eval-data-path)")
    opts.metric = opts.metric or watch.eval_metrics_for(None, data.manifest["kind"], flag="--metric")[0]
    watch.eval_metrics_for([opts.metric], data.manifest["kind"], flag="--metric")
    data.validation, data.test = split_heldout(data.heldout, opts.results_dir)
    return data


def conduct(opts, argv, data):
    """The plan and its estimate, the sweep (extended past edge bests), the full runs at each arm's best
    lr scored against the test half, the report."""
    plan, refused = make_plan(opts, data)
    test = SimpleNamespace(**dict(vars(data), heldout=data.test))  # what the full runs are scored against
    if opts.only:
        phase, arm, lr, seed = parse_only(opts.only, plan)
        run_job(opts, data, prepare_eval(opts, test) if phase == "full" else None, phase, arm, lr, seed)
        return 0
    seconds = announce(opts, data, plan)
    if opts.estimate:
        return 0
    start, floor = time.time(), warm_eval_cache(opts, data)
    phases = [run_phase(opts, argv, data, None, "sweep", sweep_jobs(opts, plan), SCRIPT)]
    sweeps, best = sweep_results(opts, data, plan)
    for _ in range(2 * opts.sweep_extend):  # each round moves every arm at most one step past its grid
        extra = {arm: lr for arm in plan if (lr := edge_lr(opts, plan[arm], best[arm])) is not None}
        if not extra:
            break
        for arm, lr in extra.items():
            say(f"{arm}: best lr {best[arm]:g} at the edge of its sweep; extending it to {lr:g}")
            plan[arm]["lrs"] = sorted(plan[arm]["lrs"] + [lr])
        phases.append(run_phase(opts, argv, data, None, "sweep", [(a, lr, opts.sweep_seed) for a, lr in extra.items()],
                                SCRIPT))
        sweeps, best = sweep_results(opts, data, plan)
    for arm, lr in best.items():
        say(f"{arm}: best lr {lr:g}" if lr is not None else f"{arm}: no sweep run finished; no full runs")
    ctx = prepare_eval(opts, test)
    phases.append(run_phase(opts, argv, data, ctx, "full", full_jobs(opts, plan, best), SCRIPT))
    fulls = {arm: [collect(opts, data, ctx, "full", arm, best[arm], s) for s in opts.seeds] if best[arm] else []
             for arm in plan}
    study = SimpleNamespace(opts=opts, data=data, ctx=ctx, plan=plan, refused=refused, sweeps=sweeps, best=best,
                            fulls=fulls, floor=floor, estimate_s=seconds,
                            command="python experiments/study.py " + shlex.join(argv),
                            wall=add_wall_time(opts, time.time() - start, sum(n for n, _ in phases)))
    return finish(write_report(study), [f for _, failed in phases for f in failed])


if __name__ == "__main__":
    sys.exit(main())
