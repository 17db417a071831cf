"""Ablation grid for MaP-DiT: does magnitude preservation make DiT train better, switch by switch?

    python experiments/ablate.py                        # default grid on the built-in demo data
    python experiments/ablate.py --list                 # the grid's configurations and their flags
    python experiments/ablate.py --grid tiny --num-steps 300 --seeds 0
    python experiments/ablate.py --parallel 4           # 4 runs at once as subprocesses (GPU)
    python experiments/ablate.py --data-path DATA --model DiT-S/4 --num-steps 20000

Grids: "default" = vanilla DiT; vanilla plus each MP switch alone (forced weight normalisation
runs together with weight normalisation, which it needs); all MP (--mp); all MP with rotation
modulation (--mp --modulation rotation-scale). "tiny" = vanilla and all MP.

Every configuration trains with the same model size, steps, batch and seeds through train.py's
own code (train.main), each (configuration, seed) in its own RESULTS/runs/<config>-seed<S>/.
Learning rates are train.py's defaults per configuration (vanilla: AdamW 1e-4, constant;
weight-normalised: Adam 1e-2 with warm-up and EDM2 decay) unless --lr sets one for all.
Rerunning the same command skips finished runs and continues interrupted ones.

After training, each run samples a fixed set (the same labels and noise for every run) from its
widest power EMA with DDIM, and is scored by: the Frechet distance in the features of a small
classifier trained on the dataset (FD-<data>-classifier, cached in RESULTS/eval/), the
class-consistency accuracy of that classifier, FID with the standard Inception when its weights
are on disk (else n/a), and the EMA's loss on a fixed held-out batch. RESULTS/table.md and
RESULTS/results.json aggregate the seeds; RESULTS/ablation_samples.png and
ablation_magnitudes.png compare vanilla DiT with MaP-DiT. Bad input: one line, exit code 2.
"""
import argparse
import contextlib
import glob
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import fid  # noqa: E402
import train  # noqa: E402
from data import DataError, LatentDataset, denormalize, make_demo_dataset  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from experiments import metrics  # noqa: E402
from models import MP_SWITCHES  # noqa: E402

DEFAULT_MODEL, DEFAULT_SIZE = "DiT-XS/4", dict(depth=4, hidden_size=128, num_heads=4)
DEFAULT_STEPS, DEFAULT_BATCH = 1500, 64
CLASSIFIER_ITEMS, HELDOUT_ITEMS = 20_000, 10_000  # caps on the real images the evaluation reads
CLASSIFIER_MIN_STEPS = 300  # optimiser steps of the FD classifier however small the dataset
FIGURE_COLUMNS = 8


class AblateError(Exception):
    """Bad arguments or data: reported as one line on stderr, exit code 2."""


def _configs():
    """name -> (label, train.py flags): vanilla, each switch alone, all MP, all MP + rotation."""
    configs = {"vanilla": ("DiT (vanilla)", [])}
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
GRIDS = {"default": list(CONFIGS), "tiny": ["vanilla", "mp"]}


def say(message):
    print(f"[ablate] {message}", file=sys.stderr, flush=True)


#################################################################################
#                                   Arguments                                   #
#################################################################################

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise AblateError(f"{message} (see --help)")


