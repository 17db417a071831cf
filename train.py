"""Train DiT / MaP-DiT on a latent (or pixel) dataset, on one process or many with torchrun.

    python train.py                                    # built-in demo: shapes, a few minutes on a CPU
    python train.py --data-path LATENTS --model DiT-S/2 --mp
    torchrun --nproc_per_node=8 train.py --data-path LATENTS --model DiT-XL/2 --mp

A run lives in results/NNN-<model>/: config.json, log.txt, metrics.jsonl, checkpoints/, tb/ (TensorBoard:
`tensorboard --logdir results`), samples/ (a grid every --sample-every steps), magnitudes.png and curves.png. Re-running the same command continues the latest
unfinished run with the same arguments from its last checkpoint; --resume PATH picks one (a larger
--num-steps extends it with its learning-rate schedule kept). One process writes a run at a time.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import runs
from cli import ArgumentParser, UsageError, from_rank_0, run_command, setup_distributed
from data import LatentDataset, make_demo_dataset, read_manifest
from diffusion import create_diffusion
from ema import ema_update, frozen_copy, power_beta, sigma_rel_to_gamma, valid_sigma_rel
from models import MODULATIONS, MP_SWITCHES, DiT_models
from monitor import block_magnitudes
from mp_layers import force_normalize_
from plots import plot_curves, plot_magnitudes, read_metrics
from progress import progress
from trackers import Trackers, wandb_installed
import watch
from download import open_decoder
from watch import Evaluation, SampleGrids, eval_metrics_for, sampling_weights

DEFAULTS = dict(model="DiT-S/2", prediction="eps", mp=False, num_steps=400_000, global_batch_size=256,
                log_every=100, monitor_every=1000, ckpt_every=50_000, num_workers=4, sample_every=10_000,
                sample_steps=50, eval_every=0, eval_samples=10_000)
DEMO = dict(DEFAULTS, model="DiT-XS/4", mp=True, prediction="v", num_steps=1000, global_batch_size=64, hflip=False,
            log_every=50, monitor_every=100, ckpt_every=500, num_workers=0, sample_every=250, sample_steps=25,
            eval_every=250, eval_samples=256)
DEMO_SIZE = dict(depth=4, hidden_size=128, num_heads=4)  # for the demo's default model only
AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
AT_LEAST_0 = ("at least 0", lambda v: v >= 0)
RANGES = dict(  # every numeric flag: (its valid range in words, the test); floats must be finite too
    depth=AT_LEAST_1, hidden_size=AT_LEAST_1, num_heads=AT_LEAST_1, num_steps=AT_LEAST_1,
    global_batch_size=AT_LEAST_1, grad_accum=AT_LEAST_1, snapshot_every=AT_LEAST_1, log_every=AT_LEAST_1,
    monitor_every=AT_LEAST_1, ckpt_every=AT_LEAST_1, warmup_steps=AT_LEAST_0, decay_steps=AT_LEAST_0,
    num_workers=AT_LEAST_0,
    lr=("a finite number above 0", lambda v: 0 < v < math.inf),
    grad_clip=("a finite number, at least 0 (0 = off)", lambda v: 0 <= v < math.inf),
    seed=(runs.SEED_RANGE, lambda v: 0 <= v < 2 ** 32),
    ema_decay=("in [0, 1)", lambda v: 0 <= v < 1),
    ema_sigma_rels=("in (0, 0.3002] (the relative widths a power EMA can have)", valid_sigma_rel),
    sample_steps=("in [1, 1000] (the training diffusion steps)", lambda v: 1 <= v <= 1000),
    sample_every=("at least 0 (0 = no grids)", lambda v: v >= 0), eval_every=("at least 0 (0 = off)", lambda v: v >= 0),
    eval_samples=("at least 2", lambda v: v >= 2), eval_cfg_scale=("a finite number", lambda v: abs(v) < math.inf),
)
STEP_DERIVED = ("warmup_steps", "decay_steps", "snapshot_every")  # defaults computed from --num-steps


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("data and model")
    g.add_argument("--data-path", help="dataset directory (data.py format); omit for the built-in demo")
    g.add_argument("--results-dir", default="results", help="parent of the run directories")
    g.add_argument("--model", metavar="NAME",
                   help="one of DiT-{XS,S,B,L,XL}/{2,4,8} (default DiT-S/2; the demo uses DiT-XS/4 at "
                        "depth 4, width 128, 4 heads)")
    g.add_argument("--depth", type=int, help="override the model's number of blocks")
    g.add_argument("--hidden-size", type=int, help="override the model's width")
    g.add_argument("--num-heads", type=int, help="override the model's number of attention heads")
    g.add_argument("--modulation", choices=list(MODULATIONS), default="adaln",
                   help="block conditioning: " + "; ".join(f"{k}: {v}" for k, v in MODULATIONS.items()))
    g.add_argument("--prediction", choices=["eps", "v", "x0"],
                   help="what the model predicts: eps (DiT; the default) or v (the demo: well posed at high "
                        "noise, where eps-prediction needs many steps to learn) or x0")
    g.add_argument("--vae-path", metavar="DIR",
                   help="latent data: the VAE (a save_pretrained folder) that decodes the grids' and evaluations' "
                        "samples (default: the one the dataset's manifest names, else its hub id)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for pixel datasets; off for latent datasets, "
                        "where a mirrored latent only approximates the latent of the mirrored image, and for "
                        "the demo); for flipped latents encode them with download.py imagenet --flip")
    g = p.add_argument_group("magnitude preservation (all off = original DiT)")
    g.add_argument("--mp", action=argparse.BooleanOptionalAction,
                   help="MaP-DiT: every switch below on (default off; on for the demo)")
    for name, description in MP_SWITCHES.items():
        g.add_argument("--" + name.replace("_", "-"), action="store_true", help=description)
    g = p.add_argument_group("optimisation")
    g.add_argument("--num-steps", type=int, help="optimiser steps (default 400000; demo 1000)")
    g.add_argument("--global-batch-size", type=int, help="images per step over all processes (default 256)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float,
                   help="peak learning rate (default 1e-4 vanilla, 1e-2 with weight norm; demo 3e-3 and 2e-2)")
    g.add_argument("--warmup-steps", type=int,
                   help="linear warm-up (default 0 vanilla; weight norm min(1000, num_steps / 10))")
    g.add_argument("--decay-steps", type=int,
                   help="EDM2 decay lr / sqrt(max(step / N, 1)); 0 = constant (default 0 vanilla; weight norm "
                        "min(20000, num_steps / 3))")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto = bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in backward (DiT-XL/2 at batch 256 on one 80 GB GPU)")
    g.add_argument("--seed", type=int, default=0, help="all randomness of the run, in [0, 2**32) (default 0)")
    g = p.add_argument_group("EMA")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="classic constant-decay EMA (DiT), in [0, 1)")
    g.add_argument("--ema-sigma-rels", type=float, nargs="*", default=[0.05, 0.10],
                   help="power-function EMAs (EDM2) by relative width, each in (0, 0.3002]")
    g.add_argument("--snapshot-every", type=int, help="save power-EMA snapshots for post-hoc EMA (default num_steps / 10)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, help="steps between log lines (default 100; demo 50)")
    g.add_argument("--monitor-every", type=int,
                   help="steps between activation / weight RMS records (default 1000; demo 100)")
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default 50000; demo 500)")
    g.add_argument("--resume", nargs="?", const=runs.LATEST, metavar="PATH",
                   help="continue a run: its directory or a checkpoint file (a larger --num-steps extends it, "
                        "keeping its lr schedule); bare --resume: the latest unfinished run in --results-dir "
                        "with these arguments, refused if there is none (without --resume, such a run is "
                        "continued too, and a new one started if there is none)")
    g.add_argument("--num-workers", type=int, help="data loader processes (default 4; demo 0)")
    g.add_argument("--sample-every", type=int, metavar="N",
                   help="steps between sample grids (fixed noise and labels, from the weights sample.py uses) in "
                        "RUN/samples/ and the trackers, and one at the end; 0 = no grids (default 10000; demo 250)")
    g.add_argument("--sample-steps", type=int,
                   help="DDIM steps of the sample grids and evaluation samples, at most 1000 (default 50; demo 25)")
    g = p.add_argument_group("evaluation during training (FID curve)")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="steps between evaluations of the sampling weights, and one at the end; 0 = none (default 0; "
                        "demo 250)")
    g.add_argument("--eval-samples", type=int, metavar="K",
                   help="samples per evaluation, fixed noise and labels uniform over the classes (default 10000; "
                        "demo 256)")
    g.add_argument("--eval-metrics", nargs="+", metavar="M",
                   help="metrics of evaluation.py: fid sfid is pr fd_dinov2, or fd_classifier (a small classifier "
                        "trained on the pixel data, cached); default fid if the Inception weights are found, else "
                        "fd_classifier (pixel data)")
    g.add_argument("--eval-reference", metavar="PATH",
                   help="reference images: ADM reference batch .npz, image folder or pixel dataset (default: the "
                        "training data; needed for latent data); statistics cached in RESULTS/eval-cache/")
    g.add_argument("--eval-cfg-scale", type=float, default=1.0, metavar="S",
                   help="guidance of the evaluation samples (default 1: none)")
    g = p.add_argument_group("watching the run")
    g.add_argument("--wandb", metavar="PROJECT",
                   help="also log to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline "
                        "works without a network); TensorBoard events always go to RUN/tb/")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (also TQDM_DISABLE=1; with the output redirected it is a plain line "
                        "every 30 s)")
    return fill_defaults(p.parse_args(argv))


def fill_defaults(args):
    """Defaults that depend on other arguments (demo or not, MP or vanilla), then sanity checks.
    args._derived names the step-derived defaults filled here (a resumed run keeps its own)."""
    if args.data_path is None and args.mp is None and any(getattr(args, name) for name in MP_SWITCHES):
        args.mp = False  # the demo with --use-... switches trains those switches, not all of them (--mp)
    if args.data_path is None and args.model is None:
        for k, v in DEMO_SIZE.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in (DEMO if args.data_path is None else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.hflip is None:  # a mirrored latent only approximates the latent of the mirrored image
        args.hflip = read_manifest(args.data_path)["kind"] == "pixel"
    if args.vae_path and not os.path.isdir(args.vae_path):
        raise UsageError(f"--vae-path {args.vae_path}: not a directory (a VAE saved with save_pretrained)")
    if args.model not in DiT_models:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(DiT_models)}")
    check_ranges(args)
    if args.wandb and not wandb_installed():
        raise UsageError("--wandb needs the optional package wandb: pip install wandb (or drop --wandb)")
    if args.eval_every:
        check_evaluation(args)
    weight_norm = args.mp or args.use_weight_normalization
    args._derived = [k for k in STEP_DERIVED if getattr(args, k) is None]
    if args.lr is None:  # the demo's short runs: 2e-2 (tried: 1e-2 gives blurrier shapes); vanilla 3e-3 (the MP study)
        demo = args.data_path is None
        args.lr = (2e-2 if demo else 1e-2) if weight_norm else (3e-3 if demo else 1e-4)
    if args.warmup_steps is None:
        args.warmup_steps = min(1000, args.num_steps // 10) if weight_norm else 0
    if args.decay_steps is None:
        args.decay_steps = min(20_000, args.num_steps // 3) if weight_norm else 0
    if args.snapshot_every is None:
        args.snapshot_every = max(args.num_steps // 10, 1)
    if args.use_forced_weight_normalization and not weight_norm:
        raise UsageError("--use-forced-weight-normalization needs --use-weight-normalization (or --mp): "
                         "forced normalisation alone leaves rows at norm sqrt(fan_in) and activations explode")
    return args


def check_evaluation(args):
    """--eval-*: a reference and metrics that can be computed (their default filled in)."""
    kind = "pixel" if args.data_path is None else read_manifest(args.data_path)["kind"]
    if kind != "pixel" and not args.eval_reference:
        raise UsageError("--eval-every on latent data needs --eval-reference (an ADM reference batch .npz or a "
                         "folder of images)")
    if args.eval_reference and not os.path.exists(args.eval_reference):
        raise UsageError(f"--eval-reference {args.eval_reference}: no such file or folder")
    try:
        args.eval_metrics = eval_metrics_for(args.eval_metrics, kind)
    except (ValueError, UsageError) as e:
        raise UsageError(f"--eval-metrics: {e}") from None


def check_ranges(args):
    """Every numeric flag in its range (RANGES): one line naming the flag, its value and the range."""
    for name, (valid, ok) in RANGES.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not ok(v):
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be {valid}")


def learning_rate(step, args):
    """Linear warm-up to lr, then lr / sqrt(max(step / decay_steps, 1)) (EDM2) if decay_steps > 0."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
    return lr / math.sqrt(max(step / args.decay_steps, 1.0)) if args.decay_steps else lr


