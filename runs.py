"""The run format that train.py writes and sample.py and experiments/ read: run directories, their
checkpoints and arguments, and the lock that keeps one writer per run.

    RESULTS/<model>-<hash>/config.json      the run's arguments (a resume that changes one rewrites it); the
                                             hash is of the arguments that shape the result (run_dir_of)
                        log.txt, metrics.jsonl
                        checkpoints/NNNNNNN.pt  model, EMAs, optimiser, step, args, manifest, RNG states
                        checkpoints/ema-snapshot-NNNNNNN.pt   power EMAs, for post-hoc EMA
                        lock                 flock()ed by the process writing the run (its pid and host inside);
                                             the kernel drops the lock when that process dies
                        finished             the step at which the run wrote its last plot and grid

Every bad argument, file or state ends as a UsageError: one line, exit code 2.
"""
import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import random
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from cli import UsageError
from data import atomic_write, write_json, write_text
from diffusion import LinearFlow, create_diffusion
from models import MP_SWITCHES, DiT_models

# arguments added later, as checkpoints from before them had them; those added after run names were hashed
# enter the hash only away from their defaults, so the runs of older commands keep their names
SAVED_ARG_DEFAULTS = dict(prediction="eps", objective="ddpm", time_dist="uniform", logit_mean=0.0, logit_std=1.0)
HASHED_SINCE = ("objective", "time_dist", "logit_mean", "logit_std")
FREE_ON_RESUME = ("resume", "results_dir", "preset", "num_workers", "no_progress", "wandb", "vae_path", "data_path",
                  "num_steps", "log_every", "monitor_every", "ckpt_every", "snapshot_every", "sample_steps", "compile",
                  "grad_checkpoint", "sample_every", "eval_every", "eval_samples", "eval_metrics", "eval_reference",
                  "eval_cfg_scale")  # where a run is and how it shows: the weights do not depend on them
T_MAX = {"ddpm": 1000, "flow": 1}  # the model's time input lies in [0, T_MAX]: DDPM's timestep, a flow's t
SEED_RANGE = "in [0, 2**32) (numpy's seeds)"  # every seed flag: 0 <= seed < 2**32
LATEST = "latest"  # a bare --resume: this command's run
CKPT_KEYS = {"model", "ema", "ema_power", "opt", "noise", "rng", "step", "args", "manifest"}  # TrainingState's, args, manifest
SNAPSHOT_KEYS = {"step", "ema_power"}  # a power-EMA snapshot's (train.save)


def config_of(args):
    """The arguments a run records (config.json, checkpoints): vars(args) without private (_) keys."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def saved_args(ckpt):
    """A checkpoint's train.py arguments, with the defaults of those added since it was written (and
    the switches in effect of a run from before config.json recorded them beside "mp")."""
    saved = {**SAVED_ARG_DEFAULTS, **ckpt["args"]}
    return {**saved, **dict.fromkeys(MP_SWITCHES, True)} if saved.get("mp") else saved


def atomic_save(obj, path):
    """torch.save(obj) to path through data.atomic_write: the old file or the complete new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoints_in(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]" * 7 + ".pt")))


