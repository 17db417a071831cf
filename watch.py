"""What train.py shows of a run's samples while it trains: sample grids from fixed noise and labels
(SampleGrids), and evaluation metrics of a fixed set of samples (Evaluation, on evaluation.py).

Grids are drawn with DDIM (--sample-steps) and classifier-free guidance (scale 4, on all channels)
from the weights sample.py uses by default (the widest tracked power EMA, else the classic EMA);
latent samples are decoded with the VAE the dataset's manifest names. The noise and labels are
drawn once from the run's seed, so consecutive grids differ only by training, and the same seed and
weights give the same pixels.
"""
import hashlib
import json
import os
import time

import numpy as np
import torch
from PIL import Image

import evaluation
from data import decode
from diffusion import create_diffusion
from download import Fail, load_vae

GRID_COLUMNS = 8
GRID_MAX_ROWS = 10  # classes shown: all of them up to 10, else 10 spread over the label range
GRID_CFG = 4.0
CLASSIFIER_ITEMS, CLASSIFIER_STEPS = 2000, 100  # the fallback evaluation classifier's images and optimiser steps


def sampling_weights(ema, power_emas):
    """The weights sample.py samples from by default: the widest power EMA, else the classic EMA."""
    return power_emas[max(power_emas)] if power_emas else ema


def open_decoder(manifest):
    """(VAE or None, None) for latent data, or (None, why not) when it cannot be loaded; (None, None) for pixels."""
    if manifest["kind"] == "pixel":
        return None, None
    source = manifest.get("vae_path") if os.path.isdir(manifest.get("vae_path") or "") else manifest.get("vae")
    if not source:
        return None, "the dataset's manifest names no VAE"
    try:
        return load_vae(source), None
    except Fail as e:
        return None, str(e)


@torch.no_grad()
def generate(model, z, y, manifest, vae, diffusion, cfg_scale, batch_size=256):
    """uint8 images (N, H, W, 3), numpy, from noise z (N, C, h, w) and labels y (N,): DDIM with
    guidance (cfg_scale 1: the conditional model alone), denormalised, decoded by the VAE for latents."""
    device = next(model.parameters()).device
    vae = vae.to(device) if vae is not None else None
    out = []
    for zb, yb in zip(z.split(batch_size), y.split(batch_size)):
        zb, yb = zb.to(device), yb.to(device)
        if cfg_scale == 1:
            model_fn, kwargs = model, dict(y=yb)
        else:
            zb = torch.cat([zb, zb])
            model_fn = model.forward_with_cfg
            kwargs = dict(y=torch.cat([yb, torch.full_like(yb, model.num_classes)]), cfg_scale=cfg_scale)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            x = diffusion.ddim_sample_loop(model_fn, zb.shape, noise=zb, clip_denoised=manifest["kind"] == "pixel",
                                           model_kwargs=kwargs, device=device)[: len(yb)].float()
        out.append(decode(x, manifest, vae))
    return np.concatenate(out)


def grid_labels(num_classes, rows=GRID_MAX_ROWS):
    """The classes of the grid's rows: all of them, or `rows` spread evenly over [0, num_classes)."""
    if num_classes <= rows:
        return torch.arange(num_classes)
    return torch.linspace(0, num_classes - 1, rows).round().long()