def run_name(args):
    prefix = "MaP-" if args.mp else ""
    size = "".join(f"-{k[0]}{v}" for k, v in (("depth", args.depth), ("width", args.hidden_size),
                                              ("heads", args.num_heads)) if v)
    return f"{prefix}{args.model.replace('/', '-')}{size}"


def make_logger(run_dir, rank):
    logger = logging.getLogger("train")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.FileHandler(os.path.join(run_dir, "log.txt")), logging.StreamHandler()):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


#################################################################################
#                                  Training                                     #
#################################################################################

def open_dataset(args):
    if args.data_path is None:
        try:
            path = make_demo_dataset(os.path.join(args.results_dir, "demo-data"))
        except OSError as e:
            raise UsageError(f"--results-dir {args.results_dir}: cannot write the demo data there "
                             f"({e.strerror or e})") from None
    else:
        path = args.data_path
    return LatentDataset(path, hflip=args.hflip)


def main(args):
    rank, world, device = setup_distributed()
    with contextlib.ExitStack() as cleanup:
        if world > 1:
            cleanup.callback(dist.destroy_process_group)
        run_dir, resume, lock = runs.claim_run(args) if rank == 0 else (None, None, None)
        if lock:
            cleanup.callback(lock.release)
        run_dir, resume = from_rank_0((run_dir, resume))
        micro, rem = divmod(args.global_batch_size, world * args.grad_accum)
        if rem or micro == 0:
            raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                             f"processes ({world}) x --grad-accum ({args.grad_accum})")
        ckpt = runs.load_checkpoint(resume) if resume else None
        dataset = open_dataset(args)
        manifest = dataset.manifest
        changes = runs.reconcile(args, ckpt, resume, manifest) if ckpt else {}
        if len(dataset) < micro * world:
            raise UsageError(f"{args.data_path}: {len(dataset)} items, fewer than one global batch ({micro * world})")
        torch.manual_seed(args.seed)  # the same initial weights on every rank and for any world size
        model = runs.build_model(args, manifest).to(device)
        vae = open_vae(args, manifest, rank, world, device)
        if args.eval_every:
            check_reference(args, dataset, vae, rank, world)
        if rank == 0 and run_dir is None:
            run_dir, lock = runs.create_run(args, run_name(args))
            cleanup.callback(lock.release)
        run_dir = from_rank_0(run_dir)
        return train(args, rank, world, device, run_dir, dataset, model, ckpt, changes, micro, vae)


