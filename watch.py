"""What train.py shows of a run's samples while it trains: sample grids from fixed noise and labels
(SampleGrids), and evaluation metrics of samples drawn as `sample.py --fid` draws them (Evaluation).

Both sample with DDIM (--sample-steps) through sampling.py, from the weights sample.py uses by
default (the widest tracked power EMA, else the classic EMA); latent samples are decoded by the VAE
train.py opens (download.open_decoder) on every process that decodes. Grids use classifier-free
guidance (scale 4, all channels) on noise and labels drawn once from the run's seed, so consecutive
grids differ only by training. An evaluation at step s draws exactly the images of
`sample.py --result-dir RUN --fid K --sampler ddim --num-sampling-steps S --cfg-scale C --seed SEED`
at that step's checkpoint (chunks of EVAL_BATCH, chunk k's noise and labels from (seed, k)), so its
numbers can be checked with fid.py.
"""
import os

import numpy as np
import torch

import evaluation
import feature_nets
from cli import UsageError
from eval_inputs import Side
from guidance import Guided
from sampling import (chunk_sizes, make_sampler, row_names, sample_chunk, sample_images, sampling_weights_name,
                      save_grid)

GRID_COLUMNS = 8
GRID_MAX_ROWS = 10  # classes shown: all of them up to 10, else 10 spread over the label range
GRID_CFG = 4.0
EVAL_BATCH = 64  # samples per chunk of an evaluation: sample.py's default --batch-size


def sampling_weights(ema, power_emas):
    """The weights sample.py samples from by default (sampling.sampling_weights_name): the widest power
    EMA, else the classic EMA."""
    return power_emas[max(power_emas)] if power_emas else ema


def grid_labels(num_classes, rows=GRID_MAX_ROWS):
    """The classes of the grid's rows: all of them, or `rows` spread evenly over [0, num_classes)."""
    if num_classes <= rows:
        return torch.arange(num_classes)
    return torch.linspace(0, num_classes - 1, rows).round().long()


class SampleGrids:
    """Grids of the same noise and labels: one row per class (grid_labels, named when the manifest names
    the classes), GRID_COLUMNS columns, written by sampling.save_grid as sample.py writes its grids.
    grids(model, step) writes samples/NNNNNNN.png under run_dir and returns (the grid (H, W, 3), its path)."""

    def __init__(self, run_dir, manifest, prediction, sample_steps, seed, vae=None):
        self.folder, self.manifest, self.vae = os.path.join(run_dir, "samples"), manifest, vae
        self.sampler = make_sampler("ddim", sample_steps, prediction)
        self.labels = grid_labels(int(manifest["num_classes"]))
        self.y = self.labels.repeat_interleave(GRID_COLUMNS)
        generator = torch.Generator().manual_seed(seed)
        self.z = torch.randn(len(self.y), *manifest["shape"], generator=generator)

    def __call__(self, model, step):
        device = next(model.parameters()).device
        images = sample_images(Guided(model, GRID_CFG), self.sampler, self.z.to(device), self.y, self.manifest,
                               self.vae, bf16=device.type == "cuda")
        os.makedirs(self.folder, exist_ok=True)
        return save_grid(images, len(self.labels), self.path(step), row_names(self.manifest, self.labels)), \
            self.path(step)

    def path(self, step):
        return os.path.join(self.folder, f"{step:07d}.png")


#################################################################################
#                           Evaluation during training                          #
#################################################################################

