"""What train.py shows and records of a run besides its checkpoints (RunOutputs): the log, metrics.jsonl,
TensorBoard / W&B, the progress bar, block magnitudes, sample grids (SampleGrids), evaluations (Evaluation).

Both sample with their objective's sampling.GRID_SAMPLER (--sample-steps) through sampling.py from the
weights sample.py uses by default (sampling_weights), latents decoded by train.py's VAE. Grids: guidance 4
on noise and labels drawn once from the run's seed. An evaluation at step s draws the images of `sample.py
--result-dir RUN --fid K --sampler GRID_SAMPLER --num-sampling-steps S --cfg-scale C --seed SEED` at that
step's checkpoint, so fid.py can check its numbers.
"""
import json
import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import evaluation
import feature_nets
import runs
from cli import UsageError, from_rank_0, gather_chunks, my_chunks
from data import write_text
from ema import frozen_copy
from eval_inputs import Side
from guidance import Guided
from mp_layers import MPLinear
from plots import plot_curves, plot_magnitudes, read_metrics
from progress import progress
from sampling import (GRID_SAMPLER, chunk_sizes, make_sampler, row_names, sample_chunk, sample_images, sampling_weights_name,
                      save_grid)
from trackers import Trackers

GRID_COLUMNS = 8
GRID_MAX_ROWS = 10  # classes shown: all of them up to 10, else 10 spread over the label range
GRID_CFG = 4.0
EVAL_BATCH = 64  # samples per chunk of an evaluation: sample.py's default --batch-size


