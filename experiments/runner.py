"""What experiments/ablate.py and experiments/study.py share to run train.py many times: the MP
configurations (CONFIGS), train.py's arguments checked without starting it, finding a run's
directory and its state (done, evaluate, resume, new), training one run with divergence recorded
rather than raised, running many runs as subprocesses N at once, and their command lines' error
handling (bad input: one line, exit code 2).
"""
import contextlib
import io
import logging
import os
import shlex
import subprocess
import sys
import time

import runs
import train
from cli import UsageError
from experiments.evaluate import read_json, say, write_json
from models import MP_SWITCHES


def _configs():
    """name -> (label, train.py flags): vanilla, each switch alone, all MP, all MP + rotation."""
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
    return configs


CONFIGS = _configs()


def train_argv(opts, data, root, cfg, steps, seed, extra):
    """train.py's arguments of one run of a grid: the data, its own --results-dir `root`, the grid's
    model, steps, batch and seed; logs, monitor and 5 checkpoints scaled to the steps; no loader
    workers; `extra` (the caller's flags), then the configuration's flags and --train-args, last."""
    argv = ["--data-path", data.path, "--results-dir", root, "--model", opts.model, "--num-steps", str(steps),
            "--global-batch-size", str(opts.global_batch_size), "--seed", str(seed),
            "--log-every", str(max(1, min(50, steps // 10))), "--monitor-every", str(max(1, steps // 15)),
            "--ckpt-every", str(max(1, -(-steps // 5))), "--num-workers", "0", *extra]
    for key in ("depth", "hidden_size", "num_heads"):
        if getattr(opts, key) is not None:
            argv += ["--" + key.replace("_", "-"), str(getattr(opts, key))]
    return argv + CONFIGS[cfg][1] + shlex.split(opts.train_args)


def parse_train(argv):
    """(train.py's parsed arguments, None), or (None, why train.py refuses them)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return train.parse_args(argv), None
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return None, lines[-1] if lines else "train.py refused the arguments"
    except UsageError as e:
        return None, str(e)


def find_run(root, args):
    """The latest run directory under root whose config.json matches args (as train.py compares)."""
    want = runs.comparable(vars(args))
    found = None
    for run_dir in runs.list_runs(root):
        config = runs.read_config(run_dir)
        if config is not None and all(config.get(k) == v for k, v in want.items()):
            found = run_dir
    return found


def final_checkpoint(run_dir, num_steps):
    return os.path.join(run_dir, "checkpoints", f"{num_steps:07d}.pt")


def run_state(run_dir, argv, num_steps, key):
    """done (results.json for these arguments and evaluation settings `key`, or recorded as
    diverged), evaluate (trained, not scored as asked), resume (checkpoints short of the last), or new."""
    if run_dir is None:
        return "new"
    result = read_json(os.path.join(run_dir, "results.json")) or {}
    trained = os.path.isfile(final_checkpoint(run_dir, num_steps))
    if result.get("train_argv") == argv and result.get("status") == "diverged":
        return "done"
    if result.get("train_argv") == argv and result.get("eval_key") == key and trained:
        return "done"
    if trained:
        return "evaluate"
    return "resume" if runs.checkpoints_in(run_dir) else "new"


def job_state(root, argv, steps, key):
    """(run_dir or None, its state as run_state says) of the run of train.py's argv under root."""
    run_dir = find_run(root, parse_train(argv)[0])
    return run_dir, run_state(run_dir, argv, steps, key)


def result_of(root, argv, steps, key, missing):
    """The run's results.json when it is done, else `missing` marked with status missing."""
    run_dir, state = job_state(root, argv, steps, key)
    return read_json(os.path.join(run_dir, "results.json")) if state == "done" else dict(missing, status="missing")


def train_run(argv, root, resume_dir=None):
    """Train train.py's argv (continuing resume_dir if given) in this process: (run_dir, None), or
    (run_dir, why) when the loss became non-finite (train.py stops before saving it)."""
    extra = ["--resume", resume_dir] if resume_dir else []
    try:
        return train.main(train.parse_args(argv + extra)), None
    except FloatingPointError as e:
        return find_run(root, train.parse_args(argv)), str(e)
    finally:
        for handler in logging.getLogger("train").handlers:
            handler.close()


def train_or_continue(tag, state, argv, root, run_dir, base, extra=lambda run_dir: {}):
    """Train one run (state new) or continue run_dir (resume) in this process: its run directory, or
    None when its loss became non-finite, recorded in its results.json as base + extra(run_dir)."""
    say(f"{tag}: {'continuing ' + run_dir if state == 'resume' else 'training'}: {base['train_command']}")
    run_dir, diverged = train_run(argv, root, run_dir if state == "resume" else None)
    if diverged:
        write_json(os.path.join(run_dir, "results.json"),
                   dict(base, status="diverged", message=diverged, run_dir=run_dir, **extra(run_dir)))
        say(f"{tag}: diverged: {diverged}")
        return None
    return run_dir


def run_jobs(jobs, parallel, script, argv, log_name, run_here):
    """jobs: [(tag, root, ONLY, job)], the runs still to do: run_here(job) for each in this process
    (parallel 1), else `python SCRIPT ARGV --only ONLY` subprocesses, `parallel` at once, each logging
    to ROOT/log_name. Returns the failures, one line each."""
    if parallel == 1:
        for *_, job in jobs:
            run_here(job)
        return []
    return run_subprocesses([(tag, [sys.executable, script, *argv, "--only", only], os.path.join(root, log_name))
                             for tag, root, only, _ in jobs], parallel)


def run_subprocesses(jobs, parallel):
    """jobs: [(name, command, log path)], run `parallel` at once, each logging to its file;
    returns the failures, one line each."""
    queue, running, failures = list(jobs), {}, []
    while queue or running:
        while queue and len(running) < parallel:
            name, cmd, log_path = queue.pop(0)
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            log = open(log_path, "a")
            running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)] = (name, log, log_path)
            say(f"started {name} (log: {log_path})")
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            name, log, log_path = running.pop(proc)
            log.close()
            if proc.returncode:
                failures.append(f"{name} (exit code {proc.returncode}; see {log_path})")
                say(f"FAILED {failures[-1]}")
            else:
                say(f"finished {name}")
    return failures


def finish(paths, failures):
    """Say what was written and which runs failed; the exit code: 1 if any run failed, else 0."""
    for path in paths:
        say(f"wrote {path}")
    if failures:
        say(f"{len(failures)} run(s) failed: " + "; ".join(failures))
        return 1
    return 0
