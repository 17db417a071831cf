"""Train DiT / MaP-DiT on a latent (or pixel) dataset, on one process or many with torchrun.

    python train.py                                     # preset demo: the built-in shapes, minutes on a CPU
    python train.py --data-path LATENTS --mp            # preset imagenet-128 (DiT-S/2), MaP-DiT
    torchrun --nproc_per_node=8 train.py --data-path LATENTS --model DiT-XL/2 --mp

A recipe is a row of PRESETS (--preset; demo without --data-path, else imagenet-128); flags given override
it; the preset and the resulting arguments are logged at start and written to config.json. A run lives in
RESULTS/<model>-<hash of the arguments that shape its result>/: config.json, log.txt, metrics.jsonl,
checkpoints/, tb/ (TensorBoard: `tensorboard --logdir results`), samples/ (a grid every --sample-every
steps), magnitudes.png and curves.png. Re-running the same command continues its run from the last
checkpoint (a requeued job relies on it), or says the run has finished; --resume PATH continues a named
run (a larger --num-steps extends it, its lr schedule kept). One process writes a run at a time.
"""
import argparse
import contextlib
import functools
import json
import logging
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import runs
from cli import ArgumentParser, UsageError, barrier, from_rank_0, run_command, setup_distributed
from data import LatentDataset, make_demo_dataset, read_manifest
from diffusion import TIME_DISTS
from sampling import FLOW_PREDICTION
from download import open_decoder
from ema import ema_update, frozen_copy, power_beta, sigma_rel_to_gamma, valid_sigma_rel
from models import MODULATIONS, MP_SWITCHES, DiT_models
from mp_layers import force_normalize_
from trackers import wandb_installed
from watch import RunOutputs, block_magnitudes, check_reference, eval_metrics_for

# Recipes by name (EDM2's config_presets): every flag without a value takes its preset's. lr is (vanilla,
# with weight normalisation); depth, hidden_size and num_heads go with the preset's own model only.
PRESETS = {
    "imagenet-128": dict(model="DiT-S/2", objective="ddpm", prediction="eps", mp=False, lr=(1e-4, 1e-2), num_steps=400_000,
                         global_batch_size=256, log_every=100, monitor_every=1000, ckpt_every=50_000,
                         num_workers=4, sample_every=10_000, sample_steps=50, eval_every=0, eval_samples=10_000),
    "demo": dict(model="DiT-XS/4", depth=4, hidden_size=128, num_heads=4, objective="ddpm", prediction="v", mp=True,
                 lr=(3e-3, 2e-2), num_steps=1000, global_batch_size=64, hflip=False, log_every=50,
                 monitor_every=100, ckpt_every=500, num_workers=0, sample_every=250, sample_steps=25,
                 eval_every=250, eval_samples=256),  # lr 2e-2: 1e-2 gave blurrier shapes in 1000 steps
}
MODEL_SIZE = ("depth", "hidden_size", "num_heads")
OBJECTIVES = {"ddpm": "DiT's DDPM (1000 steps, learned sigma, --prediction)",
              "flow": "SiT's linear flow x_t = t x + (1 - t) eps, velocity MSE, --time-dist"}
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
    logit_mean=("a finite number", lambda v: abs(v) < math.inf), logit_std=("a finite number above 0", lambda v: 0 < v < math.inf),
)
gamma_of = functools.lru_cache(sigma_rel_to_gamma)  # a power EMA's exponent, solved once per width


