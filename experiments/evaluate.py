"""The scorer of experiments/: the data a grid trains on, the evaluation context (feature_nets.py's
small classifier, held-out statistics, cached in RESULTS/eval-cache/) and the scores of one run:
FD in the classifier's features, class consistency, FID-Inception when the weights are on disk,
and the held-out loss on a fixed batch, timesteps and noise.
"""
import argparse
import hashlib
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

import evaluation
import feature_nets
import plots
import runs
from cli import UsageError
from data import LatentDataset, ShardWriter, build_dataset, denormalize, make_demo_dataset
from diffusion import LinearFlow
from feature_nets import INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL, dataset_items, find_weights, trained_classifier
from guidance import Guided
from sampling import GRID_SAMPLER, denoise, make_sampler

HELDOUT_ITEMS = 10_000  # cap on the held-out images the evaluation reads
LOG = {"name": "experiments"}  # the command's name in its log lines: ablate, study or sweep
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def say(message):
    print(f"[{LOG['name']}] {message}", file=sys.stderr, flush=True)


def summarise(values):
    """dict(mean, std, n, values) of the values that are not None (None if none is): std is the sample
    standard deviation (ddof 1), None for a single value, whose spread one value cannot tell."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
                n=len(values), values=values)


def md_table(header, rows):
    """Markdown table lines: the header, its rule, a line per row of cells."""
    return [f"| {' | '.join(map(str, row))} |" for row in (header, ["---"] * len(header), *rows)]


def prepare_data(opts, variant="colours", heldout_parts=1):
    """Where the training data and the held-out data live (rendering the demo `variant` if needed; its
    held-out rendering heldout_parts x the usual size, for a caller that splits it)."""
    demo = opts.data_path is None
    path, heldout = opts.data_path, opts.eval_data_path
    if demo:
        path = make_demo_dataset(os.path.join(opts.results_dir, "demo-data"), variant=variant)
        if heldout is None:  # the same generator with another seed: images no run trained on
            n = heldout_parts * max(6 * 10 * opts.samples_per_class, 2000)
            heldout = make_demo_dataset(os.path.join(opts.results_dir, f"demo-heldout-{n}"), num_items=n, seed=1,
                                        variant=variant)
    manifest = LatentDataset(path).manifest
    name = ("demo" if variant == "colours" else f"demo-{variant}") if demo else os.path.basename(os.path.normpath(path))
    return SimpleNamespace(path=os.path.abspath(path), heldout=heldout and os.path.abspath(heldout), demo=demo,
                           name=name, manifest=manifest)


def split_heldout(heldout, out_dir):
    """(validation, test): the pixel dataset `heldout` cut in two halves by a fixed permutation, written
    (once, through data.build_dataset) as datasets OUT_DIR/<name>-<hash of its path>-validation and -test."""
    heldout = os.path.abspath(heldout)
    ds = LatentDataset(heldout)
    if ds.kind != "pixel" or len(ds) < 8:
        raise UsageError(f"{heldout}: the validation / test split needs pixel images, at least 8 ({len(ds)} "
                          f"{ds.kind} items)")
    order = np.random.default_rng(0).permutation(len(ds))
    name = f"{os.path.basename(heldout)}-{hashlib.sha256(heldout.encode()).hexdigest()[:8]}"
    halves = (("validation", order[:len(ds) // 2]), ("test", order[len(ds) // 2:]))
    return tuple(write_part(ds, np.sort(index), os.path.join(out_dir, f"{name}-{part}"),
                            f"split_heldout({heldout}, {len(ds)} items): {part} half") for part, index in halves)


def write_part(ds, index, path, source):
    """The items `index` of the pixel dataset ds as a data.py dataset at path, made by `source`."""
    def write(folder):
        writer = ShardWriter(folder, "pixel", ds.shape, ds.num_classes)
        for shard, start in enumerate(range(0, len(index), writer.shard_size)):
            part = index[start:start + writer.shard_size]
            images = torch.stack([ds[int(i)][0] for i in part])
            writer.write_shard(shard, ds.labels[part], images=images.numpy())
        writer.finish(class_names=ds.manifest.get("class_names"), source=source)
    return build_dataset(path, source, write)


def prepare_eval(opts, data):
    """The evaluation context: held-out images (--eval-data-path, the demo's second rendering, else a
    fixed split of the data that the classifier does not train on), feature_nets' classifier, the
    held-out statistics and the real-data row."""
    ds = LatentDataset(data.path)
    held_ds = LatentDataset(data.heldout) if data.heldout else ds
    if (held_ds.shape, held_ds.num_classes) != (ds.shape, ds.num_classes):
        raise UsageError(f"{data.heldout}: shape {list(held_ds.shape)} and {held_ds.num_classes} classes differ "
                         f"from the training data's {list(ds.shape)} and {ds.num_classes}")
    n_samples = ds.num_classes * opts.samples_per_class
    # without held-out data a fixed split: the classifier never sees it (the diffusion models do)
    skip = 0 if data.heldout else min(HELDOUT_ITEMS, max(len(ds) // 10, min(len(ds) // 2, 6 * n_samples)))
    perm = np.random.default_rng(0).permutation(len(held_ds))  # trained_classifier's order on ds
    held_idx = np.sort(perm[:HELDOUT_ITEMS if data.heldout else skip])
    held_desc = f"{data.heldout} ({len(held_idx)} items)" if data.heldout else \
        f"{skip} items of {data.path} split off for the classifier (not held out from training)"
    if len(held_idx) < 4 or len(ds) - skip < 2:
        raise UsageError(f"{data.path}: too few items ({len(ds)}) to split off held-out data; pass --eval-data-path")
    cache = os.path.join(opts.results_dir, "eval-cache")  # train.py's name: its runs there share the classifier
    classifier = trained_classifier(ds, cache, DEVICE, say, skip=skip)
    held_x, held_y = dataset_items(held_ds, held_idx, seed=1)
    held_images = held_x if ds.kind != "pixel" else denormalize(held_x, ds.manifest).permute(0, 2, 3, 1).numpy()
    n_base = min(n_samples, len(held_idx) // 2)  # real images scored like one run's samples: the floor
    fid_note = None
    if ds.kind != "pixel" or ds.shape[0] != 3:
        fid_note = "n/a (FID-Inception needs RGB pixel data; latent runs: decode with sample.py --fid)"
    else:
        try:
            find_weights(opts.inception_weights, INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL, "--inception-weights")
        except UsageError as e:
            fid_note = f"n/a ({e})"
    ctx = SimpleNamespace(
        device=DEVICE, manifest=ds.manifest, kind=ds.kind, shape=ds.shape, num_classes=ds.num_classes,
        classifier=classifier, fid_reference=None if fid_note else held_images[n_base:], fid_note=fid_note,
        inception_weights=opts.inception_weights, cache=cache, loss_x=held_x[:opts.loss_batch],
        loss_y=held_y[:opts.loss_batch], held_desc=held_desc, n_held=len(held_idx), n_base=n_base,
        n_train=min(len(ds) - skip, feature_nets.CLASSIFIER_ITEMS), fd_name=f"FD-{data.name}-classifier",
        cache_path=os.path.join(cache, "reference.pt"),
        key=dict(classifier=classifier.key, heldout=held_desc, base_items=n_base, fid=fid_note is None))
    ctx.__dict__.update(real_data_row(ctx, held_x, held_y, held_images))
    return ctx


def real_data_row(ctx, held_x, held_y, held_images):
    """dict(accuracy, ref_stats, real_fd, real_fid): held-out items n_base on are the reference, those
    before it score as one run's samples would (the floor); cached in ctx.cache_path under ctx.key."""
    path = ctx.cache_path
    saved = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
    if saved is None or saved["key"] != ctx.key:
        feats = features(ctx.classifier, held_x)
        ref_mu, ref_sigma = evaluation.feature_stats(feats[ctx.n_base:])
        real_fd = evaluation.frechet_distance(*evaluation.feature_stats(feats[:ctx.n_base]), ref_mu, ref_sigma)
        saved = dict(key=ctx.key, accuracy=consistency(ctx.classifier, held_x, held_y), real_fd=real_fd,
                     ref_mu=torch.from_numpy(ref_mu), ref_sigma=torch.from_numpy(ref_sigma),
                     real_fid=None if ctx.fid_note else fid(ctx, held_images[:ctx.n_base]))
        os.makedirs(ctx.cache, exist_ok=True)
        runs.atomic_save(saved, path)
        say(f"classifier: held-out accuracy {saved['accuracy']:.4f}, real-data FD floor {saved['real_fd']:.4g}")
    return dict(accuracy=saved["accuracy"], ref_stats=(saved["ref_mu"].numpy(), saved["ref_sigma"].numpy()),
                real_fd=saved["real_fd"], real_fid=saved["real_fid"])


