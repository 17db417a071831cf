"""Train DiT / MaP-DiT on a latent (or pixel) dataset, on one process or many with torchrun.

    python train.py                                    # built-in demo: shapes, a few minutes on a CPU
    python train.py --data-path LATENTS --model DiT-S/2 --mp
    torchrun --nproc_per_node=8 train.py --data-path LATENTS --model DiT-XL/2 --mp

A run lives in results/NNN-<model>/: config.json, log.txt, metrics.jsonl, checkpoints/, the
magnitude plot and (pixel data) a sample grid. Re-running the same command continues the latest
unfinished run with the same arguments from its last checkpoint; --resume PATH picks one.
"""
import argparse
import glob
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from data import DataError, LatentDataset, make_demo_dataset, read_manifest
from diffusion import create_diffusion
from ema import ema_update, frozen_copy, power_beta, sigma_rel_to_gamma
from models import MODULATIONS, MP_SWITCHES, DiT_models
from monitor import block_magnitudes, plot_magnitudes
from mp_layers import force_normalize_

DEFAULTS = dict(model="DiT-S/2", prediction="eps", mp=False, num_steps=400_000, global_batch_size=256,
                log_every=100, monitor_every=1000, ckpt_every=50_000, num_workers=4)
DEMO = dict(DEFAULTS, model="DiT-XS/4", mp=True, prediction="v", num_steps=1500, global_batch_size=64, hflip=False,
            log_every=50, monitor_every=100, ckpt_every=500, num_workers=0)
SAVED_ARG_DEFAULTS = dict(prediction="eps")  # arguments added later, as checkpoints from before them had them
DEMO_SIZE = dict(depth=4, hidden_size=128, num_heads=4)  # for the demo's default model only


class UsageError(Exception):
    """Bad arguments, data or checkpoint: reported as one line, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--num-steps", type=int, help="optimiser steps (default 400000; demo 1500)")
    g.add_argument("--global-batch-size", type=int, help="images per step over all processes (default 256)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float,
                   help="peak learning rate (default 1e-4 vanilla, 1e-2 with weight norm; demo 2e-2)")
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
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("EMA")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="classic constant-decay EMA (DiT)")
    g.add_argument("--ema-sigma-rels", type=float, nargs="*", default=[0.05, 0.10],
                   help="power-function EMAs (EDM2) by relative width")
    g.add_argument("--snapshot-every", type=int, help="save power-EMA snapshots for post-hoc EMA (default num_steps / 10)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, help="steps between log lines (default 100; demo 50)")
    g.add_argument("--monitor-every", type=int,
                   help="steps between activation / weight RMS records (default 1000; demo 100)")
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default 50000; demo 500)")
    g.add_argument("--resume", help="run directory or checkpoint file to continue")
    g.add_argument("--num-workers", type=int, help="data loader processes (default 4; demo 0)")
    g.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the final sample grid (pixel data)")
    return fill_defaults(p.parse_args(argv))


def fill_defaults(args):
    """Defaults that depend on other arguments (demo or not, MP or vanilla), then sanity checks."""
    if args.data_path is None and args.model is None:
        for k, v in DEMO_SIZE.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in (DEMO if args.data_path is None else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.hflip is None:  # a mirrored latent only approximates the latent of the mirrored image
        args.hflip = read_manifest(args.data_path)["kind"] == "pixel"
    if args.model not in DiT_models:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(DiT_models)}")
    weight_norm = args.mp or args.use_weight_normalization
    if args.lr is None:  # the demo's short run learns faster at 2e-2 (tried: 1e-2 gives blurrier shapes)
        args.lr = (2e-2 if args.data_path is None else 1e-2) if weight_norm else 1e-4
    if args.warmup_steps is None:
        args.warmup_steps = min(1000, args.num_steps // 10) if weight_norm else 0
    if args.decay_steps is None:
        args.decay_steps = min(20_000, args.num_steps // 3) if weight_norm else 0
    if args.snapshot_every is None:
        args.snapshot_every = max(args.num_steps // 10, 1)
    if args.use_forced_weight_normalization and not weight_norm:
        raise UsageError("--use-forced-weight-normalization needs --use-weight-normalization (or --mp): "
                         "forced normalisation alone leaves rows at norm sqrt(fan_in) and activations explode")
    for k in ("num_steps", "global_batch_size", "grad_accum", "log_every", "monitor_every", "ckpt_every",
              "snapshot_every"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1")
    return args


def learning_rate(step, args):
    """Linear warm-up to lr, then lr / sqrt(max(step / decay_steps, 1)) (EDM2) if decay_steps > 0."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
    return lr / math.sqrt(max(step / args.decay_steps, 1.0)) if args.decay_steps else lr