def load_checkpoint(path, mmap=False, keys=CKPT_KEYS, what="checkpoint"):
    """A train.py checkpoint (CKPT_KEYS; or a power-EMA snapshot: keys=SNAPSHOT_KEYS, what="snapshot"), on
    the CPU; mmap: its tensors memory-mapped, read where used. UsageError, one line, if unreadable or not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # unpickling errors come in many types
        raise UsageError(f"{path}: cannot read {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    missing = keys - set(ckpt) if isinstance(ckpt, dict) else keys
    if missing:
        raise UsageError(f"{path}: not a train.py {what} (missing {sorted(missing)})")
    return ckpt


def check_finite(tensors, step, run_dir):
    """Stop (on every rank) before a non-finite loss or weight reaches the disk."""
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        ckpts = checkpoints_in(run_dir)
        kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written before it"
        raise FloatingPointError(f"the loss became non-finite by step {step}; {kept} (try a lower --lr or "
                                 f"--grad-clip; `python data.py verify DATA` checks a dataset for NaN and inf)")


def state_of(part):
    """part.state_dict(), a dict of such parts by str(key) (the power EMAs by sigma_rel), or part itself."""
    if hasattr(part, "state_dict"):
        return part.state_dict()
    return {str(k): state_of(v) for k, v in part.items()} if isinstance(part, dict) else part


class TrainingState:
    """The training state, each part named once (EDM2's CheckpointIO): TrainingState(model=..., opt=...,
    step=0). A checkpoint holds {name: state_of(part)}; load_state_dict restores every part in place
    (plain values such as step are replaced)."""

    def __init__(self, **parts):
        vars(self).update(parts)

    def state_dict(self):
        return {name: state_of(part) for name, part in vars(self).items()}

    def load_state_dict(self, ckpt):
        for name, part in vars(self).items():
            if hasattr(part, "load_state_dict"):
                part.load_state_dict(ckpt[name])
            elif isinstance(part, dict):
                for key, sub in part.items():
                    sub.load_state_dict(ckpt[name][str(key)])
            else:
                setattr(self, name, ckpt[name])


class ProcessRNG:
    """The global RNG streams (torch, numpy, python, CUDA) of this process, seeded from (seed, rank,
    world); state_dict gathers those of every rank (call it on every rank); load_state_dict restores
    this rank's, or keeps the fresh streams of a run resumed on another number of processes."""

    def __init__(self, seed, rank, world):
        self.rank, self.world = rank, world
        seed = (seed * world + rank) % 2 ** 32
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def state_dict(self):
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
                 "numpy_pos": int(np.random.get_state()[2]), "python": random.getstate(),
                 "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        states = [state]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, state)
        return states

    def load_state_dict(self, states):
        if len(states) != self.world:
            logging.getLogger("train").info(f"resuming on {self.world} processes from a run on {len(states)}: "
                                            f"random streams reseeded")
            return
        state = states[self.rank]
        torch.set_rng_state(state["torch"])
        np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
        random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def build_model(args, manifest):
    """The DiT of a run's arguments (train.py's, or a checkpoint's saved_args) for its dataset manifest."""
    c, h, w = manifest["shape"]
    patch = int(args.model.split("/")[1])
    if h != w or h % patch:
        raise UsageError(f"{args.data_path}: data shape {manifest['shape']} does not fit {args.model} "
                         f"(square inputs divisible by the patch size {patch} needed)")
    if (args.hidden_size or 0) % (args.num_heads or 1) or (args.hidden_size and not args.num_heads):
        raise UsageError("--hidden-size must be divisible by --num-heads; give both when overriding the width")
    switches = {name: getattr(args, name) for name in MP_SWITCHES}
    overrides = {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads") if getattr(args, k)}
    return DiT_models[args.model](input_size=h, in_channels=c, num_classes=manifest["num_classes"],
                                  mp=args.mp, modulation=args.modulation, t_max=T_MAX[args.objective],
                                  **switches, **overrides)


def training_objective(args):
    """What the run trains: DiT's diffusion (its training_losses) or SiT's linear flow."""
    if args.objective == "flow":
        return LinearFlow(args.time_dist, args.logit_mean, args.logit_std)
    return create_diffusion("", prediction=args.prediction)


def reconcile(args, ckpt, path, manifest):
    """Check a resume against the run's checkpoint; return the log lines of the arguments it changes.
    Step-derived defaults this command did not set (args._derived: warm-up, decay, snapshots) take the
    run's values, so an extended run keeps its lr schedule. A change to an argument the weights depend
    on (anything outside FREE_ON_RESUME) or to the data's shape is refused."""
    saved = saved_args(ckpt)
    for key in getattr(args, "_derived", ()):
        setattr(args, key, saved.get(key, getattr(args, key)))
    changed = {k: (saved[k], v) for k, v in config_of(args).items() if k in saved and saved[k] != v}
    refused = [k for k in changed if k not in FREE_ON_RESUME]
    if refused:
        raise UsageError(f"{path}: the run has {', '.join(f'{k}={changed[k][0]!r}' for k in refused)} but this "
                         f"command asks for {', '.join(f'{k}={changed[k][1]!r}' for k in refused)}; these decide "
                         f"the run's result: pass the run's values, or start a new run")
    for key in ("shape", "num_classes"):
        if ckpt["manifest"].get(key) != manifest.get(key):
            raise UsageError(f"{path}: checkpoint was trained on data with {key} "
                             f"{ckpt['manifest'].get(key)} but the dataset has {manifest.get(key)}")
    if args.num_steps < ckpt["step"]:
        raise UsageError(f"{path}: --num-steps {args.num_steps} is below the checkpoint's step {ckpt['step']}")
    lines = [f"resumed with --{k.replace('_', '-')} {new} (the run had {old}); config.json updated"
             for k, (old, new) in changed.items() if k not in ("resume", "results_dir")]
    if "num_steps" in changed:
        lines.append(f"lr schedule kept: warm-up {args.warmup_steps}, decay {args.decay_steps} steps")
    return lines


def run_name(args):
    prefix = "MaP-" if args.mp else ""
    size = "".join(f"-{k[0]}{v}" for k, v in (("depth", args.depth), ("width", args.hidden_size),
                                              ("heads", args.num_heads)) if v)
    return f"{prefix}{args.model.replace('/', '-')}{size}"


def run_dir_of(args):
    """RESULTS/<model>-<hash>: the run of these arguments, named from those that shape its result (all
    but FREE_ON_RESUME, with the data's path and the step count), so the same command finds it again."""
    shaping = {k: v for k, v in config_of(args).items()
               if k not in FREE_ON_RESUME and not (k in HASHED_SINCE and v == SAVED_ARG_DEFAULTS[k])}
    shaping.update(data=args.data_path and os.path.abspath(args.data_path), num_steps=args.num_steps)
    digest = hashlib.sha1(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(args.results_dir, f"{run_name(args)}-{digest}")


def write_config(run_dir, args):
    write_json(os.path.join(run_dir, "config.json"), config_of(args), indent=2)


def finished(run_dir, num_steps):
    """Whether the run wrote its plots and grid at num_steps or later."""
    try:
        with open(os.path.join(run_dir, "finished")) as f:
            return int(f.read()) >= num_steps
    except (OSError, ValueError):
        return False


def mark_finished(run_dir, step):
    write_text(os.path.join(run_dir, "finished"), f"{step}\n")


def claim_run(args):
    """(run directory, checkpoint to continue from or None, its RunLock or None, finished): --resume PATH
    names a run directory or checkpoint; otherwise the run is this command's (run_dir_of), continued
    if it exists and has not finished (said when it has), else created later by create_run (no lock yet)."""
    if args.resume not in (None, LATEST):
        if os.path.isfile(args.resume):
            folder = os.path.dirname(os.path.abspath(args.resume))
            if os.path.basename(folder) != "checkpoints":
                raise UsageError(f"{args.resume}: not in a run's checkpoints/ folder; name the run directory "
                                 f"or a checkpoint inside it")
            run_dir, ckpt = os.path.dirname(folder), args.resume
        else:
            run_dir, ckpt = args.resume, (checkpoints_in(args.resume) or [None])[-1]
            if ckpt is None:
                raise UsageError(f"{args.resume}: no checkpoint found (expected a run directory with "
                                 f"checkpoints/NNNNNNN.pt, or a checkpoint file)")
        return run_dir, ckpt, RunLock(run_dir), False
    run_dir = run_dir_of(args)
    done = finished(run_dir, args.num_steps)
    unfinished = os.path.isdir(run_dir) and not done
    if args.resume == LATEST and not unfinished:
        raise UsageError(f"--resume: no unfinished run with these arguments in {args.results_dir}; "
                         f"name one (--resume RUN_DIR) or drop --resume to start a new run")
    if done:
        print(f"{run_dir}: this command's run has finished its {args.num_steps} steps; nothing to do "
              f"(--resume {run_dir} --num-steps N extends it)")
    if not unfinished:
        return run_dir, None, None, done
    lock = RunLock(run_dir)
    return run_dir, (checkpoints_in(run_dir) or [None])[-1], lock, False


def create_run(run_dir, args):
    """Create the run directory (with checkpoints/) and return its RunLock. Refused if the run
    appeared since claim_run (the same command started twice)."""
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    except OSError as e:
        raise UsageError(f"--results-dir {args.results_dir}: cannot create a run there ({e.strerror or e})") from None
    lock = RunLock(run_dir)
    if checkpoints_in(run_dir):
        lock.release()
        raise UsageError(f"{run_dir}: the run of this command appeared while this one started; rerun the same "
                         f"command to continue it")
    return lock


class RunLock:
    """An exclusive flock on RUN/lock, held while a process writes the run. A second writer gets a
    UsageError naming the holder; a lock left by a killed process does not block (the kernel releases
    it with the process)."""

    def __init__(self, run_dir):
        path = os.path.join(run_dir, "lock")
        try:
            self.file = open(path, "a+")
        except OSError as e:
            raise UsageError(f"{run_dir}: cannot lock the run ({e.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            self.file.close()
            raise UsageError(f"{run_dir}: in use by {holder} (it holds {path}); wait for it to finish, "
                             f"or stop it and rerun the same command to continue the run") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def holder(self):
        """'pid P on HOST' of the process holding the lock, which writes it just after taking the lock:
        read again for up to a second when a reader comes in between (empty file)."""
        for _ in range(100):
            self.file.seek(0)
            holder = self.file.read().strip()
            if holder:
                return holder
            time.sleep(0.01)
        return "another process"

    def release(self):
        self.file.close()  # closing drops the flock


@contextlib.contextmanager
def folder_lock(folder, create=False):
    """An exclusive flock on the folder itself while the block runs: processes that share a folder
    (a results dir, an evaluation cache, a sweep's or study's output) take turns at what they
    write there. A process that has to wait says once on stderr for what. The kernel drops the lock
    of a process that dies. Without create, a folder that does not exist yet is not locked (nothing
    there to share). Not reentrant: a process must not lock one folder twice."""
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY) if os.path.isdir(folder) else None
    except OSError as e:
        raise UsageError(f"{folder}: cannot create or open it ({e.strerror or e})") from None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that writes in {folder}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)