def features(classifier, x):
    """The classifier's features (N, 128), float64, of uint8 images (N, H, W, C) or model-space x (N, C, H, W)."""
    return evaluation.extract_features(classifier, x, batch_size=500, progress=False)["features"].astype(np.float64)


def consistency(classifier, x, labels):
    """The fraction of x that the classifier labels with its label."""
    predicted = torch.cat([classifier.predict(x[i:i + 500]) for i in range(0, len(x), 500)])
    return float((predicted == torch.as_tensor(labels).long().cpu()).float().mean())


def fid(ctx, images):
    """FID-Inception of uint8 images (N, H, W, 3) against the held-out reference (statistics cached)."""
    return evaluation.evaluate(images, ctx.fid_reference, ["fid"], inception_weights=ctx.inception_weights,
                               cache=ctx.cache, progress=False)["fid"]


def metric_networks(metric, dataset, cache):
    """The networks evaluation.evaluate needs beyond its own: for fd_classifier, train.py's small
    classifier of the dataset (cached in cache)."""
    return {"classifier": trained_classifier(dataset, cache, DEVICE, say)} if metric == "fd_classifier" else {}


def real_floor(dataset, n, reference, metric, networks, cache, inception_weights=None):
    """The metric of n training images (a fixed draw) against the reference: what a model that drew
    the data itself would score at this sample size (the floor of FD and FID, biased upwards for few)."""
    index = np.random.default_rng(0).permutation(len(dataset))[:n]
    images = np.stack([dataset[int(i)][0].permute(1, 2, 0).numpy() for i in index])
    return evaluation.evaluate(images, reference, [metric], networks=networks, cache=cache,
                               inception_weights=inception_weights, progress=False)[metric]


