"""Speed of MaP-DiT against vanilla DiT: training step, sampling forward, and train.py's own loop;
and the two costs the study's estimate and evaluation need.

    python benchmarks/bench.py                  # CPU default: DiT-S/2 on 16x16x4, batch 16, fp32 (< 5 min, 2 cores)
    python benchmarks/bench.py --each           # also every MP switch alone
    python benchmarks/bench.py --loop           # train.py's loop on the demo data against the bare step
    python benchmarks/bench.py --models DiT-B/2@16 DiT-XL/2@32 --batch 256   # GPU: bf16 autocast, fused Adam
    python benchmarks/bench.py --sample-cost    # instead: a sampling step / a training step of the study's model
    python benchmarks/bench.py --features 40 6  # instead: fid.py's Inception and DINOv2 images/s, 10K extrapolated

Configurations are timed interleaved (see interleaved): compare the ratios. See benchmarks/README.md.
"""
import contextlib
import ctypes
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from harness import (ROOT, CONFIGS, Ctx, InferStep, SampleStep, TrainStep, forward_gmacs, free,
                     halving_on_oom, machine_info, machine_line, setup, summary, table, timed)  # first: ROOT on sys.path

import torch
import train
from cli import ArgumentParser, UsageError, run_command
from data import make_demo_dataset, read_manifest, write_json, write_text
from models import MP_SWITCHES
from sampling import make_sampler