def tile(images, rows):
    """uint8 (rows * columns, H, W, 3) -> one (rows * H, columns * W, 3) image, row-major."""
    n, h, w, c = images.shape
    return images.reshape(rows, n // rows, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, -1, c)


class SampleGrids:
    """Grids of the same noise and labels: one row per class (grid_labels), GRID_COLUMNS columns.
    grids(model, step) writes samples/NNNNNNN.png under run_dir and returns the grid (H, W, 3)."""

    def __init__(self, run_dir, manifest, prediction, sample_steps, seed, vae=None):
        self.folder, self.manifest, self.vae = os.path.join(run_dir, "samples"), manifest, vae
        self.diffusion = create_diffusion(f"ddim{sample_steps}", prediction=prediction)
        labels = grid_labels(int(manifest["num_classes"]))
        self.rows = len(labels)
        self.y = labels.repeat_interleave(GRID_COLUMNS)
        generator = torch.Generator().manual_seed(seed)
        self.z = torch.randn(len(self.y), *manifest["shape"], generator=generator)

    def __call__(self, model, step):
        grid = tile(generate(model, self.z, self.y, self.manifest, self.vae, self.diffusion, GRID_CFG), self.rows)
        if grid.shape[0] < 64 * self.rows:  # small images: shown at twice their size
            grid = grid.repeat(2, 0).repeat(2, 1)
        os.makedirs(self.folder, exist_ok=True)
        path = self.path(step)
        Image.fromarray(grid).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        return grid, path

    def path(self, step):
        return os.path.join(self.folder, f"{step:07d}.png")

    @classmethod
    def for_run(cls, run_dir, manifest, args, log):
        """The grids of a train.py run (args: prediction, sample_steps, seed), or None with one log
        line when latent samples cannot be decoded."""
        vae, why_not = open_decoder(manifest)
        if manifest["kind"] == "latent" and vae is None:
            log(f"no sample grids: the VAE to decode them did not load ({why_not})")
            return None
        return cls(run_dir, manifest, args.prediction, args.sample_steps, args.seed, vae)


#################################################################################
#                           Evaluation during training                          #
#################################################################################

class ImageClassifier:
    """experiments/metrics.py's SmallClassifier, trained on the run's pixel data, as an evaluation
    feature network on uint8 images (B, H, W, 3): {"features": its 128-d penultimate layer}. Its key
    names the cached weights file, so reference statistics are recomputed when it is retrained."""

    name = "classifier"

    def __init__(self, net, key):
        self.net, self.key = net.eval(), key
        self.device = next(net.parameters()).device
        self.outputs = {"features": net.config["feature_dim"]}

    @torch.no_grad()
    def __call__(self, batch):
        x = torch.tensor(np.asarray(batch)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy: memmaps are read-only
        return {"features": self.net.features(x)}


def demo_classifier(dataset, cache_dir, device, log, items=CLASSIFIER_ITEMS):
    """An ImageClassifier trained on up to `items` images of a pixel dataset with metrics.train_classifier
    (cached in cache_dir, keyed by the dataset's manifest and the recipe; rank 0 trains, the others wait)."""
    from experiments import metrics  # the classifier and its recipe live with the ablation metrics
    rank, world = evaluation.rank_world()
    recipe = dict(manifest=dataset.manifest, items=items, steps=CLASSIFIER_STEPS, recipe=metrics.CLASSIFIER_RECIPE,
                  arch=metrics.SmallClassifier(dataset.shape[0], dataset.num_classes).config)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"classifier-{digest}.pt")
    if rank == 0 and not os.path.isfile(path):
        start = time.time()
        index = np.random.default_rng(0).permutation(len(dataset))[:items]
        x = torch.stack([dataset[int(i)][0] for i in index]).float() / 127.5 - 1
        net = metrics.train_classifier(x, torch.as_tensor(dataset.labels[index]), dataset.num_classes,
                                       min_steps=CLASSIFIER_STEPS)
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(net.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        log(f"trained the evaluation classifier on {len(index)} images in {time.time() - start:.0f} s: {path}")
    if world > 1:
        torch.distributed.barrier()
    net = metrics.SmallClassifier(**recipe["arch"])
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return ImageClassifier(net.to(device), f"SmallClassifier/{digest}")


class Evaluation:
    """--eval-every: `samples` images from fixed noise and labels (uniform over the classes) drawn
    from the sampling weights, scored by evaluation.evaluate against `reference` (the training data
    for pixel runs) with its statistics cached in cache_dir. Every rank draws rows rank::world and
    calls evaluate (which shares the feature extraction); every rank gets the results."""

    def __init__(self, manifest, prediction, sample_steps, seed, samples, metrics, reference, cache_dir,
                 cfg_scale=1.0, vae=None, networks=None):
        self.manifest, self.vae, self.cfg_scale = manifest, vae, cfg_scale
        self.metrics, self.reference, self.cache_dir, self.networks = metrics, reference, cache_dir, networks or {}
        self.diffusion = create_diffusion(f"ddim{sample_steps}", prediction=prediction)
        generator = torch.Generator().manual_seed(seed + 1)  # not the grids' noise
        self.y = torch.arange(samples) % int(manifest["num_classes"])
        self.z = torch.randn(samples, *manifest["shape"], generator=generator)

    def images(self, model):
        """All `samples` images (N, H, W, 3) uint8, each rank drawing its rows and all ranks gathering them."""
        rank, world = evaluation.rank_world()
        mine = generate(model, self.z[rank::world], self.y[rank::world], self.manifest, self.vae, self.diffusion,
                        self.cfg_scale)
        if world == 1:
            return mine
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        images = np.empty((len(self.y), *mine.shape[1:]), np.uint8)
        for r, part in enumerate(parts):
            images[r::world] = part
        return images

    def __call__(self, model):
        """{metric: value} of model's samples (the keys evaluation.evaluate returns)."""
        return evaluation.evaluate(self.images(model), self.reference, self.metrics, networks=self.networks,
                                   cache=self.cache_dir, progress=False)

    @classmethod
    def for_run(cls, args, dataset, cache_dir, device, log, vae=None):
        """The evaluation of a train.py run (args: eval_samples, eval_metrics, eval_reference,
        eval_cfg_scale, prediction, sample_steps, seed); logs what it measures and with which network."""
        networks = {}
        if "fd_classifier" in args.eval_metrics:
            networks["classifier"] = demo_classifier(dataset, cache_dir, device, log)
            log("evaluation: fd_classifier is the Frechet distance of the 128-d features of a small classifier "
                "trained on this data (experiments/metrics.py; not comparable to FID)")
        reference = args.eval_reference or dataset.path
        log(f"evaluation every {args.eval_every} steps: {', '.join(args.eval_metrics)} of {args.eval_samples} "
            f"samples (DDIM-{args.sample_steps}, cfg {args.eval_cfg_scale:g}) against {reference}")
        return cls(dataset.manifest, args.prediction, args.sample_steps, args.seed, args.eval_samples,
                   args.eval_metrics, reference, cache_dir, args.eval_cfg_scale, vae, networks)


def eval_metrics_for(requested, kind):
    """The --eval-metrics to use: those requested, else fid when the Inception weights are found,
    else fd_classifier for pixel data. Raises ValueError with the reason when they cannot be computed."""
    if requested is None:
        if "fid" in evaluation.available_metrics():
            return ["fid"]
        if kind != "pixel":
            raise ValueError("FID needs the Inception weights (pt_inception-2015-12-05-6726825d.pth; see "
                             "fid.py --help) and the fallback fd_classifier needs pixel data")
        return ["fd_classifier"]
    names = evaluation.parse_metrics(requested, networks=("classifier",))
    missing = [m for m in names if m in evaluation.METRICS and m not in evaluation.available_metrics()]
    if missing:
        raise ValueError(f"{missing[0]} needs weights that are not found (see fid.py --help for where they go)")
    if "fd_classifier" in names and kind != "pixel":
        raise ValueError("fd_classifier needs pixel data")
    return names