@torch.no_grad()
def sample_fixed(model, args, ctx, opts, cfg_scale):
    """(samples in model space, labels): samples_per_class per class, class-major, by the grid sampler of
    the run's objective (args: its saved arguments) guided at cfg_scale, from noise drawn on the CPU with
    --sample-seed (the same for every run and batch size)."""
    sampler = make_sampler(GRID_SAMPLER[args.objective], opts.sample_steps, args.prediction)
    labels = torch.arange(ctx.num_classes).repeat_interleave(opts.samples_per_class)
    noise = torch.randn(len(labels), *ctx.shape, generator=torch.Generator().manual_seed(opts.sample_seed))
    out = [denoise(Guided(model, cfg_scale, objective=args.objective), sampler, noise[i:i + opts.eval_batch_size].to(ctx.device),
                   labels[i:i + opts.eval_batch_size].to(ctx.device), clip_denoised=ctx.kind == "pixel").float().cpu()
           for i in range(0, len(labels), opts.eval_batch_size)]  # latents are normalised per channel, not bounded
    return torch.cat(out), labels


def score_samples(samples, labels, ctx, run_dir, cfg_scale):
    """FD-classifier, class consistency and FID-Inception of one run's samples; the samples are
    kept in RUN/eval-samples-cfg<s>.npz (pixel: arr_0 uint8 N x H x W x 3, the ADM format)."""
    path = os.path.join(run_dir, f"eval-samples-cfg{cfg_scale:g}.npz")
    if ctx.kind == "pixel":  # quantised like the real images the classifier saw
        x = denormalize(samples.clamp(-1, 1), ctx.manifest).permute(0, 2, 3, 1).numpy()
        np.savez(path, arr_0=x, labels=labels.numpy())
    else:
        x = samples
        np.savez(path, latents=samples.half().numpy(), labels=labels.numpy())
    entry = dict(fd=evaluation.frechet_distance(*evaluation.feature_stats(features(ctx.classifier, x)), *ctx.ref_stats),
                 fd_network=ctx.fd_name, class_consistency=consistency(ctx.classifier, x, labels),
                 fid=None, fid_network=None, fid_note=ctx.fid_note, npz=path)
    if ctx.fid_reference is not None and ctx.kind == "pixel":
        entry.update(fid=fid(ctx, x), fid_network="FID-Inception", fid_note=None)
    return entry


