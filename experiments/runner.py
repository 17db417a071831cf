"""The grid runner of experiments/ablate.py and study.py: arms (CONFIGS) x learning rates x seeds,
each a train.py run in train.py's directory for its arguments, trained or continued through
train.main, scored by evaluate.py, its results.json written; --parallel N runs N at once as
`SCRIPT ARGV --only PHASE:ARM:LR:SEED`.
"""
import argparse
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import plots
import runs
import train
from cli import ArgumentParser, UsageError, at_least
from data import read_json, write_json
from experiments.evaluate import LOG, evaluate_run, say, training_record
from models import MP_SWITCHES


FLOW = ["--objective", "flow"]


def _configs():
    """name -> (label, train.py flags): vanilla, each switch alone, all MP, all MP + rotation; vanilla
    and all MP under flow matching."""
    configs = {"vanilla": ("DiT (vanilla)", []),
               "vanilla-lr1e-3": ("DiT (vanilla) at 10x DiT's learning rate", ["--lr", "1e-3"])}
    for switch in MP_SWITCHES:
        name, flags = switch[len("use_"):].replace("_", "-"), ["--" + switch.replace("_", "-")]
        label = "+ " + switch[len("use_"):].replace("_", " ")
        if switch == "use_forced_weight_normalization":  # forced alone is refused: it needs weight norm
            name, flags = "weight-normalization+forced", ["--use-weight-normalization"] + flags
            label = "+ weight normalization + forced weight normalization (run together)"
        configs[name] = (label, flags)
    configs["mp"] = ("MaP-DiT (all MP switches)", ["--mp"])
    configs["mp-rotation"] = ("MaP-DiT + rotation-scale modulation", ["--mp", "--modulation", "rotation-scale"])
    for name in ("vanilla", "mp"):  # the objective axis (issue #23): SiT's flow matching
        configs[f"{name}-flow"] = (configs[name][0] + ", flow matching", configs[name][1] + FLOW)
    return configs


def baseline_of(arm, arms):
    """The arm an arm is compared with (None: itself the baseline, or no baseline among arms): vanilla-flow
    for the other flow arms where it is among arms (MP's effect under flow), else vanilla (for
    vanilla-flow: the objective's effect)."""
    base = "vanilla-flow" if is_flow(arm) and arm != "vanilla-flow" and "vanilla-flow" in arms else "vanilla"
    return base if base in arms and base != arm else None


def objective_of(arm):
    """The training objective the arm's flags ask train.py for: "flow" or train.py's default "ddpm"."""
    flags = CONFIGS[arm][1]
    return flags[flags.index("--objective") + 1] if "--objective" in flags else "ddpm"


def is_flow(arm):
    return objective_of(arm) == "flow"


CONFIGS = _configs()
SIZE = ("depth", "hidden_size", "num_heads")  # a preset's, with its model only


def job_root(opts, phase, arm, lr, seed):
    return os.path.join(opts.results_dir, phase, f"{arm}-seed{seed}" if lr is None else f"{arm}-lr{lr:g}-seed{seed}")


def job_steps(opts, phase):
    return opts.sweep_steps if phase == "sweep" else opts.steps


def job_key(opts, ctx):
    """What a run's results depend on besides its training: a change re-scores, never retrains."""
    if ctx is None:
        return dict(metric=opts.metric)
    return dict(metric=opts.metric, samples_per_class=opts.samples_per_class, sample_steps=opts.sample_steps,
                cfg_scales=opts.cfg_scales, sample_seed=opts.sample_seed, loss_batch=opts.loss_batch,
                classifier=ctx.key)