def build_parser():
    p = _Parser(prog="ablate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--grid", choices=sorted(GRIDS), default="default", help="which grid (default: default)")
    g.add_argument("--configs", nargs="+", metavar="NAME", help="run only these configurations of the grid (--list)")
    g.add_argument("--list", action="store_true", help="print the grid's configurations and their train.py flags")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S", help="training seeds (default 0 1)")
    g.add_argument("--results-dir", default="results/ablation", metavar="DIR",
                   help="the grid's directory: runs/, eval/, table.md, results.json, figures "
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
    g.add_argument("--lr", type=float, help="one learning rate for every configuration (default: train.py's "
                   "per configuration, 1e-4 vanilla, 1e-2 with weight normalisation)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                   help="random flips (default: off for the demo, on for datasets, as train.py)")
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
    g.add_argument("--classifier-epochs", type=int, default=4,
                   help="epochs of the FD classifier, at least 300 steps (default 4)")
    g.add_argument("--inception-weights", metavar="PATH",
                   help=f"{fid.INCEPTION_FILE} (default ${fid.WEIGHTS_ENV}, then the torch hub cache; never "
                   "downloaded: FID is n/a without it)")
    p.add_argument("--only", help=argparse.SUPPRESS)  # CONFIG:SEED, the subprocess of --parallel
    return p


def parse(argv):
    opts = build_parser().parse_args(argv)
    grid = GRIDS[opts.grid]
    if opts.configs:
        unknown = [c for c in opts.configs if c not in grid]
        if unknown:
            raise AblateError(f"--configs: {', '.join(unknown)} not in grid {opts.grid!r} ({', '.join(grid)})")
        opts.configs = [c for c in grid if c in opts.configs]
    else:
        opts.configs = list(grid)
    for name in ("num_steps", "global_batch_size", "parallel", "threads", "samples_per_class", "sample_steps",
                 "loss_batch", "eval_batch_size", "classifier_epochs"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise AblateError(f"--{name.replace('_', '-')} must be at least 1")
    if len(set(opts.seeds)) != len(opts.seeds):
        raise AblateError(f"--seeds: repeated seed in {opts.seeds}")
    if any(s < 0 for s in opts.cfg_scales):
        raise AblateError("--cfg-scales must be >= 0")
    for name in opts.compare:
        if name not in CONFIGS:
            raise AblateError(f"--compare: unknown configuration {name!r} (known: {', '.join(CONFIGS)})")
    if opts.model is None:
        opts.model = DEFAULT_MODEL
        for k, v in DEFAULT_SIZE.items():
            if getattr(opts, k) is None:
                setattr(opts, k, v)
    try:
        shlex.split(opts.train_args)
    except ValueError as e:
        raise AblateError(f"--train-args: {e}")
    if opts.only:
        cfg, _, seed = opts.only.partition(":")
        if cfg not in CONFIGS or not seed.lstrip("-").isdigit():
            raise AblateError(f"--only: expected CONFIG:SEED, got {opts.only!r}")
        opts.only = (cfg, int(seed))
    opts.results_dir = os.path.abspath(opts.results_dir)
    return opts


#################################################################################
#                               Runs and their state                            #
#################################################################################

def run_root(opts, cfg, seed):
    """train.py's --results-dir for one (configuration, seed): its own, so train.py's auto-resume
    (the latest run there with identical arguments) can only pick this run."""
    return os.path.join(opts.results_dir, "runs", f"{cfg}-seed{seed}")


def train_argv(opts, data, cfg, seed):
    n = opts.num_steps
    hflip = opts.hflip if opts.hflip is not None else not data.demo
    argv = ["--data-path", data.path, "--results-dir", run_root(opts, cfg, seed), "--model", opts.model,
            "--num-steps", str(n), "--global-batch-size", str(opts.global_batch_size), "--seed", str(seed),
            "--log-every", str(max(1, min(50, n // 10))), "--monitor-every", str(max(1, n // 15)),
            "--ckpt-every", str(max(1, -(-n // 5))), "--num-workers", "0", "--hflip" if hflip else "--no-hflip"]
    for key in ("depth", "hidden_size", "num_heads"):
        if getattr(opts, key) is not None:
            argv += ["--" + key.replace("_", "-"), str(getattr(opts, key))]
    if opts.lr is not None:
        argv += ["--lr", repr(opts.lr)]
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
    except train.UsageError as e:
        return None, str(e)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def find_run(root, args):
    """The latest run directory under root whose config.json matches args (as train.py compares)."""
    want = train.comparable(vars(args))
    found = None
    for run_dir in sorted(glob.glob(os.path.join(root, "[0-9]" * 3 + "-*"))):
        config = read_json(os.path.join(run_dir, "config.json"))
        if config is not None and all(config.get(k) == v for k, v in want.items()):
            found = run_dir
    return found


def final_checkpoint(run_dir, num_steps):
    return os.path.join(run_dir, "checkpoints", f"{num_steps:07d}.pt")


def eval_key(opts, ctx):
    """What a run's scores depend on besides its weights: a change re-scores, never retrains."""
    return dict(samples_per_class=opts.samples_per_class, sample_steps=opts.sample_steps,
                cfg_scales=opts.cfg_scales, sample_seed=opts.sample_seed, loss_batch=opts.loss_batch,
                classifier=ctx.classifier_id)


def run_state(run_dir, argv, num_steps, key):
    """done (results.json for these arguments and evaluation settings), evaluate (trained, not
    scored as asked), resume (checkpoints short of the last), or new."""
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
    return "resume" if train.checkpoints_in(run_dir) else "new"


def run_one(opts, data, ctx, cfg, seed, position=""):
    """Train (or continue) and evaluate one (configuration, seed); write its results.json."""
    argv = train_argv(opts, data, cfg, seed)
    args, why = parse_train(argv)
    if args is None:
        raise AblateError(f"{cfg}: {why}")
    root = run_root(opts, cfg, seed)
    run_dir = find_run(root, args)
    state = run_state(run_dir, argv, opts.num_steps, eval_key(opts, ctx))
    tag = f"{position}{cfg} seed {seed}"
    if state == "done":
        say(f"{tag}: finished, skipped ({run_dir})")
        add_missing_fid(run_dir, ctx)
        return
    base = dict(config=cfg, label=CONFIGS[cfg][0], flags=CONFIGS[cfg][1], seed=seed, train_argv=argv,
                train_command="python train.py " + shlex.join(argv))
    train_seconds = None
    if state in ("new", "resume"):
        extra = ["--resume", run_dir] if state == "resume" else []
        say(f"{tag}: {'continuing ' + run_dir if extra else 'training'}: {base['train_command']}")
        start = time.time()
        try:
            run_dir = train.main(train.parse_args(argv + extra))
        except FloatingPointError as e:
            run_dir = find_run(root, args)
            write_json(os.path.join(run_dir, "results.json"),
                       dict(base, status="diverged", message=str(e), run_dir=run_dir))
            say(f"{tag}: diverged: {e}")
            return
        finally:
            for handler in logging.getLogger("train").handlers:
                handler.close()
        train_seconds = time.time() - start
    say(f"{tag}: evaluating {run_dir}")
    start = time.time()
    result = evaluate_run(run_dir, opts, ctx)
    result.update(base, status="ok", eval_key=eval_key(opts, ctx), run_dir=run_dir,
                  train_seconds_this_call=train_seconds,
                  eval_seconds=time.time() - start)
    write_json(os.path.join(run_dir, "results.json"), result)
    head = result["samples"][f"{opts.cfg_scales[0]:g}"]
    say(f"{tag}: EMA loss {result['heldout_loss']['ema']['loss']:.4f}, {ctx.fd_name} {head['fd']:.4g}, "
        f"class consistency {head['class_consistency']:.3f}")


#################################################################################
#                     Evaluation data, classifier and reference                 #
#################################################################################

def prepare_data(opts):
    """Where the training data and the held-out data live (rendering the demo if needed)."""
    demo = opts.data_path is None
    try:
        if demo:
            path = make_demo_dataset(os.path.join(opts.results_dir, "demo-data"))
            heldout = opts.eval_data_path
            if heldout is None:  # the same generator with another seed: images no run trained on
                n = max(6 * 10 * opts.samples_per_class, 2000)
                heldout = make_demo_dataset(os.path.join(opts.results_dir, f"demo-heldout-{n}"),
                                            num_items=n, seed=1)
        else:
            path, heldout = opts.data_path, opts.eval_data_path
        manifest = LatentDataset(path).manifest
    except DataError as e:
        raise AblateError(str(e))
    name = "demo" if demo else os.path.basename(os.path.normpath(path))
    return SimpleNamespace(path=os.path.abspath(path), heldout=heldout and os.path.abspath(heldout), demo=demo,
                           name=name, manifest=manifest)


def load_items(ds, indices, seed=0):
    """(uint8 images or None, model-space x, labels) of dataset items; latent items are drawn with
    a seeded eps so that every evaluation sees the same real latents."""
    indices = np.asarray(indices, dtype=np.int64)
    raw = torch.stack([ds[int(i)][0] for i in indices])
    labels = torch.as_tensor(ds.labels[indices]).long()
    if ds.kind == "pixel":
        return raw, raw.float() / 127.5 - 1, labels
    eps = torch.randn(raw[:, 0].shape, generator=torch.Generator().manual_seed(seed))
    return None, ds.draw(raw, eps), labels


def prepare_eval(opts, data):
    """The evaluation context: held-out data, the classifier (trained once, cached in
    RESULTS/eval/reference.pt), reference statistics and the real-data row of the table."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ds = LatentDataset(data.path)
        held_ds = LatentDataset(data.heldout) if data.heldout else ds
    except DataError as e:
        raise AblateError(str(e))
    manifest = ds.manifest
    if (held_ds.shape, held_ds.num_classes) != (ds.shape, ds.num_classes):
        raise AblateError(f"{data.heldout}: shape {list(held_ds.shape)} and {held_ds.num_classes} classes differ "
                          f"from the training data's {list(ds.shape)} and {ds.num_classes}")
    num_classes, n_samples = ds.num_classes, ds.num_classes * opts.samples_per_class
    rng = np.random.default_rng(0)
    if data.heldout:
        held_idx = np.sort(rng.permutation(len(held_ds))[:HELDOUT_ITEMS])
        train_idx = rng.permutation(len(ds))[:CLASSIFIER_ITEMS]
        held_desc = f"{data.heldout} ({len(held_idx)} items)"
    else:  # a fixed split: the classifier never sees the held-out part (the diffusion models do)
        n_held = min(HELDOUT_ITEMS, max(len(ds) // 10, min(len(ds) // 2, 6 * n_samples)))
        perm = rng.permutation(len(ds))
        held_idx, train_idx = np.sort(perm[:n_held]), perm[n_held:][:CLASSIFIER_ITEMS]
        held_desc = f"{n_held} items of {data.path} split off for the classifier (not held out from training)"
    if len(held_idx) < 4 or len(train_idx) < 2:
        raise AblateError(f"{data.path}: too few items ({len(ds)}) to split off held-out data; pass --eval-data-path")
    held_u8, held_x, held_y = load_items(held_ds, held_idx, seed=1)
    n_base = min(n_samples, len(held_idx) // 2)  # real images scored like one run's samples: the floor
    arch = metrics.SmallClassifier(ds.shape[0], num_classes).config
    key = dict(data=data.path, items=len(ds), source=manifest.get("source"), heldout=held_desc,
               train_items=len(train_idx), base_items=n_base, epochs=opts.classifier_epochs,
               min_steps=CLASSIFIER_MIN_STEPS, arch=arch, recipe=metrics.CLASSIFIER_RECIPE)
    cache_path = os.path.join(opts.results_dir, "eval", "reference.pt")
    cache = torch.load(cache_path, map_location="cpu", weights_only=True) if os.path.isfile(cache_path) else None
    if cache is not None and cache.get("key") != key:
        say(f"{cache_path}: made for other data or settings; training a new classifier")
        cache = None
    net = metrics.SmallClassifier(**arch)
    if cache is None:
        say(f"training the FD classifier on {len(train_idx)} images of {data.path} "
            f"({opts.classifier_epochs} epochs, at least {CLASSIFIER_MIN_STEPS} steps)")
        _, train_x, train_y = load_items(ds, train_idx, seed=2)
        start = time.time()
        trained = metrics.train_classifier(train_x, train_y, num_classes, epochs=opts.classifier_epochs,
                                           device=device, log=say, min_steps=CLASSIFIER_MIN_STEPS)
        net.load_state_dict({k: v.cpu() for k, v in trained.state_dict().items()})
        net.to(device).eval()
        feats = metrics.extract_features(net, held_x)
        ref_stats = fid.feature_stats(feats[n_base:])
        cache = dict(key=key, classifier=net.state_dict(), seconds=time.time() - start, created=time.time(),
                     accuracy=metrics.class_consistency(net, held_x, held_y),
                     ref_mu=torch.from_numpy(ref_stats[0]), ref_sigma=torch.from_numpy(ref_stats[1]),
                     real_fd=metrics.frechet_to_stats(feats[:n_base], ref_stats), inception=None)
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        train.atomic_save(cache, cache_path)
        say(f"classifier: held-out accuracy {cache['accuracy']:.4f}, real-data FD floor {cache['real_fd']:.4g} "
            f"({time.time() - start:.0f} s)")
    else:
        net.load_state_dict(cache["classifier"])
        net.to(device).eval()

    inception_fn, fid_note = None, None
    if manifest["kind"] != "pixel" or ds.shape[0] != 3:
        fid_note = "n/a (FID-Inception needs RGB pixel data; latent runs: decode with sample.py --fid)"
    else:
        path, fid_note = metrics.inception_weights(opts.inception_weights)
        if path:
            try:
                inception_fn = fid.inception_feature_fn(path, device)
            except fid.FIDError as e:
                fid_note = str(e)
        if inception_fn is not None and (cache["inception"] or {}).get("weights") != path:
            say(f"Inception statistics of {len(held_idx) - n_base} held-out real images")
            ref = metrics.inception_stats(inception_fn, held_u8[n_base:])
            base = metrics.inception_stats(inception_fn, held_u8[:n_base])
            cache["inception"] = dict(weights=path, ref_mu=torch.from_numpy(ref[0]),
                                      ref_sigma=torch.from_numpy(ref[1]), real_fid=fid.frechet_distance(*base, *ref))
            train.atomic_save(cache, cache_path)
        if inception_fn is None:
            fid_note = f"n/a ({fid_note})"
    n_loss = min(opts.loss_batch, len(held_idx))
    return SimpleNamespace(
        device=device, manifest=manifest, kind=manifest["kind"], shape=ds.shape, num_classes=num_classes,
        classifier=net, accuracy=cache["accuracy"], ref_stats=(cache["ref_mu"].numpy(), cache["ref_sigma"].numpy()),
        real_fd=cache["real_fd"], inception_fn=inception_fn, inception=cache["inception"], fid_note=fid_note,
        loss_x=held_x[:n_loss], loss_y=held_y[:n_loss], held_desc=held_desc, n_held=len(held_idx), n_base=n_base,
        n_train=len(train_idx), fd_name=f"FD-{data.name}-classifier", cache_path=cache_path,
        classifier_id=f"{cache['created']:.6f}")


#################################################################################
#                                Scoring one run                                #
#################################################################################

@torch.no_grad()
def sample_fixed(model, ctx, opts, cfg_scale):
    """(samples in model space, labels): samples_per_class per class, class-major, from noise drawn
    up front on the CPU with --sample-seed, so every run and any batch size get the same noise."""
    diffusion = create_diffusion(f"ddim{opts.sample_steps}")
    labels = torch.arange(ctx.num_classes).repeat_interleave(opts.samples_per_class)
    noise = torch.randn(len(labels), *ctx.shape, generator=torch.Generator().manual_seed(opts.sample_seed))
    clip = ctx.kind == "pixel"  # latents are normalised per channel, not bounded
    out = []
    for i in range(0, len(labels), opts.eval_batch_size):
        z, y = noise[i:i + opts.eval_batch_size].to(ctx.device), labels[i:i + opts.eval_batch_size].to(ctx.device)
        if cfg_scale == 1.0:  # eps_u + 1 (eps_c - eps_u) = eps_c: the conditional model alone, half the work
            x = diffusion.ddim_sample_loop(model, z.shape, noise=z, clip_denoised=clip, model_kwargs=dict(y=y))
        else:
            z2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, ctx.num_classes)])
            x = diffusion.ddim_sample_loop(model.forward_with_cfg, z2.shape, noise=z2, clip_denoised=clip,
                                           model_kwargs=dict(y=y2, cfg_scale=cfg_scale))[: len(z)]
        out.append(x.float().cpu())
    return torch.cat(out), labels


def score_samples(samples, labels, ctx, run_dir, cfg_scale):
    """FD-classifier, class consistency and FID-Inception of one run's samples; the samples are
    kept in RUN/eval-samples-cfg<s>.npz (pixel: arr_0 uint8 N x H x W x 3, the ADM format)."""
    path = os.path.join(run_dir, f"eval-samples-cfg{cfg_scale:g}.npz")
    if ctx.kind == "pixel":  # quantised like the real images the classifier saw
        images = denormalize(samples.clamp(-1, 1), ctx.manifest)
        x = images.float() / 127.5 - 1
        np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
    else:
        images, x = None, samples
        np.savez(path, latents=samples.half().numpy(), labels=labels.numpy())
    feats = metrics.extract_features(ctx.classifier, x)
    entry = dict(fd=metrics.frechet_to_stats(feats, ctx.ref_stats), fd_network=ctx.fd_name,
                 class_consistency=metrics.class_consistency(ctx.classifier, x, labels),
                 fid=None, fid_network=None, fid_note=ctx.fid_note, npz=path)
    if ctx.inception_fn is not None and images is not None:
        entry.update(fid=inception_fid(ctx, images), fid_network="FID-Inception", fid_note=None)
    return entry


def inception_fid(ctx, images_nchw_uint8):
    stats = metrics.inception_stats(ctx.inception_fn, images_nchw_uint8)
    return fid.frechet_distance(*stats, ctx.inception["ref_mu"].numpy(), ctx.inception["ref_sigma"].numpy())


def add_missing_fid(run_dir, ctx):
    """A finished run scored before the Inception weights were on disk gets its FID from its npz."""
    if ctx.inception_fn is None:
        return
    path = os.path.join(run_dir, "results.json")
    result = read_json(path)
    changed = False
    for entry in (result or {}).get("samples", {}).values():
        if entry.get("fid") is None and os.path.isfile(entry.get("npz", "")):
            with np.load(entry["npz"]) as npz:
                if "arr_0" in npz.files:
                    images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)
                    entry.update(fid=inception_fid(ctx, images), fid_network="FID-Inception", fid_note=None)
                    changed = True
    if changed:
        write_json(path, result)


def training_record(run_dir, global_batch):
    """(last logged training loss, its step, median seconds per step) from metrics.jsonl."""
    records = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                records.append(record)
    if not records:
        return None, None, None
    step_time = float(np.median([global_batch / r["images_per_sec"] for r in records]))
    return records[-1]["loss"], records[-1]["step"], step_time


def evaluate_run(run_dir, opts, ctx):
    ckpt_path = final_checkpoint(run_dir, opts.num_steps)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**ckpt["args"])
    model = train.build_model(args, ckpt["manifest"])
    if ckpt["ema_power"]:  # the weights train.py samples its grid from: the widest power EMA
        sigma = max(ckpt["ema_power"], key=float)
        ema_name, ema_state = f"ema-{sigma}", ckpt["ema_power"][sigma]
    else:
        ema_name, ema_state = f"ema (classic, decay {args.ema_decay})", ckpt["ema"]
    diffusion = create_diffusion("")
    losses = {}
    for name, state in (("raw", ckpt["model"]), ("ema", ema_state)):
        model.load_state_dict(state)
        model.to(ctx.device).eval()
        losses[name] = metrics.heldout_loss(model, diffusion, ctx.loss_x, ctx.loss_y, seed=opts.sample_seed)
    samples = {}
    for cfg_scale in opts.cfg_scales:
        x, labels = sample_fixed(model, ctx, opts, cfg_scale)
        samples[f"{cfg_scale:g}"] = score_samples(x, labels, ctx, run_dir, cfg_scale)
    weight_norm = args.mp or args.use_weight_normalization
    final_loss, final_step, step_time = training_record(run_dir, args.global_batch_size)
    return dict(parameters=sum(p.numel() for p in model.parameters()), num_steps=ckpt["step"],
                optimizer=dict(name="Adam (0.9, 0.99)" if weight_norm else "AdamW", lr=args.lr,
                               warmup_steps=args.warmup_steps, decay_steps=args.decay_steps),
                step_time_s=step_time, final_train_loss=final_loss, final_train_loss_step=final_step,
                weights=ema_name, heldout_loss=losses, samples=samples, device=str(ctx.device),
                checkpoint=ckpt_path)


#################################################################################
#                              Running the grid                                 #
#################################################################################

def run_parallel(opts, argv, pending):
    """Each (configuration, seed) as `ablate.py ARGV --only CFG:SEED`, N at once; returns failures."""
    queue, running, failures = list(pending), {}, []
    while queue or running:
        while queue and len(running) < opts.parallel:
            cfg, seed = queue.pop(0)
            os.makedirs(run_root(opts, cfg, seed), exist_ok=True)
            log_path = os.path.join(run_root(opts, cfg, seed), "ablate.log")
            log = open(log_path, "a")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", f"{cfg}:{seed}"]
            running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)] = (cfg, seed, log, log_path)
            say(f"started {cfg} seed {seed} (log: {log_path})")
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            cfg, seed, log, log_path = running.pop(proc)
            log.close()
            if proc.returncode:
                failures.append(f"{cfg} seed {seed} (exit code {proc.returncode}; see {log_path})")
                say(f"FAILED {failures[-1]}")
            else:
                say(f"finished {cfg} seed {seed}")
    return failures


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse(argv)
        if opts.list:
            for cfg in opts.configs:
                label, flags = CONFIGS[cfg]
                print(f"{cfg:32s} {' '.join(flags) or '(no flags)':58s} {label}")
            return 0
        return run_grid(opts, argv)
    except (AblateError, train.UsageError, DataError, fid.FIDError) as e:
        print(f"ablate.py: error: {e}", file=sys.stderr)
        return 2


def run_grid(opts, argv):
    if opts.threads:
        torch.set_num_threads(opts.threads)
    data = prepare_data(opts)  # checks the data before anything is written
    os.makedirs(opts.results_dir, exist_ok=True)
    available, skipped = [], {}
    for cfg in opts.configs:
        args, why = parse_train(train_argv(opts, data, cfg, opts.seeds[0]))
        if args is None:
            skipped[cfg] = why
        else:
            available.append(cfg)
    if not available:
        raise AblateError(f"train.py refuses every configuration: {next(iter(skipped.values()))}")
    for cfg, why in skipped.items():
        say(f"skipping {cfg}: {why}")
    ctx = prepare_eval(opts, data)
    if opts.only:
        cfg, seed = opts.only
        if cfg not in available:
            raise AblateError(f"{cfg}: {skipped.get(cfg, 'not in this grid')}")
        run_one(opts, data, ctx, cfg, seed)
        return 0
    pending = [(cfg, seed) for cfg in available for seed in opts.seeds]
    failures = []
    if opts.parallel > 1:
        todo = []
        for cfg, seed in pending:  # finished runs are skipped here, not in a subprocess each
            argv_run = train_argv(opts, data, cfg, seed)
            run_dir = find_run(run_root(opts, cfg, seed), parse_train(argv_run)[0])
            if run_state(run_dir, argv_run, opts.num_steps, eval_key(opts, ctx)) == "done":
                run_one(opts, data, ctx, cfg, seed)
            else:
                todo.append((cfg, seed))
        failures = run_parallel(opts, argv, todo)
    else:
        for i, (cfg, seed) in enumerate(pending):
            run_one(opts, data, ctx, cfg, seed, position=f"[{i + 1}/{len(pending)}] ")
    summary = aggregate(opts, data, ctx, available, skipped)
    write_json(os.path.join(opts.results_dir, "results.json"), summary)
    with open(os.path.join(opts.results_dir, "table.md"), "w") as f:
        f.write(render_table(summary))
    figures = make_figures(opts, summary, ctx)
    say(f"table: {os.path.join(opts.results_dir, 'table.md')}")
    for path in figures:
        say(f"figure: {path}")
    if failures:
        say(f"{len(failures)} run(s) failed: " + "; ".join(failures))
        return 1
    return 0


#################################################################################
#                             Table and figures                                 #
#################################################################################

def collect(opts, data, ctx, cfg, seed):
    """A run's results.json if it belongs to this grid's arguments and evaluation settings."""
    argv = train_argv(opts, data, cfg, seed)
    run_dir = find_run(run_root(opts, cfg, seed), parse_train(argv)[0])
    result = read_json(os.path.join(run_dir, "results.json")) if run_dir else None
    if result and result.get("train_argv") == argv:
        if result.get("status") == "diverged" or result.get("eval_key") == eval_key(opts, ctx):
            return result
    return dict(config=cfg, seed=seed, status="missing")


def summarise(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                n=len(values), values=values)


def aggregate(opts, data, ctx, available, skipped):
    head = f"{opts.cfg_scales[0]:g}"
    rows = []
    for cfg in opts.configs:
        row = dict(config=cfg, label=CONFIGS[cfg][0], flags=CONFIGS[cfg][1])
        if cfg in skipped:
            rows.append(dict(row, status="skipped", reason=skipped[cfg]))
            continue
        runs = [collect(opts, data, ctx, cfg, seed) for seed in opts.seeds]
        ok = [r for r in runs if r["status"] == "ok"]
        row.update(status="ok" if ok else "no finished run", runs=runs,
                   seeds_ok=[r["seed"] for r in ok], diverged=[r["seed"] for r in runs if r["status"] == "diverged"])
        if ok:
            row.update(parameters=ok[0]["parameters"], optimizer=ok[0]["optimizer"], weights=ok[0]["weights"])
            row["summary"] = dict(
                step_time_s=summarise([r["step_time_s"] for r in ok]),
                final_train_loss=summarise([r["final_train_loss"] for r in ok]),
                ema_heldout_loss=summarise([r["heldout_loss"]["ema"]["loss"] for r in ok]),
                raw_heldout_loss=summarise([r["heldout_loss"]["raw"]["loss"] for r in ok]),
                **{f"cfg{s}": dict(fd=summarise([r["samples"][s]["fd"] for r in ok if s in r["samples"]]),
                                   class_consistency=summarise([r["samples"][s]["class_consistency"]
                                                                for r in ok if s in r["samples"]]),
                                   fid=summarise([r["samples"][s]["fid"] for r in ok if s in r["samples"]]))
                   for s in (f"{c:g}" for c in opts.cfg_scales)})
        rows.append(row)
    real = dict(items=ctx.n_base, fd=ctx.real_fd, class_consistency=ctx.accuracy,
                fid=(ctx.inception or {}).get("real_fid") if ctx.inception_fn else None)
    return dict(
        grid=opts.grid, headline_cfg=head, fd_network=ctx.fd_name, fid_network="FID-Inception",
        fid_note=ctx.fid_note, spread="mean ± sample standard deviation over seeds (ddof 1)",
        settings=dict(data=data.path, demo=data.demo, heldout=ctx.held_desc, model=opts.model, depth=opts.depth,
                      hidden_size=opts.hidden_size, num_heads=opts.num_heads, num_steps=opts.num_steps,
                      global_batch_size=opts.global_batch_size, seeds=opts.seeds, lr=opts.lr,
                      train_args=opts.train_args, sampler=f"DDIM-{opts.sample_steps}", cfg_scales=opts.cfg_scales,
                      samples_per_class=opts.samples_per_class, sample_seed=opts.sample_seed,
                      loss_batch=len(ctx.loss_x), device=str(ctx.device)),
        classifier=dict(accuracy=ctx.accuracy, train_items=ctx.n_train, heldout_items=ctx.n_held,
                        reference_items=ctx.n_held - ctx.n_base, features=metrics.FEATURE_DIM, cache=ctx.cache_path),
        real_data=real, rows=rows)


def _cell(stat, spec, scale=1.0):
    if stat is None:
        return "n/a"
    mean = format(stat["mean"] * scale, spec)
    return mean if stat["n"] == 1 else f"{mean} ± {format(stat['std'] * scale, spec)}"


def _optimizer(opt):
    text = f"{opt['name']} {opt['lr']:g}"
    if opt["warmup_steps"] or opt["decay_steps"]:
        text += f", warm-up {opt['warmup_steps']}, decay {opt['decay_steps']}"
    return text


def render_table(summary):
    s, head = summary["settings"], summary["headline_cfg"]
    fd, fid_col = summary["fd_network"], summary["fid_network"]
    lr_source = "--lr" if s["lr"] is not None else "train.py default"
    lines = [f"# Ablation grid `{summary['grid']}`", "",
             f"{s['model']} (depth {s['depth']}, width {s['hidden_size']}, {s['num_heads']} heads), "
             f"{s['num_steps']} steps at batch {s['global_batch_size']}, seeds {s['seeds']}; "
             f"samples: {s['sampler']}, cfg {head}, {s['samples_per_class']} per class from the widest power EMA. "
             f"Cells: {summary['spread']}; ↓ lower is better, ↑ higher.", "",
             f"| configuration | train.py flags | optimiser (lr) [{lr_source}] "
             f"| parameters | s/step | final train loss | EMA held-out loss ↓ | {fd} ↓ | class consistency % ↑ "
             f"| {fid_col} ↓ | seeds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in summary["rows"]:
        flags = f"`{' '.join(row['flags'])}`" if row["flags"] else "(none)"
        if "summary" not in row:
            why = row.get("reason") or (f"diverged (seeds {row['diverged']})" if row.get("diverged") else row["status"])
            lines.append(f"| {row['config']} | {flags} | {why} |" + " |" * 8)
            continue
        m, h = row["summary"], row["summary"][f"cfg{head}"]
        seeds = f"{len(row['seeds_ok'])}" + (f" (diverged: {row['diverged']})" if row["diverged"] else "")
        lines.append(f"| {row['config']} | {flags} | {_optimizer(row['optimizer'])} | {row['parameters']:,} "
                     f"| {_cell(m['step_time_s'], '.3g')} | {_cell(m['final_train_loss'], '.4f')} "
                     f"| {_cell(m['ema_heldout_loss'], '.4f')} | {_cell(h['fd'], '.3g')} "
                     f"| {_cell(h['class_consistency'], '.1f', 100)} | {_cell(h['fid'], '.3g')} | {seeds} |")
    real = summary["real_data"]
    real_fid = "n/a" if real["fid"] is None else format(real["fid"], ".3g")
    lines.append(f"| real data (held-out, {real['items']} images) | | | | | | | {real['fd']:.3g} "
                 f"| {100 * real['class_consistency']:.1f} | {real_fid} | |")
    for scale in summary["settings"]["cfg_scales"][1:]:
        key = f"cfg{scale:g}"
        lines += ["", f"With classifier-free guidance, cfg {scale:g} (all channels):", "",
                  f"| configuration | {fd} ↓ | class consistency % ↑ | {fid_col} ↓ |", "|---|---:|---:|---:|"]
        for row in summary["rows"]:
            if "summary" in row:
                h = row["summary"][key]
                lines.append(f"| {row['config']} | {_cell(h['fd'], '.3g')} "
                             f"| {_cell(h['class_consistency'], '.1f', 100)} | {_cell(h['fid'], '.3g')} |")
    c = summary["classifier"]
    weights = next((r["weights"] for r in summary["rows"] if "weights" in r), "ema")
    lines += ["", "Columns:", "",
              "- **optimiser (lr)**: train.py's defaults per configuration unless `--lr` was given: AdamW 1e-4 "
              "constant (DiT) without weight normalisation, Adam 1e-2 with linear warm-up and EDM2's "
              "lr / sqrt(max(step / decay, 1)) with it. The MP configurations differ in recipe, not only in layers.",
              "- **parameters**: all parameters of the model, the fixed position embedding included.",
              "- **s/step**: median over training log windows of batch / images per second (metrics.jsonl), "
              f"on {s['device']}; runs trained with `--parallel` share the device and read slower.",
              "- **final train loss**: the last logged training loss (mean over the last log window; MSE + VB).",
              f"- **EMA held-out loss**: the loss of the sampled weights ({weights}) on {s['loss_batch']} held-out "
              "images with timesteps spread evenly over [0, 1000) and fixed noise, the same for every run.",
              f"- **{fd}**: Frechet distance between the {c['features']}-d penultimate features of a small conv "
              f"classifier trained on the data ({c['train_items']} images, held-out accuracy "
              f"{100 * c['accuracy']:.1f}%) for the samples and for {c['reference_items']} held-out real images. "
              "It is biased upwards for few samples: the real-data row (as many real images as one run's "
              "samples) is the floor.",
              "- **class consistency**: the fraction of the samples generated for class k that the classifier "
              "labels k; for real data, the classifier's accuracy.",
              f"- **{fid_col}**: the standard FID (pytorch-fid's TF Inception) against the same held-out images"
              + (f"; {summary['fid_note']}." if summary["fid_note"] else "."),
              f"- Held-out data: {s['heldout']}.", ""]
    return "\n".join(lines)


def _text_width(draw, text):
    left, _, right, _ = draw.textbbox((0, 0), text)
    return right - left


def make_figures(opts, summary, ctx):
    """ablation_samples.png and ablation_magnitudes.png: the --compare configurations side by side,
    from the first seed both finished; copied to --visuals."""
    a, b = opts.compare
    rows = {r["config"]: r for r in summary["rows"]}
    seeds = [s for s in opts.seeds if all(s in rows.get(c, {}).get("seeds_ok", []) for c in (a, b))]
    if not seeds:
        say(f"no figures: no seed with finished runs of both {a} and {b}")
        return []
    runs = [next(r for r in rows[c]["runs"] if r["seed"] == seeds[0]) for c in (a, b)]
    titles = [f"{CONFIGS[c][0]} [{c}], seed {seeds[0]}" for c in (a, b)]
    written = []
    head = summary["headline_cfg"]
    if ctx.kind == "pixel":
        path = os.path.join(opts.results_dir, "ablation_samples.png")
        names = ctx.manifest.get("class_names") or [str(k) for k in range(ctx.num_classes)]
        sample_figure([r["samples"][head]["npz"] for r in runs], titles, names, path,
                      f"same classes and noise, DDIM-{opts.sample_steps}, cfg {head}")
        written.append(path)
    plots = [os.path.join(r["run_dir"], "magnitudes.png") for r in runs]
    if all(os.path.isfile(p) for p in plots):
        path = os.path.join(opts.results_dir, "ablation_magnitudes.png")
        magnitude_figure(plots, titles, path)
        written.append(path)
    if opts.visuals:
        os.makedirs(opts.visuals, exist_ok=True)
        for path in written:
            shutil.copy(path, os.path.join(opts.visuals, os.path.basename(path)))
    return written


def sample_figure(npz_paths, titles, class_names, path, subtitle):
    """One row per class; left block the first run's samples, right block the second's."""
    blocks = []
    for npz_path in npz_paths:
        with np.load(npz_path) as npz:
            images, labels = npz["arr_0"], npz["labels"]
        rows = [images[np.flatnonzero(labels == k)[:FIGURE_COLUMNS]] for k in range(len(class_names))]
        blocks.append(rows)
    h, w = blocks[0][0].shape[1:3]
    zoom = max(1, 64 // max(h, w))
    cell, gap, pad, header = zoom * w, 24, 2, 40
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(_text_width(probe, n) for n in class_names) + 12
    block_w = FIGURE_COLUMNS * (cell + pad)
    width = margin + 2 * block_w + gap
    canvas = Image.new("RGB", (width, header + len(class_names) * (zoom * h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 4), subtitle, fill="black")
    for j, (rows, title) in enumerate(zip(blocks, titles)):
        x0 = margin + j * (block_w + gap)
        draw.text((x0, 22), title, fill="black")
        for k, row in enumerate(rows):
            y0 = header + k * (zoom * h + pad)
            for i, image in enumerate(row):
                tile = Image.fromarray(image).resize((cell, zoom * h), Image.NEAREST)
                canvas.paste(tile, (x0 + i * (cell + pad), y0))
    for k, name in enumerate(class_names):
        draw.text((4, header + k * (zoom * h + pad) + zoom * h // 2 - 6), name, fill="black")
    canvas.save(path)


def magnitude_figure(plot_paths, titles, path):
    """The two runs' magnitudes.png, each under its title, one above the other: each plot is
    already two panels wide (activation RMS, weight RMS), so the same panels line up."""
    plots = [Image.open(p).convert("RGB") for p in plot_paths]
    gap, header = 16, 26
    canvas = Image.new("RGB", (max(p.width for p in plots), sum(header + p.height for p in plots) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for plot, title in zip(plots, titles):
        draw.text((70, y + 8), title, fill="black")
        canvas.paste(plot, (0, y + header))
        y += header + plot.height + gap
    canvas.save(path)


if __name__ == "__main__":
    sys.exit(main())
