"""EMA width x guidance scale (x guidance interval) for one checkpoint of a train.py run: sample
every cell with sample.py, score it as train.py's in-run evaluation does, and write a table, a plot
of the metric against sigma_rel and the best cell. experiments/README.md has the details.

    python experiments/sweep.py --result-dir RUN --reference VIRTUAL_imagenet128_labeled.npz \\
        --weights ema-0.05 ema-0.07 ema-0.1 ema-0.15 --cfg-scales 1.25 1.5 2 --num-samples 10000
    python experiments/sweep.py --result-dir RUN ... --intervals 0 inf 0 2.33  # also REPA's interval
    python experiments/sweep.py --result-dir RUN ... --guide RUN/checkpoints/0000500.pt   # autoguidance
    python experiments/sweep.py --result-dir RUN ... --launcher "torchrun --nproc_per_node=8"
"""
import math
import os
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import evaluation  # noqa: E402
import feature_nets  # noqa: E402
import plots  # noqa: E402
import sample  # noqa: E402
import watch  # noqa: E402
from data import ChunkFolder, LatentDataset, read_json, write_text  # noqa: E402
from ema import valid_sigma_rel  # noqa: E402
from experiments.evaluate import LOG, md_table, metric_networks, real_floor, say  # noqa: E402
from guidance import EVERY_STEP  # noqa: E402
from cli import ArgumentParser, UsageError, at_least, run_command  # noqa: E402
from runs import checkpoints_in, folder_lock, load_checkpoint  # noqa: E402
from sampling import DEFAULT_STEPS, SAMPLERS, objective_of  # noqa: E402

SHARED = ("result_dir", "ckpt", "num_samples", "sampler", "num_sampling_steps", "batch_size", "seed", "guide",
          "guide_weights", "precision", "metric", "reference", "eval_dir")