def first_error(error, world):
    """The first rank's error message (or None) on every rank, so that all ranks refuse together."""
    if world == 1:
        return error
    errors = [None] * world
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def open_vae(args, manifest, rank, world, device):
    """The VAE that decodes a latent run's samples, on the ranks that decode: rank 0 for the grids,
    every rank for the evaluations (None elsewhere and for pixel data). A VAE that cannot be opened
    is refused on every rank before training, in one line."""
    needed = manifest["kind"] == "latent" and (args.eval_every or (args.sample_every and rank == 0))
    vae, error = None, None
    if needed:
        try:
            vae = open_decoder(manifest, args.vae_path).to(device)
        except UsageError as e:
            error = str(e)
    error = first_error(error, world)
    if error:
        raise UsageError(f"cannot decode the run's samples for its grids and evaluations: {error} (or train "
                         f"without them: --sample-every 0 --eval-every 0)")
    return vae


def check_reference(args, dataset, vae, rank, world):
    """Refuse on every rank, before training, an evaluation whose reference cannot serve it (rank 0 looks)."""
    _, h, w = dataset.manifest["shape"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1  # the VAE's downsampling
    error = None
    if rank == 0:
        try:
            watch.check_reference(args.eval_reference or dataset.path, args.eval_metrics, args.eval_samples,
                                  (h * scale, w * scale, 3))
        except ValueError as e:
            error = str(e)
    error = first_error(error, world)
    if error:
        raise UsageError(error)


def train(args, rank, world, device, run_dir, dataset, model, ckpt, changes, micro, vae):
    """The training loop of main: from ckpt (or step 0) to --num-steps in run_dir; returns run_dir."""
    manifest = dataset.manifest
    logger = make_logger(run_dir, rank)
    seed = (args.seed * world + rank) % 2 ** 32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    model.grad_checkpoint = args.grad_checkpoint
    s = SimpleNamespace(model=model, ema=frozen_copy(model), world=world, dataset=dataset,
                        power_emas={sr: frozen_copy(model) for sr in args.ema_sigma_rels},
                        gammas={sr: sigma_rel_to_gamma(sr) for sr in args.ema_sigma_rels},
                        noise=BatchNoise(args.seed, rank, world, device),
                        diffusion=create_diffusion("", prediction=args.prediction))
    kernel = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    if model.switches.use_weight_normalization:
        s.opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99), **kernel)
    else:
        s.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, **kernel)
    step = 0
    if ckpt is not None:
        step = load_state(s, ckpt, rank, logger)
        for name, (old, new) in changes.items():
            logger.info(f"resumed with --{name.replace('_', '-')} {new} (the run had {old}); config.json updated")
        if "num_steps" in changes:
            logger.info(f"lr schedule kept: warm-up {args.warmup_steps}, decay {args.decay_steps} steps")
        if rank == 0 and changes:
            runs.write_config(run_dir, args)
    if rank == 0:
        runs.drop_records_after(run_dir, step)  # logged after the checkpoint: they come again
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{args.model}{' (MaP)' if args.mp else ''}: {n_params:,} parameters; data {manifest['shape']} "
                f"x {len(dataset):,} items, {manifest['num_classes']} classes; run dir {run_dir}")
    if not args.mp and any(getattr(args, name) for name in MP_SWITCHES):
        logger.info("switches on: " + " ".join("--" + n.replace("_", "-") for n in MP_SWITCHES if getattr(args, n)))
    trackers = Trackers(run_dir, runs.config_of(args), args.wandb, start_step=step, enabled=rank == 0)
    grids = SampleGrids(run_dir, manifest, args.prediction, args.sample_steps, args.seed, vae) \
        if args.sample_every and rank == 0 else None
    cache = os.path.join(args.results_dir, "eval-cache")
    evaluator = Evaluation.for_run(args, dataset, cache, device, logger.info, vae) if args.eval_every else None

    s.train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:
        s.train_model = torch.compile(s.train_model)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    s.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
    s.batches = endless(loader, sampler, step * args.grad_accum, len(sampler) // micro, micro)

    model.train()
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a") if rank == 0 else None
    magnitude_records = runs.read_records(run_dir, "act_rms") if rank == 0 else []
    bar = progress(total=args.num_steps, initial=step, unit="step", enabled=rank == 0 and not args.no_progress)
    catch_up(args, step, s, grids, evaluator, trackers, metrics_file, logger, run_dir)
    window_loss, window_steps, window_start = torch.zeros(3, device=device), 0, time.time()
    while step < args.num_steps:
        logging_step = (step + 1) % args.log_every == 0 or step + 1 == args.num_steps
        lr, grad_norm, (x, t, y, noise) = optimiser_step(s, args, step, window_loss, logging_step)
        step += 1
        window_steps += 1
        bar.update(1)

        if logging_step:
            if world > 1:
                dist.all_reduce(window_loss)
                window_loss /= world
            mean = (window_loss / window_steps).tolist()
            check_finite([window_loss], world, step, run_dir)
            elapsed = time.time() - window_start
            record = dict(step=step, loss=mean[0], mse=mean[1], vb=mean[2], lr=lr, grad_norm=grad_norm.item(),
                          steps_per_sec=window_steps / elapsed,
                          images_per_sec=window_steps * args.global_batch_size / elapsed)
            bar.set_postfix(loss=f"{mean[0]:.4f}", img_s=f"{record['images_per_sec']:.1f}")
            if rank == 0:
                write_record(metrics_file, record)
                logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                trackers.scalars({f"train/{k}": v for k, v in record.items() if k != "step"}, step)
                trackers.flush()  # TensorBoard shows each log line's values while the run trains
            window_loss.zero_()
            window_steps, window_start = 0, time.time()

        if rank == 0 and (step % args.monitor_every == 0 or step == args.num_steps):
            model.eval()
            with s.autocast():
                acts, weights = block_magnitudes(model, s.diffusion.q_sample(x, t, noise), t, y)  # as trained
            model.train()
            magnitude_records.append(dict(step=step, act_rms=acts, weight_rms=weights))
            write_record(metrics_file, magnitude_records[-1])
            trackers.scalars({f"{key}/block{b:02d}": v for key in ("act_rms", "weight_rms")
                              for b, v in enumerate(magnitude_records[-1][key])}, step)
        save(s, args, step, window_loss, run_dir, manifest, rank, logger)
        paused = time.time()
        watch_step(args, step, s, grids, evaluator, trackers, metrics_file, logger)
        window_start += time.time() - paused  # grids and evaluations do not count against images/s
    bar.close()
    trackers.close()
    if rank == 0:
        metrics_file.close()
        plot_magnitudes(magnitude_records, os.path.join(run_dir, "magnitudes.png"))
        plot_curves(read_metrics(os.path.join(run_dir, "metrics.jsonl")), os.path.join(run_dir, "curves.png"))
        logger.info(f"plots: {os.path.join(run_dir, 'magnitudes.png')}, {os.path.join(run_dir, 'curves.png')}; "
                    f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tb')}")
        runs.mark_finished(run_dir, step)
    return run_dir


def load_state(s, ckpt, rank, logger):
    """Model, EMAs, optimiser, noise and RNG states from a checkpoint; returns its step."""
    s.model.load_state_dict(ckpt["model"])
    s.ema.load_state_dict(ckpt["ema"])
    for sr, e in s.power_emas.items():
        e.load_state_dict(ckpt["ema_power"][str(sr)])
    s.opt.load_state_dict(ckpt["opt"])
    s.noise.generator.set_state(ckpt["noise"])
    if len(ckpt["rng"]) == s.world:
        runs.set_rng_state(ckpt["rng"][rank])
    else:
        logger.info(f"resuming on {s.world} processes from a run on {len(ckpt['rng'])}: random streams reseeded")
    logger.info(f"resumed at step {ckpt['step']}")
    return ckpt["step"]


def optimiser_step(s, args, step, window_loss, need_norm):
    """Optimiser step step + 1 over --grad-accum micro-batches (their mean [loss, mse, vb] added to
    window_loss), then the EMA updates. Returns (lr, gradient norm or None, the last micro-batch's
    (x0, t, y, noise), so the monitor can see x_t = q_sample(x0, t, noise) as the model did)."""
    lr = learning_rate(step, args)
    for group in s.opt.param_groups:
        group["lr"] = lr
    world, dataset = s.world, s.dataset
    for i in range(args.grad_accum):
        raw, y = next(s.batches)
        n = raw.shape[0] * world  # per-sample randomness is drawn for the global micro-batch
        eps = s.noise.randn(n, *dataset.shape) if dataset.kind == "latent" else None
        flip = s.noise.rand(n) < 0.5 if dataset.hflip else None
        x = dataset.draw(raw.to(s.noise.device, non_blocking=True), eps, flip)
        y = y.to(s.noise.device, non_blocking=True)
        t = s.noise.randint(s.diffusion.num_timesteps, n)
        drop = (s.noise.rand(n) < s.model.y_embedder.dropout_prob).long()
        noise = s.noise.randn(n, *x.shape[1:])
        sync = world > 1 and i < args.grad_accum - 1
        with (s.train_model.no_sync() if sync else contextlib.nullcontext()), s.autocast():
            losses = s.diffusion.training_losses(s.train_model, x, t, dict(y=y, force_drop_ids=drop), noise=noise)
        loss = losses["loss"].mean()
        (loss / args.grad_accum).backward()
        window_loss += torch.stack([loss.detach(), losses["mse"].mean().detach(),
                                    losses["vb"].mean().detach()]) / args.grad_accum
    grad_norm = None
    if args.grad_clip or need_norm:  # the norm costs a pass over the gradients: only when used
        grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), args.grad_clip or float("inf"))
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    force_normalize_(s.model)
    ema_update(s.ema, s.model, args.ema_decay)
    for sr, e in s.power_emas.items():
        ema_update(e, s.model, power_beta(step + 1, s.gammas[sr]))
    return lr, grad_norm, (x, t, y, noise)


