"""Evaluation for experiments/ablate.py: the data a grid trains and is scored on, the FD classifier
and reference statistics (trained once, cached in RESULTS/eval/), and the scoring of one trained
run (held-out loss, fixed-noise samples, FD, class consistency, FID). Also the small pieces that
ablate.py and report.py share: UsageError, say, read_json, write_json.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

import evaluation
import runs
from cli import UsageError
from data import LatentDataset, ShardWriter, denormalize, make_demo_dataset, read_manifest
from diffusion import create_diffusion
from experiments import metrics

CLASSIFIER_ITEMS, HELDOUT_ITEMS = 20_000, 10_000  # caps on the real images the evaluation reads
CLASSIFIER_MIN_STEPS = 300  # optimiser steps of the FD classifier however small the dataset



def say(message):
    print(f"[ablate] {message}", file=sys.stderr, flush=True)


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


#################################################################################
#                     Evaluation data, classifier and reference                 #
#################################################################################

def prepare_data(opts, variant="colours", heldout_parts=1):
    """Where the training data and the held-out data live (rendering the demo `variant` if needed; its
    held-out rendering heldout_parts x the usual size, for a caller that splits it)."""
    demo = opts.data_path is None
    try:
        if demo:
            path = make_demo_dataset(os.path.join(opts.results_dir, "demo-data"), variant=variant)
            heldout = opts.eval_data_path
            if heldout is None:  # the same generator with another seed: images no run trained on
                n = heldout_parts * max(6 * 10 * opts.samples_per_class, 2000)
                heldout = make_demo_dataset(os.path.join(opts.results_dir, f"demo-heldout-{n}"),
                                            num_items=n, seed=1, variant=variant)
        else:
            path, heldout = opts.data_path, opts.eval_data_path
        manifest = LatentDataset(path).manifest
    except UsageError as e:
        raise UsageError(str(e))
    name = ("demo" if variant == "colours" else f"demo-{variant}") if demo else os.path.basename(os.path.normpath(path))
    return SimpleNamespace(path=os.path.abspath(path), heldout=heldout and os.path.abspath(heldout), demo=demo,
                           name=name, manifest=manifest)


def split_heldout(heldout, out_dir):
    """(validation, test): the pixel dataset `heldout` cut in two halves by a fixed permutation, written
    as data.py datasets OUT_DIR/<name>-<hash of its path>-validation and -test, so that one half can
    choose what the other reports. Reused when already there; each is built in a private folder and
    renamed into place, so processes that split at the same time do not disturb each other."""
    heldout = os.path.abspath(heldout)
    try:
        ds = LatentDataset(heldout)
    except UsageError as e:
        raise UsageError(str(e))
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
    if os.path.isdir(path):
        if read_manifest(path).get("source") == source:
            return path
        raise UsageError(f"{path}: holds another dataset than {source}; remove it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=os.path.dirname(path))
    try:
        writer = ShardWriter(partial, "pixel", ds.shape, ds.num_classes)
        for shard, start in enumerate(range(0, len(index), writer.shard_size)):
            images, _, labels = load_items(ds, index[start:start + writer.shard_size])
            writer.write_shard(shard, labels.numpy(), images=images.numpy())
        writer.finish(class_names=ds.manifest.get("class_names"), source=source)
        os.chmod(partial, 0o755)  # mkdtemp makes it private
        try:
            os.rename(partial, path)  # fails if another process put it there first
        except OSError:
            if read_manifest(path).get("source") != source:
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


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
    except UsageError as e:
        raise UsageError(str(e))
    manifest = ds.manifest
    if (held_ds.shape, held_ds.num_classes) != (ds.shape, ds.num_classes):
        raise UsageError(f"{data.heldout}: shape {list(held_ds.shape)} and {held_ds.num_classes} classes differ "
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
        raise UsageError(f"{data.path}: too few items ({len(ds)}) to split off held-out data; pass --eval-data-path")
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
                                           device=device, min_steps=CLASSIFIER_MIN_STEPS)
        net.load_state_dict({k: v.cpu() for k, v in trained.state_dict().items()})
        net.to(device).eval()
        feats = metrics.extract_features(net, held_x)
        ref_stats = evaluation.feature_stats(feats[n_base:])
        cache = dict(key=key, classifier=net.state_dict(), seconds=time.time() - start, created=time.time(),
                     accuracy=metrics.class_consistency(net, held_x, held_y),
                     ref_mu=torch.from_numpy(ref_stats[0]), ref_sigma=torch.from_numpy(ref_stats[1]),
                     real_fd=metrics.frechet_to_stats(feats[:n_base], ref_stats), inception=None)
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        runs.atomic_save(cache, cache_path)
        say(f"classifier: held-out accuracy {cache['accuracy']:.4f}, real-data FD floor {cache['real_fd']:.4g} "
            f"({time.time() - start:.0f} s)")
    else:
        net.load_state_dict(cache["classifier"])
        net.to(device).eval()

    inception_fn, fid_note = None, None
    if manifest["kind"] != "pixel" or ds.shape[0] != 3:
        fid_note = "n/a (FID-Inception needs RGB pixel data; latent runs: decode with sample.py --fid)"
    else:
        inception_fn, fid_note = metrics.inception_network(opts.inception_weights, device)
        path = inception_fn and inception_fn.key
        if inception_fn is not None and (cache["inception"] or {}).get("weights") != path:
            say(f"Inception statistics of {len(held_idx) - n_base} held-out real images")
            ref = metrics.inception_stats(inception_fn, held_u8[n_base:])
            base = metrics.inception_stats(inception_fn, held_u8[:n_base])
            cache["inception"] = dict(weights=path, ref_mu=torch.from_numpy(ref[0]),
                                      ref_sigma=torch.from_numpy(ref[1]), real_fid=evaluation.frechet_distance(*base, *ref))
            runs.atomic_save(cache, cache_path)
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
def sample_fixed(model, prediction, ctx, opts, cfg_scale):
    """(samples in model space, labels): samples_per_class per class, class-major, from noise drawn
    up front on the CPU with --sample-seed, so every run and any batch size get the same noise."""
    diffusion = create_diffusion(f"ddim{opts.sample_steps}", prediction=prediction)
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
    return evaluation.frechet_distance(*stats, ctx.inception["ref_mu"].numpy(), ctx.inception["ref_sigma"].numpy())


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


def evaluate_run(run_dir, ckpt_path, opts, ctx):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**runs.saved_args(ckpt))
    model = runs.build_model(args, ckpt["manifest"])
    if ckpt["ema_power"]:  # the weights train.py samples its grid from: the widest power EMA
        sigma = max(ckpt["ema_power"], key=float)
        ema_name, ema_state = f"ema-{sigma}", ckpt["ema_power"][sigma]
    else:
        ema_name, ema_state = f"ema (classic, decay {args.ema_decay})", ckpt["ema"]
    diffusion = create_diffusion("", prediction=args.prediction)
    losses = {}
    for name, state in (("raw", ckpt["model"]), ("ema", ema_state)):
        model.load_state_dict(state)
        model.to(ctx.device).eval().requires_grad_(False)  # frozen: MPLinear caches its weights
        losses[name] = metrics.heldout_loss(model, diffusion, ctx.loss_x, ctx.loss_y, seed=opts.sample_seed)
    samples = {}
    for cfg_scale in opts.cfg_scales:
        x, labels = sample_fixed(model, args.prediction, ctx, opts, cfg_scale)
        samples[f"{cfg_scale:g}"] = score_samples(x, labels, ctx, run_dir, cfg_scale)
    weight_norm = args.mp or args.use_weight_normalization
    final_loss, final_step, step_time = training_record(run_dir, args.global_batch_size)
    return dict(parameters=sum(p.numel() for p in model.parameters()), num_steps=ckpt["step"],
                optimizer=dict(name="Adam (0.9, 0.99)" if weight_norm else "AdamW", lr=args.lr,
                               warmup_steps=args.warmup_steps, decay_steps=args.decay_steps),
                step_time_s=step_time, final_train_loss=final_loss, final_train_loss_step=final_step,
                weights=ema_name, heldout_loss=losses, samples=samples, device=str(ctx.device),
                checkpoint=ckpt_path)
