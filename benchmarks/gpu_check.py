"""The first look at a GPU, in one run of under 5 minutes on one H200: does every GPU-only path work,
and how fast is it. Writes a markdown block for benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py --out-md $OUT/gpu_check.md      # on the GPU (DiT-XL/2, 32x32 latents)
    python benchmarks/gpu_check.py --tiny                          # the same script on a CPU, tiny models

Measures the bf16 TFLOP/s of large matrix multiplies, then the --sections (SECTIONS), each skipped
once too little of --budget-s is left. The markdown is rewritten after every section, so a run cut
short keeps what it measured. benchmarks/README.md says what each row means.
"""
import glob
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from harness import (ROOT, CONFIGS, Ctx, SampleStep, TrainStep, forward_gmacs, free, halving_on_oom,
                     machine_info, machine_line, setup, table, timed)  # first: it puts ROOT on sys.path

import runs
import sampling
import torch
from cli import ArgumentParser, run_command
from data import write_text

SECTIONS = {"train": ("train step, eager", 60), "torchrun": ("torchrun train.py, 1 process", 60),
            "sample": ("guided sampling", 30), "checkpoint": ("train step, eager, --grad-checkpoint", 50),
            "compile": ("train step, torch.compile (inductor)", 120)}  # title, about the seconds it needs on an H200
TINY = dict(overrides=dict(depth=2, hidden_size=64, num_heads=2), compile_backend="aot_eager")  # DiT-XS/2, 8x8, batch 8
TRAIN_ARGS = ["--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--global-batch-size", "8", "--num-workers", "0", "--log-every", "1", "--monitor-every", "2",
              "--sample-steps", "2", "--warmup-steps", "0", "--decay-steps", "0"]  # torchrun: constant lr, 2 + 2 steps


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true",
                   help="CPU check of the script itself: DiT-XS/2 at depth 2, width 64 on 8x8 latents, batch 8, fp32")
    p.add_argument("--model", default="DiT-XL/2", help="model of the train, sample and compile sections")
    p.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px)")
    p.add_argument("--batch", type=int, default=256, help="train batch (halved until it fits)")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch (2x rows with guidance)")
    p.add_argument("--iters", type=int, default=5, help="timed train steps per configuration")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                   help="what to run, in this order (default all)")
    p.add_argument("--budget-s", type=float,
                   help="start no section that would end after this many seconds (default 285; --tiny 1200)")
    p.add_argument("--out-md", help="write the markdown block here too (rewritten after every section)")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.size, args.batch, args.sample_batch, args.iters = "DiT-XS/2", 8, 8, 4, 2
    args.budget_s = args.budget_s or (1200 if args.tiny else 285)
    return args


def context(args, device, batch, **options):
    """A harness.Ctx of --model at --size for `batch` images; options: compile, grad_checkpoint."""
    return Ctx(device, args.model, args.size, batch, **(TINY if args.tiny else {}), **options)