def watch_step(args, step, s, grids, evaluator, trackers, metrics_file, logger):
    """At --sample-every steps and the last a sample grid (rank 0), at --eval-every steps and the last an
    evaluation (every rank samples and extracts features; rank 0 records), both from the sampling weights."""
    last = step == args.num_steps
    weights = sampling_weights(s.ema, s.power_emas)
    if grids and (step % args.sample_every == 0 or last):
        draw_grid(step, weights, grids, trackers, logger)
    if evaluator and (step % args.eval_every == 0 or last):
        evaluate_at(args, step, weights, evaluator, trackers, metrics_file, logger)


def catch_up(args, step, s, grids, evaluator, trackers, metrics_file, logger, run_dir):
    """On resume at step, what a run killed during its grids or evaluations missed: the grid of step,
    and every evaluation due at or before step without a record, made from step's weights or from the
    checkpoint of its own step when that is on disk (else said in the log)."""
    weights = sampling_weights(s.ema, s.power_emas)
    due = lambda every: step % every == 0 or step == args.num_steps  # noqa: E731
    if grids is not None and step and due(args.sample_every) and not os.path.exists(grids.path(step)):
        draw_grid(step, weights, grids, trackers, logger)
    if evaluator is None or not step:
        return
    wanted = set(range(args.eval_every, step + 1, args.eval_every)) | ({step} if due(args.eval_every) else set())
    done = {r["step"] for r in runs.read_records(run_dir, "eval")} if metrics_file is not None else set()
    for k in from_rank_0(sorted(wanted - done)):
        path = os.path.join(run_dir, "checkpoints", f"{k:07d}.pt")
        if k == step:
            evaluate_at(args, k, weights, evaluator, trackers, metrics_file, logger)
        elif os.path.isfile(path):
            ckpt = runs.load_checkpoint(path)
            old = frozen_copy(weights)
            old.load_state_dict(ckpt["ema_power"][str(max(s.power_emas))] if s.power_emas else ckpt["ema"])
            evaluate_at(args, k, old, evaluator, trackers, metrics_file, logger)
        else:
            logger.info(f"the evaluation at step {k} was interrupted and no checkpoint of step {k} is left to "
                        f"make it from; its point of the curve stays missing")