STUDY_MODEL = dict(depth=4, hidden_size=128, num_heads=4)  # experiments/study.py's cpu profile: DiT-XS/4, 3x32x32


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", metavar="NAME@SIZE",
                   help="model @ latent size (default CPU: DiT-S/2@16; GPU: DiT-B/2 and DiT-XL/2 @16 and @32)")
    p.add_argument("--batch", type=int, help="images per step (default 16 CPU, 256 GPU; halved on GPU OOM)")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--each", action="store_true", help="also every MP switch alone (forced = weight norm + forced)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on GPU")
    p.add_argument("--plain-forward", action="store_true", help="inference: model(x) instead of a classifier-free-guided step")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per configuration")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2, help="iterations per timed block")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-infer", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each model's forward")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing (DiT.grad_checkpoint): less memory, more compute")
    p.add_argument("--peak-tflops", type=float, help="device bf16 dense peak for MFU (default: H100/H200 989)")
    p.add_argument("--loop", action="store_true", help="also train.py's loop on the demo data vs the bare step")
    p.add_argument("--loop-model", default="DiT-S/4", help="model for --loop (demo data: 3x32x32, 10 classes)")
    p.add_argument("--loop-steps", type=int, default=16)
    p.add_argument("--loop-window", type=int, default=4, help="train.py --log-every; the first window is skipped")
    p.add_argument("--loop-rounds", type=int, default=1)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice less the cores busy elsewhere)")
    p.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc at its defaults")
    p.add_argument("--sample-cost", action="store_true",
                   help="instead: one DDIM step at --sample-batch over one train step at --batch (default 64) of "
                        "experiments/study.py's cpu model, on one thread")
    p.add_argument("--sample-batch", type=int, default=256, help="--sample-cost's sampling batch (train.py's)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="--sample-cost's guidance (default 1: none, as the study)")
    p.add_argument("--features", type=int, nargs=2, metavar=("INCEPTION", "DINOV2"),
                   help="instead: images/s of fid.py's Inception and DINOv2 ViT-L/14 (random weights) on this many "
                        "images each (0 skips one), and the minutes 10K images take")
    p.add_argument("--image-size", type=int, default=256, help="--features' image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", default=os.path.join(ROOT, "benchmarks", "results.json"))
    p.add_argument("--out-md", help="also write the markdown report here")
    args = p.parse_args(argv)
    if args.loop and args.loop_steps < 2 * args.loop_window:
        raise UsageError("--loop-steps must be at least 2 x --loop-window (the first window is skipped)")
    return args


def configurations(each):
    """name -> DiT keyword arguments (original_layers: see harness.with_original_layers). Forced weight
    normalisation needs weight normalisation."""
    out = {"vanilla": {}, "original DiT layers": {"original_layers": True}, "MaP": {"mp": True}}
    for name in MP_SWITCHES if each else ():
        if name == "use_forced_weight_normalization":
            out["weight_norm+forced"] = {"use_weight_normalization": True, name: True}
        else:
            out[name[len("use_"):]] = {name: True}
    return out


def interleaved(ctx, steps):
    """Seconds per timed block of each configuration, and per-round ratios to vanilla. After warm-up,
    every round runs vanilla next to each other configuration in turn (vanilla, A, vanilla, B, ...;
    the order of each pair and of the configurations flips every round), so a ratio compares two
    adjacent blocks. With the default two configurations this is plain ABBA interleaving."""
    args, others = ctx.args, [n for n in steps if n != "vanilla"]
    for _ in range(args.warmup):
        for name in steps:
            steps[name]()
    times, ratios = {name: [] for name in steps}, {name: [] for name in steps}
    for r in range(args.rounds):
        for name in others if r % 2 == 0 else others[::-1]:
            order = ("vanilla", name) if r % 2 == 0 else (name, "vanilla")
            pair = {n: timed(ctx.device, steps[n], args.iters) for n in order}
            times["vanilla"].append(pair["vanilla"])
            times[name].append(pair[name])
            ratios[name].append(pair["vanilla"] / pair[name])
            ratios["vanilla"].append(1.0)
    return times, ratios


def run_model(ctx, configs, peak_tflops):
    """The train and infer records of every configuration of ctx's model."""
    gmacs, source, counted = forward_gmacs(ctx)
    out = dict(model=ctx.name, latent=[ctx.args.channels, ctx.size, ctx.size], batch=ctx.batch, gmacs=gmacs,
               gmacs_source=source, gmacs_counted=counted, configs={})
    for phase, cls, flops in (("train", TrainStep, 3 * 2 * gmacs * 1e9), ("infer", InferStep, 2 * gmacs * 1e9)):
        if getattr(ctx.args, "no_" + phase):
            continue
        steps = {n: cls(ctx, kw) for n, kw in configs.items()}
        times, ratios = interleaved(ctx, steps)
        for n, ts in times.items():
            ips = [ctx.args.iters * ctx.batch / s for s in ts]
            rec = dict(img_per_s=summary(ips), ratio=summary(ratios[n]))
            if peak_tflops:
                rec["mfu"] = statistics.median(ips) * flops / (peak_tflops * 1e12)
            if phase == "train":
                rec.update(peak_gb=steps[n].peak_gb, saved_act_mb=steps[n].act_mb, checkpointing=steps[n].checkpointing)
            out["configs"].setdefault(n, {})[phase] = rec
        del steps
        free(ctx.device)
    return out


def run_loop(args, device, batch):
    """train.py's own loop (loader, noise, EMAs, logging) against the bare step, same model and batch."""
    demo = make_demo_dataset(os.path.join(tempfile.gettempdir(), "map-dit-bench-demo-data"))
    manifest = read_manifest(demo)
    (channels, size, _), classes = manifest["shape"], manifest["num_classes"]
    ctx = Ctx(device, args.loop_model, size, batch, args, channels=channels, num_classes=classes)
    bare = {n: TrainStep(ctx, kw) for n, kw in CONFIGS.items()}
    out = {n: dict(loop=[], bare=[]) for n in CONFIGS}
    n_steps = str(args.loop_steps)
    for _ in range(args.loop_rounds):
        for n, kw in CONFIGS.items():
            parent = tempfile.mkdtemp(prefix="map-dit-bench-")
            os.symlink(demo, os.path.join(parent, "demo-data"))
            argv = ["--results-dir", parent, "--model", args.loop_model, "--mp" if kw else "--no-mp",
                    "--num-steps", n_steps, "--global-batch-size", str(batch), "--log-every", str(args.loop_window),
                    "--monitor-every", n_steps, "--ckpt-every", n_steps, "--snapshot-every", n_steps,
                    "--sample-steps", "2", "--sample-every", "0", "--eval-every", "0", "--seed", str(args.seed),
                    "--precision", args.precision]
            bare[n]()  # warm-up, then one window of the bare step just before the loop
            out[n]["bare"].append(args.loop_window * batch / timed(device, bare[n], args.loop_window))
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    run_dir = train.main(train.parse_args(argv))
            except Exception:
                print(log.getvalue(), file=sys.stderr)
                raise
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                windows = [r["images_per_sec"] for r in map(json.loads, f) if "images_per_sec" in r]
            for handler in logging.getLogger("train").handlers:  # train.py's; they point into `parent`
                handler.close()
            shutil.rmtree(parent)
            os.sync()  # no write-back of train.py's checkpoint during the next timing
            out[n]["loop"] += windows[1:]
    for n, rec in out.items():
        rec.update(loop=summary(rec["loop"]), bare=summary(rec["bare"]))
        rec["loop_over_bare"] = rec["loop"]["median"] / rec["bare"]["median"]
    return dict(model=args.loop_model, data=f"demo {channels}x{size}x{size}, {classes} classes", batch=batch,
                steps=args.loop_steps, window=args.loop_window, configs=out)


def sample_cost(args, device):
    """Seconds of one sampling step (DDIM-2 through sampling.denoise, guided at --cfg-scale: above 1 the
    batch doubles; its time halved) at --sample-batch and of one train step at --batch (default 64) of
    the study's cpu model, vanilla and MaP: after --warmup, --rounds rounds of one of each; medians."""
    ctx = Ctx(device, "DiT-XS/4", 32, args.batch or 64, args, channels=3, num_classes=10, overrides=STUDY_MODEL)
    sampler, out = make_sampler("ddim", 2), {}
    for name, kwargs in CONFIGS.items():
        train_step, sample_step = TrainStep(ctx, kwargs), SampleStep(ctx, kwargs, sampler, args.sample_batch,
                                                                     args.cfg_scale)
        for step in [train_step, sample_step] * args.warmup:
            step()
        times = [(timed(device, train_step), timed(device, sample_step) / 2) for _ in range(args.rounds)]
        train_s, sample_s = (statistics.median(column) for column in zip(*times))
        out[name] = dict(train_s=train_s, sample_s=sample_s, ratio=sample_s / train_s, times=times)
    return dict(train_batch=ctx.batch, sample_batch=args.sample_batch, cfg_scale=args.cfg_scale, configs=out)


def feature_speed(args, device):
    """Images/s of fid.py's feature networks, with random weights of the real architectures (speed does
    not depend on their values), on --features counts of random --image-size images."""
    import timm

    import evaluation
    import feature_nets

    def inception(path):
        return feature_nets.InceptionNet(feature_nets.random_inception_weights(path), device)

    def dinov2(path):
        model = timm.create_model(feature_nets.DINOV2_ARCH, img_size=518, num_classes=0)
        torch.save(dict(model.state_dict(), mask_token=torch.zeros(1, model.embed_dim)), path)
        return feature_nets.DINOv2Net(path, device)
    networks = [("Inception", inception, 50), ("DINOv2 ViT-L/14", dinov2, 10)]  # name, build, batch size
    size, out = args.image_size, {}
    images = np.random.default_rng(0).integers(0, 256, (max(args.features), size, size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        for (name, build, batch), n in zip(networks, args.features):
            if n:
                net = build(os.path.join(tmp, "weights.pth"))
                seconds = timed(device, lambda: evaluation.extract_features(net, images[:n], batch_size=batch,
                                                                            progress=False))
                out[name] = dict(images=n, seconds=seconds, img_per_s=n / seconds)
    return dict(image_size=size, networks=out)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse, as a GPU caching allocator does (blocks up to
    32 MB from the heap, never trimmed), not to fault each step's temporaries back in, zeroed (see
    benchmarks/README.md). Returns whether it applied (False without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def fmt(s, digits=1):
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def markdown(result):
    m, a = result["machine"], result["settings"]
    lines = [f"# MaP-DiT speed, {m['date']}", "",
             f"{machine_line(m)}. {a['precision']}; malloc: {a['malloc']}; inference = {a['infer_mode']}; "
             f"{a['warmup']} warm-up, then {a['rounds']} interleaved rounds of {a['iters']} iterations per block. "
             "Cells: median [min-max] over blocks; a ratio compares a block with the adjacent vanilla block "
             "(above 1: faster than vanilla).", ""]
    for r in result["models"]:
        rows = []
        for n, c in r["configs"].items():
            tr, inf = c.get("train", {}), c.get("infer", {})
            rows.append([n, *(fmt(rec[k], d) if rec else "-" for rec in (tr, inf) for k, d in (("img_per_s", 1), ("ratio", 3))),
                         f"{tr['peak_gb']:.2f}" if tr.get("peak_gb") else "n/a",
                         f"{tr['saved_act_mb']:.0f}" if tr else "-",
                         ", ".join(f"{x['mfu']:.1%}" if "mfu" in x else "n/a" for x in (tr, inf))])
        lines += [f"## {r['model']}, latent {'x'.join(map(str, r['latent']))}, batch {r['batch']} "
                  f"({r['gmacs']:.2f} forward GMACs/image from {r['gmacs_source']})", "",
                  *table(["config", "train img/s", "train / vanilla", "infer img/s", "infer / vanilla", "peak GB",
                          "saved act. MB", "MFU train, infer"], rows)]
        if not a["plain_forward"] and all("infer" in c for c in r["configs"].values()):
            lines += ["", "Sampling with guidance, images/s (infer rows/s / 2 rows per image / steps; the "
                      "sampler's own arithmetic is excluded): " + "; ".join(
                          f"{n} DDIM-50 {c['infer']['img_per_s']['median'] / 100:.3g}, DDPM-250 "
                          f"{c['infer']['img_per_s']['median'] / 500:.3g}" for n, c in r["configs"].items())]
        lines.append("")
    if "sample_cost" in result:
        sc = result["sample_cost"]
        lines += ["## One sampling step over one training step (the study's estimate)", "", *table(
            ["config", f"train step s, batch {sc['train_batch']}",
             f"sampling step s, batch {sc['sample_batch']}, cfg {sc['cfg_scale']:g}", "sampling / training"],
            [[n, f"{c['train_s']:.3f}", f"{c['sample_s']:.3f}", f"{c['ratio']:.2f}"] for n, c in sc["configs"].items()]),
            ""]
    if "features" in result:
        ft = result["features"]
        lines += [f"## fid.py's feature networks, {ft['image_size']} px, random weights", "", *table(
            ["network", "images", "seconds", "img/s", "10K images, min"],
            [[n, c["images"], f"{c['seconds']:.1f}", f"{c['img_per_s']:.2f}", f"{1e4 / c['img_per_s'] / 60:.0f}"]
             for n, c in ft["networks"].items()]), ""]
    if "loop" in result:
        lp = result["loop"]
        lines += [f"## train.py loop vs bare step: {lp['model']}, {lp['data']}, batch {lp['batch']}, {lp['steps']} "
                  f"steps logged every {lp['window']} (first window skipped)", "",
                  *table(["config", "loop img/s", "bare step img/s", "loop / bare"],
                         [[n, fmt(c["loop"]), fmt(c["bare"]), f"{c['loop_over_bare']:.3f}"]
                          for n, c in lp["configs"].items()]), ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    malloc = "glibc defaults" if args.system_malloc or not keep_freed_memory() else "glibc, freed memory kept"
    device = setup(args.threads or (1 if args.sample_cost else None))
    gpu = device.type == "cuda"
    specs = args.models or (["DiT-B/2@16", "DiT-B/2@32", "DiT-XL/2@16", "DiT-XL/2@32"] if gpu else ["DiT-S/2@16"])
    if args.sample_cost or args.features or (args.no_train and args.no_infer):  # no speed table
        specs = []
    machine, configs, batch = machine_info(device), configurations(args.each), args.batch or (256 if gpu else 16)
    peak = args.peak_tflops or machine["peak_tflops"]
    settings = dict(vars(args), precision=args.precision if args.precision != "auto" else ("bf16" if gpu else "fp32"),
                    peak_tflops=peak, malloc=malloc, infer_mode="plain forward" if args.plain_forward
                    else "classifier-free-guided step (batch = cond + null-label rows)")
    result = dict(machine=machine, settings=settings, models=[])
    start = time.perf_counter()
    for spec in specs:
        name, size = spec.split("@")
        result["models"].append(halving_on_oom(
            lambda b: run_model(Ctx(device, name, int(size), b, args), configs, peak), batch, device, spec))
        print(f"{spec}: done after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    modes = dict(sample_cost=sample_cost, features=feature_speed, loop=lambda a, d: run_loop(a, d, batch))
    for mode, run in modes.items():  # in this order
        if getattr(args, mode):
            result[mode] = run(args, device)
    result["seconds"] = time.perf_counter() - start
    report = markdown(result)
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    write_json(args.out_json, result)
    if args.out_md:
        write_text(args.out_md, report + "\n")


if __name__ == "__main__":
    sys.exit(run_command("bench.py", main))