def matmul_tflops(device):
    """TFLOP/s of n x n x n multiplies (bf16 on a GPU, fp32 on a CPU), best of 3 timings of 10."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = min(timed(device, lambda: a @ b, 10) / 10 for _ in range(3))
    return 2 * n**3 / best / 1e12, f"{n}x{n}x{n} {str(dtype)[6:]}"


def train_rows(args, device, peaks, **options):
    """Markdown table of the train step of each configuration, built and timed one after the other
    (--iters single steps, median): img/s, ratio to vanilla, MFU, peak GB, set-up seconds."""
    def measure(batch):
        ctx, speed, rows = context(args, device, batch, **options), {}, []
        gmacs = forward_gmacs(ctx)[0]
        for name, kwargs in CONFIGS.items():
            t0 = time.perf_counter()
            step = TrainStep(ctx, kwargs)  # runs two steps: optimiser state, peak memory (and compiling)
            setup_s = time.perf_counter() - t0
            speed[name] = batch / statistics.median(timed(device, step) for _ in range(args.iters))
            mfu = ", ".join(f"{speed[name] * 6 * gmacs * 1e9 / (p * 1e12):.1%}" for p in peaks) or "n/a"
            rows.append([name, batch, f"{speed[name]:.1f}", f"{speed[name] / speed['vanilla']:.3f}", mfu,
                         f"{step.peak_gb:.1f}" if step.peak_gb else "n/a", f"{setup_s:.0f}"])
            del step
            free(device)
        return rows
    return table(["config", "batch", "train img/s", "/ vanilla", "MFU (nominal, matmul peak)", "peak GB", "set-up s"],
                 halving_on_oom(measure, args.batch, device, args.model))


def torchrun_rows(args, device):
    """train.py under torchrun, 1 process: 2 steps with a checkpoint, then --resume to 4 steps."""
    results = tempfile.mkdtemp(prefix="gpu-check-")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            os.path.join(ROOT, "train.py"), "--results-dir", results, *TRAIN_ARGS, "--ckpt-every", "2"]

    def run(*extra):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=240)
        return done.returncode, " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])[-400:]

    def checkpoints(run_dir):
        return ", ".join(os.path.basename(p) for p in runs.checkpoints_in(run_dir))
    try:
        code, tail = run("--num-steps", "2")
        run_dirs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(results, "*", "config.json")))
        if code or not run_dirs:
            return [f"- first run: **failed**, exit {code}: `{tail}`"]
        first = f"- first run: exit 0, checkpoints {checkpoints(run_dirs[0])}"
        code, tail = run("--num-steps", "4", "--resume", run_dirs[0])
        with open(os.path.join(run_dirs[0], "log.txt")) as f:
            resumed = [line.split("] ", 1)[1].strip() for line in f if "resumed at" in line]
        ok = code == 0 and resumed and os.path.exists(os.path.join(run_dirs[0], "checkpoints", "0000004.pt"))
        return [first, f"- resumed run: exit {code}, {resumed[-1] if resumed else 'no resume logged'}, checkpoints "
                       f"{checkpoints(run_dirs[0])}: **{'ok' if ok else 'failed'}**" + ("" if ok else f": `{tail}`")]
    finally:
        shutil.rmtree(results, ignore_errors=True)


def sample_rows(args, device):
    """Guided sampling images/s (cfg 4) with sample.py's sampler, bf16 forwards on a GPU, vanilla and MaP."""
    name, steps = ("dpm++" if importlib.util.find_spec("diffusers") else "ddim"), 5 if args.tiny else 25
    rows, ctx = [], context(args, device, args.sample_batch)
    for config, kwargs in CONFIGS.items():
        run = SampleStep(ctx, kwargs, sampling.make_sampler(name, steps), args.sample_batch, 4.0)
        run()  # warm-up
        seconds = min(timed(device, run) for _ in range(2))
        rows.append([config, f"{name} {steps}", args.sample_batch, f"{args.sample_batch / seconds:.2f}"])
    return table(["config", "sampler", "images", "images/s"], rows)


def main(argv=None):
    args = parse_args(argv)
    device = setup(cpu=args.tiny)
    start, lines, m = time.perf_counter(), [], machine_info(device)

    def report(*new):  # printed at the end; with --out-md written (atomically) after every section
        lines.extend(new)
        if args.out_md:
            write_text(args.out_md, "\n".join(lines) + "\n")
    report(f"## GPU check, {m['date']}", "",
           f"`python benchmarks/gpu_check.py{' --tiny' if args.tiny else ''}`: {machine_line(m)}; {args.model} at "
           f"{args.size}x{args.size}x4 latents{', depth 2, width 64, 2 heads (--tiny)' if args.tiny else ''}.", "")
    measured, shape = matmul_tflops(device)
    report(f"matmul {shape}: {measured:.3g} TFLOP/s", "")
    peaks = [p for p in (m["peak_tflops"], measured) if p and device.type == "cuda"]
    measure = dict(train=lambda: train_rows(args, device, peaks), torchrun=lambda: torchrun_rows(args, device),
                   sample=lambda: sample_rows(args, device),
                   checkpoint=lambda: train_rows(args, device, peaks, grad_checkpoint=True),
                   compile=lambda: train_rows(args, device, peaks, compile=True))
    for section in args.sections:
        title, needs_s = SECTIONS[section]
        title = title.replace("inductor", "aot_eager") if args.tiny else title
        left = args.budget_s - (time.perf_counter() - start)
        if left < needs_s:
            report(f"{title}: skipped, {left:.0f} s of --budget-s left (needs about {needs_s})", "")
            continue
        t0 = time.perf_counter()
        try:
            new = measure[section]()
        except Exception as e:  # a failed section is a finding; the others still run
            new = [f"**failed**: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"]
        report(f"{title} ({time.perf_counter() - t0:.0f} s):", "", *new, "")
        free(device)
    report(f"Total {time.perf_counter() - start:.0f} s. MFU: img/s x 3 x 2 x forward GMACs / peak (MaP on the "
           f"vanilla FLOP count); peak GB: the configuration's weights, Adam state and EMAs plus one step's peak.")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_command("gpu_check.py", main))