def draw_grid(step, weights, grids, trackers, logger):
    start = time.time()
    grid, path = grids(weights, step)
    trackers.image("samples", grid, step)
    trackers.flush()
    logger.info(f"sample grid: {path} ({time.time() - start:.1f} s)")


def evaluate_at(args, step, weights, evaluator, trackers, metrics_file, logger):
    """Evaluate weights (every rank); rank 0 records the metrics as step's in metrics.jsonl and the trackers."""
    start = time.time()
    results = evaluator(weights)
    if metrics_file is None:
        return
    record = dict(step=step, eval={k: v for k, v in results.items() if k in args.eval_metrics or k in
                                   ("precision", "recall")}, samples=args.eval_samples, seconds=time.time() - start)
    write_record(metrics_file, record)
    logger.info(f"evaluation at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in record["eval"].items())
                + f" ({args.eval_samples} samples, {record['seconds']:.0f} s)")
    trackers.scalars({f"eval/{k}": v for k, v in record["eval"].items()}, step)
    trackers.flush()


def save(s, args, step, window_loss, run_dir, manifest, rank, logger):
    """At --snapshot-every steps a power-EMA snapshot, at --ckpt-every steps and the last a checkpoint;
    both only after the loss and the weights are checked finite (no NaN reaches disk)."""
    snapshot = step % args.snapshot_every == 0
    checkpoint = step % args.ckpt_every == 0 or step == args.num_steps
    if not (snapshot or checkpoint):
        return
    modules = [s.model, s.ema, *s.power_emas.values()]
    check_finite([window_loss, *(p for m in modules for p in m.parameters())], s.world, step, run_dir)
    power_emas = {str(sr): e.state_dict() for sr, e in s.power_emas.items()}
    if rank == 0 and snapshot:
        runs.atomic_save({"step": step, "ema_power": power_emas},
                         os.path.join(run_dir, "checkpoints", f"ema-snapshot-{step:07d}.pt"))
    if checkpoint:
        rngs = [runs.rng_state()]
        if s.world > 1:
            rngs = [None] * s.world
            dist.all_gather_object(rngs, runs.rng_state())
        if rank == 0:
            runs.atomic_save(dict(model=s.model.state_dict(), ema=s.ema.state_dict(), ema_power=power_emas,
                                  opt=s.opt.state_dict(), step=step, args=runs.config_of(args), manifest=manifest,
                                  rng=rngs, noise=s.noise.generator.get_state()),
                             os.path.join(run_dir, "checkpoints", f"{step:07d}.pt"))
            logger.info(f"saved checkpoint at step {step}")