def train_argv(opts, data, phase, arm, lr, seed):
    """train.py's arguments of one run: the grid's settings, flips as train.py's unless --hflip, logs and
    5 checkpoints scaled to the steps; with opts.metric, the in-run evaluation every --eval-every steps
    against the test half (full runs) or at the end against the validation half (sweep runs: the lr is
    chosen on data the report does not use); last the arm's flags and --train-args. Flow arms predict the
    velocity: no --prediction."""
    steps = job_steps(opts, phase)
    hflip = opts.hflip if opts.hflip is not None else not data.demo and data.manifest["kind"] == "pixel"
    argv = ["--data-path", data.path, "--results-dir", job_root(opts, phase, arm, lr, seed), "--model", opts.model,
            "--num-steps", str(steps), "--global-batch-size", str(opts.global_batch_size), "--seed", str(seed),
            "--log-every", str(max(1, min(50, steps // 10))), "--monitor-every", str(max(1, steps // 15)),
            "--ckpt-every", str(max(1, -(-steps // 5))), "--num-workers", "0", "--hflip" if hflip else "--no-hflip"]
    argv += ([] if is_flow(arm) else ["--prediction", opts.prediction]) + ([] if lr is None else ["--lr", repr(lr)])
    if opts.metric:
        argv += ["--sample-every", "0", "--no-progress", "--eval-every", str(opts.eval_every if phase == "full" else steps),
                 "--eval-samples", str(opts.eval_samples), "--eval-metrics", opts.metric, "--eval-reference",
                 data.test if phase == "full" else data.validation, "--sample-steps", str(opts.sample_steps)]
    for key in SIZE:
        if getattr(opts, key) is not None:
            argv += ["--" + key.replace("_", "-"), str(getattr(opts, key))]
    return argv + CONFIGS[arm][1] + shlex.split(opts.train_args)


def grid_parser(prog, doc, results_dir, seeds):
    """(the parser of the options ablate.py and study.py share, its training group); those without a
    default come from the script's preset (parse_grid)."""
    p = ArgumentParser(prog=prog, description=doc)
    p.add_argument("--only", help=argparse.SUPPRESS)  # PHASE:ARM:LR:SEED, a subprocess of --parallel
    g = p.add_argument_group("the grid")
    g.add_argument("--seeds", type=int, nargs="+", default=seeds, metavar="S",
                   help=f"training seeds (default {' '.join(map(str, seeds))})")
    g.add_argument("--results-dir", default=results_dir, metavar="DIR", help=f"default {results_dir}")
    g.add_argument("--parallel", type=at_least(1), default=1, metavar="N",
                   help="runs at once, each a subprocess logging to its run folder (default 1: in this process)")
    g.add_argument("--threads", type=at_least(1), metavar="N", help="torch CPU threads per process (default: all cores; "
                   "on a shared CPU 1 can be faster, as idle threads spin: --parallel 2 --threads 1 on 2 cores)")
    g.add_argument("--visuals", metavar="DIR", help="also copy the figures here (e.g. visuals/)")
    g.add_argument("--train-args", default="", metavar="'ARGS'",
                   help="more train.py arguments for every run, appended last, e.g. --train-args='--grad-clip 1'")
    g = p.add_argument_group("training and evaluation (default: the preset's)")
    g.add_argument("--data-path", metavar="DIR", help="a data.py dataset (default: the demo, rendered into RESULTS)")
    g.add_argument("--eval-data-path", metavar="DIR", help="held-out data of the same kind (default: a second demo "
                   "rendering with another seed)")
    for key, text in (("model", "DiT-{XS,S,B,L,XL}/{2,4,8}"), ("depth", "blocks"), ("hidden_size", "width"),
                      ("num_heads", "heads"), ("global_batch_size", "batch"),
                      ("samples_per_class", "samples per class scored at the end of a run"),
                      ("sample_steps", "DDIM steps of every evaluation")):
        g.add_argument("--" + key.replace("_", "-"), type=str if key == "model" else at_least(1), help=text)
    g.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="guidance scales of the samples scored at the end of a run; the first is the headline "
                   "(default 1.0 = conditional only)")
    return p, g


def parse_grid(parser, argv, preset):
    """The options, those not given taken from preset(opts) (its depth, width and heads only with its
    model); refused (UsageError): repeated seeds, --train-args that do not split.
    --results-dir made absolute; --threads set."""
    opts = parser.parse_args(argv)
    own_model = opts.model is not None
    for key, value in preset(opts).items():
        if hasattr(opts, key) and getattr(opts, key) is None and not (own_model and key in SIZE):
            setattr(opts, key, value)
    if len(set(opts.seeds)) != len(opts.seeds):
        raise UsageError(f"--seeds: repeated seed in {opts.seeds}")
    if not all(0 <= s < math.inf for s in opts.cfg_scales) or len(set(opts.cfg_scales)) != len(opts.cfg_scales):
        raise UsageError(f"--cfg-scales {' '.join(map(str, opts.cfg_scales))}: each a finite number, at least 0 "
                          "(1 = no guidance), none repeated")
    try:
        shlex.split(opts.train_args)
    except ValueError as e:
        raise UsageError(f"--train-args: {e}") from None
    opts.results_dir = os.path.abspath(opts.results_dir)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return opts


def accepted_arms(opts, data, arms, phase, lr=None):
    """({arm: train.py's arguments of its first run} for the arms train.py accepts, {arm: why not} for
    the others, each said); UsageError when it refuses them all."""
    accepted, refused = {}, {}
    for arm in arms:
        try:
            accepted[arm] = train.parse_args(train_argv(opts, data, phase, arm, lr, opts.seeds[0]))
        except UsageError as e:
            refused[arm] = str(e)
            say(f"skipping {arm}: {e}")
    if not accepted:
        raise UsageError(f"train.py refuses every configuration: {next(iter(refused.values()))}")
    return accepted, refused


def final_checkpoint(run_dir, num_steps):
    return os.path.join(run_dir, "checkpoints", f"{num_steps:07d}.pt")


def run_state(run_dir, argv, num_steps, key):
    """done (results.json for these arguments and evaluation settings `key`, or recorded as
    diverged), evaluate (trained, not scored as asked), resume (checkpoints short of the last), or new."""
    if not os.path.isdir(run_dir):
        return "new"
    result = read_json(os.path.join(run_dir, "results.json")) or {}
    trained = os.path.isfile(final_checkpoint(run_dir, num_steps))
    if result.get("train_argv") == argv and (result.get("status") == "diverged" or result.get("eval_key") == key
                                             and trained):
        return "done"
    if trained:
        return "evaluate"
    return "resume" if runs.checkpoints_in(run_dir) else "new"


def job_state(opts, data, ctx, phase, arm, lr, seed):
    """(run_dir: train.py's directory of the run, its state as run_state says, train argv) of one run."""
    argv = train_argv(opts, data, phase, arm, lr, seed)
    run_dir = runs.run_dir_of(train.parse_args(argv))
    return run_dir, run_state(run_dir, argv, job_steps(opts, phase), job_key(opts, ctx)), argv


def collect(opts, data, ctx, phase, arm, lr, seed):
    """The run's results.json when it is done, else a record with status missing."""
    run_dir, state, _ = job_state(opts, data, ctx, phase, arm, lr, seed)
    if state == "done":
        return read_json(os.path.join(run_dir, "results.json"))
    return dict(phase=phase, arm=arm, lr=lr, seed=seed, status="missing")


def train_run(argv):
    """Train train.py's argv in this process, continuing its run if it exists (as the same train.py
    command does): (run_dir, None), or (run_dir, why) when the loss became non-finite (train.py stops
    before saving it)."""
    args = train.parse_args(argv)
    try:
        return train.main(args), None
    except FloatingPointError as e:
        return runs.run_dir_of(args), str(e)
    finally:
        for handler in logging.getLogger("train").handlers:
            handler.close()


def eval_curve(run_dir, metric):
    """[(step, value)] of the in-run evaluations in metrics.jsonl (a resumed run's train.py drops the
    records logged after its checkpoint, so each step appears once)."""
    records = plots.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [(r["step"], r["eval"][metric]) for r in records if metric in r.get("eval", {})]


def share_eval_cache(opts, root):
    """train.py caches its evaluation classifier and reference statistics in ROOT/eval-cache: every
    run links it to the grid's one, RESULTS/eval-cache, where the scorer keeps its classifier too."""
    link = os.path.join(root, "eval-cache")
    os.makedirs(root, exist_ok=True)
    if not os.path.lexists(link):
        os.symlink(os.path.join(opts.results_dir, "eval-cache"), link)


def run_job(opts, data, ctx, phase, arm, lr, seed):
    """Train (or continue) one run, read its curve, score it (ctx), write its results.json (diverged
    runs too)."""
    run_dir, state, argv = job_state(opts, data, ctx, phase, arm, lr, seed)
    tag = f"{phase} {arm}{'' if lr is None else f' lr {lr:g}'} seed {seed}"
    if state == "done":
        say(f"{tag}: finished, skipped ({run_dir})")
        return
    base = dict(phase=phase, arm=arm, label=CONFIGS[arm][0], flags=CONFIGS[arm][1], lr=lr, seed=seed,
                train_argv=argv, train_command="python train.py " + shlex.join(argv))
    trained_s = diverged = None
    if state in ("new", "resume"):
        say(f"{tag}: {'continuing ' + run_dir if state == 'resume' else 'training'}: {base['train_command']}")
        share_eval_cache(opts, job_root(opts, phase, arm, lr, seed))
        start = time.time()
        run_dir, diverged = train_run(argv)
        trained_s = time.time() - start
    base.update(run_dir=run_dir, **(dict(curve=eval_curve(run_dir, opts.metric)) if opts.metric else {}))
    if diverged:
        write_json(os.path.join(run_dir, "results.json"), dict(base, status="diverged", message=diverged))
        say(f"{tag}: diverged: {diverged}")
        return
    steps = job_steps(opts, phase)
    result = dict(base, status="ok", eval_key=job_key(opts, ctx), train_seconds_this_call=trained_s,
                  step_time_s=training_record(run_dir, opts.global_batch_size)[2])
    if opts.metric:
        if not result["curve"] or result["curve"][-1][0] != steps:
            raise UsageError(f"{run_dir}: no in-run evaluation of {opts.metric} at step {steps} in metrics.jsonl")
        result["final"] = result["curve"][-1][1]
        say(f"{tag}: {opts.metric} {result['final']:.4g} at step {steps}")
    if ctx is not None:
        say(f"{tag}: scoring {run_dir}")
        result.update(evaluate_run(run_dir, final_checkpoint(run_dir, steps), opts, ctx))
        head = result["samples"][f"{opts.cfg_scales[0]:g}"]
        say(f"{tag}: EMA loss {result['heldout_loss']['ema']['loss']:.4f}, {ctx.fd_name} {head['fd']:.4g}, "
            f"class consistency {head['class_consistency']:.3f}")
    write_json(os.path.join(run_dir, "results.json"), result)


def run_phase(opts, argv, data, ctx, phase, jobs, script):
    """jobs: [(arm, lr, seed)]; runs those not done in this process, or as `SCRIPT ARGV --only
    PHASE:ARM:LR:SEED` subprocesses --parallel at once. Returns (how many it ran, the failures)."""
    todo = [job for job in jobs if job_state(opts, data, ctx, phase, *job)[1] != "done"]
    say(f"{phase}: {len(jobs) - len(todo)} of {len(jobs)} runs finished before, {len(todo)} to run")
    if opts.parallel == 1:
        for job in todo:
            run_job(opts, data, ctx, phase, *job)
        return len(todo), []
    cmds = []
    for arm, lr, seed in todo:
        root = job_root(opts, phase, arm, lr, seed)
        share_eval_cache(opts, root)
        cmds.append((f"{phase} {arm} lr {lr} seed {seed}", [sys.executable, script, *argv, "--only",
                                                            f"{phase}:{arm}:{lr!r}:{seed}"],
                     os.path.join(root, f"{LOG['name']}.log")))
    with ThreadPoolExecutor(opts.parallel) as pool:
        return len(todo), [f for f in pool.map(run_subprocess, cmds) if f]


def parse_only(text, arms):
    """--only PHASE:ARM:LR:SEED (LR None: train.py's default) -> (phase, arm, lr, seed)."""
    parts = text.split(":")
    try:
        phase, arm, lr, seed = parts[0], parts[1], None if parts[2] == "None" else float(parts[2]), int(parts[3])
    except (IndexError, ValueError):
        raise UsageError(f"--only: expected PHASE:ARM:LR:SEED, got {text!r}") from None
    if arm not in arms or len(parts) != 4:
        raise UsageError(f"--only {text}: not a run of this grid")
    return phase, arm, lr, seed


def run_subprocess(job):
    """job: (name, command, log path); run it logging to its file; returns its failure line or None."""
    name, cmd, log_path = job
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    say(f"started {name} (log: {log_path})")
    with open(log_path, "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    failure = f"{name} (exit code {code}; see {log_path})" if code else None
    say(f"FAILED {failure}" if code else f"finished {name}")
    return failure


def finish(paths, failures):
    """Say what was written and which runs failed; the exit code: 1 if any run failed, else 0."""
    for path in paths:
        say(f"wrote {path}")
    if failures:
        say(f"{len(failures)} run(s) failed: " + "; ".join(failures))
        return 1
    return 0
