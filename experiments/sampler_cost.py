"""Quality per compute: the metric of each run's samples against the number of model evaluations
(NFE) per image, for every fixed-step sampler of its objective (DDPM, DDIM, DPM-Solver++ for a DDPM
run; Euler, Heun, SDE for a flow run) at several step counts. Unguided (cfg 1: one call per step),
the run's default sampling weights, the same labels and noise for every cell (sample.py --fid --seed).

    python experiments/sampler_cost.py --runs RUN_DDPM RUN_FLOW --steps 4 8 16 32 64 --num-samples 1000

Writes OUT/sampler_cost.md (fd_classifier and class consistency: NFE down, sampler across) and
OUT/sampler_cost.png (fd_classifier against NFE on a log axis); OUT/results.json keeps each scored
cell, so a rerun with the same --num-samples and --seed scores only new ones (others: another --out).
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

import evaluation  # noqa: E402
import sample  # noqa: E402
from cli import ArgumentParser, UsageError, at_least, run_command  # noqa: E402
from data import LatentDataset, read_json, write_json, write_text  # noqa: E402
from experiments.evaluate import LOG, consistency, md_table, metric_networks, say  # noqa: E402
from runs import checkpoints_in, load_checkpoint, saved_args  # noqa: E402
from sampling import SAMPLERS, chunk_inputs, chunk_sizes, objective_of  # noqa: E402

BATCH = 64  # sample.py --batch-size: the chunks whose labels chunk_inputs draws
CALLS_PER_STEP = {"heun": 2}  # model evaluations per step (cfg 1); every other fixed-step sampler: 1


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="train.py runs of the same data")
    p.add_argument("--steps", type=at_least(1), nargs="+", default=[4, 8, 16, 32, 64], metavar="N",
                   help="sampler steps (default 4 8 16 32 64; Heun makes 2 calls a step)")
    p.add_argument("--num-samples", type=at_least(2), default=1000, metavar="N", help="images per cell (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="labels and noise, the same in every cell (default 0)")
    p.add_argument("--out", metavar="DIR", help="default: RESULTS/sampler-cost beside the first run")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.runs[0])), "sampler-cost")
    return args


def run_settings(run):
    """(its objective, its pixel data path) of a run, from its newest checkpoint."""
    if not checkpoints_in(run):
        raise UsageError(f"--runs {run}: no checkpoints/NNNNNNN.pt")
    ckpt = load_checkpoint(checkpoints_in(run)[-1], mmap=True)
    saved = saved_args(ckpt)
    data = saved["data_path"] or os.path.join(os.path.dirname(os.path.abspath(run)), "demo-data")
    if ckpt["manifest"]["kind"] != "pixel" or not os.path.isdir(data):
        raise UsageError(f"--runs {run}: needs a pixel run whose data ({data}) is still there (fd_classifier)")
    return objective_of(saved["prediction"]), data


def score_cell(run, sampler, steps, data, networks, args):
    """(fd_classifier, class consistency) of --num-samples images of the run sampled by `sampler` in
    `steps` steps; consistency is the share the classifier labels with the class they were drawn for."""
    npz = os.path.join(args.out, "samples", f"{os.path.basename(os.path.normpath(run))}-{sampler}{steps}.npz")
    sample.main(sample.parse_args(["--result-dir", run, "--fid", str(args.num_samples), "--cfg-scale", "1",
                                   "--sampler", sampler, "--num-sampling-steps", str(steps), "--seed",
                                   str(args.seed), "--batch-size", str(BATCH), "--out", npz, "--no-progress"]))
    value = evaluation.evaluate(npz, data, ["fd_classifier"], networks=networks, progress=False,
                                cache=os.path.join(os.path.dirname(os.path.abspath(run)), "eval-cache"))
    shutil.rmtree(npz[: -len(".npz")] + "-chunks", ignore_errors=True)
    manifest = LatentDataset(data).manifest
    labels = np.concatenate([chunk_inputs(args.seed, k, n, tuple(manifest["shape"]), manifest["num_classes"])[1]
                             for k, n in enumerate(chunk_sizes(args.num_samples, BATCH))])  # sample.py's labels
    with np.load(npz) as z:
        return value["fd_classifier"], consistency(networks["classifier"], z["arr_0"], labels)


def write_outputs(args, results):
    """The table (a row per NFE, a column per run and sampler) and the figure."""
    columns = sorted({(r["run"], r["objective"], r["sampler"]) for r in results})
    at = {(r["run"], r["objective"], r["sampler"], r["nfe"]): r["fd_classifier"] for r in results}
    nfes = sorted({r["nfe"] for r in results})
    share = {(r["run"], r["objective"], r["sampler"], r["nfe"]): r["class_consistency"] for r in results}
    header = ["NFE"] + [f"{sampler} ({objective} run)" for _, objective, sampler in columns]
    tables = []
    for title, values, form in (("fd_classifier (lower is better)", at, "{:.2f}"),
                                ("class consistency (higher is better; chance 1 / classes)", share, "{:.0%}")):
        rows = [[str(n)] + [form.format(values[(*c, n)]) if (*c, n) in values else "" for c in columns] for n in nfes]
        tables += [f"{title} of {args.num_samples} unguided samples per cell, seed {args.seed}:", "",
                   *md_table(header, rows), ""]
    write_text(os.path.join(args.out, "sampler_cost.md"), "\n".join(tables))
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in columns:
        points = sorted((key[-1], v) for key, v in at.items() if key[:-1] == column)
        ax.plot(*zip(*points), marker="o", ls="-" if column[1] == "flow" else "--", label=f"{column[2]} ({column[1]})")
    ax.set(xscale="log", xlabel="model evaluations per image (NFE)", ylabel="FD (small classifier)")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sampler_cost.png"), dpi=120)
    plt.close(fig)


def main(args):
    os.makedirs(args.out, exist_ok=True)
    path, settings = os.path.join(args.out, "results.json"), dict(num_samples=args.num_samples, seed=args.seed)
    saved = read_json(path) or dict(settings=settings, cells=[])
    if saved["settings"] != settings:
        raise UsageError(f"{args.out}: holds cells of {saved['settings']}; give those settings, or another --out")
    results = saved["cells"]
    done = {(r["run"], r["sampler"], r["steps"]) for r in results}
    for run in args.runs:
        objective, data = run_settings(run)
        networks = metric_networks("fd_classifier", LatentDataset(data),
                                   os.path.join(os.path.dirname(os.path.abspath(run)), "eval-cache"))
        for sampler in [s for s in SAMPLERS[objective] if s != "dopri5"]:  # dopri5 chooses its own steps
            for steps in args.steps:
                if (run, sampler, steps) in done:
                    continue
                say(f"{run}: {sampler} {steps} steps")
                fd, consistent = score_cell(run, sampler, steps, data, networks, args)
                results.append(dict(run=run, objective=objective, sampler=sampler, steps=steps,
                                    nfe=steps * CALLS_PER_STEP.get(sampler, 1), fd_classifier=fd,
                                    class_consistency=consistent))
                write_json(path, dict(settings=settings, cells=results))
    write_outputs(args, results)
    print(f"wrote {args.out}/sampler_cost.md and sampler_cost.png")
    return results


def cli(argv=None):
    LOG["name"] = "sampler-cost"
    return run_command("sampler_cost.py", lambda argv: main(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(cli())