@torch.no_grad()
def heldout_loss(model, diffusion, x, y, seed=0, batch_size=256):
    """Mean loss, mse and vb of `model` (eval mode: no label dropout) on x (N, C, H, W), labels y, with
    times spread evenly (DDPM's timesteps over [0, T), a flow's t over (0, 1)) and noise seeded with `seed`:
    the same (x, t, noise) for every model of an objective."""
    device = next(model.parameters()).device
    n = len(x)
    t_all = (torch.arange(n) + 0.5) / n if isinstance(diffusion, LinearFlow) else torch.arange(n) * diffusion.num_timesteps // n
    noise_all = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        terms = diffusion.training_losses(model, x[sl].to(device), t_all[sl].to(device),
                                          dict(y=torch.as_tensor(y[sl]).to(device)), noise=noise_all[sl].to(device))
        for k in totals:
            totals[k] += terms[k].double().sum().item()
    return {k: v / n for k, v in totals.items()}


def training_record(run_dir, global_batch):
    """(last logged training loss, its step, median seconds per step) from metrics.jsonl."""
    records = [r for r in plots.read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    if not records:
        return None, None, None
    step_time = float(np.median([global_batch / r["images_per_sec"] for r in records]))
    return records[-1]["loss"], records[-1]["step"], step_time


def evaluate_run(run_dir, ckpt_path, opts, ctx):
    ckpt = runs.load_checkpoint(ckpt_path)
    args = argparse.Namespace(**runs.saved_args(ckpt))
    model = runs.build_model(args, ckpt["manifest"])
    if ckpt["ema_power"]:  # the weights train.py samples its grid from: the widest power EMA
        sigma = max(ckpt["ema_power"], key=float)
        ema_name, ema_state = f"ema-{sigma}", ckpt["ema_power"][sigma]
    else:
        ema_name, ema_state = f"ema (classic, decay {args.ema_decay})", ckpt["ema"]
    diffusion = runs.training_objective(args)
    losses = {}
    for name, state in (("raw", ckpt["model"]), ("ema", ema_state)):
        model.load_state_dict(state)
        model.to(ctx.device).eval().requires_grad_(False)  # frozen: MPLinear caches its weights
        losses[name] = heldout_loss(model, diffusion, ctx.loss_x, ctx.loss_y, seed=opts.sample_seed)
    samples = {}
    for cfg_scale in opts.cfg_scales:
        x, labels = sample_fixed(model, args, ctx, opts, cfg_scale)
        samples[f"{cfg_scale:g}"] = score_samples(x, labels, ctx, run_dir, cfg_scale)
    weight_norm = args.mp or args.use_weight_normalization
    final_loss, final_step, step_time = training_record(run_dir, args.global_batch_size)
    return dict(parameters=sum(p.numel() for p in model.parameters()), num_steps=ckpt["step"],
                optimizer=dict(name="Adam (0.9, 0.99)" if weight_norm else "AdamW", lr=args.lr,
                               warmup_steps=args.warmup_steps, decay_steps=args.decay_steps),
                step_time_s=step_time, final_train_loss=final_loss, final_train_loss_step=final_step,
                weights=ema_name, heldout_loss=losses, samples=samples, device=str(ctx.device),
                checkpoint=ckpt_path)