class RunOutputs:
    """What a run shows and records besides its checkpoints: rank 0 writes each record to metrics.jsonl,
    the trackers and (most) the log through record(); every rank evaluates."""

    def __init__(self, args, run_dir, state, dataset, vae):
        self.args, self.run_dir, self.log = args, run_dir, logging.getLogger("train").info
        step, rank0, device = state.step, state.rng.rank == 0, state.noise.device
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if rank0:  # without the records logged after the checkpoint (they come again) and a line torn by a kill
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= step)
            write_text(self.path, kept)
        self.metrics = open(self.path, "a") if rank0 else None
        self.trackers = Trackers(run_dir, runs.config_of(args), args.wandb, start_step=step, enabled=rank0)
        self.grids = SampleGrids(run_dir, dataset.manifest, args, vae) if args.sample_every and rank0 else None
        self.evaluator = Evaluation.for_run(args, dataset, os.path.join(args.results_dir, "eval-cache"), device,
                                            self.log, vae) if args.eval_every else None
        self.bar = progress(total=args.num_steps, initial=step, unit="step", enabled=rank0 and not args.no_progress)
        self.window_loss = torch.zeros(3, device=device)  # [loss, mse, vb] summed since the last log line
        self.window_steps, self.window_start = 0, time.time()

    def record(self, record, scalars, line=None):
        """record -> metrics.jsonl, scalars {tag: value} -> the trackers, line -> the log (rank 0)."""
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.trackers.scalars(scalars, record["step"])
        self.trackers.flush()  # TensorBoard shows the values while the run trains
        if line:
            self.log(line)

    def add_losses(self, losses):
        self.window_loss += losses
        self.window_steps += 1
        self.bar.update(1)

    def log_losses(self, state, lr, grad_norm):
        """The mean [loss, mse, vb] of the steps since the last log line (over all ranks, checked finite)."""
        if state.rng.world > 1:
            dist.all_reduce(self.window_loss)
            self.window_loss /= state.rng.world
        runs.check_finite([self.window_loss], state.step, self.run_dir)
        steps, seconds = self.window_steps, time.time() - self.window_start
        loss, mse, vb = (self.window_loss / steps).tolist()
        record = dict(step=state.step, loss=loss, mse=mse, vb=vb, lr=lr, grad_norm=grad_norm.item(),
                      steps_per_sec=steps / seconds, images_per_sec=steps * self.args.global_batch_size / seconds)
        self.window_loss.zero_()
        self.window_steps, self.window_start = 0, time.time()
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_sec']:.1f}")
        self.record(record, {f"train/{k}": v for k, v in record.items() if k != "step"},
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def log_magnitudes(self, step, acts, weights):
        self.record(dict(step=step, act_rms=acts, weight_rms=weights),
                    {f"{key}/block{b:02d}": v for key, values in (("act_rms", acts), ("weight_rms", weights))
                     for b, v in enumerate(values)})

    def due(self, step, every):
        return every and (step % every == 0 or step == self.args.num_steps)

    def watch(self, state):
        """At --sample-every steps and the last a sample grid (rank 0), at --eval-every steps and the last
        an evaluation (every rank samples and extracts features; rank 0 records), of the sampling weights;
        their time does not count against the images/s of the log."""
        paused, weights = time.time(), sampling_weights(state.ema, state.ema_power)
        if self.grids and self.due(state.step, self.args.sample_every):
            self.grid(state.step, weights)
        if self.evaluator and self.due(state.step, self.args.eval_every):
            self.evaluate(state.step, weights)
        self.window_start += time.time() - paused

    def catch_up(self, state):
        """On resume, what a run killed during its grids or evaluations missed: the grid of its step,
        and every evaluation due at or before it without a record, made from the step's weights or
        from the checkpoint of its own step when that is on disk (else said in the log)."""
        step, every, weights = state.step, self.args.eval_every, sampling_weights(state.ema, state.ema_power)
        if self.grids and step and self.due(step, self.args.sample_every) and not os.path.exists(self.grids.path(step)):
            self.grid(step, weights)
        if self.evaluator is None or not step:
            return
        wanted = set(range(every, step + 1, every)) | ({step} if self.due(step, every) else set())
        done = {r["step"] for r in read_metrics(self.path) if "eval" in r} if self.metrics else set()
        for k in from_rank_0(sorted(wanted - done)):
            path = os.path.join(self.run_dir, "checkpoints", f"{k:07d}.pt")
            if k == step:
                self.evaluate(k, weights)
            elif os.path.isfile(path):
                ckpt, old = runs.load_checkpoint(path), frozen_copy(weights)
                old.load_state_dict(ckpt["ema_power"][str(max(state.ema_power))] if state.ema_power else ckpt["ema"])
                self.evaluate(k, old)
            else:
                self.log(f"the evaluation at step {k} was interrupted and no checkpoint of step {k} is left to "
                         f"make it from; its point of the curve stays missing")

    def grid(self, step, weights):
        start = time.time()
        grid, path = self.grids(weights, step)
        self.trackers.image("samples", grid, step)
        self.trackers.flush()
        self.log(f"sample grid: {path} ({time.time() - start:.1f} s)")

    def evaluate(self, step, weights):
        """Evaluate weights (every rank); rank 0 records the metrics as step's."""
        start, args = time.time(), self.args
        scores = {k: v for k, v in self.evaluator(weights).items() if k in args.eval_metrics or k in
                  ("precision", "recall")}
        seconds = time.time() - start
        line = " ".join(f"{k}={v:.4g}" for k, v in scores.items())
        self.record(dict(step=step, eval=scores, samples=args.eval_samples, seconds=seconds),
                    {f"eval/{k}": v for k, v in scores.items()},
                    f"evaluation at step {step}: {line} ({args.eval_samples} samples, {seconds:.0f} s)")

    def finish(self, step):
        """Closes the outputs; rank 0 draws magnitudes.png and curves.png and marks the run finished."""
        self.bar.close()
        self.trackers.close()
        if self.metrics is None:
            return
        self.metrics.close()
        magnitudes, curves = (os.path.join(self.run_dir, name) for name in ("magnitudes.png", "curves.png"))
        plot_magnitudes(read_metrics(self.path), magnitudes)
        plot_curves(read_metrics(self.path), curves)
        self.log(f"plots: {magnitudes}, {curves}; TensorBoard: tensorboard --logdir {os.path.join(self.run_dir, 'tb')}")
        runs.mark_finished(self.run_dir, step)


@torch.no_grad()
def block_magnitudes(model, x, t, y):
    """(RMS of the residual stream after each block, RMS of each block's stored weights) for one batch:
    what magnitude preservation is meant to keep flat."""
    acts = []
    hooks = [b.register_forward_hook(lambda m, i, out: acts.append(out.float().pow(2).mean().sqrt().item()))
             for b in model.blocks]
    try:
        model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    weights = []
    for block in model.blocks:
        ws = [m.weight for m in block.modules() if isinstance(m, (torch.nn.Linear, MPLinear))]
        weights.append((sum(w.float().pow(2).sum() for w in ws) / sum(w.numel() for w in ws)).sqrt().item())
    return acts, weights


def sampling_weights(ema, power_emas):
    """The weights sample.py samples from by default (sampling.sampling_weights_name): the widest power
    EMA, else the classic EMA."""
    return power_emas[max(power_emas)] if power_emas else ema


def run_sampler(args):
    """The sampler of a run's grids and evaluations: its objective's GRID_SAMPLER, --sample-steps steps."""
    return make_sampler(GRID_SAMPLER[args.objective], args.sample_steps, args.prediction)


def grid_labels(num_classes, rows=GRID_MAX_ROWS):
    """The classes of the grid's rows: all of them, or `rows` spread evenly over [0, num_classes)."""
    if num_classes <= rows:
        return torch.arange(num_classes)
    return torch.linspace(0, num_classes - 1, rows).round().long()


class SampleGrids:
    """Grids of the same noise and labels: one row per class (grid_labels, named when the manifest names
    the classes), GRID_COLUMNS columns, written by sampling.save_grid as sample.py writes its grids.
    grids(model, step) writes samples/NNNNNNN.png under run_dir and returns (the grid (H, W, 3), its path)."""

    def __init__(self, run_dir, manifest, args, vae=None):
        self.folder, self.manifest, self.vae = os.path.join(run_dir, "samples"), manifest, vae
        self.sampler, self.objective = run_sampler(args), args.objective
        self.labels = grid_labels(int(manifest["num_classes"]))
        self.y = self.labels.repeat_interleave(GRID_COLUMNS)
        generator = torch.Generator().manual_seed(args.seed)
        self.z = torch.randn(len(self.y), *manifest["shape"], generator=generator)

    def __call__(self, model, step):
        device = next(model.parameters()).device
        images = sample_images(Guided(model, GRID_CFG, objective=self.objective), self.sampler, self.z.to(device), self.y, self.manifest,
                               self.vae, bf16=device.type == "cuda")
        os.makedirs(self.folder, exist_ok=True)
        return save_grid(images, len(self.labels), self.path(step), row_names(self.manifest, self.labels)), \
            self.path(step)

    def path(self, step):
        return os.path.join(self.folder, f"{step:07d}.png")


class Evaluation:
    """A train.py run's evaluation (args: eval_samples, eval_metrics, eval_cfg_scale, prediction, sample_steps,
    seed): samples as the module docstring says (rank r draws the chunks k % world == r, as sample.py does),
    scored on every rank by evaluation.evaluate against `reference` (statistics cached in cache_dir)."""

    def __init__(self, args, manifest, reference=None, cache_dir=None, vae=None, networks=None):
        self.args, self.manifest, self.reference, self.cache_dir, self.vae = args, manifest, reference, cache_dir, vae
        self.networks = networks or {}
        self.sampler = run_sampler(args)
        self.sizes = chunk_sizes(args.eval_samples, EVAL_BATCH)

    @torch.no_grad()
    def images(self, model):
        """All the samples (N, H, W, 3) uint8, in chunk order on every rank. The global RNG, which
        chunk_inputs seeds, is the training's again afterwards."""
        device, chunks = next(model.parameters()).device, {}
        guided = Guided(model, self.args.eval_cfg_scale, objective=self.args.objective)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for k in my_chunks(len(self.sizes)):
                chunks[k] = sample_chunk(guided, self.sampler, self.manifest, self.args.seed, k, self.sizes[k],
                                         self.vae, bf16=device.type == "cuda")[0]
        chunks = gather_chunks(chunks)
        return np.concatenate([chunks[k] for k in range(len(self.sizes))])

    def __call__(self, model):
        """{metric: value} of model's samples (the keys evaluation.evaluate returns)."""
        return evaluation.evaluate(self.images(model), self.reference, self.args.eval_metrics,
                                   networks=self.networks, cache=self.cache_dir, progress=False)

    @classmethod
    def for_run(cls, args, dataset, cache_dir, device, log, vae=None):
        """The evaluation of a train.py run against args.eval_reference (default its data); logs what it
        measures, with which network, and the sample.py command that draws the same images."""
        networks = {}
        if "fd_classifier" in args.eval_metrics:
            networks["classifier"] = feature_nets.trained_classifier(dataset, cache_dir, device, log)
            log("evaluation: fd_classifier is the Frechet distance of the 128-d features of a small classifier "
                "trained on this data (feature_nets.py; not comparable to FID)")
        reference = args.eval_reference or dataset.path
        log(f"evaluation every {args.eval_every} steps: {', '.join(args.eval_metrics)} of {args.eval_samples} "
            f"samples against {reference}, the images of `python sample.py --result-dir RUN --weights "
            f"{sampling_weights_name(args.ema_sigma_rels)} --fid {args.eval_samples} --sampler {GRID_SAMPLER[args.objective]} "
            f"--num-sampling-steps {args.sample_steps} --cfg-scale {args.eval_cfg_scale:g} --seed {args.seed}` "
            f"at that step's checkpoint")
        return cls(args, dataset.manifest, reference, cache_dir, vae, networks)


def check_reference(reference, metrics, num_samples, image_shape, flag="--eval-reference"):
    """Refuse (UsageError) before training an evaluation that would fail at its first step:
    a reference that is not an image source or ADM batch, images of another size than the samples
    (H, W, 3; None: not known), a metric without what it needs from the reference, too few images for
    a statistic. flag: the option that gave the reference, for the messages."""
    side = Side(reference, f"{flag} {reference}")
    if None not in (side.image_shape, image_shape) and tuple(side.image_shape) != tuple(image_shape):
        (h, w, _), (rh, rw, _) = image_shape, side.image_shape
        raise UsageError(f"{flag} {reference}: {rw}x{rh} images, but the run's samples are {w}x{h}; "
                         f"give reference images of the samples' size")
    for m in metrics:
        if m != "is" and (m == "pr" or m not in side.stats) and side.images is None:
            raise UsageError(f"--eval-metrics {m}: {flag} {reference} holds no images to compare with")
    least = evaluation.PR_K + 1 if "pr" in metrics else 2
    if num_samples < least or (side.images is not None and len(side) < least):
        raise UsageError(f"--eval-metrics {' '.join(metrics)}: needs at least {least} samples and reference "
                         f"images (got --eval-samples {num_samples}, {len(side) or 'no'} reference images)")


def eval_metrics_for(requested, kind, flag="--eval-metrics"):
    """The metrics to use: those requested, else fid when the Inception weights are found, else
    fd_classifier for pixel data. UsageError (naming flag) when they cannot be computed."""
    if requested is None:
        if "fid" in evaluation.available_metrics():
            return ["fid"]
        if kind != "pixel":
            raise UsageError(f"{flag}: FID needs the Inception weights (pt_inception-2015-12-05-6726825d.pth; see "
                             "fid.py --help) and the fallback fd_classifier needs pixel data")
        return ["fd_classifier"]
    try:
        names = evaluation.parse_metrics(requested, networks=("classifier",))
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None
    missing = [m for m in names if m in evaluation.METRICS and m not in evaluation.available_metrics()]
    if missing:
        raise UsageError(f"{flag}: {missing[0]} needs weights that are not found (see fid.py --help for where they go)")
    if "fd_classifier" in names and kind != "pixel":
        raise UsageError(f"{flag}: fd_classifier needs pixel data")
    return names