#################################################################################
#                           Distributed set-up and I/O                          #
#################################################################################

def setup_distributed():
    """(rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; the local rank picks
    the GPU, so multi-node runs work. NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def unwrap(model):
    """The bare nn.Module under DDP and torch.compile (no "module." or "_orig_mod." key prefixes)."""
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoints_in(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]" * 7 + ".pt")))


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    missing = {"model", "opt", "step", "args", "ema", "ema_power", "rng", "noise"} - set(ckpt)
    if missing:
        raise UsageError(f"{path}: not a train.py checkpoint (missing {sorted(missing)})")
    return ckpt


def find_resume(args):
    """The checkpoint to continue from: --resume, else the latest run in results-dir with the same
    arguments that has checkpoints and has not finished. None for a new run."""
    if args.resume:
        if os.path.isfile(args.resume):
            return args.resume
        ckpts = checkpoints_in(args.resume)
        if not ckpts:
            raise UsageError(f"{args.resume}: no checkpoint found (expected a run directory with "
                             f"checkpoints/NNNNNNN.pt, or a checkpoint file)")
        return ckpts[-1]
    runs = sorted(glob.glob(os.path.join(args.results_dir, "[0-9]" * 3 + "-*")))
    if not runs or not checkpoints_in(runs[-1]):
        return None
    try:
        with open(os.path.join(runs[-1], "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    same = all(config.get(k) == v for k, v in comparable(vars(args)).items())
    ckpt = checkpoints_in(runs[-1])[-1]
    return ckpt if same and int(os.path.basename(ckpt)[:7]) < args.num_steps else None


def comparable(config):
    return {k: v for k, v in config.items() if k not in ("resume", "num_workers")}


def new_run_dir(args):
    os.makedirs(args.results_dir, exist_ok=True)
    existing = glob.glob(os.path.join(args.results_dir, "[0-9]" * 3 + "-*"))
    index = max([int(os.path.basename(r)[:3]) for r in existing], default=-1) + 1
    prefix = "MaP-" if args.mp else ""
    size = "".join(f"-{k[0]}{v}" for k, v in (("depth", args.depth), ("width", args.hidden_size),
                                              ("heads", args.num_heads)) if v)
    run_dir = os.path.join(args.results_dir, f"{index:03d}-{prefix}{args.model.replace('/', '-')}{size}")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    return run_dir


def make_logger(run_dir, rank):
    logger = logging.getLogger("train")
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
        path = make_demo_dataset(os.path.join(args.results_dir, "demo-data"))
    else:
        path = args.data_path
    return LatentDataset(path, hflip=args.hflip)


def build_model(args, manifest):
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
                                  mp=args.mp, modulation=args.modulation, **switches, **overrides)


def saved_args(ckpt):
    """A checkpoint's train.py arguments, with the defaults of those added since it was written."""
    return {**SAVED_ARG_DEFAULTS, **ckpt["args"]}


def check_compatible(ckpt, args, manifest, path):
    saved = saved_args(ckpt)
    for key in ("model", "depth", "hidden_size", "num_heads", "modulation", "prediction", "mp", *MP_SWITCHES):
        if saved.get(key) != getattr(args, key):
            raise UsageError(f"{path}: checkpoint has {key}={saved.get(key)!r} but this run has "
                             f"{getattr(args, key)!r}; pass the same arguments or start a new run")
    for key in ("shape", "num_classes"):
        if ckpt["manifest"].get(key) != manifest.get(key):
            raise UsageError(f"{path}: checkpoint was trained on data with {key} "
                             f"{ckpt['manifest'].get(key)} but the dataset has {manifest.get(key)}")