def check_finite(tensors, world, step, run_dir):
    """Stop (on every rank) before a non-finite loss or weight reaches the disk."""
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        ckpts = runs.checkpoints_in(run_dir)
        kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written before it"
        raise FloatingPointError(f"the loss became non-finite by step {step}; {kept} (try a lower --lr or "
                                 f"--grad-clip; `python data.py verify DATA` checks a dataset for NaN and inf)")


def write_record(metrics_file, record):
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


class BatchNoise:
    """Per-sample random numbers (posterior eps, flips, timesteps, diffusion noise, label dropout),
    drawn for the whole global batch from one generator seeded alike on every rank; each rank keeps
    rows rank::world, the samples DistributedSampler deals it. Every rank gets different noise and
    a run gives the same result on any number of processes."""

    def __init__(self, seed, rank, world, device):
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rows, self.device = slice(rank, None, world), device

    def randn(self, n, *shape):
        return torch.randn((n, *shape), generator=self.generator, device=self.device)[self.rows]

    def rand(self, n):
        return torch.rand(n, generator=self.generator, device=self.device)[self.rows]

    def randint(self, high, n):
        return torch.randint(0, high, (n,), generator=self.generator, device=self.device)[self.rows]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through (for exact resume)."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return super().__len__() - self.start


def endless(loader, sampler, consumed, per_epoch, micro):
    """Batches forever, starting after `consumed` batches: epoch e is shuffled with seed + e."""
    epoch, offset = divmod(consumed, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.start = offset * micro
        yield from loader
        sampler.start, offset, epoch = 0, 0, epoch + 1


def cli(argv=None):
    """train.py as a command: 0; bad input one line and 2; a diverged run one line and 1."""
    return run_command("train.py", lambda argv: main(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(cli())