def preset_default(key):
    """' (default: imagenet-128 X; demo Y)' from PRESETS, for a help string."""
    return " (default: " + "; ".join(f"{n} {row[key]}" for n, row in PRESETS.items() if key in row) + ")"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    d = preset_default
    g = p.add_argument_group("recipe, data and model")
    g.add_argument("--preset", choices=list(PRESETS), help="the recipe of the flags not given (default: demo "
                   "without --data-path, else imagenet-128)")
    g.add_argument("--data-path", help="dataset directory (data.py format); omit for the built-in demo data")
    g.add_argument("--results-dir", default="results", help="parent of the run directories")
    g.add_argument("--model", metavar="NAME", help="one of DiT-{XS,S,B,L,XL}/{2,4,8}" + d("model"))
    g.add_argument("--depth", type=int, help="override the model's number of blocks" + d("depth"))
    g.add_argument("--hidden-size", type=int, help="override the model's width" + d("hidden_size"))
    g.add_argument("--num-heads", type=int, help="override the model's number of attention heads" + d("num_heads"))
    g.add_argument("--modulation", choices=list(MODULATIONS), default="adaln",
                   help="block conditioning: " + "; ".join(f"{k}: {v}" for k, v in MODULATIONS.items()))
    g.add_argument("--objective", choices=list(OBJECTIVES), help="; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items())
                   + d("objective"))
    g.add_argument("--prediction", choices=["eps", "v", "x0"], help="ddpm: what the model predicts, eps (DiT), v (well "
                   "posed at high noise, where eps needs many steps to learn) or x0" + d("prediction")
                   + "; a flow model predicts the velocity")
    g.add_argument("--time-dist", choices=TIME_DISTS, default="uniform", help="flow: how training draws t, uniform "
                   "(SiT) or logit-normal, t = sigmoid(N(--logit-mean, --logit-std^2)) (SD3, LightningDiT)")
    g.add_argument("--logit-mean", type=float, default=0.0, help="flow, logit-normal t: the mean of logit(t) (default 0)")
    g.add_argument("--logit-std", type=float, default=1.0, help="flow, logit-normal t: the std of logit(t) (default 1)")
    g.add_argument("--vae-path", metavar="DIR", help="latent data: the VAE (save_pretrained folder) decoding grids and "
                   "evaluations (default: the one the dataset's manifest names, else its hub id)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, help="random horizontal flips (default: on for "
                   "pixel data; off for latents, mirrored only approximately: see download.py imagenet --flip)")
    g = p.add_argument_group("magnitude preservation (all off = original DiT)")
    g.add_argument("--mp", action=argparse.BooleanOptionalAction,
                   help="MaP-DiT: every switch below on" + d("mp") + "; a switch given alone turns --mp off")
    for name, description in MP_SWITCHES.items():
        g.add_argument("--" + name.replace("_", "-"), action="store_true", help=description)
    g = p.add_argument_group("optimisation")
    g.add_argument("--num-steps", type=int, help="optimiser steps" + d("num_steps"))
    g.add_argument("--global-batch-size", type=int, help="images per step over all processes" + d("global_batch_size"))
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, help="peak learning rate, (vanilla, with weight norm)" + d("lr"))
    g.add_argument("--warmup-steps", type=int, help="linear warm-up (default 0; weight norm min(1000, num_steps / 10))")
    g.add_argument("--decay-steps", type=int, help="EDM2 decay lr / sqrt(max(step / N, 1)); 0 = constant (default 0; "
                   "weight norm min(20000, num_steps / 3))")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--seed", type=int, default=0, help="all randomness of the run, in [0, 2**32) (default 0)")
    g = p.add_argument_group("EMA")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="classic constant-decay EMA (DiT), in [0, 1)")
    g.add_argument("--ema-sigma-rels", type=float, nargs="*", default=[0.05, 0.10],
                   help="power-function EMAs (EDM2) by relative width, each in (0, 0.3002]")
    g.add_argument("--snapshot-every", type=int, help="save power-EMA snapshots for post-hoc EMA (default num_steps / 10)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, help="steps between log lines" + d("log_every"))
    g.add_argument("--monitor-every", type=int, help="steps between activation / weight RMS records" + d("monitor_every"))
    g.add_argument("--ckpt-every", type=int, help="steps between checkpoints" + d("ckpt_every"))
    g.add_argument("--resume", nargs="?", const=runs.LATEST, metavar="PATH", help="continue a run directory or "
                   "checkpoint (a larger --num-steps extends it, lr schedule kept); bare: this command's run")
    g.add_argument("--num-workers", type=int, help="data loader processes, at most the CPUs" + d("num_workers"))
    g.add_argument("--sample-every", type=int, metavar="N", help="steps between sample grids of the weights sample.py "
                   "uses (RUN/samples/, trackers), and one at the end; 0 = none" + d("sample_every"))
    g.add_argument("--sample-steps", type=int, help="sampler steps of grids and evaluations (DDIM; flow runs: "
                   "sampling.GRID_SAMPLER) (<= 1000)" + d("sample_steps"))
    g = p.add_argument_group("evaluation during training (FID curve)")
    g.add_argument("--eval-every", type=int, metavar="N", help="steps between evaluations of the sampling weights, "
                   "and one at the end; 0 = none" + d("eval_every"))
    g.add_argument("--eval-samples", type=int, metavar="K",
                   help="samples per evaluation, fixed noise and labels uniform over the classes" + d("eval_samples"))
    g.add_argument("--eval-metrics", nargs="+", metavar="M", help="fid sfid is pr fd_dinov2 (evaluation.py), or "
                   "fd_classifier (pixel data); default fid with the Inception weights, else fd_classifier")
    g.add_argument("--eval-reference", metavar="PATH", help="ADM reference .npz, image folder or pixel dataset "
                   "(default: the training data; latents need one); statistics cached in RESULTS/eval-cache/")
    g.add_argument("--eval-cfg-scale", type=float, default=1.0, metavar="S", help="guidance scale (default 1: none)")
    g = p.add_argument_group("watching the run")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project (pip install wandb; "
                   "WANDB_MODE=offline without a network); TensorBoard always logs to RUN/tb/")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (also TQDM_DISABLE=1; redirected: a "
                   "line every 30 s)")
    return check_args(apply_preset(p.parse_args(argv)))


def apply_preset(args):
    """Every flag without a value takes the preset's; then the MP switches in effect (--mp = all of
    them; a switch given without --mp turns the preset's --mp off) and the defaults derived from
    others: the lr by weight normalisation, the schedule from --num-steps (args._derived names those)."""
    args.preset = args.preset or ("demo" if args.data_path is None else "imagenet-128")
    own_model = args.model is None
    objective = args.objective or PRESETS[args.preset]["objective"]
    if objective == "flow" and args.prediction is not None:
        raise UsageError(f"--prediction {args.prediction} is for --objective ddpm: a flow model predicts the velocity")
    if objective == "ddpm" and args.time_dist != "uniform":
        raise UsageError(f"--time-dist {args.time_dist} is for --objective flow (DDPM draws its timesteps uniformly)")
    if args.time_dist != "logit-normal" and (args.logit_mean, args.logit_std) != (0.0, 1.0):
        raise UsageError("--logit-mean and --logit-std shape --time-dist logit-normal (give it too)")
    if objective == "flow":
        args.prediction = FLOW_PREDICTION
    if args.mp is None and any(getattr(args, name) for name in MP_SWITCHES):
        args.mp = False
    if args.num_workers is None:
        args.num_workers = min(PRESETS[args.preset]["num_workers"], os.cpu_count() or 1)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None and (own_model or key not in MODEL_SIZE):
            setattr(args, key, value)
    for name in MP_SWITCHES if args.mp else ():
        setattr(args, name, True)
    args.mp = all(getattr(args, name) for name in MP_SWITCHES)
    weight_norm = args.use_weight_normalization
    if isinstance(args.lr, tuple):
        args.lr = args.lr[weight_norm]
    if args.hflip is None:  # a mirrored latent only approximates the latent of the mirrored image
        args.hflip = data_kind(args) == "pixel"
    derived = dict(warmup_steps=min(1000, args.num_steps // 10) if weight_norm else 0,
                   decay_steps=min(20_000, args.num_steps // 3) if weight_norm else 0,
                   snapshot_every=max(args.num_steps // 10, 1))
    args._derived = [k for k in derived if getattr(args, k) is None]  # runs.reconcile: a resume keeps the run's
    for key in args._derived:
        setattr(args, key, derived[key])
    return args


def data_kind(args):
    return "pixel" if args.data_path is None else read_manifest(args.data_path)["kind"]


def check_args(args):
    """Refuse, in one line, what cannot train: every numeric flag in its RANGES, and the rest."""
    for name, (valid, ok) in RANGES.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not ok(v):
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be {valid}")
    if args.vae_path and not os.path.isdir(args.vae_path):
        raise UsageError(f"--vae-path {args.vae_path}: not a directory (a VAE saved with save_pretrained)")
    if args.model not in DiT_models:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(DiT_models)}")
    if args.wandb and not wandb_installed():
        raise UsageError("--wandb needs the optional package wandb: pip install wandb (or drop --wandb)")
    if args.use_forced_weight_normalization and not args.use_weight_normalization:
        raise UsageError("--use-forced-weight-normalization needs --use-weight-normalization (or --mp): "
                         "forced normalisation alone leaves rows at norm sqrt(fan_in) and activations explode")
    if args.eval_every:
        if data_kind(args) != "pixel" and not args.eval_reference:
            raise UsageError("--eval-every on latent data needs --eval-reference (an ADM reference batch .npz or a "
                             "folder of images)")
        if args.eval_reference and not os.path.exists(args.eval_reference):
            raise UsageError(f"--eval-reference {args.eval_reference}: no such file or folder")
        args.eval_metrics = eval_metrics_for(args.eval_metrics, data_kind(args))
    return args


#################################################################################
#                                 Training                                      #
#################################################################################

def main(args):
    """Set up, then train the run of args from its last checkpoint (or step 0) to --num-steps; returns
    the run directory."""
    rank, world, device = setup_distributed()
    with contextlib.ExitStack() as cleanup:
        if world > 1:
            cleanup.callback(dist.destroy_process_group)
        run_dir, resume, lock, done = runs.claim_run(args) if rank == 0 else (None, None, None, False)
        if lock:
            cleanup.callback(lock.release)
        run_dir, resume, done = from_rank_0((run_dir, resume, done))
        if done:  # claim_run said so
            return run_dir
        micro, rem = divmod(args.global_batch_size, world * args.grad_accum)
        if rem or micro == 0:
            raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                             f"processes ({world}) x --grad-accum ({args.grad_accum})")
        ckpt = runs.load_checkpoint(resume) if resume else None
        dataset = open_dataset(args)
        changes = runs.reconcile(args, ckpt, resume, dataset.manifest) if ckpt else []
        if len(dataset) < micro * world:
            raise UsageError(f"{args.data_path}: {len(dataset)} items, fewer than one global batch ({micro * world})")
        torch.manual_seed(args.seed)  # the same initial weights on every rank and for any world size
        model = runs.build_model(args, dataset.manifest).to(device)
        model.grad_checkpoint = args.grad_checkpoint
        vae = open_vae(args, dataset, rank, world, device)
        if rank == 0 and lock is None:
            cleanup.callback(runs.create_run(run_dir, args).release)
        if rank == 0:
            runs.write_config(run_dir, args)  # with a resume's changes
        barrier()  # the other ranks wait for the run directory

        logger = make_logger(run_dir, rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        state = runs.TrainingState(model=model, ema=frozen_copy(model), opt=make_optimizer(model, args, device),
                                   ema_power={sr: frozen_copy(model) for sr in args.ema_sigma_rels},
                                   noise=BatchNoise(args.seed, rank, world, device),
                                   rng=runs.ProcessRNG(args.seed, rank, world), step=0)
        if ckpt is not None:
            state.load_state_dict(ckpt)
            for line in [f"resumed at step {state.step}", *changes]:
                logger.info(line)
        logger.info(f"preset {args.preset} (of {', '.join(PRESETS)}; the flags given override it); the run's "
                    f"arguments: {json.dumps(runs.config_of(args))}")
        logger.info(f"{args.model}{' (MaP)' if args.mp else ''}: {sum(p.numel() for p in model.parameters()):,} "
                    f"parameters; data {dataset.manifest['shape']} x {len(dataset):,} items, "
                    f"{dataset.manifest['num_classes']} classes; run dir {run_dir}")
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        net = torch.compile(net) if args.compile else net
        diffusion = runs.training_objective(args)
        autocast = autocast_for(args, device)
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                   drop_last=True)
        loader = DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda", drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
        batches = endless(loader, sampler, state.step * args.grad_accum, len(sampler) // micro, micro)
        out = RunOutputs(args, run_dir, state, dataset, vae)
        out.catch_up(state)

        model.train()
        while state.step < args.num_steps:
            log_now = (state.step + 1) % args.log_every == 0 or state.step + 1 == args.num_steps
            micro_batches = (micro_batch(batches, state.noise, dataset, diffusion, model)
                             for _ in range(args.grad_accum))
            losses, lr, grad_norm, (x, t, y, _, noise) = train_step(state, net, diffusion, micro_batches, args,
                                                                    autocast, log_now)
            out.add_losses(losses)
            if log_now:
                out.log_losses(state, lr, grad_norm)
            if rank == 0 and out.due(state.step, args.monitor_every):
                model.eval()
                with autocast():
                    acts, weights = block_magnitudes(model, diffusion.q_sample(x, t, noise), t, y)  # as trained
                model.train()
                out.log_magnitudes(state.step, acts, weights)
            save(state, args, run_dir, dataset.manifest, out.window_loss)
            out.watch(state)
        out.finish(state.step)
        return run_dir


#################################################################################
#                                 The step                                      #
#################################################################################

def train_step(state, net, diffusion, micro_batches, args, autocast, need_norm=False):
    """Optimiser step state.step + 1 (the benchmarks time this function): the mean hybrid loss over
    --grad-accum micro-batches (x0, t, y, drop, noise), Adam(W), forced weight normalisation, then the
    classic EMA and the power EMAs. net is state.model, or its DDP / compiled wrapper. Returns (the
    mean [loss, mse, vb], lr, the gradient norm or None, the last micro-batch)."""
    lr = learning_rate(state.step, args)
    for group in state.opt.param_groups:
        group["lr"] = lr
    mean = 0
    for i, batch in enumerate(micro_batches):
        x, t, y, drop, noise = batch
        defer = hasattr(net, "no_sync") and i < args.grad_accum - 1  # DDP syncs the gradients of the last
        with (net.no_sync() if defer else contextlib.nullcontext()), autocast():
            losses = diffusion.training_losses(net, x, t, dict(y=y, force_drop_ids=drop), noise=noise)
        loss = losses["loss"].mean()
        (loss / args.grad_accum).backward()
        mean = mean + torch.stack([loss.detach(), losses["mse"].mean().detach(), losses["vb"].mean().detach()])
    grad_norm = None
    if args.grad_clip or need_norm:  # the norm costs a pass over the gradients: only when used
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), args.grad_clip or float("inf"))
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    force_normalize_(state.model)
    state.step += 1
    ema_update(state.ema, state.model, args.ema_decay)
    for sigma_rel, ema in state.ema_power.items():
        ema_update(ema, state.model, power_beta(state.step, gamma_of(sigma_rel)))
    return mean / args.grad_accum, lr, grad_norm, batch


def micro_batch(batches, noise, dataset, diffusion, model):
    """The next (x0, t, y, drop, noise): per-sample randomness drawn for the global micro-batch."""
    raw, y = next(batches)
    n = raw.shape[0] * noise.world
    eps = noise(torch.randn, n, *dataset.shape) if dataset.kind == "latent" else None  # the VAE posterior's
    flip = noise(torch.rand, n) < 0.5 if dataset.hflip else None
    x = dataset.draw(raw.to(noise.device, non_blocking=True), eps, flip)
    t = diffusion.sample_t(noise, n)
    drop = (noise(torch.rand, n) < model.y_embedder.dropout_prob).long()
    return x, t, y.to(noise.device, non_blocking=True), drop, noise(torch.randn, n, *x.shape[1:])


#################################################################################
#                                 Set-up                                        #
#################################################################################

def learning_rate(step, args):
    """Linear warm-up to lr, then lr / sqrt(max(step / decay_steps, 1)) (EDM2) if decay_steps > 0."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
    return lr / math.sqrt(max(step / args.decay_steps, 1.0)) if args.decay_steps else lr


def make_optimizer(model, args, device):
    """Adam (0.9, 0.99) with weight normalisation (EDM2), else AdamW without decay (DiT); fused on a GPU."""
    kernel = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    if model.switches.use_weight_normalization:
        return torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99), **kernel)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, **kernel)


def autocast_for(args, device):
    """--precision as a context factory: bf16 autocast (auto: on a GPU), else nothing."""
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def open_dataset(args):
    path = args.data_path
    if path is None:
        try:
            path = make_demo_dataset(os.path.join(args.results_dir, "demo-data"))
        except OSError as e:
            raise UsageError(f"--results-dir {args.results_dir}: cannot write the demo data there "
                             f"({e.strerror or e})") from None
    return LatentDataset(path, hflip=args.hflip)


def open_vae(args, dataset, rank, world, device):
    """The VAE that decodes a latent run's samples on the ranks that decode (rank 0 for the grids, every
    rank for the evaluations; None elsewhere and for pixel data), and the evaluation reference checked
    (rank 0 looks); refused on every rank, in one line, before training, if either cannot serve."""
    vae, error, manifest = None, None, dataset.manifest
    try:
        if manifest["kind"] == "latent" and (args.eval_every or (args.sample_every and rank == 0)):
            vae = open_decoder(manifest, args.vae_path).to(device)
    except UsageError as e:
        error = (f"cannot decode the run's samples for its grids and evaluations: {e} (or train without them: "
                 f"--sample-every 0 --eval-every 0)")
    if args.eval_every and rank == 0 and not error:
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1  # the VAE's downsampling
        try:
            check_reference(args.eval_reference or dataset.path, args.eval_metrics, args.eval_samples,
                            tuple(n * scale for n in manifest["shape"][1:]) + (3,))
        except UsageError as e:
            error = str(e)
    errors = [error] * world
    if world > 1:
        dist.all_gather_object(errors, error)
    if any(errors):
        raise UsageError(next(e for e in errors if e))
    return vae


def make_logger(run_dir, rank):
    """Logger "train": on rank 0 to RUN/log.txt and stderr, silent elsewhere."""
    logger = logging.getLogger("train")
    for handler in logger.handlers:
        handler.close()
    handlers = [logging.FileHandler(os.path.join(run_dir, "log.txt")), logging.StreamHandler()] if rank == 0 else []
    for handler in handlers:
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logger.handlers, logger.propagate = handlers or [logging.NullHandler()], False
    logger.setLevel(logging.INFO)
    return logger


def save(state, args, run_dir, manifest, window_loss):
    """At --snapshot-every steps a power-EMA snapshot, at --ckpt-every steps and the last a checkpoint;
    both only after the loss and the weights are checked finite (no NaN reaches disk)."""
    step, rank = state.step, state.rng.rank
    snapshot, checkpoint = step % args.snapshot_every == 0, step % args.ckpt_every == 0 or step == args.num_steps
    if not (snapshot or checkpoint):
        return
    modules = [state.model, state.ema, *state.ema_power.values()]
    runs.check_finite([window_loss, *(p for m in modules for p in m.parameters())], step, run_dir)
    if rank == 0 and snapshot:
        runs.atomic_save({"step": step, "ema_power": runs.state_of(state.ema_power)},
                         os.path.join(run_dir, "checkpoints", f"ema-snapshot-{step:07d}.pt"))
    if checkpoint:
        ckpt = state.state_dict()  # every rank: the RNG states are gathered
        if rank == 0:
            runs.atomic_save(dict(ckpt, args=runs.config_of(args), manifest=manifest),
                             os.path.join(run_dir, "checkpoints", f"{step:07d}.pt"))
            logging.getLogger("train").info(f"saved checkpoint at step {step}")


class BatchNoise:
    """Per-sample random numbers (posterior eps, flips, timesteps, diffusion noise, label dropout),
    drawn for the whole global batch from one generator seeded alike on every rank; each rank keeps
    rows rank::world, the samples DistributedSampler deals it. Every rank gets different noise and
    a run gives the same result on any number of processes."""

    def __init__(self, seed, rank, world, device):
        self.generator = torch.Generator(device).manual_seed(seed)
        self.rows, self.world, self.device = slice(rank, None, world), world, device

    def __call__(self, draw, *size):
        """draw (torch.randn, rand, randint) of the global batch's size; this rank's rows."""
        return draw(*size, generator=self.generator, device=self.device)[self.rows]

    def state_dict(self):
        return self.generator.get_state()

    def load_state_dict(self, state):
        self.generator.set_state(state)


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