def main(args):
    rank, world, device = setup_distributed()
    micro, rem = divmod(args.global_batch_size, world * args.grad_accum)
    if rem or micro == 0:
        raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"processes ({world}) x --grad-accum ({args.grad_accum})")
    resume = find_resume(args)
    ckpt = load_checkpoint(resume) if resume else None
    dataset = open_dataset(args)
    manifest = dataset.manifest
    if ckpt is not None:
        check_compatible(ckpt, args, manifest, resume)
    if len(dataset) < micro * world:
        raise UsageError(f"{args.data_path}: {len(dataset)} items, fewer than one global batch ({micro * world})")
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for any world size
    model = build_model(args, manifest).to(device)

    run_dir = os.path.dirname(os.path.dirname(resume)) if resume else None
    if rank == 0 and run_dir is None:
        run_dir = new_run_dir(args)
    if world > 1:
        holder = [run_dir]
        dist.broadcast_object_list(holder, src=0)
        run_dir = holder[0]
    logger = make_logger(run_dir, rank)
    if rank == 0 and not resume:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)

    torch.manual_seed(args.seed * world + rank)
    np.random.seed(args.seed * world + rank)
    random.seed(args.seed * world + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    model.grad_checkpoint = args.grad_checkpoint
    weight_norm = model.switches.use_weight_normalization
    ema = frozen_copy(model)
    power_emas = {s: frozen_copy(model) for s in args.ema_sigma_rels}
    gammas = {s: sigma_rel_to_gamma(s) for s in args.ema_sigma_rels}
    kernel = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    if weight_norm:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99), **kernel)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, **kernel)
    noise = BatchNoise(args.seed, rank, world, device)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        for s, e in power_emas.items():
            e.load_state_dict(ckpt["ema_power"][str(s)])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        noise.generator.set_state(ckpt["noise"])
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        else:
            logger.info(f"resuming on {world} processes from a run on {len(ckpt['rng'])}: random streams reseeded")
        logger.info(f"resumed from {resume} at step {step}")
    diffusion = create_diffusion("", prediction=args.prediction)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{args.model}{' (MaP)' if args.mp else ''}: {n_params:,} parameters; data {manifest['shape']} "
                f"x {len(dataset):,} items, {manifest['num_classes']} classes; run dir {run_dir}")

    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
    per_epoch = len(sampler) // micro
    batches = endless(loader, sampler, step * args.grad_accum, per_epoch, micro)

    model.train()
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a") if rank == 0 else None
    magnitude_records = read_magnitudes(run_dir) if rank == 0 else []
    bar = tqdm(total=args.num_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    window_loss, window_steps, window_start = torch.zeros(3, device=device), 0, time.time()
    while step < args.num_steps:
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        for i in range(args.grad_accum):
            raw, y = next(batches)
            n = raw.shape[0] * world  # per-sample randomness is drawn for the global micro-batch
            eps = noise.randn(n, *dataset.shape) if dataset.kind == "latent" else None
            flip = noise.rand(n) < 0.5 if dataset.hflip else None
            x = dataset.draw(raw.to(device, non_blocking=True), eps, flip)
            y = y.to(device, non_blocking=True)
            t = noise.randint(diffusion.num_timesteps, n)
            drop = (noise.rand(n) < model.y_embedder.dropout_prob).long()
            diffusion_noise = noise.randn(n, *x.shape[1:])
            sync = world > 1 and i < args.grad_accum - 1
            with (train_model.no_sync() if sync else nullcontext()), autocast():
                losses = diffusion.training_losses(train_model, x, t, dict(y=y, force_drop_ids=drop),
                                                   noise=diffusion_noise)
            loss = losses["loss"].mean()
            (loss / args.grad_accum).backward()
            window_loss += torch.stack([loss.detach(), losses["mse"].mean().detach(),
                                        losses["vb"].mean().detach()]) / args.grad_accum
        logging_step = (step + 1) % args.log_every == 0 or step + 1 == args.num_steps
        if args.grad_clip or logging_step:  # the norm costs a pass over the gradients: only when used
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        force_normalize_(model)
        step += 1
        ema_update(ema, model, args.ema_decay)
        for s, e in power_emas.items():
            ema_update(e, model, power_beta(step, gammas[s]))
        window_steps += 1
        bar.update(1)

        if logging_step:
            if world > 1:
                dist.all_reduce(window_loss)
                window_loss /= world
            mean = (window_loss / window_steps).tolist()
            check_finite(window_loss, world, step, run_dir)
            elapsed = time.time() - window_start
            record = dict(step=step, loss=mean[0], mse=mean[1], vb=mean[2], lr=lr, grad_norm=grad_norm.item(),
                          steps_per_sec=window_steps / elapsed,
                          images_per_sec=window_steps * args.global_batch_size / elapsed)
            bar.set_postfix(loss=f"{mean[0]:.4f}", img_s=f"{record['images_per_sec']:.1f}")
            if rank == 0:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            window_loss.zero_()
            window_steps, window_start = 0, time.time()

        if rank == 0 and (step % args.monitor_every == 0 or step == args.num_steps):
            model.eval()
            with autocast():
                acts, weights = block_magnitudes(model, diffusion.q_sample(x, t, diffusion_noise), t, y)  # as trained
            model.train()
            magnitude_records.append(dict(step=step, act_rms=acts, weight_rms=weights))
            metrics_file.write(json.dumps(magnitude_records[-1]) + "\n")
            metrics_file.flush()
        if rank == 0 and step % args.snapshot_every == 0:
            atomic_save({"step": step, "ema_power": {str(s): e.state_dict() for s, e in power_emas.items()}},
                        os.path.join(run_dir, "checkpoints", f"ema-snapshot-{step:07d}.pt"))
        if step % args.ckpt_every == 0 or step == args.num_steps:
            check_finite(window_loss, world, step, run_dir)
            rngs = [rng_state()]
            if world > 1:
                rngs = [None] * world
                dist.all_gather_object(rngs, rng_state())
            if rank == 0:
                atomic_save(dict(model=model.state_dict(), ema=ema.state_dict(),
                                 ema_power={str(s): e.state_dict() for s, e in power_emas.items()},
                                 opt=opt.state_dict(), step=step, args=vars(args), manifest=manifest, rng=rngs,
                                 noise=noise.generator.get_state()),
                            os.path.join(run_dir, "checkpoints", f"{step:07d}.pt"))
                logger.info(f"saved checkpoint at step {step}")
    bar.close()
    if rank == 0:
        metrics_file.close()
        plot_magnitudes(magnitude_records, os.path.join(run_dir, "magnitudes.png"))
        logger.info(f"magnitude plot: {os.path.join(run_dir, 'magnitudes.png')}")
        if manifest["kind"] == "pixel":
            weights = power_emas[max(power_emas)] if power_emas else ema
            path = os.path.join(run_dir, "samples.png")
            sample_grid(weights, dataset, args.prediction, args.sample_steps, device, path)
            logger.info(f"sample grid (one row per class): {path}")
    if world > 1:
        dist.destroy_process_group()
    return run_dir


def check_finite(window_loss, world, step, run_dir):
    """Stop (on every rank) before a non-finite loss reaches a checkpoint."""
    finite = torch.isfinite(window_loss).all().float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise FloatingPointError(f"the loss became non-finite by step {step}; the last good checkpoint is "
                                 f"kept in {run_dir}/checkpoints (try a lower --lr or --grad-clip)")


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


def read_magnitudes(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "act_rms" in r]


@torch.no_grad()
def sample_grid(model, dataset, prediction, diffusion_steps, device, path, per_class=8, cfg_scale=4.0, seed=0):
    """A PNG grid with one row per class: DDIM with classifier-free guidance on all channels."""
    num_classes = dataset.num_classes
    diffusion = create_diffusion(f"ddim{diffusion_steps}", prediction=prediction)
    generator = torch.Generator(device).manual_seed(seed)
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    z = torch.randn(len(y), *dataset.shape, generator=generator, device=device)
    z = torch.cat([z, z])
    y = torch.cat([y, torch.full_like(y, num_classes)])
    samples = diffusion.ddim_sample_loop(model.forward_with_cfg, z.shape, noise=z, clip_denoised=True,
                                         model_kwargs=dict(y=y, cfg_scale=cfg_scale), device=device)
    images = dataset.denormalize(samples[: len(samples) // 2].clamp(-1, 1)).cpu()
    c, h, w = images.shape[1:]
    grid = images.view(num_classes, per_class, c, h, w).permute(0, 3, 1, 4, 2).reshape(num_classes * h, per_class * w, c)
    Image.fromarray(grid.numpy()).resize((per_class * w * 2, num_classes * h * 2), Image.NEAREST).save(path)


def cli(argv=None):
    """Run train.py; bad input is one line on stderr and exit code 2, a diverged run exit code 1."""
    try:
        main(parse_args(argv))
    except (UsageError, DataError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