class Evaluation:
    """--eval-every: `samples` images drawn from the sampling weights as `sample.py --fid` draws them
    (chunks of EVAL_BATCH; chunk k's noise and uniform labels from (seed, k); DDIM), scored by
    evaluation.evaluate against `reference` (the training data for pixel runs) with its statistics
    cached in cache_dir. Rank r draws the chunks k with k % world == r, as sample.py does, and every
    rank calls evaluate (which shares the feature extraction); every rank gets the results."""

    def __init__(self, manifest, prediction, sample_steps, seed, samples, metrics, reference, cache_dir,
                 cfg_scale=1.0, vae=None, networks=None):
        self.manifest, self.vae, self.cfg_scale, self.seed = manifest, vae, cfg_scale, seed
        self.metrics, self.reference, self.cache_dir, self.networks = metrics, reference, cache_dir, networks or {}
        self.sampler = make_sampler("ddim", sample_steps, prediction)
        self.sizes = chunk_sizes(samples, EVAL_BATCH)

    @torch.no_grad()
    def images(self, model):
        """All the samples (N, H, W, 3) uint8, in chunk order on every rank. The global RNG, which
        chunk_inputs seeds, is the training's again afterwards."""
        rank, world = evaluation.rank_world()
        device = next(model.parameters()).device
        chunks = {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for k in range(rank, len(self.sizes), world):
                chunks[k] = sample_chunk(Guided(model, self.cfg_scale), self.sampler, self.manifest, self.seed, k,
                                         self.sizes[k], self.vae, bf16=device.type == "cuda")[0]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, chunks)
            chunks = {k: v for part in parts for k, v in part.items()}
        return np.concatenate([chunks[k] for k in range(len(self.sizes))])

    def __call__(self, model):
        """{metric: value} of model's samples (the keys evaluation.evaluate returns)."""
        return evaluation.evaluate(self.images(model), self.reference, self.metrics, networks=self.networks,
                                   cache=self.cache_dir, progress=False)

    @classmethod
    def for_run(cls, args, dataset, cache_dir, device, log, vae=None):
        """The evaluation of a train.py run (args: eval_samples, eval_metrics, eval_reference,
        eval_cfg_scale, prediction, sample_steps, seed, ema_sigma_rels); logs what it measures, with
        which network, and the sample.py command that draws the same images."""
        networks = {}
        if "fd_classifier" in args.eval_metrics:
            networks["classifier"] = feature_nets.trained_classifier(dataset, cache_dir, device, log)
            log("evaluation: fd_classifier is the Frechet distance of the 128-d features of a small classifier "
                "trained on this data (feature_nets.py; not comparable to FID)")
        reference = args.eval_reference or dataset.path
        log(f"evaluation every {args.eval_every} steps: {', '.join(args.eval_metrics)} of {args.eval_samples} "
            f"samples against {reference}, the images of `python sample.py --result-dir RUN --weights "
            f"{sampling_weights_name(args.ema_sigma_rels)} --fid {args.eval_samples} --sampler ddim "
            f"--num-sampling-steps {args.sample_steps} --cfg-scale {args.eval_cfg_scale:g} --seed {args.seed}` "
            f"at that step's checkpoint")
        return cls(dataset.manifest, args.prediction, args.sample_steps, args.seed, args.eval_samples,
                   args.eval_metrics, reference, cache_dir, args.eval_cfg_scale, vae, networks)


def check_reference(reference, metrics, num_samples, image_shape, flag="--eval-reference"):
    """Refuse (ValueError, one line) before training an evaluation that would fail at its first step:
    a reference that is not an image source or ADM batch, images of another size than the samples
    (H, W, 3; None: not known), a metric without what it needs from the reference, too few images for
    a statistic. flag: the option that gave the reference, for the messages."""
    try:
        side = Side(reference, f"{flag} {reference}")
    except UsageError as e:
        raise ValueError(str(e)) from None
    if None not in (side.image_shape, image_shape) and tuple(side.image_shape) != tuple(image_shape):
        (h, w, _), (rh, rw, _) = image_shape, side.image_shape
        raise ValueError(f"{flag} {reference}: {rw}x{rh} images, but the run's samples are {w}x{h}; "
                         f"give reference images of the samples' size")
    for m in metrics:
        if m != "is" and (m == "pr" or m not in side.stats) and side.images is None:
            raise ValueError(f"--eval-metrics {m}: {flag} {reference} holds no images to compare with")
    least = evaluation.PR_K + 1 if "pr" in metrics else 2
    if num_samples < least or (side.images is not None and len(side) < least):
        raise ValueError(f"--eval-metrics {' '.join(metrics)}: needs at least {least} samples and reference "
                         f"images (got --eval-samples {num_samples}, {len(side) or 'no'} reference images)")


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