SWEEP_SAMPLER = {"ddpm": "dpm++", "flow": "heun"}  # few model calls for their quality, for many cells
LABELS = {"fid": "FID", "fd_classifier": "FD (small classifier)"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--result-dir", required=True, metavar="RUN", help="the train.py run")
    p.add_argument("--ckpt", metavar="FILE", help="the checkpoint of RUN that every cell samples (default: the "
                   "one OUT/settings.json records, else the newest)")
    p.add_argument("--weights", nargs="+", default=["ema-0.05", "ema-0.07", "ema-0.1", "ema-0.15", "ema-0.2"],
                   metavar="ema-S", help="EMA widths (default ema-0.05 ema-0.07 ema-0.1 ema-0.15 ema-0.2)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], metavar="S",
                   help="guidance scales (default 1 1.5 2 3)")
    p.add_argument("--intervals", type=float, nargs="+", metavar="LO HI",
                   help="pairs, guided where LO < sigma <= HI (sample.py --guidance-interval; default 0 inf)")
    p.add_argument("--guide", metavar="RUN_OR_CKPT", help="autoguidance in every cell (sample.py --guide)")
    p.add_argument("--guide-weights", metavar="W", help="the guide's weights (sample.py --guide-weights)")
    p.add_argument("--num-samples", type=at_least(2), default=1000, metavar="N",
                   help="images per cell, at least 2 for a covariance (default 1000)")
    p.add_argument("--sampler", choices=list(DEFAULT_STEPS), help="sample.py --sampler (default dpm++ for a DDPM "
                   "run, heun for a flow run)")
    p.add_argument("--num-sampling-steps", type=int, metavar="N", help="default: sample.py's for the sampler")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="sample.py --batch-size (default 256)")
    p.add_argument("--seed", type=int, default=0, help="the same labels and noise in every cell (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="sample.py --precision")
    p.add_argument("--metric", choices=["fid", "fd_classifier", "fd-classifier"],
                   help="the score (default as train.py's --eval-metrics: fid with the Inception weights on disk, "
                        "else fd_classifier for a pixel run)")
    p.add_argument("--reference", metavar="NPZ_OR_DIR", help="an ADM reference .npz, an image folder or a data.py "
                   "dataset (default: the run's --eval-reference, else its pixel training data, as train.py)")
    p.add_argument("--inception-weights", metavar="PATH", help="fid: a local pt_inception-2015-12-05 file")
    p.add_argument("--out", metavar="DIR", help="default RUN/sweep")
    p.add_argument("--eval-dir", metavar="DIR", help="the classifier's and the reference statistics' cache "
                   "(default: train.py's, the run's RESULTS/eval-cache)")
    p.add_argument("--launcher", default="", metavar="CMD",
                   help='what runs sample.py, e.g. "torchrun --nproc_per_node=8" (default: this Python)')
    args = p.parse_args(argv)
    check_grid(args)
    args.metric = args.metric and args.metric.replace("-", "_")  # fd-classifier: the name it had before
    args.out = args.out or os.path.join(args.result_dir, "sweep")
    args.eval_dir = args.eval_dir or os.path.join(os.path.dirname(os.path.abspath(args.result_dir)), "eval-cache")
    return args


def check_grid(args):
    """Refuse grid values sample.py cannot take (check_inputs gives each cell's arguments to sample.py's
    parser); merge duplicate grid values (one column, one row, one table each)."""
    widths = {}
    for w in args.weights:
        widths.setdefault(sigma_rel(w), w)  # ema-0.1 and ema-0.10 are one width
    args.sigma_rels, args.weights = list(widths), list(widths.values())
    bad = [s for s in args.cfg_scales if not math.isfinite(s)]
    if bad:
        raise UsageError(f"--cfg-scales {bad[0]}: must be a finite number (1 = no guidance)")
    args.cfg_scales = list(dict.fromkeys(args.cfg_scales))
    values = args.intervals or list(EVERY_STEP)
    if len(values) % 2:
        raise UsageError("--intervals: give pairs LO HI")
    args.intervals = list(dict.fromkeys(tuple(values[i:i + 2]) for i in range(0, len(values), 2)))


def sigma_rel(weights):
    """sigma_rel of ema-<sigma_rel>, read as sample.py reads it, where a power EMA of that width exists."""
    match = sample.POWER_EMA.fullmatch(weights)
    if not match:
        raise UsageError(f"--weights {weights}: use ema-<sigma_rel> such as ema-0.07 (the plot's axis)")
    if not valid_sigma_rel(float(match[1])):
        raise UsageError(f"--weights {weights}: no power EMA has sigma_rel {match[1]} (about 0 < sigma_rel < 0.3)")
    return float(match[1])


def grid_of(args):
    """The cells (weights, scale, interval), in the order they are sampled."""
    return [(w, s, i) for i in args.intervals for s in args.cfg_scales for w in args.weights]


def cell_name(weights, scale, interval):
    """e.g. ema-0.1-cfg2-sigma0-2.33; at scale 1 (no guidance) the interval changes nothing: one cell for all."""
    lo, hi = interval
    return f"{weights}-cfg{scale:g}" + (f"-sigma{lo:g}-{hi:g}" if (lo, hi) != EVERY_STEP and scale != 1 else "")


def check_inputs(args):
    """Resolve the checkpoint (--ckpt, else the one OUT/settings.json records, else the run's newest) and
    refuse what would fail once sampling began (each cell's sample.py arguments, parsed and given their
    sampler as sample.py does): a checkpoint that is not the run's (or not the one OUT's
    cells sample) or cannot give ema-<sigma_rel> weights, a reference the metric cannot read or compare.
    Resolves the metric, the reference and the run's data (args.data) as train.py does. Writes nothing."""
    ckpts = checkpoints_in(args.result_dir)
    if not ckpts:
        raise UsageError(f"--result-dir {args.result_dir}: no checkpoints/NNNNNNN.pt")
    recorded = (read_json(os.path.join(args.out, "settings.json")) or {}).get("ckpt")
    args.ckpt = os.path.realpath(args.ckpt or recorded or ckpts[-1])
    if args.ckpt not in map(os.path.realpath, ckpts):
        raise UsageError(f"--ckpt {args.ckpt}: not one of the checkpoints/NNNNNNN.pt of --result-dir {args.result_dir}")
    if recorded not in (None, args.ckpt):
        raise UsageError(f"{args.out}: its cells sample {recorded}, not --ckpt {args.ckpt}; give that one "
                         f"(or no --ckpt) to extend the sweep, or another --out")
    ckpt = load_checkpoint(args.ckpt, mmap=True)
    if not ckpt["ema_power"]:
        raise UsageError(f"{args.ckpt}: the run tracked no power EMA (train.py --ema-sigma-rels), so no "
                         f"ema-<sigma_rel> weights can be made from it")
    manifest, saved = ckpt["manifest"], ckpt["args"]
    objective = objective_of(saved.get("prediction"))
    args.sampler = args.sampler or SWEEP_SAMPLER[objective]
    if args.sampler not in SAMPLERS[objective]:
        raise UsageError(f"--sampler {args.sampler}: the run is a {objective} run; choose one of "
                         f"{', '.join(SAMPLERS[objective])}")
    pixel = manifest["kind"] == "pixel"
    fid_found = "fid" in evaluation.available_metrics(args.inception_weights)
    args.metric = args.metric or ("fid" if fid_found or not pixel else "fd_classifier")
    if args.metric == "fd_classifier" and not pixel:
        raise UsageError("--metric fd_classifier: pixel runs only (score a latent run with --metric fid)")
    args.data = saved.get("data_path") or os.path.join(os.path.dirname(os.path.abspath(args.result_dir)), "demo-data")
    args.reference = os.path.abspath(args.reference or saved.get("eval_reference") or (args.data if pixel else ""))
    if args.metric == "fd_classifier" and not os.path.isdir(args.data):
        raise UsageError(f"--metric fd_classifier: the run's data {args.data} is gone; the classifier trains on it")
    if not pixel and args.reference == os.path.abspath(""):
        raise UsageError(f"--metric {args.metric}: a latent run needs --reference (an ADM reference batch)")
    side = manifest["shape"][1:] if pixel else [manifest.get("image_size")] * 2
    watch.check_reference(args.reference, [args.metric], args.num_samples, None if None in side else (*side, 3),
                          flag="--reference")
    if args.metric == "fid" and not fid_found:
        raise UsageError(f"--metric fid: no Inception weights ({feature_nets.INCEPTION_FILE}); pass "
                         f"--inception-weights FILE or set {feature_nets.INCEPTION_ENV}")
    for w, s, (lo, hi) in grid_of(args):
        try:
            cell = sample.parse_args(sample_argv(args, w, s, (lo, hi), "cell.npz"))
            sample.choose_sampler(cell, saved.get("prediction"))
        except UsageError as e:
            raise UsageError(f"the cell {w}, cfg scale {s:g}, interval {lo:g} {hi:g}: sample.py refuses {e}") from None


def sample_argv(args, weights, scale, interval, path):
    argv = ["--ckpt", args.ckpt, "--weights", weights, "--cfg-scale", f"{scale:g}",
            "--guidance-interval", f"{interval[0]:g}", f"{interval[1]:g}", "--fid", str(args.num_samples),
            "--sampler", args.sampler, "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--precision", args.precision, "--out", path]
    if args.num_sampling_steps:
        argv += ["--num-sampling-steps", str(args.num_sampling_steps)]
    if args.guide:
        argv += ["--guide", args.guide] + (["--guide-weights", args.guide_weights] if args.guide_weights else [])
    return argv


def run_sample(launcher, argv):
    """sample.py in its own process (under the launcher); its errors are its own lines above."""
    cmd = (shlex.split(launcher) or [sys.executable]) + [os.path.join(ROOT, "sample.py"), *argv]
    code = subprocess.run(cmd).returncode
    if code:
        raise UsageError(f"sample.py exited with code {code} (its message is above): {shlex.join(cmd)}")


def make_scorer(args):
    """(extra feature networks: train.py's classifier for fd_classifier, a note on the real-data
    floor or None). The reference statistics are cached in --eval-dir."""
    dataset = LatentDataset(args.data) if os.path.isdir(args.data) else None
    networks = metric_networks(args.metric, dataset, args.eval_dir)
    if dataset is None or dataset.kind != "pixel":
        return networks, None
    n = min(args.num_samples, len(dataset))
    value = real_floor(dataset, n, args.reference, args.metric, networks, args.eval_dir, args.inception_weights)
    return networks, f"{n} training images score {value:.4g} against the reference (the floor at this size)"


def score(path, args, scorer):
    """The cell's .npz scored by evaluation.evaluate; its feature chunks are removed once it is."""
    result = evaluation.evaluate(path, args.reference, [args.metric], networks=scorer[0], cache=args.eval_dir,
                                 inception_weights=args.inception_weights, progress=False)[args.metric]
    shutil.rmtree(path[: -len(".npz")] + "-features", ignore_errors=True)
    return result


def write_table(args, results, best, floor):
    """OUT/sweep.md: one table per interval, sigma_rel down, guidance scale across, the best in bold."""
    label = LABELS[args.metric]
    lines = [f"{label}, {args.num_samples} samples per cell, {args.sampler} "
             f"{args.num_sampling_steps or 'default'} steps, seed {args.seed}"
             + (f", autoguidance by {args.guide}" if args.guide else "") + f"; checkpoint {args.ckpt}", ""]
    for interval in args.intervals:
        rows = [[f"{sr:g}"] + [f"**{results[c]:.4g}**" if c == best else f"{results[c]:.4g}"
                               for c in ((w, s, interval) for s in args.cfg_scales)]
                for w, sr in zip(args.weights, args.sigma_rels)]
        lines += [f"guidance interval {interval[0]:g} < sigma <= {interval[1]:g}:", "",
                  *md_table(["sigma_rel"] + [f"w = {s:g}" for s in args.cfg_scales], rows), ""]
    w, s, interval = best
    lines.append(f"Best: {cell_name(w, s, interval)} ({label} {results[best]:.4g}).")
    if floor:
        lines.append(f"Real data: {floor}.")
    write_text(os.path.join(args.out, "sweep.md"), "\n".join(lines) + "\n")


def write_plot(args, results, best):
    """OUT/sweep.png: the metric against sigma_rel, one line per guidance scale (dashed etc. per interval)."""
    several = len(args.intervals) > 1
    lines = [(f"w = {s:g}" + (f", {lo:g} < sigma <= {hi:g}" if several else ""),
              [results[(w, s, (lo, hi))] for w in args.weights], j, i)
             for j, (lo, hi) in enumerate(args.intervals) for i, s in enumerate(args.cfg_scales)]
    plots.plot_sweep(args.sigma_rels, lines, (sigma_rel(best[0]), results[best], cell_name(*best)),
                     LABELS[args.metric], os.path.join(args.out, "sweep.png"))


def main(args):
    """Check everything, then, holding OUT's lock (a second sweep on OUT waits), sample and score the cells
    not scored yet (OUT/<cell>.npz: score and floor, a data.ChunkFolder whose settings.json holds the
    shared options), then the table and the plot."""
    check_inputs(args)
    with folder_lock(args.out, create=True):
        cells = ChunkFolder(args.out, {k: getattr(args, k) for k in SHARED})
        grid = grid_of(args)
        scorer = None if all(cells.done(cell_name(*cell)) for cell in grid) else make_scorer(args)
        results = {}
        for k, cell in enumerate(grid):
            name = cell_name(*cell)
            npz = os.path.join(args.out, "samples", f"{name}.npz")
            if not cells.done(name):
                say(f"cell {k + 1}/{len(grid)}: {name}")
                if not os.path.exists(npz):
                    run_sample(args.launcher, sample_argv(args, *cell, npz))
                cells.save(name, score=score(npz, args, scorer), floor=scorer[1] or "")
                shutil.rmtree(npz[: -len(".npz")] + "-chunks", ignore_errors=True)
            record = cells.load(name)
            results[cell], floor = float(record["score"]), str(record["floor"]) or None
        best = min(results, key=results.get)
        write_table(args, results, best, floor)
        write_plot(args, results, best)
        print(f"best: {cell_name(*best)} ({args.metric} {results[best]:.4g}); wrote {args.out}/sweep.md and sweep.png")
        return best, results


def cli(argv=None):
    """sweep.py as a command: 0; bad input one line and 2."""
    LOG["name"] = "sweep"
    return run_command("sweep.py", lambda argv: main(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(cli())
